//! Hugging Face causal language models on libtorch, forward pass only.
//!
//! A model is an HF directory (`config.json`, safetensors weights,
//! `tokenizer.json`).  Each architecture lives in its own file and implements
//! [`Network`]; [`LanguageModel`] bundles it with its parameters (in canonical
//! order), its tokenizer and where it came from.

pub mod adapters;
pub mod bert;
pub mod export;
pub mod gguf;
pub mod gpt2;
pub mod layers;
pub mod llama;
pub mod opt;
pub mod placement;
pub mod weights;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use crate::tokenize::TextTokenizer;
use adapters::{KvPrefix, Tuning};
pub use mezod_core::model_ref::{Dtype, ModelSource};
pub use placement::{DeviceMap, Part};
pub use weights::{LoraSite, Param, ParamList};

/// The libtorch element type of a job's dtype.
pub fn kind_of(dtype: Dtype) -> Kind {
    match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::Bf16 => Kind::BFloat16,
        Dtype::F16 => Kind::Half,
    }
}

/// `cpu`, `cuda` or `cuda:N`, as a libtorch device.
pub fn parse_device(s: &str) -> Result<Device> {
    Ok(torch_device(mezod_core::model_ref::parse_device(s)?))
}

/// A job's device as libtorch names it.
pub fn torch_device(device: mezod_core::model_ref::DeviceRef) -> Device {
    use mezod_core::model_ref::DeviceRef;
    match device {
        DeviceRef::Cpu => Device::Cpu,
        DeviceRef::Cuda(n) => Device::Cuda(n),
    }
}

/// One architecture's forward pass.
pub trait Network: Send {
    /// Final hidden states `[batch, seq, d]` (the output projection's input)
    /// for left-padded `ids` with `mask` (1 = token, 0 = padding).
    fn hidden(&self, ids: &Tensor, mask: &Tensor) -> Tensor;

    /// f32 logits for hidden states `[..., d]`.  Separate so that scoring
    /// answers projects only the positions it reads: over a 49k vocabulary the
    /// output projection is a fifth of a small model's forward pass.
    fn head(&self, hidden: &Tensor) -> Tensor;

    /// Logits `[batch, seq, vocab]` in f32.
    fn forward(&self, ids: &Tensor, mask: &Tensor) -> Tensor {
        self.head(&self.hidden(ids, mask))
    }

    /// The key/value prefix every attention layer goes through (prefix
    /// tuning); `None` where the architecture does not support one.
    fn kv_prefix(&self) -> Option<&KvPrefix> {
        None
    }
    fn kv_prefix_mut(&mut self) -> Option<&mut KvPrefix> {
        None
    }
}

/// The tokenizer of a model folder or random-weight config, found and
/// loaded by the functions `mezod submit` and intake check it with.
fn open_tokenizer(source: &ModelSource) -> Result<TextTokenizer> {
    let path = mezod_core::job_check::tokenizer_file(source)?
        .context("a GGUF file's tokenizer is built from its metadata")?;
    Ok(TextTokenizer::new(mezod_core::job_check::load_tokenizer(
        &path,
    )?))
}

#[derive(Deserialize)]
struct ModelType {
    model_type: Option<String>,
}

/// A loaded model: network, trainable parameters in canonical order, tokenizer.
pub struct LanguageModel {
    pub net: Box<dyn Network>,
    /// What MeZO perturbs: every weight (full tuning), LoRA adapters or prefixes.
    pub params: ParamList,
    /// The checkpoint's weights when they are not the trainable ones (LoRA, prefix).
    pub frozen: ParamList,
    pub lora_sites: Vec<LoraSite>,
    pub tuning: Tuning,
    pub tokenizer: TextTokenizer,
    /// The HF directory or GGUF file it came from (for a random-weight model:
    /// its config's folder, where its tokenizer files are).
    pub dir: PathBuf,
    /// Its `config.json` (for a GGUF file: built from the metadata).
    pub config_text: String,
    pub dtype: Dtype,
    /// Where inputs go: the first device (the embeddings').
    pub device: Device,
    /// The devices its parts are on (one, unless split).
    pub map: DeviceMap,
    /// Each weight's name and the index of its device in `map`, in the order
    /// they were made (LoRA adapters on their layer's device; a prefix is
    /// made later, from its layer's keys and values, where they are).
    pub placed: Vec<(String, usize)>,
    pub model_type: String,
    /// A masked LM's mask token, looked up once (tasks ask for it every batch).
    mask: std::sync::OnceLock<Option<(String, i64)>>,
}

impl LanguageModel {
    /// Load an HF directory, or a GGUF file, at `dtype` on `device`.
    pub fn load(dir: &Path, dtype: Dtype, device: Device) -> Result<Self> {
        Self::open(&ModelSource::Pretrained(dir.to_path_buf()), dtype, device)
    }

    /// Build the model `source` describes at `dtype` on `device`, every weight trainable.
    pub fn open(source: &ModelSource, dtype: Dtype, device: Device) -> Result<Self> {
        Self::open_tuned(source, dtype, device, &Tuning::Full)
    }

    /// Build the model `source` describes, with `tuning` deciding what is trainable.
    pub fn open_tuned(
        source: &ModelSource,
        dtype: Dtype,
        device: Device,
        tuning: &Tuning,
    ) -> Result<Self> {
        Self::open_placed(source, dtype, DeviceMap::single(device), tuning)
    }

    /// Build the model `source` describes with each part on the device
    /// `map` gives it (one model over several devices).
    pub fn open_placed(
        source: &ModelSource,
        dtype: Dtype,
        map: DeviceMap,
        tuning: &Tuning,
    ) -> Result<Self> {
        for &device in map.devices() {
            if let Device::Cuda(n) = device {
                if !tch::Cuda::is_available() || n >= tch::Cuda::device_count() as usize {
                    bail!(
                        "device cuda:{n} is not available (CUDA devices seen: {})",
                        tch::Cuda::device_count()
                    );
                }
            }
        }
        let device = map.first();
        // The same checks and words as `mezod submit`, `estimate` and intake.
        mezod_core::job_check::model_files(source)?;
        let (dir, config_path, config_text, tokenizer, ckpt) = match source {
            ModelSource::Pretrained(dir) if gguf::is_gguf(dir) => {
                let g = gguf::load(dir)?;
                let ckpt = weights::Checkpoint::from_tensors(dir, g.tensors);
                let tokenizer = TextTokenizer::new(g.tokenizer);
                (
                    dir.clone(),
                    dir.clone(),
                    g.config.to_string(),
                    tokenizer,
                    ckpt,
                )
            }
            ModelSource::Pretrained(dir) => {
                let config_path = dir.join("config.json");
                let config_text = std::fs::read_to_string(&config_path)
                    .with_context(|| format!("reading model config {}", config_path.display()))?;
                let tokenizer = open_tokenizer(source)?;
                let ckpt = weights::Checkpoint::open(dir)?;
                (dir.clone(), config_path, config_text, tokenizer, ckpt)
            }
            ModelSource::Random { config, .. } | ModelSource::Shapes { config } => {
                let config_text = std::fs::read_to_string(config)
                    .with_context(|| format!("reading model config {}", config.display()))?;
                let dir = config.parent().unwrap_or(Path::new(".")).to_path_buf();
                // A random-weight model may go without one (benchmarks,
                // estimates); text fed to it then fails with the reason.
                let tokenizer = open_tokenizer(source)
                    .unwrap_or_else(|e| TextTokenizer::missing(format!("{e:#}")));
                let ckpt = match source {
                    ModelSource::Random { seed, .. } => weights::Checkpoint::random(config, *seed),
                    _ => weights::Checkpoint::shapes_only(config),
                };
                (dir, config.clone(), config_text, tokenizer, ckpt)
            }
        };
        let model_type = serde_json::from_str::<ModelType>(&config_text)
            .with_context(|| format!("{} is not valid JSON", config_path.display()))?
            .model_type
            .with_context(|| format!("{} has no model_type", config_path.display()))?;
        let tuning = match tuning {
            Tuning::Lora(cfg) if cfg.targets.is_empty() => Tuning::Lora(adapters::LoraConfig {
                targets: adapters::default_lora_targets(&model_type),
                ..cfg.clone()
            }),
            other => other.clone(),
        };
        let mut w =
            weights::WeightLoader::placed(&ckpt, kind_of(dtype), map.clone(), tuning.clone());
        let parse_err = || {
            format!(
                "{} does not describe a valid {model_type} model",
                config_path.display()
            )
        };
        let _guard = tch::no_grad_guard();
        let net: Box<dyn Network> = match model_type.as_str() {
            "opt" => Box::new(opt::Opt::load(
                serde_json::from_str(&config_text).with_context(parse_err)?,
                &mut w,
            )?),
            "gpt2" => Box::new(gpt2::Gpt2::load(
                serde_json::from_str(&config_text).with_context(parse_err)?,
                &mut w,
            )?),
            "llama" | "mistral" | "qwen2" => Box::new(llama::Llama::load(
                serde_json::from_str(&config_text).with_context(parse_err)?,
                &mut w,
            )?),
            "bert" | "roberta" => Box::new(bert::Bert::load(
                serde_json::from_str(&config_text).with_context(parse_err)?,
                &mut w,
            )?),
            other => bail!(
                "model_type {other:?} in {} is not supported ({})",
                config_path.display(),
                mezod_core::model_ref::MODEL_TYPES.join(", ")
            ),
        };
        let loaded = w.finish()?;
        let mut model = Self {
            net,
            params: loaded.params,
            frozen: loaded.frozen,
            lora_sites: loaded.lora_sites,
            tuning,
            tokenizer,
            dir,
            config_text,
            dtype,
            device,
            map,
            placed: loaded.placed,
            model_type,
            mask: std::sync::OnceLock::new(),
        };
        if let Tuning::Prefix(cfg) = &model.tuning {
            let cfg = cfg.clone();
            model.init_prefix(cfg.tokens, cfg.seed)?;
        }
        Ok(model)
    }

    /// Prefix tuning's starting point: each attention layer's keys and values
    /// for `n` random vocabulary tokens become its trainable prefix.
    fn init_prefix(&mut self, n: i64, seed: u64) -> Result<()> {
        let _guard = tch::no_grad_guard();
        // Learned positions must hold the prefix and some text after it.
        if let Some(limit) = self.max_positions() {
            if n as usize + 2 > limit {
                bail!(
                    "prefix.tokens {n} leaves no room for text in the model's {limit} learned                      positions (the prefix takes the first {n}): use fewer prefix tokens"
                );
            }
        }
        let vocab = serde_json::from_str::<serde_json::Value>(&self.config_text)?["vocab_size"]
            .as_i64()
            .context("config.json has no vocab_size")?;
        let ids = adapters::prefix_init_tokens(seed, n, vocab).to_device(self.device);
        let mask = ids.ones_like();
        let model_type = self.model_type.clone();
        let net = &self.net;
        let prefix = net
            .kv_prefix()
            .with_context(|| format!("prefix tuning is not supported for {model_type} models"))?;
        let seen = prefix.capture(|| {
            let _ = net.hidden(&ids, &mask);
        });
        let layers: Vec<(Tensor, Tensor)> = seen
            .iter()
            .map(|(k, v)| (k.get(0).contiguous().copy(), v.get(0).contiguous().copy()))
            .collect();
        for (i, (k, v)) in layers.iter().enumerate() {
            for (part, t) in [("key", k), ("value", v)] {
                self.params.0.push(Param {
                    name: format!("prefix.{i}.{part}"),
                    tensor: t.shallow_clone(),
                    decays: true,
                });
            }
        }
        let installed = layers
            .iter()
            .map(|(k, v)| (k.shallow_clone(), v.shallow_clone()))
            .collect();
        self.net
            .kv_prefix_mut()
            .expect("kv_prefix and kv_prefix_mut agree")
            .set(installed);
        Ok(())
    }

    /// The checkpoint's weights in canonical order (what identifies the base).
    pub fn base_weights(&self) -> &ParamList {
        match self.tuning {
            Tuning::Full => &self.params,
            _ => &self.frozen,
        }
    }

    /// The weights an exported HF model holds: the trained ones (full tuning),
    /// or the checkpoint's with each LoRA adapter merged in (`W + (α/r)·B A`).
    pub fn export_weights(&self) -> Vec<(String, Tensor)> {
        let _guard = tch::no_grad_guard();
        if self.tuning == Tuning::Full {
            return self
                .params
                .iter()
                .map(|p| (p.name.clone(), p.tensor.shallow_clone()))
                .collect();
        }
        self.frozen
            .iter()
            .map(|p| {
                let site = self
                    .lora_sites
                    .iter()
                    .find(|s| p.name == format!("{}.weight", s.module));
                let t = match site {
                    None => p.tensor.shallow_clone(),
                    Some(s) => {
                        let delta = s.lora.delta_weight(Kind::Float);
                        let delta = if s.transposed { delta.tr() } else { delta };
                        (p.tensor.to_kind(Kind::Float) + delta.to_device(p.tensor.device()))
                            .to_kind(p.tensor.kind())
                    }
                };
                (p.name.clone(), t)
            })
            .collect()
    }

    /// The longest sequence the model can read, where it has learned position
    /// embeddings (OPT, GPT-2, BERT, RoBERTa; see
    /// [`mezod_core::model_ref::learned_positions`]), less a prefix's slots;
    /// rotary models have no hard limit.
    pub fn max_positions(&self) -> Option<usize> {
        let cfg: serde_json::Value = serde_json::from_str(&self.config_text).ok()?;
        let learned = mezod_core::model_ref::learned_positions(&cfg)? as usize;
        // A prefix takes the first positions.
        let prefix = self.net.kv_prefix().map_or(0, |p| p.len()) as usize;
        Some(learned.saturating_sub(prefix))
    }

    /// Whether it is a masked LM (BERT, RoBERTa): it fills a mask token instead
    /// of predicting the next token, so tasks read it differently.
    pub fn is_masked_lm(&self) -> bool {
        bert::is_masked_lm(&self.model_type)
    }

    /// A masked LM's mask token and its id.
    pub fn mask_token(&self) -> Result<(String, i64)> {
        if !self.is_masked_lm() {
            bail!("{} is a causal LM: it has no mask token", self.model_type);
        }
        self.mask
            .get_or_init(|| bert::mask_token(&self.tokenizer, &self.dir))
            .clone()
            .with_context(|| {
                format!(
                    "the tokenizer of {} has no mask token (looked for \
                     tokenizer_config.json's mask_token, <mask> and [MASK])",
                    self.dir.display()
                )
            })
    }

    /// Logits `[batch, len, vocab]` (f32) of positions `start..start + len` only.
    pub fn logits_at(&self, ids: &Tensor, mask: &Tensor, start: i64, len: i64) -> Tensor {
        let _guard = tch::no_grad_guard();
        let h = self
            .net
            .hidden(&ids.to_device(self.device), &mask.to_device(self.device));
        self.net.head(&h.narrow(1, start, len))
    }

    /// Logits `[batch, seq, vocab]` (f32) without autograd.
    pub fn logits(&self, ids: &Tensor, mask: &Tensor) -> Tensor {
        let _guard = tch::no_grad_guard();
        self.net
            .forward(&ids.to_device(self.device), &mask.to_device(self.device))
    }
}
