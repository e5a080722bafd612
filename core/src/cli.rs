//! What both binaries do around their commands: logging to stderr as
//! `MEZOD_LOG` says (see [`log_filter`]), crash points when built with them,
//! one plain `error: …` line with exit status 1 on failure, and a quiet end
//! when a reader closes stdout early.
//!
//! Logging never stops the process nor holds it up by failing: a line that
//! cannot be written is dropped.  A failed write must not reach
//! `tracing-subscriber`, which reports one with `eprintln!`: that panics on
//! the same closed stderr, in whatever thread logged, and in one of sled's
//! I/O threads the panic falls between a write and the mark that makes it
//! stable, so every later flush (the run's, the seed log's on drop) waits
//! for that mark forever (`mezod run … 2>&1 | head` hung the engine so).
//! When the log's reader has gone, [`log_closed`] says so: a run takes it as
//! a SIGPIPE and stops as on SIGTERM, within a second (the engine's
//! `run::interrupt`); the daemon keeps serving.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use tracing_subscriber::filter::{EnvFilter, LevelFilter, ParseError};
use tracing_subscriber::fmt::MakeWriter;

/// The level when `MEZOD_LOG` is unset or empty.
pub const DEFAULT_LEVEL: LevelFilter = LevelFilter::INFO;

/// The most a bare level lets through from other crates (sled, tokenizers,
/// tokio, …): their debug lines are about their own internals, and at
/// `debug` sled alone wrote nine lines in ten.  Naming one (`sled=debug`)
/// still opens it.
pub const DEPENDENCY_LEVEL: LevelFilter = LevelFilter::WARN;

/// The target prefix of every event of ours: `mezod` (the engine library and
/// the `mezod` binary), `mezod_core` and `mezod_engine`.  Directives match
/// targets by prefix, so one directive covers the three.
const OWN_TARGETS: &str = "mezod";

/// Set up logging and crash points, run `command`, and turn its error into
/// the user's one line.
pub fn main(command: impl FnOnce() -> anyhow::Result<ExitCode>) -> ExitCode {
    main_logging_to(std::io::stderr, command)
}

/// [`main`] with log lines written through `writer` (stderr underneath: the
/// engine's lifts its progress bar off the terminal for each line).
pub fn main_logging_to<W>(writer: W, command: impl FnOnce() -> anyhow::Result<ExitCode>) -> ExitCode
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let setting = std::env::var_os("MEZOD_LOG").map(|s| s.to_string_lossy().into_owned());
    let (filter, refused) = match log_filter(setting.as_deref()) {
        Ok(filter) => (filter, None),
        Err(e) => (
            log_filter(None).expect("the default filter parses"),
            Some(e),
        ),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(Lossy(writer))
        // A line that cannot be written is not worth a line on the same
        // stderr saying so (with `eprintln!`, which panics when it fails).
        .log_internal_errors(false)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    if let Some(e) = refused {
        tracing::warn!(
            "MEZOD_LOG={:?} is not a log filter ({e}); logging at {DEFAULT_LEVEL}",
            setting.unwrap_or_default()
        );
    }
    crate::crash::setup();
    match command() {
        Ok(code) => code,
        Err(e) => {
            // Errors quote daemons, job files and paths: no escape sequence
            // of theirs reaches the terminal.  A closed stderr loses the
            // line rather than panicking over it.
            let _ = writeln!(
                std::io::stderr(),
                "error: {}",
                crate::printable::printable(&format!("{e:#}"))
            );
            ExitCode::FAILURE
        }
    }
}

/// The filter for a `MEZOD_LOG` setting (`None`: unset).  The syntax is
/// `tracing-subscriber`'s `EnvFilter` (comma-separated `level` and
/// `target=level` directives), with one difference: a bare level is the
/// level of mezod's own events, and other crates get at most
/// [`DEPENDENCY_LEVEL`] from it.  `debug` is our debug lines with the
/// dependencies' warnings; `debug,sled=debug` adds sled's internals;
/// `info,mezod_core::daemon=debug` is the daemon's debug lines and info
/// elsewhere.  Without a bare level, ours are at [`DEFAULT_LEVEL`]
/// (`sled=debug` alone keeps our info lines).
pub(crate) fn log_filter(setting: Option<&str>) -> Result<EnvFilter, ParseError> {
    let setting = setting.unwrap_or_default();
    let mut directives = bare_level(DEFAULT_LEVEL);
    for d in setting.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        match d.parse::<LevelFilter>() {
            Ok(level) => directives.extend(bare_level(level)),
            Err(_) => directives.push(d.to_string()),
        }
    }
    // A later directive for the same target replaces an earlier one: the
    // default first, then the setting's in its order.
    EnvFilter::builder().parse(directives.join(","))
}

/// The directives a bare `level` stands for: ours at `level`, everything
/// else at no more than [`DEPENDENCY_LEVEL`].
fn bare_level(level: LevelFilter) -> Vec<String> {
    vec![
        level.min(DEPENDENCY_LEVEL).to_string(),
        format!("{OWN_TARGETS}={level}"),
    ]
}

/// Set once a log line found that stderr's reader has gone.
static LOG_CLOSED: AtomicBool = AtomicBool::new(false);

/// Whether the log's reader has gone (a write to stderr failed with EPIPE):
/// nobody reads what this process says any more.  A run stops on it as if
/// SIGPIPE had come (Rust ignores SIGPIPE, and a training run must not be
/// killed mid-step by it); a daemon goes on.
pub fn log_closed() -> bool {
    LOG_CLOSED.load(Ordering::SeqCst)
}

/// The log's writers: what cannot be written is dropped, so the subscriber
/// never sees an error (see the module's doc for what one caused).
struct Lossy<M>(M);

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for Lossy<M> {
    type Writer = LossyWriter<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        LossyWriter(self.0.make_writer())
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        LossyWriter(self.0.make_writer_for(meta))
    }
}

/// One log line's writer (see [`Lossy`]).
struct LossyWriter<W>(W);

impl<W: Write> Write for LossyWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.0.write(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Err(e),
            Err(e) => {
                lost(&e);
                Ok(buf.len())
            }
            // Nothing written of something: the rest is dropped too, rather
            // than `write_all`'s error.
            Ok(0) => Ok(buf.len()),
            Ok(n) => Ok(n),
        }
    }

    /// The line in one piece where the writer keeps it so (the engine's
    /// lifts its progress bar once per line).
    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        if let Err(e) = self.0.write_all(buf) {
            lost(&e);
        }
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if let Err(e) = self.0.flush() {
            lost(&e);
        }
        Ok(())
    }
}

/// A log write failed with `e`.  Its reader gone (EPIPE), stderr is pointed
/// at /dev/null, and stdout too when it is the same pipe (`2>&1 | head`):
/// later writes to either (an `eprintln!`, a `println!`, libtorch's own
/// warnings) succeed into nothing instead of failing, and panicking, one by
/// one.  Other errors (a full disk, a hung-up terminal) lose the line alone.
/// [`log_closed`] turns true only once stderr is silenced, so a run that
/// stops on it says why (`eprintln!`) without a write that could fail.
fn lost(e: &std::io::Error) {
    if e.raw_os_error() == Some(libc::EPIPE) {
        static SILENCE: std::sync::Once = std::sync::Once::new();
        SILENCE.call_once(silence_stderr);
        LOG_CLOSED.store(true, Ordering::SeqCst);
    }
}

/// Point stderr, and stdout when it is the same file, at /dev/null.
fn silence_stderr() {
    // SAFETY: fstat into a zeroed struct we own; open, dup2 and close on
    // descriptors we name; dup2 replaces 1 or 2 atomically for every thread.
    unsafe {
        let mut out: libc::stat = std::mem::zeroed();
        let mut err: libc::stat = std::mem::zeroed();
        let same = libc::fstat(1, &mut out) == 0
            && libc::fstat(2, &mut err) == 0
            && (out.st_dev, out.st_ino) == (err.st_dev, err.st_ino);
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if null < 0 {
            return;
        }
        libc::dup2(null, 2);
        if same {
            libc::dup2(null, 1);
        }
        libc::close(null);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The levels at which events of `target` pass the filter for `setting`.
    fn enabled(setting: Option<&str>, target: &str) -> Vec<&'static str> {
        use tracing_subscriber::layer::SubscriberExt;
        let subscriber = tracing_subscriber::registry().with(log_filter(setting).unwrap());
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let probe = Probe(seen.clone());
        let subscriber = subscriber.with(probe);
        tracing::subscriber::with_default(subscriber, || {
            // Targets must be constants in the macros: one call per level
            // and target of these tests.
            macro_rules! each {
                ($($t:literal),*) => {$(
                    if target == $t {
                        tracing::trace!(target: $t, "trace");
                        tracing::debug!(target: $t, "debug");
                        tracing::info!(target: $t, "info");
                        tracing::warn!(target: $t, "warn");
                        tracing::error!(target: $t, "error");
                    }
                )*};
            }
            each!(
                "mezod::run",
                "mezod_core::daemon::server",
                "mezod_core::seedlog",
                "mezod_engine",
                "sled::pagecache::iobuf",
                "tokenizers::tokenizer"
            );
        });
        let v = seen.lock().unwrap().clone();
        v
    }

    struct Probe(std::sync::Arc<std::sync::Mutex<Vec<&'static str>>>);

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Probe {
        fn on_event(&self, e: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
            let level = match *e.metadata().level() {
                tracing::Level::TRACE => "trace",
                tracing::Level::DEBUG => "debug",
                tracing::Level::INFO => "info",
                tracing::Level::WARN => "warn",
                tracing::Level::ERROR => "error",
            };
            self.0.lock().unwrap().push(level);
        }
    }

    const DEBUG_UP: [&str; 4] = ["debug", "info", "warn", "error"];
    const INFO_UP: [&str; 3] = ["info", "warn", "error"];
    const WARN_UP: [&str; 2] = ["warn", "error"];

    /// One test: the subscribers of parallel tests would share callsites.
    #[test]
    fn a_bare_level_is_ours_dependencies_stay_at_warn_and_names_are_kept() {
        for ours in ["mezod::run", "mezod_core::seedlog", "mezod_engine"] {
            assert_eq!(enabled(Some("debug"), ours), DEBUG_UP, "{ours}");
            assert_eq!(enabled(None, ours), INFO_UP, "{ours}");
            assert_eq!(enabled(Some(""), ours), INFO_UP, "{ours}");
            assert_eq!(enabled(Some("error"), ours), ["error"], "{ours}");
        }
        for theirs in ["sled::pagecache::iobuf", "tokenizers::tokenizer"] {
            assert_eq!(enabled(Some("debug"), theirs), WARN_UP, "{theirs}");
            assert_eq!(enabled(Some("trace"), theirs), WARN_UP, "{theirs}");
            assert_eq!(enabled(None, theirs), WARN_UP, "{theirs}");
            assert_eq!(enabled(Some("error"), theirs), ["error"], "{theirs}");
            assert!(enabled(Some("off"), theirs).is_empty(), "{theirs}");
        }

        // A dependency by name.
        let sled = Some("debug,sled=debug");
        assert_eq!(enabled(sled, "sled::pagecache::iobuf"), DEBUG_UP);
        assert_eq!(enabled(sled, "tokenizers::tokenizer"), WARN_UP);
        // The README's per-module filter.
        let daemon = Some("info,mezod_core::daemon=debug");
        assert_eq!(enabled(daemon, "mezod_core::daemon::server"), DEBUG_UP);
        assert_eq!(enabled(daemon, "mezod_core::seedlog"), INFO_UP);
        assert_eq!(enabled(daemon, "sled::pagecache::iobuf"), WARN_UP);
        // A target alone keeps ours at the default; a later bare level
        // replaces an earlier one; `mezod=…` is every crate of ours.
        assert_eq!(enabled(Some("sled=debug"), "mezod::run"), INFO_UP);
        assert_eq!(enabled(Some("debug,warn"), "mezod::run"), WARN_UP);
        assert_eq!(enabled(Some("warn,mezod=debug"), "mezod_engine"), DEBUG_UP);
        assert_eq!(
            enabled(Some("warn,mezod=debug"), "sled::pagecache::iobuf"),
            WARN_UP
        );
    }

    #[test]
    fn a_setting_that_is_not_a_filter_is_refused() {
        assert!(log_filter(Some("sled=loud")).is_err());
    }

    /// A writer that fails every write (as a full disk would).
    struct Failing;

    impl Write for Failing {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::from_raw_os_error(libc::ENOSPC))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Err(std::io::Error::from_raw_os_error(libc::ENOSPC))
        }
    }

    #[test]
    fn a_line_that_cannot_be_written_is_dropped_without_an_error() {
        let mut w = LossyWriter(Failing);
        assert_eq!(w.write(b"line\n").unwrap(), 5);
        w.write_all(b"line\n").unwrap();
        w.flush().unwrap();
        // Not a reader gone: the run goes on, stderr stays where it is.
        assert!(!log_closed());
    }
}
