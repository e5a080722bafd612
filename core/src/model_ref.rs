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

/// Where a job runs, as a job file names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRef {
    Cpu,
    Cuda(usize),
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

/// Model types that are masked language models (the engine's `model/bert.rs`).
pub const MASKED_LM_TYPES: [&str; 2] = ["bert", "roberta"];

/// Whether `model_type` names a masked LM (it predicts a mask token, not the next token).
pub fn is_masked_lm(model_type: &str) -> bool {
    MASKED_LM_TYPES.contains(&model_type)
}
