//! Layout discovery on a tree shaped like a participant's copy of Aff-Wild2.

use std::path::Path;

use avexpr_data::layout::{Layout, Split, crop_frames};

const HEADER: &str = "Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other\n";

fn touch(root: &Path, rel: &str, content: &str) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, content).unwrap();
}

fn tree(annotation_set: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let r = tmp.path();
    touch(r, "videos/batch1/1-30-1280x720.mp4", "");
    touch(r, "videos/batch2/10-60-1280x720.AVI", "");
    touch(r, "videos/batch2/video59.mp4", "");
    touch(r, "cropped_aligned/1-30-1280x720/00001.jpg", "");
    touch(r, "cropped_aligned/1-30-1280x720/00003.jpg", "");
    touch(r, "cropped_aligned/10-60-1280x720_left/00001.jpg", "");
    touch(r, "cropped_aligned_new_50_vids/10-60-1280x720_right/00002.jpg", "");
    touch(r, "cropped_aligned/video59/00001.jpg", "");
    let ann = format!("7th ABAW Annotations/{annotation_set}");
    touch(r, &format!("{ann}/Train_Set/1-30-1280x720.txt"), &format!("{HEADER}0\n1\n"));
    touch(r, &format!("{ann}/Train_Set/10-60-1280x720_left.txt"), &format!("{HEADER}4\n"));
    touch(r, &format!("{ann}/Validation_Set/10-60-1280x720_right.txt"), &format!("{HEADER}5\n"));
    touch(r, &format!("{ann}/Validation_Set/orphan.txt"), &format!("{HEADER}5\n"));
    touch(r, "names_of_videos_in_each_test_set/Expression_Recognition_Challenge_test_set_release.txt", "video59\n\n");
    touch(r, "names_of_videos_in_each_test_set/Valence_Arousal_Estimation_Challenge_test_set_release.txt", "other\n");
    tmp
}

#[test]
fn pairs_annotations_media_crops_and_the_test_list() {
    for set in ["EXPR_Recognition_Challenge", "EXPR_Classification_Challenge"] {
        let tmp = tree(set);
        let layout = Layout::discover(tmp.path()).unwrap();
        let names: Vec<(Split, &str)> = layout.videos.iter().map(|v| (v.split, v.name.as_str())).collect();
        assert_eq!(
            names,
            vec![
                (Split::Train, "1-30-1280x720"),
                (Split::Train, "10-60-1280x720_left"),
                (Split::Validation, "10-60-1280x720_right"),
                (Split::Validation, "orphan"),
                (Split::Test, "video59"),
            ],
            "{set}"
        );
        let by_name = |n: &str| layout.videos.iter().find(|v| v.name == n).unwrap();
        // _left and _right share one media file (an .AVI here), each has its own crops.
        let (left, right) = (by_name("10-60-1280x720_left"), by_name("10-60-1280x720_right"));
        assert_eq!(left.media, right.media);
        assert!(left.media.as_ref().unwrap().ends_with("videos/batch2/10-60-1280x720.AVI"));
        assert!(right.crops.as_ref().unwrap().ends_with("cropped_aligned_new_50_vids/10-60-1280x720_right"));
        assert!(by_name("orphan").media.is_none(), "an annotation without media is listed, without media");
        let test = by_name("video59");
        assert!(test.annotation.is_none() && test.media.is_some());
        // Crop folders with missing frames.
        let frames = crop_frames(by_name("1-30-1280x720").crops.as_ref().unwrap()).unwrap();
        assert_eq!(frames.into_iter().collect::<Vec<_>>(), vec![1, 3]);
    }
}

#[test]
fn layout_problems_are_errors_naming_the_path() {
    let tmp = tree("EXPR_Recognition_Challenge");
    touch(tmp.path(), "videos/batch3/1-30-1280x720.mp4", "");
    let e = Layout::discover(tmp.path()).unwrap_err().to_string();
    assert!(e.contains("two media files for `1-30-1280x720`") && e.contains("batch3"), "{e}");

    let empty = tempfile::tempdir().unwrap();
    touch(empty.path(), "videos/a.mp4", "");
    let e = Layout::discover(empty.path()).unwrap_err().to_string();
    assert!(e.contains("no EXPR annotations found"), "{e}");
    let e = Layout::discover(&empty.path().join("absent")).unwrap_err().to_string();
    assert!(e.contains("absent") && e.contains("not a directory"), "{e}");
}
