//! Spool intake: every file in `new/` becomes one queued job or one rejection.

use super::*;

/// Checks under way at once (each is a process); further files wait for one to end.
const MAX_CHECKS: usize = 4;

impl Daemon {
    // ---- spool intake ---------------------------------------------------

    /// Take every file in `new/`.  A file that is not a valid job is rejected;
    /// a failure of the daemon's own (a full disk, say) leaves the file where it
    /// is for the next scan and is only logged.
    /// Take every file in `new/`: read it (bounded, never through a link)
    /// and start its check as its owner.  A file that cannot be read is
    /// rejected; a failure of the daemon's own (a full disk, say) leaves the
    /// file where it is for the next scan and is only logged.
    pub(super) fn intake(&mut self) -> Result<()> {
        self.intake_backlog = false;
        if self.disk.low().is_some() {
            // Files wait in new/: nothing can be recorded or moved safely.
            return Ok(());
        }
        for name in self.spool.list()? {
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
            let dropped = match self.spool.read(&name) {
                Ok(d) => d,
                // Taken away since the listing: nothing to do.
                Err(_) if self.spool.inode(&name).is_none() => continue,
                Err(why) => {
                    self.reject_unless_fresh(&name, &why);
                    continue;
                }
            };
            let run_as = self.identity_of(dropped.uid, dropped.gid);
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
        match verdict {
            Verdict::Accepted(accepted) => {
                crate::crash::point("intake-before-record");
                match self.record(&name, dropped, accepted) {
                    Ok(id) => tracing::info!("job {id}: accepted {name}"),
                    Err(e) => tracing::error!("could not record {name} (will retry): {e:#}"),
                }
            }
            Verdict::Rejected { why } => self.reject_unless_fresh(&name, &why),
        }
        Ok(())
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
    pub(super) fn record(
        &mut self,
        name: &str,
        dropped: Dropped,
        accepted: Accepted,
    ) -> Result<u64> {
        let id = self.table.next_id()?;
        let owner = self.identity_of(dropped.uid, dropped.gid);
        let dir = JobDir::prepare(&self.jobs, &self.dirs.jobs(), id, owner.as_ref())?;
        dir.write_spec(&dropped.text)?;
        let job = JobRecord {
            id,
            // The check ran as the file's owner, who could forge its answer:
            // the name every user's status shows is made plain here.
            name: accepted
                .name
                .as_deref()
                .map(crate::spec::as_job_name)
                .unwrap_or_else(|| {
                    let stem = std::path::Path::new(name).file_stem().unwrap_or_default();
                    crate::spec::as_job_name(&stem.to_string_lossy())
                }),
            spool_name: name.to_string(),
            summary: accepted.summary.clone(),
            owner_uid: dropped.uid,
            owner_gid: dropped.gid,
            state: JobState::Queued { not_before: None },
            priority: accepted.priority,
            wants_gpu: accepted.wants_gpu,
            steps_total: accepted.steps,
            steps_done: 0,
            last_loss: None,
            submitted_at: now(),
            started_at: None,
            attempts: 0,
            failures: 0,
            gpus: vec![],
            reason: "queued".into(),
            estimate_bytes: accepted.estimate_bytes,
            peak_bytes: 0,
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
