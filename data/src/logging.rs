//! `tracing` set-up for avexpr binaries: `RUST_LOG` filter (default `info`), and every line prefixed with the
//! process's place in the job (`[rank 3/8]`, or a label such as `[orchestrator]`), whatever thread logs it.

use std::fmt;

use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::{DefaultFields, Format, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// This process's rank and world size as the MPI launcher announces them (Open MPI, or PMI for others);
/// `(0, 1)` when started alone.
pub fn launcher_rank() -> (usize, usize) {
    let var = |names: &[&str]| names.iter().find_map(|n| std::env::var(n).ok()?.parse::<usize>().ok());
    let rank = var(&["OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"]).unwrap_or(0);
    let size = var(&["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"]).unwrap_or(1);
    (rank, size)
}

struct Prefixed {
    prefix: String,
    inner: Format,
}

impl<S, N> FormatEvent<S, N> for Prefixed
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        write!(writer, "{} ", self.prefix)?;
        self.inner.format_event(ctx, writer, event)
    }
}

fn init_with_prefix(prefix: String) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let format = Prefixed { prefix, inner: Format::default().with_target(false) };
    // A second initialisation (tests calling into binaries' code) keeps the first subscriber.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .fmt_fields(DefaultFields::new())
        .event_format(format)
        .with_writer(std::io::stderr)
        .try_init();
}

/// For worker processes: `[rank R/N]` on every line.
pub fn init_worker() -> (usize, usize) {
    let (rank, size) = launcher_rank();
    init_with_prefix(format!("[rank {rank}/{size}]"));
    (rank, size)
}

/// For other binaries: `[label]` on every line.
pub fn init_labelled(label: &str) {
    init_with_prefix(format!("[{label}]"));
}
