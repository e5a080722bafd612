//! A fine-tune in kilobytes: the `.mezo` file.
//!
//! MeZO's weights are a pure function of the base weights and the list of
//! (seed, projected gradient, learning rate) per step, so that list *is* the
//! fine-tune.  A `.mezo` file holds it together with what is needed to replay it
//! exactly: the base model's identity (SHA-256 of its parameters and of its
//! config), the dtype, ε and weight decay, the generator of z, the parameters in
//! canonical order (name, shape, whether weight decay applies) and the
//! determinism fingerprint of the run.  It is JSON (floats written so that
//! they read back exactly), readable by `scripts/mezo_rebuild.py` without
//! mezod.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::fingerprint::Fingerprint;
use super::seedlog::{SeedLog, StepRecord};
use crate::mezo::{replay_step, Logged, Rng, StepConfig, ZSweep};
use crate::model::adapters::{LoraConfig, PrefixConfig, Tuning};
use crate::model::{Dtype, LanguageModel, ModelSource, ParamList};
use crate::spec::JobSpec;
use mezod_core::estimator::{Estimator, EstimatorName};
use mezod_core::hf_cache::{self, Snapshot};
use mezod_core::mezo_options::Perturbation;

pub const FORMAT: &str = "mezo";

/// Where a LoRA or prefix run records [`params_sha256`] of its starting adapters.
pub const INITIAL_SHA256: &str = "initial.sha256";
/// Version 2 files tune adapters (LoRA, prefix); version 3 files use an
/// estimator other than MeZO or ±1 directions; version 4, LOZO's low-rank
/// directions; plain MeZO full fine-tunes stay version 1, which every mezod
/// reads.  An older mezod refuses a newer version rather than replaying its
/// steps by the wrong rule.
pub const VERSION: u32 = 4;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TuneFile {
    pub format: String,
    pub version: u32,
    pub base: BaseIdentity,
    /// `full` (every parameter of the base is tuned), `lora` or `prefix`.
    pub tuning: String,
    /// LoRA's settings (targets resolved; A drawn from `seed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraEntry>,
    /// Prefix tuning's settings (initial tokens drawn from `seed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<PrefixEntry>,
    /// LoRA, prefix: SHA-256 of the trainable tensors before the first step, as
    /// the run built them (see [`params_sha256`]); a rebuild must start there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_sha256: Option<String>,
    pub dtype: Dtype,
    pub rng: Rng,
    /// How each step turned forward passes into an update (absent: mezo).
    #[serde(default, skip_serializing_if = "EstimatorName::is_mezo")]
    pub estimator: EstimatorName,
    /// Each element of z: Gaussian (absent) or ±1.
    #[serde(default, skip_serializing_if = "Perturbation::is_gaussian")]
    pub perturbation: Perturbation,
    /// `sparse`: the fraction of each tensor a step left alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sparsity: Option<f64>,
    /// `lozo`: the rank of each matrix's direction `U·Vᵀ`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<usize>,
    pub eps: f64,
    pub weight_decay: f64,
    pub fingerprint: Fingerprint,
    pub params: Vec<ParamEntry>,
    pub steps: Vec<TuneStep>,
}

/// Which base model a fine-tune applies to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseIdentity {
    /// Where the run took it from (a hint for `mezod apply` without `--base`).
    pub source: String,
    /// A base from the Hugging Face cache: its id and the commit the run
    /// read, so that `mezod apply` finds that commit in this machine's cache
    /// where `source` (a snapshot folder of the run's machine) is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub: Option<HubBase>,
    /// Random-weight bases: the seed of their weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub random_seed: Option<u64>,
    /// SHA-256 over the parameters in canonical order at the run's dtype: for
    /// each, its name, a newline, its shape as comma-separated numbers, a
    /// newline, then its bytes (little-endian, row-major).
    pub weights_sha256: String,
    /// SHA-256 of config.json as canonical JSON (sorted keys, compact) without
    /// the keys that only record how it was saved (dtype, versions, names).
    pub config_sha256: String,
}

/// A Hugging Face model at one commit (`org/name`, 40 hex digits).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubBase {
    pub id: String,
    pub commit: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraEntry {
    pub r: i64,
    pub alpha: f64,
    pub targets: Vec<String>,
    pub seed: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefixEntry {
    pub tokens: i64,
    pub seed: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamEntry {
    pub name: String,
    pub shape: Vec<i64>,
    pub decays: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TuneStep {
    pub step: u64,
    pub seed: u64,
    pub projected_grad: f64,
    pub lr: f64,
    /// n-SPSA, FZOO: the further directions' (seed, projected gradient), in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub more: Vec<(u64, f64)>,
    /// FZOO: σ, the spread of the step's perturbed losses (see `StepRecord`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread: Option<f64>,
    /// LOZO: the seed of the step's V.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basis: Option<u64>,
}

/// SHA-256 over parameters in order: for each, its name, a newline, its shape
/// as comma-separated numbers, a newline, then its bytes (little-endian, row-major).
pub fn params_sha256(params: &ParamList) -> String {
    let mut h = Sha256::new();
    for p in params.iter() {
        let t = p.tensor.to_device(tch::Device::Cpu).contiguous();
        let shape: Vec<String> = t.size().iter().map(|d| d.to_string()).collect();
        h.update(p.name.as_bytes());
        h.update(b"\n");
        h.update(shape.join(",").as_bytes());
        h.update(b"\n");
        let bytes = t.numel() * t.kind().elt_size_in_bytes();
        // SAFETY: a contiguous CPU tensor of `bytes` bytes, alive for this scope.
        h.update(unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, bytes) });
    }
    format!("{:x}", h.finalize())
}

/// The identity of a loaded base model (see [`BaseIdentity`]).
pub fn base_identity(model: &LanguageModel, source: &ModelSource) -> Result<BaseIdentity> {
    let mut config: serde_json::Value = serde_json::from_str(&model.config_text)?;
    if let Some(map) = config.as_object_mut() {
        for key in [
            "torch_dtype",
            "dtype",
            "transformers_version",
            "_name_or_path",
            "architectures",
        ] {
            map.remove(key);
        }
    }
    let (description, random_seed) = match source {
        ModelSource::Pretrained(p) => (p.display().to_string(), None),
        ModelSource::Random { config, seed } => (config.display().to_string(), Some(*seed)),
        ModelSource::Shapes { config } => (config.display().to_string(), None),
    };
    let hub = match source {
        ModelSource::Pretrained(p) => Snapshot::from_folder(p).map(|s| HubBase {
            id: s.id,
            commit: s.commit,
        }),
        _ => None,
    };
    Ok(BaseIdentity {
        source: description,
        hub,
        random_seed,
        weights_sha256: params_sha256(model.base_weights()),
        config_sha256: format!(
            "{:x}",
            Sha256::digest(serde_json::to_string(&config)?.as_bytes())
        ),
    })
}

/// The step records of a run folder: its seed log (`mezod run`), or the
/// metrics file a daemon job's folder holds.
fn run_records(run: &Path) -> Result<Vec<StepRecord>> {
    let seedlog = run.join("seedlog");
    if seedlog.is_dir() {
        return SeedLog::open(&seedlog)?.contiguous();
    }
    let metrics = run.join("metrics.jsonl");
    if metrics.is_file() {
        let steps = super::metrics::read_steps(&metrics)?;
        if steps.iter().enumerate().all(|(i, s)| s.step == i as u64) {
            return Ok(steps);
        }
        bail!(
            "{} does not hold steps 0, 1, 2, … in order",
            metrics.display()
        );
    }
    bail!(
        "{} is not a run folder: no seedlog/ or metrics.jsonl (give the --out folder of `mezod run`, \
         or a daemon job's run folder)",
        run.display()
    )
}

/// The steps whose weights a run exported when it finished (the weights in
/// `model/`: `exported.step`, or `best_step` for a run from before `export:`),
/// else every logged step.
fn default_upto(run: &Path, logged: u64) -> u64 {
    let result = std::fs::read_to_string(run.join("result.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
    result
        .and_then(|r| {
            r["exported"]["step"]
                .as_u64()
                .or_else(|| r["best_step"].as_u64())
        })
        .unwrap_or(logged)
        .min(logged)
}

/// Build the `.mezo` file of the run in `run` for steps `0..upto`
/// (default: the exported weights' steps).
pub fn export(run: &Path, upto: Option<u64>) -> Result<TuneFile> {
    let spec_path = run.join("spec.yaml");
    let spec = JobSpec::parse(
        &std::fs::read_to_string(&spec_path)
            .with_context(|| format!("{} has no spec.yaml: not a run folder", run.display()))?,
        run,
    )?;
    let fingerprint: Fingerprint = serde_json::from_str(
        &std::fs::read_to_string(run.join("fingerprint.json"))
            .with_context(|| format!("reading {}/fingerprint.json", run.display()))?,
    )?;
    let records = run_records(run)?;
    let upto = match upto {
        Some(n) if n > records.len() as u64 => bail!(
            "--step {n}: the run has logged only {} steps",
            records.len()
        ),
        Some(n) => n,
        None => default_upto(run, records.len() as u64),
    };
    let source = spec.model.source();
    let model =
        LanguageModel::open_tuned(&source, spec.model.dtype, tch::Device::Cpu, &spec.tuning())
            .with_context(|| format!("loading the base model {}", spec.model.describe()))?;
    let base = base_identity(&model, &source)?;
    let estimator = spec.mezo.estimator();
    let (sparsity, rank, _) = estimator.settings();
    Ok(TuneFile {
        format: FORMAT.into(),
        version: estimator
            .tune_file_version(spec.mezo.perturbation(), model.tuning == Tuning::Full),
        initial_sha256: std::fs::read_to_string(run.join(INITIAL_SHA256))
            .ok()
            .map(|s| s.trim().to_string()),
        base,
        tuning: model.tuning.name().into(),
        lora: match &model.tuning {
            Tuning::Lora(c) => Some(LoraEntry {
                r: c.r,
                alpha: c.alpha,
                targets: c.targets.clone(),
                seed: c.seed,
            }),
            _ => None,
        },
        prefix: match &model.tuning {
            Tuning::Prefix(c) => Some(PrefixEntry {
                tokens: c.tokens,
                seed: c.seed,
            }),
            _ => None,
        },
        dtype: spec.model.dtype,
        rng: fingerprint.rng,
        estimator: estimator.name(),
        perturbation: spec.mezo.perturbation(),
        sparsity,
        rank,
        eps: spec.mezo.eps,
        weight_decay: spec.mezo.weight_decay,
        fingerprint,
        params: model
            .params
            .iter()
            .map(|p| ParamEntry {
                name: p.name.clone(),
                shape: p.tensor.size(),
                decays: p.decays,
            })
            .collect(),
        steps: records[..upto as usize]
            .iter()
            .map(|r| TuneStep {
                step: r.step,
                seed: r.seed,
                projected_grad: r.projected_grad,
                lr: r.lr,
                more: r.more.iter().map(|d| (d.seed, d.projected_grad)).collect(),
                spread: r.spread,
                basis: r.basis,
            })
            .collect(),
    })
}

impl TuneFile {
    pub fn read(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let tune: TuneFile = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a .mezo file", path.display()))?;
        if tune.format != FORMAT || tune.version > VERSION {
            bail!(
                "{} is format {:?} version {}; this mezod reads {FORMAT:?} up to version {VERSION}",
                path.display(),
                tune.format,
                tune.version
            );
        }
        Ok(tune)
    }

    /// Write durably (a synced temporary file renamed into place).
    pub fn write(&self, path: &Path) -> Result<()> {
        mezod_core::durable::write(path, serde_json::to_string_pretty(self)?)
    }

    /// The base model as the run had it: `base` if given (a model directory, a
    /// GGUF file, the config.json of a random-weight base, or a Hugging Face
    /// id), else the recorded source; either found in this machine's Hugging
    /// Face cache where it names nothing (see [`TuneFile::in_hub_cache`]).
    pub fn base_source(&self, base: Option<&Path>) -> ModelSource {
        let path = base
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(&self.base.source));
        let path = self.in_hub_cache(&path, base.is_some()).unwrap_or(path);
        match self.base.random_seed {
            Some(seed) => ModelSource::Random { config: path, seed },
            None => ModelSource::Pretrained(path),
        }
    }

    /// Where `path` names no file or folder, the snapshot it stands for in
    /// this machine's Hugging Face cache: a `--base org/name` at the file's
    /// commit when the ids match (the base the file was made on), else at
    /// `main`; the recorded source (a snapshot folder on the run's machine)
    /// at the recorded id and commit.  A miss is said as a warning and `None`
    /// is returned: the path is then loaded as it is, and fails there.
    fn in_hub_cache(&self, path: &Path, given: bool) -> Option<PathBuf> {
        if path.symlink_metadata().is_ok() {
            return None;
        }
        let pinned = self.base.hub.as_ref();
        let (id, commit) = if given {
            let id = path.to_str().filter(|s| hf_cache::is_repo_id(s))?;
            (id, pinned.filter(|h| h.id == id).map(|h| h.commit.as_str()))
        } else {
            let hub = pinned?;
            (hub.id.as_str(), Some(hub.commit.as_str()))
        };
        match hf_cache::find(id, commit) {
            Ok(found) => Some(found.folder),
            Err(miss) => {
                tracing::warn!("the base: {miss:#}");
                None
            }
        }
    }

    /// What the fine-tune trained (how to build the model it applies to).
    pub fn tuning(&self) -> Result<Tuning> {
        Ok(match (self.tuning.as_str(), &self.lora, &self.prefix) {
            ("full", None, None) => Tuning::Full,
            ("lora", Some(l), None) => Tuning::Lora(LoraConfig {
                r: l.r,
                alpha: l.alpha,
                targets: l.targets.clone(),
                seed: l.seed,
            }),
            ("prefix", None, Some(p)) => Tuning::Prefix(PrefixConfig {
                tokens: p.tokens,
                seed: p.seed,
            }),
            (kind, ..) => bail!("tuning {kind:?} with these settings is not one this mezod knows"),
        })
    }

    /// Replay the fine-tune on `model` (the base, loaded at the file's dtype
    /// and tuning, see [`TuneFile::tuning`]):
    /// refuses a base whose identity differs, and (unless `force`) a machine
    /// on which the file's z would not be drawn identically.
    pub fn apply(&self, model: &LanguageModel, source: &ModelSource, force: bool) -> Result<()> {
        if model.dtype != self.dtype {
            bail!(
                "the base is loaded as {} but the fine-tune was made in {}",
                model.dtype,
                self.dtype
            );
        }
        if model.tuning != self.tuning()? {
            bail!(
                "the base is loaded for {} tuning but the fine-tune is {}",
                model.tuning.name(),
                self.tuning
            );
        }
        if let Some(expected) = &self.initial_sha256 {
            let here = params_sha256(&model.params);
            if &here != expected && !force {
                bail!(
                    "the {} tensors built here before the first step differ from the run's                      (SHA-256 {here} vs {expected}): a prefix starts from a forward pass, whose                      last bits depend on the device, dtype and CPU. The rebuilt weights would                      not be identical; pass --force to apply anyway",
                    self.tuning
                );
            }
        }
        let found = base_identity(model, source)?;
        if found.weights_sha256 != self.base.weights_sha256 {
            bail!(
                "this base is not the one the fine-tune was made on: its weights hash to {} \
                 (expected {}; base {})",
                found.weights_sha256,
                self.base.weights_sha256,
                self.base.source
            );
        }
        if found.config_sha256 != self.base.config_sha256 && !force {
            bail!(
                "the base's weights match but its config.json differs from the one the fine-tune \
                 was made with (hash {} vs {}); pass --force to apply anyway",
                found.config_sha256,
                self.base.config_sha256
            );
        }
        let device = match model.device {
            tch::Device::Cuda(n) => mezod_core::model_ref::DeviceRef::Cuda(n),
            _ => mezod_core::model_ref::DeviceRef::Cpu,
        };
        if self.rng == Rng::Torch {
            // torch's generator: the same z needs the same libtorch and device kind.
            let here = Fingerprint::current(device, self.dtype, self.fingerprint.threads, self.rng);
            let differs = here.torch != self.fingerprint.torch
                || here.device != self.fingerprint.device
                || here.gpu != self.fingerprint.gpu;
            if differs && !force {
                bail!(
                    "the fine-tune drew z with torch on {}; here: {}. \
                     The rebuilt weights would not be identical; pass --force to apply anyway",
                    self.fingerprint,
                    here
                );
            }
        }
        let z = ZSweep::new(self.rng, self.fingerprint.threads.max(1) as usize)
            .with_perturbation(self.perturbation);
        // V's lifetime is not needed: each LOZO step logged its seed of V.
        let estimator = Estimator::from_settings(self.estimator, self.sparsity, self.rank, None)
            .map_err(|e| anyhow::anyhow!("the file's estimator: {e}"))?;
        for (i, s) in self.steps.iter().enumerate() {
            if s.step != i as u64 {
                bail!(
                    "the file's steps are not 0, 1, 2, … (entry {i} is step {})",
                    s.step
                );
            }
            let cfg = StepConfig {
                eps: self.eps,
                lr: s.lr,
                weight_decay: self.weight_decay,
            };
            let (seeds, grads): (Vec<u64>, Vec<f64>) = std::iter::once((s.seed, s.projected_grad))
                .chain(s.more.iter().copied())
                .unzip();
            let logged = Logged {
                spread: s.spread,
                basis: s.basis,
            };
            replay_step(&model.params, &z, estimator, &seeds, &grads, logged, &cfg)
                .with_context(|| format!("step {i} of the file"))?;
        }
        Ok(())
    }
}
