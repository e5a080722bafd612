//! `mezod-engine`: the part of mezod that links libtorch — run, forward,
//! export, apply, bench, and the daemon's workers.  Users reach it through
//! `mezod <command>` (the `mezod` binary hands these commands over unchanged),
//! so its help speaks of `mezod`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use mezod::model::{parse_device, Dtype, LanguageModel};
use mezod::replicas::launch_env::LaunchEnv;
use mezod::replicas::local::run_local;
use mezod::run::replica::run_replica;
use mezod::run::{default_out_dir, run, Outcome, RunOptions};
use mezod::spec::JobSpec;

#[derive(Parser)]
#[command(
    name = "mezod",
    bin_name = "mezod",
    version,
    about = "mezod's engine: training, evaluation and export with libtorch (run it as `mezod <command>`)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a job in the foreground; run the same command again to resume it.
    ///
    /// Writes into the output directory: spec.yaml (frozen), metrics.jsonl, the
    /// seed log, snapshots, result.json, loss.svg and model/ (the fine-tuned
    /// weights as a Hugging Face directory; with `tuning: lora` or `prefix` also
    /// adapter/, a PEFT adapter). Ctrl-C or SIGTERM finish the current
    /// step and exit; a second signal exits at once. Either way, rerunning resumes
    /// exactly.
    #[command(
        after_help = "Example: mezod run examples/classification.yaml --out runs/classification"
    )]
    Run {
        /// The job file (YAML; see the README for every field).
        job: PathBuf,
        /// Output directory [default: runs/<job file stem>].
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Resume even if this machine's determinism fingerprint differs from the run's
        /// (the result is then no longer bit-identical to an uninterrupted run),
        /// and write into an output directory that holds other files.
        #[arg(long)]
        force: bool,
        /// Discard the run in the output directory (its recorded steps,
        /// snapshots, metrics, results and weights; other files stay) and
        /// start afresh there, e.g. after editing the job file.
        #[arg(long)]
        restart: bool,
        /// CPU threads for the run when the job's model.threads does not
        /// set them [default: every core; with replicas, the cores divided
        /// among them].
        #[arg(long, value_name = "N")]
        threads: Option<i32>,
    },
    /// Write a run's fine-tune as a .mezo file: the base model's identity and
    /// each step's seed and projected gradient, kilobytes for any model size.
    ///
    /// RUN is the --out folder of `mezod run` (or a daemon job's run folder,
    /// <state>/jobs/<id>/run). By default the file holds the steps of the
    /// exported weights (result.json's `exported.step` when the run has
    /// finished: its final step, or its best with `export: best`).
    #[command(after_help = "Example: mezod export runs/sst2 -o sst2.mezo")]
    Export {
        /// The run folder.
        run: PathBuf,
        /// Accepted and ignored: the seed log is what export writes.
        #[arg(long, hide = true)]
        seed_log: bool,
        /// Output file (e.g. tune.mezo).
        #[arg(short, long, value_name = "FILE")]
        output: PathBuf,
        /// Export steps 0..N instead of the exported weights' steps
        /// [default: the exported weights' steps].
        #[arg(long, value_name = "N")]
        step: Option<u64>,
    },
    /// Rebuild fine-tuned weights from a .mezo file and its base model, bit for
    /// bit as the run had them, and write them as a Hugging Face directory.
    #[command(after_help = "Example: mezod apply sst2.mezo -o sst2-model")]
    Apply {
        /// The .mezo file (from `mezod export`).
        tune: PathBuf,
        /// The base: a model directory, a .gguf file, or the config.json of a
        /// random-weight base [default: the path recorded in the file].
        #[arg(long, value_name = "PATH")]
        base: Option<PathBuf>,
        /// Where to write the fine-tuned model (a Hugging Face directory, with
        /// mezod-apply.json saying where it came from): absent, empty, or
        /// written by an earlier apply.
        #[arg(short, long, value_name = "DIR")]
        output: PathBuf,
        /// Apply even where the rebuilt weights would not be identical (another
        /// libtorch for `rng: torch`, a differing config.json), and write into
        /// an output directory that holds other files.
        #[arg(long)]
        force: bool,
    },
    /// Check a job before spending GPU hours on it: split sizes and labels,
    /// prompts and answers as the model reads them (text, token ids, pieces),
    /// sequence lengths against max_length, the memory estimate, warnings.
    ///
    /// Example: `mezod inspect examples/classification.yaml` (`--json` for a
    /// JSON object).  Exits 1 when the job cannot run (a missing file, a row
    /// without the fields the task needs); warnings do not change the status.
    Inspect(mezod::inspect::InspectArgs),
    /// Time forward passes, MeZO steps or replays on a fixed synthetic batch
    /// (one JSON line: seconds per iteration, peak RSS). `make bench` compares them.
    #[command(
        after_help = "Example: mezod bench --config bench/configs/opt-1.3b.json --mode step"
    )]
    Bench(mezod::bench::BenchArgs),
    /// Internal: one job's worker process, started by the daemon.
    #[command(hide = true)]
    Worker(mezod::worker::WorkerArgs),
    /// Internal: the parameter shapes (JSON) of the model a config.json
    /// describes, for estimates of random-weight jobs.
    #[command(hide = true)]
    Shapes { config: PathBuf },
    /// Load a model and print token ids, the mean next-token loss and the top next
    /// tokens (a masked LM: the top tokens at its mask token).
    #[command(
        after_help = "Example: mezod forward --model tests/fixtures/llama --text \"The movie was\""
    )]
    Forward {
        /// Hugging Face model directory (config.json, safetensors, tokenizer.json) or a .gguf file.
        #[arg(long, value_name = "PATH")]
        model: PathBuf,
        /// Text to tokenize (special tokens added as the tokenizer does).
        #[arg(long, conflicts_with = "ids", required_unless_present = "ids")]
        text: Option<String>,
        /// Token ids, comma-separated, used as given.
        #[arg(long, value_delimiter = ',')]
        ids: Option<Vec<i64>>,
        /// Parameter dtype: f32, bf16 or f16.
        #[arg(long, default_value = "f32")]
        dtype: Dtype,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// How many next-token candidates to show.
        #[arg(long, default_value_t = 5)]
        top: i64,
        /// Print one JSON object: ids, loss, logits [sequence, vocab], top.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Worker(_) | Command::Run { .. }) {
        // Printing commands end quietly when their reader goes (`| head`);
        // a run keeps training (and saving) whoever stops reading its output.
        mezod_core::cli::exit_on_closed_stdout();
    }
    let code = mezod_core::cli::main_logging_to(mezod::run::progress::LogWriter, || dispatch(cli));
    end_now(code)
}

/// End the process with `code` without running C++ static destructors.
/// libtorch's and its CUDA libraries' destructors touch about 80 MiB of
/// their pages on the way out: a daemon that samples a worker's memory
/// then sees it past its estimate (and a cgroup's `memory.max` could kill
/// it after it finished).  Everything of ours is dropped and written by
/// now; only the standard streams' buffers are left to flush.
fn end_now(code: ExitCode) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // `ExitCode` does not say its number: find the byte it was made from.
    let status = (0..=255u8)
        .find(|&n| ExitCode::from(n) == code)
        .map_or(1, i32::from);
    // SAFETY: _exit(2) ends the process; nothing runs after it.
    unsafe { libc::_exit(status) }
}

/// Each command to its function.
fn dispatch(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Run {
            job,
            out,
            force,
            restart,
            threads,
        } => run_command(&job, out, force, restart, threads),
        Command::Export {
            run, output, step, ..
        } => export_command(&run, &output, step),
        Command::Apply {
            tune,
            base,
            output,
            force,
        } => apply_command(&tune, base.as_deref(), &output, force),
        Command::Inspect(args) => {
            let report = mezod::inspect::inspect(&args)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                mezod::inspect::print(&report);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(args) => {
            let r = mezod::bench::run_bench(&args)?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Worker(args) => mezod::worker::worker_main(args),
        Command::Shapes { config } => {
            let shapes = mezod::estimate::shapes_of_config(&config)?;
            println!("{}", serde_json::to_string(&shapes)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Forward {
            model,
            text,
            ids,
            dtype,
            device,
            top,
            json,
        } => forward(model, text, ids, dtype, &device, top, json),
    }
}

/// A line on stdout that is dropped if stdout's reader has gone (`mezod run
/// job | head -1`): by then the run is saved, and its end must not be a panic.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// `mezod run`: train (or resume) and say what came of it; a stop says how to resume.
///
/// Under torchrun or Slurm (their variables set) this process is one of the
/// job's replicas; a job with `parallel: {replicas: K}` run by hand starts
/// its K replicas itself.
fn run_command(
    job: &Path,
    out: Option<PathBuf>,
    force: bool,
    restart: bool,
    threads: Option<i32>,
) -> Result<ExitCode> {
    let out = out.unwrap_or_else(|| default_out_dir(job));
    let mut opts = RunOptions {
        force,
        restart,
        threads,
        progress: std::io::stderr().is_terminal(),
        ..Default::default()
    };
    let launched = LaunchEnv::from_env()?;
    // A following replica leaves the words to the leader.
    let follows = launched
        .as_ref()
        .is_some_and(|env| env.world > 1 && env.rank > 0);
    let outcome = match launched {
        Some(env) if env.world > 1 => {
            opts.progress &= env.rank == 0;
            run_replica(job, &out, &opts, &env)?
        }
        _ => match JobSpec::load(job)?.parallel {
            Some(p) if p.replicas > 1 => {
                let flags: &[&str] = if force { &["--force"] } else { &[] };
                return run_local(job, &out, flags, restart, p.replicas, threads);
            }
            _ => run(job, &out, &opts)?,
        },
    };
    match outcome {
        Outcome::Followed { .. } => Ok(ExitCode::SUCCESS),
        Outcome::Completed(r) if r.exported.is_none() => {
            say_baselines(&r);
            say!("{}", exported_words(&r, &out));
            Ok(ExitCode::SUCCESS)
        }
        Outcome::Completed(r) => {
            let show = |v: Option<f64>| {
                v.map(|v| format!("{v:.4}"))
                    .unwrap_or_else(|| "n/a (no dev set)".into())
            };
            say!(
                "done: {} steps in {:.1}s ({:.2} steps/s)",
                r.steps,
                r.wall_time_s,
                r.steps_per_s
            );
            say!(
                "dev {}: zero-shot {}, best {} (step {}), final {}",
                r.metric,
                show(r.zero_shot),
                show(r.best),
                r.best_step,
                show(r.final_metric)
            );
            if let Some(p) = &r.test_paired {
                say!("{}", p.summary());
            } else if let (Some(t), Some(z)) = (r.test_metric, r.zero_shot_test) {
                say!("test {}: base model {z:.4}, fine-tuned {t:.4}", r.metric);
            }
            say!("{}", exported_words(&r, &out));
            Ok(ExitCode::SUCCESS)
        }
        Outcome::Interrupted { step, signal } => {
            if !follows {
                eprintln!(
                    "stopped by signal {signal} after {step} steps; everything is saved. Resume with: {}",
                    mezod::run::interrupt::resume_command(job, &out)
                );
            }
            Ok(ExitCode::from((128 + signal) as u8))
        }
    }
}

/// A baselines-only job's summary: what each baseline scored.
fn say_baselines(r: &mezod::run::RunResult) {
    use mezod::baselines::show_score;
    say!(
        "{} (dev, test): zero-shot {}, {}",
        r.metric,
        show_score(r.zero_shot),
        show_score(r.zero_shot_test)
    );
    let b = r.baselines.clone().unwrap_or_default();
    if let Some(icl) = b.icl {
        say!(
            "{} (dev, test): icl with {} demonstrations {}, {}",
            r.metric,
            b.icl_k.unwrap_or(0),
            show_score(icl.dev),
            show_score(icl.test)
        );
    }
    if let Some(probe) = b.linear_probe {
        say!(
            "{} (dev, test): linear probe {}, {}",
            r.metric,
            show_score(probe.dev),
            show_score(probe.test)
        );
    }
}

/// The summary's last line: where the weights are, which they are and why,
/// or that a baselines-only job fine-tuned nothing.
fn exported_words(r: &mezod::run::RunResult, out: &Path) -> String {
    let model = out.join("model");
    match &r.exported {
        Some(e) if e.untrained => format!("model: {} holds {}", model.display(), e.why),
        Some(e) => format!("fine-tuned model: {} ({})", model.display(), e.why),
        None => "baselines only (`mode` does not list mezo): nothing was fine-tuned, so no model \
                 was exported"
            .into(),
    }
}

/// `mezod export`: a run's steps as a `.mezo` file.
fn export_command(run: &Path, output: &Path, step: Option<u64>) -> Result<ExitCode> {
    let tune = mezod::run::tune_file::export(run, step)?;
    tune.write(output)?;
    eprintln!(
        "{}: {} steps of {} ({} parameters), {} bytes",
        output.display(),
        tune.steps.len(),
        tune.base.source,
        tune.params
            .iter()
            .map(|p| p.shape.iter().product::<i64>())
            .sum::<i64>(),
        std::fs::metadata(output)?.len()
    );
    Ok(ExitCode::SUCCESS)
}

/// `mezod apply`: a `.mezo` file's steps replayed onto its base, exported.
fn apply_command(tune: &Path, base: Option<&Path>, output: &Path, force: bool) -> Result<ExitCode> {
    mezod::run::out_dir::check_apply_output(output, force)?;
    let tune_path = tune;
    let tune = mezod::run::tune_file::TuneFile::read(&tune_path)?;
    let source = tune.base_source(base);
    // The run's thread count: a prefix's initial activations come from
    // a forward pass, whose last bits may depend on how it is split.
    tch::set_num_threads(tune.fingerprint.threads.max(1));
    let model = mezod::model::LanguageModel::open_tuned(
        &source,
        tune.dtype,
        tch::Device::Cpu,
        &tune.tuning()?,
    )
    .with_context(|| format!("loading the base {}", source.describe()))?;
    tune.apply(&model, &source, force)?;
    mezod::model::export::export_hf(&model, output)?;
    let record = serde_json::json!({
        "tune": std::path::absolute(&tune_path)?,
        "steps": tune.steps.len(),
        "base": source.describe(),
    });
    mezod_core::durable::write(
        &output.join(mezod::run::out_dir::APPLY_RECORD),
        serde_json::to_string_pretty(&record)?,
    )?;
    eprintln!(
        "{}: {} steps applied to {}",
        output.display(),
        tune.steps.len(),
        source.describe()
    );
    Ok(ExitCode::SUCCESS)
}

fn forward(
    dir: PathBuf,
    text: Option<String>,
    ids: Option<Vec<i64>>,
    dtype: Dtype,
    device: &str,
    top: i64,
    json: bool,
) -> Result<ExitCode> {
    let model = LanguageModel::load(&dir, dtype, parse_device(device)?)?;
    let ids = match (text, ids) {
        (Some(t), _) => model.tokenizer.encode(&t, true)?,
        (None, Some(ids)) => ids,
        _ => bail!("give --text or --ids"),
    };
    if ids.is_empty() {
        bail!("no tokens to run");
    }
    let config: serde_json::Value = serde_json::from_str(&model.config_text)?;
    if let Some(vocab) = config["vocab_size"].as_i64() {
        if let Some(bad) = ids.iter().find(|&&i| !(0..vocab).contains(&i)) {
            bail!("token id {bad} is outside the model's vocabulary (0..{vocab})");
        }
    }
    // A masked LM predicts its mask token (the first one), not the next token.
    let masked = model.is_masked_lm();
    let read_at = if masked {
        let (_, mask_id) = model.mask_token()?;
        ids.iter()
            .position(|&i| i == mask_id)
            .context("a masked LM predicts at its mask token: put one in the text")?
    } else {
        ids.len() - 1
    };
    let loss = if ids.len() > 1 && !masked {
        Some(mezod::data::task::causal_lm_loss(
            &model,
            std::slice::from_ref(&ids),
        )?)
    } else {
        None
    };
    let (t_ids, mask) =
        mezod::tokenize::pad_left(std::slice::from_ref(&ids), model.tokenizer.pad_id);
    let logits = model
        .logits(&t_ids, &mask)
        .squeeze_dim(0)
        .to_device(tch::Device::Cpu);
    let last = logits.get(read_at as i64).log_softmax(-1, tch::Kind::Float);
    let (vals, idx) = last.topk(top.min(last.size()[0]), -1, true, true);
    let top_list: Vec<(i64, String, f64)> = (0..vals.size()[0])
        .map(|i| {
            let id = idx.int64_value(&[i]);
            (
                id,
                model.tokenizer.decode(&[id]),
                vals.double_value(&[i]).exp(),
            )
        })
        .collect();
    if json {
        let rows: Vec<Vec<f32>> = Vec::<Vec<f32>>::try_from(&logits)?;
        let obj = serde_json::json!({
            "ids": ids,
            "loss": loss,
            "logits": rows,
            "top": top_list.iter().map(|(id, s, p)| serde_json::json!({"id": id, "token": s, "prob": p})).collect::<Vec<_>>(),
        });
        println!("{obj}");
    } else {
        println!("ids: {ids:?}");
        match loss {
            Some(l) => println!(
                "mean next-token cross-entropy: {l:.4} (perplexity {:.2})",
                l.exp()
            ),
            None if masked => {}
            None => println!("mean next-token cross-entropy: n/a (one token)"),
        }
        if masked {
            println!("top tokens at the mask (position {read_at}):");
        } else {
            println!("top next tokens:");
        }
        for (id, s, p) in top_list {
            println!("  {id:>8}  {p:>7.4}  {s:?}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
