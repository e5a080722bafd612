//! Memory estimates (`mezod_core::estimate`) where libtorch is at hand: the
//! parameter shapes of a `config.json` come from building the model's
//! zero-memory placeholders here instead of asking the engine binary.

use std::path::Path;

use anyhow::Result;

pub use mezod_core::estimate::*;
use mezod_core::spec::JobSpec;

use crate::model::{Dtype, LanguageModel, ModelSource};

/// Parameter shapes of the model a config describes, from placeholders that
/// take no memory (nothing is drawn or loaded).  `mezod-engine shapes` prints these.
pub fn shapes_of_config(config: &Path) -> Result<Shapes> {
    let source = ModelSource::Shapes {
        config: config.to_path_buf(),
    };
    let model = LanguageModel::open(&source, Dtype::F32, tch::Device::Cpu)?;
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
    estimate_with(spec, gpu, shapes_of_config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::adapters::Tuning;
    use crate::model::weights::Checkpoint;

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
        let config = std::fs::read_to_string(bert.model.path.join("config.json")).unwrap();
        let vocab = serde_json::from_str::<serde_json::Value>(&config).unwrap()["vocab_size"]
            .as_u64()
            .unwrap();
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
        let _rng = crate::torch_rng_lock();
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

    #[test]
    fn only_sparse_adds_its_mask_of_one_bit_per_trainable_weight() {
        let with = |tuning: &str, mezo: &str| {
            let mut spec = classification("llama", 64, tuning);
            let extra: JobSpec = JobSpec::parse(
                &spec.to_yaml().replace("mezo:\n", &format!("mezo:\n{mezo}")),
                Path::new("/"),
            )
            .unwrap();
            spec.mezo = extra.mezo;
            mezod_core::estimate::estimate(&spec, false).unwrap()
        };
        let plain = with("", "");
        assert_eq!(plain.mask, 0);
        assert_eq!(with("", "  estimator: fzoo\n  directions: 4\n"), plain);
        let sparse = with("", "  estimator: sparse\n");
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let model = LanguageModel::open_tuned(
            &ModelSource::Pretrained(root.join("tests/fixtures/llama")),
            crate::model::Dtype::F32,
            tch::Device::Cpu,
            &Tuning::Full,
        )
        .unwrap();
        let bits = (model.params.numel() as u64).div_ceil(8);
        assert!(sparse.mask >= bits, "{} < {bits}", sparse.mask);
        assert_eq!(sparse.total(), plain.total() + sparse.mask);
        let lora = with("tuning: lora\n", "  estimator: sparse\n");
        assert!(lora.mask < sparse.mask, "LoRA masks only its adapters");
        // LOZO adds its factors, (rows + columns) × rank of every matrix.
        let lozo = with("", "  estimator: lozo\n  rank: 4\n");
        let sides: u64 = model
            .params
            .iter()
            .filter_map(|p| match p.tensor.size().as_slice() {
                [rows, cols] => Some((rows + cols) as u64),
                _ => None,
            })
            .sum();
        assert!(lozo.factors >= sides * 4 * 4, "{} < U and V", lozo.factors);
        assert_eq!(lozo.mask, 0);
        assert_eq!(lozo.total(), plain.total() + lozo.factors);
    }

    fn torch_tuning(kind: &str) -> Tuning {
        let text = format!("tuning: {kind}\n{}", spec(4, "f32").to_yaml());
        JobSpec::parse(&text, Path::new("/")).unwrap().tuning()
    }

    /// A classification job on `fixture` reading `max_length` tokens.
    fn classification(fixture: &str, max_length: usize, tuning: &str) -> JobSpec {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        JobSpec::parse(
            &format!(
                "{tuning}model: {{path: tests/fixtures/{fixture}}}\n\
                 task: {{kind: classification, template: sst2, max_length: {max_length}}}\n\
                 data: {{train: examples/data/reviews.jsonl}}\nmezo: {{steps: 1, batch_size: 16, lr: 1.0e-3}}\n"
            ),
            root,
        )
        .unwrap()
    }

    #[test]
    fn activations_are_sized_at_the_positions_the_model_reads() {
        // OPT's table has 64 positions: a max_length of 512 reads 64 tokens.
        let at = |fixture, n, tuning| estimate(&classification(fixture, n, tuning), false).unwrap();
        assert_eq!(at("opt", 512, ""), at("opt", 64, ""));
        assert!(at("opt", 32, "").activations < at("opt", 64, "").activations);
        // 16 sequences × 2 candidates × 64 tokens × (6 × 16 + 3 × 64) + the attention
        // scores (2 × 32 × 4 heads × 64²), at 4 bytes.
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(
                classification("opt", 512, "")
                    .model
                    .path
                    .join("config.json"),
            )
            .unwrap(),
        )
        .unwrap();
        let (h, i, heads) = (
            cfg["hidden_size"].as_u64().unwrap(),
            cfg["ffn_dim"].as_u64().unwrap(),
            cfg["num_attention_heads"].as_u64().unwrap(),
        );
        assert_eq!(
            at("opt", 512, "").activations,
            4 * (32 * 64 * (6 * h + 3 * i) + 2 * 32 * heads * 64 * 64)
        );
        // A prefix takes the first positions.
        assert_eq!(
            at("opt", 512, "tuning: prefix\nprefix: {tokens: 8}\n").activations,
            at("opt", 56, "").activations
        );
        // RoBERTa's 66 rows hold 64 positions; rotary LLaMA reads every token asked for.
        assert_eq!(at("roberta", 512, ""), at("roberta", 64, ""));
        assert!(at("llama", 512, "").activations > at("llama", 128, "").activations);
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
