//! What both binaries do around their commands: logging to stderr at the
//! level `MEZOD_LOG` names (default `info`), crash points when built with
//! them, and one plain `error: …` line with exit status 1 on failure.

use std::io::IsTerminal;
use std::process::ExitCode;

/// Set up logging and crash points, run `command`, and turn its error into
/// the user's one line.
pub fn main(command: impl FnOnce() -> anyhow::Result<ExitCode>) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MEZOD_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    crate::crash::setup();
    match command() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
