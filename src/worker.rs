//! The worker's side of a daemon job (`mezod-engine worker`, internal): the
//! job file's text and the step records already logged come on stdin from the
//! daemon; the job runs with a step log whose new records go to stdout, one
//! line each, for the daemon to make durable (the protocol is in
//! `mezod_core::daemon::worker`).  A replicated job's workers get torchrun's
//! variables from the daemon: the leader (rank 0) logs through the pipe, the
//! followers get only the job file and send no records.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};

use crate::replicas::launch_env::LaunchEnv;
use crate::run::replica::run_as_replica;
use crate::run::seedlog::{StepLog, StepRecord};
use crate::run::{run_with_log, Outcome, RunOptions};
use mezod_core::daemon::worker::{
    decode_input, encode, encode_job_error, is_transient, JOB_ERROR_EXIT,
};
use mezod_core::spec::JobSpec;

/// The worker's side of the log: earlier records from the daemon, new
/// ones written to stdout for the daemon.
struct PipeLog {
    records: Vec<StepRecord>,
    out: std::io::Stdout,
}

impl StepLog for PipeLog {
    fn contiguous(&self) -> Result<Vec<StepRecord>> {
        Ok(self.records.clone())
    }
    fn append(&mut self, rec: &StepRecord) -> Result<()> {
        let mut out = self.out.lock();
        out.write_all(encode(rec).as_bytes())
            .and_then(|_| out.flush())
            .context("the daemon is gone (step records cannot be delivered)")?;
        self.records.push(rec.clone());
        Ok(())
    }
    fn truncate_from(&mut self, step: u64) -> Result<()> {
        self.records.truncate(step as usize);
        Ok(())
    }
}

/// Arguments of `mezod-engine worker` (set by the daemon's `spawn`).
#[derive(clap::Args)]
pub struct WorkerArgs {
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub threads: i32,
    #[arg(long)]
    pub snapshot_every: u64,
    #[arg(long)]
    pub estimate: u64,
    #[arg(long)]
    pub device: Option<String>,
}

/// Body of `mezod-engine worker`: run the job with the daemon's log; exit 0
/// when done, 128+signal when stopped by a signal (within a second; weights
/// at a step boundary are saved), [`JOB_ERROR_EXIT`] when the job itself
/// failed (its reason on stdout for the daemon), 1 on a failure a retry may
/// cure.
pub fn worker_main(args: WorkerArgs) -> Result<ExitCode> {
    // What this process was given, as it sees it: which GPU it may use.
    tracing::info!(
        "worker {}: CUDA_VISIBLE_DEVICES={}, device {}",
        std::process::id(),
        std::env::var("CUDA_VISIBLE_DEVICES").map_or("(unset)".into(), |v| format!("{v:?}")),
        args.device.as_deref().unwrap_or("as in the job")
    );
    let mut input = Vec::new();
    std::io::stdin()
        .read_to_end(&mut input)
        .context("reading the job from the daemon")?;
    let (text, records) = decode_input(&input)?;
    tracing::debug!(
        "worker: the daemon sent the job and {} logged steps to replay",
        records.len()
    );
    match run_job(&text, records, args) {
        Ok(code) => Ok(code),
        Err(e) if is_transient(&e) => Err(e),
        Err(e) => {
            // The job's own error: the same inputs would fail again, so the
            // daemon is told why and fails the job instead of retrying it.
            let message = format!("{e:#}");
            eprintln!("error: {message}");
            let mut out = std::io::stdout().lock();
            let _ = out
                .write_all(encode_job_error(&message).as_bytes())
                .and_then(|_| out.flush());
            Ok(ExitCode::from(JOB_ERROR_EXIT))
        }
    }
}

/// Run the job of the worker's input with the daemon's log.
fn run_job(text: &str, records: Vec<StepRecord>, args: WorkerArgs) -> Result<ExitCode> {
    // The daemon's spool accepts only absolute paths (or a `workdir`).
    let spec = JobSpec::parse_with_base(text, None)?;
    let log = PipeLog {
        records,
        out: std::io::stdout(),
    };
    let opts = RunOptions {
        force: false,
        restart: false,
        progress: false,
        threads: Some(args.threads),
        device: args.device.as_deref().map(str::parse).transpose()?,
        snapshot_every: Some(args.snapshot_every),
        memory_estimate: Some(args.estimate),
        job_file: None,
        snapshot_dir: None,
    };
    // A replicated job's workers: the daemon sets torchrun's variables.
    let outcome = match LaunchEnv::from_env()? {
        Some(env) if env.world > 1 => {
            run_as_replica(spec, &args.out, &opts, &env, |_| Ok(Box::new(log)))?
        }
        _ => run_with_log(spec, &args.out, &opts, Box::new(log))?,
    };
    match outcome {
        Outcome::Completed(r) => {
            tracing::info!(
                "done: {} steps, dev {} best {} (step {})",
                r.steps,
                r.metric,
                crate::baselines::show_score(r.best),
                r.best_step
            );
            match &r.exported {
                Some(e) => tracing::info!("exported step {}: {}", e.step, e.why),
                None => tracing::info!("baselines only: nothing was fine-tuned, no model exported"),
            }
            Ok(ExitCode::SUCCESS)
        }
        // A following replica: the leader reports for the job.
        Outcome::Followed { .. } => Ok(ExitCode::SUCCESS),
        Outcome::Interrupted { step, signal } => {
            tracing::info!("stopped after step {step} (signal {signal}); the daemon resumes it");
            Ok(ExitCode::from((128 + signal) as u8))
        }
    }
}
