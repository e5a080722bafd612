//! One cgroup (v2) per job: what a job declared is enforced by the kernel,
//! and a cancel stops every process the job started, `setsid` or not.
//!
//! A worker runs as its owner, and the owner's processes are hostile: a
//! child started with `setsid` leaves the worker's process group and would
//! survive a signal to the worker alone, a fork bomb would use up the unit's
//! `TasksMax`, and the worker's own account of its memory is user input.  A
//! cgroup the daemon owns holds all of them, whatever they do: its owner can
//! neither leave it nor write its files (they are root's).
//!
//! # Where the cgroups live
//!
//! [`Cgroups::detect`] finds the cgroup v2 hierarchy (a mount of type
//! `cgroup2` in `/proc/self/mountinfo`: `/sys/fs/cgroup` on a pure-v2 system,
//! `/sys/fs/cgroup/unified` on a hybrid one) and the daemon's own cgroup (the
//! `0::/path` line of `/proc/self/cgroup`), then makes the folder job cgroups
//! are created in (the *base*):
//!
//! * **The daemon is alone in its cgroup** (systemd with `Delegate=yes`: the
//!   unit's cgroup is the daemon's): the daemon moves itself into the leaf
//!   `<own>/daemon` (a cgroup with processes cannot enable controllers for
//!   its children: the "no internal processes" rule), enables `memory` and
//!   `pids` in `<own>/cgroup.subtree_control`, and creates `<own>/jobs/`
//!   with them enabled too.  Jobs are `<own>/jobs/<name>`.
//! * **Otherwise** (the root cgroup, or a cgroup shared with other processes:
//!   a login shell's scope, a test harness): the daemon moves nothing and
//!   creates `<own>/<instance>/` (see [`instance_name`]: one per state
//!   folder, so two daemons on one machine never touch each other's jobs).
//!   Controllers are only available there if `<own>` is the root cgroup.
//!
//! What is missing is said plainly and the rest still works:
//! [`Cgroups::notes`] lists each gap ("the memory controller is bound to
//! cgroup v1 …: memory.max is not enforced; …") and [`Cgroups::describe`]
//! sums them up in one line.  Without a writable cgroup v2 at all,
//! [`Cgroups::is_available`] is false, [`Cgroups::describe`] says why, and
//! the daemon falls back to process-group signals.
//!
//! # A job's cgroup
//!
//! [`Cgroups::create`] makes one ([`JobCgroup`]) with the job's limits
//! (`memory.max`, with `memory.swap.max` 0 and `memory.oom.group` 1 so that a
//! job over its memory stops as a whole instead of swapping; `pids.max`).  A
//! child enters it *before it execs*: [`JobCgroup::place`] adds a `pre_exec`
//! to a `Command` that writes `0` to the cgroup's `cgroup.procs` from a
//! descriptor opened beforehand ([`enter`], async-signal-safe).  That must be
//! the command's *first* `pre_exec`: before the change to the owner's uid
//! (the owner may not write the file) and before any `close_range`.
//! [`JobCgroup::dir_fd`] gives the folder for `clone3(CLONE_INTO_CGROUP)`, for
//! a spawner that forks by itself.
//!
//! [`JobCgroup::kill`] writes `1` to `cgroup.kill` (Linux 5.14+) or, without
//! it, freezes the cgroup and SIGKILLs each process in it through a pidfd
//! until none is left.  [`JobCgroup::memory_current`] is `memory.current`, or
//! without the memory controller the sum of the processes' `VmRSS` (what the
//! daemon compares to a CPU job's reservation on such machines).
//! [`JobCgroup::remove`] kills what is left, waits for `cgroup.events` to say
//! `populated 0` (bounded) and removes the folder.

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// What the kernel enforces on a job's cgroup; `None` leaves it unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JobLimits {
    /// Bytes of memory (`memory.max`), where the memory controller is there.
    pub memory_max: Option<u64>,
    /// Processes and threads (`pids.max`), where the pids controller is there.
    pub pids_max: Option<u64>,
}

/// Which limits a job's cgroup really has (the others the daemon must watch
/// itself, e.g. [`JobCgroup::memory_current`] against the reservation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Enforced {
    pub memory: bool,
    pub pids: bool,
}

/// The daemon's cgroup v2 subtree for its jobs, or why there is none.
#[derive(Debug, Clone)]
pub struct Cgroups {
    tree: Option<Tree>,
    /// Why there is no tree, or what the tree lacks: one sentence each.
    notes: Vec<String>,
}

#[derive(Debug, Clone)]
struct Tree {
    /// The cgroup2 mount point and the path in the hierarchy it shows.
    mount: PathBuf,
    mount_root: String,
    /// Where job cgroups are created.
    base: PathBuf,
    /// Controllers enabled for the base's children.
    memory: bool,
    pids: bool,
    /// `cgroup.kill` exists (Linux 5.14+).
    kill: bool,
}

/// The controllers the daemon uses.
const CONTROLLERS: [&str; 2] = ["memory", "pids"];

/// The leaf a delegated daemon moves itself into, and its jobs' folder.
const DAEMON_LEAF: &str = "daemon";
const JOBS: &str = "jobs";

/// A name for this daemon's subtree where its cgroup is not its own: one per
/// state folder (pass it canonical), stable across restarts so that leftover
/// jobs of a crashed daemon are found and stopped ([`Cgroups::clear_leftovers`]).
pub(crate) fn instance_name(state: &Path) -> String {
    // FNV-1a: stable across Rust versions, unlike DefaultHasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in state.as_os_str().as_encoded_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("mezod-{h:016x}")
}

impl Cgroups {
    /// Find cgroup v2, the daemon's cgroup, and make the subtree for its jobs
    /// (see the module's documentation).  Never fails: what is missing is in
    /// [`notes`](Self::notes), and without a writable cgroup v2
    /// [`is_available`](Self::is_available) is false.
    ///
    /// Call it before the daemon starts any child: a delegated daemon moves
    /// itself (all its threads) into a leaf, which it can only do while it is
    /// the only process in its cgroup.
    pub(crate) fn detect(instance: &str) -> Self {
        Self::detect_in(instance, true)
    }

    /// [`detect`](Self::detect), optionally never moving this process (a
    /// test must not move its harness; then a sole process is treated as one
    /// sharing its cgroup).
    fn detect_in(instance: &str, may_move_self: bool) -> Self {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let Some((mount, mount_root)) = cgroup2_mount(&mountinfo) else {
            return Self::none(
                "no cgroup v2 hierarchy is mounted (cgroup v1 only): jobs are stopped by \
                 process-group signals, and a process that leaves its group survives a cancel"
                    .into(),
            );
        };
        let v1 = v1_controllers(&mountinfo);
        let own_rel = match std::fs::read_to_string("/proc/self/cgroup")
            .ok()
            .as_deref()
            .and_then(own_cgroup)
        {
            Some(p) => p,
            None => {
                return Self::none(
                    "/proc/self/cgroup has no cgroup v2 line (0::/…): jobs are stopped by \
                     process-group signals"
                        .into(),
                )
            }
        };
        let own = join_cgroup(&mount, &mount_root, &own_rel);
        match plan_and_make(&mount, &mount_root, &own, instance, may_move_self, &v1) {
            Ok(c) => c,
            Err(e) => Self::none(format!(
                "no writable cgroup v2 for jobs ({e:#}): jobs are stopped by process-group \
                 signals, and a process that leaves its group survives a cancel"
            )),
        }
    }

    /// Use `base`, a folder in a cgroup v2 hierarchy, as the base for job
    /// cgroups: it is created if missing, and its parent's and its own
    /// `subtree_control` gain `memory` and `pids` where offered (the parent
    /// must have no processes for that, unless it is the root).  Nothing is
    /// moved.  (Tests; a configured subtree.)
    pub fn under(base: &Path) -> Result<Self> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let v1 = v1_controllers(&mountinfo);
        let (mount, mount_root) =
            cgroup2_mount(&mountinfo).context("no cgroup v2 hierarchy is mounted")?;
        if !base.starts_with(&mount) {
            bail!(
                "{} is not in the cgroup v2 hierarchy at {}",
                base.display(),
                mount.display()
            );
        }
        let mut notes = Vec::new();
        let parent = base.parent().context("the base has no parent")?;
        if !parent.join("cgroup.procs").exists() {
            bail!("{} is not a cgroup", parent.display());
        }
        mkdir(base)?;
        let tree = finish_tree(
            &mount,
            &mount_root,
            base,
            &[parent, base],
            &v1,
            &mut notes,
            parent,
        );
        Ok(Self {
            tree: Some(tree),
            notes,
        })
    }

    /// Remove the (empty) folder of job cgroups at the daemon's clean exit,
    /// so that daemons that come and go leave nothing behind; a folder that
    /// still holds a job's cgroup stays (the next start clears leftovers).
    pub fn release(&self) {
        if let Some(t) = &self.tree {
            let _ = std::fs::remove_dir(&t.base);
        }
    }

    /// No cgroups: the daemon stops jobs by process-group signals.
    pub fn none(why: String) -> Self {
        Self {
            tree: None,
            notes: vec![why],
        }
    }

    /// Whether job cgroups can be made (and [`create`](Self::create) works).
    pub fn is_available(&self) -> bool {
        self.tree.is_some()
    }

    /// What the daemon cannot do here, one sentence each (for the log).
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// Where job cgroups are created.
    pub fn base(&self) -> Option<&Path> {
        self.tree.as_ref().map(|t| t.base.as_path())
    }

    /// Which limits the kernel enforces on a job's cgroup.
    pub fn enforced(&self) -> Enforced {
        self.tree
            .as_ref()
            .map_or(Enforced::default(), |t| Enforced {
                memory: t.memory,
                pids: t.pids,
            })
    }

    /// One line for the log and status: where, what is enforced, what is not.
    pub fn describe(&self) -> String {
        let Some(t) = &self.tree else {
            return format!("no job cgroups: {}", self.notes.join("; "));
        };
        let on = |b: bool| if b { "enforced" } else { "not enforced" };
        format!(
            "job cgroups in {}: memory.max {}, pids.max {}, cancel by {}",
            t.base.display(),
            on(t.memory),
            on(t.pids),
            if t.kill {
                "cgroup.kill"
            } else {
                "SIGKILL to each process"
            }
        )
    }

    /// Make the cgroup `name` (e.g. `job-7`) with `limits`.  A leftover of
    /// that name (a crashed daemon's) is emptied and made anew.  Limits the
    /// controllers here cannot enforce are left out: see
    /// [`JobCgroup::enforced`].
    pub fn create(&self, name: &str, limits: &JobLimits) -> Result<JobCgroup> {
        let t = self
            .tree
            .as_ref()
            .ok_or_else(|| anyhow!("no job cgroups here: {}", self.notes.join("; ")))?;
        if name.is_empty()
            || name == "."
            || name == ".."
            || name.contains('/')
            || name.contains('\0')
            || name.starts_with("cgroup.")
            || name.starts_with("memory.")
            || name.starts_with("pids.")
        {
            bail!("{name:?} is not a cgroup name the daemon makes");
        }
        let cg = JobCgroup {
            path: t.base.join(name),
            rel: cgroup_rel(&t.mount, &t.mount_root, &t.base.join(name)),
            enforced: Enforced::default(),
            kill_file: t.kill,
        };
        match std::fs::create_dir(&cg.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                tracing::warn!(
                    "cgroup {} was left behind: stopping what is in it",
                    cg.path.display()
                );
                cg.remove(Duration::from_secs(5))?;
                std::fs::create_dir(&cg.path)
                    .with_context(|| format!("creating {}", cg.path.display()))?;
            }
            Err(e) => return Err(e).with_context(|| format!("creating {}", cg.path.display())),
        }
        let mut cg = cg;
        if let Err(e) = cg.set_limits(t, limits) {
            let _ = std::fs::remove_dir(&cg.path);
            return Err(e);
        }
        Ok(cg)
    }

    /// Stop and remove every cgroup in the base: jobs of a daemon that
    /// crashed (their `setsid` children outlived it).  Returns their names.
    pub(crate) fn clear_leftovers(&self) -> Result<Vec<String>> {
        let Some(t) = &self.tree else {
            return Ok(vec![]);
        };
        let mut cleared = Vec::new();
        for e in std::fs::read_dir(&t.base)? {
            let e = e?;
            if !e.file_type()?.is_dir() {
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            let cg = JobCgroup {
                path: e.path(),
                rel: cgroup_rel(&t.mount, &t.mount_root, &e.path()),
                enforced: Enforced::default(),
                kill_file: t.kill,
            };
            cg.remove(Duration::from_secs(5))?;
            cleared.push(name);
        }
        Ok(cleared)
    }
}

/// Everything [`Cgroups::detect`] does once it knows where it is.
fn plan_and_make(
    mount: &Path,
    mount_root: &str,
    own: &Path,
    instance: &str,
    may_move_self: bool,
    v1: &[(String, PathBuf)],
) -> Result<Cgroups> {
    if !own.join("cgroup.procs").exists() {
        bail!("{} is not a cgroup", own.display());
    }
    let mut own = own.to_path_buf();
    // Already set up by an earlier detect in this process: <own>/daemon.
    if own.file_name().is_some_and(|n| n == DAEMON_LEAF)
        && own.parent().is_some_and(|p| p.join(JOBS).is_dir())
    {
        own = own.parent().unwrap().to_path_buf();
        let base = own.join(JOBS);
        let mut notes = Vec::new();
        let tree = finish_tree(
            mount,
            mount_root,
            &base,
            &[&own, &base],
            v1,
            &mut notes,
            &own,
        );
        return Ok(Cgroups {
            tree: Some(tree),
            notes,
        });
    }
    let is_root = !own.join("cgroup.type").exists();
    let me = std::process::id();
    let procs = read_pids(&own.join("cgroup.procs"))?;
    let sole = !is_root && procs == [me];
    let mut notes = Vec::new();
    if sole && may_move_self {
        // Delegated (systemd Delegate=yes): the cgroup is ours.  Move into a
        // leaf so that the cgroup may give its children controllers.
        if !marked_delegated(&own) {
            notes.push(format!(
                "{} is not marked as delegated (systemd sets trusted.delegate for a unit \
                 with Delegate=yes): the daemon took it as its own because it is the only \
                 process in it, and systemd may undo what it changes there",
                own.display()
            ));
        }
        let leaf = own.join(DAEMON_LEAF);
        mkdir(&leaf)?;
        write_file(&leaf.join("cgroup.procs"), "0")
            .with_context(|| format!("moving the daemon into {}", leaf.display()))?;
        let base = own.join(JOBS);
        mkdir(&base)?;
        let tree = finish_tree(
            mount,
            mount_root,
            &base,
            &[&own, &base],
            v1,
            &mut notes,
            &own,
        );
        return Ok(Cgroups {
            tree: Some(tree),
            notes,
        });
    }
    let base = own.join(instance);
    mkdir(&base)?;
    // Only the root cgroup may have both processes and controllers for its
    // children; a shared non-root cgroup gives the base none.
    let chain: Vec<&Path> = if is_root {
        vec![&own, &base]
    } else {
        vec![&base]
    };
    if !is_root {
        notes.push(format!(
            "the daemon shares its cgroup {} with other processes (not a systemd unit with \
             Delegate=yes): its jobs' cgroups get only what that cgroup already gives its children",
            own.display()
        ));
    }
    let tree = finish_tree(mount, mount_root, &base, &chain, v1, &mut notes, &own);
    Ok(Cgroups {
        tree: Some(tree),
        notes,
    })
}

/// Enable the controllers down `chain` (each folder's `subtree_control`, as
/// far as its `cgroup.controllers` offers them; the last is the base) and say
/// what is missing.  `top` names where the controllers come from, for notes.
fn finish_tree(
    mount: &Path,
    mount_root: &str,
    base: &Path,
    chain: &[&Path],
    v1: &[(String, PathBuf)],
    notes: &mut Vec<String>,
    top: &Path,
) -> Tree {
    let mut errors: Vec<(String, String)> = Vec::new();
    for dir in chain {
        let offered = read_words(&dir.join("cgroup.controllers"));
        let enabled = read_words(&dir.join("cgroup.subtree_control"));
        for c in CONTROLLERS {
            if offered.iter().any(|o| o == c) && !enabled.iter().any(|e| e == c) {
                if let Err(e) = write_file(&dir.join("cgroup.subtree_control"), &format!("+{c}")) {
                    errors.push((
                        c.to_string(),
                        format!("enabling it in {}: {e:#}", dir.display()),
                    ));
                }
            }
        }
    }
    let enabled = read_words(&base.join("cgroup.subtree_control"));
    let has = |c: &str| enabled.iter().any(|e| e == c);
    let (memory, pids) = (has("memory"), has("pids"));
    for (c, consequence) in [
        (
            "memory",
            "memory.max is not enforced; a job's memory is measured as the sum of its \
             processes' VmRSS",
        ),
        ("pids", "pids.max is not enforced"),
    ] {
        if has(c) {
            continue;
        }
        let why = if let Some((_, e)) = errors.iter().find(|(n, _)| n == c) {
            format!("cgroup v2 has no {c} controller for jobs ({e})")
        } else if let Some((_, at)) = v1.iter().find(|(n, _)| n == c) {
            format!(
                "cgroup v2 has no {c} controller here (it is bound to cgroup v1 at {})",
                at.display()
            )
        } else {
            format!(
                "cgroup v2 has no {c} controller for jobs ({} does not offer it)",
                top.display()
            )
        };
        notes.push(format!("{why}: {consequence}"));
    }
    let kill = base.join("cgroup.kill").exists();
    if !kill {
        notes.push(
            "no cgroup.kill (Linux 5.14 or later): a cancel freezes a job's cgroup and \
             SIGKILLs each of its processes until none is left"
                .into(),
        );
    }
    Tree {
        mount: mount.to_path_buf(),
        mount_root: mount_root.to_string(),
        base: base.to_path_buf(),
        memory,
        pids,
        kill,
    }
}

/// One job's cgroup.
#[derive(Debug)]
pub struct JobCgroup {
    path: PathBuf,
    /// The path as `/proc/PID/cgroup` names it (`/a/b`), to check a process
    /// is in it before signalling.
    rel: String,
    enforced: Enforced,
    kill_file: bool,
}

impl JobCgroup {
    /// The cgroup's folder.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Which of the requested limits the kernel enforces.
    pub fn enforced(&self) -> Enforced {
        self.enforced
    }

    fn set_limits(&mut self, t: &Tree, limits: &JobLimits) -> Result<()> {
        if t.memory {
            if let Some(max) = limits.memory_max {
                write_file(&self.path.join("memory.max"), &max.to_string())?;
                // Over its memory a job stops, as a whole; it does not swap.
                let swap = self.path.join("memory.swap.max");
                if swap.exists() {
                    write_file(&swap, "0")?;
                }
                self.enforced.memory = true;
            }
            let group = self.path.join("memory.oom.group");
            if group.exists() {
                write_file(&group, "1")?;
            }
        }
        if t.pids {
            if let Some(max) = limits.pids_max {
                write_file(&self.path.join("pids.max"), &max.to_string())?;
                self.enforced.pids = true;
            }
        }
        Ok(())
    }

    /// `cgroup.procs`, opened for writing (close-on-exec), for [`enter`] in
    /// a forked child.
    pub(crate) fn procs_for_child(&self) -> Result<OwnedFd> {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(self.path.join("cgroup.procs"))
            .with_context(|| format!("opening {}/cgroup.procs", self.path.display()))?;
        Ok(f.into())
    }

    /// The cgroup's folder, opened (close-on-exec), for a spawner that uses
    /// `clone3` with `CLONE_INTO_CGROUP`.
    pub fn dir_fd(&self) -> Result<OwnedFd> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(&self.path)
            .with_context(|| format!("opening {}", self.path.display()))?;
        Ok(f.into())
    }

    /// Make `cmd`'s child enter this cgroup before it execs.  Call it before
    /// any other `pre_exec` on `cmd` (closures run in the order added): the
    /// move needs root, and a later closure may drop it or close descriptors.
    pub fn place(&self, cmd: &mut std::process::Command) -> Result<()> {
        let fd = self.procs_for_child()?;
        // SAFETY: `enter` makes one write(2) and reads errno: async-signal-
        // safe.  The descriptor lives in the closure (so in the Command) and
        // is close-on-exec.
        unsafe {
            cmd.pre_exec(move || enter(fd.as_raw_fd()));
        }
        Ok(())
    }

    /// The processes in the cgroup.
    pub fn pids(&self) -> Result<Vec<u32>> {
        read_pids(&self.path.join("cgroup.procs"))
    }

    /// Whether any process is in the cgroup (`cgroup.events`).
    pub fn populated(&self) -> Result<bool> {
        let events = std::fs::read_to_string(self.path.join("cgroup.events"))
            .with_context(|| format!("reading {}/cgroup.events", self.path.display()))?;
        Ok(key_value(&events, "populated") != Some(0))
    }

    /// SIGKILL every process in the cgroup, including those that left their
    /// session or process group: `cgroup.kill`, or (before Linux 5.14)
    /// [`kill_by_signals`](Self::kill_by_signals).  Returns at once; see
    /// [`wait_empty`](Self::wait_empty).
    pub fn kill(&self) -> Result<()> {
        if self.kill_file {
            return write_file(&self.path.join("cgroup.kill"), "1");
        }
        self.kill_by_signals(Duration::from_secs(5))
    }

    /// Without `cgroup.kill`: freeze the cgroup (no more forks), SIGKILL each
    /// process in it through a pidfd opened and then checked to be in this
    /// cgroup (a pid reused meanwhile is not touched), until none is left or
    /// `within` passes.
    pub(crate) fn kill_by_signals(&self, within: Duration) -> Result<()> {
        let freeze = self.path.join("cgroup.freeze");
        let frozen = freeze.exists() && write_file(&freeze, "1").is_ok();
        let deadline = Instant::now() + within;
        let result = loop {
            let pids = match self.pids() {
                Ok(p) => p,
                Err(e) => break Err(e),
            };
            if pids.is_empty() {
                break Ok(());
            }
            for pid in pids {
                self.kill_one(pid);
            }
            if Instant::now() >= deadline {
                break Err(anyhow!(
                    "processes are still in {} after SIGKILL",
                    self.path.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        if frozen {
            let _ = write_file(&freeze, "0");
        }
        result
    }

    fn kill_one(&self, pid: u32) {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return;
        }
        // SAFETY: the fd was just returned to us and is owned from here on.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        // The pidfd names one process for good: if that pid is in this
        // cgroup now, the pidfd's process is (or it has exited).
        let here = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .ok()
            .as_deref()
            .and_then(own_cgroup)
            .is_some_and(|p| p == self.rel);
        if here {
            // SAFETY: pidfd_send_signal with a valid pidfd, no siginfo, no flags.
            unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd.as_raw_fd(),
                    libc::SIGKILL,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                );
            }
        }
    }

    /// Wait until no process is left in the cgroup, at most `within`.
    /// Returns whether it is empty.  (A killed process its parent has not
    /// reaped yet no longer counts.)
    pub(crate) fn wait_empty(&self, within: Duration) -> Result<bool> {
        let deadline = Instant::now() + within;
        loop {
            if !self.populated()? {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Memory the job uses: `memory.current`, or without the memory
    /// controller the sum of its processes' `VmRSS` (pages shared between
    /// them count once per process; page cache they do not map is left out).
    /// `None` when the cgroup cannot be read.
    pub(crate) fn memory_current(&self) -> Option<u64> {
        if let Ok(s) = std::fs::read_to_string(self.path.join("memory.current")) {
            if let Ok(v) = s.trim().parse() {
                return Some(v);
            }
        }
        let pids = self.pids().ok()?;
        let mut sum = 0u64;
        for pid in pids {
            match std::fs::read_to_string(format!("/proc/{pid}/status")) {
                Ok(status) => {
                    sum = sum.saturating_add(crate::procfs::kb_field_in(&status, "VmRSS"));
                }
                // Gone since the listing: it holds nothing.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                // Hidden (`ProtectProc=invisible` without the memory
                // controller) or unreadable: the figure would be a lie.
                Err(_) => return None,
            }
        }
        Some(sum)
    }

    /// The most memory the job has used (`memory.peak`, Linux 5.19+, with
    /// the memory controller).
    pub fn memory_peak(&self) -> Option<u64> {
        std::fs::read_to_string(self.path.join("memory.peak"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// How many times the kernel killed the job for its `memory.max`
    /// (`memory.events`' `oom_kill`), with the memory controller.
    pub(crate) fn oom_kills(&self) -> Option<u64> {
        key_value(
            &std::fs::read_to_string(self.path.join("memory.events")).ok()?,
            "oom_kill",
        )
    }

    /// Kill what is left, wait (at most `within`) until the cgroup is empty,
    /// and remove it.  A cgroup already gone is fine.
    pub fn remove(&self, within: Duration) -> Result<()> {
        if !self.path.exists() {
            return Ok(());
        }
        let deadline = Instant::now() + within;
        if self.populated()? {
            self.kill()?;
            if !self.wait_empty(within)? {
                bail!(
                    "{} still has processes {:?} after SIGKILL",
                    self.path.display(),
                    self.pids().unwrap_or_default()
                );
            }
        }
        loop {
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("removing {}", self.path.display()))
                }
            }
        }
    }
}

/// In a forked child, before exec: move this process into the cgroup whose
/// `cgroup.procs` is open on `procs` (from [`JobCgroup::procs_for_child`]).
/// Async-signal-safe: one `write(2)`, no allocation.
pub(crate) fn enter(procs: RawFd) -> std::io::Result<()> {
    // SAFETY: write(2) of a static one-byte buffer.
    let n = unsafe { libc::write(procs, b"0".as_ptr().cast(), 1) };
    if n == 1 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The cgroup2 mount's point and the path inside the hierarchy it shows
/// (`/` unless a container mounted a subtree), from `/proc/self/mountinfo`.
/// The first one wins; `/sys/fs/cgroup` and `/sys/fs/cgroup/unified` are the
/// usual places.
fn cgroup2_mount(mountinfo: &str) -> Option<(PathBuf, String)> {
    mountinfo.lines().find_map(|line| {
        let (fields, rest) = line.split_once(" - ")?;
        if rest.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let f: Vec<&str> = fields.split_whitespace().collect();
        Some((PathBuf::from(unescape(f.get(4)?)), unescape(f.get(3)?)))
    })
}

/// Controllers bound to a cgroup v1 hierarchy and where it is mounted.
fn v1_controllers(mountinfo: &str) -> Vec<(String, PathBuf)> {
    let mut found = Vec::new();
    for line in mountinfo.lines() {
        let Some((fields, rest)) = line.split_once(" - ") else {
            continue;
        };
        let mut r = rest.split_whitespace();
        if r.next() != Some("cgroup") {
            continue;
        }
        let opts = r.nth(1).unwrap_or("");
        let Some(point) = fields.split_whitespace().nth(4) else {
            continue;
        };
        for c in CONTROLLERS {
            if opts.split(',').any(|o| o == c) {
                found.push((c.to_string(), PathBuf::from(unescape(point))));
            }
        }
    }
    found
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|d| (b'0'..=b'7').contains(d))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup v2 path of a process (`0::/path`), from `/proc/PID/cgroup`.
fn own_cgroup(proc_cgroup: &str) -> Option<String> {
    proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim_end_matches(" (deleted)").to_string())
}

/// Where cgroup `rel` (as `/proc/PID/cgroup` names it) is under a mount that
/// shows the hierarchy from `mount_root`.
fn join_cgroup(mount: &Path, mount_root: &str, rel: &str) -> PathBuf {
    let rel = if mount_root != "/" {
        rel.strip_prefix(mount_root).unwrap_or(rel)
    } else {
        rel
    };
    let rel = rel.trim_start_matches('/');
    if rel.is_empty() {
        mount.to_path_buf()
    } else {
        mount.join(rel)
    }
}

/// The inverse of [`join_cgroup`]: how `/proc/PID/cgroup` names the cgroup
/// at `path`.
fn cgroup_rel(mount: &Path, mount_root: &str, path: &Path) -> String {
    let rel = path.strip_prefix(mount).unwrap_or(path);
    let root = mount_root.trim_end_matches('/');
    if rel.as_os_str().is_empty() {
        format!("{root}/").replace("//", "/")
    } else {
        format!("{root}/{}", rel.display())
    }
}

/// Whether systemd marked `dir` as delegated (`trusted.delegate` or
/// `user.delegate`, systemd 251 and later).
fn marked_delegated(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    [c"trusted.delegate", c"user.delegate"].iter().any(|name| {
        // SAFETY: both strings are NUL-terminated; a null buffer of size 0
        // asks for the value's size only.
        unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) >= 0 }
    })
}

fn read_pids(procs: &Path) -> Result<Vec<u32>> {
    let text =
        std::fs::read_to_string(procs).with_context(|| format!("reading {}", procs.display()))?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

fn read_words(file: &Path) -> Vec<String> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .split_whitespace()
        .map(String::from)
        .collect()
}

/// `key N` in a flat-keyed cgroup file.
fn key_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

/// One write(2) to a cgroup control file (never created).
fn write_file(file: &Path, value: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(file)
        .with_context(|| format!("opening {}", file.display()))?;
    f.write_all(value.as_bytes())
        .with_context(|| format!("writing {value:?} to {}", file.display()))
}

fn mkdir(dir: &Path) -> Result<()> {
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e).with_context(|| format!("creating {}", dir.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const PURE_V2: &str = "\
22 26 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:2 - sysfs sysfs rw
26 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw
28 22 0:25 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";
    const CONTAINER: &str =
        "1065 1060 0:30 /docker/abc /sys/fs/cgroup ro,nosuid - cgroup2 cgroup rw\n";

    #[test]
    fn finds_cgroup_v2_and_the_daemons_cgroup_on_hybrid_pure_and_container_systems() {
        let (m, root) = cgroup2_mount(HYBRID).unwrap();
        assert_eq!(
            (m.as_path(), root.as_str()),
            (Path::new("/sys/fs/cgroup/unified"), "/")
        );
        assert_eq!(
            v1_controllers(HYBRID),
            vec![
                ("memory".to_string(), PathBuf::from("/sys/fs/cgroup/memory")),
                ("pids".to_string(), PathBuf::from("/sys/fs/cgroup/pids"))
            ]
        );
        let (m, root) = cgroup2_mount(PURE_V2).unwrap();
        assert_eq!(
            (m.as_path(), root.as_str()),
            (Path::new("/sys/fs/cgroup"), "/")
        );
        assert!(v1_controllers(PURE_V2).is_empty());
        assert!(cgroup2_mount(&HYBRID.replace("cgroup2 cgroup2", "tmpfs x")).is_none());
        let (m, root) = cgroup2_mount(CONTAINER).unwrap();
        assert_eq!(
            join_cgroup(&m, &root, "/docker/abc/init"),
            PathBuf::from("/sys/fs/cgroup/init")
        );
        assert_eq!(
            own_cgroup("12:pids:/x\n1:name=systemd:/y\n0::/system.slice/mezod.service\n"),
            Some("/system.slice/mezod.service".into())
        );
        assert_eq!(own_cgroup("4:memory:/a\n"), None);
        assert_eq!(
            join_cgroup(
                Path::new("/sys/fs/cgroup"),
                "/",
                "/system.slice/mezod.service"
            ),
            PathBuf::from("/sys/fs/cgroup/system.slice/mezod.service")
        );
        assert_eq!(
            join_cgroup(Path::new("/sys/fs/cgroup/unified"), "/", "/"),
            PathBuf::from("/sys/fs/cgroup/unified")
        );
        assert_eq!(
            cgroup_rel(
                Path::new("/sys/fs/cgroup"),
                "/",
                Path::new("/sys/fs/cgroup/a/job-1")
            ),
            "/a/job-1"
        );
        assert_eq!(
            cgroup_rel(
                Path::new("/sys/fs/cgroup"),
                "/docker/abc",
                Path::new("/sys/fs/cgroup/j")
            ),
            "/docker/abc/j"
        );
        assert_eq!(unescape(r"/mnt/with\040space"), "/mnt/with space");
        assert_eq!(key_value("populated 1\nfrozen 0\n", "populated"), Some(1));
        assert_eq!(key_value("low 0\noom_kill 3\n", "oom_kill"), Some(3));
        let a = instance_name(Path::new("/var/lib/mezod/state"));
        assert_eq!(a, instance_name(Path::new("/var/lib/mezod/state")));
        assert_ne!(a, instance_name(Path::new("/tmp/x/state")));
        assert!(a.starts_with("mezod-") && a.len() == 22, "{a}");
        let none = Cgroups::none("no cgroup v2 here".into());
        assert!(!none.is_available());
        assert!(none.create("job-1", &JobLimits::default()).is_err());
        assert!(none.describe().contains("no cgroup v2 here"));
    }

    /// A test parent cgroup under this process's own cgroup, removed (with
    /// whatever is left in it) when dropped.
    struct TestParent(PathBuf);

    impl TestParent {
        fn new(tag: &str) -> Option<Self> {
            let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
            let Some((mount, root)) = cgroup2_mount(&mountinfo) else {
                println!("SKIPPED: no cgroup v2 is mounted here");
                return None;
            };
            let own = own_cgroup(&std::fs::read_to_string("/proc/self/cgroup").unwrap())?;
            let own = join_cgroup(&mount, &root, &own);
            let dir = own.join(format!("mezod-test-{}-{tag}", std::process::id()));
            match std::fs::create_dir(&dir) {
                Ok(()) => Some(Self(dir)),
                Err(e) => {
                    println!(
                        "SKIPPED: cgroup v2 at {} is not writable: {e}",
                        own.display()
                    );
                    None
                }
            }
        }
    }

    impl Drop for TestParent {
        fn drop(&mut self) {
            fn remove_tree(dir: &Path) {
                if let Ok(entries) = std::fs::read_dir(dir) {
                    for e in entries.flatten() {
                        if e.path().is_dir() {
                            remove_tree(&e.path());
                        }
                    }
                }
                let _ = std::fs::write(dir.join("cgroup.kill"), "1");
                let cg = JobCgroup {
                    path: dir.to_path_buf(),
                    rel: String::new(),
                    enforced: Enforced::default(),
                    kill_file: false,
                };
                let _ = cg.wait_empty(Duration::from_secs(2));
                let _ = std::fs::remove_dir(dir);
            }
            remove_tree(&self.0);
        }
    }

    /// Whether `pid` is gone or a zombie.
    fn dead(pid: u32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(s) => s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')),
        }
    }

    fn session_of(pid: u32) -> Option<i64> {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // After "pid (comm) ": state ppid pgrp session …
        s.rsplit_once(") ")?.1.split(' ').nth(3)?.parse().ok()
    }

    fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ok() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Start `script` in `cg` (entering before exec, as the daemon will).
    fn start_in(cg: &JobCgroup, script: &str) -> std::process::Child {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        cg.place(&mut cmd).unwrap();
        cmd.spawn().unwrap()
    }

    /// Both ways of killing: `cgroup.kill`, and signals to each process.
    fn a_setsid_child_dies_with_its_job(by_signals: bool) {
        let Some(parent) = TestParent::new(if by_signals { "signals" } else { "kill" }) else {
            return;
        };
        let cgroups = Cgroups::under(&parent.0.join("jobs")).unwrap();
        println!("{}", cgroups.describe());
        for n in cgroups.notes() {
            println!("note: {n}");
        }
        let cg = cgroups
            .create(
                "job-1",
                &JobLimits {
                    memory_max: Some(1 << 30),
                    pids_max: Some(64),
                },
            )
            .unwrap();
        assert_eq!(cg.enforced(), cgroups.enforced());
        let mut child = start_in(&cg, "setsid sleep 1000 & sleep 1000");
        // The shell (or the sleep it became) and the setsid sleep, in its
        // own session: a signal to the worker's process group misses it.
        wait_for("the setsid child", || {
            let pids = cg.pids().unwrap();
            pids.len() >= 2
                && pids
                    .iter()
                    .any(|p| session_of(*p).is_some_and(|s| s == i64::from(*p)))
        });
        let pids = cg.pids().unwrap();
        assert!(pids.contains(&child.id()), "{pids:?} {}", child.id());
        assert!(cg.populated().unwrap());
        if by_signals {
            cg.kill_by_signals(Duration::from_secs(5)).unwrap();
        } else {
            cg.kill().unwrap();
        }
        assert!(cg.wait_empty(Duration::from_secs(5)).unwrap());
        // Not reaped yet: a zombie is out of the cgroup all the same.
        wait_for("every process to die", || pids.iter().all(|p| dead(*p)));
        cg.remove(Duration::from_secs(5)).unwrap();
        assert!(!cg.path().exists());
        child.wait().unwrap();
        // A leftover of a crashed daemon is emptied and made anew.
        let cg = cgroups.create("job-2", &JobLimits::default()).unwrap();
        let mut child = start_in(&cg, "setsid sleep 1000 & sleep 1000");
        wait_for("two processes", || cg.pids().unwrap().len() >= 2);
        let pids = cg.pids().unwrap();
        let again = cgroups.create("job-2", &JobLimits::default()).unwrap();
        assert!(again.pids().unwrap().is_empty());
        wait_for("the leftovers to die", || pids.iter().all(|p| dead(*p)));
        child.wait().unwrap();
        let mut child = start_in(&again, "setsid sleep 1000 & sleep 1000");
        wait_for("two processes", || again.pids().unwrap().len() >= 2);
        assert_eq!(
            cgroups.clear_leftovers().unwrap(),
            vec!["job-2".to_string()]
        );
        assert!(!again.path().exists());
        child.wait().unwrap();
        std::fs::remove_dir(cgroups.base().unwrap()).unwrap();
    }

    #[test]
    fn a_setsid_child_dies_with_its_job_by_cgroup_kill() {
        a_setsid_child_dies_with_its_job(false);
    }

    #[test]
    fn a_setsid_child_dies_with_its_job_by_signals() {
        a_setsid_child_dies_with_its_job(true);
    }

    #[test]
    fn memory_current_counts_what_a_job_allocates() {
        let Some(parent) = TestParent::new("memory") else {
            return;
        };
        let cgroups = Cgroups::under(&parent.0.join("jobs")).unwrap();
        println!("{}", cgroups.describe());
        let cg = cgroups.create("job-1", &JobLimits::default()).unwrap();
        let idle = cg.memory_current().unwrap();
        // dd fills a 120 MB buffer from /dev/zero (touching every page) and
        // then blocks writing it to a pipe nobody reads.
        let mut child = start_in(
            &cg,
            "dd if=/dev/zero bs=120M count=1 status=none | sleep 1000",
        );
        let mut seen = 0;
        wait_for("memory_current to pass 100 MB", || {
            seen = cg.memory_current().unwrap();
            seen >= 100_000_000
        });
        println!("idle {idle}, with dd {seen}");
        assert!(seen < 1 << 30, "{seen}");
        cg.remove(Duration::from_secs(5)).unwrap();
        child.wait().unwrap();
        assert_eq!(cg.memory_current(), None, "the cgroup is gone");
        std::fs::remove_dir(cgroups.base().unwrap()).unwrap();
    }

    /// `detect` as the daemon runs it here, except that it never moves the
    /// test harness: on this process's own cgroup it makes the instance's
    /// subtree (or says why there is none).
    #[test]
    fn detect_makes_a_subtree_or_says_why_not() {
        let instance = format!("mezod-test-{}-detect", std::process::id());
        let cgroups = Cgroups::detect_in(&instance, false);
        println!("{}", cgroups.describe());
        for n in cgroups.notes() {
            println!("note: {n}");
        }
        let Some(base) = cgroups.base() else {
            assert!(!cgroups.notes().is_empty());
            println!("SKIPPED: {}", cgroups.describe());
            return;
        };
        assert!(base.ends_with(&instance), "{}", base.display());
        let cg = cgroups
            .create(
                "job-1",
                &JobLimits {
                    memory_max: Some(256 << 20),
                    pids_max: Some(16),
                },
            )
            .unwrap();
        let enforced = cg.enforced();
        if enforced.memory {
            assert_eq!(
                std::fs::read_to_string(cg.path().join("memory.max"))
                    .unwrap()
                    .trim(),
                (256u64 << 20).to_string()
            );
        } else {
            assert!(cgroups
                .notes()
                .iter()
                .any(|n| n.contains("memory.max is not enforced")));
        }
        if enforced.pids {
            assert_eq!(
                std::fs::read_to_string(cg.path().join("pids.max"))
                    .unwrap()
                    .trim(),
                "16"
            );
        } else {
            assert!(cgroups
                .notes()
                .iter()
                .any(|n| n.contains("pids.max is not enforced")));
        }
        cg.remove(Duration::from_secs(5)).unwrap();
        std::fs::remove_dir(base).unwrap();
    }

    /// The daemon alone in its cgroup, as under systemd with `Delegate=yes`:
    /// `detect` moves it into `<own>/daemon`, makes `<own>/jobs`, and a job
    /// there is killed and removed.  Another process (this test binary, run
    /// for [`delegated_helper`] alone) plays the daemon, so that the harness
    /// itself is never moved.
    #[test]
    fn detect_in_a_delegated_cgroup_moves_the_daemon_into_a_leaf() {
        let Some(parent) = TestParent::new("delegated") else {
            return;
        };
        let unit = parent.0.join("unit");
        std::fs::create_dir(&unit).unwrap();
        let unit_cg = JobCgroup {
            path: unit.clone(),
            rel: String::new(),
            enforced: Enforced::default(),
            kill_file: false,
        };
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--ignored",
            "--exact",
            "daemon::cgroup::tests::delegated_helper",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("MEZOD_CGROUP_DELEGATED", &unit);
        unit_cg.place(&mut cmd).unwrap();
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        println!("{text}{}", String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success());
        assert!(text.contains("1 passed"), "the helper ran");
        assert!(unit.join("daemon/cgroup.procs").exists());
        assert!(unit.join("jobs/cgroup.procs").exists());
    }

    #[test]
    #[ignore = "the daemon's side of detect_in_a_delegated_cgroup_moves_the_daemon_into_a_leaf"]
    fn delegated_helper() {
        let Some(unit) = std::env::var_os("MEZOD_CGROUP_DELEGATED") else {
            return;
        };
        let unit = PathBuf::from(unit);
        let cgroups = Cgroups::detect("not-used-when-delegated");
        println!("{}", cgroups.describe());
        for n in cgroups.notes() {
            println!("note: {n}");
        }
        assert_eq!(cgroups.base(), Some(unit.join("jobs").as_path()));
        let me = own_cgroup(&std::fs::read_to_string("/proc/self/cgroup").unwrap()).unwrap();
        assert!(me.ends_with("/unit/daemon"), "{me}");
        // Detecting again finds the same subtree and moves nothing.
        let again = Cgroups::detect("not-used-when-delegated");
        assert_eq!(again.base(), cgroups.base());
        let cg = cgroups
            .create(
                "job-1",
                &JobLimits {
                    memory_max: Some(64 << 20),
                    pids_max: Some(8),
                },
            )
            .unwrap();
        let mut child = start_in(&cg, "setsid sleep 1000 & sleep 1000");
        wait_for("two processes", || cg.pids().unwrap().len() >= 2);
        cg.remove(Duration::from_secs(5)).unwrap();
        child.wait().unwrap();
        assert!(!cg.path().exists());
    }
}
