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
