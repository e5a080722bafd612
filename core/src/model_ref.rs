//! The model part of a job as both binaries read it: its dtype, its device
//! and where its weights come from.  The engine maps these to libtorch types.

use std::path::PathBuf;
use std::str::FromStr;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// Parameter dtype of a job.  Norm statistics and softmax run in f32 whatever this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    #[default]
    F32,
    Bf16,
    F16,
}

impl Dtype {
    pub fn bytes(self) -> i64 {
        match self {
            Dtype::F32 => 4,
            _ => 2,
        }
    }
}

/// As job files write it: `f32`, `bf16`, `f16`.
impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
        })
    }
}

impl FromStr for Dtype {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" | "float32" => Ok(Dtype::F32),
            "bf16" | "bfloat16" => Ok(Dtype::Bf16),
            "f16" | "float16" => Ok(Dtype::F16),
            _ => bail!("unsupported dtype {s:?}: use f32, bf16 or f16"),
        }
    }
}

/// Where a job runs, as a job file names it: `cpu`, `cuda` or `cuda:N`
/// (read and written as that text).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceRef {
    #[default]
    Cpu,
    Cuda(usize),
}

impl DeviceRef {
    /// Whether it is a GPU (the job asks admission for GPU memory, its z is
    /// torch's by default, its peak is NVML's).
    pub fn is_gpu(&self) -> bool {
        match self {
            DeviceRef::Cpu => false,
            DeviceRef::Cuda(_) => true,
        }
    }
}

/// As job files write it; the first GPU is plain `cuda`.
impl std::fmt::Display for DeviceRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceRef::Cpu => f.write_str("cpu"),
            DeviceRef::Cuda(0) => f.write_str("cuda"),
            DeviceRef::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl std::str::FromStr for DeviceRef {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        parse_device(s)
    }
}

impl TryFrom<String> for DeviceRef {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        parse_device(&s).map_err(|e| e.to_string())
    }
}

impl From<DeviceRef> for String {
    fn from(d: DeviceRef) -> String {
        d.to_string()
    }
}

/// `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(s: &str) -> Result<DeviceRef> {
    match s {
        "cpu" => Ok(DeviceRef::Cpu),
        "cuda" => Ok(DeviceRef::Cuda(0)),
        _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Ok(DeviceRef::Cuda(n)),
            _ => bail!("unknown device {s:?}: use cpu, cuda or cuda:N"),
        },
    }
}

/// Where a model's weights come from.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    /// An HF directory or a GGUF file.
    Pretrained(PathBuf),
    /// A `config.json` alone, with random weights from `seed` (the tokenizer is
    /// the `tokenizer.json` beside the config, if there is one).
    Random { config: PathBuf, seed: u64 },
    /// A `config.json` alone, with placeholders that take no memory: the
    /// parameter shapes, for sizing a job.
    Shapes { config: PathBuf },
}

impl ModelSource {
    /// What a message calls it.
    pub fn describe(&self) -> String {
        match self {
            ModelSource::Pretrained(p) => p.display().to_string(),
            ModelSource::Random { config, seed } => {
                format!("random weights (seed {seed}) of {}", config.display())
            }
            ModelSource::Shapes { config } => format!("the shapes of {}", config.display()),
        }
    }
}

/// The `model_type`s the engine has an architecture for (`src/model/`):
/// what intake accepts and what the engine's dispatch names when it refuses.
pub const MODEL_TYPES: [&str; 7] = [
    "opt", "gpt2", "llama", "mistral", "qwen2", "bert", "roberta",
];

/// Model types that are masked language models (the engine's `model/bert.rs`).
pub const MASKED_LM_TYPES: [&str; 2] = ["bert", "roberta"];

/// Whether `model_type` names a masked LM (it predicts a mask token, not the next token).
pub fn is_masked_lm(model_type: &str) -> bool {
    MASKED_LM_TYPES.contains(&model_type)
}

/// The longest sequence a model can read, from its `config.json`, where it
/// learned a table of position embeddings: OPT (`max_position_embeddings`),
/// GPT-2 (`n_positions`), BERT, and RoBERTa (whose first `pad_token_id + 1`
/// rows are never used by real tokens).  Rotary models (the LLaMA family)
/// have no hard limit: `None`.  The engine cuts sequences to this and the
/// memory estimate sizes activations by it, so both read it here.
pub fn learned_positions(config: &serde_json::Value) -> Option<u64> {
    let get = |key: &str| config.get(key)?.as_u64();
    match config.get("model_type")?.as_str()? {
        "opt" | "bert" => get("max_position_embeddings"),
        "gpt2" => get("n_positions"),
        "roberta" => {
            let pad = get("pad_token_id").unwrap_or(1);
            Some(get("max_position_embeddings")?.saturating_sub(pad + 1))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_positions(name: &str) -> Option<u64> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures")
            .join(name)
            .join("config.json");
        learned_positions(&serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap())
    }

    #[test]
    fn learned_position_tables_limit_length_and_rotary_models_do_not() {
        for name in ["opt", "opt-postln", "gpt2", "bert"] {
            assert_eq!(fixture_positions(name), Some(64), "{name}");
        }
        // RoBERTa's table has 66 rows; the first two (padding index 1, plus one) are unused.
        assert_eq!(fixture_positions("roberta"), Some(64));
        for name in ["llama", "llama3", "mistral", "qwen2"] {
            assert_eq!(fixture_positions(name), None, "{name}");
        }
    }
}
