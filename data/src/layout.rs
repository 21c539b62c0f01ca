//! A participant's copy of Aff-Wild2, found as the challenge ships it (see shared/AFFWILD2.md):
//! annotation sets under `<N>th ABAW Annotations/EXPR_Recognition_Challenge/{Train_Set,Validation_Set}` (or the
//! older `EXPR_Classification_Challenge`), videos (`.mp4`, `.avi`) anywhere under the root (often in
//! `batch1/`, `batch2/`, ...), aligned face crops in `cropped_aligned/<video>/00001.jpg` and
//! `cropped_aligned_new_50_vids/`, and the test-set name list in `names_of_videos_in_each_test_set/`.
//! Two-person videos have `<base>_left` / `<base>_right` annotations and crops but one media file `<base>`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};

pub const ANNOTATION_SETS: [&str; 2] = ["EXPR_Recognition_Challenge", "EXPR_Classification_Challenge"];
pub const CROP_DIRS: [&str; 2] = ["cropped_aligned", "cropped_aligned_new_50_vids"];
pub const TEST_LIST_DIR: &str = "names_of_videos_in_each_test_set";
const VIDEO_EXTENSIONS: [&str; 2] = ["mp4", "avi"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    Train,
    Validation,
    Test,
}

impl Split {
    fn from_set_dir(name: &str) -> Option<Split> {
        match name {
            "Train_Set" => Some(Split::Train),
            "Validation_Set" => Some(Split::Validation),
            _ => None,
        }
    }
}

/// One annotated (or test) video as the challenge names it: the annotation / crop name, which for two-person
/// videos differs from the media file's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VideoEntry {
    pub name: String,
    pub split: Split,
    pub annotation: Option<PathBuf>,
    pub media: Option<PathBuf>,
    pub crops: Option<PathBuf>,
}

impl VideoEntry {
    /// The media name: the entry's name without a `_left` / `_right` suffix when that is how the media is found.
    pub fn media_stem(name: &str) -> &str {
        name.strip_suffix("_left").or_else(|| name.strip_suffix("_right")).unwrap_or(name)
    }
}

#[derive(Debug, Clone)]
pub struct Layout {
    pub root: PathBuf,
    /// Sorted by (split, name).
    pub videos: Vec<VideoEntry>,
}

fn has_video_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| VIDEO_EXTENSIONS.iter().any(|v| v.eq_ignore_ascii_case(e)))
}

impl Layout {
    /// Walks `root` once (not into crop folders) and pairs annotations, media, crops and the test list.
    pub fn discover(root: &Path) -> Result<Layout> {
        if !root.is_dir() {
            return Err(DataError::BadLayout { path: root.to_path_buf(), reason: "not a directory".into() });
        }
        let mut annotations: BTreeMap<String, (Split, PathBuf)> = BTreeMap::new();
        let mut media: BTreeMap<String, PathBuf> = BTreeMap::new();
        let mut crops: BTreeMap<String, PathBuf> = BTreeMap::new();
        let mut test_names: BTreeSet<String> = BTreeSet::new();
        let mut test_lists = 0;
        let mut walker = walkdir::WalkDir::new(root).follow_links(true).sort_by_file_name().into_iter();
        while let Some(entry) = walker.next() {
            let entry = entry.map_err(|e| {
                let path = e.path().unwrap_or(root).to_path_buf();
                DataError::BadLayout { path, reason: e.to_string() }
            })?;
            let path = entry.path();
            let parent = path.parent().and_then(Path::file_name).and_then(|n| n.to_str()).unwrap_or("");
            let grandparent =
                path.parent().and_then(Path::parent).and_then(Path::file_name).and_then(|n| n.to_str()).unwrap_or("");
            let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("").to_string();
            if entry.file_type().is_dir() {
                let stem = path.file_name().and_then(|s| s.to_str()).unwrap_or("").to_string();
                if CROP_DIRS.contains(&parent) {
                    // A video's crop folder holds thousands of JPEGs: note it, never walk into it.
                    walker.skip_current_dir();
                    if let Some(previous) = crops.insert(stem.clone(), path.to_path_buf()) {
                        return Err(duplicate(&stem, "crop folders", &previous, path));
                    }
                }
                continue;
            }
            if ANNOTATION_SETS.contains(&grandparent) && path.extension().is_some_and(|e| e == "txt") {
                if let Some(split) = Split::from_set_dir(parent)
                    && let Some((_, previous)) = annotations.insert(stem.clone(), (split, path.to_path_buf()))
                {
                    return Err(duplicate(&stem, "annotation files", &previous, path));
                }
            } else if parent == TEST_LIST_DIR
                && path.extension().is_some_and(|e| e == "txt")
                && stem.to_ascii_lowercase().contains("expression")
            {
                let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
                test_names.extend(text.lines().map(str::trim).filter(|l| !l.is_empty()).map(|l| {
                    let l = l.strip_suffix(".mp4").or_else(|| l.strip_suffix(".avi")).unwrap_or(l);
                    l.to_string()
                }));
                test_lists += 1;
            } else if has_video_extension(path)
                && let Some(previous) = media.insert(stem.clone(), path.to_path_buf())
            {
                return Err(duplicate(&stem, "media files", &previous, path));
            }
        }
        if annotations.is_empty() && test_lists == 0 {
            return Err(DataError::BadLayout {
                path: root.to_path_buf(),
                reason: format!(
                    "no EXPR annotations found (looked for {}/{{Train_Set,Validation_Set}}/*.txt) and no test list in {TEST_LIST_DIR}/",
                    ANNOTATION_SETS.join(" or ")
                ),
            });
        }
        let find_media = |name: &str| media.get(name).or_else(|| media.get(VideoEntry::media_stem(name))).cloned();
        let mut videos: Vec<VideoEntry> = annotations
            .into_iter()
            .map(|(name, (split, annotation))| VideoEntry {
                media: find_media(&name),
                crops: crops.get(&name).cloned(),
                annotation: Some(annotation),
                split,
                name,
            })
            .collect();
        for name in test_names {
            if let Some(v) = videos.iter().find(|v| v.name == name) {
                return Err(DataError::BadLayout {
                    path: root.join(TEST_LIST_DIR),
                    reason: format!(
                        "test video `{name}` is also annotated in {}",
                        v.annotation.as_ref().expect("annotated").display()
                    ),
                });
            }
            videos.push(VideoEntry {
                media: find_media(&name),
                crops: crops.get(&name).cloned(),
                annotation: None,
                split: Split::Test,
                name,
            });
        }
        videos.sort_by(|a, b| (a.split, &a.name).cmp(&(b.split, &b.name)));
        Ok(Layout { root: root.to_path_buf(), videos })
    }

    pub fn split(&self, split: Split) -> impl Iterator<Item = &VideoEntry> {
        self.videos.iter().filter(move |v| v.split == split)
    }
}

fn duplicate(name: &str, what: &str, a: &Path, b: &Path) -> DataError {
    DataError::BadLayout {
        path: b.to_path_buf(),
        reason: format!("two {what} for `{name}`: {} and {}", a.display(), b.display()),
    }
}

/// The frame numbers (from 1) present in a crop folder: `00001.jpg`, `00002.jpg`, ...; frames without a
/// detected face are simply absent.
pub fn crop_frames(dir: &Path) -> Result<BTreeSet<u32>> {
    let mut frames = BTreeSet::new();
    for entry in std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        let path = entry.map_err(|e| DataError::io(dir, e))?.path();
        if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("jpg"))
            && let Some(n) = path.file_stem().and_then(|s| s.to_str()).and_then(|s| s.parse::<u32>().ok())
        {
            frames.insert(n);
        }
    }
    Ok(frames)
}
