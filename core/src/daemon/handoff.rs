//! What a process started for a job's owner (an intake check, a worker) gets
//! from the daemon: a fixed environment and no descriptor but its own.
//!
//! Why: a root daemon's environment and open files are root's.  A worker
//! inherited `HOME=/root`, root's `PATH`, any secret in the unit's
//! environment, and descriptors the daemon's parent left open — and the owner
//! can read all of it from `/proc/PID/environ` and take the descriptors with
//! `pidfd_getfd`.  So the environment is built from nothing, and every
//! descriptor above stderr is closed at `exec`.

use std::os::unix::ffi::OsStrExt;
use std::process::Command;

use crate::identity::Identity;

/// `PATH` of every owner process (the daemon's own is root's).
const PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Variables passed on from the daemon's environment: the linker's path to
/// libtorch and the CUDA libraries (an admin's setting), locale and time
/// zone, mezod's own settings and its test-only crash points.
fn passed_on(name: &[u8]) -> bool {
    name.starts_with(b"MEZOD_")
        || [
            &b"LD_LIBRARY_PATH"[..],
            b"LANG",
            b"LC_ALL",
            b"TZ",
            b"FAILPOINTS",
        ]
        .contains(&name)
}

/// Give `cmd` the fixed environment: `PATH`, the owner's `HOME`, `USER` and
/// `LOGNAME` where the user database names them, and the variables of
/// [`passed_on`]; nothing else of the daemon's.
pub(crate) fn owner_environment(cmd: &mut Command, owner: Option<&Identity>) {
    cmd.env_clear().env("PATH", PATH);
    for (k, v) in std::env::vars_os() {
        if passed_on(k.as_bytes()) {
            cmd.env(k, v);
        }
    }
    match owner {
        Some(who) => {
            cmd.env("HOME", &who.home);
            if let Some(name) = crate::identity::name_of(who.uid) {
                cmd.env("USER", &name).env("LOGNAME", &name);
            }
        }
        None => {
            if let Some(home) = std::env::var_os("HOME") {
                cmd.env("HOME", home);
            }
        }
    }
}

/// Mark every descriptor above stderr close-on-exec, so the new program
/// starts with stdin, stdout and stderr alone.  Marking (not closing) keeps
/// std's own exec-error pipe working until the exec.  For `pre_exec`:
/// one system call, async-signal-safe.
pub(crate) fn close_inherited_descriptors() -> std::io::Result<()> {
    /// `CLOSE_RANGE_CLOEXEC` (Linux 5.11).
    const CLOEXEC: libc::c_uint = 1 << 2;
    // SAFETY: close_range takes two descriptor numbers and flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3 as libc::c_uint,
            !0 as libc::c_uint,
            CLOEXEC,
        )
    };
    if r == 0 {
        return Ok(());
    }
    // Older kernels: set the flag one descriptor at a time.
    // SAFETY: sysconf and fcntl on numbers we do not own are harmless (EBADF).
    let max = unsafe { libc::sysconf(libc::_SC_OPEN_MAX) }.clamp(1024, 1 << 20) as i32;
    for fd in 3..max {
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok(())
}

/// The last steps of a child started for an owner, between fork and exec
/// (after any earlier `pre_exec`, such as entering its cgroup): every
/// inherited descriptor marked close-on-exec, the owner's identity (when
/// there is one), the daemon's death taking the child with it, and a check
/// that the daemon did not die before that was set.  `what` names the child
/// in the error of that last case.
pub(crate) fn become_owner_at_exec(
    cmd: &mut Command,
    run_as: Option<Identity>,
    what: &'static str,
) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: close_range, setgroups/setgid/setuid, prctl and getppid are
    // async-signal-safe and nothing here allocates.  The death signal is
    // set after the change of user, which would clear it, and before exec.
    unsafe {
        cmd.pre_exec(move || {
            close_inherited_descriptors()?;
            if let Some(who) = &run_as {
                who.assume()?;
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                return Err(std::io::Error::other(what));
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;

    #[test]
    fn an_owner_process_gets_a_fixed_environment_and_no_inherited_descriptor() {
        // A descriptor without close-on-exec, as a careless parent leaves one.
        let file = tempfile::tempfile().unwrap();
        let fd = file.as_raw_fd();
        unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
        std::env::set_var("SEC_TEST_TOKEN_HANDOFF", "leaked");
        std::env::set_var("MEZOD_TEST_HANDOFF", "kept");
        let who = Identity::of(0, 0);
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(format!(
            "env; ls /proc/self/fd; [ -e /proc/self/fd/{fd} ] && echo LEAKED-FD"
        ));
        owner_environment(&mut cmd, Some(&who));
        unsafe { cmd.pre_exec(close_inherited_descriptors) };
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!text.contains("SEC_TEST_TOKEN_HANDOFF"), "{text}");
        assert!(text.contains("MEZOD_TEST_HANDOFF=kept"), "{text}");
        assert!(text.contains(&format!("PATH={PATH}")), "{text}");
        assert!(
            text.contains(&format!("HOME={}", who.home.display())),
            "{text}"
        );
        assert!(!text.contains("LEAKED-FD"), "{text}");
    }
}
