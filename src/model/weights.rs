//! Reading Hugging Face safetensors checkpoints into an ordered parameter list.
//!
//! Files are memory-mapped and each tensor is copied once into a libtorch tensor
//! of the job's dtype and device, with autograd off: MeZO never needs gradients.
//! Models ask for their tensors in transformers' `named_parameters()` order, so
//! the resulting [`ParamList`] *is* the canonical order the MeZO step relies on.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use safetensors::{Dtype as StDtype, SafeTensors};
use tch::{Device, Kind, Tensor};

use super::adapters::{is_target, lora_a_init, Lora, Tuning};
use super::placement::{DeviceMap, Part};

/// One trainable tensor under its Hugging Face name.
pub struct Param {
    pub name: String,
    pub tensor: Tensor,
    /// Weight decay applies (not to biases and norm weights, as in the reference).
    pub decays: bool,
}

/// Parameters in canonical order (tied weights appear once).
#[derive(Default)]
pub struct ParamList(pub Vec<Param>);

impl ParamList {
    pub fn iter(&self) -> impl Iterator<Item = &Param> {
        self.0.iter()
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn numel(&self) -> i64 {
        self.0.iter().map(|p| p.tensor.numel() as i64).sum()
    }
}

/// True for names transformers' MeZO trainer exempts from weight decay.
pub fn is_decay_exempt(name: &str) -> bool {
    name.contains("bias")
        || name.contains("layer_norm")
        || name.contains("layernorm")
        || name.contains("LayerNorm")
        || name.contains("norm.")
        || name.contains(".ln_")
}

struct ShardFile {
    path: PathBuf,
    map: Mmap,
}

/// An opened checkpoint: one `model.safetensors` or shards named by `model.safetensors.index.json`.
pub struct Checkpoint {
    dir: PathBuf,
    shards: Vec<ShardFile>,
    /// tensor name → shard index
    index: HashMap<String, usize>,
    /// Tensors already in memory (a dequantized GGUF file), by HF name.
    memory: HashMap<String, Tensor>,
    /// No stored tensors: every parameter is drawn (see [`Checkpoint::random`]).
    random: Option<RandomInit>,
}

/// How a weightless checkpoint makes its tensors.
#[derive(Debug, Clone, Copy)]
enum RandomInit {
    /// Norm weights 1, biases 0, everything else N(0, 0.02²) (the usual HF
    /// `initializer_range`), drawn on the target device at the target dtype;
    /// tensor k is drawn after `manual_seed(seed + k)`.
    Draw { seed: u64 },
    /// Zero-memory placeholders (a broadcast scalar) that only carry shapes.
    ShapesOnly,
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self> {
        let files = mezod_core::weight_files::safetensors_files(dir)?;
        let mut shards = Vec::new();
        let mut index = HashMap::new();
        for path in files {
            let file = File::open(&path)
                .with_context(|| format!("cannot open weight file {}", path.display()))?;
            // SAFETY: the map is read-only; a checkpoint changed underneath a running job is
            // outside what any loader can defend against.
            let map = unsafe { Mmap::map(&file) }
                .with_context(|| format!("mapping {}", path.display()))?;
            let st = SafeTensors::deserialize(&map)
                .with_context(|| format!("{} is not a valid safetensors file", path.display()))?;
            for name in st.names() {
                index.insert(name.to_string(), shards.len());
            }
            drop(st);
            shards.push(ShardFile { path, map });
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            shards,
            index,
            memory: HashMap::new(),
            random: None,
        })
    }

    /// A checkpoint with no files: a model of `config`'s shape with random
    /// weights from `seed` (benchmarks and admission tests at any size).
    pub fn random(config: &Path, seed: u64) -> Self {
        Self::weightless(config, RandomInit::Draw { seed })
    }

    /// A checkpoint whose tensors take no memory, to learn a model's parameter
    /// shapes from its config alone.
    pub fn shapes_only(config: &Path) -> Self {
        Self::weightless(config, RandomInit::ShapesOnly)
    }

    fn weightless(config: &Path, init: RandomInit) -> Self {
        Self {
            dir: config.to_path_buf(),
            shards: Vec::new(),
            index: HashMap::new(),
            memory: HashMap::new(),
            random: Some(init),
        }
    }

    /// A checkpoint of tensors already in memory, read from `origin`.
    pub fn from_tensors(origin: &Path, tensors: HashMap<String, Tensor>) -> Self {
        Self {
            dir: origin.to_path_buf(),
            shards: Vec::new(),
            index: HashMap::new(),
            memory: tensors,
            random: None,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn contains(&self, name: &str) -> bool {
        self.random.is_some() || self.index.contains_key(name) || self.memory.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.index.keys().chain(self.memory.keys())
    }

    /// Name and shape of every stored tensor, read from the headers only
    /// (what admission control needs to size a job without loading it).
    pub fn shapes(&self) -> Result<Vec<(String, Vec<usize>)>> {
        let mut out = Vec::new();
        for shard in &self.shards {
            let st = SafeTensors::deserialize(&shard.map)?;
            for (name, view) in st.tensors() {
                out.push((name, view.shape().to_vec()));
            }
        }
        for (name, t) in &self.memory {
            out.push((name.clone(), t.size().iter().map(|&d| d as usize).collect()));
        }
        out.sort();
        Ok(out)
    }

    /// Copy one stored tensor into a fresh libtorch tensor (CPU, stored dtype).
    fn read(&self, name: &str) -> Result<Tensor> {
        if let Some(t) = self.memory.get(name) {
            return Ok(t.shallow_clone());
        }
        let shard = &self.shards[self.index[name]];
        let st = SafeTensors::deserialize(&shard.map)?;
        let view = st.tensor(name)?;
        let kind = match view.dtype() {
            StDtype::F32 => Kind::Float,
            StDtype::F16 => Kind::Half,
            StDtype::BF16 => Kind::BFloat16,
            StDtype::F64 => Kind::Double,
            other => bail!(
                "tensor {name} in {} has dtype {other:?}; only F32, F16, BF16 and F64 weights are supported",
                shard.path.display()
            ),
        };
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        Ok(Tensor::f_from_data_size(view.data(), &shape, kind)?)
    }
}

/// Hands tensors to a model under construction, recording the canonical order.
///
/// Each tensor is made on the device of the part being loaded (see
/// [`WeightLoader::place`]), straight from the mapped file: a split model
/// never holds a weight twice.
pub struct WeightLoader<'a> {
    ckpt: &'a Checkpoint,
    kind: Kind,
    /// Which device each part of the model goes to.
    map: DeviceMap,
    /// The part being loaded: its index in the map, and its device.
    slot: usize,
    device: Device,
    /// Each weight's name (adapters too) and the index of its device in the map.
    placed: Vec<(String, usize)>,
    /// What the job tunes: with LoRA or a prefix the checkpoint's weights are frozen.
    tuning: Tuning,
    params: Vec<Param>,
    frozen: Vec<Param>,
    lora_sites: Vec<LoraSite>,
    /// Every linear layer's module name (to explain a LoRA target that matches none).
    linear_modules: Vec<String>,
    used: HashSet<String>,
}

/// One LoRA-adapted layer, for merging at export (shallow clones of its adapter).
pub struct LoraSite {
    /// The layer's module name (`model.layers.0.self_attn.q_proj`).
    pub module: String,
    /// GPT-2's `Conv1D` stores its weight `[in, out]`: the merge is `W + (B A)ᵀ`.
    pub transposed: bool,
    pub lora: Lora,
}

/// What loading a model produced besides the network.
pub struct Loaded {
    /// What MeZO perturbs, in canonical order.
    pub params: ParamList,
    /// The checkpoint's weights when they are not trainable (LoRA, prefix), in canonical order.
    pub frozen: ParamList,
    pub lora_sites: Vec<LoraSite>,
    /// Each weight's name (LoRA adapters too) and the index of its device in
    /// the map, in the order they were made.
    pub placed: Vec<(String, usize)>,
}

impl<'a> WeightLoader<'a> {
    pub fn new(ckpt: &'a Checkpoint, kind: Kind, device: Device) -> Self {
        Self::with_tuning(ckpt, kind, device, Tuning::Full)
    }

    pub fn with_tuning(ckpt: &'a Checkpoint, kind: Kind, device: Device, tuning: Tuning) -> Self {
        Self::placed(ckpt, kind, DeviceMap::single(device), tuning)
    }

    /// A loader that puts each part of the model where `map` says; it starts
    /// with the embeddings.
    pub fn placed(ckpt: &'a Checkpoint, kind: Kind, map: DeviceMap, tuning: Tuning) -> Self {
        Self {
            ckpt,
            kind,
            device: map.first(),
            slot: 0,
            map,
            placed: Vec::new(),
            tuning,
            params: Vec::new(),
            frozen: Vec::new(),
            lora_sites: Vec::new(),
            linear_modules: Vec::new(),
            used: HashSet::new(),
        }
    }

    /// The tensors that follow belong to `part`: they are made on its device.
    /// Models say so before each part, whatever order their tensors come in.
    pub fn place(&mut self, part: Part) {
        self.slot = self.map.slot(part);
        self.device = self.map.device(part);
    }

    /// Record a checkpoint weight as trainable (full tuning) or frozen.
    fn keep(&mut self, name: &str, t: &Tensor) {
        self.placed.push((name.to_string(), self.slot));
        let p = Param {
            name: name.to_string(),
            tensor: t.shallow_clone(),
            decays: !is_decay_exempt(name),
        };
        match self.tuning {
            Tuning::Full => self.params.push(p),
            _ => self.frozen.push(p),
        }
    }

    /// Checkpoint weights loaded so far (adapters not counted).
    fn loaded(&self) -> usize {
        match self.tuning {
            Tuning::Full => self.params.len(),
            _ => self.frozen.len(),
        }
    }

    /// The LoRA adapter of linear layer `module` when the job's LoRA targets it
    /// (A drawn from the job's seed, B zero); its tensors become trainable.
    pub fn lora(
        &mut self,
        module: &str,
        fan_in: i64,
        fan_out: i64,
        transposed: bool,
    ) -> Result<Option<Lora>> {
        self.linear_modules.push(module.to_string());
        let Tuning::Lora(cfg) = &self.tuning else {
            return Ok(None);
        };
        if !is_target(module, &cfg.targets) {
            return Ok(None);
        }
        let a = lora_a_init(
            cfg.seed,
            self.lora_sites.len(),
            cfg.r,
            fan_in,
            self.kind,
            self.device,
        );
        let b = Tensor::zeros([fan_out, cfg.r], (self.kind, self.device));
        let lora = Lora {
            a,
            b,
            scale: cfg.alpha / cfg.r as f64,
        };
        for (part, t) in [("lora_A", &lora.a), ("lora_B", &lora.b)] {
            // On its layer's device, as the layer's own weights.
            self.placed
                .push((format!("{module}.{part}.weight"), self.slot));
            self.params.push(Param {
                name: format!("{module}.{part}.weight"),
                tensor: t.shallow_clone(),
                decays: true,
            });
        }
        self.lora_sites.push(LoraSite {
            module: module.to_string(),
            transposed,
            lora: Lora {
                a: lora.a.shallow_clone(),
                b: lora.b.shallow_clone(),
                scale: lora.scale,
            },
        });
        Ok(Some(lora))
    }

    /// The stored name for a canonical HF name, tolerating the usual drift:
    /// a dropped or added `model.`/`transformer.` prefix and legacy `gamma`/`beta`.
    fn resolve(&self, name: &str) -> Option<String> {
        let mut candidates = vec![name.to_string()];
        for prefix in ["model.", "transformer.", "decoder."] {
            if let Some(rest) = name.strip_prefix(prefix) {
                candidates.push(rest.to_string());
            }
            candidates.push(format!("{prefix}{name}"));
        }
        let legacy: Vec<String> = candidates
            .iter()
            .filter_map(|c| {
                c.strip_suffix(".weight")
                    .map(|s| format!("{s}.gamma"))
                    .or_else(|| c.strip_suffix(".bias").map(|s| format!("{s}.beta")))
            })
            .collect();
        candidates.extend(legacy);
        candidates.into_iter().find(|c| self.ckpt.contains(c))
    }

    /// Whether the checkpoint stores this tensor (under any tolerated spelling).
    pub fn has(&self, name: &str) -> bool {
        self.resolve(name).is_some()
    }

    /// Load `name` with the expected shape as a trainable parameter.
    pub fn param(&mut self, name: &str, shape: &[i64]) -> Result<Tensor> {
        if let Some(init) = self.ckpt.random {
            let t = self.draw(init, name, shape);
            self.keep(name, &t);
            return Ok(t);
        }
        let stored = self.resolve(name).with_context(|| {
            format!(
                "tensor {name} is missing from the checkpoint in {}",
                self.ckpt.dir().display()
            )
        })?;
        let _guard = tch::no_grad_guard();
        let raw = self.ckpt.read(&stored)?;
        if raw.size() != shape {
            bail!(
                "tensor {name} in {} has shape {:?}, expected {:?} from config.json",
                self.ckpt.dir().display(),
                raw.size(),
                shape
            );
        }
        let t = raw
            .to_device(self.device)
            .to_kind(self.kind)
            .set_requires_grad(false);
        self.used.insert(stored);
        self.keep(name, &t);
        Ok(t)
    }

    /// A tensor of a weightless checkpoint.
    fn draw(&self, init: RandomInit, name: &str, shape: &[i64]) -> Tensor {
        let _guard = tch::no_grad_guard();
        let opts = (self.kind, self.device);
        match init {
            RandomInit::ShapesOnly => Tensor::zeros([1], opts).expand(shape, false),
            RandomInit::Draw { seed } => {
                if name.ends_with(".bias") {
                    Tensor::zeros(shape, opts)
                } else if is_decay_exempt(name) {
                    Tensor::ones(shape, opts) // norm weights
                } else {
                    tch::manual_seed((seed + self.loaded() as u64) as i64);
                    let mut t = Tensor::empty(shape, opts);
                    let _ = t.normal_(0.0, 0.02);
                    t
                }
            }
        }
    }

    /// Tensors the checkpoint holds that no parameter claimed, ignoring known buffers.
    pub fn unused(&self) -> Vec<String> {
        let ignore = [
            "attn.bias",
            "attn.masked_bias",
            "rotary_emb.inv_freq",
            "position_ids",
            "lm_head.weight",
            // Masked LMs' decoders, stored by some checkpoints as copies of the tied embedding.
            "predictions.decoder.weight",
            "lm_head.decoder.weight",
        ];
        let mut v: Vec<String> = self
            .ckpt
            .names()
            .filter(|n| !self.used.contains(*n) && !ignore.iter().any(|i| n.ends_with(i)))
            .cloned()
            .collect();
        v.sort();
        v
    }

    pub fn finish(self) -> Result<Loaded> {
        let unused = self.unused();
        if !unused.is_empty() {
            tracing::warn!(
                "checkpoint tensors not used by the model: {}",
                unused.join(", ")
            );
        }
        if let Tuning::Lora(cfg) = &self.tuning {
            for target in &cfg.targets {
                if !self
                    .linear_modules
                    .iter()
                    .any(|m| is_target(m, std::slice::from_ref(target)))
                {
                    let mut leaves: Vec<&str> = self
                        .linear_modules
                        .iter()
                        .map(|m| m.rsplit('.').next().unwrap_or(m))
                        .collect();
                    leaves.sort();
                    leaves.dedup();
                    bail!(
                        "LoRA target {target:?} matches no linear layer of this model (its linear layers: {})",
                        leaves.join(", ")
                    );
                }
            }
        }
        Ok(Loaded {
            params: ParamList(self.params),
            frozen: ParamList(self.frozen),
            lora_sites: self.lora_sites,
            placed: self.placed,
        })
    }
}
