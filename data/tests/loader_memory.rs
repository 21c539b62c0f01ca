//! Memory does not grow with the dataset: streaming an epoch of a dataset many times larger than the prefetch
//! budget raises this process's peak resident memory by at most the budget plus a fixed overhead. Alone in its
//! own test binary so that no other test's allocations blur the figure; the dataset is made by the `data` CLI
//! in child processes for the same reason.

use std::process::Command;
use std::sync::Arc;

use avexpr_data::layout::Split;
use avexpr_data::loader::{Loader, LoaderConfig, Source};
use avexpr_data::manifest::read_manifest;
use avexpr_data::sampler::{Cursor, RankSampler, SamplerConfig};
use avexpr_data::store::Store;

/// `VmRSS` or `VmHWM` of this process, in bytes.
fn status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// Threads, runtime, allocator arenas, the batches and decoded clips in flight: what does not depend on the
/// dataset.
const OVERHEAD: u64 = 16 << 20;

#[test]
fn streaming_a_dataset_many_times_the_budget_stays_within_budget_plus_overhead() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, out) = (tmp.path().join("affwild2"), tmp.path().join("shards"));
    let data = env!("CARGO_BIN_EXE_data");
    let synth = Command::new(data)
        .args(["synth", "--videos", "10", "--min-seconds", "20", "--max-seconds", "30", "--seed", "41", "--out"])
        .arg(&root)
        .output()
        .unwrap();
    assert!(synth.status.success(), "{}", String::from_utf8_lossy(&synth.stderr));
    let ingest = Command::new(data)
        .args(["ingest", "--segment-frames", "32", "--shard-frames", "64", "--root"])
        .arg(&root)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(ingest.status.success(), "{}", String::from_utf8_lossy(&ingest.stderr));

    let store = Store::open(&out.display().to_string()).unwrap();
    let manifest = Arc::new(read_manifest(&store).unwrap());
    let dataset: u64 =
        manifest.videos.iter().filter(|v| v.split == Split::Train).flat_map(|v| &v.shards).map(|s| s.bytes).sum();
    let cfg = LoaderConfig {
        batch_size: 8,
        image_size: 32,
        prefetch_bytes: 4 << 20,
        decode_threads: 2,
        ..LoaderConfig::default()
    };
    let bound = cfg.prefetch_bytes + OVERHEAD;
    assert!(dataset > 3 * bound / 2, "the dataset ({dataset} bytes) must dwarf the bound ({bound} bytes)");
    let scfg = SamplerConfig { shuffle_shards: 4, seed: 1, ..Default::default() };
    let sampler = RankSampler::new(&manifest, Split::Train, 0, 1, &scfg, None).unwrap();
    let clips = sampler.len();

    // Reset the peak (Linux: writing 5 to clear_refs resets VmHWM to the current RSS).
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let before = status_bytes("VmRSS:");
    let mut loader =
        Loader::start(Source::Store(store), manifest.clone(), sampler, &cfg, Cursor::default(), Some(1)).unwrap();
    let served: usize = loader.by_ref().map(|b| b.unwrap().len()).sum();
    let stats = loader.stats();
    let peak = status_bytes("VmHWM:");
    let growth = peak.saturating_sub(before);
    eprintln!(
        "dataset {:.1} MiB, budget {:.1} MiB, peak resident shards {:.1} MiB, RSS growth {:.1} MiB, {} shards fetched",
        dataset as f64 / 1048576.0,
        cfg.prefetch_bytes as f64 / 1048576.0,
        stats.peak_resident_bytes as f64 / 1048576.0,
        growth as f64 / 1048576.0,
        stats.shards_fetched
    );
    assert_eq!(served, clips, "the whole epoch was served");
    assert!(stats.bytes_fetched >= dataset, "every shard was read: {} of {dataset} bytes", stats.bytes_fetched);
    assert!(stats.peak_resident_bytes <= cfg.prefetch_bytes, "{stats:?}");
    assert!(growth <= bound, "RSS grew by {growth} bytes, over the budget plus overhead ({bound})");
}
