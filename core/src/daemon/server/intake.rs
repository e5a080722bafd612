//! Spool intake: every file in `new/` becomes one queued job or one rejection.

use super::*;

impl Daemon {
    // ---- spool intake ---------------------------------------------------

    /// Take every file in `new/`.  A file that is not a valid job is rejected;
    /// a failure of the daemon's own (a full disk, say) leaves the file where it
    /// is for the next scan and is only logged.
    pub(super) fn intake(&mut self) -> Result<()> {
        for name in self.spool.list()? {
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
                    match self.spool.reject(&name, &why) {
                        Ok(error) => {
                            let text = std::fs::read_to_string(&error).unwrap_or(why);
                            self.rejections.insert(name.as_bytes(), text.as_bytes())?;
                        }
                        Err(e) => tracing::error!("could not move {name} to rejected/: {e:#}"),
                    }
                    continue;
                }
            };
            crate::crash::point("intake-before-record");
            match self.record(&name, checked) {
                Ok(id) => tracing::info!("job {id}: accepted {name}"),
                Err(e) => tracing::error!("could not record {name} (will retry): {e:#}"),
            }
        }
        Ok(())
    }

    /// Validate one dropped file: the spec, its files, and its size.
    pub(super) fn check(&self, name: &str) -> Result<(Dropped, JobSpec, u64)> {
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
    pub(super) fn record(
        &mut self,
        name: &str,
        (dropped, spec, estimate): (Dropped, JobSpec, u64),
    ) -> Result<u64> {
        let wants_gpu = spec.model.device.starts_with("cuda");
        let id = self.table.next_id()?;
        let owner = self.identity_of(dropped.uid, dropped.gid);
        let dir = JobDir::prepare(&self.jobs, &self.dirs.jobs(), id, owner.as_ref())?;
        dir.write_spec(&dropped.text)?;
        let job = JobRecord {
            id,
            name: name.to_string(),
            owner_uid: dropped.uid,
            owner_gid: dropped.gid,
            state: JobState::Queued { not_before: None },
            priority: spec.priority,
            wants_gpu,
            steps_total: spec.mezo.steps,
            steps_done: 0,
            last_loss: None,
            submitted_at: now(),
            started_at: None,
            attempts: 0,
            failures: 0,
            gpus: vec![],
            reason: "queued".into(),
            estimate_bytes: estimate,
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
