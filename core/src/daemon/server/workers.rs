//! Admission and workers: which queued job starts where, worker starts, their
//! step records and their exits (done, cancelled, preempted, crashed, failed).

use super::*;
use crate::daemon::cgroup::{JobCgroup, JobLimits};

/// A job's workers as started: the leader first.
pub(super) struct Spawned {
    workers: Vec<worker::WorkerHandle>,
    /// The steps its seed log held: the leader replays them.
    steps_done: u64,
    records: RecordShape,
    cgroup: Option<JobCgroup>,
}

impl Daemon {
    // ---- admission ------------------------------------------------------

    pub(super) fn resources(&mut self) -> Resources {
        let (gpus, no_gpu_reason) = match self.probe.gpus() {
            Ok(all) => {
                let gpus: Vec<_> = all
                    .into_iter()
                    .filter(|g| self.cfg.gpus.allows(g))
                    .collect();
                let reason = gpus
                    .is_empty()
                    .then(|| "no GPU matches the config's `gpus`".to_string());
                (gpus, reason)
            }
            Err(e) => (vec![], Some(e)),
        };
        if let Some(r) = &no_gpu_reason {
            if !self.said_no_gpu && !self.seen_gpus {
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
            running_per_user: self.cfg.running_per_user,
            gpu_share_per_user: self.cfg.gpu_share_per_user,
        }
    }

    /// Charge every user with running jobs for the devices they held since
    /// the last charge (fair share).
    pub(super) fn charge_usage(&mut self) -> Result<()> {
        let t = now_f64();
        let mut devices: HashMap<u32, f64> = HashMap::new();
        for r in self.running.values() {
            *devices.entry(r.owner).or_default() += 1.0;
        }
        for (owner, n) in devices {
            self.ledger.charge(owner, n, t)?;
        }
        Ok(())
    }

    pub(super) fn schedule(&mut self) -> Result<()> {
        self.charge_usage()?;
        let res = self.resources();
        self.seen_gpus |= !res.gpus.is_empty();
        // GPU jobs fail at once where there are no GPUs, but not because NVML
        // failed to answer one pass (or a GPU fell off the bus): they wait.
        let outage = (self.seen_gpus && res.gpus.is_empty()).then(|| {
            format!(
                "waiting for a GPU: none is usable now ({})",
                res.no_gpu_reason.as_deref().unwrap_or("none listed")
            )
        });
        let mut placed = Vec::new();
        let mut overran = Vec::new();
        let mut unreadable = false;
        for (&id, r) in self.running.iter() {
            // A job's cgroup holds only its own processes, from its start:
            // a replicated CPU job's replicas together.
            let cgroup_usage = |unreadable: &mut bool| match &r.cgroup {
                Some(cg) => cg.memory_current().unwrap_or_else(|| {
                    if !self.said_memory_unreadable {
                        tracing::warn!(
                            "the memory of job {id} cannot be read (neither its cgroup's \
                             memory.current nor its processes' /proc): jobs' memory is not \
                             watched; under systemd without the memory controller in cgroup \
                             v2, drop ProtectProc=invisible from the unit"
                        );
                    }
                    *unreadable = true;
                    0
                }),
                None => 0,
            };
            let on_cpu = r.holds(&Pool::Cpu);
            let cpu_usage = if on_cpu > 0 && r.cgroup.is_some() {
                cgroup_usage(&mut unreadable)
            } else {
                0
            };
            // Each worker's share, in its pool.
            let usages: Vec<u64> = r
                .workers
                .iter()
                .zip(&r.pools)
                .map(|(w, pool)| match pool {
                    // What a worker has allocated on its GPU is already gone from
                    // the free memory: only the rest of its estimate is reserved,
                    // from its first allocation on.  Read from the same NVML
                    // snapshot as that free memory, so memory allocated between
                    // two reads never counts as both free and allocated.
                    Pool::Gpu(uuid) => res
                        .gpus
                        .iter()
                        .filter(|g| &g.uuid == uuid)
                        .flat_map(|g| &g.processes)
                        .filter(|(pid, _)| *pid == w.pid())
                        .map(|(_, bytes)| bytes)
                        .sum(),
                    Pool::Cpu if r.cgroup.is_some() => cpu_usage / on_cpu as u64,
                    Pool::Cpu if r.settled => self.probe.process_memory(w.pid(), pool),
                    Pool::Cpu => 0,
                })
                .collect();
            let usage: u64 = usages.iter().sum();
            let limit = self.reservation(r.estimate) * r.workers.len() as u64;
            if usage > limit && r.violation.is_none() {
                overran.push((
                    id,
                    format!(
                        "it used {}, more than the {} it reserved (its estimate {} plus the {} \
                         margin{}): stopped so that it cannot take the memory of the jobs \
                         beside it",
                        human_bytes(usage),
                        human_bytes(limit),
                        human_bytes(r.estimate),
                        human_bytes(self.cfg.margin_bytes()),
                        match r.workers.len() {
                            1 => String::new(),
                            n => format!(", for each of its {n} replicas"),
                        }
                    ),
                ));
            }
            let mut priority = 0;
            if let Some(mut job) = self.table.get(id)? {
                priority = job.priority;
                if usage > job.peak_bytes {
                    job.peak_bytes = usage;
                    self.table.put(&job)?;
                }
            }
            for (pool, usage) in r.pools.iter().zip(usages) {
                placed.push(Placed {
                    id,
                    owner: r.owner,
                    priority,
                    running_for_s: r.since.elapsed().as_secs(),
                    stopping: r.stop.is_some() || r.violation.is_some(),
                    pool: pool.clone(),
                    estimate: r.estimate,
                    usage,
                });
            }
        }
        self.said_memory_unreadable |= unreadable;
        for (id, why) in overran {
            self.on_violation(id, why)?;
        }
        let t = now();
        let mut queue = Vec::new();
        self.queued = 0;
        for job in self.table.active()? {
            if !matches!(job.state, JobState::Queued { .. }) {
                continue;
            }
            self.queued += 1;
            if !job.state.is_admissible(t) {
                continue;
            }
            // `after:`: not a candidate until every job it waits for is done.
            match self.gate(&job)? {
                deps::Gate::Open => {}
                deps::Gate::Wait(why) => {
                    self.set_reason(job.id, why)?;
                    continue;
                }
                deps::Gate::Fail(why) => {
                    self.fail(job.id, &why, false)?;
                    continue;
                }
            }
            if let Some(why) = outage.as_ref().filter(|_| job.wants_gpu) {
                self.set_reason(job.id, why.clone())?;
                continue;
            }
            let replicas = self.replicas_now(&job);
            queue.push(Candidate {
                id: job.id,
                priority: job.priority,
                estimate: job.estimate_bytes,
                wants_gpu: job.wants_gpu,
                owner: job.owner_uid,
                usage: self.ledger.usage(job.owner_uid, now_f64()),
                replicas,
            });
        }
        self.waiting_since
            .retain(|id, _| queue.iter().any(|c| c.id == *id));
        if let Some(why) = self.disk.low_for_jobs().map(str::to_string) {
            self.resources = Some(res);
            for c in queue {
                self.set_reason(c.id, format!("waiting for disk space: {why}"))?;
            }
            return Ok(());
        }
        let decisions = admission::plan(&queue, &placed, &res);
        let preempt = self
            .cfg
            .preemption
            .then(|| {
                let policy = admission::PreemptPolicy {
                    gap: self.cfg.preemption_gap,
                    min_run_s: self.cfg.preemption_min_run_s,
                };
                admission::preemption(&queue, &placed, &res, &decisions, policy)
            })
            .flatten();
        self.resources = Some(res);
        // With jobs of several users in line, a waiting job says where its
        // owner stands in fair share: once per owner per turn (a user
        // database lookup may leave the machine), not once per waiting job.
        let mut share: HashMap<u32, String> = HashMap::new();
        for c in &queue {
            share.entry(c.owner).or_insert_with(|| {
                format!(
                    "; fair share: {} used {} (half-life {})",
                    crate::identity::name_of(c.owner).unwrap_or_else(|| format!("uid {}", c.owner)),
                    crate::daemon::fair_share::describe(c.usage),
                    crate::daemon::fair_share::describe_half_life(self.cfg.half_life_s())
                )
            });
        }
        let owner_of: HashMap<u64, u32> = queue.iter().map(|c| (c.id, c.owner)).collect();
        if let Some((for_id, victims)) = &preempt {
            self.preempt(*for_id, victims);
        }
        let mut decisions = decisions;
        for d in decisions.iter_mut() {
            let Decision::Wait { id, reason } = d else {
                continue;
            };
            match &preempt {
                Some((for_id, victims)) if for_id == id => {
                    *reason = format!(
                        "waiting for {} to stop at a step boundary: preempted for it (they \
                         resume where they stopped)",
                        deps::describe_ids(victims)
                    );
                }
                _ if share.len() > 1 => {
                    if let Some(s) = owner_of.get(id).and_then(|o| share.get(o)) {
                        reason.push_str(s);
                    }
                }
                _ => {}
            }
        }
        for d in decisions {
            match d {
                Decision::Admit { id, pools } => self.start(id, pools)?,
                Decision::Wait { id, reason } => self.set_reason(id, reason)?,
                Decision::Never { id, reason } => self.fail(id, &reason, false)?,
            }
        }
        Ok(())
    }

    /// The replica counts job `job` may start with now, preferred first: its
    /// `parallel.replicas`, and with `elastic: true` fewer too once it has
    /// waited `elastic_wait_s` (counted from when this daemon first saw it
    /// waiting).
    fn replicas_now(&mut self, job: &JobRecord) -> Vec<usize> {
        let Some(&wanted) = job.replica_counts.first() else {
            return vec![1];
        };
        let since = *self
            .waiting_since
            .entry(job.id)
            .or_insert_with(Instant::now);
        if job.replica_counts.len() > 1
            && since.elapsed() >= Duration::from_secs(self.cfg.elastic_wait_s)
        {
            job.replica_counts.clone()
        } else {
            vec![wanted]
        }
    }

    /// Stop `victims` at their next step boundary for job `for_id`; each is
    /// queued again when its worker has stopped (see `on_exit`).
    fn preempt(&mut self, for_id: u64, victims: &[u64]) {
        for v in victims {
            if let Some(r) = self.running.get_mut(v) {
                tracing::info!("job {v}: preempted for job {for_id}");
                r.stop = Some(StopReason::Preempt { for_id });
                r.signal_all(libc::SIGTERM);
            }
        }
    }

    pub(super) fn set_reason(&mut self, id: u64, reason: String) -> Result<()> {
        if let Some(mut job) = self.table.get(id)? {
            if job.reason != reason {
                tracing::debug!("job {id}: {reason}");
                job.reason = reason;
                self.table.put(&job)?;
            }
        }
        Ok(())
    }

    /// Start job `id`'s workers, one per pool (a replicated job's leader
    /// in the first).
    pub(super) fn start(&mut self, id: u64, pools: Vec<Pool>) -> Result<()> {
        let Some(mut job) = self.table.get(id)? else {
            return Ok(());
        };
        let gpus: Vec<Option<crate::gpu::GpuInfo>> = pools
            .iter()
            .map(|pool| match pool {
                Pool::Gpu(uuid) => self
                    .resources
                    .as_ref()
                    .and_then(|r| r.gpus.iter().find(|g| &g.uuid == uuid).cloned()),
                Pool::Cpu => None,
            })
            .collect();
        // "GPU 0 MIG 1 (… MIG 1g.10gb) MIG-…": index, name and UUID.
        let place = match (pools.len(), &gpus[0]) {
            (1, Some(g)) => g.describe(),
            (1, None) => "CPU".to_string(),
            (n, Some(_)) => format!(
                "{} ({n} replicas)",
                gpus.iter()
                    .flatten()
                    .map(|g| g.describe())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            (n, None) => format!("CPU ({n} replicas)"),
        };
        tracing::debug!(
            "job {id}: admitted to {place} (estimate {}, reserved {}{})",
            human_bytes(job.estimate_bytes),
            human_bytes(self.reservation(job.estimate_bytes)),
            if pools.len() > 1 { " each" } else { "" }
        );
        job.apply(Transition::Admit {
            pool: pools[0].clone(),
        })?;
        job.attempts += 1;
        job.gpus = gpus.iter().flatten().map(|g| g.uuid.clone()).collect();
        job.gpu_labels = gpus.iter().flatten().map(|g| g.label()).collect();
        job.replicas = if pools.len() > 1 { pools.len() } else { 0 };
        self.table.put_durable(&job)?;
        self.waiting_since.remove(&id);

        let log = SeedLog::in_tree(self.db.open_tree(format!("seedlog/{id}"))?);
        let tx = self.tx.clone();
        let spawned = self.spawn_workers(&job, &gpus, &log, move |rank, ev| {
            let _ = tx.send(Event::Worker(id, rank, ev));
        });
        match spawned {
            Ok(Spawned {
                workers,
                steps_done,
                records,
                cgroup,
            }) => {
                let pids: Vec<String> = workers.iter().map(|w| w.pid().to_string()).collect();
                tracing::info!(
                    "job {id}: started worker {} on {} (estimate {})",
                    pids.join(", "),
                    place,
                    human_bytes(job.estimate_bytes)
                );
                job.apply(Transition::Start { since: now() })?;
                job.started_at.get_or_insert(now());
                job.steps_done = steps_done;
                job.reason = format!("running on {place}");
                // Its owner's clock runs from now (charged up to now first).
                self.charge_usage()?;
                if !self.running.values().any(|r| r.owner == job.owner_uid) {
                    self.ledger.touch(job.owner_uid, now_f64());
                }
                self.table.put_durable(&job)?;
                let n = workers.len();
                self.running.insert(
                    id,
                    Running {
                        workers,
                        pools,
                        exits: vec![None; n],
                        first_failure: None,
                        estimate: job.estimate_bytes,
                        stop: None,
                        settled: false,
                        log,
                        progress: VecDeque::new(),
                        job_error: None,
                        records,
                        next_step: steps_done,
                        steps_total: job.steps_total,
                        violation: None,
                        cgroup,
                        owner: job.owner_uid,
                        since: Instant::now(),
                    },
                );
            }
            Err(e) => self.crashed(job, &format!("could not start: {e:#}"))?,
        }
        Ok(())
    }

    /// Who a job's processes run as: its owner, when the daemon is root and the
    /// owner is not (a daemon of one user runs everything as that user).
    pub(super) fn identity_of(&self, uid: u32, gid: u32) -> Option<Identity> {
        (self.as_root && uid != 0).then(|| Identity::of(uid, gid))
    }

    /// Open the job's log and start its workers, one per entry of `gpus`
    /// (None: a CPU slot), its seed log so far streamed into the first's
    /// input.  Any failure here is the attempt's, not the daemon's.
    fn spawn_workers(
        &self,
        job: &JobRecord,
        gpus: &[Option<crate::gpu::GpuInfo>],
        log: &SeedLog,
        report: impl Fn(usize, WorkerEvent) + Clone + Send + 'static,
    ) -> Result<Spawned> {
        let run_as = self.identity_of(job.owner_uid, job.owner_gid);
        let dir = JobDir::prepare(&self.jobs, &self.dirs.jobs(), job.id, run_as.as_ref())?;
        let spec = dir.read_spec()?;
        // The daemon's own reading of its own copy: what records may come.
        let facts = JobFacts::read(&spec).map_err(anyhow::Error::msg)?;
        let (input, steps_done) = worker::input_file(&spec, log, job.steps_total)?;
        tracing::debug!(
            "job {}: {steps_done} logged steps go to its worker to replay, of {}",
            job.id,
            job.steps_total
        );
        log.truncate_from(steps_done)?;
        let mut worker_log = dir.log_for_append()?;
        let logged = worker_log.metadata().map_or(0, |m| m.len());
        let world = gpus.len();
        let places: Vec<String> = gpus
            .iter()
            .map(|g| g.as_ref().map_or("CPU".to_string(), |g| g.label()))
            .collect();
        writeln!(
            worker_log,
            "--- attempt {} on {}, from step {} ---",
            job.attempts,
            places.join(", "),
            steps_done
        )?;
        let on_cpu = gpus.iter().filter(|g| g.is_none()).count();
        let cgroup = self.job_cgroup(job, gpus.len(), on_cpu)?;
        let seats = if world > 1 {
            worker::ReplicaSeat::attempt(world)?
        } else {
            Vec::new()
        };
        let room = worker::MAX_LOG_BYTES.saturating_sub(logged);
        let mut workers = Vec::with_capacity(world);
        let mut input = Some(input);
        for (rank, gpu) in gpus.iter().enumerate() {
            let launch = Launch {
                exe: &self.exe,
                spec: &spec,
                out: &dir.run_path(),
                gpu: gpu.as_ref(),
                threads: self.cfg.cpu_threads(),
                snapshot_every: self.cfg.snapshot_every,
                estimate: job.estimate_bytes,
                run_as: run_as.clone(),
                cgroup: cgroup.as_ref(),
                replica: seats.get(rank),
            };
            // The leader gets the records and most of the log's room; a
            // follower only the job file (the leader sends it the records).
            let (input, sink) = match input.take() {
                Some(input) => (
                    input,
                    worker::LogSink {
                        file: worker_log.try_clone()?,
                        room: room - room / 4 * u64::from(world > 1),
                    },
                ),
                None => (
                    worker::job_only_input(&spec)?,
                    worker::LogSink {
                        file: worker_log.try_clone()?,
                        room: room / 4 / (world as u64 - 1),
                    },
                ),
            };
            let report = report.clone();
            match worker::spawn(&launch, input, sink, move |ev| report(rank, ev)) {
                Ok(handle) => workers.push(handle),
                Err(e) => {
                    // The replicas started so far would wait for this one.
                    for w in &workers {
                        signal(w, libc::SIGKILL);
                    }
                    return Err(e.context(format!("starting replica {rank} of {world}")));
                }
            }
        }
        Ok(Spawned {
            workers,
            steps_done,
            records: facts.records,
            cgroup,
        })
    }

    /// A new cgroup for the job's workers: `pids.max` always, `memory.max`
    /// (its reservation, estimate plus margin, per worker on the CPU) for
    /// a CPU job, where the kernel offers the controllers.  None without
    /// cgroup v2.
    fn job_cgroup(
        &self,
        job: &JobRecord,
        workers: usize,
        on_cpu: usize,
    ) -> Result<Option<JobCgroup>> {
        if !self.cgroups.is_available() {
            return Ok(None);
        }
        let limits = JobLimits {
            // Its CPU replicas share the cgroup, each with its reservation.
            memory_max: (on_cpu > 0).then(|| self.reservation(job.estimate_bytes) * on_cpu as u64),
            pids_max: Some(self.cfg.pids_per_job * workers as u64),
        };
        let cg = self
            .cgroups
            .create(&format!("job-{}", job.id), &limits)
            .context("making the job's cgroup")?;
        Ok(Some(cg))
    }

    /// What a job of `estimate` may use before it is stopped: the estimate
    /// plus the safety margin admission kept beside it.
    pub(super) fn reservation(&self, estimate: u64) -> u64 {
        estimate.saturating_add(self.cfg.margin_bytes())
    }

    // ---- workers --------------------------------------------------------

    /// A step record from a worker: the next step of its job, of the job's
    /// shape, with finite values, or the job is stopped (the owner can
    /// write into its worker's pipe; the database takes only what the job
    /// can log).
    pub(super) fn on_record(&mut self, id: u64, rec: crate::seedlog::StepRecord) -> Result<()> {
        let Some(r) = self.running.get_mut(&id) else {
            return Ok(());
        };
        if r.violation.is_some() {
            return Ok(());
        }
        if let Err(why) = r.records.check(&rec, r.next_step, r.steps_total) {
            return self.on_violation(id, why);
        }
        // Counted before it is stored: a record the database fails to keep
        // is recomputed on resume (see "Steps are pure"); the worker's next
        // one is still the step after it.
        r.next_step += 1;
        r.log.insert(&rec)?;
        crate::crash::point("worker-record-before-flush");
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

    /// Its worker's pipe carried what the worker does not send: stop the
    /// job's processes now; it fails with `why` once they have exited.
    pub(super) fn on_violation(&mut self, id: u64, why: String) -> Result<()> {
        let Some(r) = self.running.get_mut(&id) else {
            return Ok(());
        };
        if r.violation.is_none() {
            tracing::warn!("job {id}: stopping it: {why}");
            r.violation = Some(why);
            r.kill();
        }
        Ok(())
    }

    /// A worker has ended: its job's next state, whatever the database can
    /// take.  On a full disk the job database may already have failed (sled's
    /// own flush met ENOSPC), and then the usage charge fails too; the exit
    /// is still recorded (in the table's index, written again on reopen),
    /// or its job would show `running` with no worker for good.
    ///
    /// A replicated job ends when all its workers have.  The first to end
    /// badly stops the others (SIGTERM: each stops after the step its
    /// exchange is at; a replica's exchange with a dead one fails at once),
    /// and its status is the job's: a replica killed makes the job a crashed
    /// attempt, retried and resumed, not the others' errors about it.
    pub(super) fn on_exit(&mut self, id: u64, rank: usize, status: ExitStatus) -> Result<()> {
        let charged = self.charge_usage();
        let Some(r) = self.running.get_mut(&id) else {
            return charged;
        };
        if let Some(exit) = r.exits.get_mut(rank) {
            *exit = Some(status);
        }
        if !status.success() && r.first_failure.is_none() {
            r.first_failure = Some((rank, status));
            if r.exits.iter().any(Option::is_none) {
                if r.stop.is_none() {
                    tracing::warn!(
                        "job {id}: replica {rank} ended ({}): stopping the others",
                        how_it_ended(status)
                    );
                }
                r.signal_all(libc::SIGTERM);
            }
        }
        if r.exits.iter().any(Option::is_none) {
            return charged;
        }
        let r = self.running.remove(&id).expect("looked up above");
        // The job's own error (the leader says so) wins over a follower
        // that failed because of it.
        let status = match (r.exits[0], r.first_failure) {
            (Some(leader), _) if leader.code() == Some(i32::from(worker::JOB_ERROR_EXIT)) => leader,
            (_, Some((_, first))) => first,
            (leader, None) => leader.expect("every worker has ended"),
        };
        let recorded = self.record_exit(id, r, status);
        recorded.and(charged)
    }

    fn record_exit(&mut self, id: u64, mut r: Running, status: ExitStatus) -> Result<()> {
        if let Some(cg) = r.cgroup.take() {
            // Whatever the worker left behind (a child it started with
            // setsid) ends with it.
            if r.violation.is_none() && !status.success() && cg.oom_kills().unwrap_or(0) > 0 {
                r.violation = Some(format!(
                    "it went past its memory limit of {} (its estimate plus the margin) and the \
                     kernel stopped it",
                    human_bytes(self.reservation(r.estimate))
                ));
            }
            if let Err(e) = cg.remove(Duration::from_secs(2)) {
                tracing::warn!("job {id}: removing {}: {e:#}", cg.path().display());
            }
        }
        if let Err(e) = r.log.flush() {
            // The exit is still recorded (in memory at least: see
            // `JobTable::put`); the records lost are recomputed on resume.
            tracing::error!("job {id}: {e:#}");
            self.db_failed = true;
        }
        let Some(mut job) = self.table.get(id)? else {
            return Ok(());
        };
        match r.log.contiguous_len() {
            Ok(n) => job.steps_done = n,
            // The steps counted as they came stand (a resume reads the log).
            Err(e) => {
                tracing::error!("job {id}: reading its step log: {e:#}");
                self.db_failed = true;
            }
        }
        let code = status.code();
        if !status.success() {
            // Measure now: a worker that filled the disk has just failed on it.
            self.disk.check();
        }
        if let Some(why) = r.violation {
            // Not retried: the owner's own processes broke the protocol.
            job.failures += 1;
            self.table.put(&job)?;
            return self.fail(id, &why, true);
        }
        if status.success() {
            job.apply(Transition::Finish {
                at: now(),
                result: JobDir::open(&self.jobs, &self.dirs.jobs(), id)
                    .ok()
                    .and_then(|d| read_summary(&d)),
            })?;
            job.reason = "finished".into();
            tracing::info!("job {id}: done");
            return self.table.put_durable(&job);
        }
        match r.stop {
            Some(StopReason::Cancel { by_uid }) => {
                job.apply(Transition::Cancel { at: now(), by_uid })?;
                job.reason = format!("cancelled at step {}", job.steps_done);
                tracing::info!("job {id}: cancelled");
                self.table.put_durable(&job)
            }
            Some(StopReason::Restart { by_uid }) => {
                job.apply(Transition::Requeue)?;
                job.reason = format!(
                    "restarted by uid {by_uid}; resumes from step {}",
                    job.steps_done
                );
                tracing::info!("job {id}: {}", job.reason);
                self.schedule_due = true;
                self.table.put_durable(&job)
            }
            Some(StopReason::Preempt { for_id }) if self.stopping.is_none() => {
                // Not a failure and not a retry: it resumes bit-identically.
                job.apply(Transition::Requeue)?;
                job.preemptions += 1;
                job.reason = format!(
                    "preempted at step {} for job {for_id}; resumes from there",
                    job.steps_done
                );
                tracing::info!("job {id}: {}", job.reason);
                self.schedule_due = true;
                self.table.put_durable(&job)
            }
            Some(StopReason::Shutdown | StopReason::Preempt { .. }) if self.stopping.is_some() => {
                job.apply(Transition::Preempt)?;
                job.reason = format!("preempted at step {} by a daemon stop", job.steps_done);
                tracing::info!("job {id}: preempted at step {}", job.steps_done);
                self.table.put_durable(&job)
            }
            _ if self.disk.low_for_jobs().is_some() => {
                // Not the job's fault: it resumes once there is room, and
                // this attempt does not count against its retries.
                job.apply(Transition::Retry { not_before: now() })?;
                job.reason = format!(
                    "stopped at step {} by a full disk; resumes when space returns",
                    job.steps_done
                );
                tracing::warn!("job {id}: {}", job.reason);
                self.table.put_durable(&job)
            }
            _ if code == Some(i32::from(worker::JOB_ERROR_EXIT)) => {
                // Its own error: a retry would meet it again.
                job.failures += 1;
                self.table.put(&job)?;
                let reason = r.job_error.unwrap_or_else(|| {
                    format!("the job failed without saying why (see `mezod logs {id}`)")
                });
                self.fail(id, &reason, true)
            }
            _ => {
                let how = match r.first_failure {
                    Some((rank, _)) if r.workers.len() > 1 => {
                        format!("replica {rank}'s {}", how_it_ended(status))
                    }
                    _ => how_it_ended(status),
                };
                self.crashed(job, &how)
            }
        }
    }

    /// A worker failed: retry with backoff up to the limit, then fail the job.
    pub(super) fn crashed(&mut self, mut job: JobRecord, how: &str) -> Result<()> {
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
        job.apply(Transition::Retry {
            not_before: now() + backoff.ceil() as u64,
        })?;
        job.reason = format!(
            "{how}; retry {} of {} in {:.0}s (see `mezod logs {}`)",
            job.failures, self.cfg.retry_limit, backoff, job.id
        );
        tracing::warn!("job {}: {}", job.id, job.reason);
        self.table.put_durable(&job)
    }

    /// Mark a job failed and write its error file (with the log's tail).
    pub(super) fn fail(&mut self, id: u64, reason: &str, with_log: bool) -> Result<()> {
        let Some(mut job) = self.table.get(id)? else {
            return Ok(());
        };
        job.apply(Transition::Fail { at: now() })?;
        job.reason = reason.to_string();
        let dir = JobDir::open(&self.jobs, &self.dirs.jobs(), id)?;
        let mut text = format!("job {id} ({}) failed: {reason}\n", job.name);
        if with_log {
            text.push_str("\nlast lines of its log:\n");
            for l in dir.log_tail(ERROR_TAIL_LINES) {
                text.push_str(&l);
                text.push('\n');
            }
        }
        if let Err(e) = dir.write_error(&text) {
            tracing::error!("job {id}: could not write its error file: {e}");
        }
        tracing::error!("job {id}: failed: {reason}");
        self.table.put_durable(&job)
    }
}

/// Signal a worker through its handle; one that has already exited is fine
/// (its exit event is on its way).
pub(super) fn signal(worker: &worker::WorkerHandle, sig: i32) {
    if let Err(e) = worker.signal(sig) {
        if e.raw_os_error() != Some(libc::ESRCH) {
            tracing::warn!("signalling worker {}: {e}", worker.pid());
        }
    }
}

/// The summary of a finished run: dev metric, test metric and its paired
/// comparison with the base model, memory, time.
pub(super) fn read_summary(dir: &JobDir) -> Option<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_slice(&dir.read_result()?).ok()?;
    let keep = [
        "metric",
        "zero_shot",
        "best",
        "best_step",
        "exported",
        "final_metric",
        "test_metric",
        "zero_shot_test",
        "test_paired",
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

/// A worker's end in words: "worker exited with status 1", "worker was
/// killed by signal 9".
fn how_it_ended(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("worker exited with status {c}"),
        (None, Some(s)) => format!("worker was killed by signal {s}"),
        _ => "worker ended".into(),
    }
}
