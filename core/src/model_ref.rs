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

/// Where a job's model lives, as a job file names it (`model.device`):
///
/// * one device: `cpu`, `cuda` or `cuda:N`, read and written as that text
///   (what every job file and frozen spec said before splits existed);
/// * a list: the model's consecutive layers split over those devices
///   (`[cuda:0, cuda:1]`, `[cuda:0, cpu]`), for a model no single device
///   holds.  The embeddings go on the first device, the final norm and head
///   on the last, and the layers in between in proportion to each device's
///   free memory (`placement::split_layers`);
/// * `auto`: the daemon's choice.  Outside the daemon (`mezod run`) it means
///   one device: the first GPU if the machine has one, else the CPU.
///
/// A list is held to three rules, so that what it asks for can run: it names
/// at least one device; a GPU at most once (two shares of one GPU's memory
/// would be one share, counted twice); and the CPU only at its end (layers
/// run in list order, and the CPU is the slow overflow for what the GPUs
/// cannot hold).  The CPU may repeat (`[cpu, cpu]`): each entry then takes
/// an equal part of its memory, which runs the split on a machine without
/// GPUs.  A list of one device is that device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    One(DeviceRef),
    /// Two or more devices, checked as above.
    Split(Vec<DeviceRef>),
    Auto,
}

impl Default for Placement {
    fn default() -> Self {
        Placement::One(DeviceRef::Cpu)
    }
}

impl From<DeviceRef> for Placement {
    fn from(d: DeviceRef) -> Self {
        Placement::One(d)
    }
}

impl Placement {
    /// A list of devices, checked (see the type's doc): one device is that device.
    pub fn list(devices: Vec<DeviceRef>) -> Result<Placement> {
        let Some(&first) = devices.first() else {
            bail!("model.device is an empty list: name a device (cpu, cuda or cuda:N), a list of them, or auto");
        };
        for (i, d) in devices.iter().enumerate() {
            if d.is_gpu() && devices[..i].contains(d) {
                bail!(
                    "model.device lists {d} twice: each GPU may appear once (only cpu may \
                     repeat, each entry taking an equal part of the machine's memory)"
                );
            }
            if d.is_gpu() && devices[..i].contains(&DeviceRef::Cpu) {
                bail!(
                    "model.device lists {d} after cpu: the CPU may only come last (layers run in \
                     list order, and the CPU holds what the GPUs before it cannot)"
                );
            }
        }
        Ok(match devices.len() {
            1 => Placement::One(first),
            _ => Placement::Split(devices),
        })
    }

    /// Whether it asks for a GPU: one is listed, or `auto` (which the daemon
    /// places on GPUs; `mezod run` falls back to the CPU on a machine without
    /// one).  Admission then counts GPU memory, z is torch's by default and
    /// the peak is NVML's.
    pub fn is_gpu(&self) -> bool {
        match self {
            Placement::One(d) => d.is_gpu(),
            Placement::Split(list) => list.iter().any(DeviceRef::is_gpu),
            Placement::Auto => true,
        }
    }

    /// Whether the model is split over several devices.
    pub fn is_split(&self) -> bool {
        matches!(self, Placement::Split(_))
    }

    /// The devices a run uses, in order: `auto` is the first GPU when
    /// `gpu_available`, else the CPU.
    pub fn devices(&self, gpu_available: bool) -> Vec<DeviceRef> {
        match self {
            Placement::One(d) => vec![*d],
            Placement::Split(list) => list.clone(),
            Placement::Auto if gpu_available => vec![DeviceRef::Cuda(0)],
            Placement::Auto => vec![DeviceRef::Cpu],
        }
    }

    /// What it computes like, for `JobSpec::computes_the_same_as`: a split
    /// over the CPU alone runs every operation of the unsplit model on the
    /// same device, with the same generator, in the same order, so its bits
    /// are the CPU's and a run may move between `cpu` and `[cpu, cpu]`.  Any
    /// other split is itself: where a GPU's layers end decides which device
    /// computes them (and, with torch's generator, which device draws their z).
    pub fn computes_like(&self) -> Placement {
        match self {
            Placement::Split(list) if list.iter().all(|d| !d.is_gpu()) => {
                Placement::One(DeviceRef::Cpu)
            }
            other => other.clone(),
        }
    }
}

/// As job files write it: `cpu`, `[cuda:0, cpu]`, `auto`.
impl std::fmt::Display for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Placement::One(d) => write!(f, "{d}"),
            Placement::Split(list) => {
                let names: Vec<String> = list.iter().map(DeviceRef::to_string).collect();
                write!(f, "[{}]", names.join(", "))
            }
            Placement::Auto => f.write_str("auto"),
        }
    }
}

impl Serialize for Placement {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Placement::One(d) => s.serialize_str(&d.to_string()),
            Placement::Split(list) => s.collect_seq(list.iter().map(DeviceRef::to_string)),
            Placement::Auto => s.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for Placement {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Placement;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a device (cpu, cuda or cuda:N), a list of devices, or auto")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> std::result::Result<Placement, E> {
                match s {
                    "auto" => Ok(Placement::Auto),
                    _ => parse_device(s).map(Placement::One).map_err(E::custom),
                }
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Placement, A::Error> {
                use serde::de::Error;
                let mut devices = Vec::new();
                while let Some(name) = seq.next_element::<String>()? {
                    if name == "auto" {
                        return Err(A::Error::custom(
                            "auto stands alone (device: auto), not in a list of devices",
                        ));
                    }
                    if devices.len() >= MAX_DEVICES {
                        return Err(A::Error::custom(format!(
                            "model.device lists more than {MAX_DEVICES} devices"
                        )));
                    }
                    devices.push(parse_device(&name).map_err(A::Error::custom)?);
                }
                Placement::list(devices).map_err(A::Error::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// The most devices one model may be split over (a bound on hostile input,
/// far above any machine's GPUs).
pub const MAX_DEVICES: usize = 64;

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
