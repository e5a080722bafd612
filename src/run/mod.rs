//! `mezod run`: one job in the foreground, resumable bit-identically.
//!
//! The output directory is the job's whole state: the frozen spec, the seed
//! log (sled), snapshots, `metrics.jsonl`, and at the end `result.json`,
//! `loss.svg` and `model/`.  Running the same command again resumes: base
//! weights → newest valid snapshot → replay of the logged steps after it →
//! continue.  Steps are pure functions of (seed, step), so a lost log tail
//! costs only recomputation.

pub mod exported;
pub mod fingerprint;
pub mod interrupt;
pub mod layer_split;
pub mod metrics;
pub mod out_dir;
pub mod paired;
pub mod plot;
pub mod progress;
pub mod replica;
pub use mezod_core::seedlog;
pub mod snapshot;
pub mod tune_file;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::baselines::{self, Baselines};
use crate::data::task::{Evaluation, Task};
use crate::data::{load_job_splits, Example};
use crate::mezo::{
    batch_indices, live_step_among, replay_step, Logged, Measured, Rng, Share, StepConfig,
    StepSeeds, ZSweep,
};
use crate::model::adapters::Tuning;
use crate::model::export::{export_hf, export_peft_adapter};
use crate::model::LanguageModel;
use crate::replicas::Replicas;
use crate::spec::{JobSpec, Mode};
use exported::Exported;
use fingerprint::Fingerprint;
use metrics::{EvalLine, MetricsFile};
use mezod_core::durable;
use mezod_core::model_ref::{DeviceRef, Placement};
use paired::Paired;
use progress::Progress;
use seedlog::{Direction, SeedLog, StepLog, StepRecord};

/// Snapshot interval when neither the job nor the daemon sets one.
pub const DEFAULT_SNAPSHOT_EVERY: u64 = 100;

/// Options of a run beyond the job file.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Resume even though the determinism fingerprint differs (no longer
    /// bit-identical), and write into a folder that holds something else.
    pub force: bool,
    /// Discard the run in the output folder and start afresh there.
    pub restart: bool,
    /// Show a progress bar (a terminal); otherwise log lines.
    pub progress: bool,
    /// CPU threads when the job does not set `model.threads` (default: all cores).
    pub threads: Option<i32>,
    /// Device to use instead of the job's devices, the whole model on it
    /// (the daemon assigns GPUs: `cuda:0` of the one it made visible).
    pub device: Option<DeviceRef>,
    /// Snapshot interval when the job does not set `mezo.snapshot_every`.
    pub snapshot_every: Option<u64>,
    /// The admission estimate of this job's peak memory, recorded in result.json.
    pub memory_estimate: Option<u64>,
    /// The job file the run was started from, if any (it names the run).
    pub job_file: Option<PathBuf>,
    /// Snapshots elsewhere than the run folder's `snapshots/` (a following
    /// replica resumes from the leader's).
    pub snapshot_dir: Option<PathBuf>,
}

/// How a run ended.
#[derive(Debug)]
pub enum Outcome {
    Completed(RunResult),
    /// Stopped by a signal at a step boundary; rerunning resumes.
    Interrupted {
        step: u64,
        signal: i32,
    },
    /// A following replica measured its share of every step; the leader
    /// reports the run.
    Followed {
        steps: u64,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunResult {
    pub metric: String,
    pub zero_shot: Option<f64>,
    pub best: Option<f64>,
    /// The step of the best dev evaluation (the final step without dev examples).
    pub best_step: u64,
    /// Which weights `model/`, `adapter/` and `mezod export` hold, and why;
    /// none for a job that only measures baselines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exported: Option<Exported>,
    pub final_metric: Option<f64>,
    /// The metric of the exported weights on the test split, if any.
    pub test_metric: Option<f64>,
    pub test_loss: Option<f64>,
    /// The base model's metric on the test split.
    pub zero_shot_test: Option<f64>,
    /// The base model against the exported weights on the same test examples
    /// (accuracy tasks only): the difference with its interval and McNemar's test.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_paired: Option<Paired>,
    /// The icl / linear_probe baselines, when the job's `mode` lists them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baselines: Option<Baselines>,
    pub steps: u64,
    pub resumed_from: u64,
    pub replayed_steps: u64,
    pub wall_time_s: f64,
    pub steps_per_s: f64,
    /// Measured peak: GPU memory by NVML for this process on a GPU, VmHWM on CPU.
    pub peak_memory_bytes: u64,
    /// `nvml` or `vmhwm`.
    pub peak_memory_source: String,
    /// What admission control estimated for this job (daemon runs).
    pub memory_estimate_bytes: Option<u64>,
    pub trainable_parameters: i64,
    pub fingerprint: Fingerprint,
}

/// Default output directory of a job file: `runs/<file stem>`.
pub fn default_out_dir(spec_path: &Path) -> PathBuf {
    let stem = spec_path
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "job".into());
    PathBuf::from("runs").join(stem)
}

/// The job's name as people see it (the chart's title): its `name:`, else
/// the job file's stem, else the run folder's name, or `job ID` for a daemon
/// job's run folder (`jobs/ID/run`).  Every place that names a run asks here.
pub fn job_name(named: Option<&str>, job_file: Option<&Path>, out: &Path) -> String {
    if let Some(named) = named {
        return named.to_string();
    }
    let name = |p: &Path| p.file_stem().map(|s| s.to_string_lossy().into_owned());
    if let Some(stem) = job_file.and_then(name) {
        return stem;
    }
    let folder = name(out).unwrap_or_else(|| "run".into());
    match out.parent().and_then(name) {
        Some(id) if folder == mezod_core::daemon::job_dir::RUN && id.parse::<u64>().is_ok() => {
            format!("job {id}")
        }
        _ => folder,
    }
}

/// Peak resident memory of this process (VmHWM), bytes.
pub fn peak_rss_bytes() -> u64 {
    crate::procfs::kb_field("/proc/self/status", "VmHWM")
}

/// The base model on the test split, measured before the first step
/// (`zero_shot_test.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ZeroShotTest {
    metric: f64,
    /// Which test examples it got right (accuracy tasks), for the paired comparison.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    correct: Option<Vec<bool>>,
}

/// Read `zero_shot_test.json`: `{"metric": …, "correct": […]}`, or the bare
/// number runs wrote before (a resumed old run has no per-example answers).
fn read_zero_shot_test(out: &Path) -> Option<ZeroShotTest> {
    let text = std::fs::read_to_string(out.join("zero_shot_test.json")).ok()?;
    serde_json::from_str(&text).ok().or_else(|| {
        serde_json::from_str(&text).ok().map(|metric| ZeroShotTest {
            metric,
            correct: None,
        })
    })
}

/// The device that stands for a run's devices where one must: its first
/// GPU, else the CPU (z's default generator, the source of its peak memory).
fn main_device(devices: &[DeviceRef]) -> DeviceRef {
    devices
        .iter()
        .copied()
        .find(DeviceRef::is_gpu)
        .unwrap_or(DeviceRef::Cpu)
}

/// This process's peak memory on its device: NVML's figure for this process on
/// a GPU (the caching allocator keeps the peak reserved), VmHWM on CPU.
fn measured_peak(device: DeviceRef) -> (u64, String) {
    if device.is_gpu() {
        if let Some(bytes) = crate::gpu::process_memory(std::process::id(), None) {
            return (bytes, "nvml".into());
        }
    }
    (peak_rss_bytes(), "vmhwm".into())
}

/// Everything one job needs while it trains.
struct Job {
    spec: JobSpec,
    out: PathBuf,
    /// See [`job_name`].
    name: String,
    model: LanguageModel,
    task: Task,
    train: Vec<Example>,
    dev: Vec<Example>,
    test: Vec<Example>,
    log: Box<dyn StepLog>,
    metrics: MetricsFile,
    /// Draws z (the job's generator on the job's threads).
    z: ZSweep,
    device: DeviceRef,
    memory_estimate: Option<u64>,
    progress: Progress,
    /// The other processes sharing each step's directions, if any.
    replicas: Option<Replicas>,
    /// Where snapshots are (a following replica reads the leader's).
    snapshot_dir: PathBuf,
}

impl Job {
    /// Whether this process writes the run's outputs: alone, or the leading
    /// replica (the others only measure their directions).
    fn leads(&self) -> bool {
        self.replicas.as_ref().is_none_or(Replicas::leads)
    }

    fn step_config(&self, step: u64) -> StepConfig {
        let m = &self.spec.mezo;
        StepConfig {
            eps: m.eps,
            lr: m.lr_schedule.lr(m.lr, step, m.steps),
            weight_decay: m.weight_decay,
        }
    }

    fn batch_indices(&self, step: u64) -> Vec<usize> {
        batch_indices(
            self.spec.data_seed(),
            step,
            self.spec.mezo.batch_size,
            self.train.len(),
        )
    }

    /// One live MeZO step: measure, update, log durably.
    fn train_step(&mut self, step: u64) -> Result<StepRecord> {
        let m = &self.spec.mezo;
        let estimator = m.estimator();
        let seeds = StepSeeds::of(estimator, m.seed, step, m.directions);
        let cfg = self.step_config(step);
        let batch_idx = self.batch_indices(step);
        let batch: Vec<&Example> = batch_idx.iter().map(|&i| &self.train[i]).collect();
        let (model, task, objective) = (&self.model, &self.task, self.spec.mezo.objective);
        let mut loss = || task.objective(model, &batch, objective);
        if let Some(replicas) = &mut self.replicas {
            replicas.begin_step(step, interrupt::stop_requested().is_some());
        }
        let measured = live_step_among(
            &model.params,
            &self.z,
            estimator,
            &seeds.directions,
            seeds.basis,
            &cfg,
            self.replicas.as_mut().map(|r| r as &mut dyn Share),
            &mut loss,
        );
        let Measured {
            outcomes: outs,
            spread,
        } = measured.with_context(|| format!("step {step}"))?;
        let rec = StepRecord {
            step,
            seed: seeds.step,
            projected_grad: outs[0].projected_grad,
            loss_plus: outs[0].loss_plus,
            loss_minus: outs[0].loss_minus,
            lr: cfg.lr,
            more: seeds.directions[1..]
                .iter()
                .zip(&outs[1..])
                .map(|(&seed, o)| Direction {
                    seed,
                    projected_grad: o.projected_grad,
                    loss_plus: o.loss_plus,
                    loss_minus: o.loss_minus,
                })
                .collect(),
            spread,
            basis: seeds.basis,
        };
        self.log.append(&rec)?;
        self.metrics.step(&rec, &batch_idx)?;
        Ok(rec)
    }

    /// Re-apply logged steps to the weights, without any forward pass; a
    /// stop is answered between two steps (the weights are then neither
    /// here nor there, and the seed log still holds every step).
    fn replay(&self, records: &[StepRecord]) -> Result<()> {
        for rec in records {
            interrupt::check()?;
            let cfg = StepConfig {
                lr: rec.lr,
                ..self.step_config(rec.step)
            };
            replay_step(
                &self.model.params,
                &self.z,
                self.spec.mezo.estimator(),
                &rec.seeds(),
                &rec.grads(),
                Logged {
                    spread: rec.spread,
                    basis: rec.basis,
                },
                &cfg,
            )
            .with_context(|| format!("replaying step {}", rec.step))?;
        }
        Ok(())
    }

    /// The `icl` and `linear_probe` baselines, once, before training
    /// (`baselines.json`; a resumed run reads them back).
    fn baselines(&self) -> Result<()> {
        let path = self.out.join("baselines.json");
        let wanted = |m| self.spec.mode.contains(&m);
        if path.is_file() || !(wanted(Mode::Icl) || wanted(Mode::LinearProbe)) {
            return Ok(());
        }
        let splits = (&self.train[..], &self.dev[..], &self.test[..]);
        let bs = self.eval_batch_size();
        let mut b = Baselines::default();
        if wanted(Mode::Icl) {
            let k = self.spec.icl.as_ref().map_or(4, |i| i.k);
            let seed = self
                .spec
                .icl
                .as_ref()
                .and_then(|i| i.seed)
                .unwrap_or(self.spec.mezo.seed);
            let score = baselines::icl(&self.task, &self.model, splits, k, seed, bs)
                .context("the icl baseline")?;
            tracing::info!("icl ({k} demonstrations): {score}");
            b.icl = Some(score);
            b.icl_k = Some(k);
        }
        if wanted(Mode::LinearProbe) {
            let (score, fit) = baselines::linear_probe(&self.task, &self.model, splits, bs)
                .context("the linear_probe baseline")?;
            tracing::info!("linear probe: {score} (train {fit:.4})");
            b.linear_probe = Some(score);
            b.linear_probe_train = Some(fit);
        }
        durable::write(&path, serde_json::to_string_pretty(&b)?)?;
        Ok(())
    }

    fn eval_batch_size(&self) -> usize {
        self.spec
            .mezo
            .eval_batch_size
            .unwrap_or(self.spec.mezo.batch_size)
    }

    /// Metric and loss of the weights at `step` on a split, showing progress.
    fn evaluate_split(&self, split: &str, step: u64) -> Result<Evaluation> {
        let examples = if split == "test" {
            &self.test
        } else {
            &self.dev
        };
        let mut shown = self.progress.evaluation(split, step, examples.len());
        self.task
            .evaluate_with(&self.model, examples, self.eval_batch_size(), |n| {
                shown.update(n)
            })
            .with_context(|| format!("evaluating on the {split} split at step {step}"))
    }

    fn evaluate(&mut self, step: u64) -> Result<Option<Evaluation>> {
        if self.dev.is_empty() {
            return Ok(None);
        }
        let e = self.evaluate_split("dev", step)?;
        self.metrics.eval(&EvalLine {
            step,
            metric: self.task.metric_name().into(),
            value: e.metric,
            loss: e.loss,
        })?;
        tracing::info!(
            "step {step}: dev {} {:.4} (loss {:.4})",
            self.task.metric_name(),
            e.metric,
            e.loss
        );
        Ok(Some(e))
    }
}

/// The generator of an existing run, so that a resume keeps it even where the
/// default differs (a run started before `mezo.rng` existed, or on another device).
fn frozen_rng(out: &Path) -> Option<Rng> {
    let text = std::fs::read_to_string(out.join("fingerprint.json")).ok()?;
    serde_json::from_str::<Fingerprint>(&text)
        .ok()
        .map(|f| f.rng)
}

/// Check the frozen spec and fingerprint of an existing run directory, or freeze them.
/// A model named by its Hugging Face id keeps the commit its run started
/// from (see `ModelSpec::keep_snapshot_of`).
fn claim_out_dir(
    out: &Path,
    spec: &mut JobSpec,
    fp: &Fingerprint,
    force: bool,
    steps_recorded: u64,
) -> Result<()> {
    std::fs::create_dir_all(out)
        .with_context(|| format!("creating output directory {}", out.display()))?;
    let frozen = out.join("spec.yaml");
    if frozen.is_file() {
        let mut old = JobSpec::parse(&std::fs::read_to_string(&frozen)?, out)
            .with_context(|| format!("reading the frozen spec {}", frozen.display()))?;
        if steps_recorded > 0 {
            if let Some(note) = spec.model.keep_snapshot_of(&old.model)? {
                tracing::info!("{note}");
                // Found in another cache: the same commit, read from there.
                old.model.snapshot = spec.model.snapshot.clone();
            }
        }
        let spec = &*spec;
        if old.computes_the_same_as(spec) && &old != spec {
            // A new name or priority: the run goes on under it.
            durable::write(&frozen, spec.to_yaml())?;
        } else if &old != spec {
            let changes = old.differences(spec).join("; ");
            if steps_recorded > 0 {
                bail!(
                    "{} holds a run of a different job spec ({changes}); to start afresh there \
                     pass --restart (its {steps_recorded} recorded steps are discarded), or choose \
                     another --out",
                    out.display()
                );
            }
            // Nothing was trained yet (a run that failed before its first
            // step): the edited job simply takes the folder over.
            tracing::info!(
                "{} has no step recorded: the edited job file replaces the one it was started with ({changes})",
                out.display()
            );
            durable::write(&frozen, spec.to_yaml())?;
            let _ = std::fs::remove_file(out.join(tune_file::INITIAL_SHA256));
            let _ = std::fs::remove_file(out.join("fingerprint.json"));
            let _ = std::fs::remove_file(out.join(layer_split::FILE));
        }
    } else {
        durable::write(&frozen, spec.to_yaml())?;
    }
    let fp_path = out.join("fingerprint.json");
    if fp_path.is_file() {
        let old: Fingerprint = serde_json::from_str(&std::fs::read_to_string(&fp_path)?)?;
        if &old != fp {
            if !force {
                bail!(
                    "this run was started with determinism fingerprint {old} but this machine has {fp}; \
                     resuming would not be bit-identical. Pass --force to resume anyway."
                );
            }
            tracing::warn!("RESUMING WITH A DIFFERENT FINGERPRINT ({old} → {fp}): weights will NOT be bit-identical to an uninterrupted run");
        }
    } else {
        durable::write(&fp_path, serde_json::to_string_pretty(fp)?)?;
    }
    Ok(())
}

/// The result of a run in `out` that has already done all of `spec`'s steps.
fn finished_result(out: &Path, spec: &JobSpec, log: &dyn StepLog) -> Result<Option<RunResult>> {
    let path = out.join("result.json");
    let fine_tunes = spec.mode.contains(&Mode::Mezo);
    if !path.is_file() || (fine_tunes && !out.join("model").is_dir()) {
        return Ok(None);
    }
    let Ok(result) = serde_json::from_str::<RunResult>(&std::fs::read_to_string(&path)?) else {
        return Ok(None);
    };
    let finished = result.steps == spec.steps() && log.contiguous()?.len() as u64 >= spec.steps();
    Ok(finished.then_some(result))
}

/// Run (or resume) the job in `spec_path`, writing into `out`, with the seed
/// log in `out/seedlog` (sled).
pub fn run(spec_path: &Path, out: &Path, opts: &RunOptions) -> Result<Outcome> {
    let spec = JobSpec::load(spec_path)?;
    let log = open_run_folder(out, opts)?;
    let opts = RunOptions {
        job_file: Some(spec_path.to_path_buf()),
        ..opts.clone()
    };
    run_with_log(spec, out, &opts, Box::new(log))
}

/// The run folder `out` claimed for this process (refused if another run
/// holds it or it holds something else; emptied first with `--restart`),
/// and its seed log.
fn open_run_folder(out: &Path, opts: &RunOptions) -> Result<SeedLog> {
    out_dir::check_not_in_use(out)?;
    out_dir::check_is_a_run_folder(out, opts.force)?;
    if opts.restart {
        tracing::warn!("{}", out_dir::discard_run(out)?);
    }
    std::fs::create_dir_all(out)
        .with_context(|| format!("creating output directory {}", out.display()))?;
    // Another run may have taken the folder since the check above.
    SeedLog::open(&out.join("seedlog")).map_err(|e| {
        if out_dir::check_not_in_use(out).is_err() {
            out_dir::in_use(out)
        } else {
            e
        }
    })
}

/// Run (or resume) the job with step records going to `log`.  SIGINT or
/// SIGTERM (or a closed log) stops it within about a second, whatever it is
/// doing, as `Outcome::Interrupted`; see [`interrupt`].
pub fn run_with_log(
    spec: JobSpec,
    out: &Path,
    opts: &RunOptions,
    log: Box<dyn StepLog>,
) -> Result<Outcome> {
    run_shared(spec, out, opts, log, None)
}

/// [`run_with_log`], with each step's directions shared with `replicas`.
pub fn run_shared(
    spec: JobSpec,
    out: &Path,
    opts: &RunOptions,
    log: Box<dyn StepLog>,
    replicas: Option<Replicas>,
) -> Result<Outcome> {
    let steps = (log.contiguous()?.len() as u64).min(spec.steps());
    interrupt::install(opts.job_file.as_deref(), out, opts.progress, steps)?;
    let replicated = replicas.is_some();
    match run_phases(spec, out, opts, log, replicas) {
        Err(e) => match interrupt::stopped(&e) {
            Some(stop) => Ok(Outcome::Interrupted {
                step: interrupt::steps_saved(),
                signal: stop.signal,
            }),
            // A stop reaches every replica; one whose exchange failed
            // because another stopped first (the leader in the middle of an
            // evaluation) stopped too.
            None => match interrupt::stop_requested() {
                Some(signal) if replicated => Ok(Outcome::Interrupted {
                    step: interrupt::steps_saved(),
                    signal,
                }),
                _ => Err(e),
            },
        },
        ran => ran,
    }
}

/// [`run_with_log`] in its phases: claim the output folder, open the job,
/// bring the weights to where the log ends, measure what comes before
/// training, train, finish.
fn run_phases(
    mut spec: JobSpec,
    out: &Path,
    opts: &RunOptions,
    mut log: Box<dyn StepLog>,
    replicas: Option<Replicas>,
) -> Result<Outcome> {
    let started = Instant::now();
    let threads = spec.model.threads.or(opts.threads).unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get() as i32)
            .unwrap_or(1)
    });
    tch::set_num_threads(threads);
    let placement = opts
        .device
        .map(Placement::One)
        .unwrap_or_else(|| spec.model.device.clone());
    // `auto` outside the daemon: the first GPU if there is one, else the CPU.
    let devices = placement.devices(placement == Placement::Auto && tch::Cuda::is_available());
    // What decides the defaults (z's generator, the peak's source): a GPU
    // where the model is on one.
    let device = main_device(&devices);
    let rng = spec
        .mezo
        .rng
        .or_else(|| frozen_rng(out))
        .unwrap_or_else(|| Rng::default_for(device));
    let fp = Fingerprint::of_devices(&devices, spec.model.dtype, threads, rng);
    claim_out_dir(
        out,
        &mut spec,
        &fp,
        opts.force,
        log.contiguous()?.len() as u64,
    )?;
    let finished = finished_result(out, &spec, &*log)?;
    if let Some(replicas) = &replicas {
        // Every replica starts where the leader's seed log ends.
        let records = log.contiguous()?;
        let leader = replicas
            .leads()
            .then_some((finished.is_some(), &records[..]));
        let (done_already, records) = replicas.share_start(leader)?;
        if !replicas.leads() {
            if done_already {
                return Ok(Outcome::Followed {
                    steps: spec.steps(),
                });
            }
            log.truncate_from(0)?;
            for rec in &records {
                log.append(rec)?;
            }
        }
    }
    if let Some(result) = finished {
        // Run again as it was: the result stands as measured (a rerun must
        // not replace its wall time by that of a no-op).
        tracing::info!(
            "{} has finished already; its result stays as it was (choose another --out to run again)",
            out.display()
        );
        return Ok(Outcome::Completed(result));
    }
    let (mut job, records) = Job::open(spec, out, opts, log, &devices, rng, threads, replicas)?;
    let done = records.len() as u64;
    let from = job.resume(&records)?;
    job.before_training(done)?;
    let total = job.spec.steps();
    let train_start = Instant::now();
    if let Some(stopped) = job.train(done, opts)? {
        return Ok(stopped);
    }
    if !job.leads() {
        return Ok(Outcome::Followed { steps: total });
    }
    let train_secs = train_start.elapsed().as_secs_f64();
    finish(job, done, from, total - done, train_secs, started, fp).map(Outcome::Completed)
}

impl Job {
    /// Load the model and the data, check every example against the task,
    /// and set the job up where its log ends; also the log's records that
    /// count (at most the job's steps).
    fn open(
        spec: JobSpec,
        out: &Path,
        opts: &RunOptions,
        mut log: Box<dyn StepLog>,
        devices: &[DeviceRef],
        rng: Rng,
        threads: i32,
        replicas: Option<Replicas>,
    ) -> Result<(Job, Vec<StepRecord>)> {
        let device = main_device(devices);
        let source = spec.model.source();
        let map = layer_split::device_map(out, &source, spec.model.dtype, devices)
            .with_context(|| format!("placing model {}", spec.model.describe()))?;
        let model = LanguageModel::open_placed(&source, spec.model.dtype, map, &spec.tuning())
            .with_context(|| format!("loading model {}", spec.model.describe()))?;
        interrupt::check()?;
        check_initial_adapters(out, &model, opts.force)?;
        let splits = load_job_splits(&spec)?;
        interrupt::check()?;
        if spec.mode.contains(&Mode::Mezo) {
            splits
                .check_batch_size(spec.mezo.batch_size)
                .map_err(anyhow::Error::msg)?;
        }
        let task = checked_task(&spec, &model, &splits)?;
        tracing::info!(
            "{} ({} trainable parameters, {} on {}, rng {}), {} train / {} dev / {} test examples",
            spec.model.describe(),
            model.params.numel(),
            spec.model.dtype,
            Placement::list(devices.to_vec())
                .map_or_else(|_| device.to_string(), |p| p.to_string()),
            rng,
            splits.train.len(),
            splits.dev.len(),
            splits.test.len()
        );
        let mut records = log.contiguous()?;
        records.truncate(spec.steps() as usize);
        let done = records.len() as u64;
        tracing::debug!("seed log: {done} of {} steps recorded", spec.steps());
        log.truncate_from(done)?;
        let (data_seed, batch_size, n_train) =
            (spec.data_seed(), spec.mezo.batch_size, splits.train.len());
        let spec_steps = spec.steps();
        let metrics = MetricsFile::open(&out.join("metrics.jsonl"), &records, |step| {
            batch_indices(data_seed, step, batch_size, n_train)
        })?;
        let name = job_name(spec.name.as_deref(), opts.job_file.as_deref(), out);
        let perturbation = spec.mezo.perturbation();
        let job = Job {
            spec,
            out: out.to_path_buf(),
            name,
            model,
            task,
            train: splits.train,
            dev: splits.dev,
            test: splits.test,
            log,
            metrics,
            z: ZSweep::new(rng, threads as usize).with_perturbation(perturbation),
            device,
            memory_estimate: opts.memory_estimate,
            progress: Progress::new(opts.progress, done, spec_steps),
            replicas,
            snapshot_dir: opts
                .snapshot_dir
                .clone()
                .unwrap_or_else(|| out.join("snapshots")),
        };
        Ok((job, records))
    }

    /// Bring the weights to where the log ends: the newest valid snapshot,
    /// then the rest of the log replayed.  The snapshot's step.
    fn resume(&mut self, records: &[StepRecord]) -> Result<u64> {
        let done = records.len() as u64;
        let from =
            snapshot::restore_latest(&self.snapshots(), done, &self.model.params)?.unwrap_or(0);
        tracing::debug!(
            "resume: weights from the snapshot of step {from}, replaying steps {from}..{done}"
        );
        let replay_start = Instant::now();
        self.replay(&records[from as usize..])?;
        if done > 0 {
            tracing::info!(
                "resumed at step {done}: snapshot of step {from}, {} steps replayed in {:.2}s",
                done - from,
                replay_start.elapsed().as_secs_f64()
            );
        }
        Ok(from)
    }

    /// What is measured before the first step (once: a resumed run has it):
    /// the base model on dev and test, the baselines; and an evaluation a
    /// stop fell between its step and itself.
    fn before_training(&mut self, done: u64) -> Result<()> {
        if !self.leads() {
            return Ok(());
        }
        if done == 0 && !self.metrics.has_eval(0) {
            self.evaluate(0)?; // the zero-shot baseline
        }
        if done == 0 && !self.test.is_empty() && read_zero_shot_test(&self.out).is_none() {
            // The base model on the test split, once, for the comparison at the end.
            let e = self.evaluate_split("test", 0)?;
            tracing::info!("step 0: test {} {:.4}", self.task.metric_name(), e.metric);
            let zero_shot = ZeroShotTest {
                metric: e.metric,
                correct: e.correct,
            };
            durable::write(
                &self.out.join("zero_shot_test.json"),
                serde_json::to_string(&zero_shot)?,
            )?;
        }
        if done == 0 {
            self.baselines()?;
        }
        let every = self.spec.mezo.eval_every;
        if done > 0
            && every > 0
            && done % every == 0
            && done < self.spec.steps()
            && !self.metrics.has_eval(done)
        {
            // Stopped between a step and its evaluation.
            let evaluated = self.evaluate(done);
            self.at_boundary(done, evaluated)?;
        }
        Ok(())
    }

    /// Steps `done..` to the last, each logged durably, with the job's
    /// evaluations and snapshots between them; `Some` when a stop was asked
    /// for at a step boundary.  A stop during an evaluation ends it as
    /// [`interrupt::Stopped`], the weights saved all the same; one inside a
    /// step (an F1 objective generates token by token) saves nothing, as the
    /// weights are perturbed there: the resume does that step again.
    fn train(&mut self, done: u64, opts: &RunOptions) -> Result<Option<Outcome>> {
        let total = self.spec.steps();
        self.progress.start_steps(done);
        let snapshot_every = self
            .spec
            .mezo
            .snapshot_every
            .or(opts.snapshot_every)
            .unwrap_or(DEFAULT_SNAPSHOT_EVERY);
        let eval_every = self.spec.mezo.eval_every;
        for step in done..total {
            // Replicas stop together: a stop goes out with the step's
            // exchange, and all of them stop after that step.
            if let (Some(signal), None) = (interrupt::stop_requested(), &self.replicas) {
                return interrupted(self, step, signal).map(Some);
            }
            let rec = self.train_step(step)?;
            let n = step + 1;
            interrupt::note_steps_saved(n);
            self.progress.step(n, rec.loss_plus, rec.projected_grad);
            if self.replicas.as_ref().is_some_and(Replicas::stop_asked) {
                let signal = interrupt::stop_requested().unwrap_or(signal_hook::consts::SIGTERM);
                return interrupted(self, n, signal).map(Some);
            }
            if !self.leads() {
                continue;
            }
            if eval_every > 0 && n % eval_every == 0 && n < total {
                let evaluated = self.evaluate(n);
                self.at_boundary(n, evaluated)?;
            }
            if snapshot_every > 0 && n % snapshot_every == 0 && n < total {
                snapshot::save(&self.snapshots(), n, &self.model.params, 2)?;
            }
        }
        Ok(None)
    }

    fn snapshots(&self) -> PathBuf {
        self.snapshot_dir.clone()
    }

    /// Save the weights a stop finds at the boundary after `step` steps, so
    /// that the resume replays nothing: not at step 0 (the base model is
    /// rebuilt as it is), nor where that snapshot exists already.
    fn save_at_stop(&self, step: u64) -> Result<()> {
        self.progress.abandon();
        let dir = self.snapshots();
        if !self.leads() || step == 0 || snapshot::list(&dir)?.contains(&step) {
            return Ok(());
        }
        snapshot::save(&dir, step, &self.model.params, 2)
    }

    /// What `work`, done with the weights at the boundary after `step`
    /// steps, came to; a stop inside it saves those weights first, as a stop
    /// between steps does.
    fn at_boundary<T>(&self, step: u64, work: Result<T>) -> Result<T> {
        if let Err(e) = &work {
            if interrupt::stopped(e).is_some() {
                self.save_at_stop(step)?;
            }
        }
        work
    }
}

/// The job's task, limited to the model's positions, with every example of
/// every split checked against it.
fn checked_task(
    spec: &JobSpec,
    model: &LanguageModel,
    splits: &crate::data::Splits,
) -> Result<Task> {
    let mut task = Task::from_spec(spec)?;
    if let Some(limit) = model.max_positions() {
        if spec.task.max_length > limit {
            tracing::info!(
                "task.max_length {} is beyond the model's {limit} positions: sequences keep their last {limit} tokens",
                spec.task.max_length
            );
        }
        task.limit_length(limit);
    }
    // Long splits take a while to tokenize: a stop is answered between them.
    task.check(model, &splits.train, |i| splits.origin("training", i))?;
    interrupt::check()?;
    task.check(model, &splits.dev, |i| splits.origin("dev", i))?;
    interrupt::check()?;
    task.check(model, &splits.test, |i| splits.origin("test", i))?;
    interrupt::check()?;
    for (answer, ids) in task.answer_word_ids(model)? {
        if ids.len() > 1 {
            tracing::info!(
                "the answer {answer:?} is {} tokens for this tokenizer: it is scored by their mean log-probability",
                ids.len()
            );
        }
    }
    Ok(task)
}

/// A stop between steps: the weights after `step` steps saved, the run's outcome.
fn interrupted(job: &Job, step: u64, signal: i32) -> Result<Outcome> {
    job.save_at_stop(step)?;
    Ok(Outcome::Interrupted { step, signal })
}

/// LoRA and prefix runs start from adapters built from the seed (a prefix by a
/// forward pass): record their SHA-256 on the first start, and check it on a
/// resume, where a different start would silently break the exact replay.
fn check_initial_adapters(out: &Path, model: &LanguageModel, force: bool) -> Result<()> {
    if model.tuning == Tuning::Full {
        return Ok(());
    }
    let path = out.join(tune_file::INITIAL_SHA256);
    let here = tune_file::params_sha256(&model.params);
    match std::fs::read_to_string(&path) {
        Ok(recorded) if recorded.trim() == here => Ok(()),
        Ok(recorded) if force => {
            tracing::warn!(
                "the starting {} tensors differ from the run's (SHA-256 {here} vs {}); \
                 resuming anyway (--force): no longer bit-identical",
                model.tuning.name(),
                recorded.trim()
            );
            Ok(())
        }
        Ok(recorded) => bail!(
            "the starting {} tensors built here differ from those the run started from \
             (SHA-256 {here} vs {}): a prefix starts from a forward pass, whose last bits \
             depend on the device, dtype and CPU; pass --force to resume anyway",
            model.tuning.name(),
            recorded.trim()
        ),
        Err(_) => {
            durable::write(&path, &here)?;
            Ok(())
        }
    }
}

/// Final evaluation, the exported weights (final, or best with `export:
/// best`), result and picture.
fn finish(
    mut job: Job,
    done: u64,
    from: u64,
    trained: u64,
    train_secs: f64,
    started: Instant,
    fp: Fingerprint,
) -> Result<RunResult> {
    let total = job.spec.steps();
    if !job.metrics.has_eval(total) {
        job.evaluate(total)?;
    }
    let evals = job.metrics.evals();
    let best = exported::best_evaluation(&evals, job.task.higher_is_better());
    let best_step = best.map(|b| b.step).unwrap_or(total);
    let best = best.cloned();
    let exported = if job.spec.mode.contains(&Mode::Mezo) {
        let (exported_job, exported) = export_weights(job, best.as_ref(), total)?;
        job = exported_job;
        Some(exported)
    } else {
        tracing::info!(
            "baselines only (`mode` does not list mezo): nothing was fine-tuned, no model exported"
        );
        None
    };
    let test = match &exported {
        Some(exported) if !job.test.is_empty() => {
            let e = job.evaluate_split("test", exported.step)?;
            tracing::info!(
                "test {} of the exported weights (step {}): {:.4}",
                job.task.metric_name(),
                exported.step,
                e.metric
            );
            Some(e)
        }
        _ => None,
    };
    let zero_shot_test = read_zero_shot_test(&job.out);
    // Accuracy tasks: the same test examples, answered by the base model and by the export.
    let base_correct = zero_shot_test.as_ref().and_then(|z| z.correct.as_deref());
    let tuned_correct = test.as_ref().and_then(|e| e.correct.as_deref());
    let test_paired = base_correct
        .zip(tuned_correct)
        .and_then(|(b, t)| Paired::compare(b, t));
    if let Some(p) = &test_paired {
        tracing::info!("{}", p.summary());
    }
    let train_points: Vec<(u64, f64)> = job
        .metrics
        .steps()
        .iter()
        .map(|r| (r.step, r.loss_plus))
        .collect();
    let dev_points: Vec<(u64, f64)> = evals.iter().map(|e| (e.step, e.value)).collect();
    let chart = plot::LossChart {
        title: &job.name,
        train: &train_points,
        dev: &dev_points,
        dev_metric: job.task.metric_name(),
    };
    if job.spec.mode.contains(&Mode::Mezo) {
        durable::write(&job.out.join("loss.svg"), plot::loss_chart_svg(&chart)?)?;
    }
    let (peak_memory_bytes, peak_memory_source) = measured_peak(job.device);
    let result = RunResult {
        metric: job.task.metric_name().into(),
        zero_shot: evals.iter().find(|e| e.step == 0).map(|e| e.value),
        best: best.map(|b| b.value),
        best_step,
        exported,
        final_metric: evals
            .iter()
            .rev()
            .find(|e| e.step == total)
            .map(|e| e.value),
        test_metric: test.as_ref().map(|e| e.metric),
        zero_shot_test: zero_shot_test.map(|z| z.metric),
        test_paired,
        baselines: std::fs::read_to_string(job.out.join("baselines.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok()),
        test_loss: test.as_ref().map(|e| e.loss),
        steps: total,
        resumed_from: done,
        replayed_steps: done - from,
        wall_time_s: started.elapsed().as_secs_f64(),
        steps_per_s: if train_secs > 0.0 {
            trained as f64 / train_secs
        } else {
            0.0
        },
        peak_memory_bytes,
        peak_memory_source,
        memory_estimate_bytes: job.memory_estimate,
        trainable_parameters: job.model.params.numel(),
        fingerprint: fp,
    };
    durable::write(
        &job.out.join("result.json"),
        serde_json::to_string_pretty(&result)?,
    )?;
    job.progress.finish();
    Ok(result)
}

/// Put the weights the job exports in memory (the final ones are there; the
/// best are rebuilt from the seed log) and write `model/` and `adapter/`.
fn export_weights(mut job: Job, best: Option<&EvalLine>, total: u64) -> Result<(Job, Exported)> {
    let (step, why) = exported::choose(job.spec.export, best, total);
    if step != total {
        // The best weights are not kept in memory: rebuild them from the log.
        tracing::info!("exporting the best weights (step {step}) rebuilt from the seed log");
        let records = job.log.contiguous()?;
        // Free the trained weights first: peak memory stays that of one model.
        let map = job.model.map.clone();
        drop(job.model);
        job.model = LanguageModel::open_placed(
            &job.spec.model.source(),
            job.spec.model.dtype,
            map,
            &job.spec.tuning(),
        )?;
        let from = snapshot::restore_latest(&job.out.join("snapshots"), step, &job.model.params)?
            .unwrap_or(0);
        job.replay(&records[from as usize..step as usize])?;
    }
    export_hf(&job.model, &job.out.join("model"))?;
    let peft = match job.model.tuning {
        Tuning::Lora(_) => true,
        Tuning::Prefix(_) => !job.model.is_masked_lm(),
        Tuning::Full => false,
    };
    if peft {
        export_peft_adapter(&job.model, &job.out.join("adapter"))?;
    }
    let exported = Exported::new(job.spec.export, step, why, lora_is_zero(&job.model));
    tracing::info!("exported {}", exported.why);
    Ok((job, exported))
}

/// Whether a LoRA model's every `lora_B` is zero: its adapters add nothing.
fn lora_is_zero(model: &LanguageModel) -> bool {
    matches!(model.tuning, Tuning::Lora(_))
        && model
            .params
            .iter()
            .filter(|p| p.name.contains("lora_B"))
            .all(|p| p.tensor.count_nonzero(None::<i64>).int64_value(&[]) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_is_named_by_its_job_file_else_its_folder() {
        let out = Path::new("runs/elsewhere");
        assert_eq!(
            job_name(None, Some(Path::new("jobs/sst2.yaml")), out),
            "sst2"
        );
        assert_eq!(job_name(None, None, out), "elsewhere");
        assert_eq!(
            job_name(None, None, Path::new("/state/jobs/12/run")),
            "job 12"
        );
        assert_eq!(job_name(None, None, Path::new("mine/run")), "run");
        assert_eq!(
            job_name(Some("sentiment"), None, Path::new("/state/jobs/12/run")),
            "sentiment"
        );
    }

    #[test]
    fn a_run_keeps_the_generator_it_started_with() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(frozen_rng(dir.path()), None, "a new run has none");
        // A run from before `mezo.rng` existed: its fingerprint has no rng field.
        let old = r#"{"device":"cpu","gpu":null,"torch":"2.11.0","dtype":"f32","threads":2}"#;
        std::fs::write(dir.path().join("fingerprint.json"), old).unwrap();
        assert_eq!(frozen_rng(dir.path()), Some(Rng::Torch));
        let fp = Fingerprint::current(DeviceRef::Cpu, crate::model::Dtype::F32, 2, Rng::Fast);
        std::fs::write(
            dir.path().join("fingerprint.json"),
            serde_json::to_string(&fp).unwrap(),
        )
        .unwrap();
        assert_eq!(frozen_rng(dir.path()), Some(Rng::Fast));
        assert_eq!(Rng::default_for("cpu".parse().unwrap()), Rng::Fast);
        assert_eq!(Rng::default_for("cuda:0".parse().unwrap()), Rng::Torch);
    }

    #[test]
    fn the_base_models_test_answers_are_read_in_either_form() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("zero_shot_test.json");
        assert_eq!(read_zero_shot_test(dir.path()), None);
        // Runs before per-example answers wrote the bare metric.
        std::fs::write(&path, "0.8125").unwrap();
        let old = read_zero_shot_test(dir.path()).unwrap();
        assert_eq!((old.metric, old.correct), (0.8125, None));
        std::fs::write(&path, r#"{"metric":0.5,"correct":[true,false]}"#).unwrap();
        let new = read_zero_shot_test(dir.path()).unwrap();
        assert_eq!((new.metric, new.correct), (0.5, Some(vec![true, false])));
        // A loss task keeps no answers.
        std::fs::write(&path, r#"{"metric":2.5}"#).unwrap();
        assert_eq!(read_zero_shot_test(dir.path()).unwrap().correct, None);
    }
}
