//! What happens when a job ends: its `notify: {command: [...]}` runs, once,
//! as its owner (see [`callback`](crate::daemon::callback)).  The main loop
//! only starts it; it is never waited for here.

use super::*;
use crate::daemon::callback::{self, Callback};
use crate::daemon::cgroup::JobLimits;

impl Daemon {
    /// Start the notify command of every job that ended since the last
    /// turn.  A command that cannot start is logged (and said in the job's
    /// log); it never stops the loop.
    pub(super) fn notify_ended(&mut self) {
        for id in self.table.take_ended() {
            if let Err(e) = self.notify_end(id) {
                tracing::warn!("job {id}: its notify command: {e:#}");
            }
        }
    }

    fn notify_end(&mut self, id: u64) -> Result<()> {
        let Some(job) = self.table.get(id)? else {
            return Ok(());
        };
        let dir = JobDir::open(&self.jobs, &self.dirs.jobs(), id)?;
        // The daemon's own copy, read by the daemon: what was accepted.
        let Some(argv) = JobFacts::read(&dir.read_spec()?)
            .map_err(anyhow::Error::msg)?
            .notify
        else {
            return Ok(());
        };
        let cgroup = if self.cgroups.is_available() {
            let limits = JobLimits {
                memory_max: Some(callback::MEMORY_MAX),
                pids_max: Some(self.cfg.pids_per_job),
            };
            Some(
                self.cgroups
                    .create(&format!("notify-{id}"), &limits)
                    .context("making the notify command's cgroup")?,
            )
        } else {
            None
        };
        let log = dir.log_for_append()?;
        let logged = log.metadata().map_or(0, |m| m.len());
        tracing::info!("job {id}: running its notify command");
        callback::spawn(Callback {
            argv,
            run_as: self.identity_of(job.owner_uid, job.owner_gid),
            env: vec![
                ("MEZOD_JOB_ID", id.to_string()),
                ("MEZOD_JOB_NAME", job.name.clone()),
                ("MEZOD_JOB_STATE", job.state.name().to_string()),
                (
                    "MEZOD_JOB_RESULT",
                    dir.run_path().to_string_lossy().into_owned(),
                ),
            ],
            cgroup,
            wall: callback::WALL,
            log,
            room: worker::MAX_LOG_BYTES.saturating_sub(logged),
        })
    }
}
