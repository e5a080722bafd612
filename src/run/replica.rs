//! `mezod run` as one of a job's replicas (`parallel:`, or started by
//! torchrun or Slurm): the leader (rank 0) runs the job in its run folder as
//! a lone run does, sharing each step's directions with the others; a
//! follower measures its share of every step and writes nothing of the run
//! (its own working files go to `replicas/<rank>/` inside the run folder,
//! emptied at each start).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

use super::seedlog::{StepLog, StepRecord};
use super::{open_run_folder, run_shared, Outcome, RunOptions};
use crate::replicas::c10d::Group;
use crate::replicas::launch_env::LaunchEnv;
use crate::replicas::Replicas;
use crate::spec::JobSpec;
use mezod_core::model_ref::DeviceRef;

/// The folder in a run folder that holds the followers' working folders.
pub const FOLLOWERS: &str = "replicas";

/// How long a replica waits for the others: a follower waits at the next
/// step's exchange while the leader evaluates, which can take minutes.
/// A replica that dies is noticed at once (its connections close); this
/// bounds only a hung one.  `MEZOD_REPLICA_TIMEOUT_S` overrides it.
fn timeout() -> Duration {
    let secs = std::env::var("MEZOD_REPLICA_TIMEOUT_S")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3600);
    Duration::from_secs(secs)
}

/// Run (or resume) the job in `spec_path` into `out` as the replica `env`
/// describes (`mezod run` under a launcher).
pub fn run_replica(
    spec_path: &Path,
    out: &Path,
    opts: &RunOptions,
    env: &LaunchEnv,
) -> Result<Outcome> {
    let spec = JobSpec::load(spec_path)?;
    let opts = RunOptions {
        job_file: Some(spec_path.to_path_buf()),
        ..opts.clone()
    };
    run_as_replica(spec, out, &opts, env, |opts| {
        Ok(Box::new(open_run_folder(out, opts)?))
    })
}

/// Run `spec` into `out` as the replica `env` describes.  The leader's step
/// log is `leader_log`'s (the run folder's seed log for `mezod run`, the
/// daemon's pipe for a daemon's worker); a follower keeps its records in
/// memory and never calls it.
pub fn run_as_replica(
    spec: JobSpec,
    out: &Path,
    opts: &RunOptions,
    env: &LaunchEnv,
    leader_log: impl FnOnce(&RunOptions) -> Result<Box<dyn StepLog>>,
) -> Result<Outcome> {
    spec.check_replicas(env.world)
        .with_context(|| format!("{} replicas were started", env.world))?;
    let asked = spec.parallel.map_or(1, |p| p.replicas);
    if env.rank == 0 && asked != env.world {
        tracing::info!(
            "{} replicas were started and the job file asks for {asked}: each step's {} \
             directions are shared by {} (the result is the same)",
            env.world,
            spec.mezo.directions,
            env.world
        );
    }
    let mut opts = opts.clone();
    if opts.device.is_none() && spec.model.device.is_gpu() {
        // Each replica on a GPU of its own: the launcher's local rank.
        opts.device = Some(DeviceRef::Cuda(env.local_rank));
    }
    if env.rank == 0 {
        let log = leader_log(&opts)?;
        let replicas = join(env)?;
        return run_shared(spec, out, &opts, log, Some(replicas));
    }
    let own = out.join(FOLLOWERS).join(env.rank.to_string());
    let _ = std::fs::remove_dir_all(&own);
    std::fs::create_dir_all(&own).with_context(|| format!("creating {}", own.display()))?;
    let opts = RunOptions {
        snapshot_dir: Some(out.join("snapshots")),
        progress: false,
        restart: false,
        ..opts
    };
    let replicas = join(env)?;
    run_shared(
        spec,
        &own,
        &opts,
        Box::<MemoryLog>::default(),
        Some(replicas),
    )
}

fn join(env: &LaunchEnv) -> Result<Replicas> {
    let group = Group::join(env, timeout())?;
    tracing::debug!("replica {} of {} joined", env.rank, env.world);
    Ok(Replicas::new(Box::new(group)))
}

/// A following replica's step records, in memory: the leader's seed log is
/// the run's.
#[derive(Default)]
pub struct MemoryLog(Vec<StepRecord>);

impl StepLog for MemoryLog {
    fn contiguous(&self) -> Result<Vec<StepRecord>> {
        Ok(self.0.clone())
    }

    fn append(&mut self, rec: &StepRecord) -> Result<()> {
        self.0.push(rec.clone());
        Ok(())
    }

    fn truncate_from(&mut self, step: u64) -> Result<()> {
        self.0.truncate(step as usize);
        Ok(())
    }
}
