//! Builds the one `tracing` subscriber of the daemon: to journald when systemd connected our
//! stderr to the journal (`JOURNAL_STREAM`), to stderr otherwise. `DROP_LOG` overrides the
//! configured filter.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Where log lines went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTarget {
    Journald,
    Stderr,
}

/// Installs the global subscriber. `level` is a validated `tracing` filter.
pub fn init(level: &str) -> LogTarget {
    let filter = std::env::var("DROP_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(level));
    if std::env::var_os("JOURNAL_STREAM").is_some()
        && let Ok(journald) = tracing_journald::layer()
    {
        tracing_subscriber::registry()
            .with(filter)
            .with(journald.with_syslog_identifier("drop-supervisor".into()))
            .init();
        return LogTarget::Journald;
    }
    // Colours only for a person at a terminal: a log piped to a file or a collector stays
    // plain text that grep and parsers read.
    use std::io::IsTerminal as _;
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .with_target(false),
        )
        .init();
    LogTarget::Stderr
}
