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
            Request::Status { id, finished } => Response::Status(self.report(id, finished)?),
            Request::Cancel { id } => self.cancel(id, peer)?,
            Request::Logs { id, offset } => {
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
            signal(&r.worker, libc::SIGTERM);
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

    /// One job, or the active jobs and the newest `finished` ended ones: the
    /// answer's size follows the active jobs, not the table's history.
    pub(super) fn report(
        &mut self,
        id: Option<u64>,
        finished: Option<usize>,
    ) -> Result<StatusReport> {
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
        let mode = match self.disk.low() {
            Some(why) => format!("{mode}; DISK FULL: {why}; intake and new starts paused"),
            None => mode,
        };
        Ok(StatusReport {
            mode,
            pools,
            jobs: views,
            finished_not_shown,
        })
    }
}
