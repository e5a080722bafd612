//! How much memory a job needs: the figure admission control compares with
//! free GPU (or CPU) memory before it starts a job.
//!
//! MeZO trains at inference memory, so the estimate is an inference estimate:
//!
//! * **weights** at the job's dtype (every stored tensor, from the safetensors
//!   headers or the GGUF tensor directory; nothing is loaded);
//! * **adapters** (LoRA, prefix) beside the frozen weights, counted from the
//!   target layers' shapes (prefix: tokens × hidden per key and value per layer,
//!   an upper bound under grouped KV heads);
//! * **z's temporary**: with `rng: torch`, one tensor the size of the largest
//!   trainable parameter (its z); with `rng: fast`, one chunk per thread (kilobytes);
//! * **activations of one layer** (layers run one after another without
//!   autograd, so only one layer's are alive): sequences × tokens ×
//!   (6·hidden + 3·intermediate) for the residual, norms, q/k/v, output and
//!   MLP, plus 2 × heads × tokens² for the attention scores and softmax;
//! * **logits**: sequences × positions × vocab at the model dtype, the f32 copy
//!   and the f32 log-softmax; in bf16/f16 4 more bytes per logit, measured on
//!   both devices (on CPU the matmul keeps an f32 result before rounding; on
//!   an H200 without them the estimate was 6–13 % under NVML's peak);
//! * **runtime**: the CUDA context and allocator slack on a GPU, the libtorch
//!   and tokenizer runtime on CPU;
//! * **mask** (`mezo.estimator: sparse` only): one bit per trainable weight,
//!   kept for the step's passes, and the temporaries that build and unpack it.
//!   FZOO and MeZO keep nothing beside the weights;
//! * **factors** (`mezo.estimator: lozo` only): every matrix's U and V while a
//!   pass builds the low-rank directions, (rows + columns) × rank summed over
//!   the base's matrices (adapters have fewer); with `rng: torch` and rank > 1 a second
//!   tensor the size of the largest parameter (each outer product before it is
//!   added).
//!
//! Sequences per forward = max(batch, eval batch) × candidates per example
//! (classification and multiple choice score one sequence per answer; a
//! masked LM reads one sequence per example).
//! Positions with logits = all tokens for causal LM; for answer scoring only
//! the answer's, counted as at most 8 tokens; a masked LM's mask token alone.
//! Tokens = `task.max_length` (cut to the model's learned positions, as the
//! engine cuts sequences), an upper bound: setting it close to the data's
//! real lengths gets a job admitted sooner.  The safety margin is the
//! daemon's, added on top when admitting.

use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::estimator::StepState;
use crate::gguf_header::{is_gguf, read_header};
use crate::mezo_options::{Rng, DEFAULT_CHUNK};
use crate::model_ref::{is_masked_lm, learned_positions, ModelSource, Placement};
use crate::placement::{plan_model, DeviceShare};
use crate::spec::{JobSpec, TaskKind};
use crate::tuning::{default_lora_targets, is_target, Tuning};
use crate::weight_files::safetensors_shapes;

/// CUDA context, cuBLAS workspaces and caching-allocator slack.
pub const GPU_RUNTIME_BYTES: u64 = 768 << 20;
/// Resident libtorch, tokenizer and process overhead on CPU: two-step jobs on
/// the tiny test models (under 6 MiB of weights, activations and logits)
/// peak at 360–368 MiB VmHWM with torch 2.11.
pub const CPU_RUNTIME_BYTES: u64 = 384 << 20;

/// Answer tokens assumed per candidate when sizing the logits of answer scoring.
const ANSWER_POSITIONS: u64 = 8;

/// An estimate, by part, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Footprint {
    pub weights: u64,
    /// z's temporary: the largest parameter's size with `rng: torch`, chunks with `fast`.
    pub largest_tensor: u64,
    pub activations: u64,
    pub logits: u64,
    pub runtime: u64,
    /// Sparse MeZO's packed mask and its temporaries (0 for other estimators).
    #[serde(default)]
    pub mask: u64,
    /// LOZO's factors U and V of a matrix, and their temporaries (0 for other estimators).
    #[serde(default)]
    pub factors: u64,
}

impl Footprint {
    pub fn total(&self) -> u64 {
        self.weights
            + self.largest_tensor
            + self.activations
            + self.logits
            + self.runtime
            + self.mask
            + self.factors
    }
}

/// Elements the mask compares and packs at once (the engine's `mask::CHUNK`).
const MASK_CHUNK: u64 = 1 << 20;

/// The shape facts the estimate needs, under the names the architectures use.
#[derive(Debug, Deserialize)]
struct ShapeConfig {
    #[serde(alias = "n_embd", alias = "d_model")]
    hidden_size: u64,
    #[serde(default, alias = "ffn_dim", alias = "n_inner")]
    intermediate_size: Option<u64>,
    #[serde(alias = "n_head")]
    num_attention_heads: u64,
    vocab_size: u64,
    #[serde(default)]
    model_type: Option<String>,
}

/// (name, shape) of every parameter of a model.
pub type Shapes = Vec<(String, Vec<usize>)>;

/// Parameter shapes of the model a `config.json` describes, asked of the
/// engine (`mezod-engine shapes CONFIG`): only the architectures' own code
/// knows which tensors a config implies, and that code lives with libtorch.
/// Checkpoints on disk never need this; their headers list their tensors.
pub(crate) fn engine_shapes(config: &Path) -> Result<Shapes> {
    let exe = crate::engine::exe();
    let out = std::process::Command::new(&exe)
        .arg("shapes")
        .arg(config)
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("running {} to size a model", exe.display()))?;
    if !out.status.success() {
        anyhow::bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    serde_json::from_slice(&out.stdout).context("reading the engine's shapes")
}

/// Estimate the peak memory of `spec` on a GPU (`gpu = true`) or on CPU.
pub fn estimate(spec: &JobSpec, gpu: bool) -> Result<Footprint> {
    estimate_with(spec, gpu, engine_shapes)
}

/// [`estimate`] with another way to learn a config's parameter shapes (the
/// engine builds the model's placeholders itself).
pub fn estimate_with(
    spec: &JobSpec,
    gpu: bool,
    shapes_of_config: impl Fn(&Path) -> Result<Shapes>,
) -> Result<Footprint> {
    let (config, shapes) = config_and_shapes(&spec.model.source(), shapes_of_config)?;
    let cfg: ShapeConfig = serde_json::from_value(config.clone()).with_context(|| {
        format!(
            "the config of {} lacks the sizes needed to estimate memory (hidden size, heads, vocabulary)",
            spec.model.describe()
        )
    })?;
    let elem = spec.model.dtype.bytes() as u64;
    let device = if gpu {
        crate::model_ref::DeviceRef::Cuda(0)
    } else {
        crate::model_ref::DeviceRef::Cpu
    };
    let rng = spec.mezo.rng.unwrap_or_else(|| Rng::default_for(device));
    let (mut numel, mut largest, mut sides) = (0u64, 0u64, 0u64);
    for (_, shape) in &shapes {
        let n: u64 = shape.iter().map(|&d| d as u64).product();
        numel += n;
        largest = largest.max(n);
        if let [rows, cols] = shape.as_slice() {
            sides += (rows + cols) as u64;
        }
    }
    let mut trainable = numel;
    if let Some((adapter_numel, adapter_largest)) = adapter_sizes(&spec.tuning(), &shapes, &cfg) {
        numel += adapter_numel;
        largest = adapter_largest;
        trainable = adapter_numel;
    }
    let masked = cfg.model_type.as_deref().is_some_and(is_masked_lm);
    let candidates = match spec.task.kind {
        _ if masked => 1,
        TaskKind::CausalLm | TaskKind::Generation => 1,
        TaskKind::Classification => spec.task.label_words.as_ref().map_or(2, |w| w.len()),
        TaskKind::MultipleChoice => spec.task.choices.len().max(2),
    } as u64;
    let batch = spec
        .mezo
        .batch_size
        .max(spec.mezo.eval_batch_size.unwrap_or(0)) as u64;
    let seqs = batch * candidates;
    let tokens = tokens_per_sequence(spec, &config);
    let hidden = cfg.hidden_size;
    let inter = cfg.intermediate_size.unwrap_or(4 * hidden);
    let logit_positions = match spec.task.kind {
        _ if masked => 1,
        TaskKind::CausalLm => tokens,
        _ => tokens.min(ANSWER_POSITIONS),
    };
    let per_layer = seqs * tokens * (6 * hidden + 3 * inter)
        + 2 * seqs * cfg.num_attention_heads * tokens * tokens;
    Ok(Footprint {
        weights: numel * elem,
        largest_tensor: match rng {
            Rng::Torch => largest * elem,
            // A chunk of f32 normals per thread, plus its converted copy off the fast path.
            Rng::Fast => 64 * DEFAULT_CHUNK as u64 * 4 + 2 * DEFAULT_CHUNK as u64 * elem,
        },
        activations: per_layer * elem,
        logits: seqs * logit_positions * cfg.vocab_size * (elem + 8 + if elem < 4 { 4 } else { 0 }),
        runtime: if gpu {
            GPU_RUNTIME_BYTES
        } else {
            CPU_RUNTIME_BYTES
        },
        mask: if spec.mezo.estimator().step_state() == StepState::Mask {
            // The bits; a chunk's |θ|, comparison and bytes while building them;
            // unpacked: a whole tensor's bools and bytes with torch's z, a chunk's with fast.
            let unpacked = match rng {
                Rng::Torch => largest,
                Rng::Fast => (DEFAULT_CHUNK as u64).max(1 << 22).min(largest),
            };
            trainable.div_ceil(8) + MASK_CHUNK * (elem + 3) + 3 * unpacked
        } else {
            0
        },
        factors: if let StepState::Factors { rank } = spec.mezo.estimator().step_state() {
            let rank = rank as u64;
            let product = match rng {
                Rng::Torch if rank > 1 => largest * elem,
                _ => 0,
            };
            // U and V in f32 (fast) or at the dtype (torch).
            let factor_elem = match rng {
                Rng::Fast => 4,
                Rng::Torch => elem,
            };
            sides * rank * factor_elem + product
        } else {
            0
        },
    })
}

/// A model's `config.json` (a GGUF file's, built from its metadata) and the
/// name and shape of every tensor it stores, read from headers alone.
pub fn config_and_shapes(
    source: &ModelSource,
    shapes_of_config: impl Fn(&Path) -> Result<Shapes>,
) -> Result<(serde_json::Value, Shapes)> {
    Ok(match source {
        ModelSource::Pretrained(path) if is_gguf(path) => {
            let header = read_header(path)?;
            (header.config, header.shapes)
        }
        ModelSource::Pretrained(dir) => {
            let path = dir.join("config.json");
            (read_config(&path)?, safetensors_shapes(dir)?)
        }
        ModelSource::Random { config, .. } | ModelSource::Shapes { config } => {
            (read_config(config)?, shapes_of_config(config)?)
        }
    })
}

/// The split of a job's model over the devices it lists, device by device
/// (layers and bytes of weights), as this machine's free memory would make
/// it now; None for a job on one device.  (Each device also needs its part
/// of the activations and runtime; the footprint above counts them once.)
pub fn device_split(spec: &JobSpec) -> Result<Option<Vec<DeviceShare>>> {
    device_split_with(spec, engine_shapes)
}

/// [`device_split`] with another way to learn a config's parameter shapes.
pub fn device_split_with(
    spec: &JobSpec,
    shapes_of_config: impl Fn(&Path) -> Result<Shapes>,
) -> Result<Option<Vec<DeviceShare>>> {
    let Placement::Split(devices) = &spec.model.device else {
        return Ok(None);
    };
    let (parts, split, free) = plan_model(
        &spec.model.source(),
        spec.model.dtype,
        devices,
        shapes_of_config,
    )?;
    Ok(Some(split.shares(&parts, &free)))
}

/// Elements of the adapters a LoRA or prefix job adds, and of the largest one
/// (what z's temporary holds then); `None` for full tuning.
fn adapter_sizes(
    tuning: &Tuning,
    shapes: &[(String, Vec<usize>)],
    cfg: &ShapeConfig,
) -> Option<(u64, u64)> {
    let matrices = shapes.iter().filter_map(|(name, shape)| {
        let module = name.strip_suffix(".weight")?;
        match shape.as_slice() {
            [a, b] => Some((module, *a as u64, *b as u64)),
            _ => None,
        }
    });
    match tuning {
        Tuning::Full => None,
        Tuning::Lora(lora) => {
            let targets = if lora.targets.is_empty() {
                default_lora_targets(cfg.model_type.as_deref().unwrap_or(""))
            } else {
                lora.targets.clone()
            };
            let r = lora.r as u64;
            let (mut numel, mut largest) = (0, 0);
            for (_, a, b) in matrices.filter(|(m, ..)| is_target(m, &targets)) {
                numel += r * (a + b);
                largest = largest.max(r * a.max(b));
            }
            Some((numel, largest))
        }
        Tuning::Prefix(prefix) => {
            // One query projection per attention layer, whatever its name.
            let queries = ["q_proj", "c_attn", "query"].map(String::from);
            let layers = matrices.filter(|(m, ..)| is_target(m, &queries)).count() as u64;
            let one = prefix.tokens as u64 * cfg.hidden_size;
            Some((2 * layers * one, one))
        }
    }
}

fn read_config(path: &Path) -> Result<serde_json::Value> {
    let text = crate::safe_fs::read_user_text(path, crate::safe_fs::MAX_JSON_BYTES)?;
    serde_json::from_str(&text).with_context(|| format!("reading {}", path.display()))
}

/// Tokens per sequence: `task.max_length`, cut to the positions a model with
/// learned position embeddings has (less a prefix's slots), as the engine
/// cuts its sequences; activations grow with its square, so a `max_length`
/// beyond the model's table would be counted many times over.
fn tokens_per_sequence(spec: &JobSpec, config: &serde_json::Value) -> u64 {
    let max_length = spec.task.max_length as u64;
    let Some(positions) = learned_positions(config) else {
        return max_length;
    };
    let prefix = match spec.tuning() {
        Tuning::Prefix(p) => p.tokens.max(0) as u64,
        _ => 0,
    };
    max_length.min(positions.saturating_sub(prefix))
}

/// Bytes for messages: GiB with two decimals, MiB below one GiB.
pub fn human_bytes(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}
