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

use mezod_core::daemon::control::DEFAULT_FINISHED_SHOWN;
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
mezod-engine, installed beside mezod (or named by MEZOD_ENGINE); `mezod run --help` shows its options.",
    after_help = "Environment:\n  \
MEZOD_LOG      log level on stderr: error, warn, info (default) or debug; also per module, \
e.g. info,mezod_core::daemon=debug\n  \
MEZOD_SOCKET   the daemon's control socket (see --socket)\n  \
MEZOD_ENGINE   the engine binary [default: mezod-engine beside mezod]\n\n\
Example: mezod completions bash > /etc/bash_completion.d/mezod"
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
    #[command(after_help = "Example: mezod daemon --config /etc/mezod/daemon.yaml")]
    Daemon {
        /// Daemon config (YAML: folders, GPUs, margin, slots, retries; see the README)
        /// [default: built-in defaults].
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Spool folder (new/, tmp/, cur/, rejected/)
        /// [default: the config's, else $STATE_DIRECTORY/spool or ./var/spool].
        #[arg(long, value_name = "DIR")]
        spool: Option<PathBuf>,
        /// State folder (job database, one folder per job with its run and log)
        /// [default: the config's, else $STATE_DIRECTORY or ./var/state].
        #[arg(long, value_name = "DIR")]
        state: Option<PathBuf>,
        /// Runtime folder (the control socket mezod.sock)
        /// [default: the config's, else $RUNTIME_DIRECTORY or ./var/run].
        #[arg(long, value_name = "DIR")]
        runtime: Option<PathBuf>,
    },
    /// Hand a job file to the daemon; prints the job id.
    ///
    /// The file is checked here first, as you (model type, weights, tokenizer,
    /// data and the fields the task needs): a job that could not run is refused
    /// with the reason and nothing is queued. Relative paths are pinned with a
    /// `workdir:` line, the job is named after the file unless it has a `name:`,
    /// the jobs of --after are added to its `after:`, and it is renamed
    /// atomically into the daemon's spool.
    #[command(
        after_help = "Examples:\n  mezod submit examples/classification.yaml\n  \
                            mezod submit examples/classification.yaml --after 7 --after prep"
    )]
    Submit {
        /// The job file (YAML; see the README for every field).
        job: PathBuf,
        /// Start it only once this job of yours is done (an id, or a job's
        /// name: your newest job of that name); if that job fails or is
        /// cancelled, this one fails. Repeat for several.
        #[arg(long, value_name = "ID")]
        after: Vec<String>,
        /// The daemon's spool folder [default: asked from the daemon].
        #[arg(long, value_name = "DIR")]
        spool: Option<PathBuf>,
        #[command(flatten)]
        socket: SocketArg,
        /// Seconds to wait for the daemon to accept or reject it.
        #[arg(long, value_name = "SECONDS", default_value_t = 30.0)]
        wait: f64,
    },
    /// Show the queue, or one job in detail.
    ///
    /// Without an ID: every job that has not ended and the newest ended ones
    /// (id, owner, state, step, speed, loss, memory, ETA, name and why it waits
    /// or how it ended). With an ID: that job's name, owner, state and reason,
    /// attempts, times, job file and run folder, what it runs, and its result
    /// or the end of its error.
    #[command(after_help = "Examples:\n  mezod status\n  mezod status 7\n  \
                            mezod status --state failed --user alice --last 100\n  \
                            mezod status --json | head")]
    Status {
        /// One job's id: show it in detail.
        id: Option<u64>,
        /// Only jobs in this state (queued, admitted, running, preempted, done,
        /// failed, cancelled); repeat or separate with commas for several.
        #[arg(long, value_name = "STATE", value_delimiter = ',')]
        state: Vec<String>,
        /// Only jobs of this user (a name or a uid).
        #[arg(long, value_name = "USER")]
        user: Option<String>,
        /// List the N newest ended jobs (jobs not yet ended are always listed).
        #[arg(long, value_name = "N", default_value_t = DEFAULT_FINISHED_SHOWN, conflicts_with = "all")]
        last: usize,
        /// List every ended job.
        #[arg(long)]
        all: bool,
        /// Print JSON (the report, or the one job) instead of the table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Cancel jobs (their owner or root): a running one stops at its next step.
    #[command(after_help = "Example: mezod cancel 7 8 9")]
    Cancel {
        /// The jobs' ids.
        #[arg(required = true, value_name = "ID")]
        ids: Vec<u64>,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Queue a failed or cancelled job again under its id; it resumes from its seed log.
    ///
    /// Its owner or root only. The job runs the job file it was accepted with;
    /// its steps so far are kept, and its retries start again from zero.
    #[command(after_help = "Example: mezod restart 7")]
    Restart {
        /// The job's id.
        id: u64,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Set a waiting or running job's priority (higher runs first).
    ///
    /// Root and members of the daemon's `admin_group` may set any priority;
    /// a job's owner may only lower its own. The queue is reordered at once;
    /// a running job keeps running.
    #[command(after_help = "Example: mezod priority 7 10")]
    Priority {
        /// The job's id.
        id: u64,
        /// The new priority (the config's user_priority_max, 0 by default, is
        /// the most a user's job file may ask for).
        #[arg(allow_hyphen_values = true)]
        priority: i32,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Forget ended jobs (done, failed, cancelled): they leave `mezod status`.
    ///
    /// Without IDs, every ended job of yours (root: of everyone). Their folders
    /// (job file, log, run folder with the weights) are kept unless --purge.
    #[command(after_help = "Examples:\n  mezod clean\n  mezod clean 3 4 --purge")]
    Clean {
        /// The jobs' ids [default: every ended job of yours].
        #[arg(value_name = "ID")]
        ids: Vec<u64>,
        /// Delete their folders too (outputs included).
        #[arg(long)]
        purge: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Wait until jobs end; exit 0 if every one ended done.
    ///
    /// Prints a line per job as it ends (`job 7 (name): done`, or how it
    /// failed). Exit status: 0 if all ended done, 1 if one failed or was
    /// cancelled, 2 for an id the daemon does not know, 124 past --timeout.
    /// Anyone may wait for any job (its state is no secret).
    #[command(after_help = "Examples:\n  mezod wait 7 8\n  \
                            mezod wait 7 --timeout 3600 && mezod submit eval.yaml")]
    Wait {
        /// The jobs' ids.
        #[arg(required = true, value_name = "ID")]
        ids: Vec<u64>,
        /// Give up after this many seconds (exit status 124).
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<f64>,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Print a job's log (its owner or root).
    #[command(after_help = "Examples:\n  mezod logs 7\n  mezod logs 7 -n 20 --follow")]
    Logs {
        /// The job's id.
        id: u64,
        /// Only the last N lines [default: the whole log].
        #[arg(short = 'n', long = "lines", value_name = "N")]
        lines: Option<usize>,
        /// Keep printing until the job ends.
        #[arg(long, short)]
        follow: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Say what became of a job file dropped into the spool by hand: the job
    /// it became, or why it was rejected (the file's owner or root; the
    /// rejected/ folder itself is root's).
    ///
    /// FILE is the name it had in spool/new/ (a path is taken by its last
    /// part). Exit status: 0 if it became a job, 1 if it was rejected, 2 if
    /// the daemon has not taken it (yet) or it is not yours to ask about.
    #[command(after_help = "Example: cp job.yaml /var/lib/mezod/spool/new/ && mezod why job.yaml")]
    Why {
        /// The file's name in spool/new/.
        file: PathBuf,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Internal: the daemon's intake check of a job file (text on stdin, verdict on stdout).
    #[command(hide = true)]
    Check,
    /// Estimate a job's peak memory, as the daemon's admission control does.
    ///
    /// Also runs the checks `mezod submit` runs (model type, weights,
    /// tokenizer, data) and exits with status 1 if any fails.
    #[command(after_help = "Example: mezod estimate examples/classification.yaml --gpu")]
    Estimate {
        /// The job file.
        job: PathBuf,
        /// Size it for a GPU (CUDA context included) instead of the job's own device.
        #[arg(long)]
        gpu: bool,
        /// Print JSON (each part in bytes, the total, the problems found).
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script.
    #[command(
        after_help = "Examples:\n  mezod completions bash > /etc/bash_completion.d/mezod\n  \
                            mezod completions zsh > ~/.zfunc/_mezod\n  \
                            mezod completions fish > ~/.config/fish/completions/mezod.fish"
    )]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// Where the daemon listens.
#[derive(clap::Args)]
struct SocketArg {
    /// The daemon's control socket: <runtime>/mezod.sock of a daemon started
    /// by hand, e.g. var/run/mezod.sock [default: $MEZOD_SOCKET, else
    /// /run/mezod/mezod.sock, the systemd unit's; never one found in the
    /// current folder]. It must belong to root or you.
    #[arg(long = "socket", value_name = "PATH")]
    path: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Daemon { .. } | Command::Check) {
        // Printing commands end quietly when their reader goes (`| head`).
        mezod_core::cli::exit_on_closed_stdout();
    }
    mezod_core::cli::main(|| dispatch(cli))
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
            after,
            spool,
            socket,
            wait,
        } => {
            let after: Vec<_> = after
                .iter()
                .map(|a| mezod_core::spec::JobRef::from_arg(a))
                .collect();
            client::submit(&job, &after, spool, socket.path, wait)
        }
        Command::Wait {
            ids,
            timeout,
            socket,
        } => client::wait(&ids, timeout, socket.path),
        Command::Why { file, socket } => client::why(&file, socket.path),
        Command::Check => Ok(mezod_core::daemon::checker::check_main()),
        Command::Estimate { job, gpu, json } => estimate(job, gpu, json),
        Command::Status {
            id: Some(id),
            json,
            socket,
            ..
        } => client::show(id, json, socket.path),
        Command::Status {
            id: None,
            state,
            user,
            last,
            all,
            json,
            socket,
        } => client::status(
            client::Listing {
                finished: if all { usize::MAX } else { last },
                states: state,
                user,
            },
            json,
            socket.path,
        ),
        Command::Cancel { ids, socket } => client::cancel(&ids, socket.path),
        Command::Restart { id, socket } => client::restart(id, socket.path),
        Command::Priority {
            id,
            priority,
            socket,
        } => client::priority(id, priority, socket.path),
        Command::Clean { ids, purge, socket } => client::clean(ids, purge, socket.path),
        Command::Logs {
            id,
            lines,
            follow,
            socket,
        } => client::logs(id, lines, follow, socket.path),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "mezod",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The estimate, then every problem `mezod submit` would refuse the job
/// for (on stderr); exit status 1 if there is one.  A model whose files
/// cannot be read has no estimate: then the problems alone say why, in the
/// words `mezod run` uses.
fn estimate(job: PathBuf, gpu: bool, json: bool) -> Result<ExitCode> {
    let spec = mezod_core::spec::JobSpec::load(&job)?;
    let gpu = gpu || spec.model.device.is_gpu();
    let problems: Vec<String> = mezod_core::job_check::problems(&spec)
        .iter()
        .map(|e| format!("{e:#}"))
        .collect();
    let footprint = match mezod_core::estimate::estimate(&spec, gpu) {
        Ok(f) => Some(f),
        Err(_) if !problems.is_empty() => None,
        Err(e) => return Err(e),
    };
    let split = match footprint {
        Some(_) => mezod_core::estimate::device_split(&spec)?,
        None => None,
    };
    let code = if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    };
    if json {
        let mut v = match &footprint {
            Some(f) => {
                let mut v = serde_json::to_value(f)?;
                v["total"] = f.total().into();
                v
            }
            None => serde_json::json!({}),
        };
        if let Some(split) = &split {
            v["devices"] = serde_json::to_value(split)?;
        }
        v["problems"] = problems.clone().into();
        println!("{v}");
    } else if let Some(f) = &footprint {
        print_estimate(f, gpu);
        if let Some(split) = &split {
            print_split(split);
        }
    }
    for p in &problems {
        eprintln!("error: {p}");
    }
    Ok(code)
}

/// A split job's devices: the layers and weights each holds as this
/// machine's free memory places them now (`mezod run` places them the same
/// way when the run starts, and keeps that split when it resumes).
fn print_split(split: &[mezod_core::placement::DeviceShare]) {
    println!(
        "split over {} devices (layers by free memory now):",
        split.len()
    );
    for s in split {
        let free = s.free.map_or_else(|| "unknown".to_string(), human_bytes);
        println!(
            "  {:<8} {:>4} layer{}  weights {:>12}  free {free}",
            s.device.to_string(),
            s.layers,
            if s.layers == 1 { " " } else { "s" },
            human_bytes(s.weights)
        );
    }
}

fn print_estimate(f: &mezod_core::estimate::Footprint, gpu: bool) {
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
    if f.mask > 0 {
        println!(
            "mask            {:>12}  (sparse: one bit per trainable weight)",
            human_bytes(f.mask)
        );
    }
    if f.factors > 0 {
        println!(
            "factors         {:>12}  (lozo: U and V of every matrix)",
            human_bytes(f.factors)
        );
    }
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
}
