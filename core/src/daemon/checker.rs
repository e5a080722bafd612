//! The intake check of a dropped job file, in a short-lived child process run
//! as the file's owner (`mezod check`, internal), under resource limits.
//!
//! Why a child: checking a job means parsing YAML the user wrote and opening
//! the files it names (config.json, safetensors headers, the data), and a root
//! daemon that did that itself would answer questions about root-only files
//! ("does it exist", "how big is it", "what does it say") and could be stalled
//! by a FIFO or blown up by a bomb.  The child sees exactly what the owner may
//! see; it holds at most [`MEMORY`] of heap, [`CPU`] of CPU time and writes no
//! file; the daemon kills it after [`WALL`] and reads at most [`ANSWER_MAX`]
//! bytes of its answer.  The daemon itself only reads the file's bytes
//! (bounded, no symlink) to hand them over on stdin.

use std::io::{Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::estimate::estimate;
use crate::identity::Identity;
use crate::spec::JobSpec;

/// Heap a check may hold (RLIMIT_DATA: where a YAML or JSON bomb grows.  Not
/// the address space, which would count libtorch's mapped CUDA libraries:
/// the `shapes` helper of a random-weight config loads them).
pub const MEMORY: u64 = 1 << 30;
/// CPU seconds a check may use.
pub const CPU: u64 = 30;
/// Wall time after which the daemon kills a check (a FIFO or a hung NFS
/// mount uses no CPU).
pub const WALL: Duration = Duration::from_secs(60);
/// Largest answer read from a check.
pub const ANSWER_MAX: u64 = 64 << 10;
/// Longest reason for a rejection kept from a check.
const WHY_MAX_CHARS: usize = 4096;

/// What a check says about a job file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Accepted(Accepted),
    Rejected { why: String },
}

/// What a check answers about a file it accepts: the one figure only the
/// owner's view of the files can give.  Everything else the daemon needs
/// (priority, steps, GPU, name) it reads from the file itself
/// ([`JobFacts`](super::job_facts::JobFacts)): the check runs as the owner,
/// who can rewrite its answer, so its answer decides nothing the daemon can
/// know otherwise, and the estimate it gives is bounded by admission and
/// enforced while the job runs.  (Other fields in an answer, as older
/// versions sent and a forger may add, are ignored: they decide nothing.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Accepted {
    pub estimate_bytes: u64,
}

/// Check a job file's text: the spec, the files it names, its memory, and
/// everything else a worker would fail on (`job_check`).
pub fn check_text(text: &str) -> Result<Accepted> {
    let spec = JobSpec::parse_with_base(text, None)?;
    if !spec.data.train.is_file() {
        bail!(
            "data.train {} is not a file you can read",
            spec.data.train.display()
        );
    }
    if let Some(dev) = &spec.data.dev {
        if !dev.is_file() {
            bail!("data.dev {} is not a file you can read", dev.display());
        }
    }
    // Said as `mezod run` says it, before the estimate reads the model's files.
    crate::job_check::model_files(&spec.model.source())?;
    let wants_gpu = spec.model.device.is_gpu();
    let footprint =
        estimate(&spec, wants_gpu).with_context(|| format!("model {}", spec.model.describe()))?;
    crate::job_check::check(&spec)?;
    Ok(Accepted {
        estimate_bytes: footprint.total(),
    })
}

/// `mezod check`: a job file's text on stdin, one JSON [`Verdict`] on stdout.
pub fn check_main() -> ExitCode {
    let mut bytes = Vec::new();
    let limit = super::spool::MAX_JOB_FILE_BYTES;
    let verdict = match std::io::stdin().take(limit + 1).read_to_end(&mut bytes) {
        Err(e) => Verdict::Rejected {
            why: format!("cannot read the job file: {e}"),
        },
        Ok(_) if bytes.len() as u64 > limit => Verdict::Rejected {
            why: format!("it is larger than {limit} bytes"),
        },
        Ok(_) => match String::from_utf8(bytes) {
            Err(_) => Verdict::Rejected {
                why: "it is not UTF-8 text".into(),
            },
            Ok(text) => match check_text(&text) {
                Ok(a) => Verdict::Accepted(a),
                Err(e) => Verdict::Rejected {
                    why: format!("{e:#}"),
                },
            },
        },
    };
    let line = serde_json::to_string(&verdict).expect("a verdict serializes");
    match writeln!(std::io::stdout(), "{line}") {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}

/// How a check is run.
#[derive(Debug, Clone)]
pub enum Checker {
    /// `exe check` in a child process (the daemon's `mezod` binary), killed
    /// after `wall` ([`WALL`] in service).
    Process {
        exe: std::path::PathBuf,
        wall: Duration,
    },
    /// In this process, at once, unprivileged and unbounded: for unit tests
    /// of the daemon, whose test binary has no `check` command.
    InProcess,
}

impl Checker {
    /// Check `text` as `run_as` (None: as the daemon's own user); `report`
    /// gets the verdict, or why the check itself failed (from another thread
    /// for a child process).
    pub fn start(
        &self,
        text: String,
        run_as: Option<Identity>,
        report: impl FnOnce(Verdict) + Send + 'static,
    ) -> Result<()> {
        match self {
            Checker::InProcess => {
                report(match check_text(&text) {
                    Ok(a) => Verdict::Accepted(a),
                    Err(e) => Verdict::Rejected {
                        why: format!("{e:#}"),
                    },
                });
                Ok(())
            }
            Checker::Process { exe, wall } => {
                let mut child = spawn_child(exe, &text, run_as)?;
                let wall = *wall;
                std::thread::Builder::new()
                    .name("check".into())
                    .spawn(move || report(collect(&mut child, wall)))?;
                Ok(())
            }
        }
    }
}

fn spawn_child(exe: &Path, text: &str, run_as: Option<Identity>) -> Result<std::process::Child> {
    let input = crate::safe_fs::memory_file("mezod-check-input", text.as_bytes())?;
    let mut cmd = Command::new(exe);
    super::handoff::owner_environment(&mut cmd, run_as.as_ref());
    cmd.arg("check")
        .stdin(Stdio::from(input))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .env("MEZOD_LOG", "error")
        // Its own process group: the kill after WALL reaches a `shapes`
        // helper it started, too.
        .process_group(0);
    // SAFETY: only async-signal-safe calls (setrlimit, setgroups/setgid/setuid), no allocation.
    unsafe {
        cmd.pre_exec(move || {
            let limit = |what, soft: u64, hard: u64| {
                let l = libc::rlimit {
                    rlim_cur: soft,
                    rlim_max: hard,
                };
                if libc::setrlimit(what, &l) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            };
            limit(libc::RLIMIT_DATA, MEMORY, MEMORY)?;
            limit(libc::RLIMIT_CPU, CPU, CPU + 5)?;
            limit(libc::RLIMIT_FSIZE, 0, 0)?;
            limit(libc::RLIMIT_CORE, 0, 0)?;
            super::handoff::close_inherited_descriptors()?;
            if let Some(who) = &run_as {
                who.assume()?;
            }
            Ok(())
        });
    }
    cmd.spawn().context("starting the intake check")
}

/// Read a check's answer within `wall`, then end its process group and reap it.
fn collect(child: &mut std::process::Child, wall: Duration) -> Verdict {
    let deadline = Instant::now() + wall;
    let mut out = child.stdout.take().expect("stdout is piped");
    let mut answer = Vec::new();
    let mut timed_out = false;
    let mut buf = [0u8; 8192];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&out),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready =
            unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if ready == 0 {
            timed_out = true;
            break;
        }
        if ready < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        match out.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                answer.extend_from_slice(&buf[..n]);
                if answer.len() as u64 > ANSWER_MAX {
                    break;
                }
            }
        }
    }
    // The child is not reaped yet, so its pid, which is its group's id,
    // cannot have been reused: the group kill reaches only its processes.
    // SAFETY: kill with a negative pid signals that process group.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
    let status = child.wait();
    if timed_out {
        return Verdict::Rejected {
            why: format!(
                "checking it took longer than {:.0} s (a FIFO or an unreachable file among its paths?)",
                wall.as_secs_f64()
            ),
        };
    }
    if answer.len() as u64 > ANSWER_MAX {
        return Verdict::Rejected {
            why: "the check's answer was too long".into(),
        };
    }
    match serde_json::from_slice::<Verdict>(answer.trim_ascii_end()) {
        // The reason goes to the owner alone, but into the daemon's files:
        // kept to a few lines.
        Ok(Verdict::Rejected { why }) => Verdict::Rejected {
            why: why.chars().take(WHY_MAX_CHARS).collect(),
        },
        Ok(v) => v,
        Err(_) => Verdict::Rejected {
            why: match status.ok().and_then(|s| s.signal()) {
                Some(libc::SIGKILL) | Some(libc::SIGXCPU) => format!(
                    "checking it exceeded the check's limits ({} s of CPU, {} MiB of memory): \
                     is the file (or a file it names) a bomb?",
                    CPU,
                    MEMORY >> 20
                ),
                Some(libc::SIGSEGV) | Some(libc::SIGABRT) => format!(
                    "checking it ran out of memory (limit {} MiB): is the file a bomb?",
                    MEMORY >> 20
                ),
                _ => "the check ended without an answer (out of memory or killed?)".into(),
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::mpsc;

    /// Run `script` as the check program on `text`; its verdict.
    fn verdict_of(script: &str, wall: Duration) -> Verdict {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("check.sh");
        std::fs::write(&exe, format!("#!/bin/sh\n{script}\n")).unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let (tx, rx) = mpsc::channel();
        Checker::Process { exe, wall }
            .start("job text".into(), None, move |v| tx.send(v).unwrap())
            .unwrap();
        rx.recv_timeout(Duration::from_secs(60)).unwrap()
    }

    fn why(v: Verdict) -> String {
        match v {
            Verdict::Rejected { why } => why,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_check_that_hangs_grows_or_babbles_is_cut_off() {
        // The job text arrives on stdin; an answer on stdout is the verdict.
        let ok = r#"read line; [ "$line" = "job text" ] && echo '{"rejected":{"why":"seen"}}'"#;
        assert_eq!(why(verdict_of(ok, WALL)), "seen");
        // Hangs (a FIFO, a dead NFS mount), with a helper of its own: both killed.
        let t = Instant::now();
        let hang = why(verdict_of(
            "sleep 1000 & sleep 1000",
            Duration::from_millis(300),
        ));
        assert!(hang.contains("took longer than"), "{hang}");
        assert!(t.elapsed() < Duration::from_secs(10));
        // Heap beyond the limit: the allocation fails, no answer comes.
        let grow = why(verdict_of(
            "exec python3 -c 'b = bytearray(2 << 30); print(len(b))'",
            WALL,
        ));
        assert!(
            grow.contains("without an answer") || grow.contains("limits"),
            "{grow}"
        );
        // An endless answer is read only up to its bound.
        let babble = why(verdict_of("yes", WALL));
        assert!(babble.contains("too long"), "{babble}");
        // Writing a file is refused (RLIMIT_FSIZE 0: SIGXFSZ ends the check).
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x");
        verdict_of(&format!("echo hi > {}", f.display()), WALL);
        assert_eq!(
            std::fs::metadata(&f).map_or(0, |m| m.len()),
            0,
            "a check wrote a file"
        );
    }
}
