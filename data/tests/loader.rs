//! The streaming loader against real shards (local files and a real S3 server): coverage over ranks with the
//! right pixels, labels and audio; cursors; determinism whatever the thread count; bad shards and frames;
//! a storage outage in the middle of an epoch; dense evaluation.

mod garage;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use avexpr_data::ingest::{IngestConfig, ingest};
use avexpr_data::layout::Split;
use avexpr_data::loader::{AugmentConfig, Batch, Loader, LoaderConfig, LoaderError, Source};
use avexpr_data::manifest::{Manifest, read_manifest};
use avexpr_data::sampler::{Cursor, RankSampler, SamplerConfig};
use avexpr_data::shard::{Sample, read_shard};
use avexpr_data::store::Store;
use avexpr_data::synth::{SynthConfig, synth};

struct Fixture {
    _tmp: tempfile::TempDir,
    out: std::path::PathBuf,
    store: Store,
    manifest: Arc<Manifest>,
}

/// Synthetic videos ingested in 16-frame segments, 32-frame shards: clips cross shard boundaries.
fn fixture(videos: usize, seed: u64) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("affwild2");
    synth(&root, &SynthConfig { videos, min_seconds: 1.5, max_seconds: 3.0, seed, ..Default::default() }).unwrap();
    let out = tmp.path().join("shards");
    let mut cfg = IngestConfig::new(root, out.display().to_string());
    cfg.segment_frames = 16;
    cfg.shard_frames = 32;
    ingest(&cfg).unwrap();
    let store = Store::open(&cfg.out).unwrap();
    let manifest = Arc::new(read_manifest(&store).unwrap());
    Fixture { _tmp: tmp, out, store, manifest }
}

fn sampler_cfg(seed: u64) -> SamplerConfig {
    SamplerConfig { frames_per_clip: 12, stride: 6, shuffle_shards: 3, seed, ..Default::default() }
}

fn eval_cfg(batch_size: usize) -> LoaderConfig {
    LoaderConfig { batch_size, augment: None, prefetch_bytes: 4 << 20, decode_threads: 2, ..Default::default() }
}

#[allow(clippy::too_many_arguments)]
fn load(
    source: &Source,
    m: &Arc<Manifest>,
    split: Split,
    (rank, world): (usize, usize),
    scfg: &SamplerConfig,
    lcfg: &LoaderConfig,
    from: Cursor,
    until: u64,
) -> Vec<Batch> {
    let sampler = RankSampler::new(m, split, rank, world, scfg, None).unwrap();
    Loader::start(source.clone(), m.clone(), sampler, lcfg, from, Some(until)).unwrap().map(Result::unwrap).collect()
}

/// Every shard of the fixture read directly: (video, first frame of the segment) -> sample.
fn all_samples(f: &Fixture) -> BTreeMap<(String, usize), Sample> {
    let mut map = BTreeMap::new();
    for v in &f.manifest.videos {
        for s in &v.shards {
            let bytes = std::fs::read(f.out.join(&s.key)).unwrap();
            for (i, sample) in read_shard(&s.key, &bytes.into()).unwrap().into_iter().enumerate() {
                map.insert((v.name.clone(), s.first_frame + i * f.manifest.segment_frames), sample);
            }
        }
    }
    map
}

fn decode_jpeg(bytes: &[u8]) -> Vec<u8> {
    let rgb = image::load_from_memory(bytes).unwrap().into_rgb8();
    let plane = (rgb.width() * rgb.height()) as usize;
    let mut chw = vec![0; 3 * plane];
    for (i, p) in rgb.pixels().enumerate() {
        for c in 0..3 {
            chw[c * plane + i] = p.0[c];
        }
    }
    chw
}

/// Over 1..=4 ranks the frames served (real, labelled) are exactly the split's labelled frames; every
/// delivered frame's pixels, label and masks are the shard's, and every clip's audio is the video's samples
/// for its frames.
#[test]
fn ranks_together_serve_every_labelled_frame_with_its_pixels_labels_and_audio() {
    let f = fixture(6, 31);
    let samples = all_samples(&f);
    let seg = f.manifest.segment_frames;
    // Each video's whole audio, from its segments in order.
    let mut audio: BTreeMap<String, Vec<f32>> = BTreeMap::new();
    for ((video, _), s) in &samples {
        audio.entry(video.clone()).or_default().extend(s.audio());
    }
    let train: Vec<_> = f.manifest.videos.iter().filter(|v| v.split == Split::Train).collect();
    assert!(train.len() >= 4, "{} training videos", train.len());
    let want: BTreeSet<(String, usize)> = train
        .iter()
        .flat_map(|v| v.labels().into_iter().enumerate().filter(|(_, l)| *l >= 0).map(|(i, _)| (v.name.clone(), i)))
        .collect();
    let source = Source::Store(f.store.clone());
    for world in 1..=4 {
        let mut served = BTreeSet::new();
        for rank in 0..world {
            let batches = load(
                &source,
                &f.manifest,
                Split::Train,
                (rank, world),
                &sampler_cfg(5),
                &eval_cfg(7),
                Cursor::default(),
                1,
            );
            for b in &batches {
                let (n, size) = (b.frames, b.image_size);
                assert_eq!(b.faces.len(), b.len() * n * 3 * size * size);
                for (i, clip) in b.clips.iter().enumerate() {
                    let video = f.manifest.videos.iter().find(|v| v.name == clip.video).unwrap();
                    let labels = video.labels();
                    for p in 0..n {
                        let frame = clip.start + p as i64;
                        let k = i * n + p;
                        if frame < 0 || frame >= video.frames as i64 {
                            assert_eq!((b.frame_mask[k], b.face_mask[k], b.labels[k]), (0, 0, -1), "padding");
                            continue;
                        }
                        let frame = frame as usize;
                        assert_eq!(b.frame_mask[k], 1);
                        assert_eq!(b.labels[k], labels[frame], "{} frame {frame}", clip.video);
                        let sample = &samples[&(clip.video.clone(), frame / seg * seg)];
                        assert_eq!(b.face_mask[k], 1 - sample.face_missing[frame % seg]);
                        if world == 1 {
                            let plane = 3 * size * size;
                            assert!(
                                b.faces[k * plane..(k + 1) * plane] == decode_jpeg(&sample.faces[frame % seg]),
                                "{} frame {frame}: pixels",
                                clip.video
                            );
                        }
                        if labels[frame] >= 0 {
                            served.insert((clip.video.clone(), frame));
                        }
                    }
                    let rate = 16_000.0 / clip.fps;
                    let g0 = (clip.start as f64 * rate).round() as i64;
                    let g1 = ((clip.start + n as i64) as f64 * rate).round() as i64;
                    let whole = &audio[&clip.video];
                    for g in g0..g1 {
                        let k = i * b.samples + (g - g0) as usize;
                        let real = g >= 0 && (g as usize) < whole.len();
                        assert_eq!(b.audio_mask[k], real as u8, "{} sample {g}", clip.video);
                        assert_eq!(b.audio[k], if real { whole[g as usize] } else { 0.0 }, "{} sample {g}", clip.video);
                    }
                    assert_eq!(labels[(clip.start + n as i64 - 1) as usize], clip.target);
                }
            }
            let last = batches.last().unwrap().cursor;
            let sampler = RankSampler::new(&f.manifest, Split::Train, rank, world, &sampler_cfg(5), None).unwrap();
            assert_eq!(last, Cursor { epoch: 0, position: sampler.len() }, "the last batch ends the epoch");
            assert_eq!(batches.iter().map(Batch::len).sum::<usize>(), sampler.len());
        }
        assert_eq!(served, want, "world {world}");
    }
}

/// Same seed: identical batches (augmented) whatever the decode threads, fetch concurrency or source; another
/// epoch: another order; a cursor taken after any batch resumes with exactly the remaining batches.
#[test]
fn batches_are_deterministic_and_resume_exactly_from_any_cursor() {
    let f = fixture(5, 32);
    let scfg = sampler_cfg(11);
    let train = LoaderConfig { batch_size: 5, image_size: 48, prefetch_bytes: 4 << 20, ..Default::default() };
    let store = Source::Store(f.store.clone());
    let one = LoaderConfig { decode_threads: 1, fetch_concurrency: 1, ..train.clone() };
    let reference = load(&store, &f.manifest, Split::Train, (0, 1), &scfg, &train, Cursor::default(), 2);
    assert!(reference.len() >= 8, "{} batches", reference.len());
    let single = load(&store, &f.manifest, Split::Train, (0, 1), &scfg, &one, Cursor::default(), 2);
    assert!(single == reference, "1 decode thread, 1 request in flight: same batches");
    let train_videos: Vec<_> = f.manifest.videos.iter().filter(|v| v.split == Split::Train).collect();
    let memory = Source::preload(&f.store, &train_videos).unwrap();
    let from_memory = load(&memory, &f.manifest, Split::Train, (0, 1), &scfg, &train, Cursor::default(), 2);
    assert!(from_memory == reference, "the in-memory source: same batches");

    // Augmentation happened: pixels differ from the un-augmented faces, and the two epochs differ in order.
    let plain = LoaderConfig { augment: None, ..train.clone() };
    let unaugmented = load(&store, &f.manifest, Split::Train, (0, 1), &scfg, &plain, Cursor::default(), 1);
    assert_eq!(unaugmented[0].clips, reference[0].clips);
    assert_ne!(unaugmented[0].faces, reference[0].faces);
    let epoch =
        |e: u64| -> Vec<_> { reference.iter().filter(|b| b.cursor.epoch == e).flat_map(|b| b.clips.clone()).collect() };
    let (e0, e1) = (epoch(0), epoch(1));
    assert_eq!(e0.len(), e1.len());
    assert_ne!(e0, e1, "epochs differ in order");

    for k in [1, 2, reference.len() / 2, reference.len() / 2 + 1, reference.len() - 1] {
        let cursor = reference[k - 1].cursor;
        let json = serde_json::to_string(&cursor).unwrap();
        let restored: Cursor = serde_json::from_str(&json).unwrap();
        let resumed = load(&store, &f.manifest, Split::Train, (0, 1), &scfg, &train, restored, 2);
        assert!(resumed == reference[k..], "resumed after batch {k} (cursor {json})");
    }
    // An epoch's last batch may be short, no batch spans two epochs.
    assert!(reference.iter().all(|b| b.len() <= 5));
}

/// Evaluation: one window per frame, left-padded and masked at each video's start, in video order.
#[test]
fn dense_evaluation_predicts_every_frame() {
    let f = fixture(6, 33);
    let scfg = SamplerConfig { dense: true, frames_per_clip: 8, ..sampler_cfg(0) };
    let batches = load(
        &Source::Store(f.store.clone()),
        &f.manifest,
        Split::Validation,
        (0, 1),
        &scfg,
        &eval_cfg(16),
        Cursor::default(),
        1,
    );
    let val: Vec<_> = f.manifest.videos.iter().filter(|v| v.split == Split::Validation).collect();
    assert!(!val.is_empty());
    let clips: Vec<_> = batches.iter().flat_map(|b| b.clips.clone()).collect();
    assert_eq!(clips.len(), val.iter().map(|v| v.frames).sum::<usize>());
    let mut i = 0;
    for v in &val {
        for (frame, label) in v.labels().into_iter().enumerate() {
            assert_eq!((clips[i].video.as_str(), clips[i].start + 7), (v.name.as_str(), frame as i64));
            assert_eq!(clips[i].target, label);
            i += 1;
        }
    }
    let first = &batches[0];
    assert_eq!(&first.frame_mask[..8], &[0, 0, 0, 0, 0, 0, 0, 1], "the first frame's window is left-padded");
}

/// Strict: a corrupt shard is an error naming it, after the batches before it; tolerant: its clips are
/// skipped and counted, and a frame that does not decode names its shard, video and frame.
#[test]
fn bad_shards_and_frames_are_named_or_skipped_and_counted() {
    let f = fixture(4, 34);
    let scfg = SamplerConfig { shuffle_shards: 1, ..sampler_cfg(2) };
    let train: Vec<_> = f.manifest.videos.iter().filter(|v| v.split == Split::Train).collect();
    let victim = train[0].shards[1].clone();
    let mut bytes = std::fs::read(f.out.join(&victim.key)).unwrap();
    bytes[1000] ^= 0x33;
    std::fs::write(f.out.join(&victim.key), &bytes).unwrap();
    let sampler = || RankSampler::new(&f.manifest, Split::Train, 0, 1, &scfg, None).unwrap();
    let strict = eval_cfg(4);
    let results: Vec<_> = Loader::start(
        Source::Store(f.store.clone()),
        f.manifest.clone(),
        sampler(),
        &strict,
        Cursor::default(),
        Some(1),
    )
    .unwrap()
    .collect();
    let e = results.last().unwrap().as_ref().unwrap_err().to_string();
    assert!(e.contains(&victim.key) && e.contains("SHA-256"), "{e}");
    assert!(results[..results.len() - 1].iter().all(Result::is_ok));

    let tolerant = LoaderConfig { skip_bad: true, ..strict.clone() };
    let mut loader = Loader::start(
        Source::Store(f.store.clone()),
        f.manifest.clone(),
        sampler(),
        &tolerant,
        Cursor::default(),
        Some(1),
    )
    .unwrap();
    let clips: usize = loader.by_ref().map(|b| b.unwrap().len()).sum();
    let stats = loader.stats();
    assert_eq!(stats.shards_skipped_corrupt, 1);
    assert!(stats.clips_skipped > 0);
    assert_eq!(clips as u64 + stats.clips_skipped, sampler().len() as u64, "{stats:?}");

    // A shard whose bytes match the manifest but whose JPEG is garbage: the frame is named.
    std::fs::write(f.out.join(&victim.key), {
        bytes[1000] ^= 0x33;
        &bytes
    })
    .unwrap();
    let samples = read_shard(&victim.key, &bytes.clone().into()).unwrap();
    // A labelled frame (so a clip surely reads it) of the victim shard.
    let labels = train[0].labels();
    let bad_frame = (victim.first_frame..victim.first_frame + victim.frames).find(|&f| labels[f] >= 0).unwrap();
    let seg = f.manifest.segment_frames;
    let (bad_sample, bad_index) = ((bad_frame - victim.first_frame) / seg, bad_frame % seg);
    let mut builder = tar::Builder::new(Vec::new());
    for (k, s) in samples.iter().enumerate() {
        let mut add = |name: String, data: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            builder.append_data(&mut h, name, data).unwrap();
        };
        for (i, jpeg) in s.faces.iter().enumerate() {
            let garbage = b"not a jpeg".to_vec();
            add(format!("{}.{i:03}.jpg", s.key), if (k, i) == (bad_sample, bad_index) { &garbage } else { jpeg });
        }
        add(format!("{}.audio.f32", s.key), &s.pcm);
        add(format!("{}.labels.i8", s.key), &s.labels.iter().map(|&l| l as u8).collect::<Vec<_>>());
        add(format!("{}.mask.u8", s.key), &s.face_missing);
        add(format!("{}.json", s.key), &serde_json::to_vec(&s.meta).unwrap());
    }
    let rebuilt = builder.into_inner().unwrap();
    std::fs::write(f.out.join(&victim.key), &rebuilt).unwrap();
    let mut manifest = (*f.manifest).clone();
    let record = manifest.videos.iter_mut().flat_map(|v| v.shards.iter_mut()).find(|s| s.key == victim.key).unwrap();
    record.bytes = rebuilt.len() as u64;
    record.sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&rebuilt));
    let manifest = Arc::new(manifest);
    let sampler = RankSampler::new(&manifest, Split::Train, 0, 1, &scfg, None).unwrap();
    let e =
        Loader::start(Source::Store(f.store.clone()), manifest.clone(), sampler, &strict, Cursor::default(), Some(1))
            .unwrap()
            .find_map(Result::err)
            .expect("the garbage frame fails the strict loader")
            .to_string();
    assert!(e.contains(&victim.key) && e.contains(&format!("frame {bad_frame} of video {}", train[0].name)), "{e}");
}

#[test]
fn a_budget_smaller_than_a_window_names_the_fields() {
    let f = fixture(6, 35);
    let train_bytes: u64 =
        f.manifest.videos.iter().filter(|v| v.split == Split::Train).flat_map(|v| &v.shards).map(|s| s.bytes).sum();
    assert!(train_bytes > 1 << 20, "{train_bytes} bytes of training shards");
    let sampler = RankSampler::new(
        &f.manifest,
        Split::Train,
        0,
        1,
        &SamplerConfig { shuffle_shards: 64, ..sampler_cfg(0) },
        None,
    )
    .unwrap();
    let cfg = LoaderConfig { prefetch_bytes: 1 << 20, ..eval_cfg(4) };
    let e =
        Loader::start(Source::Store(f.store.clone()), f.manifest.clone(), sampler, &cfg, Cursor::default(), Some(1))
            .err()
            .expect("a 1 MiB budget cannot hold 64 shards");
    assert!(matches!(e, LoaderError::Budget { .. }));
    let e = e.to_string();
    assert!(e.contains("data.prefetch_bytes") && e.contains("data.shuffle_shards"), "{e}");
    let e = LoaderConfig { batch_size: 0, ..Default::default() }.validate().unwrap_err().to_string();
    assert!(e.contains("data.batch_size"), "{e}");
    let bad_aug =
        LoaderConfig { augment: Some(AugmentConfig { flip: 2.0, ..Default::default() }), ..Default::default() };
    assert!(bad_aug.validate().unwrap_err().to_string().contains("data.augment.flip"));
}

/// The S3 server stops in the middle of an epoch and comes back 2 s later: the epoch completes with every
/// batch identical to an undisturbed run.
#[test]
fn a_storage_outage_mid_epoch_leaves_every_batch_identical() {
    let mut garage = garage::Garage::start();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("affwild2");
    synth(&root, &SynthConfig { videos: 5, min_seconds: 2.0, max_seconds: 3.0, seed: 36, ..Default::default() })
        .unwrap();
    let uri = format!("s3://{}/loader-outage", garage::BUCKET);
    let out = garage::ingest_with_cli(&garage, &root, &uri);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let store = garage.store(&uri);
    let manifest = Arc::new(read_manifest(&store).unwrap());
    let scfg = SamplerConfig { shuffle_shards: 2, ..sampler_cfg(8) };
    // A budget of one window at a time, so that the loader has to go back to the server during the epoch.
    let cfg = LoaderConfig { batch_size: 4, image_size: 32, prefetch_bytes: 1 << 20, ..Default::default() };
    let source = Source::Store(store);
    let undisturbed = load(&source, &manifest, Split::Train, (0, 1), &scfg, &cfg, Cursor::default(), 1);
    let sampler = RankSampler::new(&manifest, Split::Train, 0, 1, &scfg, None).unwrap();
    let mut loader = Loader::start(source, manifest.clone(), sampler, &cfg, Cursor::default(), Some(1)).unwrap();
    let mut during: Vec<Batch> = loader.by_ref().take(2).map(Result::unwrap).collect();
    garage.stop();
    let fetched_before = loader.stats().shards_fetched;
    let restarter = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(2));
        garage.restart();
        garage
    });
    during.extend(loader.by_ref().map(|b| b.expect("retried until the server came back")));
    let _garage = restarter.join().unwrap();
    assert!(loader.stats().shards_fetched > fetched_before + 1, "shards were fetched after the outage began");
    assert_eq!(during.len(), undisturbed.len());
    assert!(during == undisturbed, "every batch identical to the undisturbed run");
}
