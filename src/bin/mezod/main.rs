//! The `mezod` command: the daemon and the queue commands, without libtorch,
//! so that `mezod status` answers in milliseconds and the daemon stays small.
//! Training, evaluation, export and the daemon's workers are the engine's
//! (`mezod-engine`, beside this binary): `mezod run …` and its siblings hand
//! their arguments to it unchanged, as `git foo` runs `git-foo`.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use mezod_core::estimate::human_bytes;

mod client;

#[derive(Parser)]
#[command(
    name = "mezod",
    version,
    about = "Fine-tune language models with MeZO: gradients from forward passes only, at inference memory",
    long_about = "Fine-tune Hugging Face language models with MeZO (Malladi et al., 2023): each step \
estimates the gradient from two forward passes along a random direction regenerated from a seed, so \
training needs the memory of inference. Every step's seed and projected gradient are logged, so an \
interrupted run resumes bit-identically.\n\nStart with `mezod forward --model DIR --text \"...\"` to \
check that a checkpoint loads, then `mezod run job.yaml`. On a shared server, run `mezod daemon` (or \
the systemd unit) and hand it jobs with `mezod submit job.yaml`; follow them with `mezod status` and \
`mezod logs ID --follow`.\n\nrun, forward, export, apply, inspect and bench are carried out by the engine, \
mezod-engine, installed beside mezod (or named by MEZOD_ENGINE); `mezod run --help` shows its options. \
MEZOD_LOG sets the log level (error, warn, info, debug)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Arguments handed to the engine unchanged (`--help` included).
#[derive(clap::Args)]
struct EngineArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
    args: Vec<OsString>,
}

#[derive(Subcommand)]
enum Command {
    /// Run a job in the foreground; run the same command again to resume it.
    #[command(disable_help_flag = true)]
    Run(EngineArgs),
    /// Load a model and show its next-token predictions for a text.
    #[command(disable_help_flag = true)]
    Forward(EngineArgs),
    /// Write a run's fine-tune as a .mezo file (seeds and projected gradients).
    #[command(disable_help_flag = true)]
    Export(EngineArgs),
    /// Rebuild fine-tuned weights from a .mezo file and its base model.
    #[command(disable_help_flag = true)]
    Apply(EngineArgs),
    /// Check a job before running it: splits, labels, prompts and answers as
    /// token ids, lengths against max_length, memory, warnings.
    #[command(disable_help_flag = true)]
    Inspect(EngineArgs),
    /// Time forward passes, MeZO steps or replays on a fixed synthetic batch.
    #[command(disable_help_flag = true)]
    Bench(EngineArgs),
    /// Serve a spool folder of job files: admit by free GPU memory, one worker per job.
    ///
    /// Jobs dropped into <spool>/new/ (see `mezod submit`) are validated, queued,
    /// admitted when their estimated memory fits (NVML; CPU mode without it) and
    /// run in worker processes (mezod-engine). Every step is durable: after a
    /// crash, a kill or a reboot, jobs resume bit-identically. SIGTERM/SIGINT
    /// stop workers at a step boundary and exit 0 (a second signal stops at
    /// once); SIGHUP reloads the config and rescans. Folders default to
    /// systemd's StateDirectory/RuntimeDirectory, else ./var/.
    Daemon {
        /// Daemon config (YAML: folders, GPUs, margin, slots, retries; see the README).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Spool folder (new/, tmp/, cur/, rejected/).
        #[arg(long)]
        spool: Option<PathBuf>,
        /// State folder (job database, one folder per job with its run and log).
        #[arg(long)]
        state: Option<PathBuf>,
        /// Runtime folder (the control socket mezod.sock).
        #[arg(long)]
        runtime: Option<PathBuf>,
    },
    /// Hand a job file to the daemon; prints the job id.
    ///
    /// The file is checked here first, relative paths are pinned with a
    /// `workdir:` line, and it is renamed atomically into the daemon's spool.
    Submit {
        job: PathBuf,
        /// The daemon's spool folder [default: asked from the daemon].
        #[arg(long)]
        spool: Option<PathBuf>,
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Seconds to wait for the daemon to accept or reject it.
        #[arg(long, default_value_t = 30.0)]
        wait: f64,
    },
    /// Show the queue, or one job: state, step, speed, loss, memory, ETA, and why it waits.
    ///
    /// Lists every job that has not ended and the 20 newest that have.
    ///
    /// Example: `mezod status`, `mezod status 7`, `mezod status --last 100 --json`
    Status {
        /// One job's id.
        id: Option<u64>,
        /// Also list the N newest ended jobs [default: 20].
        #[arg(long, value_name = "N", conflicts_with = "all")]
        last: Option<usize>,
        /// List every ended job too.
        #[arg(long)]
        all: bool,
        /// One JSON object (pools, jobs) instead of the table.
        #[arg(long)]
        json: bool,
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Cancel a job (its owner or root): a running one stops at its next step.
    Cancel {
        id: u64,
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Print a job's log (its owner or root).
    Logs {
        id: u64,
        /// Keep printing until the job ends.
        #[arg(long, short)]
        follow: bool,
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Internal: the daemon's intake check of a job file (text on stdin, verdict on stdout).
    #[command(hide = true)]
    Check,
    /// Estimate a job's peak memory, as the daemon's admission control does.
    Estimate {
        job: PathBuf,
        /// Size it for a GPU (CUDA context included) instead of the job's own device.
        #[arg(long)]
        gpu: bool,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    mezod_core::cli::main(|| dispatch(Cli::parse()))
}

/// Become the engine with the same subcommand and arguments: its exit status,
/// signals (Ctrl-C) and output are the user's, with nothing in between.
fn hand_to_engine(subcommand: &str, args: EngineArgs) -> Result<ExitCode> {
    let exe = mezod_core::engine::exe();
    let err = std::process::Command::new(&exe)
        .arg(subcommand)
        .args(args.args)
        .exec();
    Err(err).with_context(|| {
        format!(
            "running the engine {} (install mezod-engine beside mezod, or set MEZOD_ENGINE)",
            exe.display()
        )
    })
}

fn dispatch(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Run(a) => hand_to_engine("run", a),
        Command::Forward(a) => hand_to_engine("forward", a),
        Command::Export(a) => hand_to_engine("export", a),
        Command::Apply(a) => hand_to_engine("apply", a),
        Command::Inspect(a) => hand_to_engine("inspect", a),
        Command::Bench(a) => hand_to_engine("bench", a),
        Command::Daemon {
            config,
            spool,
            state,
            runtime,
        } => {
            mezod_core::daemon::server::run_daemon(mezod_core::daemon::server::DaemonOptions {
                config,
                spool,
                state,
                runtime,
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Submit {
            job,
            spool,
            socket,
            wait,
        } => client::submit(&job, spool, socket, wait),
        Command::Check => Ok(mezod_core::daemon::checker::check_main()),
        Command::Estimate { job, gpu, json } => estimate(job, gpu, json),
        Command::Status {
            id,
            last,
            all,
            json,
            socket,
        } => client::status(id, if all { Some(usize::MAX) } else { last }, json, socket),
        Command::Cancel { id, socket } => client::cancel(id, socket),
        Command::Logs { id, follow, socket } => client::logs(id, follow, socket),
    }
}

fn estimate(job: PathBuf, gpu: bool, json: bool) -> Result<ExitCode> {
    let spec = mezod_core::spec::JobSpec::load(&job)?;
    let gpu = gpu || spec.model.device.starts_with("cuda");
    let f = mezod_core::estimate::estimate(&spec, gpu)?;
    if json {
        let mut v = serde_json::to_value(f)?;
        v["total"] = f.total().into();
        println!("{v}");
        return Ok(ExitCode::SUCCESS);
    }
    println!("weights         {:>12}", human_bytes(f.weights));
    println!(
        "largest tensor  {:>12}  (the z temporary)",
        human_bytes(f.largest_tensor)
    );
    println!(
        "activations     {:>12}  (one layer)",
        human_bytes(f.activations)
    );
    println!("logits          {:>12}", human_bytes(f.logits));
    println!(
        "runtime         {:>12}  ({})",
        human_bytes(f.runtime),
        if gpu {
            "CUDA context"
        } else {
            "libtorch on CPU"
        }
    );
    println!(
        "total           {:>12}  (the daemon adds its margin)",
        human_bytes(f.total())
    );
    Ok(ExitCode::SUCCESS)
}
