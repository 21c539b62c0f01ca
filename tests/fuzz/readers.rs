//! Every document the system reads from a disk or a bucket, fed generated inputs. The seeds are the documents a
//! real run writes (a dataset synthesized and ingested, a job trained two steps with checkpoints, its feature
//! cache extracted); proptest mutates them (bytes flipped, cut short, numbers replaced by extremes such as 0,
//! -1, 1e-5 or 2^64 - 1, which is where validation matters) and adds random bytes. No reader may panic, abort
//! or allocate more than a bound (a counting allocator refuses any single allocation over 1 GiB, which aborts
//! the test, and measures each call's peak); each returns a value or an error. Deterministic (a fixed seed), so
//! a failure reproduces; the cases run per reader are printed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use avexpr_data::manifest::{Manifest, VideoRecord};
use avexpr_tests::binary;
use avexpr_tests::jobs::{checkpoint, dataset, job, ok, run_dir};
use avexpr_worker::job::JobConfig;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

/// The largest single allocation any reader may make while fuzzed.
const MAX_ALLOCATION: usize = 1 << 30;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

/// The system allocator, counting this thread's live bytes and their peak, refusing huge single requests.
struct Counting;

/// All threads' live bytes and their peak (for calls that do their work on other threads, e.g. tokio's).
static LIVE_ALL: std::sync::atomic::AtomicIsize = std::sync::atomic::AtomicIsize::new(0);
static PEAK_ALL: std::sync::atomic::AtomicIsize = std::sync::atomic::AtomicIsize::new(0);
/// The tests of this binary one at a time, so that the all-threads peak is one test's.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn count(delta: isize) {
    use std::sync::atomic::Ordering::Relaxed;
    let now = LIVE_ALL.fetch_add(delta, Relaxed) + delta;
    PEAK_ALL.fetch_max(now, Relaxed);
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

// SAFETY: every call forwards to the system allocator with the caller's layout; the counting only reads and
// writes this thread's const-initialised cells (no allocation, no destructor).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MAX_ALLOCATION {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded as is.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MAX_ALLOCATION {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded as is.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is.
        unsafe { System.dealloc(ptr, layout) };
        count(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > MAX_ALLOCATION {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded as is.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            count(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f`; returns the most bytes it held at once (beyond what was live before).
fn peak_of(f: impl FnOnce()) -> usize {
    let start = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(start));
    f();
    (PEAK.with(Cell::get) - start).max(0) as usize
}

/// Runs `f`; returns the most bytes all threads held at once meanwhile (beyond what was live before).
fn global_peak_of(f: impl FnOnce()) -> usize {
    use std::sync::atomic::Ordering::Relaxed;
    let start = LIVE_ALL.load(Relaxed);
    PEAK_ALL.store(start, Relaxed);
    f();
    (PEAK_ALL.load(Relaxed) - start).max(0) as usize
}

/// Replacements for a number in a document: the values a broken or hostile writer would put there.
const EXTREMES: &[&str] = &[
    "0",
    "-1",
    "1e-5",
    "-0.0",
    "255",
    "128",
    "65535",
    "4294967295",
    "18446744073709551615",
    "9223372036854775807",
    "1e308",
    "99999999999",
];

#[derive(Debug, Clone)]
enum Edit {
    Flip(usize, u8),
    Cut(usize),
    Number(usize, &'static str),
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    let edit = prop_oneof![
        1 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Flip(i, b)),
        1 => any::<usize>().prop_map(Edit::Cut),
        3 => (any::<usize>(), prop::sample::select(EXTREMES)).prop_map(|(i, v)| Edit::Number(i, v)),
    ];
    prop::collection::vec(edit, 1..4)
}

/// The spans of the numbers in `doc` (digit runs, with a sign, a point or an exponent).
fn numbers(doc: &[u8]) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut i = 0;
    while i < doc.len() {
        if doc[i].is_ascii_digit() {
            let start = if i > 0 && doc[i - 1] == b'-' { i - 1 } else { i };
            let mut end = i;
            while end < doc.len() && (doc[end].is_ascii_digit() || b".eE+-".contains(&doc[end])) {
                end += 1;
            }
            spans.push((start, end));
            i = end;
        } else {
            i += 1;
        }
    }
    spans
}

fn apply(seed: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut doc = seed.to_vec();
    for e in edits {
        match *e {
            Edit::Flip(i, b) if !doc.is_empty() => {
                let n = doc.len();
                doc[i % n] ^= b.max(1);
            }
            Edit::Cut(i) => doc.truncate(i % (doc.len() + 1)),
            Edit::Number(i, v) => {
                let spans = numbers(&doc);
                if let Some(&(a, b)) = spans.get(i % spans.len().max(1)) {
                    doc.splice(a..b, v.bytes());
                }
            }
            _ => {}
        }
    }
    doc
}

/// Inputs for a reader: its seeds mutated, or random bytes.
fn inputs(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        9 => (prop::sample::select(seeds), edits()).prop_map(|(seed, e)| apply(&seed, &e)),
        1 => prop::collection::vec(any::<u8>(), 0..2048),
    ]
}

/// Reads a document; true when it was accepted as valid.
type Read<'a> = Box<dyn Fn(&[u8]) -> bool + 'a>;

struct Reader<'a> {
    name: &'static str,
    seeds: Vec<Vec<u8>>,
    cases: u32,
    read: Read<'a>,
}

fn read_all(dir: &Path, suffix: &str) -> Vec<Vec<u8>> {
    let mut files: Vec<PathBuf> = walk(dir).into_iter().filter(|p| p.to_string_lossy().ends_with(suffix)).collect();
    files.sort();
    files.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten() {
        let p = e.unwrap().path();
        if p.is_dir() { out.extend(walk(&p)) } else { out.push(p) }
    }
    out
}

/// What the loader does with a manifest before it fetches anything: plan every split's clips and units on two
/// ranks, and expand each video's labels.
fn plan_clips(manifest: &Manifest) -> usize {
    use avexpr_data::layout::Split;
    use avexpr_data::sampler::{RankSampler, SamplerConfig};
    let cfg = SamplerConfig { frames_per_clip: 8, stride: 4, shuffle_shards: 2, ..SamplerConfig::default() };
    let dense = SamplerConfig { dense: true, ..cfg.clone() };
    let mut clips = 0;
    for split in [Split::Train, Split::Validation, Split::Test] {
        for rank in 0..2 {
            for c in [&cfg, &dense] {
                if let Ok(sampler) = RankSampler::new(manifest, split, rank, 2, c, None) {
                    clips += sampler.epoch(0).len();
                }
            }
        }
    }
    clips + manifest.videos.iter().map(|v| v.labels().len()).sum::<usize>()
}

#[test]
fn every_reader_survives_generated_documents() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // Real documents to start from.
    let d = dataset();
    let cache = d.root.join("cache");
    let config = job(&d, "fuzz", 2, "");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "decode_threads: 1}",
        &format!("decode_threads: 1, augment: null, features: {{uri: {}}}}}", cache.display()),
    );
    std::fs::write(&config, &text).unwrap();
    ok(binary("worker").args(["extract", "--config"]).arg(&config).output().unwrap());
    ok(binary("worker").args(["train", "--config"]).arg(&config).output().unwrap());
    let manifest_bytes = std::fs::read(d.shards.join("manifest.json")).unwrap();
    let manifest = Manifest::parse(&manifest_bytes).unwrap();
    let job_cfg = JobConfig::from_text(&text, &config).unwrap();
    let plan = avexpr_worker::plan::JobPlan::balanced(&job_cfg, &manifest, 1).unwrap();
    let step = checkpoint(&config, 2);
    let annotations: Vec<Vec<u8>> = read_all(&d.root.join("affwild2"), ".txt")
        .into_iter()
        .filter(|b| avexpr_data::annotation::parse_annotation(&String::from_utf8_lossy(b), Path::new("a")).is_ok())
        .collect();
    assert!(!annotations.is_empty());
    let expected: BTreeMap<String, usize> = manifest.videos.iter().map(|v| (v.name.clone(), v.frames)).collect();
    let predictions = d.root.join("predictions.txt");
    let labels: avexpr_data::predictions::Predictions =
        manifest.videos.iter().map(|v| (v.name.clone(), vec![1u8; v.frames])).collect();
    avexpr_data::predictions::write_predictions(&predictions, &labels).unwrap();
    let one = |p: PathBuf| vec![std::fs::read(p).unwrap()];

    let readers = vec![
        // A manifest is read to be used: what a parsed one must survive is the sampler planning every split's
        // clips and units from it, and the per-frame labels expanded from its runs.
        Reader {
            name: "manifest.json",
            seeds: vec![manifest_bytes.clone()],
            cases: 20_000,
            read: Box::new(|b| Manifest::parse(b).map(|m| plan_clips(&m)).is_ok()),
        },
        Reader {
            name: "video record",
            seeds: read_all(&d.shards.join("videos"), ".json"),
            cases: 20_000,
            read: Box::new(|b| {
                VideoRecord::parse(b, manifest.segment_frames)
                    .map(|v| plan_clips(&Manifest { videos: vec![v], ..manifest.clone() }))
                    .is_ok()
            }),
        },
        Reader {
            name: "annotation file",
            seeds: annotations,
            cases: 10_000,
            read: Box::new(|b| {
                avexpr_data::annotation::parse_annotation(&String::from_utf8_lossy(b), Path::new("a.txt")).is_ok()
            }),
        },
        Reader {
            name: "predictions.txt",
            seeds: one(predictions),
            cases: 10_000,
            read: Box::new(|b| {
                let text = String::from_utf8_lossy(b);
                avexpr_data::predictions::parse_predictions(&text, Path::new("p.txt"), Some(&expected)).is_ok()
            }),
        },
        Reader {
            name: "tar shard",
            seeds: manifest
                .videos
                .iter()
                .take(2)
                .map(|v| std::fs::read(d.shards.join(&v.shards[0].key)).unwrap())
                .collect(),
            cases: 10_000,
            read: Box::new(|b| avexpr_data::shard::read_shard("s", &bytes::Bytes::copy_from_slice(b)).is_ok()),
        },
        Reader {
            name: "feature unit",
            seeds: read_all(&cache, ".safetensors").into_iter().take(2).collect(),
            cases: 10_000,
            read: Box::new(|b| avexpr_worker::features::check_unit("u", b).is_ok()),
        },
        Reader {
            name: "checkpoint COMMIT.json",
            seeds: one(step.join("COMMIT.json")),
            cases: 10_000,
            read: Box::new(|b| avexpr_worker::checkpoint::check_commit(b, "step-00000002").is_ok()),
        },
        Reader {
            name: "checkpoint state.json",
            seeds: one(step.join("state.json")),
            cases: 10_000,
            read: Box::new(|b| avexpr_worker::checkpoint::parse_state(b).is_ok()),
        },
        Reader {
            name: "plan.json",
            seeds: vec![serde_json::to_vec_pretty(&plan).unwrap()],
            cases: 10_000,
            read: Box::new(|b| {
                avexpr_worker::plan::JobPlan::parse(b).and_then(|p| p.check(&job_cfg, &manifest, 1)).is_ok()
            }),
        },
        Reader {
            name: "heartbeat",
            seeds: one(run_dir(&config).join("checkpoints/heartbeats/rank-0.json")),
            cases: 10_000,
            read: Box::new(|b| avexpr_worker::heartbeat::parse(b).is_some()),
        },
        Reader {
            name: "job YAML",
            seeds: vec![text.clone().into_bytes()],
            cases: 10_000,
            read: Box::new(|b| JobConfig::from_text(&String::from_utf8_lossy(b), &config).is_ok()),
        },
    ];

    let mut figures = Vec::new();
    for r in readers {
        assert!(!r.seeds.is_empty(), "{}: no seed", r.name);
        for seed in &r.seeds {
            assert!((r.read)(seed), "{}: a valid document is refused", r.name);
        }
        let bound: usize = 64 << 20;
        let started = Instant::now();
        let config = Config { cases: r.cases, failure_persistence: None, max_shrink_time: 20_000, ..Config::default() };
        let mut runner = TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha));
        let accepted = Cell::new(0u32);
        let largest_seed = r.seeds.iter().map(Vec::len).max().unwrap_or(0);
        let result = runner.run(&inputs(r.seeds.clone()), |input| {
            let mut read_ok = false;
            let peak = peak_of(|| read_ok = (r.read)(&input));
            accepted.set(accepted.get() + read_ok as u32);
            let limit = bound + 16 * largest_seed.max(input.len());
            prop_assert!(peak <= limit, "{} allocated {peak} bytes at once for a {}-byte input", r.name, input.len());
            Ok(())
        });
        if let Err(e) = result {
            panic!("{}: {e}", r.name);
        }
        let line = format!(
            "{:<24} {:>6} cases in {:>5.1} s ({} read as valid)",
            r.name,
            r.cases,
            started.elapsed().as_secs_f64(),
            accepted.get()
        );
        println!("{line}");
        figures.push(line);
    }
    assert_eq!(figures.len(), 11);
}

/// A shard is fetched only at the size the manifest gives it: a 256 MiB object listed as 1000 bytes is refused
/// from the response's headers, without its body in memory (before, the whole object was read, then its size
/// compared).
#[test]
fn a_shard_of_another_size_is_not_downloaded() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let big = std::fs::File::create(dir.path().join("big.tar")).unwrap();
    big.set_len(256 << 20).unwrap();
    let store = avexpr_data::store::Store::open(&dir.path().display().to_string()).unwrap();
    let shard = avexpr_data::manifest::ShardRecord {
        key: "big.tar".into(),
        bytes: 1000,
        sha256: "0".repeat(64),
        first_frame: 0,
        frames: 32,
        segments: 1,
    };
    let mut result = None;
    let peak =
        global_peak_of(|| result = Some(avexpr_data::store::block_on(avexpr_data::fetch::fetch_shard(&store, &shard))));
    let err = result.unwrap().unwrap_err().to_string();
    assert!(err.contains("big.tar") && err.contains("268435456 bytes, the manifest says 1000"), "{err}");
    assert!(peak < 16 << 20, "{peak} bytes held to refuse it");
}
