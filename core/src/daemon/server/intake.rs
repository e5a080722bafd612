//! Spool intake: every file in `new/` becomes one queued job or one rejection.

use super::*;

/// Checks under way at once (each is a process); further files wait for one to end.
const MAX_CHECKS: usize = 4;
/// Checks of one user's files under way at once: one user's slow files
/// never hold every check while another user's file waits.
const MAX_CHECKS_PER_USER: usize = 2;

impl Daemon {
    // ---- spool intake ---------------------------------------------------

    /// Take every file in `new/`: read it (bounded, never through a link),
    /// read its facts as the daemon, and start its check as its owner.
    /// Files are taken round-robin over their owners (one user's backlog of
    /// files does not hold up another's), each user with at most
    /// [`MAX_CHECKS_PER_USER`] checks at once.  A file that cannot be read,
    /// parsed or allowed is rejected; a failure of the daemon's own (a full
    /// disk, say) leaves the file where it is for the next scan and is only
    /// logged.
    pub(super) fn intake(&mut self) -> Result<()> {
        self.intake_backlog = false;
        if self.disk.low().is_some() {
            // Files wait in new/: nothing can be recorded or moved safely.
            return Ok(());
        }
        let names = self.spool.list()?;
        let owners: Vec<Option<u32>> = names.iter().map(|n| self.spool.owner(n)).collect();
        let mut active = self.active_jobs_by_owner()?;
        for i in round_robin(&owners) {
            let name = names[i].clone();
            if self.checking.contains_key(&name) {
                continue;
            }
            if let Some(claim) = self.claims.get(name.as_bytes())? {
                // Recorded before a crash, not yet moved: finish the move only.
                let id = u64::from_be_bytes(claim[..8].try_into()?);
                let inode = u64::from_be_bytes(claim[8..16].try_into()?);
                if self.spool.inode(&name) == Some(inode) {
                    // One file the daemon cannot move must not stop intake
                    // (or the daemon's start): log it and go on.
                    match self.spool.archive(&name, id) {
                        Ok(()) => {
                            self.claims.remove(name.as_bytes())?;
                        }
                        Err(e) => tracing::error!("job {id}: could not move {name} to cur/: {e:#}"),
                    }
                    continue;
                }
                self.claims.remove(name.as_bytes())?;
            }
            if self.checking.len() >= MAX_CHECKS {
                // The rest wait for a check to end.
                self.intake_backlog = true;
                break;
            }
            let owner_checks = owners[i].map_or(0, |uid| {
                self.checking.values().filter(|d| d.uid == uid).count()
            });
            if owner_checks >= MAX_CHECKS_PER_USER {
                self.intake_backlog = true;
                continue;
            }
            let dropped = match self.spool.read(&name) {
                Ok(d) => d,
                // Taken away since the listing: nothing to do.
                Err(_) if self.spool.inode(&name).is_none() => continue,
                Err(why) => {
                    self.reject_unless_fresh(&name, &why);
                    continue;
                }
            };
            // The daemon's own reading first: a file it cannot parse needs
            // no check, and what it parses is what the job will be.
            let facts = match JobFacts::read(&dropped.text) {
                Ok(f) => f,
                Err(why) => {
                    self.reject_unless_fresh(&name, &why);
                    continue;
                }
            };
            let waiting = active.entry(dropped.uid).or_default();
            if let Err(why) = self.allowed(dropped.uid, &facts, *waiting) {
                self.reject_unless_fresh(&name, &why);
                continue;
            }
            // Before the check, so that a wrong `after:` costs no check
            // (resolved again when the check ends: see `on_checked`).
            match self.resolve_after(dropped.uid, &facts.after) {
                Ok(Ok(_)) => {}
                Ok(Err(why)) => {
                    self.reject_unless_fresh(&name, &why);
                    continue;
                }
                Err(e) => {
                    tracing::error!("could not look up the jobs {name} waits for: {e:#}");
                    continue;
                }
            }
            *waiting += 1;
            let run_as = self.identity_of(dropped.uid, dropped.gid);
            tracing::debug!(
                "checking {name} as uid {} ({} bytes)",
                dropped.uid,
                dropped.text.len()
            );
            let tx = self.tx.clone();
            let for_event = name.clone();
            let started = self
                .checker
                .start(dropped.text.clone(), run_as, move |verdict| {
                    let _ = tx.send(Event::Checked {
                        name: for_event,
                        verdict,
                    });
                });
            match started {
                Ok(()) => {
                    self.checking.insert(name, dropped);
                }
                Err(e) => tracing::error!("could not check {name} (will retry): {e:#}"),
            }
        }
        Ok(())
    }

    /// A check has ended: queue the job or reject the file.
    pub(super) fn on_checked(&mut self, name: String, verdict: Verdict) -> Result<()> {
        let Some(dropped) = self.checking.remove(&name) else {
            return Ok(());
        };
        if self.intake_backlog {
            let _ = self.tx.send(Event::SpoolChanged);
        }
        if self.spool.inode(&name) != Some(dropped.inode) {
            // Replaced (or taken away) while it was checked: the new file
            // gets its own check on the next pass.
            let _ = self.tx.send(Event::SpoolChanged);
            return Ok(());
        }
        // Parsed again: the text is the one read before the check, and the
        // facts are small (the check may take a minute; keeping them would
        // double what waiting files hold).
        let facts = match JobFacts::read(&dropped.text) {
            Ok(f) => f,
            Err(why) => {
                self.reject_unless_fresh(&name, &why);
                return Ok(());
            }
        };
        match verdict {
            Verdict::Accepted(accepted) => {
                // Resolved now, against the jobs that exist as it is
                // recorded (one may have been cleaned during the check).
                let after = match self.resolve_after(dropped.uid, &facts.after)? {
                    Ok(ids) => ids,
                    Err(why) => {
                        self.reject_unless_fresh(&name, &why);
                        return Ok(());
                    }
                };
                crate::crash::point("intake-before-record");
                match self.record(&name, dropped, facts, accepted, after) {
                    Ok(id) => tracing::info!("job {id}: accepted {name}"),
                    Err(e) => tracing::error!("could not record {name} (will retry): {e:#}"),
                }
            }
            Verdict::Rejected { why } => self.reject_unless_fresh(&name, &why),
        }
        Ok(())
    }

    /// Each user's jobs waiting or running, and files under check.
    fn active_jobs_by_owner(&self) -> Result<HashMap<u32, usize>> {
        let mut n = HashMap::new();
        for job in self.table.active()? {
            *n.entry(job.owner_uid).or_default() += 1;
        }
        for d in self.checking.values() {
            *n.entry(d.uid).or_default() += 1;
        }
        Ok(n)
    }

    /// Whether `uid` may queue a job with `facts`, having `waiting` jobs:
    /// the config's priority ceiling (root and the admin group may go
    /// above it) and jobs per user (root is never limited).  `Err` says why not.
    fn allowed(&self, uid: u32, facts: &JobFacts, waiting: usize) -> Result<(), String> {
        if uid == 0 || !self.as_root {
            return Ok(());
        }
        let ceiling = self.cfg.user_priority_max;
        if facts.priority > ceiling && !self.is_admin(uid) {
            return Err(format!(
                "priority {} is above {ceiling}, the highest a user may ask for; an admin \
                 (root{}) can raise a job's priority",
                facts.priority,
                self.cfg
                    .admin_group
                    .as_deref()
                    .map_or(String::new(), |g| format!(" or group {g}"))
            ));
        }
        if waiting >= self.cfg.jobs_per_user {
            return Err(format!(
                "you have {waiting} jobs waiting or running, the most one user may have \
                 (jobs_per_user in the daemon's config); submit it again once some have ended"
            ));
        }
        Ok(())
    }

    /// Is `uid` in the config's admin group (by the user database)?
    pub(super) fn is_admin(&self, uid: u32) -> bool {
        let Some(gid) = self
            .cfg
            .admin_group
            .as_deref()
            .and_then(crate::identity::gid_named)
        else {
            return false;
        };
        Identity::of(uid, gid).groups.contains(&gid)
    }

    /// Reject `name` with `why`, unless it changed in the last moments: a
    /// file copied in without `rename()` may be caught half-written, so it
    /// gets time to finish and is looked at again.
    fn reject_unless_fresh(&mut self, name: &str, why: &str) {
        if self.spool.is_fresh(name, SETTLE_SECS) {
            self.recheck_at = Some(Instant::now() + Duration::from_secs_f64(SETTLE_SECS));
            return;
        }
        tracing::warn!("rejected {name}: {why}");
        // Whoever made the entry in new/ owns the verdict (and alone may ask for it).
        let owner = self.spool.owner(name);
        match self.spool.reject(name, why) {
            Ok((_, text)) => {
                let mut record = owner.unwrap_or(0).to_be_bytes().to_vec();
                record.extend_from_slice(text.as_bytes());
                if let Err(e) = self.rejections.insert(name.as_bytes(), record) {
                    tracing::error!("could not record the rejection of {name}: {e}");
                }
            }
            Err(e) => tracing::error!("could not move {name} to rejected/: {e:#}"),
        }
    }

    /// Record a checked file as a queued job, then move it to `cur/`.
    /// The queue's facts (priority, steps, GPU, name, summary) are the
    /// daemon's own reading of the file; the check, which runs as the owner
    /// and may have been rewritten by them, gives only the estimate.
    /// `after` is the file's `after:` resolved to ids (`resolve_after`).
    pub(super) fn record(
        &mut self,
        name: &str,
        dropped: Dropped,
        facts: JobFacts,
        accepted: Accepted,
        after: Vec<u64>,
    ) -> Result<u64> {
        let id = self.table.next_id()?;
        let owner = self.identity_of(dropped.uid, dropped.gid);
        let dir = JobDir::prepare(&self.jobs, &self.dirs.jobs(), id, owner.as_ref())?;
        dir.write_spec(&dropped.text)?;
        let job = JobRecord {
            id,
            name: facts
                .name
                .as_deref()
                .map(crate::spec::as_job_name)
                .unwrap_or_else(|| {
                    let stem = std::path::Path::new(name).file_stem().unwrap_or_default();
                    crate::spec::as_job_name(&stem.to_string_lossy())
                }),
            spool_name: name.to_string(),
            summary: facts.summary,
            owner_uid: dropped.uid,
            owner_gid: dropped.gid,
            state: JobState::Queued { not_before: None },
            priority: facts.priority,
            reason: if after.is_empty() {
                "queued".into()
            } else {
                format!("queued after {}", deps::describe_ids(&after))
            },
            after,
            wants_gpu: facts.wants_gpu,
            steps_total: facts.steps,
            steps_done: 0,
            last_loss: None,
            submitted_at: now(),
            started_at: None,
            attempts: 0,
            failures: 0,
            gpus: vec![],
            gpu_labels: vec![],
            estimate_bytes: accepted.estimate_bytes,
            peak_bytes: 0,
            preemptions: 0,
            replica_counts: facts.replica_counts,
            replicas: 0,
        };
        // The record and its claim become durable together, before the file moves.
        let mut claim = id.to_be_bytes().to_vec();
        claim.extend_from_slice(&dropped.inode.to_be_bytes());
        self.claims.insert(name.as_bytes(), claim)?;
        self.table.put_durable(&job)?;
        crate::crash::point("record-before-move");
        self.spool.archive(name, id)?;
        crate::crash::point("record-after-move");
        self.claims.remove(name.as_bytes())?;
        Ok(id)
    }
}

/// The order to take files in: the first file of each owner, then the
/// second of each, and so on (each owner's files in name order).
fn round_robin(owners: &[Option<u32>]) -> Vec<usize> {
    let mut queues: Vec<(Option<u32>, VecDeque<usize>)> = Vec::new();
    for (i, o) in owners.iter().enumerate() {
        match queues.iter_mut().find(|(q, _)| q == o) {
            Some((_, files)) => files.push_back(i),
            None => queues.push((*o, VecDeque::from([i]))),
        }
    }
    let mut order = Vec::with_capacity(owners.len());
    while order.len() < owners.len() {
        for (_, files) in queues.iter_mut() {
            order.extend(files.pop_front());
        }
    }
    order
}

#[cfg(test)]
mod tests {
    #[test]
    fn files_are_taken_round_robin_over_their_owners() {
        let owners = [Some(1), Some(1), Some(1), Some(2), None, Some(1), Some(2)];
        assert_eq!(super::round_robin(&owners), vec![0, 3, 4, 1, 6, 2, 5]);
        assert!(super::round_robin(&[]).is_empty());
    }
}
