//! `mezod bench`: time one kind of work on a fixed batch, in a process of its
//! own (so its peak memory is its own), for `make bench` to compare.
//!
//! The batch is `batch × tokens` token ids from a fixed formula that the
//! Python reference (`bench/reference_step.py`) reproduces, with the mean
//! next-token cross-entropy as the loss: the same work on both sides.  With
//! `--job`, it is instead the first `batch` training examples of a job and
//! the job's own loss (e.g. a classification task's candidates), scored as
//! `--scoring` says.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;
use tch::Device;

use crate::data::task::{causal_lm_loss, Task};
use crate::data::{load_splits, Example};
use crate::estimate::estimate;
use crate::mezo::{live_step, replay_step, Logged, Rng, StepConfig, StepSeeds, ZSweep};
use crate::model::adapters::{LoraConfig, PrefixConfig, Tuning};
use crate::model::{torch_device, Dtype, LanguageModel, ModelSource};
use crate::spec::{JobSpec, TuningKind};
use mezod_core::estimator::{Estimator, EstimatorName, RecordTrailer};
use mezod_core::mezo_options::Perturbation;
use mezod_core::model_ref::DeviceRef;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchMode {
    /// One loss evaluation (a forward pass) per iteration.
    Forward,
    /// One live step of `--estimator` per iteration (MeZO: two forward
    /// passes, three z passes).
    Step,
    /// One replayed step of `--estimator` (its z passes, no forward) per iteration.
    Replay,
}

/// How a classification job's candidates are scored (`--job` only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scoring {
    /// As jobs do: one sequence per example when every answer is one token.
    Shared,
    /// One sequence per candidate answer always (the path the shared one replaced).
    PerCandidate,
}

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Hugging Face model directory or GGUF file.
    #[arg(long, required_unless_present_any = ["config", "job"], conflicts_with_all = ["config", "job"])]
    pub model: Option<PathBuf>,
    /// Instead of --model: a job file; its model, its task's loss on its
    /// first --batch training examples (--tokens is unused).
    #[arg(long, conflicts_with = "config")]
    pub job: Option<PathBuf>,
    /// With --job: how a classification task's candidates are scored.
    #[arg(long, value_enum, default_value = "shared", requires = "job")]
    pub scoring: Scoring,
    /// Instead of --model: a config.json, with random weights from --seed
    /// (any size without a download, e.g. bench/configs/opt-6.7b.json).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Seed of the random weights of --config.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// `cpu` or `cuda[:N]`.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceRef,
    /// What to time: a forward pass, a live MeZO step, or a replayed one.
    #[arg(long, value_enum)]
    pub mode: BenchMode,
    /// Sequences per batch.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 64)]
    pub tokens: usize,
    /// Timed iterations (after one untimed warm-up).
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    /// CPU threads for libtorch.
    #[arg(long, default_value_t = 2)]
    pub threads: i32,
    /// Parameter dtype: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: Dtype,
    /// Generator of z: fast (counter-based, parallel) or torch (PyTorch's);
    /// default: fast on CPU, torch on GPU, as for jobs.
    #[arg(long, value_enum)]
    pub rng: Option<Rng>,
    /// The step's estimator, as `mezo.estimator` in a job.
    #[arg(long, value_enum, default_value = "mezo")]
    pub estimator: EstimatorName,
    /// Directions per step (`mezo.directions`); default: 8 for fzoo, else 1.
    #[arg(long)]
    pub directions: Option<usize>,
    /// Distribution of z (`mezo.perturbation`); default: the estimator's
    /// (rademacher for fzoo, else gaussian).
    #[arg(long, value_enum)]
    pub perturbation: Option<Perturbation>,
    /// Sparse MeZO: the fraction of each tensor's weights a step leaves alone
    /// (`mezo.sparsity`; default 0.75).
    #[arg(long)]
    pub sparsity: Option<f64>,
    /// LOZO: the rank of each weight matrix's direction U·Vᵀ (`mezo.rank`;
    /// default 1).
    #[arg(long)]
    pub rank: Option<usize>,
    /// What the step perturbs: every weight, LoRA adapters (r 8, α 16, the
    /// query/value projections) or 5-token key/value prefixes.
    #[arg(long, value_enum, default_value = "full")]
    pub tuning: TuningKind,
}

impl BenchArgs {
    fn source(&self) -> Result<ModelSource> {
        if let Some(job) = &self.job {
            return Ok(JobSpec::load(job)?.model.source());
        }
        Ok(match (&self.model, &self.config) {
            (Some(m), _) => ModelSource::Pretrained(m.clone()),
            (None, Some(c)) => ModelSource::Random {
                config: c.clone(),
                seed: self.seed,
            },
            (None, None) => unreachable!("clap requires --model, --config or --job"),
        })
    }

    /// The job admission control would size for this batch (causal LM, every
    /// sequence `tokens` long).
    fn as_job(&self) -> Result<JobSpec> {
        let mut spec = self.base_job()?;
        let rules = "--estimator, --directions, --sparsity and --rank follow a job's mezo rules";
        // A `--job`'s own sparsity, rank and period count unless the flags
        // say otherwise, and only for its estimator; a job's rules:
        // --sparsity only with sparse, --rank only with lozo, ….
        let estimator = spec
            .mezo
            .estimator()
            .renamed(self.estimator, self.sparsity, self.rank)
            .map_err(anyhow::Error::msg)
            .context(rules)?;
        spec.mezo.set_estimator(estimator);
        spec.mezo.directions = self.directions();
        spec.mezo.perturbation = self.perturbation;
        spec.validate().context(rules)?;
        Ok(spec)
    }

    /// What the benchmark tunes: `--tuning` with the paper's settings.
    fn tuning(&self) -> Tuning {
        match self.tuning {
            TuningKind::Full => Tuning::Full,
            TuningKind::Lora => Tuning::Lora(LoraConfig {
                r: 8,
                alpha: 16.0,
                targets: Vec::new(),
                seed: 0,
            }),
            TuningKind::Prefix => Tuning::Prefix(PrefixConfig { tokens: 5, seed: 0 }),
        }
    }

    /// Directions per step: as given, else 8 for FZOO and 1 for the others.
    fn directions(&self) -> usize {
        let named = Estimator::from_settings(self.estimator, None, None, None)
            .expect("an estimator's defaults are valid settings");
        self.directions.unwrap_or(named.default_directions())
    }

    fn base_job(&self) -> Result<JobSpec> {
        if let Some(job) = &self.job {
            let mut spec = JobSpec::load(job)?;
            spec.mezo.batch_size = self.batch;
            spec.model.device = self.device.into();
            spec.model.dtype = self.dtype;
            return Ok(spec);
        }
        let source = match self.source()? {
            ModelSource::Pretrained(p) => format!("path: {}", p.display()),
            ModelSource::Random { config, seed } => {
                format!("config: {}, init: random, seed: {seed}", config.display())
            }
            ModelSource::Shapes { config } => format!("config: {}, init: random", config.display()),
        };
        let dtype = format!("{:?}", self.dtype).to_lowercase();
        let yaml = format!(
            "model: {{{source}, dtype: {dtype}, device: {}}}\ntask: {{kind: causal_lm, max_length: {}}}\n\
             data: {{train: unused.jsonl}}\nmezo: {{steps: 1, lr: 0, batch_size: {}}}\n",
            self.device, self.tokens, self.batch
        );
        JobSpec::parse(&yaml, &std::env::current_dir()?)
    }
}

#[derive(Debug, Serialize)]
pub struct BenchResult {
    pub mode: BenchMode,
    /// With `--job`: how its candidates were scored.
    pub scoring: Option<Scoring>,
    pub rng: Rng,
    pub estimator: EstimatorName,
    pub perturbation: Perturbation,
    pub directions: usize,
    /// Sparse MeZO's sparsity, LOZO's rank (None for the other estimators).
    pub sparsity: Option<f64>,
    pub rank: Option<usize>,
    /// Forward passes in one live step of this estimator.
    pub forward_passes_per_step: usize,
    pub device: DeviceRef,
    pub dtype: Dtype,
    pub batch: usize,
    pub tokens: usize,
    /// The GPU's name as NVML gives it (None on CPU, or without NVML).
    pub gpu: Option<String>,
    pub seconds_per_iter: f64,
    /// CPU: VmHWM of the timed loop.  GPU: this process's VmHWM (host side).
    pub peak_rss_bytes: u64,
    /// GPU: this process's memory on the device by NVML (the caching allocator
    /// keeps its peak reserved), taken after the loop.
    pub peak_gpu_bytes: Option<u64>,
    /// What admission control estimates for this batch as a job.
    pub estimate_bytes: u64,
    pub parameters: i64,
    pub last_loss: Option<f64>,
    /// Step mode: the part of each step spent in its forward passes.
    pub forward_seconds_in_step: Option<f64>,
}

/// Token ids `(i * 7919 + j * 104729 + 13) mod (vocab − 1) + 1` for sequence i, position j.
pub fn batch_ids(batch: usize, tokens: usize, vocab: i64) -> Vec<Vec<i64>> {
    (0..batch as i64)
        .map(|i| {
            (0..tokens as i64)
                .map(|j| (i * 7919 + j * 104_729 + 13) % (vocab - 1) + 1)
                .collect()
        })
        .collect()
}

/// Load the model, run one untimed iteration (allocator and thread-pool
/// warm-up), then time `--iters` of them.
pub fn run_bench(args: &BenchArgs) -> Result<BenchResult> {
    tch::set_num_threads(args.threads);
    let job = args.as_job()?;
    let estimate_bytes = estimate(&job, args.device.is_gpu())?.total();
    let model = LanguageModel::open_tuned(
        &args.source()?,
        args.dtype,
        torch_device(args.device),
        &args.tuning(),
    )?;
    let input = Input::of(args, &model)?;
    let mut work = Work::new(args, &job, &model, &input);
    work.once(0)?;
    // Peak memory of the timed loop only (Linux: "5" resets VmHWM to the
    // current RSS), so that loading the model does not mask it.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    work.sync();
    let start = Instant::now();
    for i in 1..=args.iters {
        work.once(i)?;
    }
    work.sync();
    let seconds_per_iter = start.elapsed().as_secs_f64() / args.iters as f64;
    Ok(work.result(args, estimate_bytes, seconds_per_iter))
}

/// What each iteration's forward passes read: the fixed token batch, or a
/// `--job`'s task and first training examples.
struct Input {
    seqs: Vec<Vec<i64>>,
    job: Option<(Task, Vec<Example>)>,
}

impl Input {
    fn of(args: &BenchArgs, model: &LanguageModel) -> Result<Input> {
        let config: serde_json::Value = serde_json::from_str(&model.config_text)?;
        let vocab = config["vocab_size"].as_i64().unwrap_or(1000);
        Ok(Input {
            seqs: batch_ids(args.batch, args.tokens, vocab),
            job: match &args.job {
                Some(job) => Some(job_batch(job, args, model)?),
                None => None,
            },
        })
    }

    /// The loss of `model` on the input: the job's own, or the mean
    /// next-token cross-entropy of the token batch.
    fn loss(&self, model: &LanguageModel) -> Result<f64> {
        match &self.job {
            Some((task, examples)) => task.loss(model, &examples.iter().collect::<Vec<_>>()),
            None => causal_lm_loss(model, &self.seqs),
        }
    }
}

/// One kind of work (`--mode`) on the model, repeated, with what it measured.
struct Work<'a> {
    mode: BenchMode,
    model: &'a LanguageModel,
    input: &'a Input,
    device: Device,
    z: ZSweep,
    estimator: Estimator,
    directions: usize,
    cfg: StepConfig,
    /// LOZO: V from the period's seed, as a job's first steps draw it.
    basis: Option<u64>,
    last_loss: Option<f64>,
    /// Time spent in the timed steps' own forward passes (the rest is z).
    forward_secs: f64,
}

impl<'a> Work<'a> {
    fn new(args: &BenchArgs, job: &JobSpec, model: &'a LanguageModel, input: &'a Input) -> Self {
        let estimator = job.mezo.estimator();
        let directions = args.directions();
        let rng = args.rng.unwrap_or_else(|| Rng::default_for(args.device));
        Work {
            mode: args.mode,
            model,
            input,
            device: torch_device(args.device),
            z: ZSweep::new(rng, args.threads.max(1) as usize)
                .with_perturbation(job.mezo.perturbation()),
            estimator,
            directions,
            cfg: StepConfig {
                eps: 1e-3,
                lr: 1e-7,
                weight_decay: 0.0,
            },
            basis: StepSeeds::of(estimator, 0, 0, directions).basis,
            last_loss: None,
            forward_secs: 0.0,
        }
    }

    /// Wait for the GPU's queue, so that a time covers the work.
    fn sync(&self) {
        if let Device::Cuda(n) = self.device {
            tch::Cuda::synchronize(n as i64);
        }
    }

    /// Iteration `i` (0 is the untimed warm-up).
    fn once(&mut self, i: usize) -> Result<()> {
        let seeds = StepSeeds::of(self.estimator, 0, i as u64, self.directions).directions;
        match self.mode {
            BenchMode::Forward => {
                let _guard = tch::no_grad_guard();
                self.last_loss = Some(self.input.loss(self.model)?);
            }
            BenchMode::Step => {
                let (model, input, forward_secs) = (self.model, self.input, &mut self.forward_secs);
                let device = self.device;
                let mut loss = || {
                    let t = Instant::now();
                    let l = input.loss(model);
                    if let Device::Cuda(n) = device {
                        tch::Cuda::synchronize(n as i64);
                    }
                    if i > 0 {
                        *forward_secs += t.elapsed().as_secs_f64();
                    }
                    l
                };
                let out = live_step(
                    &model.params,
                    &self.z,
                    self.estimator,
                    &seeds,
                    self.basis,
                    &self.cfg,
                    &mut loss,
                )?;
                self.last_loss = Some(out.outcomes[0].loss_plus);
            }
            BenchMode::Replay => {
                let logged = Logged {
                    spread: (self.estimator.record_trailer() == RecordTrailer::Spread)
                        .then_some(1.0),
                    basis: self.basis,
                };
                replay_step(
                    &self.model.params,
                    &self.z,
                    self.estimator,
                    &seeds,
                    &vec![0.1; self.directions],
                    logged,
                    &self.cfg,
                )?;
            }
        }
        Ok(())
    }

    fn result(&self, args: &BenchArgs, estimate_bytes: u64, seconds_per_iter: f64) -> BenchResult {
        let gpu = args.device.is_gpu();
        let (sparsity, rank, _) = self.estimator.settings();
        BenchResult {
            mode: args.mode,
            scoring: args.job.as_ref().map(|_| args.scoring),
            rng: self.z.rng(),
            estimator: self.estimator.name(),
            perturbation: self.z.perturbation(),
            directions: self.directions,
            sparsity,
            rank,
            forward_passes_per_step: self.estimator.forward_passes(self.directions),
            device: args.device,
            dtype: args.dtype,
            batch: args.batch,
            tokens: args.tokens,
            gpu: gpu.then(crate::gpu::model_name).flatten(),
            peak_gpu_bytes: gpu
                .then(|| crate::gpu::process_memory(std::process::id(), None))
                .flatten(),
            estimate_bytes,
            seconds_per_iter,
            peak_rss_bytes: crate::run::peak_rss_bytes(),
            parameters: self.model.params.numel(),
            last_loss: self.last_loss,
            forward_seconds_in_step: (args.mode == BenchMode::Step)
                .then(|| self.forward_secs / args.iters as f64),
        }
    }
}

/// A job's task (cut to the model's positions; candidates scored as
/// `--scoring` says) and its first `--batch` training examples.
fn job_batch(
    job: &std::path::Path,
    args: &BenchArgs,
    model: &LanguageModel,
) -> Result<(Task, Vec<Example>)> {
    let spec = JobSpec::load(job)?;
    let mut task = Task::from_spec(&spec)?;
    if let Some(limit) = model.max_positions() {
        task.limit_length(limit);
    }
    if args.scoring == Scoring::PerCandidate {
        task.score_per_candidate();
    }
    let mut train = load_splits(&spec.data, &spec.task.label_field)?.train;
    train.truncate(args.batch);
    Ok((task, train))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_batch_formula_stays_inside_the_vocabulary() {
        let ids = batch_ids(3, 5, 320);
        assert_eq!(ids.len(), 3);
        assert!(ids.iter().flatten().all(|&i| (1..320).contains(&i)));
        assert_ne!(ids[0], ids[1]);
        assert_eq!(ids[1][2], (7919 + 2 * 104_729 + 13) % 319 + 1);
    }
}
