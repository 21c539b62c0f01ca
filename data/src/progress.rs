//! Progress of a long pass (ingest, extraction, prediction): a bar (indicatif) when stderr is a terminal, else a
//! log line every `AVEXPR_PROGRESS_S` seconds (default 30; 0: every update) with the rate and the time left, so
//! that logs of jobs under mpirun, Slurm or Kubernetes say how far a pass is.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress {
    label: String,
    unit: String,
    total: u64,
    bar: Option<ProgressBar>,
    started: Instant,
    every: Duration,
    /// Items done and when the last line was logged.
    state: Mutex<(u64, Instant)>,
}

impl Progress {
    /// `total` items of `unit` ("videos", "clips", "frames").
    pub fn new(label: &str, unit: &str, total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            let template = format!("{label} {{bar:40}} {{pos}}/{{len}} {unit} ({{elapsed}}, {{eta}} left)");
            bar.set_style(ProgressStyle::with_template(&template).expect("a valid template"));
            bar
        });
        let seconds = std::env::var("AVEXPR_PROGRESS_S").ok().and_then(|s| s.parse::<f64>().ok()).unwrap_or(30.0);
        let now = Instant::now();
        Self {
            label: label.into(),
            unit: unit.into(),
            total,
            bar,
            started: now,
            every: Duration::from_secs_f64(seconds.max(0.0)),
            state: Mutex::new((0, now)),
        }
    }

    /// Whether progress is drawn as a bar (stderr is a terminal): per-item log lines would break it.
    pub fn is_bar(&self) -> bool {
        self.bar.is_some()
    }

    /// `n` more items done (from any thread).
    pub fn inc(&self, n: u64) {
        let mut state = self.state.lock().expect("no panic holding the progress lock");
        state.0 += n;
        if let Some(bar) = &self.bar {
            bar.set_position(state.0);
        } else if state.1.elapsed() >= self.every && state.0 < self.total {
            state.1 = Instant::now();
            self.log(state.0);
        }
    }

    fn log(&self, done: u64) {
        let seconds = self.started.elapsed().as_secs_f64();
        let rate = done as f64 / seconds.max(1e-9);
        let left = if rate > 0.0 {
            format!("{:.0} s left", self.total.saturating_sub(done) as f64 / rate)
        } else {
            "?".into()
        };
        tracing::info!("{}: {done}/{} {} ({rate:.1} {}/s, {left})", self.label, self.total, self.unit, self.unit);
    }

    /// The pass is over: the bar is cleared, or a last line is logged.
    pub fn finish(&self) {
        let done = self.state.lock().expect("no panic holding the progress lock").0;
        match &self.bar {
            Some(bar) => bar.finish_and_clear(),
            None => self.log(done),
        }
    }
}
