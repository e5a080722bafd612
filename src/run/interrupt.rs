//! Stopping a run on SIGINT or SIGTERM within about a second, wherever it is.
//!
//! The first signal asks for a stop: [`stop_requested`] turns true for the
//! whole process, and every long loop of the engine looks at it between its
//! pieces (steps, replayed steps, evaluation batches, generated tokens,
//! feature batches) and ends with the error [`Stopped`], which `run_with_log`
//! turns into `Outcome::Interrupted`.  Nothing finished is lost: the seed log
//! holds every step, weights at a step boundary are saved as a snapshot
//! first, and a partial evaluation is simply done again by the resume.
//!
//! A second signal, while the first is pending, ends the process at once
//! with 128 + signal, after saying on stderr how to resume.  A signal handler
//! may only do what is async-signal-safe, so the words are prepared before
//! the handler is installed, and the handler itself does no more than
//! atomic loads, write(2) to fd 2 and _exit(2).
//!
//! A log whose reader has gone (`mezod run … 2>&1 | head`; see
//! `mezod_core::cli::log_closed`) asks for the same stop as SIGPIPE would,
//! with status 141 (128 + SIGPIPE).  SIGPIPE itself does not kill a run (Rust
//! ignores it, and a run keeps it so): the stop leaves everything saved, and
//! the pipeline still ends within a second of `head`'s exit.

use std::io::Write;
use std::mem::ManuallyDrop;
use std::os::fd::FromRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU64, Ordering};

use anyhow::Result;
use signal_hook::consts::{SIGINT, SIGPIPE, SIGTERM};

/// The error of work given up because a stop was asked for; a run that
/// meets it ends as interrupted, not failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped {
    /// The signal that asked for the stop (SIGPIPE for a closed log).
    pub signal: i32,
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "stopped by signal {}", self.signal)
    }
}

impl std::error::Error for Stopped {}

/// The signal that asked for a stop; 0 while none has.
static SIGNAL: AtomicI32 = AtomicI32::new(0);

/// Whether a run has installed the handlers: only a run stops on a closed log.
static ARMED: AtomicBool = AtomicBool::new(false);

/// Steps in the seed log, for the second signal's words; [`UNKNOWN`] before
/// a run has counted them.
static STEPS_SAVED: AtomicU64 = AtomicU64::new(UNKNOWN);
const UNKNOWN: u64 = u64::MAX;

/// The second signal's words, prepared by [`install`] (never freed: the
/// handler may read them at any moment).
static WORDS: AtomicPtr<SecondSignal> = AtomicPtr::new(std::ptr::null_mut());

/// Ask for a stop from SIGINT and SIGTERM from now on; a second signal ends
/// the process at once, saying how to resume: the command that reruns the
/// job (from `job_file` into `out`), or, for a daemon's worker (no job
/// file), that the daemon resumes it.  `terminal`: stderr shows a progress
/// bar, so the words start on a line of their own.  `steps`: how many steps
/// the seed log holds now.
pub fn install(job_file: Option<&Path>, out: &Path, terminal: bool, steps: u64) -> Result<()> {
    let words = Box::new(SecondSignal::new(job_file, out, terminal));
    WORDS.store(Box::into_raw(words), Ordering::SeqCst);
    note_steps_saved(steps);
    register_handlers()?;
    ARMED.store(true, Ordering::SeqCst);
    Ok(())
}

/// The signal that asked the run to stop, if one did; SIGPIPE when the
/// log's reader has gone.  Cheap enough to ask between any two pieces of work.
pub fn stop_requested() -> Option<i32> {
    match SIGNAL.load(Ordering::Relaxed) {
        0 => (ARMED.load(Ordering::Relaxed) && mezod_core::cli::log_closed()).then_some(SIGPIPE),
        signal => Some(signal),
    }
}

/// `Err(Stopped)` once a stop is asked for: `interrupt::check()?` between
/// two pieces of long work.
pub fn check() -> Result<(), Stopped> {
    match stop_requested() {
        Some(signal) => Err(Stopped { signal }),
        None => Ok(()),
    }
}

/// The stop behind `error`, if a stop is what ended the work (whatever
/// context was added on the way out).
pub fn stopped(error: &anyhow::Error) -> Option<Stopped> {
    error
        .chain()
        .find_map(|e| e.downcast_ref::<Stopped>())
        .copied()
}

/// The seed log now holds `steps` steps (what a second signal reports).
pub fn note_steps_saved(steps: u64) {
    STEPS_SAVED.store(steps, Ordering::SeqCst);
}

/// How many steps the seed log holds, as last noted.
pub fn steps_saved() -> u64 {
    match STEPS_SAVED.load(Ordering::SeqCst) {
        UNKNOWN => 0,
        steps => steps,
    }
}

/// The command that resumes the run of `job` into `out`, as mezod prints it.
pub fn resume_command(job: &Path, out: &Path) -> String {
    format!("mezod run {} --out {}", job.display(), out.display())
}

/// Register [`on_signal`] for SIGINT and SIGTERM, once per process (one
/// job per process; a second registration would run twice per signal and
/// take the first signal for a second one).
fn register_handlers() -> Result<()> {
    static REGISTERED: AtomicBool = AtomicBool::new(false);
    if REGISTERED.swap(true, Ordering::SeqCst) {
        return Ok(());
    }
    for signal in [SIGINT, SIGTERM] {
        // SAFETY: `on_signal` is async-signal-safe (atomics, write, _exit).
        unsafe { signal_hook::low_level::register(signal, move || on_signal(signal)) }?;
    }
    Ok(())
}

/// The handler: the first signal asks for the stop; one that finds a stop
/// already asked for ends the process now.
fn on_signal(signal: i32) {
    if SIGNAL
        .compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        // SAFETY: WORDS is null or a leaked box that is never freed.
        if let Some(words) = unsafe { WORDS.load(Ordering::SeqCst).as_ref() } {
            // SAFETY: fd 2 stays open; ManuallyDrop keeps this File from closing it.
            let mut stderr = ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(2) });
            words.say(STEPS_SAVED.load(Ordering::SeqCst), &mut *stderr);
        }
        signal_hook::low_level::exit(128 + signal);
    }
}

/// What a second signal says, in pieces prepared beforehand: the handler
/// only picks the sentence for the step count and writes the number.
struct SecondSignal {
    /// A line break where a progress bar holds the current line.
    lead: &'static [u8],
    /// How to go on: the resume command, or that the daemon resumes it.
    tail: Box<[u8]>,
}

impl SecondSignal {
    fn new(job_file: Option<&Path>, out: &Path, terminal: bool) -> Self {
        let tail = match job_file {
            Some(job) => format!(" Resume with: {}\n", resume_command(job, out)),
            None => " The daemon resumes it.\n".into(),
        };
        SecondSignal {
            lead: if terminal { b"\n" } else { b"" },
            tail: tail.into_bytes().into_boxed_slice(),
        }
    }

    /// Write the words, piece by piece, with nothing allocated: into stderr
    /// as a `File` on fd 2, each piece is one write(2) (no lock, no buffer).
    fn say(&self, steps: u64, to: &mut impl Write) {
        let mut write = |piece: &[u8]| {
            let _ = to.write_all(piece);
        };
        write(self.lead);
        match steps {
            UNKNOWN => {
                write(b"stopped by a second signal; everything done so far is in the seed log.")
            }
            0 => write(b"stopped by a second signal before the first step."),
            steps => {
                write(b"stopped by a second signal; everything up to step ");
                write(decimal(steps, &mut [0u8; 20]));
                write(b" is in the seed log.");
            }
        }
        write(&self.tail);
    }
}

/// `n` in decimal, written into `buf` without allocating.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[at..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_written_in_decimal_without_allocating() {
        let mut buf = [0u8; 20];
        assert_eq!(decimal(0, &mut buf), b"0");
        assert_eq!(decimal(1200, &mut buf), b"1200");
        assert_eq!(decimal(u64::MAX - 1, &mut buf), b"18446744073709551614");
    }

    fn said(words: &SecondSignal, steps: u64) -> String {
        let mut text = Vec::new();
        words.say(steps, &mut text);
        String::from_utf8(text).unwrap()
    }

    #[test]
    fn the_second_signal_says_how_far_the_seed_log_goes() {
        let words = SecondSignal::new(Some(Path::new("job.yaml")), Path::new("runs/job"), false);
        assert_eq!(
            said(&words, 20),
            "stopped by a second signal; everything up to step 20 is in the seed log. \
             Resume with: mezod run job.yaml --out runs/job\n"
        );
        assert_eq!(
            said(&words, 0),
            "stopped by a second signal before the first step. \
             Resume with: mezod run job.yaml --out runs/job\n"
        );
        assert!(said(&words, UNKNOWN).contains("everything done so far is in the seed log."));
    }

    #[test]
    fn the_second_signal_names_the_resume_command_or_the_daemon() {
        let run = SecondSignal::new(Some(Path::new("jobs/a.yaml")), Path::new("runs/a"), false);
        assert_eq!(
            std::str::from_utf8(&run.tail).unwrap(),
            " Resume with: mezod run jobs/a.yaml --out runs/a\n"
        );
        assert!(run.lead.is_empty());
        let worker = SecondSignal::new(None, Path::new("/state/jobs/3/run"), true);
        assert_eq!(
            std::str::from_utf8(&worker.tail).unwrap(),
            " The daemon resumes it.\n"
        );
        assert_eq!(worker.lead, b"\n");
    }

    #[test]
    fn a_stop_is_found_behind_the_context_added_to_it() {
        let e = anyhow::Error::from(Stopped { signal: SIGINT })
            .context("evaluating on the dev split at step 4");
        assert_eq!(stopped(&e), Some(Stopped { signal: SIGINT }));
        assert_eq!(stopped(&anyhow::anyhow!("a real failure")), None);
    }
}
