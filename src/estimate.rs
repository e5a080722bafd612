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
//!   and the f32 log-softmax; on CPU a bf16/f16 matmul also keeps an f32
//!   result before rounding (4 more bytes per logit, measured);
//! * **runtime**: the CUDA context and allocator slack on a GPU, the libtorch
//!   and tokenizer runtime on CPU.
//!
//! Sequences per forward = max(batch, eval batch) × candidates per example
//! (classification and multiple choice score one sequence per answer; a
//! masked LM reads one sequence per example).
//! Positions with logits = all tokens for causal LM; for answer scoring only
//! the answer's, counted as at most 8 tokens; a masked LM's mask token alone.
//! Tokens = `task.max_length`, an upper bound: setting it close to the data's
//! real lengths gets a job admitted sooner.  The safety margin is the
//! daemon's, added on top when admitting.

use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::mezo::{sweep::DEFAULT_CHUNK, Rng};
use crate::model::adapters::{default_lora_targets, is_target, Tuning};
use crate::model::gguf::{is_gguf, read_header};
use crate::model::weights::Checkpoint;
use crate::model::{bert, LanguageModel, ModelSource};
use crate::spec::{JobSpec, TaskKind};

/// CUDA context, cuBLAS workspaces and caching-allocator slack.
pub const GPU_RUNTIME_BYTES: u64 = 768 << 20;
/// Resident libtorch, tokenizer and process overhead on CPU.
pub const CPU_RUNTIME_BYTES: u64 = 320 << 20;

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
}

impl Footprint {
    pub fn total(&self) -> u64 {
        self.weights + self.largest_tensor + self.activations + self.logits + self.runtime
    }
}

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

/// Parameter shapes of the model a config describes, from placeholders that
/// take no memory (nothing is drawn or loaded).
fn shapes_of_config(config: &Path) -> Result<Vec<(String, Vec<usize>)>> {
    let source = ModelSource::Shapes {
        config: config.to_path_buf(),
    };
    let model = LanguageModel::open(&source, crate::model::Dtype::F32, tch::Device::Cpu)?;
    Ok(model
        .params
        .iter()
        .map(|p| {
            (
                p.name.clone(),
                p.tensor.size().iter().map(|&d| d as usize).collect(),
            )
        })
        .collect())
}

/// Estimate the peak memory of `spec` on a GPU (`gpu = true`) or on CPU.
pub fn estimate(spec: &JobSpec, gpu: bool) -> Result<Footprint> {
    let (cfg, shapes) = match spec.model.source() {
        ModelSource::Pretrained(path) if is_gguf(&path) => {
            let header = read_header(&path)?;
            let cfg = serde_json::from_value(header.config).context("GGUF metadata")?;
            (cfg, header.shapes)
        }
        ModelSource::Pretrained(dir) => {
            let cfg = read_shape_config(&dir.join("config.json"))?;
            (cfg, Checkpoint::open(&dir)?.shapes()?)
        }
        ModelSource::Random { config, .. } | ModelSource::Shapes { config } => {
            (read_shape_config(&config)?, shapes_of_config(&config)?)
        }
    };
    let elem = spec.model.dtype.bytes() as u64;
    let device = if gpu { "cuda" } else { "cpu" };
    let rng = spec.mezo.rng.unwrap_or_else(|| Rng::default_for(device));
    let (mut numel, mut largest) = (0u64, 0u64);
    for (_, shape) in &shapes {
        let n: u64 = shape.iter().map(|&d| d as u64).product();
        numel += n;
        largest = largest.max(n);
    }
    if let Some((adapter_numel, adapter_largest)) = adapter_sizes(&spec.tuning(), &shapes, &cfg) {
        numel += adapter_numel;
        largest = adapter_largest;
    }
    let masked = cfg.model_type.as_deref().is_some_and(bert::is_masked_lm);
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
    let tokens = spec.task.max_length as u64;
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
        logits: seqs
            * logit_positions
            * cfg.vocab_size
            * (elem + 8 + if !gpu && elem < 4 { 4 } else { 0 }),
        runtime: if gpu {
            GPU_RUNTIME_BYTES
        } else {
            CPU_RUNTIME_BYTES
        },
    })
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

fn read_shape_config(path: &Path) -> Result<ShapeConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| {
        format!(
            "{} lacks the sizes needed to estimate memory (hidden size, heads, vocabulary)",
            path.display()
        )
    })
}

/// Bytes for messages: GiB with two decimals, MiB below one GiB.
pub fn human_bytes(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(batch: usize, dtype: &str) -> JobSpec {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        JobSpec::parse(
            &format!(
                "model: {{path: tests/fixtures/llama, dtype: {dtype}}}\ntask: {{kind: causal_lm, max_length: 64}}\n\
                 data: {{train: examples/data/reviews.jsonl}}\nmezo: {{steps: 1, batch_size: {batch}, lr: 1.0e-3}}\n"
            ),
            root,
        )
        .unwrap()
    }

    #[test]
    fn weights_follow_the_dtype_and_activations_the_batch() {
        let f32_1 = estimate(&spec(1, "f32"), false).unwrap();
        let bf16_1 = estimate(&spec(1, "bf16"), false).unwrap();
        let f32_4 = estimate(&spec(4, "f32"), false).unwrap();
        assert!(f32_1.weights > 0 && f32_1.weights % 4 == 0);
        assert_eq!(bf16_1.weights * 2, f32_1.weights);
        assert_eq!(f32_4.activations, 4 * f32_1.activations);
        assert_eq!(f32_4.logits, 4 * f32_1.logits);
        assert_eq!(f32_4.weights, f32_1.weights);
        assert!(estimate(&spec(1, "f32"), true).unwrap().runtime > f32_1.runtime);
    }

    #[test]
    fn a_masked_lm_reads_one_sequence_and_one_position_per_example() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let job = |model: &str| {
            JobSpec::parse(
                &format!(
                    "model: {{path: tests/fixtures/{model}}}\ntask: {{kind: classification, max_length: 64}}\n\
                     data: {{train: examples/data/reviews.jsonl}}\nmezo: {{steps: 1, batch_size: 4, lr: 1.0e-3}}\n"
                ),
                root,
            )
            .unwrap()
        };
        let (bert, opt) = (job("bert"), job("opt"));
        let (b, o) = (
            estimate(&bert, false).unwrap(),
            estimate(&opt, false).unwrap(),
        );
        let vocab = read_shape_config(&bert.model.path.join("config.json"))
            .unwrap()
            .vocab_size;
        // 4 sequences × 1 position × vocab × (4 + 8) bytes.
        assert_eq!(b.logits, 4 * vocab * 12);
        // OPT (same width): 4 × 2 candidates × 8 answer positions × 320 × 12.
        assert_eq!(o.logits, 4 * 2 * 8 * 320 * 12);
        let ckpt = Checkpoint::open(&bert.model.path).unwrap();
        let stored: u64 = ckpt
            .shapes()
            .unwrap()
            .iter()
            .map(|(_, sh)| sh.iter().product::<usize>() as u64 * 4)
            .sum();
        assert_eq!(b.weights, stored);
    }

    #[test]
    fn adapters_add_their_own_bytes_and_shrink_z() {
        let torch = |tuning: &str| {
            let text = spec(4, "f32")
                .to_yaml()
                .replace("mezo:", "mezo:\n  rng: torch");
            let s = JobSpec::parse(&format!("{tuning}{text}"), Path::new("/")).unwrap();
            estimate(&s, false).unwrap()
        };
        let (full, lora, prefix) = (
            torch(""),
            torch("tuning: lora\n"),
            torch("tuning: prefix\n"),
        );
        // Against the adapters the model really builds (the LLaMA fixture).
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let source = ModelSource::Pretrained(root.join("tests/fixtures/llama"));
        for (tuning, f) in [
            (spec(4, "f32").tuning(), full),
            (torch_tuning("lora"), lora),
            (torch_tuning("prefix"), prefix),
        ] {
            let model = LanguageModel::open_tuned(
                &source,
                crate::model::Dtype::F32,
                tch::Device::Cpu,
                &tuning,
            )
            .unwrap();
            // Bytes at f32.
            let trainable = 4 * model.params.numel() as u64;
            let all = trainable + 4 * model.frozen.numel() as u64;
            let largest = 4 * model
                .params
                .iter()
                .map(|p| p.tensor.numel() as u64)
                .max()
                .unwrap();
            match tuning {
                Tuning::Full | Tuning::Lora(_) => {
                    assert_eq!((f.weights, f.largest_tensor), (all, largest), "{tuning:?}")
                }
                // An upper bound: grouped KV heads store less than `hidden` per token.
                Tuning::Prefix(_) => {
                    assert!(f.weights >= all && f.weights <= all + trainable);
                    assert!(f.largest_tensor >= largest && f.largest_tensor <= 2 * largest);
                }
            }
        }
        assert!(lora.largest_tensor < full.largest_tensor / 4);
    }

    fn torch_tuning(kind: &str) -> Tuning {
        let text = format!("tuning: {kind}\n{}", spec(4, "f32").to_yaml());
        JobSpec::parse(&text, Path::new("/")).unwrap().tuning()
    }

    #[test]
    fn weights_equal_the_stored_parameter_bytes() {
        let s = spec(1, "f32");
        let ckpt = Checkpoint::open(&s.model.path).unwrap();
        let bytes: u64 = ckpt
            .shapes()
            .unwrap()
            .iter()
            .map(|(_, sh)| sh.iter().product::<usize>() as u64 * 4)
            .sum();
        assert_eq!(estimate(&s, false).unwrap().weights, bytes);
    }
}
