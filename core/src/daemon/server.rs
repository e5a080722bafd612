//! The daemon's main loop.  It alone touches the job table, the seed logs and
//! the workers; everything else reaches it as an [`Event`].

use std::collections::{HashMap, VecDeque};
use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
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
use super::config::{DaemonConfig, Dirs, WatchMode};
use super::control::{self, Call, JobView, Lookup, PoolView, Request, Response, StatusReport};
use super::jobs::{now, JobRecord, JobState, JobTable};
use super::notify::Notifier;
use super::spool::{Dropped, Spool};
use super::worker::{self, Launch, WorkerEvent};
use crate::estimate::{estimate, human_bytes};
use crate::seedlog::SeedLog;
use crate::spec::JobSpec;

/// Everything the main loop reacts to.
pub enum Event {
    SpoolChanged,
    Signal(i32),
    Worker(u64, WorkerEvent),
    Control(Call),
}

/// How often the loop looks at admission and memory when nothing else happens.
const TICK: Duration = Duration::from_millis(500);
/// A file in new/ that fails its check is rejected only once it has not
/// changed for this long (it may be half-written by a plain copy).
const SETTLE_SECS: f64 = 2.0;
/// Log lines kept in a failed job's error file.
const ERROR_TAIL_LINES: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq)]
enum StopReason {
    Shutdown,
    Cancel,
}

/// A job whose worker process is alive.
struct Running {
    worker: worker::WorkerHandle,
    pool: Pool,
    estimate: u64,
    stop: Option<StopReason>,
    /// Has reported a step: its process has exec'd and allocated.  Before
    /// that, /proc shows the forked copy of the daemon, so it is not sampled.
    settled: bool,
    log: SeedLog,
    /// (time, steps done) over the last minute, for steps/s and ETA.
    progress: VecDeque<(Instant, u64)>,
}

impl Running {
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
    spool: Spool,
    db: sled::Db,
    table: JobTable,
    claims: sled::Tree,
    probe: Box<dyn Probe>,
    running: HashMap<u64, Running>,
    tx: Sender<Event>,
    notifier: Notifier,
    exe: PathBuf,
    as_root: bool,
    stopping: Option<Instant>,
    resources: Option<Resources>,
    said_no_gpu: bool,
    logs_dirty: bool,
    last_error: Option<String>,
    /// Queued jobs as of the last admission pass (for systemd's STATUS line;
    /// counted there so the loop reads the job table once per turn).
    queued: usize,
    /// When to look again at files that might still be being written.
    recheck_at: Option<Instant>,
}

/// Run the daemon until SIGTERM/SIGINT; returns once every worker has stopped.
pub fn run_daemon(opts: DaemonOptions) -> Result<()> {
    let cfg = match &opts.config {
        Some(p) => DaemonConfig::load(p)?,
        None => DaemonConfig::default(),
    };
    let dirs = cfg.dirs(opts.spool.clone(), opts.state.clone(), opts.runtime.clone());
    // SAFETY: geteuid has no preconditions.
    let as_root = unsafe { libc::geteuid() } == 0;
    let spool = Spool::open(&dirs.spool, as_root)?;
    for d in [&dirs.state, &dirs.jobs(), &dirs.runtime] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let db = sled::open(dirs.db()).with_context(|| {
        format!(
            "opening the job database {} (is another daemon using this state folder?)",
            dirs.db().display()
        )
    })?;
    let table = JobTable::open(&db)?;
    let claims = db.open_tree("claims")?;
    let (tx, rx) = mpsc::channel();
    let listener = bind_socket(&dirs.socket())?;
    let mut daemon = Daemon {
        cfg,
        opts,
        dirs,
        spool,
        db,
        table,
        claims,
        probe: Box::new(admission::SystemProbe),
        running: HashMap::new(),
        tx: tx.clone(),
        notifier: Notifier::new(),
        exe: crate::engine::exe(),
        as_root,
        stopping: None,
        resources: None,
        said_no_gpu: false,
        logs_dirty: false,
        last_error: None,
        queued: 0,
        recheck_at: None,
    };
    daemon.recover()?;
    let tx_ctl = tx.clone();
    control::serve(listener, move |call| {
        let _ = tx_ctl.send(Event::Control(call));
    });
    let _signals = listen_for_signals(tx.clone())?;
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
    let _ = std::fs::remove_file(daemon.dirs.socket());
    daemon.db.flush()?;
    result
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

    /// After a crash or a graceful stop: every job that was under way is
    /// queued again (it resumes from its seed log); stale claims are finished.
    fn recover(&mut self) -> Result<()> {
        for mut job in self.table.all()? {
            if matches!(
                job.state,
                JobState::Admitted | JobState::Running | JobState::Preempted
            ) {
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
                job.state = JobState::Queued;
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
        let mut last_extend = Instant::now() - Duration::from_secs(60);
        let mut spool_dirty = false;
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
            if self.logs_dirty {
                self.db.flush()?;
                self.logs_dirty = false;
            }
            if let Some(since) = self.stopping {
                if self.running.is_empty() {
                    tracing::info!(
                        "all workers stopped in {:.1}s; exiting",
                        since.elapsed().as_secs_f64()
                    );
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
                let r = self.schedule();
                self.log_error(r);
            }
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
            let msg = format!("{e:#}");
            if self.last_error.as_deref() != Some(msg.as_str()) {
                tracing::error!("{msg}");
                self.last_error = Some(msg);
            }
        }
    }

    fn handle(&mut self, ev: Event, spool_dirty: &mut bool) -> Result<()> {
        match ev {
            Event::SpoolChanged => *spool_dirty = true,
            Event::Signal(sig) if sig == signal_hook::consts::SIGHUP => self.reload(),
            Event::Signal(sig) => self.shutdown(sig)?,
            Event::Worker(id, WorkerEvent::Record(rec)) => self.on_record(id, rec)?,
            Event::Worker(id, WorkerEvent::Exited(status)) => self.on_exit(id, status)?,
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
                signal(&r.worker, libc::SIGTERM);
            }
            return Ok(());
        }
        tracing::warn!("second signal: stopping workers at once");
        let ids: Vec<u64> = self.running.keys().copied().collect();
        for id in ids {
            let r = self.running.remove(&id).expect("listed");
            signal(&r.worker, libc::SIGKILL);
            r.log.flush()?;
            if let Some(mut job) = self.table.get(id)? {
                job.state = JobState::Preempted;
                job.reason = "stopped at once by a second signal".into();
                self.table.put(&job)?;
            }
        }
        self.table.flush()
    }

    // ---- spool intake ---------------------------------------------------

    /// Take every file in `new/`.  A file that is not a valid job is rejected;
    /// a failure of the daemon's own (a full disk, say) leaves the file where it
    /// is for the next scan and is only logged.
    fn intake(&mut self) -> Result<()> {
        for name in self.spool.list()? {
            if let Some(claim) = self.claims.get(name.as_bytes())? {
                // Recorded before a crash, not yet moved: finish the move only.
                let id = u64::from_be_bytes(claim[..8].try_into()?);
                let inode = u64::from_be_bytes(claim[8..16].try_into()?);
                if self.spool.inode(&name) == Some(inode) {
                    self.spool.archive(&name, id)?;
                    self.claims.remove(name.as_bytes())?;
                    continue;
                }
                self.claims.remove(name.as_bytes())?;
            }
            let checked = match self.check(&name) {
                Ok(checked) => checked,
                Err(_) if self.spool.is_fresh(&name, SETTLE_SECS) => {
                    // Perhaps still being written (copied in without rename): look again soon.
                    self.recheck_at = Some(Instant::now() + Duration::from_secs_f64(SETTLE_SECS));
                    continue;
                }
                Err(why) => {
                    let why = format!("{why:#}");
                    tracing::warn!("rejected {name}: {why}");
                    if let Err(e) = self.spool.reject(&name, &why) {
                        tracing::error!("could not move {name} to rejected/: {e:#}");
                    }
                    continue;
                }
            };
            match self.record(&name, checked) {
                Ok(id) => tracing::info!("job {id}: accepted {name}"),
                Err(e) => tracing::error!("could not record {name} (will retry): {e:#}"),
            }
        }
        Ok(())
    }

    /// Validate one dropped file: the spec, its files, and its size.
    fn check(&self, name: &str) -> Result<(Dropped, JobSpec, u64)> {
        let dropped = self.spool.read(name).map_err(anyhow::Error::msg)?;
        let spec = JobSpec::parse_with_base(&dropped.text, None)?;
        if !spec.data.train.is_file() {
            bail!("data.train {} does not exist", spec.data.train.display());
        }
        if let Some(dev) = &spec.data.dev {
            if !dev.is_file() {
                bail!("data.dev {} does not exist", dev.display());
            }
        }
        let footprint = estimate(&spec, spec.model.device.starts_with("cuda"))
            .with_context(|| format!("model {}", spec.model.describe()))?;
        Ok((dropped, spec, footprint.total()))
    }

    /// Record a checked file as a queued job, then move it to `cur/`.
    fn record(
        &mut self,
        name: &str,
        (dropped, spec, estimate): (Dropped, JobSpec, u64),
    ) -> Result<u64> {
        let wants_gpu = spec.model.device.starts_with("cuda");
        let id = self.table.next_id()?;
        let dir = self.dirs.job(id);
        std::fs::create_dir_all(&dir)?;
        crate::durable::write(&dir.join("job.yaml"), &dropped.text)?;
        if self.as_root {
            std::os::unix::fs::chown(&dir, Some(dropped.uid), Some(dropped.gid))?;
        }
        let job = JobRecord {
            id,
            name: name.to_string(),
            owner_uid: dropped.uid,
            owner_gid: dropped.gid,
            state: JobState::Queued,
            priority: spec.priority,
            wants_gpu,
            steps_total: spec.mezo.steps,
            steps_done: 0,
            last_loss: None,
            submitted_at: now(),
            started_at: None,
            finished_at: None,
            attempts: 0,
            failures: 0,
            not_before: None,
            gpus: vec![],
            reason: "queued".into(),
            estimate_bytes: estimate,
            peak_bytes: 0,
            result: None,
        };
        // The record and its claim become durable together, before the file moves.
        let mut claim = id.to_be_bytes().to_vec();
        claim.extend_from_slice(&dropped.inode.to_be_bytes());
        self.claims.insert(name.as_bytes(), claim)?;
        self.table.put_durable(&job)?;
        self.spool.archive(name, id)?;
        self.claims.remove(name.as_bytes())?;
        Ok(id)
    }

    // ---- admission ------------------------------------------------------

    fn resources(&mut self) -> Resources {
        let (gpus, no_gpu_reason) = match self.probe.gpus() {
            Ok(all) => {
                let gpus: Vec<_> = all
                    .into_iter()
                    .filter(|g| self.cfg.gpus.allows(g.index, &g.uuid))
                    .collect();
                let reason = gpus
                    .is_empty()
                    .then(|| "no GPU matches the config's `gpus`".to_string());
                (gpus, reason)
            }
            Err(e) => (vec![], Some(e)),
        };
        if let Some(r) = &no_gpu_reason {
            if !self.said_no_gpu {
                tracing::info!(
                    "no GPUs ({r}); running in CPU mode: {} slot(s), memory from MemAvailable",
                    self.cfg.cpu_slots
                );
                self.said_no_gpu = true;
            }
        }
        let (cpu_available, cpu_total) = self.probe.cpu_memory();
        Resources {
            gpus,
            no_gpu_reason,
            cpu_available,
            cpu_total,
            cpu_slots: self.cfg.cpu_slots,
            jobs_per_gpu: self.cfg.jobs_per_gpu,
            margin: self.cfg.margin_bytes(),
        }
    }

    fn schedule(&mut self) -> Result<()> {
        let res = self.resources();
        let mut placed = Vec::new();
        for (&id, r) in self.running.iter() {
            let usage = if r.settled {
                self.probe.process_memory(r.worker.pid(), &r.pool)
            } else {
                0
            };
            placed.push(Placed {
                pool: r.pool.clone(),
                estimate: r.estimate,
                usage,
            });
            if let Some(mut job) = self.table.get(id)? {
                if usage > job.peak_bytes {
                    job.peak_bytes = usage;
                    self.table.put(&job)?;
                }
            }
        }
        let t = now();
        let mut queue = Vec::new();
        self.queued = 0;
        for job in self.table.active()? {
            if job.state != JobState::Queued {
                continue;
            }
            self.queued += 1;
            if job.not_before.is_some_and(|nb| nb > t) {
                continue;
            }
            queue.push(Candidate {
                id: job.id,
                priority: job.priority,
                estimate: job.estimate_bytes,
                wants_gpu: job.wants_gpu,
            });
        }
        let decisions = admission::plan(&queue, &placed, &res);
        self.resources = Some(res);
        for d in decisions {
            match d {
                Decision::Admit { id, pool } => self.start(id, pool)?,
                Decision::Wait { id, reason } => self.set_reason(id, reason)?,
                Decision::Never { id, reason } => self.fail(id, &reason, false)?,
            }
        }
        Ok(())
    }

    fn set_reason(&mut self, id: u64, reason: String) -> Result<()> {
        if let Some(mut job) = self.table.get(id)? {
            if job.reason != reason {
                job.reason = reason;
                self.table.put(&job)?;
            }
        }
        Ok(())
    }

    fn start(&mut self, id: u64, pool: Pool) -> Result<()> {
        let Some(mut job) = self.table.get(id)? else {
            return Ok(());
        };
        let gpu = match &pool {
            Pool::Gpu(uuid) => self
                .resources
                .as_ref()
                .and_then(|r| r.gpus.iter().find(|g| &g.uuid == uuid).cloned()),
            Pool::Cpu => None,
        };
        job.state = JobState::Admitted;
        job.attempts += 1;
        job.gpus = gpu.iter().map(|g| g.uuid.clone()).collect();
        self.table.put_durable(&job)?;

        let log = SeedLog::in_tree(self.db.open_tree(format!("seedlog/{id}"))?);
        let mut records = log.contiguous()?;
        records.truncate(job.steps_total as usize);
        log.truncate_from(records.len() as u64)?;
        let tx = self.tx.clone();
        let spawned = self.spawn_worker(&job, gpu.as_ref(), &records, move |ev| {
            let _ = tx.send(Event::Worker(id, ev));
        });
        match spawned {
            Ok(handle) => {
                tracing::info!(
                    "job {id}: started worker {} on {} (estimate {})",
                    handle.pid(),
                    describe_pool(&pool),
                    human_bytes(job.estimate_bytes)
                );
                job.state = JobState::Running;
                job.started_at.get_or_insert(now());
                job.steps_done = records.len() as u64;
                job.reason = format!("running on {}", describe_pool(&pool));
                job.not_before = None;
                self.table.put_durable(&job)?;
                self.running.insert(
                    id,
                    Running {
                        worker: handle,
                        pool,
                        estimate: job.estimate_bytes,
                        stop: None,
                        settled: false,
                        log,
                        progress: VecDeque::new(),
                    },
                );
            }
            Err(e) => self.crashed(job, &format!("could not start: {e:#}"))?,
        }
        Ok(())
    }

    /// Open the job's log and start its worker; any failure here is the
    /// attempt's, not the daemon's.
    fn spawn_worker(
        &self,
        job: &JobRecord,
        gpu: Option<&crate::gpu::GpuInfo>,
        records: &[crate::seedlog::StepRecord],
        report: impl Fn(WorkerEvent) + Send + 'static,
    ) -> Result<worker::WorkerHandle> {
        let dir = self.dirs.job(job.id);
        let mut worker_log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("worker.log"))?;
        writeln!(
            worker_log,
            "--- attempt {} on {}, from step {} ---",
            job.attempts,
            gpu.map_or("CPU".to_string(), |g| format!(
                "GPU {} ({})",
                g.index, g.name
            )),
            records.len()
        )?;
        let run_as = (self.as_root && job.owner_uid != 0).then_some((job.owner_uid, job.owner_gid));
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.join("worker.log"), Some(uid), Some(gid))?;
        }
        let launch = Launch {
            exe: &self.exe,
            job_dir: &dir,
            gpu,
            threads: self.cfg.cpu_threads(),
            snapshot_every: self.cfg.snapshot_every,
            estimate: job.estimate_bytes,
            run_as,
        };
        worker::spawn(&launch, records, worker_log, report)
    }

    // ---- workers --------------------------------------------------------

    fn on_record(&mut self, id: u64, rec: crate::seedlog::StepRecord) -> Result<()> {
        let Some(r) = self.running.get_mut(&id) else {
            return Ok(());
        };
        r.log.insert(&rec)?;
        r.settled = true;
        let t = Instant::now();
        r.progress.push_back((t, rec.step + 1));
        while r
            .progress
            .front()
            .is_some_and(|(t0, _)| t.duration_since(*t0) > Duration::from_secs(60))
        {
            r.progress.pop_front();
        }
        self.logs_dirty = true;
        if let Some(mut job) = self.table.get(id)? {
            job.steps_done = rec.step + 1;
            job.last_loss = Some(rec.loss_plus);
            self.table.put(&job)?;
        }
        Ok(())
    }

    fn on_exit(&mut self, id: u64, status: ExitStatus) -> Result<()> {
        let Some(r) = self.running.remove(&id) else {
            return Ok(());
        };
        r.log.flush()?;
        let Some(mut job) = self.table.get(id)? else {
            return Ok(());
        };
        job.steps_done = r.log.contiguous()?.len() as u64;
        let code = status.code();
        if status.success() {
            job.state = JobState::Done;
            job.finished_at = Some(now());
            job.result = read_summary(&self.dirs.job(id));
            job.reason = "finished".into();
            tracing::info!("job {id}: done");
            return self.table.put_durable(&job);
        }
        match r.stop {
            Some(StopReason::Cancel) => {
                job.state = JobState::Cancelled;
                job.finished_at = Some(now());
                job.reason = format!("cancelled at step {}", job.steps_done);
                tracing::info!("job {id}: cancelled");
                self.table.put_durable(&job)
            }
            Some(StopReason::Shutdown) if self.stopping.is_some() => {
                job.state = JobState::Preempted;
                job.reason = format!("preempted at step {} by a daemon stop", job.steps_done);
                tracing::info!("job {id}: preempted at step {}", job.steps_done);
                self.table.put_durable(&job)
            }
            _ => {
                let how = match (code, status.signal()) {
                    (Some(c), _) => format!("worker exited with status {c}"),
                    (None, Some(s)) => format!("worker was killed by signal {s}"),
                    _ => "worker ended".into(),
                };
                self.crashed(job, &how)
            }
        }
    }

    /// A worker failed: retry with backoff up to the limit, then fail the job.
    fn crashed(&mut self, mut job: JobRecord, how: &str) -> Result<()> {
        job.failures += 1;
        if job.failures > self.cfg.retry_limit {
            let id = job.id;
            self.table.put(&job)?;
            return self.fail(
                id,
                &format!("{how}; gave up after {} attempts", job.failures),
                true,
            );
        }
        let backoff = self.cfg.retry_backoff_s * 2f64.powi(job.failures as i32 - 1);
        job.state = JobState::Queued;
        job.not_before = Some(now() + backoff.ceil() as u64);
        job.reason = format!(
            "{how}; retry {} of {} in {:.0}s (see `mezod logs {}`)",
            job.failures, self.cfg.retry_limit, backoff, job.id
        );
        tracing::warn!("job {}: {}", job.id, job.reason);
        self.table.put_durable(&job)
    }

    /// Mark a job failed and write its error file (with the log's tail).
    fn fail(&mut self, id: u64, reason: &str, with_log: bool) -> Result<()> {
        let Some(mut job) = self.table.get(id)? else {
            return Ok(());
        };
        job.state = JobState::Failed;
        job.finished_at = Some(now());
        job.reason = reason.to_string();
        let dir = self.dirs.job(id);
        let mut text = format!("job {id} ({}) failed: {reason}\n", job.name);
        if with_log {
            let log = std::fs::read_to_string(dir.join("worker.log")).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            text.push_str("\nlast lines of its log:\n");
            for l in &lines[lines.len().saturating_sub(ERROR_TAIL_LINES)..] {
                text.push_str(l);
                text.push('\n');
            }
        }
        if let Err(e) = crate::durable::write(&dir.join("error"), text) {
            tracing::error!("job {id}: could not write its error file: {e}");
        }
        tracing::error!("job {id}: failed: {reason}");
        self.table.put_durable(&job)
    }

    // ---- control requests ----------------------------------------------

    fn answer(&mut self, request: Request, peer: control::Peer) -> Result<Response> {
        Ok(match request {
            Request::Hello => Response::Hello {
                spool: self.dirs.spool.clone(),
                version: env!("CARGO_PKG_VERSION").into(),
            },
            Request::Status { id, finished } => Response::Status(self.report(id, finished)?),
            Request::Cancel { id } => self.cancel(id, peer)?,
            Request::Logs { id, offset } => {
                let job = self.owned_job(id, peer)?;
                let mut f = std::fs::File::open(self.dirs.job(id).join("worker.log")).ok();
                let mut data = Vec::new();
                if let Some(f) = f.as_mut() {
                    f.seek(SeekFrom::Start(offset))?;
                    f.take(1 << 16).read_to_end(&mut data)?;
                }
                let offset = offset + data.len() as u64;
                Response::Logs {
                    finished: job.state.is_final() && data.is_empty(),
                    data: String::from_utf8_lossy(&data).into_owned(),
                    offset,
                }
            }
            Request::Lookup { name } => {
                let found = self.table.find_name(&name)?;
                Response::Lookup(match found {
                    Some(j) => Lookup::Accepted { id: j.id },
                    None => match self.spool.rejection(&name) {
                        Some(reason) => Lookup::Rejected { reason },
                        None => Lookup::Pending,
                    },
                })
            }
        })
    }

    fn owned_job(&self, id: u64, peer: control::Peer) -> Result<JobRecord> {
        let Some(job) = self.table.get(id)? else {
            bail!("no job {id}");
        };
        if !peer.may_manage(job.owner_uid) {
            bail!(
                "job {id} belongs to uid {}; only its owner or root may do that",
                job.owner_uid
            );
        }
        Ok(job)
    }

    fn cancel(&mut self, id: u64, peer: control::Peer) -> Result<Response> {
        let mut job = self.owned_job(id, peer)?;
        if job.state.is_final() {
            bail!("job {id} has already ended ({})", job.state);
        }
        if let Some(r) = self.running.get_mut(&id) {
            r.stop = Some(StopReason::Cancel);
            signal(&r.worker, libc::SIGTERM);
            return Ok(Response::Cancelled {
                id,
                state: "cancelling (the worker stops at its next step boundary)".into(),
            });
        }
        job.state = JobState::Cancelled;
        job.finished_at = Some(now());
        job.reason = format!("cancelled by uid {}", peer.uid);
        self.table.put_durable(&job)?;
        Ok(Response::Cancelled {
            id,
            state: "cancelled".into(),
        })
    }

    /// One job, or the active jobs and the newest `finished` ended ones: the
    /// answer's size follows the active jobs, not the table's history.
    fn report(&mut self, id: Option<u64>, finished: Option<usize>) -> Result<StatusReport> {
        let mut finished_not_shown = 0;
        let jobs = match id {
            Some(id) => vec![self
                .table
                .get(id)?
                .with_context(|| format!("no job {id}"))?],
            None => {
                let mut jobs = self.table.active()?;
                let recent = self
                    .table
                    .recent_finished(finished.unwrap_or(control::DEFAULT_FINISHED_SHOWN))?;
                let (count, active) = self.table.counts();
                finished_not_shown = count - active - recent.len();
                jobs.extend(recent);
                jobs.sort_by_key(|j| j.id);
                jobs
            }
        };
        let views = jobs
            .into_iter()
            .map(|job| {
                let rate = self.running.get(&job.id).and_then(Running::steps_per_s);
                JobView {
                    eta_s: rate.map(|r| (job.steps_total - job.steps_done) as f64 / r),
                    steps_per_s: rate,
                    job,
                }
            })
            .collect();
        let (mode, pools) = match &self.resources {
            Some(res) => {
                let count = |p: &Pool| self.running.values().filter(|r| &r.pool == p).count();
                let mut pools: Vec<PoolView> = res
                    .gpus
                    .iter()
                    .map(|g| PoolView {
                        name: format!("GPU {} {} ({})", g.index, g.name, g.uuid),
                        total_bytes: g.total_bytes,
                        free_bytes: g.free_bytes,
                        running: count(&Pool::Gpu(g.uuid.clone())),
                    })
                    .collect();
                pools.push(PoolView {
                    name: "CPU".into(),
                    total_bytes: res.cpu_total,
                    free_bytes: res.cpu_available,
                    running: count(&Pool::Cpu),
                });
                let mode = match &res.no_gpu_reason {
                    None => "gpu".to_string(),
                    Some(r) => format!("cpu only ({r})"),
                };
                (mode, pools)
            }
            None => ("starting".into(), vec![]),
        };
        Ok(StatusReport {
            mode,
            pools,
            jobs: views,
            finished_not_shown,
        })
    }

    fn status_line(&self) -> String {
        let mut s = format!("{} queued, {} running", self.queued, self.running.len());
        if let Some(res) = &self.resources {
            for g in &res.gpus {
                s.push_str(&format!(
                    "; GPU {} {}/{} free",
                    g.index,
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

fn describe_pool(pool: &Pool) -> String {
    match pool {
        Pool::Cpu => "CPU".into(),
        Pool::Gpu(uuid) => uuid.clone(),
    }
}

/// Signal a worker through its handle; one that has already exited is fine
/// (its exit event is on its way).
fn signal(worker: &worker::WorkerHandle, sig: i32) {
    if let Err(e) = worker.signal(sig) {
        if e.raw_os_error() != Some(libc::ESRCH) {
            tracing::warn!("signalling worker {}: {e}", worker.pid());
        }
    }
}

/// The dev-metric summary of a finished run.
fn read_summary(job_dir: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(job_dir.join("run").join("result.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let keep = [
        "metric",
        "zero_shot",
        "best",
        "best_step",
        "final_metric",
        "test_metric",
        "zero_shot_test",
        "peak_memory_bytes",
        "peak_memory_source",
        "memory_estimate_bytes",
        "wall_time_s",
    ];
    Some(serde_json::Value::Object(
        keep.iter()
            .filter_map(|k| v.get(*k).map(|x| (k.to_string(), x.clone())))
            .collect(),
    ))
}
