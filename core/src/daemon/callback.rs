//! A job's `notify: {command: [...]}`: a program the daemon runs once when
//! the job ends, to tell its owner (mail, a chat hook, the next step of a
//! pipeline).
//!
//! It is the owner's program, so it runs as a worker does: as the owner (uid,
//! primary and login groups from the user database), with the fixed
//! environment and no inherited descriptor ([`handoff`](super::handoff)), in
//! its own process group and, where the machine has cgroup v2, its own
//! cgroup (`pids.max`, `memory.max`), dying with the daemon.  It gets the
//! job's id, name, state and run folder in `MEZOD_JOB_ID`, `MEZOD_JOB_NAME`,
//! `MEZOD_JOB_STATE` and `MEZOD_JOB_RESULT`, no stdin, and `/` as its
//! working folder.  It has [`WALL`] of wall time; then it and everything it
//! started are killed.  Its stdout and stderr go, at most
//! [`MAX_OUTPUT`] bytes of them, to the end of the job's log (written by the
//! daemon, within the log's own bound).
//!
//! The daemon's main loop only starts it: a thread of its own waits for it,
//! bounds it, reaps it and writes its output, so a command that hangs or
//! floods holds up nothing.  A daemon that stops kills the commands still
//! running ([`stop_all`]).

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::cgroup::JobCgroup;
use crate::identity::Identity;

/// Wall time a notify command may take before it is killed.
pub const WALL: Duration = Duration::from_secs(60);
/// Bytes of its output kept (in the job's log); the rest is read and dropped.
pub const MAX_OUTPUT: u64 = 64 << 10;
/// `memory.max` of its cgroup, where the memory controller is there.
pub const MEMORY_MAX: u64 = 1 << 30;

/// Commands under way: their process groups (each leader not yet reaped,
/// so its pid cannot have been reused) and cgroups, for [`stop_all`].
static RUNNING: Mutex<Vec<(u32, Option<Arc<JobCgroup>>)>> = Mutex::new(Vec::new());

/// Kill every notify command still running, with what it started (the
/// daemon is stopping; its death signal would reach the command alone).
pub(crate) fn stop_all() {
    let running = std::mem::take(&mut *RUNNING.lock().unwrap_or_else(|p| p.into_inner()));
    for (pid, cgroup) in running {
        kill(pid, cgroup.as_deref());
        if let Some(cg) = cgroup {
            let _ = cg.remove(Duration::from_secs(1));
        }
    }
}

/// SIGKILL a command's cgroup, else its process group.
fn kill(pid: u32, cgroup: Option<&JobCgroup>) {
    if cgroup.is_some_and(|cg| cg.kill().is_ok()) {
        return;
    }
    // SAFETY: the group of a child of ours not yet reaped.
    unsafe { libc::kill(-(pid as libc::pid_t), libc::SIGKILL) };
}

/// One notify command, ready to start.
pub struct Callback {
    /// The program and its arguments (the job file's `notify.command`).
    pub argv: Vec<String>,
    /// Who it runs as (`None`: as the daemon, which is then not root).
    pub run_as: Option<Identity>,
    /// `MEZOD_JOB_*`, on top of the fixed environment.
    pub env: Vec<(&'static str, String)>,
    /// Its own cgroup, where there is one (killed and removed at its end).
    pub cgroup: Option<JobCgroup>,
    /// How long it may run.
    pub wall: Duration,
    /// The job's log, opened for appending, and the bytes it may still grow by.
    pub log: File,
    pub room: u64,
}

/// Start `cb`; returns once it runs (or could not start).  Call from the
/// daemon's main thread: the death signal fires when the forking thread ends.
pub fn spawn(cb: Callback) -> Result<()> {
    let Callback {
        argv,
        run_as,
        env,
        cgroup,
        wall,
        mut log,
        room,
    } = cb;
    let (program, args) = argv.split_first().context("notify.command is empty")?;
    let (read_end, write_end) = pipe()?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::from(write_end.try_clone()?))
        .stderr(Stdio::from(write_end));
    if let Some(cg) = &cgroup {
        // First of the child's steps: still root, every descriptor open.
        cg.place(&mut cmd)?;
    }
    super::handoff::owner_environment(&mut cmd, run_as.as_ref());
    for (k, v) in &env {
        cmd.env(k, v);
    }
    cmd.process_group(0);
    super::handoff::become_owner_at_exec(&mut cmd, run_as, "the daemon exited");
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            // The command as the owner wrote it, said where the owner looks.
            let _ = writeln!(
                log,
                "--- notify: could not start {}: {e} ---",
                crate::printable::printable_line(program)
            );
            if let Some(cg) = &cgroup {
                let _ = cg.remove(Duration::from_secs(2));
            }
            return Err(e).with_context(|| format!("starting notify command {program:?}"));
        }
    };
    drop(cmd);
    let pid = child.id();
    // SAFETY: pidfd_open of our own child, not yet waited for.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    let pidfd = (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) });
    let name = program.clone();
    let cgroup = cgroup.map(Arc::new);
    RUNNING
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((pid, cgroup.clone()));
    std::thread::Builder::new()
        .name(format!("notify-{pid}"))
        .spawn(move || {
            let started = Instant::now();
            let mut out = Output { kept: Vec::new() };
            let killed = watch(&read_end, pidfd.as_ref(), started + wall, &mut out);
            // Past its time, or ended: either way what it started ends with
            // it.  Out of the list before it is reaped (its pid is then free).
            {
                let mut running = RUNNING.lock().unwrap_or_else(|p| p.into_inner());
                running.retain(|(p, _)| *p != pid);
                kill(pid, cgroup.as_deref());
            }
            let status = child.wait();
            if let Some(cg) = &cgroup {
                if let Err(e) = cg.remove(Duration::from_secs(2)) {
                    tracing::warn!("removing {}: {e:#}", cg.path().display());
                }
            }
            drain(&read_end, &mut out);
            let how = match (killed, status) {
                (true, _) => format!("killed after {} s", wall.as_secs()),
                (_, Ok(s)) => match s.code() {
                    Some(c) => format!("exited with status {c}"),
                    None => format!("ended by a signal ({s})"),
                },
                (_, Err(e)) => format!("ended ({e})"),
            };
            let mut text = out.kept;
            if !text.is_empty() && !text.ends_with(b"\n") {
                text.push(b'\n');
            }
            let head = format!(
                "--- notify: {} {how} in {:.1} s{} ---\n",
                crate::printable::printable_line(&name),
                started.elapsed().as_secs_f64(),
                if text.is_empty() { "" } else { "; its output:" }
            );
            let mut all = head.into_bytes();
            all.extend_from_slice(&text);
            let take = all.len().min(room as usize);
            let _ = log.write_all(&all[..take]);
            tracing::info!("notify command of pid {pid}: {how}");
        })?;
    Ok(())
}

/// What is kept of the output.
struct Output {
    kept: Vec<u8>,
}

impl Output {
    fn take(&mut self, bytes: &[u8]) {
        let room = (MAX_OUTPUT as usize).saturating_sub(self.kept.len());
        self.kept.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }
}

/// Read the output until the process exits or `deadline` passes; true if
/// it must be killed.  The end is the process's exit (its pidfd), not the
/// pipe's end, which a child it left behind may hold open.
fn watch(pipe: &OwnedFd, pidfd: Option<&OwnedFd>, deadline: Instant, out: &mut Output) -> bool {
    let mut buf = vec![0u8; 16 << 10];
    let mut open = true;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return true;
        }
        let mut fds = [
            libc::pollfd {
                fd: if open { pipe.as_raw_fd() } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: pidfd.map_or(-1, |p| p.as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // Without a pidfd (kernels before 5.3), the pipe's end stands in.
        if pidfd.is_none() && !open {
            return false;
        }
        // Wake at least every 100 ms, so a deadline is never overslept.
        let ms = left.as_millis().clamp(1, 100) as i32;
        // SAFETY: two pollfds (a -1 entry is ignored).
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
        if r < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        if fds[0].revents != 0 {
            // SAFETY: read into a buffer we own, of its length.
            let n = unsafe { libc::read(pipe.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                out.take(&buf[..n as usize]);
            } else {
                open = false;
            }
        }
        if fds[1].revents != 0 {
            return false;
        }
    }
}

/// What is left in the pipe once the process has ended, without waiting
/// for writers it may have left behind.
fn drain(pipe: &OwnedFd, out: &mut Output) {
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(pipe.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(pipe.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
    let mut buf = vec![0u8; 16 << 10];
    // At most a pipe's worth and a little: the writer may still be writing.
    for _ in 0..64 {
        // SAFETY: read into a buffer we own, of its length.
        let n = unsafe { libc::read(pipe.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            return;
        }
        out.take(&buf[..n as usize]);
    }
}

/// A pipe, both ends close-on-exec (the child's end is dup'd onto its
/// stdout and stderr, which are not).
fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("making a pipe");
    }
    // SAFETY: both were just returned to us.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log() -> (tempfile::NamedTempFile, File) {
        let f = tempfile::NamedTempFile::new().unwrap();
        let append = std::fs::OpenOptions::new()
            .append(true)
            .open(f.path())
            .unwrap();
        (f, append)
    }

    fn wait_for(path: &std::path::Path, text: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let got = std::fs::read_to_string(path).unwrap_or_default();
            if got.contains(text) || Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The command gets the job's variables and the fixed environment, its
    /// output lands at the end of the log with how it ended, and the
    /// daemon's own variables stay out.
    #[test]
    fn a_notify_command_gets_the_jobs_variables_and_its_output_is_logged() {
        std::env::set_var("SEC_TEST_TOKEN_CALLBACK", "leaked");
        let (f, file) = log();
        spawn(Callback {
            argv: vec![
                "sh".into(),
                "-c".into(),
                "env; pwd; echo to-stderr >&2".into(),
            ],
            run_as: None,
            env: vec![
                ("MEZOD_JOB_ID", "7".into()),
                ("MEZOD_JOB_STATE", "done".into()),
            ],
            cgroup: None,
            wall: WALL,
            log: file,
            room: 1 << 20,
        })
        .unwrap();
        let got = wait_for(f.path(), "--- notify", Duration::from_secs(10));
        assert!(got.contains("MEZOD_JOB_ID=7"), "{got}");
        assert!(got.contains("MEZOD_JOB_STATE=done"), "{got}");
        assert!(got.contains("PATH=/usr/local/bin:/usr/bin:/bin"), "{got}");
        assert!(got.contains("to-stderr") && got.contains("\n/\n"), "{got}");
        assert!(!got.contains("SEC_TEST_TOKEN_CALLBACK"), "{got}");
        let got = wait_for(f.path(), "exited with status 0", Duration::from_secs(10));
        assert!(got.contains("--- notify: sh exited with status 0"), "{got}");
    }

    /// A command that runs past its wall time is killed with what it
    /// started (the pipe a background child holds open does not keep it);
    /// a flood is cut to the bound; a program that does not exist is said.
    #[test]
    fn a_notify_command_is_bounded_in_time_and_output() {
        let (f, file) = log();
        let t = Instant::now();
        spawn(Callback {
            argv: vec![
                "sh".into(),
                "-c".into(),
                "head -c 1000000 /dev/zero | tr '\\0' x; sleep 30".into(),
            ],
            run_as: None,
            env: vec![],
            cgroup: None,
            wall: Duration::from_millis(1500),
            log: file,
            room: 1 << 20,
        })
        .unwrap();
        let got = wait_for(f.path(), "killed after", Duration::from_secs(20));
        assert!(
            got.contains("killed after 1 s"),
            "{}",
            &got[..got.len().min(300)]
        );
        assert!(t.elapsed() < Duration::from_secs(10));
        let xs = got.bytes().filter(|&b| b == b'x').count() as u64;
        assert!(xs == MAX_OUTPUT, "{xs} bytes of output kept");

        let (f, file) = log();
        assert!(spawn(Callback {
            argv: vec!["/no/such/program".into()],
            run_as: None,
            env: vec![],
            cgroup: None,
            wall: WALL,
            log: file,
            room: 1 << 20,
        })
        .is_err());
        let got = std::fs::read_to_string(f.path()).unwrap();
        assert!(got.contains("could not start /no/such/program"), "{got}");
    }
}
