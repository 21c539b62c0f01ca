//! Shard fetching: verified against the manifest, bad shards named (or skipped and counted), and a storage
//! outage in the middle of reading survived with identical results.

mod garage;

use std::path::Path;

use avexpr_data::fetch::{FetchError, FetchStats, fetch_or_skip, fetch_shard};
use avexpr_data::ingest::{IngestConfig, ingest};
use avexpr_data::manifest::{ShardRecord, read_manifest};
use avexpr_data::store::Store;
use avexpr_data::synth::{SynthConfig, synth};

fn dataset(root: &Path) {
    synth(root, &SynthConfig { videos: 4, min_seconds: 1.5, max_seconds: 2.0, seed: 21, ..Default::default() })
        .unwrap();
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

#[test]
fn bad_shards_are_named_or_skipped_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("affwild2");
    dataset(&root);
    let out = tmp.path().join("shards");
    let mut cfg = IngestConfig::new(root, out.display().to_string());
    cfg.shard_frames = 32;
    cfg.segment_frames = 16;
    ingest(&cfg).unwrap();
    let store = Store::open(&cfg.out).unwrap();
    let manifest = read_manifest(&store).unwrap();
    let shards: Vec<&ShardRecord> = manifest.videos.iter().flat_map(|v| &v.shards).collect();
    assert!(shards.len() >= 4);
    let rt = rt();
    for s in &shards {
        assert!(!rt.block_on(fetch_shard(&store, s)).unwrap().is_empty());
    }
    // Same size, one byte flipped: the SHA-256 catches it.
    let flipped = out.join(&shards[0].key);
    let mut bytes = std::fs::read(&flipped).unwrap();
    bytes[700] ^= 0x55;
    std::fs::write(&flipped, &bytes).unwrap();
    let e = rt.block_on(fetch_shard(&store, shards[0])).unwrap_err();
    assert!(matches!(e, FetchError::Corrupt { .. }));
    assert!(e.to_string().contains(&shards[0].key) && e.to_string().contains("SHA-256"), "{e}");
    // Truncated.
    let cut = out.join(&shards[1].key);
    let bytes = std::fs::read(&cut).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = rt.block_on(fetch_shard(&store, shards[1])).unwrap_err().to_string();
    assert!(e.contains(&shards[1].key) && e.contains("bytes, the manifest says"), "{e}");
    // Gone.
    std::fs::remove_file(out.join(&shards[2].key)).unwrap();
    let e = rt.block_on(fetch_shard(&store, shards[2])).unwrap_err();
    assert!(matches!(e, FetchError::Missing { .. }) && e.to_string().contains(&shards[2].key), "{e}");
    // Not a tar, with a manifest entry that matches its bytes: the parser names it.
    let junk = b"this is not a tar archive at all".repeat(40);
    std::fs::write(out.join(&shards[3].key), &junk).unwrap();
    let mut fake = shards[3].clone();
    fake.bytes = junk.len() as u64;
    fake.sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&junk));
    let e = rt.block_on(fetch_shard(&store, &fake)).unwrap_err().to_string();
    assert!(e.contains(&fake.key) && e.contains("corrupt"), "{e}");

    // Tolerant mode: skipped and counted; strict mode: the first error.
    let mut stats = FetchStats::default();
    let mut kept = 0;
    for s in &shards {
        kept += rt.block_on(fetch_or_skip(&store, s, true, &mut stats)).unwrap().is_some() as usize;
    }
    assert_eq!((stats.skipped_corrupt, stats.skipped_missing, stats.fetched as usize), (3, 1, kept));
    assert!(rt.block_on(fetch_or_skip(&store, shards[2], false, &mut stats)).is_err());
}

/// The S3 server goes away in the middle of reading the shards and comes back 2 s later: the reads retry and
/// every shard is identical to the undisturbed read.
#[test]
fn a_storage_outage_mid_read_is_retried_with_identical_results() {
    let mut garage = garage::Garage::start();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("affwild2");
    dataset(&root);
    let uri = format!("s3://{}/outage", garage::BUCKET);
    let out = garage::ingest_with_cli(&garage, &root, &uri);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let store = garage.store(&uri);
    let manifest = read_manifest(&store).unwrap();
    let shards: Vec<ShardRecord> = manifest.videos.iter().flat_map(|v| v.shards.clone()).collect();
    let rt = rt();
    let undisturbed: Vec<_> = shards.iter().map(|s| rt.block_on(fetch_shard(&store, s)).unwrap()).collect();

    let half = shards.len() / 2;
    let mut during = Vec::new();
    for s in &shards[..half] {
        during.push(rt.block_on(fetch_shard(&store, s)).unwrap());
    }
    garage.stop();
    let restarter = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(2));
        garage.restart();
        garage
    });
    let started = std::time::Instant::now();
    for s in &shards[half..] {
        during.push(rt.block_on(fetch_shard(&store, s)).expect("retried until the server came back"));
    }
    assert!(started.elapsed() >= std::time::Duration::from_secs(1), "the reads really waited for the server");
    let _garage = restarter.join().unwrap();
    assert!(during == undisturbed, "every shard identical to the undisturbed read");
}
