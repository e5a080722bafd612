//! The daemon's main loop.  It alone touches the job table, the seed logs and
//! the workers; everything else reaches it as an [`Event`].
//!
//! The loop is a plain thread with a channel, not a tokio task, on purpose:
//! a worker's death signal (`PR_SET_PDEATHSIG`) fires when the *thread* that
//! forked it ends, so every worker must be spawned from one thread that lives
//! as long as the daemon, and each turn's work (sled writes, spawning) is
//! blocking anyway.  tokio serves the control socket, where it pays
//! (many idle or slow clients on one thread; see `control.rs`).

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use notify::Watcher;

use super::admission::{self, Candidate, Decision, Placed, Pool, Probe, Resources};
use super::checker::{Accepted, Checker, Verdict};
use super::config::{DaemonConfig, Dirs, WatchMode};
use super::control::{
    self, Call, JobDetail, JobView, Lookup, PoolView, Request, Response, StatusReport,
};
use super::disk::{self, DiskGuard};
use super::job_dir::{self, JobDir};
use super::job_facts::{JobFacts, RecordShape};
use super::jobs::{now, JobRecord, JobState, JobTable, Transition};
use super::notify::Notifier;
use super::spool::{Dropped, Spool};
use super::worker::{self, Launch, WorkerEvent};
use crate::estimate::human_bytes;
use crate::identity::Identity;
use crate::safe_fs::Dir;
use crate::seedlog::SeedLog;

mod deps;
mod ended;
mod intake;
mod metrics;
mod requests;
mod workers;

use workers::signal;

/// Everything the main loop reacts to.
pub enum Event {
    SpoolChanged,
    Signal(i32),
    /// From job `.0`'s worker of rank `.1` (0: the leader, or its only one).
    Worker(u64, usize, WorkerEvent),
    Control(Call),
    /// The intake check of a spool file has ended.
    Checked {
        name: String,
        verdict: Verdict,
    },
}

/// How often the loop looks at admission and memory when nothing else happens.
const TICK: Duration = Duration::from_millis(500);
/// A file in new/ that fails its check is rejected only once it has not
/// changed for this long (it may be half-written by a plain copy).
const SETTLE_SECS: f64 = 2.0;
/// How often the spool is swept of what users left behind, and what counts
/// as left behind: files in `tmp/` (and dotfiles in `new/`) untouched for a
/// day; a user's rejected files past the newest hundred.
const SWEEP_EVERY: Duration = Duration::from_secs(3600);
const STALE_SPOOL_FILES: Duration = Duration::from_secs(86_400);
const REJECTED_KEPT_PER_USER: usize = 100;
/// Log lines kept in a failed job's error file.
const ERROR_TAIL_LINES: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq)]
enum StopReason {
    Shutdown,
    Cancel {
        by_uid: u32,
    },
    /// Cancelled, then restarted before its worker stopped: queued again
    /// once it has.
    Restart {
        by_uid: u32,
    },
    /// Stopped for a waiting job of higher priority: queued again once it
    /// has stopped, not counted as a failure.
    Preempt {
        for_id: u64,
    },
}

/// A job whose worker processes are alive.
struct Running {
    /// Its processes, the leader's first: one, or one per replica.
    workers: Vec<worker::WorkerHandle>,
    /// The pool of each worker, in the same order.
    pools: Vec<Pool>,
    /// How each worker ended, once it has: the job ends when all have.
    exits: Vec<Option<ExitStatus>>,
    /// The first worker that ended badly while others still ran (its rank
    /// and status): a replicated job's end is told by its first failure,
    /// not by the others stopping because of it.
    first_failure: Option<(usize, ExitStatus)>,
    estimate: u64,
    stop: Option<StopReason>,
    /// Has reported a step: its process has exec'd and allocated.  Before
    /// that, /proc shows the forked copy of the daemon, so a CPU job is not
    /// sampled (a GPU job's memory is NVML's figure for its pid, from the start).
    settled: bool,
    log: SeedLog,
    /// (time, steps done) over the last minute, for steps/s and ETA.
    progress: VecDeque<(Instant, u64)>,
    /// Why the job cannot succeed, as its worker said before exiting.
    job_error: Option<String>,
    /// What its records look like (from the daemon's own parse of the job).
    records: RecordShape,
    /// The step the next record must be for.
    next_step: u64,
    steps_total: u64,
    /// It broke what it declared (its pipe carried what no worker sends, or
    /// it used more memory than it reserved): stopped, fails with this.
    violation: Option<String>,
    /// Its own cgroup (none where the machine offers no cgroup v2).
    cgroup: Option<super::cgroup::JobCgroup>,
    /// Its owner's uid (fair share and per-user limits).
    owner: u32,
    /// When its worker started (preemption's minimum run time).
    since: Instant,
}

impl Running {
    /// End the job's processes now: every one of its cgroup (what the
    /// worker started with `setsid` too), else the worker itself.
    fn kill(&self) {
        match &self.cgroup {
            Some(cg) => {
                if let Err(e) = cg.kill() {
                    tracing::warn!("killing {}: {e:#}", cg.path().display());
                    self.signal_all(libc::SIGKILL);
                }
            }
            None => self.signal_all(libc::SIGKILL),
        }
    }

    /// Signal every worker of the job that is still running (a SIGTERM
    /// stops replicas together, after the same step).
    fn signal_all(&self, sig: i32) {
        for (w, exit) in self.workers.iter().zip(&self.exits) {
            if exit.is_none() {
                signal(w, sig);
            }
        }
    }

    /// How many of its workers run in `pool`.
    fn holds(&self, pool: &Pool) -> usize {
        self.pools.iter().filter(|p| *p == pool).count()
    }

    fn steps_per_s(&self) -> Option<f64> {
        let (t0, s0) = self.progress.front()?;
        let (t1, s1) = self.progress.back()?;
        let dt = t1.duration_since(*t0).as_secs_f64();
        (dt > 0.0 && s1 > s0).then(|| (s1 - s0) as f64 / dt)
    }
}

/// Command-line choices of `mezod daemon`.
#[derive(Debug, Clone, Default)]
pub struct DaemonOptions {
    pub config: Option<PathBuf>,
    pub spool: Option<PathBuf>,
    pub state: Option<PathBuf>,
    pub runtime: Option<PathBuf>,
}

struct Daemon {
    cfg: DaemonConfig,
    opts: DaemonOptions,
    dirs: Dirs,
    /// `state/jobs/`, held open: job folders are opened relative to it.
    jobs: Dir,
    spool: Spool,
    db: sled::Db,
    table: JobTable,
    claims: sled::Tree,
    /// Spool name → why it was rejected, for `mezod submit` to ask about.
    /// Looked up as data: a client's string never becomes a path.
    rejections: sled::Tree,
    probe: Box<dyn Probe>,
    running: HashMap<u64, Running>,
    tx: Sender<Event>,
    notifier: Notifier,
    exe: PathBuf,
    as_root: bool,
    stopping: Option<Instant>,
    resources: Option<Resources>,
    said_no_gpu: bool,
    /// NVML has shown GPUs: from then on, none readable is an outage to wait out.
    seen_gpus: bool,
    logs_dirty: bool,
    last_error: Option<String>,
    /// Queued jobs as of the last admission pass (for systemd's STATUS line;
    /// counted there so the loop reads the job table once per turn).
    queued: usize,
    /// How intake checks run (a child process as the file's owner).
    checker: Checker,
    /// Spool files whose check is under way, as read.
    checking: HashMap<String, Dropped>,
    /// Free space on the state and spool disks.
    disk: DiskGuard,
    /// The database failed a write (sled's error is sticky): reopen it.
    db_failed: bool,
    /// Files were left for a later pass because enough checks were under way.
    intake_backlog: bool,
    /// When to look again at files that might still be being written.
    recheck_at: Option<Instant>,
    /// Each job's own cgroup v2 (or why there is none).
    cgroups: super::cgroup::Cgroups,
    /// Each user's recent usage (fair share).
    ledger: super::fair_share::Ledger,
    /// A job's memory could not be read (said once).
    said_memory_unreadable: bool,
    /// When each replicated job was first seen waiting (for `elastic`).
    waiting_since: HashMap<u64, Instant>,
    /// Something admission cares about changed (a job queued, a worker
    /// ended, the config reloaded): plan now rather than at the next tick.
    /// (A cancelled queued job frees nothing; the next tick sees it.)
    schedule_due: bool,
}

/// Run the daemon until SIGTERM/SIGINT; returns once every worker has stopped.
pub fn run_daemon(opts: DaemonOptions) -> Result<()> {
    let cfg = match &opts.config {
        Some(p) => DaemonConfig::load(p)?,
        None => DaemonConfig::default(),
    };
    let dirs = cfg.dirs(opts.spool.clone(), opts.state.clone(), opts.runtime.clone());
    tracing::debug!("config (from {:?}, else defaults): {cfg:?}", opts.config);
    let (mut daemon, rx) = Daemon::new(cfg, opts, dirs, Box::new(admission::SystemProbe))?;
    daemon.cgroups = job_cgroups(&daemon.dirs.state);
    let listener = bind_socket(&daemon.dirs.socket())?;
    daemon.recover()?;
    let tx_ctl = daemon.tx.clone();
    control::serve(listener, control::Limits::default(), move |call| {
        let _ = tx_ctl.send(Event::Control(call));
    })?;
    let _signals = listen_for_signals(daemon.tx.clone())?;
    let _watcher = daemon.watch_spool()?;
    daemon.intake()?;
    daemon.schedule()?;
    tracing::info!(
        "serving: spool {}, state {}, socket {}",
        daemon.dirs.spool.display(),
        daemon.dirs.state.display(),
        daemon.dirs.socket().display()
    );
    let status = daemon.status_line();
    daemon.notifier.ready(&status);
    let result = daemon.main_loop(rx);
    super::callback::stop_all();
    daemon.cgroups.release();
    let _ = std::fs::remove_file(daemon.dirs.socket());
    daemon.db.flush()?;
    result
}

/// Now, in Unix seconds with a fraction (usage is charged every turn).
fn now_f64() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The cgroup v2 subtree for this daemon's jobs, set up before any child
/// starts, with what it cannot enforce said once; leftovers of a daemon
/// that crashed are stopped (their jobs resume from the seed log).
fn job_cgroups(state: &Path) -> super::cgroup::Cgroups {
    use super::cgroup::{instance_name, Cgroups};
    let state = std::fs::canonicalize(state).unwrap_or_else(|_| state.to_path_buf());
    let cgroups = Cgroups::detect(&instance_name(&state));
    if cgroups.is_available() {
        tracing::info!("{}", cgroups.describe());
        for note in cgroups.notes() {
            tracing::warn!("{note}");
        }
    } else {
        tracing::warn!(
            "{}: a cancel signals a job's worker alone, and memory is watched, not limited",
            cgroups.describe()
        );
    }
    match cgroups.clear_leftovers() {
        Ok(left) if !left.is_empty() => {
            tracing::warn!(
                "stopped the processes of a previous daemon's jobs: {}",
                left.join(", ")
            )
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("clearing leftover job cgroups: {e:#}"),
    }
    cgroups
}

impl Daemon {
    /// A daemon over `dirs` that learns about memory from `probe` (NVML and
    /// /proc in service; a script in tests), with the events it will receive.
    /// Nothing runs yet: [`run_daemon`] adds the socket, signals and the watcher.
    fn new(
        cfg: DaemonConfig,
        opts: DaemonOptions,
        dirs: Dirs,
        probe: Box<dyn Probe>,
    ) -> Result<(Self, Receiver<Event>)> {
        // SAFETY: geteuid has no preconditions.
        let as_root = unsafe { libc::geteuid() } == 0;
        let spool = Spool::open(&dirs.spool, as_root)?;
        std::fs::create_dir_all(&dirs.runtime)
            .with_context(|| format!("creating {}", dirs.runtime.display()))?;
        let jobs = job_dir::prepare_state(&dirs.state)
            .with_context(|| format!("preparing the state folder {}", dirs.state.display()))?;
        let reserve = cfg.disk_reserve_mib << 20;
        let db = open_db(&dirs, reserve)?;
        let table = JobTable::open(&db)?;
        let claims = db.open_tree("claims")?;
        let rejections = db.open_tree("rejections")?;
        let ledger = super::fair_share::Ledger::open(db.open_tree("usage")?, cfg.half_life_s())?;
        let mut disk = DiskGuard::new(&dirs.state, &dirs.spool, reserve);
        disk.check();
        let (tx, rx) = mpsc::channel();
        let daemon = Daemon {
            cfg,
            opts,
            dirs,
            jobs,
            spool,
            db,
            table,
            claims,
            rejections,
            probe,
            running: HashMap::new(),
            tx,
            notifier: Notifier::new(),
            exe: crate::engine::exe(),
            as_root,
            stopping: None,
            resources: None,
            said_no_gpu: false,
            seen_gpus: false,
            logs_dirty: false,
            last_error: None,
            queued: 0,
            checker: Checker::Process {
                exe: std::env::current_exe()
                    .context("finding the mezod binary for intake checks")?,
                wall: super::checker::WALL,
            },
            checking: HashMap::new(),
            disk,
            db_failed: false,
            intake_backlog: false,
            recheck_at: None,
            cgroups: super::cgroup::Cgroups::none("not set up (a daemon under test)".into()),
            ledger,
            said_memory_unreadable: false,
            waiting_since: HashMap::new(),
            schedule_due: true,
        };
        Ok((daemon, rx))
    }
}

/// Open the job database (0700), after clearing what a full disk may have
/// left in it (see `disk`).
fn open_db(dirs: &Dirs, reserve_bytes: u64) -> Result<sled::Db> {
    disk::prepare_db(&dirs.db(), &disk::reserve_path(&dirs.state), reserve_bytes)?;
    let db = sled::open(dirs.db()).with_context(|| {
        format!(
            "opening the job database {} (is another daemon using this state folder?)",
            dirs.db().display()
        )
    })?;
    std::fs::set_permissions(dirs.db(), std::fs::Permissions::from_mode(0o700))?;
    Ok(db)
}

fn bind_socket(path: &Path) -> Result<UnixListener> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("another daemon is already listening on {}", path.display());
        }
        std::fs::remove_file(path)?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    // Anyone may ask; the kernel tells the daemon who asked (SO_PEERCRED).
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(listener)
}

fn listen_for_signals(tx: Sender<Event>) -> Result<signal_hook::iterator::Handle> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    let handle = signals.handle();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if tx.send(Event::Signal(sig)).is_err() {
                    break;
                }
            }
        })?;
    Ok(handle)
}

impl Daemon {
    // ---- start-up -------------------------------------------------------

    /// After a crash, a graceful stop or a reopened database: every job that
    /// was under way without a live worker is queued again (it resumes from
    /// its seed log).
    fn recover(&mut self) -> Result<()> {
        for mut job in self.table.active()? {
            if self.running.contains_key(&job.id) {
                continue;
            }
            if matches!(
                job.state,
                JobState::Admitted { .. } | JobState::Running { .. } | JobState::Preempted
            ) {
                tracing::debug!(
                    "job {}: was {} when the daemon stopped; queued again",
                    job.id,
                    job.state.name()
                );
                job.reason = match job.state {
                    JobState::Preempted => format!(
                        "preempted at step {} by a daemon stop; resumes from there",
                        job.steps_done
                    ),
                    _ => format!(
                        "the daemon restarted while it ran; resumes from step {}",
                        job.steps_done
                    ),
                };
                job.apply(Transition::Requeue)?;
                self.table.put(&job)?;
            }
        }
        self.table.flush()
    }

    fn watch_spool(&self) -> Result<Box<dyn Watcher>> {
        let tx = self.tx.clone();
        let handler = move |res: notify::Result<notify::Event>| {
            // A change (or an overflow, or an error) triggers a full rescan of
            // new/.  Access events are not changes: the rescan itself opens
            // and reads the folder, and reacting to that would never stop.
            if let Ok(ev) = &res {
                if matches!(ev.kind, notify::EventKind::Access(_)) && !ev.need_rescan() {
                    return;
                }
            }
            let _ = tx.send(Event::SpoolChanged);
        };
        let new_dir = self.spool.new_dir();
        let poll = || -> Result<Box<dyn Watcher>> {
            let cfg = notify::Config::default().with_poll_interval(Duration::from_secs(1));
            let mut w = notify::PollWatcher::new(handler.clone(), cfg)?;
            w.watch(&new_dir, notify::RecursiveMode::NonRecursive)?;
            Ok(Box::new(w))
        };
        let inotify = || -> Result<Box<dyn Watcher>> {
            let mut w =
                notify::RecommendedWatcher::new(handler.clone(), notify::Config::default())?;
            w.watch(&new_dir, notify::RecursiveMode::NonRecursive)?;
            Ok(Box::new(w))
        };
        match self.cfg.watch {
            WatchMode::Poll => poll(),
            WatchMode::Inotify => inotify(),
            WatchMode::Auto => inotify().or_else(|e| {
                tracing::warn!("inotify unavailable ({e:#}); polling the spool every second");
                poll()
            }),
        }
    }

    // ---- the loop -------------------------------------------------------

    fn main_loop(&mut self, rx: Receiver<Event>) -> Result<()> {
        let mut last_rescan = Instant::now();
        let mut last_sweep: Option<Instant> = None;
        let mut last_extend = Instant::now() - Duration::from_secs(60);
        let mut spool_dirty = false;
        let mut last_schedule = Instant::now();
        let mut last_disk_check = Instant::now();
        // `metrics_file:` (written at once, then every 15 s; see `metrics`).
        let mut metrics = None;
        loop {
            let wait = self.notifier.ping_interval().map_or(TICK, |p| p.min(TICK));
            match rx.recv_timeout(wait) {
                Ok(ev) => {
                    let r = self.handle(ev, &mut spool_dirty);
                    self.log_error(r);
                    while let Ok(ev) = rx.try_recv() {
                        let r = self.handle(ev, &mut spool_dirty);
                        self.log_error(r);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            // Jobs that ended (this turn, or by the last turn's admission
            // pass): their `notify:` commands start.
            self.notify_ended();
            // Once a tick, not on every step record (a worker's exit measures
            // at once: see `on_exit`).
            if last_disk_check.elapsed() >= TICK {
                last_disk_check = Instant::now();
                if self.disk.check() {
                    self.schedule_due = true;
                }
            }
            // Reopened once there is room: a reopen needs to write, and a
            // failed database still answers status from its index meanwhile.
            if self.db_failed && self.disk.low().is_none() {
                let r = self.reopen_db();
                self.log_error(r);
            }
            if self.logs_dirty {
                let r = self.db.flush().context("flushing the job database");
                self.logs_dirty = false;
                self.log_error(r.map(|_| ()));
            }
            if let Some(since) = self.stopping {
                if self.running.is_empty() {
                    tracing::info!(
                        "all workers stopped in {:.1}s; exiting",
                        since.elapsed().as_secs_f64()
                    );
                    self.write_metrics(&mut metrics, false);
                    return Ok(());
                }
                if last_extend.elapsed() >= Duration::from_secs(5) {
                    self.notifier.extend_stop_timeout(Duration::from_secs(30));
                    last_extend = Instant::now();
                }
            } else {
                let recheck = self.recheck_at.is_some_and(|t| Instant::now() >= t);
                if spool_dirty || recheck || last_rescan.elapsed() >= self.cfg.rescan_interval() {
                    self.recheck_at = None;
                    let r = self.intake();
                    self.log_error(r);
                    spool_dirty = false;
                    last_rescan = Instant::now();
                }
                if last_sweep.is_none_or(|t| t.elapsed() >= SWEEP_EVERY) {
                    last_sweep = Some(Instant::now());
                    match self.spool.sweep(STALE_SPOOL_FILES, REJECTED_KEPT_PER_USER) {
                        Ok((0, _)) => {}
                        Ok((n, forgotten)) => {
                            for name in forgotten {
                                let _ = self.rejections.remove(name.as_bytes());
                            }
                            tracing::info!("cleared {n} stale or surplus spool file(s)")
                        }
                        Err(e) => tracing::warn!("clearing stale spool files: {e:#}"),
                    }
                }
                // A control request (status, logs) does not change what can
                // start: admission runs when something did, or once a tick
                // (free memory changes on its own).
                if self.schedule_due || last_schedule.elapsed() >= TICK {
                    self.schedule_due = false;
                    last_schedule = Instant::now();
                    let r = self.schedule();
                    self.log_error(r);
                }
            }
            self.write_metrics(&mut metrics, true);
            let status = self.status_line();
            self.notifier.status(&status);
            self.notifier.ping_if_due();
        }
        Ok(())
    }

    /// The daemon outlives its errors (a full disk, an unreadable folder): it
    /// logs each new one and keeps serving.
    fn log_error(&mut self, r: Result<()>) {
        if let Err(e) = r {
            if e.chain().any(|c| c.downcast_ref::<sled::Error>().is_some()) {
                self.db_failed = true;
            }
            let msg = format!("{e:#}");
            if self.last_error.as_deref() != Some(msg.as_str()) {
                tracing::error!("{msg}");
                self.last_error = Some(msg);
            }
        }
    }

    /// Reopen the job database after a failed write.  sled keeps a failed
    /// database failing and holds its file lock until every handle is gone, so
    /// every handle is first moved to a throwaway in-memory database, then the
    /// real one is opened again (with the reserve given back if the disk is
    /// full).  Step records lost with the failed write are recomputed on
    /// resume (steps are pure).
    fn reopen_db(&mut self) -> Result<()> {
        let unsaved = self.table.unsaved();
        let placeholder = sled::Config::new()
            .temporary(true)
            .open()
            .context("opening a placeholder database")?;
        self.swap_db(placeholder)?;
        let db = open_db(&self.dirs, self.cfg.disk_reserve_mib << 20)?;
        self.swap_db(db)?;
        for job in &unsaved {
            self.table.put(job)?;
        }
        self.table.flush()?;
        self.db_failed = false;
        tracing::warn!("reopened the job database after a failed write");
        // Exits the failed database could not record.
        self.recover()?;
        self.schedule_due = true;
        Ok(())
    }

    fn swap_db(&mut self, db: sled::Db) -> Result<()> {
        self.table = JobTable::open(&db)?;
        self.claims = db.open_tree("claims")?;
        self.rejections = db.open_tree("rejections")?;
        self.ledger.rebind(db.open_tree("usage")?)?;
        for (id, r) in self.running.iter_mut() {
            r.log = SeedLog::in_tree(db.open_tree(format!("seedlog/{id}"))?);
        }
        self.db = db;
        Ok(())
    }

    fn handle(&mut self, ev: Event, spool_dirty: &mut bool) -> Result<()> {
        match ev {
            Event::SpoolChanged => {
                *spool_dirty = true;
                self.schedule_due = true;
            }
            Event::Signal(sig) if sig == signal_hook::consts::SIGHUP => self.reload(),
            Event::Signal(sig) => self.shutdown(sig)?,
            Event::Worker(id, 0, WorkerEvent::Record(rec)) => self.on_record(id, rec)?,
            Event::Worker(id, rank, WorkerEvent::Record(_)) => self.on_violation(
                id,
                format!("replica {rank} sent a step record, which only the leader (rank 0) sends"),
            )?,
            Event::Worker(id, _, WorkerEvent::JobError(message)) => {
                if let Some(r) = self.running.get_mut(&id) {
                    r.job_error.get_or_insert(message);
                }
            }
            Event::Worker(id, _, WorkerEvent::Violation(why)) => self.on_violation(id, why)?,
            Event::Worker(id, rank, WorkerEvent::Exited(status)) => {
                self.schedule_due = true;
                self.on_exit(id, rank, status)?
            }
            Event::Checked { name, verdict } => {
                self.schedule_due = true;
                self.on_checked(name, verdict)?
            }
            Event::Control(call) => {
                let response = self
                    .answer(call.request, call.peer)
                    .unwrap_or_else(|e| Response::Error(format!("{e:#}")));
                let _ = call.reply.send(response);
            }
        }
        Ok(())
    }

    fn reload(&mut self) {
        let Some(path) = self.opts.config.clone() else {
            tracing::info!("SIGHUP: no config file to reload; rescanning the spool");
            let _ = self.tx.send(Event::SpoolChanged);
            return;
        };
        match DaemonConfig::load(&path) {
            Ok(new) => {
                let dirs = new.dirs(
                    self.opts.spool.clone(),
                    self.opts.state.clone(),
                    self.opts.runtime.clone(),
                );
                if dirs.spool != self.dirs.spool || dirs.state != self.dirs.state {
                    tracing::warn!("SIGHUP: folder changes take effect on restart only");
                }
                self.cfg = new;
                self.ledger.set_half_life(self.cfg.half_life_s());
                tracing::info!("SIGHUP: reloaded {}", path.display());
            }
            Err(e) => tracing::error!("SIGHUP: keeping the old config: {e:#}"),
        }
        let _ = self.tx.send(Event::SpoolChanged);
    }

    /// First signal: stop admitting and ask every worker to stop at its next
    /// step boundary.  Second: stop them at once (the seed log keeps resume exact).
    fn shutdown(&mut self, sig: i32) -> Result<()> {
        if self.stopping.is_none() {
            tracing::info!(
                "signal {sig}: stopping {} worker(s) at their next step boundary",
                self.running.len()
            );
            self.stopping = Some(Instant::now());
            self.notifier
                .stopping("stopping: workers are saving their state");
            for r in self.running.values_mut() {
                r.stop.get_or_insert(StopReason::Shutdown);
                r.signal_all(libc::SIGTERM);
            }
            return Ok(());
        }
        tracing::warn!("second signal: stopping workers at once");
        let ids: Vec<u64> = self.running.keys().copied().collect();
        for id in ids {
            let r = self.running.remove(&id).expect("listed");
            r.kill();
            r.log.flush()?;
            if let Some(mut job) = self.table.get(id)? {
                job.apply(Transition::Preempt)?;
                job.reason = "stopped at once by a second signal".into();
                self.table.put(&job)?;
            }
        }
        self.table.flush()
    }

    fn status_line(&self) -> String {
        let mut s = format!("{} queued, {} running", self.queued, self.running.len());
        if let Some(why) = self.disk.low() {
            s.push_str(&format!("; DISK FULL: {why}"));
        }
        if let Some(res) = &self.resources {
            for g in &res.gpus {
                let at = match &g.mig {
                    None => format!("GPU {}", g.index),
                    Some(m) => format!("GPU {} MIG {}", g.index, m.slot),
                };
                s.push_str(&format!(
                    "; {at} {}/{} free",
                    human_bytes(g.free_bytes),
                    human_bytes(g.total_bytes)
                ));
            }
            if res.gpus.is_empty() {
                s.push_str("; CPU mode");
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::admission::ScriptedProbe;
    use crate::gpu::GpuInfo;
    use crate::spec::JobSpec;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    /// A daemon under test in `root` (spool, state and socket folders
    /// inside it) with `cfg` and a scripted `probe`; nothing runs yet.
    pub(in crate::daemon::server) fn test_daemon(
        root: &Path,
        cfg: DaemonConfig,
        probe: ScriptedProbe,
    ) -> (Daemon, Receiver<Event>) {
        let dirs = cfg.dirs(
            Some(root.join("spool")),
            Some(root.join("state")),
            Some(root.join("run")),
        );
        Daemon::new(cfg, DaemonOptions::default(), dirs, Box::new(probe)).unwrap()
    }

    /// Intake passes with checks in this process, every verdict handled,
    /// until every file is decided (one user's files are checked two at a
    /// time).
    fn intake_and_settle(daemon: &mut Daemon, rx: &Receiver<Event>) {
        daemon.checker = Checker::InProcess;
        let mut dirty = false;
        loop {
            daemon.intake().unwrap();
            if daemon.checking.is_empty() {
                return;
            }
            while !daemon.checking.is_empty() {
                let ev = rx.recv_timeout(Duration::from_secs(30)).expect("a verdict");
                daemon.handle(ev, &mut dirty).unwrap();
            }
        }
    }

    fn repo() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    fn job_text(batch: usize) -> String {
        format!(
            "model: {{path: {}/tests/fixtures/llama, dtype: f32, device: cuda}}\n\
             task: {{kind: causal_lm, max_length: 64}}\n\
             data: {{train: {}/examples/data/reviews.jsonl}}\n\
             mezo: {{steps: 3, batch_size: {batch}, lr: 1.0e-3}}\n",
            repo().display(),
            repo().display()
        )
    }

    fn gpu(index: u32, total: u64, free: u64) -> GpuInfo {
        GpuInfo {
            index,
            mig: None,
            uuid: format!("GPU-{index}"),
            name: "Scripted GPU".into(),
            total_bytes: total,
            free_bytes: free,
            processes: vec![],
        }
    }

    /// The loop's decisions with a scripted probe: a job placed on the only
    /// GPU it fits (and its worker told that GPU's UUID), one that waits for
    /// the memory the first one reserved, one that can never fit.
    #[test]
    fn admission_places_waits_and_refuses_with_a_scripted_probe() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let estimate = |batch| {
            let spec = JobSpec::parse_with_base(&job_text(batch), None).unwrap();
            crate::estimate::estimate(&spec, true).unwrap().total()
        };
        let (one, big) = (estimate(2), estimate(4096));
        assert!(big > 2 * one, "the big job must outgrow every GPU");
        let probe = ScriptedProbe {
            // GPU 0: half a job free; GPU 1: one and a half.
            gpus: vec![gpu(0, 2 * one, one / 2), gpu(1, 2 * one, one + one / 2)],
            cpu_available: 1 << 34,
            cpu_total: 1 << 34,
            ..Default::default()
        };
        let cfg = DaemonConfig {
            memory_margin_mib: 0,
            ..DaemonConfig::default()
        };
        let (mut daemon, rx) = test_daemon(root, cfg, probe);
        // A stand-in worker: records the GPU it was given (whole: written
        // aside, then renamed, so the file never exists empty), then idles.
        let stub = root.join("worker.sh");
        std::fs::write(
            &stub,
            "#!/bin/sh\nd=\"$(dirname \"$3\")\"\nprintf '%s' \"$CUDA_VISIBLE_DEVICES\" > \"$d/gpu.tmp\"\n\
             mv \"$d/gpu.tmp\" \"$d/gpu\"\nsleep 30\n",
        )
        .unwrap();
        std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755)).unwrap();
        daemon.exe = stub;
        let new = daemon.spool.new_dir();
        std::fs::write(new.join("a.yaml"), job_text(2)).unwrap();
        std::fs::write(new.join("b.yaml"), job_text(4096)).unwrap();
        std::fs::write(new.join("c.yaml"), job_text(2)).unwrap();
        intake_and_settle(&mut daemon, &rx);
        daemon.schedule().unwrap();
        let job = |name: &str| daemon.table.find_name(name).unwrap().unwrap();
        let (a, b, c) = (job("a.yaml"), job("b.yaml"), job("c.yaml"));
        assert_eq!(
            a.state,
            JobState::Running {
                pool: "GPU-1".into(),
                since: match a.state {
                    JobState::Running { since, .. } => since,
                    _ => 0,
                }
            },
            "{}",
            a.reason
        );
        assert_eq!(a.gpus, vec!["GPU-1".to_string()]);
        assert!(matches!(b.state, JobState::Failed { .. }), "{:?}", b.state);
        assert!(b.reason.contains("GiB"), "{}", b.reason);
        assert!(
            matches!(c.state, JobState::Queued { .. }),
            "c must wait while a's estimate is reserved: {:?}",
            c.state
        );
        assert!(!c.reason.is_empty() && c.reason != "queued", "{}", c.reason);
        let told = daemon.dirs.job(a.id).join("gpu");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !told.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(std::fs::read_to_string(told).unwrap(), "GPU-1");
        for r in daemon.running.values() {
            r.signal_all(libc::SIGKILL);
        }
    }

    /// A client's Lookup name is data, never a path: a name that climbs out
    /// of the spool finds nothing, whatever file lies there; and a verdict is
    /// told to the file's owner (or root) alone.
    #[test]
    fn a_lookup_name_never_reads_a_file() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::write(root.join("secret.error"), "root-only secret").unwrap();
        let (mut daemon, rx) = test_daemon(root, DaemonConfig::default(), ScriptedProbe::default());
        let peer_as = |uid| control::Peer {
            uid,
            gid: uid,
            pid: 1,
        };
        let peer = peer_as(1000);
        let lookup_as = |daemon: &mut Daemon, name: &str, peer| match daemon
            .answer(
                Request::Lookup {
                    name: name.to_string(),
                },
                peer,
            )
            .unwrap()
        {
            Response::Lookup(l) => l,
            other => panic!("{other:?}"),
        };
        let lookup = |daemon: &mut Daemon, name: &str| lookup_as(daemon, name, peer);
        for name in ["../../secret", "../../secret.error", "/etc/passwd"] {
            assert!(
                matches!(lookup(&mut daemon, name), Lookup::Pending),
                "{name}"
            );
        }
        // A real rejection is still reported, from the daemon's own record.
        std::fs::write(daemon.spool.new_dir().join("bad.yaml"), "model: [\n").unwrap();
        let old = std::time::SystemTime::now() - Duration::from_secs(60);
        std::fs::File::options()
            .write(true)
            .open(daemon.spool.new_dir().join("bad.yaml"))
            .unwrap()
            .set_modified(old)
            .unwrap();
        intake_and_settle(&mut daemon, &rx);
        let owner = daemon
            .spool
            .root()
            .join("rejected/bad.yaml")
            .metadata()
            .unwrap()
            .uid();
        match lookup_as(&mut daemon, "bad.yaml", peer_as(owner)) {
            Lookup::Rejected { reason } => assert!(reason.contains("bad.yaml was rejected")),
            other => panic!("{other:?}"),
        }
        if owner != 1000 {
            assert!(
                matches!(lookup(&mut daemon, "bad.yaml"), Lookup::Pending),
                "another user hears nothing of it"
            );
        }
    }

    /// Requests as an attacker would send them, to a daemon with jobs and a log.
    mod fuzz_requests {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(300))]

            /// Any request from any uid gets an answer or a refusal, never a
            /// panic, and reading a log never reads past its bound.
            #[test]
            fn any_request_from_anyone_is_answered_or_refused(
                requests in prop::collection::vec(
                    prop_oneof![
                        Just(Request::Hello),
                        (
                            prop::option::of(0u64..8),
                            prop::option::of(any::<usize>()),
                            prop::collection::vec(".{0,12}|failed|queued", 0..3),
                            prop::option::of(any::<u32>()),
                        )
                            .prop_map(|(id, finished, states, owner)| Request::Status {
                                id,
                                finished,
                                states,
                                owner,
                            }),
                        (0u64..8).prop_map(|id| Request::Show { id }),
                        (0u64..8).prop_map(|id| Request::Cancel { id }),
                        (0u64..8).prop_map(|id| Request::Restart { id }),
                        (prop::collection::vec(0u64..8, 0..3), any::<bool>())
                            .prop_map(|(ids, purge)| Request::Clean { ids, purge }),
                        (0u64..8, any::<u64>(), prop::option::of(0usize..1000))
                            .prop_map(|(id, offset, tail)| Request::Logs { id, offset, tail }),
                        ".{0,300}".prop_map(|name| Request::Lookup { name }),
                    ],
                    1..20,
                ),
                uid in prop_oneof![Just(0u32), Just(1000u32), any::<u32>()],
            ) {
                let (mut daemon, _rx, _tmp) = fuzz_daemon();
                let peer = control::Peer { uid, gid: uid, pid: 1 };
                for r in requests {
                    // Odd jobs belong to uid 0, even ones to uid 1000 (1-2
                    // queued, 3-4 failed, 5-6 cancelled: restart and clean
                    // reach their ownership check only on ended jobs).
                    let owner =
                        |id: u64| (1..=6).contains(&id).then_some(if id.is_multiple_of(2) { 1000 } else { 0 });
                    let guarded = match &r {
                        Request::Logs { id, .. }
                        | Request::Cancel { id }
                        | Request::Restart { id } => owner(*id),
                        Request::Clean { ids, .. } => ids.iter().find_map(|id| {
                            owner(*id).filter(|&o| uid != 0 && uid != o)
                        }),
                        _ => None,
                    };
                    // Nobody but root and the owner removes or requeues a
                    // job, and root's `clean` without ids takes only its own.
                    let bound = uid != 0
                        || matches!(&r, Request::Clean { ids, .. } if ids.is_empty());
                    let others_before = others_jobs(&daemon, uid);
                    let answer = daemon.answer(r, peer);
                    let others_after = others_jobs(&daemon, uid);
                    if bound {
                        prop_assert_eq!(&others_before, &others_after, "uid {} changed others' jobs", uid);
                    }
                    if let Some(owner) = guarded {
                        if uid != 0 && uid != owner {
                            prop_assert!(answer.is_err(), "uid {uid} reached a job of uid {owner}");
                        }
                    }
                    if let Ok(Response::Logs { data, .. }) = &answer {
                        prop_assert!(data.len() <= 1 << 16);
                    }
                    // Another user's job shows no files, summary or error.
                    if let Ok(Response::Job(d)) = &answer {
                        if uid != 0 && uid != d.view.job.owner_uid {
                            prop_assert!(d.job_file.is_none() && d.run_dir.is_none());
                            prop_assert!(d.error_tail.is_empty() && d.view.job.summary.is_empty());
                        }
                    }
                }
            }
        }

        /// (id, state) of every job not owned by `uid`.
        fn others_jobs(daemon: &Daemon, uid: u32) -> Vec<(u64, String)> {
            (1..=6)
                .filter_map(|id| daemon.table.get(id).ok().flatten())
                .filter(|j| j.owner_uid != uid)
                .map(|j| (j.id, j.state.to_string()))
                .collect()
        }

        /// A daemon with six jobs (queued, failed and cancelled ones of uid 0
        /// and of uid 1000) and their logs, for fuzzing requests.
        fn fuzz_daemon() -> (Daemon, Receiver<Event>, tempfile::TempDir) {
            let tmp = tempfile::tempdir().unwrap();
            let root = tmp.path();
            let (daemon, rx) = test_daemon(root, DaemonConfig::default(), ScriptedProbe::default());
            for (id, owner) in [
                (1u64, 0u32),
                (2, 1000),
                (3, 0),
                (4, 1000),
                (5, 0),
                (6, 1000),
            ] {
                let mut job: JobRecord = serde_json::from_value(serde_json::json!({
                    "id": id, "name": format!("j{id}.yaml"), "owner_uid": owner, "owner_gid": owner,
                    "state": "queued", "priority": 0, "wants_gpu": false, "steps_total": 10,
                    "steps_done": 0, "submitted_at": 0, "attempts": 0, "failures": 0,
                    "gpus": [], "reason": "queued", "estimate_bytes": 1, "peak_bytes": 0
                }))
                .unwrap();
                job.id = daemon.table.next_id().unwrap();
                match id {
                    3 | 4 => job.apply(Transition::Fail { at: 1 }).unwrap(),
                    5 | 6 => job
                        .apply(Transition::Cancel {
                            at: 1,
                            by_uid: owner,
                        })
                        .unwrap(),
                    _ => {}
                }
                daemon.table.put_durable(&job).unwrap();
                let dir = JobDir::prepare(&daemon.jobs, &daemon.dirs.jobs(), job.id, None).unwrap();
                std::io::Write::write_all(&mut dir.log_for_append().unwrap(), &vec![b'x'; 100_000])
                    .unwrap();
            }
            (daemon, rx, tmp)
        }
    }
}
