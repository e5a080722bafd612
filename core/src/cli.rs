//! What both binaries do around their commands: logging to stderr at the
//! level `MEZOD_LOG` names (default `info`), crash points when built with
//! them, one plain `error: …` line with exit status 1 on failure, and a
//! quiet end when a reader closes stdout early.

use std::io::IsTerminal;
use std::process::ExitCode;

/// Set up logging and crash points, run `command`, and turn its error into
/// the user's one line.
pub fn main(command: impl FnOnce() -> anyhow::Result<ExitCode>) -> ExitCode {
    main_logging_to(std::io::stderr, command)
}

/// [`main`] with log lines written through `writer` (stderr underneath: the
/// engine's lifts its progress bar off the terminal for each line).
pub fn main_logging_to<W>(writer: W, command: impl FnOnce() -> anyhow::Result<ExitCode>) -> ExitCode
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MEZOD_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(writer)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    crate::crash::setup();
    match command() {
        Ok(code) => code,
        Err(e) => {
            // Errors quote daemons, job files and paths: no escape sequence
            // of theirs reaches the terminal.
            eprintln!("error: {}", crate::printable::printable(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}

/// End the process quietly, as `cat` or `ls` do, when whoever reads stdout
/// has gone (`mezod status --json | head`).  Rust ignores SIGPIPE, so a
/// write to a closed pipe fails and `println!` panics; the default action
/// ends the process instead.  For commands that print, never for the daemon
/// (a client that hangs up must not end it) or its workers.
pub fn exit_on_closed_stdout() {
    // SAFETY: setting a signal's disposition to its default has no preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
