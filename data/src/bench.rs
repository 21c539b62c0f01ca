//! `data bench-ingest`: ingest throughput in frames per CPU-second against the `ffmpeg` CLI decoding the same
//! media files to raw RGB frames (`-fps_mode passthrough`), in the same run, and the ingest's peak memory.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::ingest::{IngestConfig, ingest};
use crate::layout::Layout;

/// User + system CPU seconds of this process (all threads) or of its waited-for children.
fn cpu_seconds(who: libc::c_int) -> f64 {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage only writes the struct it is given.
    unsafe { libc::getrusage(who, &mut usage) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// User + system CPU seconds of another process (Linux /proc).
fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th fields overall.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz)
}

/// Peak resident set size of this process, in MiB.
pub fn peak_rss_mib() -> f64 {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    usage.ru_maxrss as f64 / 1024.0
}

pub fn ingest_vs_cli(cfg: &IngestConfig) -> anyhow::Result<String> {
    let layout = Layout::discover(&cfg.root)?;
    let mut media: Vec<&Path> = layout.videos.iter().filter_map(|v| v.media.as_deref()).collect();
    media.sort();
    media.dedup();

    let cpu0 = cpu_seconds(libc::RUSAGE_SELF);
    let wall0 = std::time::Instant::now();
    let report = ingest(cfg)?;
    let (ours_cpu, ours_wall) = (cpu_seconds(libc::RUSAGE_SELF) - cpu0, wall0.elapsed().as_secs_f64());
    anyhow::ensure!(report.manifest.failures.is_empty(), "ingest failed: {:?}", report.manifest.failures);
    // Frames of each media file once (a _left/_right pair shares one decode).
    let mut frames_by_media = std::collections::BTreeMap::new();
    for (entry, record) in
        layout.videos.iter().filter_map(|e| Some((e, report.manifest.videos.iter().find(|r| r.name == e.name)?)))
    {
        frames_by_media.insert(entry.media.clone(), record.frames);
    }
    let frames: usize = frames_by_media.values().sum();

    let cli0 = cpu_seconds(libc::RUSAGE_CHILDREN);
    let wall1 = std::time::Instant::now();
    for m in &media {
        let status = Command::new("ffmpeg")
            .args(["-hide_banner", "-loglevel", "error", "-nostdin", "-i"])
            .arg(m)
            .args(["-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt", "rgb24", "-y", "/dev/null"])
            .stdout(Stdio::null())
            .status()?;
        anyhow::ensure!(status.success(), "ffmpeg failed on {}", m.display());
    }
    let (cli_cpu, cli_wall) = (cpu_seconds(libc::RUSAGE_CHILDREN) - cli0, wall1.elapsed().as_secs_f64());
    let ours_rate = frames as f64 / ours_cpu;
    let cli_rate = frames as f64 / cli_cpu;
    Ok(format!(
        "ingest benchmark: {} media files, {frames} frames, face source {:?}, {} job(s), out {}\n\
         {:<40} {:>12} {:>12}\n{:<40} {:>12.1} {:>12.1}\n{:<40} {:>12.2} {:>12.2}\n{:<40} {:>12.2} {:>12.2}\n\
         ratio (ours / CLI frames per CPU-second): {:.3}\npeak RSS of this process: {:.1} MiB\n",
        media.len(),
        cfg.face,
        cfg.jobs,
        cfg.out,
        "",
        "avexpr",
        "ffmpeg CLI",
        "frames per CPU-second",
        ours_rate,
        cli_rate,
        "CPU seconds",
        ours_cpu,
        cli_cpu,
        "wall seconds",
        ours_wall,
        cli_wall,
        ours_rate / cli_rate,
        peak_rss_mib()
    ))
}

/// What `data bench-loader` streams.
#[derive(Debug, Clone)]
pub struct LoaderBench {
    pub videos: usize,
    pub seconds: f64,
    pub shard_frames: usize,
    pub loader: crate::loader::LoaderConfig,
    pub sampler: crate::sampler::SamplerConfig,
    pub rounds: usize,
    /// Consumer step times (ms) at which to measure the time spent waiting for batches.
    pub step_ms: Vec<f64>,
    /// An S3 prefix to use (AWS_* environment) instead of a Garage server started for the run.
    pub s3: Option<String>,
}

/// `VmRSS` / `VmHWM` of this process, in bytes.
fn proc_status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

struct EpochRun {
    clips: u64,
    wall: f64,
    /// Until the first batch arrived.
    first_batch: f64,
    /// Waiting for batches after the first.
    waited_after_first: f64,
    stats: crate::loader::LoaderStats,
    /// Peak RSS minus RSS at the start of the epoch (None where the peak cannot be reset).
    rss_growth: Option<u64>,
}

fn run_epoch(
    source: &crate::loader::Source,
    manifest: &std::sync::Arc<crate::manifest::Manifest>,
    b: &LoaderBench,
    loader: &crate::loader::LoaderConfig,
    step: Option<std::time::Duration>,
) -> anyhow::Result<EpochRun> {
    use crate::loader::Loader;
    use crate::sampler::{Cursor, RankSampler};
    let sampler = RankSampler::new(manifest, crate::layout::Split::Train, 0, 1, &b.sampler, None)?;
    // Linux: writing 5 to clear_refs resets the peak (VmHWM) to the current RSS.
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let before = proc_status_bytes("VmRSS:");
    let start = std::time::Instant::now();
    let mut stream = Loader::start(source.clone(), manifest.clone(), sampler, loader, Cursor::default(), Some(1))?;
    let (mut clips, mut first_batch, mut waited_after_first) = (0, None, 0.0);
    loop {
        let asked = std::time::Instant::now();
        let Some(batch) = stream.next() else { break };
        clips += batch?.len() as u64;
        match first_batch {
            None => first_batch = Some(start.elapsed().as_secs_f64()),
            Some(_) => waited_after_first += asked.elapsed().as_secs_f64(),
        }
        if let Some(step) = step {
            std::thread::sleep(step);
        }
    }
    let wall = start.elapsed().as_secs_f64();
    let rss_growth = match (reset, before, proc_status_bytes("VmHWM:")) {
        (true, Some(before), Some(peak)) => Some(peak.saturating_sub(before)),
        _ => None,
    };
    Ok(EpochRun {
        clips,
        wall,
        first_batch: first_batch.unwrap_or(wall),
        waited_after_first,
        stats: stream.stats(),
        rss_growth,
    })
}

/// Fetch, verify and parse every shard of `videos`, `concurrency` requests at a time, nothing else: seconds.
fn fetch_only(
    store: &crate::store::Store,
    videos: &[&crate::manifest::VideoRecord],
    concurrency: usize,
) -> anyhow::Result<f64> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let shards: Vec<crate::manifest::ShardRecord> = videos.iter().flat_map(|v| v.shards.clone()).collect();
    let start = std::time::Instant::now();
    rt.block_on(async {
        let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(concurrency));
        let mut tasks = Vec::new();
        for shard in shards {
            let (store, permit) = (store.clone(), limit.clone().acquire_owned().await?);
            tasks.push(tokio::spawn(async move {
                let _permit = permit;
                crate::fetch::fetch_shard(&store, &shard).await.map(|s| s.len())
            }));
        }
        for t in tasks {
            t.await??;
        }
        anyhow::Ok(())
    })?;
    Ok(start.elapsed().as_secs_f64())
}

fn median(mut x: Vec<f64>) -> f64 {
    x.sort_by(f64::total_cmp);
    x[x.len() / 2]
}

/// Clips/s of one training epoch from S3, from local files and from memory (the decode-only limit) with 1 and
/// 2 decode threads, interleaved over rounds (medians); the consumer's waiting share at given step times; peak
/// memory.
pub fn loader(b: &LoaderBench) -> anyhow::Result<String> {
    use crate::ingest::{IngestConfig, ingest};
    use crate::loader::Source;
    use crate::manifest::read_manifest;
    use crate::store::Store;
    use std::sync::Arc;

    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join("affwild2");
    let synth_cfg = crate::synth::SynthConfig {
        videos: b.videos,
        min_seconds: b.seconds * 0.8,
        max_seconds: b.seconds * 1.2,
        seed: 5,
        ..Default::default()
    };
    crate::synth::synth(&root, &synth_cfg)?;
    let local = tmp.path().join("shards").display().to_string();
    let mut cfg = IngestConfig::new(root.clone(), local.clone());
    cfg.shard_frames = b.shard_frames;
    ingest(&cfg)?;
    let local_store = Store::open(&local)?;
    let manifest = Arc::new(read_manifest(&local_store)?);

    // The same dataset on S3, written by `data ingest` as a user would run it.
    let garage = if b.s3.is_none() { Some(crate::garage::Garage::start()) } else { None };
    let uri = b.s3.clone().unwrap_or_else(|| format!("s3://{}/bench-loader", crate::garage::BUCKET));
    let mut ingest_cmd = Command::new(std::env::current_exe()?);
    ingest_cmd
        .args(["ingest", "--shard-frames", &b.shard_frames.to_string(), "--root"])
        .arg(&root)
        .args(["--out", &uri]);
    if let Some(g) = &garage {
        ingest_cmd.envs(g.env());
    }
    let out = ingest_cmd.stdout(Stdio::null()).output()?;
    anyhow::ensure!(out.status.success(), "ingest to {uri} failed: {}", String::from_utf8_lossy(&out.stderr));
    let s3_store = match &garage {
        Some(g) => g.store(&uri),
        None => Store::open(&uri)?,
    };
    anyhow::ensure!(*manifest == read_manifest(&s3_store)?, "the S3 manifest differs from the local one");

    let train: Vec<&crate::manifest::VideoRecord> =
        manifest.videos.iter().filter(|v| v.split == crate::layout::Split::Train).collect();
    let shard_bytes: u64 = train.iter().flat_map(|v| &v.shards).map(|s| s.bytes).sum();
    let memory = Source::preload(&local_store, &train)?;
    let sources = [
        ("memory (decode-only)", memory),
        ("local files", Source::Store(local_store.clone())),
        ("S3", Source::Store(s3_store.clone())),
    ];
    let threads = [1usize, 2];
    let mut rates = vec![vec![Vec::new(); sources.len()]; threads.len()];
    let mut growth = vec![vec![0u64; sources.len()]; threads.len()];
    let mut clips_per_epoch = 0;
    for _ in 0..b.rounds.max(1) {
        for (ti, &t) in threads.iter().enumerate() {
            let lcfg = crate::loader::LoaderConfig { decode_threads: t, ..b.loader.clone() };
            for (si, (_, source)) in sources.iter().enumerate() {
                let run = run_epoch(source, &manifest, b, &lcfg, None)?;
                clips_per_epoch = run.clips;
                rates[ti][si].push(run.clips as f64 / run.wall);
                growth[ti][si] = growth[ti][si].max(run.rss_growth.unwrap_or(0));
            }
        }
    }
    let mib = |x: u64| x as f64 / 1048576.0;
    let mut text = format!(
        "loader benchmark: {} training videos, {clips_per_epoch} clips/epoch ({} frames, stride {}), {:.1} MiB of \
         shards ({} frames each), {}-pixel faces, batch {}, augmentation {}, prefetch {:.0} MiB, S3 {}\n\
         {:<22} {:>7} {:>10} {:>16} {:>18}\n",
        train.len(),
        b.sampler.frames_per_clip,
        b.sampler.stride,
        mib(shard_bytes),
        b.shard_frames,
        if b.loader.image_size == 0 { manifest.face_size } else { b.loader.image_size },
        b.loader.batch_size,
        if b.loader.augment.is_some() { "on" } else { "off" },
        mib(b.loader.prefetch_bytes),
        if garage.is_some() { "= a local Garage 2 server" } else { uri.as_str() },
        "source",
        "threads",
        "clips/s",
        "vs decode-only",
        "peak RSS growth",
    );
    for (ti, &t) in threads.iter().enumerate() {
        let limit = median(rates[ti][0].clone());
        for (si, (name, _)) in sources.iter().enumerate() {
            let rate = median(rates[ti][si].clone());
            text += &format!(
                "{name:<22} {t:>7} {rate:>10.1} {:>15.1}% {:>14.1} MiB\n",
                100.0 * rate / limit,
                mib(growth[ti][si])
            );
        }
    }
    // What fetching costs in CPU, on each side: on a machine whose cores the S3 server shares, the server's
    // share comes out of the decode threads' time.
    for (name, store) in [("local files", &local_store), ("S3", &s3_store)] {
        let server_cpu = || garage.as_ref().and_then(|g| process_cpu_seconds(g.pid()));
        let (client0, server0) = (cpu_seconds(libc::RUSAGE_SELF), server_cpu());
        let rounds = 3;
        let secs = median(
            (0..rounds).map(|_| fetch_only(store, &train, b.loader.fetch_concurrency)).collect::<Result<_, _>>()?,
        );
        let per_mib = |cpu: f64| 1e3 * cpu / rounds as f64 / mib(shard_bytes);
        let client = per_mib(cpu_seconds(libc::RUSAGE_SELF) - client0);
        let server = match (server0, server_cpu()) {
            (Some(a), Some(b)) if name == "S3" => format!(", server {:.2} CPU-ms/MiB", per_mib(b - a)),
            _ => String::new(),
        };
        text += &format!(
            "fetch + verify + parse only, {name}: {:.0} MiB/s = {:.0} clips/s of this dataset; \
             client {client:.2} CPU-ms/MiB{server}\n",
            mib(shard_bytes) / secs,
            clips_per_epoch as f64 / secs,
        );
    }
    let lcfg = crate::loader::LoaderConfig { decode_threads: 2, ..b.loader.clone() };
    for &ms in &b.step_ms {
        let run = run_epoch(
            &Source::Store(s3_store.clone()),
            &manifest,
            b,
            &lcfg,
            Some(std::time::Duration::from_secs_f64(ms / 1e3)),
        )?;
        text += &format!(
            "consumer at {ms} ms/step (S3, 2 decode threads, {} batches in {:.2} s): first batch after {:.0} ms, then \
             waited {:.1}% of the time ({:.1}% including the first)\n",
            run.stats.batches,
            run.wall,
            1e3 * run.first_batch,
            100.0 * run.waited_after_first / (run.wall - run.first_batch),
            100.0 * run.stats.wait_seconds / run.wall,
        );
    }
    text += &format!("peak RSS of this process: {:.1} MiB\n", peak_rss_mib());
    Ok(text)
}
