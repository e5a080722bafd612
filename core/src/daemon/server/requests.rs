//! Control requests: the answers to `mezod status | cancel | logs | submit`.

use super::*;

impl Daemon {
    // ---- control requests ----------------------------------------------

    pub(super) fn answer(&mut self, request: Request, peer: control::Peer) -> Result<Response> {
        Ok(match request {
            Request::Hello => Response::Hello {
                spool: self.dirs.spool.clone(),
                version: env!("CARGO_PKG_VERSION").into(),
            },
            Request::Status {
                id,
                finished,
                states,
                owner,
            } => {
                let filter = StatusFilter::new(states, owner)?;
                Response::Status(self.report(id, finished, &filter, peer)?)
            }
            Request::Show { id } => Response::Job(Box::new(self.show(id, peer)?)),
            Request::Cancel { id } => self.cancel(id, peer)?,
            Request::Restart { id } => self.restart(id, peer)?,
            Request::Priority { id, priority } => self.set_priority(id, priority, peer)?,
            Request::Clean { ids, purge } => self.clean(ids, purge, peer)?,
            Request::Logs {
                id,
                offset,
                tail: Some(lines),
            } => {
                let job = self.owned_job(id, peer)?;
                let dir = JobDir::open(&self.jobs, &self.dirs.jobs(), id)?;
                let _ = offset;
                let mut data = dir.log_tail(lines).join("\n");
                if !data.is_empty() {
                    data.push('\n');
                }
                Response::Logs {
                    offset: dir.log_len(),
                    finished: job.state.is_final(),
                    data,
                }
            }
            Request::Logs { id, offset, .. } => {
                let job = self.owned_job(id, peer)?;
                let data =
                    JobDir::open(&self.jobs, &self.dirs.jobs(), id)?.read_log(offset, 1 << 16)?;
                let offset = offset + data.len() as u64;
                Response::Logs {
                    finished: job.state.is_final() && data.is_empty(),
                    data: String::from_utf8_lossy(&data).into_owned(),
                    offset,
                }
            }
            Request::Lookup { name } => {
                // Only the file's owner (or root) hears about it; to anyone
                // else every name is pending, so a name says nothing.
                let found = self.table.find_name(&name)?;
                Response::Lookup(match found {
                    Some(j) if peer.may_manage(j.owner_uid) => Lookup::Accepted { id: j.id },
                    Some(_) => Lookup::Pending,
                    None => match self.rejections.get(name.as_bytes())? {
                        Some(record) if record.len() >= 4 => {
                            let owner = u32::from_be_bytes(record[..4].try_into()?);
                            if peer.may_manage(owner) {
                                Lookup::Rejected {
                                    reason: String::from_utf8_lossy(&record[4..]).into_owned(),
                                }
                            } else {
                                Lookup::Pending
                            }
                        }
                        _ => Lookup::Pending,
                    },
                })
            }
        })
    }

    pub(super) fn owned_job(&self, id: u64, peer: control::Peer) -> Result<JobRecord> {
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

    pub(super) fn cancel(&mut self, id: u64, peer: control::Peer) -> Result<Response> {
        let mut job = self.owned_job(id, peer)?;
        if job.state.is_final() {
            bail!("job {id} has already ended ({})", job.state);
        }
        if let Some(r) = self.running.get_mut(&id) {
            r.stop = Some(StopReason::Cancel { by_uid: peer.uid });
            r.signal_all(libc::SIGTERM);
            return Ok(Response::Cancelled {
                id,
                state: "cancelling (the worker stops at its next step boundary)".into(),
            });
        }
        job.apply(Transition::Cancel {
            at: now(),
            by_uid: peer.uid,
        })?;
        job.reason = format!("cancelled by uid {}", peer.uid);
        self.table.put_durable(&job)?;
        Ok(Response::Cancelled {
            id,
            state: "cancelled".into(),
        })
    }

    /// A job's new priority.  Root and members of the admin group may set
    /// any; an owner may only lower its own job's (users cannot raise a
    /// priority: see `user_priority_max`).  It reorders the queue at the
    /// next admission turn; a running job keeps running.
    pub(super) fn set_priority(
        &mut self,
        id: u64,
        priority: i32,
        peer: control::Peer,
    ) -> Result<Response> {
        let mut job = self.owned_job_or_admin(id, peer)?;
        if job.state.is_final() {
            bail!("job {id} has already ended ({})", job.state);
        }
        let admin = peer.uid == 0 || self.is_admin(peer.uid);
        if !admin && priority > job.priority {
            bail!(
                "only root{} may raise a job's priority (job {id} is at {}); you may lower it",
                self.cfg
                    .admin_group
                    .as_deref()
                    .map_or(String::new(), |g| format!(" or group {g}")),
                job.priority
            );
        }
        job.priority = priority;
        self.table.put_durable(&job)?;
        self.schedule_due = true;
        tracing::info!("job {id}: priority {priority} (set by uid {})", peer.uid);
        Ok(Response::Prioritized { id, priority })
    }

    /// A job its owner, root or an admin may act on.
    fn owned_job_or_admin(&self, id: u64, peer: control::Peer) -> Result<JobRecord> {
        if peer.uid != 0 && self.is_admin(peer.uid) {
            return self.table.get(id)?.with_context(|| format!("no job {id}"));
        }
        self.owned_job(id, peer)
    }

    /// Queue a failed or cancelled job again under its id: its worker
    /// resumes from the seed log and run folder it left.
    pub(super) fn restart(&mut self, id: u64, peer: control::Peer) -> Result<Response> {
        let mut job = self.owned_job(id, peer)?;
        // Root's cancel is root's decision: the owner cannot undo it.
        let cancelled_by = match (&job.state, self.running.get(&id).and_then(|r| r.stop)) {
            (_, Some(StopReason::Cancel { by_uid })) => Some(by_uid),
            (JobState::Cancelled { by_uid, .. }, _) => Some(*by_uid),
            _ => None,
        };
        if let Some(by) = cancelled_by.filter(|&by| by != job.owner_uid && peer.uid != 0) {
            bail!("job {id} was cancelled by uid {by} (not its owner); only root may restart it");
        }
        if let Some(r) = self.running.get_mut(&id) {
            if matches!(r.stop, Some(StopReason::Cancel { .. })) {
                // Cancelled a moment ago and still stopping: it is queued
                // again as soon as its worker has stopped.
                r.stop = Some(StopReason::Restart { by_uid: peer.uid });
                return Ok(Response::Restarted {
                    id,
                    from_step: job.steps_done,
                });
            }
        }
        job.apply(Transition::Restart)
            .map_err(|e| anyhow::anyhow!("job {id}: {e} (only failed or cancelled jobs are)"))?;
        let log = SeedLog::in_tree(self.db.open_tree(format!("seedlog/{id}"))?);
        job.steps_done = log.contiguous_len()?.min(job.steps_total);
        job.failures = 0;
        job.reason = format!(
            "restarted by uid {}; resumes from step {}",
            peer.uid, job.steps_done
        );
        JobDir::open(&self.jobs, &self.dirs.jobs(), id)?.remove_error()?;
        self.table.put_durable(&job)?;
        self.schedule_due = true;
        tracing::info!("job {id}: {}", job.reason);
        Ok(Response::Restarted {
            id,
            from_step: job.steps_done,
        })
    }

    /// Forget ended jobs: `ids`, or (none named) every ended job of the
    /// asker's own — root's too: other users' jobs go only when named.
    /// Their seed logs go; their folders stay unless `purge`, and a job whose
    /// folder cannot be removed is kept (and named in the error).
    pub(super) fn clean(
        &mut self,
        ids: Vec<u64>,
        purge: bool,
        peer: control::Peer,
    ) -> Result<Response> {
        let jobs = if ids.is_empty() {
            let mine = |j: &JobRecord| j.owner_uid == peer.uid;
            self.table
                .recent_finished_matching(usize::MAX, Some(&mine))?
                .0
        } else {
            let mut jobs = Vec::new();
            for id in ids {
                let job = self.owned_job(id, peer)?;
                if !job.state.is_final() {
                    bail!(
                        "job {id} is {}: only ended jobs are cleaned (cancel it first)",
                        job.state
                    );
                }
                jobs.push(job);
            }
            jobs
        };
        let mut cleaned = Vec::new();
        let mut kept = Vec::new();
        for job in jobs {
            if purge {
                // First the folder, then the record: a folder that stays
                // keeps its record, so a later clean can still reach it.
                // std's remove_dir_all opens each folder without following
                // links (openat, O_NOFOLLOW), so a link the owner leaves in
                // run/ is removed, never followed.
                let path = self.dirs.job(job.id);
                if let Err(e) = std::fs::remove_dir_all(&path) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        tracing::error!("job {}: removing {}: {e}", job.id, path.display());
                        kept.push(format!("job {}: removing its folder: {e}", job.id));
                        continue;
                    }
                }
            }
            self.table.remove(&job)?;
            self.db.drop_tree(format!("seedlog/{}", job.id))?;
            cleaned.push(job.id);
        }
        self.table.flush()?;
        if !kept.is_empty() {
            bail!(
                "{} (cleaned: {})",
                kept.join("; "),
                if cleaned.is_empty() {
                    "none".to_string()
                } else {
                    cleaned
                        .iter()
                        .map(u64::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            );
        }
        cleaned.sort_unstable();
        if !cleaned.is_empty() {
            let ids: Vec<String> = cleaned.iter().map(u64::to_string).collect();
            tracing::info!("forgot jobs {} for uid {}", ids.join(", "), peer.uid);
        }
        Ok(Response::Cleaned {
            ids: cleaned,
            purged: purge,
        })
    }

    /// A job as `peer` may see it: another user sees its state, owner,
    /// name and progress, never its results, losses or memory figures, nor
    /// why it failed (a job's error may quote its paths and data).
    fn view(&self, mut job: JobRecord, peer: control::Peer) -> JobView {
        if !peer.may_manage(job.owner_uid) {
            if matches!(job.state, JobState::Failed { .. }) {
                job.reason = "failed (its owner sees why)".into();
            }
            if let JobState::Done { result, .. } = &mut job.state {
                *result = None;
            }
            job.summary.clear();
            job.last_loss = None;
            job.peak_bytes = 0;
        }
        let rate = self.running.get(&job.id).and_then(Running::steps_per_s);
        JobView {
            eta_s: rate.map(|r| job.steps_total.saturating_sub(job.steps_done) as f64 / r),
            steps_per_s: rate,
            job,
        }
    }

    /// One job in detail; its files and error to its owner and root only.
    pub(super) fn show(&self, id: u64, peer: control::Peer) -> Result<JobDetail> {
        let job = self
            .table
            .get(id)?
            .with_context(|| format!("no job {id}"))?;
        let mine = peer.may_manage(job.owner_uid);
        let error_tail = match (&job.state, mine) {
            (JobState::Failed { .. }, true) => JobDir::open(&self.jobs, &self.dirs.jobs(), id)
                .map(|d| d.error_tail(ERROR_TAIL_LINES + 5))
                .unwrap_or_default(),
            _ => vec![],
        };
        let dir = self.dirs.job(id);
        Ok(JobDetail {
            job_file: mine.then(|| dir.join(job_dir::SPEC)),
            run_dir: mine.then(|| dir.join(job_dir::RUN)),
            error_tail,
            view: self.view(job, peer),
        })
    }

    /// One job, or the active jobs and the newest `finished` ended ones
    /// that pass `filter`: the answer's size follows the active jobs, not
    /// the table's history.
    pub(super) fn report(
        &mut self,
        id: Option<u64>,
        finished: Option<usize>,
        filter: &StatusFilter,
        peer: control::Peer,
    ) -> Result<StatusReport> {
        let mut finished_not_shown = 0;
        let jobs = match id {
            Some(id) => vec![self
                .table
                .get(id)?
                .with_context(|| format!("no job {id}"))?],
            None => {
                let mut jobs: Vec<JobRecord> = self
                    .table
                    .active()?
                    .into_iter()
                    .filter(|j| filter.keeps(j))
                    .collect();
                let keep = |j: &JobRecord| filter.keeps(j);
                let (recent, more) = self.table.recent_finished_matching(
                    finished.unwrap_or(control::DEFAULT_FINISHED_SHOWN),
                    (!filter.is_empty()).then_some(&keep as &dyn Fn(&JobRecord) -> bool),
                )?;
                finished_not_shown = more;
                jobs.extend(recent);
                jobs.sort_by_key(|j| j.id);
                jobs
            }
        };
        let views = jobs.into_iter().map(|job| self.view(job, peer)).collect();
        let (mode, pools) = match &self.resources {
            Some(res) => {
                let count = |p: &Pool| self.running.values().map(|r| r.holds(p)).sum();
                let mut pools: Vec<PoolView> = res
                    .gpus
                    .iter()
                    .map(|g| PoolView {
                        name: g.describe(),
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
        let mode = match self.disk.low() {
            Some(why) => format!("{mode}; DISK FULL: {why}; intake and new starts paused"),
            None => mode,
        };
        let usage = self.ledger.all(now_f64());
        let total: f64 = usage.iter().map(|(_, u)| u).sum();
        Ok(StatusReport {
            mode,
            pools,
            jobs: views,
            finished_not_shown,
            users: usage
                .into_iter()
                .filter(|(_, u)| *u >= 1.0)
                .map(|(uid, u)| control::UserUsage {
                    uid,
                    device_seconds: u,
                    share: if total > 0.0 { u / total } else { 0.0 },
                })
                .collect(),
            half_life_h: self.cfg.fair_share_half_life_h,
        })
    }
}

/// Which jobs a `Status` request lists.
#[derive(Debug, Default)]
pub(super) struct StatusFilter {
    states: Vec<String>,
    owner: Option<u32>,
}

impl StatusFilter {
    pub(super) fn new(states: Vec<String>, owner: Option<u32>) -> Result<Self> {
        if let Some(bad) = states
            .iter()
            .find(|s| !control::STATES.contains(&s.as_str()))
        {
            bail!(
                "no state {bad:?}: the states are {}",
                control::STATES.join(", ")
            );
        }
        Ok(Self { states, owner })
    }

    fn is_empty(&self) -> bool {
        self.states.is_empty() && self.owner.is_none()
    }

    fn keeps(&self, job: &JobRecord) -> bool {
        (self.states.is_empty() || self.states.iter().any(|s| s == job.state.name()))
            && self.owner.is_none_or(|uid| uid == job.owner_uid)
    }
}
