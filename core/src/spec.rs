//! The job file: what to fine-tune, on what, and how.  Parsed strictly: an
//! unknown or misspelled field is an error that names its line and column.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::estimator::{Estimator, EstimatorName};
use crate::hf_cache::{self, CacheRoot, Snapshot};
use crate::mezo_options::{LrSchedule, Perturbation, Rng};
use crate::model_ref::{Dtype, ModelSource, Placement};
use crate::tuning::{LoraConfig, PrefixConfig, Tuning};

/// The most steps a job may ask for: far beyond any published MeZO run, and
/// short of "forever" (a daemon job that never ends holds its GPU for good).
pub const MAX_STEPS: u64 = 10_000_000;

/// The longest job `name:`: a table column, not a description.
pub const MAX_NAME_CHARS: usize = 100;

/// `text` as a job name: control and invisible format characters become `_`, cut to
/// [`MAX_NAME_CHARS`] characters (what `mezod submit` makes of a file's stem).
pub fn as_job_name(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() || is_invisible_format(c) {
                '_'
            } else {
                c
            }
        })
        .take(MAX_NAME_CHARS)
        .collect()
}

/// Characters that change how the text around them is shown without being
/// seen: bidirectional overrides and isolates, zero-width characters.  In a
/// name every user's `mezod status` prints, one user could otherwise make a
/// job's line read as something else.
fn is_invisible_format(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{061C}' | '\u{180E}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{2069}' | '\u{FEFF}')
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// What `mezod status` calls the job (default: the job file's name
    /// without its extension; `mezod submit` writes that in).  Plain text of
    /// at most [`MAX_NAME_CHARS`] characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Folder that relative paths are taken from (default: the job file's own
    /// folder).  `mezod submit` fills it in, because a job dropped into the
    /// spool no longer sits beside its data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<PathBuf>,
    /// Daemon queue priority: higher runs first; equal priorities run in
    /// submission order.  Ignored by `mezod run`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub priority: i32,
    /// Daemon only: jobs this one waits for, by id or by name (the owner's
    /// newest job of that name), all of the same owner's (root may name
    /// anyone's).  It starts once they are all `done`, and fails at once if
    /// one fails or is cancelled.  Ignored by `mezod run`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<JobRef>,
    /// Daemon only: a command run once when the job ends.  Ignored by `mezod run`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<NotifySpec>,
    /// What the job runs and reports side by side in result.json: `zero_shot`
    /// (always measured), `icl` (in-context demonstrations from the training
    /// split), `linear_probe` (logistic regression on the model's features),
    /// `mezo` (fine-tuning).  Default: `[zero_shot, mezo]`.
    #[serde(default = "default_modes", skip_serializing_if = "is_default_modes")]
    pub mode: Vec<Mode>,
    /// Settings of the `icl` baseline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icl: Option<IclSpec>,
    pub model: ModelSpec,
    /// What MeZO tunes: `full` (every weight; default), `lora` (low-rank
    /// adapters on the attention projections) or `prefix` (trainable key/value
    /// prefixes in every attention layer).
    #[serde(default, skip_serializing_if = "TuningKind::is_full")]
    pub tuning: TuningKind,
    /// Settings of `tuning: lora`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraSpec>,
    /// Settings of `tuning: prefix`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<PrefixSpec>,
    pub task: TaskSpec,
    pub data: DataSpec,
    /// The fine-tuning.  Needed when `mode` lists `mezo` (the default); a job
    /// that only measures baselines (`mode: [zero_shot, icl]`) leaves it out.
    #[serde(
        default = "MezoSpec::absent",
        skip_serializing_if = "MezoSpec::is_absent"
    )]
    pub mezo: MezoSpec,
    /// Which weights `model/`, `adapter/` and `mezod export` hold: `final`
    /// (after the last step; the default, as Hugging Face's Trainer) or
    /// `best` (the dev evaluation with the best metric, a tie going to the
    /// lower dev loss, then to the later step).
    #[serde(default, skip_serializing_if = "Export::is_final")]
    pub export: Export,
    /// Replicas that share each step's directions: `{replicas: K}` runs K
    /// processes, each measuring `mezo.directions / K` of them (directions
    /// defaults to K).  It changes how fast a job runs, not what it computes:
    /// the same as one process with those directions, bit for bit, so a run
    /// resumes with any number of replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel: Option<ParallelSpec>,
}

/// `parallel:`: how many processes share a job's steps.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ParallelSpec {
    /// Processes, each on a device of its own (torchrun's or Slurm's count
    /// wins when one of them starts mezod).
    pub replicas: usize,
    /// A daemon may run (or resume) the job with fewer replicas once it has
    /// waited long for `replicas` pools (the daemon's `elastic_wait_s`):
    /// each step computes the same bits with any count, only slower.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub elastic: bool,
}

/// The most replicas one job may have (as many as its directions).
pub const MAX_REPLICAS: usize = 64;

/// `export:`: which of a run's weights it hands back.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Export {
    /// The weights after the last step.
    #[default]
    Final,
    /// The weights of the best dev evaluation.
    Best,
}

impl Export {
    fn is_final(&self) -> bool {
        *self == Export::Final
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    ZeroShot,
    Icl,
    LinearProbe,
    Mezo,
}

/// The most jobs one job may wait for (`after:`).
pub const MAX_AFTER: usize = 64;
/// The most words of a `notify.command`, and the longest word.
pub const MAX_NOTIFY_ARGS: usize = 64;
pub const MAX_NOTIFY_ARG_BYTES: usize = 4096;

/// A job named in `after:`: its id, or its name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(untagged)]
pub enum JobRef {
    Id(u64),
    Name(String),
}

impl JobRef {
    /// `7` is an id, anything else a name (what `mezod submit --after` takes).
    pub fn from_arg(arg: &str) -> Self {
        match arg.parse() {
            Ok(id) => JobRef::Id(id),
            Err(_) => JobRef::Name(arg.to_string()),
        }
    }
}

impl std::fmt::Display for JobRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobRef::Id(id) => write!(f, "job {id}"),
            JobRef::Name(n) => write!(f, "job {n:?}"),
        }
    }
}

impl<'de> Deserialize<'de> for JobRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = JobRef;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a job id (a positive integer) or a job name")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<JobRef, E> {
                Ok(JobRef::Id(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<JobRef, E> {
                u64::try_from(v)
                    .map(JobRef::Id)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<JobRef, E> {
                Ok(JobRef::Name(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// `notify:`: what the daemon runs once when the job ends.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NotifySpec {
    /// The program and its arguments, as a list (no shell): an absolute
    /// path, or a name looked up in `/usr/local/bin:/usr/bin:/bin`.
    pub command: Vec<String>,
}

fn default_modes() -> Vec<Mode> {
    vec![Mode::ZeroShot, Mode::Mezo]
}
fn is_default_modes(m: &Vec<Mode>) -> bool {
    *m == default_modes()
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum TuningKind {
    #[default]
    Full,
    Lora,
    Prefix,
}

impl TuningKind {
    fn is_full(&self) -> bool {
        *self == TuningKind::Full
    }
}

/// LoRA (the MeZO paper's MeZO-LoRA: r = 8, α = 16 on the query and value
/// projections; lr 1e-4 or 5e-5, eps 1e-2).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoraSpec {
    #[serde(default = "lora_r")]
    pub r: i64,
    #[serde(default = "lora_alpha")]
    pub alpha: f64,
    /// Linear layers to adapt, by module name or its last parts (PEFT's
    /// `target_modules`).  Default: the query and value projections (`q_proj`,
    /// `v_proj`; GPT-2: its fused `c_attn`; BERT/RoBERTa: `query`, `value`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<String>,
}

impl Default for LoraSpec {
    fn default() -> Self {
        Self {
            r: lora_r(),
            alpha: lora_alpha(),
            targets: Vec::new(),
        }
    }
}

fn lora_r() -> i64 {
    8
}
fn lora_alpha() -> f64 {
    16.0
}

/// Prefix tuning (the MeZO paper's MeZO-prefix: 5 tokens initialized from
/// real activations; lr 1e-2 or 1e-3, eps 1e-1).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PrefixSpec {
    #[serde(default = "prefix_tokens")]
    pub tokens: i64,
}

impl Default for PrefixSpec {
    fn default() -> Self {
        Self {
            tokens: prefix_tokens(),
        }
    }
}

fn prefix_tokens() -> i64 {
    5
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IclSpec {
    /// Demonstrations per prompt, drawn from the training split (the paper: 32
    /// for OPT where they fit; a few fit in short contexts).
    #[serde(default = "icl_k")]
    pub k: usize,
    /// Seed of the draw (default: `mezo.seed`).
    #[serde(default)]
    pub seed: Option<u64>,
}

fn icl_k() -> usize {
    4
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// A Hugging Face model directory (config.json, safetensors, tokenizer.json),
    /// a GGUF file, or a Hugging Face id (`org/name`) where no file or folder
    /// has that name: the model's snapshot in the local cache (`hf_cache`),
    /// kept here as the id.
    #[serde(default, skip_serializing_if = "is_empty_path")]
    pub path: PathBuf,
    /// With an id in `path`: the branch, tag or full commit hash to take
    /// (default `main`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// With an id in `path`: the snapshot folder it was found in
    /// (`…/models--org--name/snapshots/<commit>`), what the model is read
    /// from.  Filled in when the job file is read, and so written into a
    /// run's frozen `spec.yaml`: the commit is pinned there (a resume keeps
    /// it, see [`ModelSpec::keep_snapshot_of`]) and reading that spec again
    /// opens nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<PathBuf>,
    /// Instead of `path`: a `config.json` whose model gets `init` weights
    /// (benchmarks and admission tests at any size, no download).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<Init>,
    /// Seed of the random weights (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default)]
    pub dtype: Dtype,
    /// `cpu`, `cuda` or `cuda:N`; a list of them to split the model's
    /// layers over (`[cuda:0, cuda:1]`, `[cuda:0, cpu]`); or `auto`.
    #[serde(default)]
    pub device: Placement,
    /// CPU threads for libtorch (default: all cores).  Part of the determinism fingerprint.
    #[serde(default)]
    pub threads: Option<i32>,
}

/// The quantity MeZO minimizes.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    #[default]
    Loss,
    /// Minus the batch accuracy (classification and multiple choice).
    Accuracy,
    /// Minus the batch's mean SQuAD F1 of greedy answers (generation).
    F1,
}

impl Objective {
    fn is_loss(&self) -> bool {
        *self == Objective::Loss
    }
}

/// How a model given by its config alone gets its weights.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Init {
    /// Norm weights 1, biases 0, the rest N(0, 0.02²), drawn on the job's device.
    Random,
}

impl ModelSpec {
    /// Where the weights come from (a Hugging Face id: its snapshot folder).
    pub fn source(&self) -> ModelSource {
        match &self.config {
            Some(config) => ModelSource::Random {
                config: config.clone(),
                seed: self.seed.unwrap_or(0),
            },
            None => {
                ModelSource::Pretrained(self.snapshot.clone().unwrap_or_else(|| self.path.clone()))
            }
        }
    }

    /// What messages call the model (a Hugging Face id with its commit).
    pub fn describe(&self) -> String {
        match self.snapshot.as_deref().and_then(Snapshot::from_folder) {
            Some(s) => format!("{} at commit {}", s.id, s.short_commit()),
            None => self.source().describe(),
        }
    }

    /// `path` made absolute with `abs`, or, where it is a Hugging Face id
    /// that names nothing under `base`, looked up in the cache `roots`
    /// (`snapshot` filled in, `path` kept as the id).  A spec that carries its
    /// `snapshot` (a run's frozen one) is taken as it is, and a spec read
    /// without a folder (a spooled job, parsed by the root daemon too) is
    /// never looked up: neither opens a file.
    fn resolve_path(
        &mut self,
        base: Option<&Path>,
        roots: &dyn Fn() -> Vec<CacheRoot>,
        abs: impl Fn(&mut PathBuf, &str) -> Result<()>,
    ) -> Result<()> {
        if self.snapshot.is_some() {
            return Ok(());
        }
        self.check_revision()?;
        let id = self.path.to_str().filter(|p| hf_cache::is_repo_id(p));
        if let (Some(id), Some(base)) = (id, base) {
            let local = base.join(id);
            let absent = matches!(std::fs::symlink_metadata(&local),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound);
            if absent {
                let found = hf_cache::find_in(&roots(), id, self.revision.as_deref())
                    .with_context(|| {
                        format!(
                            "model.path {id} is no file or folder (there is no {}), so it names \
                             a Hugging Face model",
                            local.display()
                        )
                    })?;
                self.snapshot = Some(found.folder);
                return Ok(());
            }
        }
        abs(&mut self.path, "model.path")
    }

    /// A resumed run's model: the snapshot `frozen` (the spec the run started
    /// with) was read from, where this spec names the same id and revision
    /// but the cache now resolves them to another snapshot (its `refs/main`
    /// moved on, or another cache is named).  The run goes on from its own
    /// commit rather than being refused: its seed log rebuilds the weights
    /// from that base and no other, and a branch that moved is no edit of the
    /// job.  An edited id or revision is left to the spec comparison.  Errors
    /// when that commit is no longer in any cache; returns what it did, for
    /// the log.
    pub fn keep_snapshot_of(&mut self, frozen: &ModelSpec) -> Result<Option<String>> {
        let (Some(new), Some(old)) = (&self.snapshot, &frozen.snapshot) else {
            return Ok(None);
        };
        if new == old || self.path != frozen.path || self.revision != frozen.revision {
            return Ok(None);
        }
        let Some(pinned) = Snapshot::from_folder(old) else {
            return Ok(None);
        };
        let now = Snapshot::from_folder(new).map_or(new.display().to_string(), |s| s.commit);
        let revision = self
            .revision
            .as_deref()
            .unwrap_or(hf_cache::DEFAULT_REVISION);
        let folder = if old.is_dir() {
            old.clone()
        } else {
            hf_cache::find(&pinned.id, Some(&pinned.commit))
                .with_context(|| {
                    format!(
                        "this run started from {} at commit {}, the one its steps replay onto, \
                         and {revision} now resolves to {now}; to start it afresh from that \
                         one, pass --restart",
                        pinned.id, pinned.commit
                    )
                })?
                .folder
        };
        let note = format!(
            "{} at {revision} now resolves to {now}; the run goes on from commit {}, the one it \
             started from ({})",
            pinned.id,
            pinned.commit,
            folder.display()
        );
        self.snapshot = Some(folder);
        Ok(Some(note))
    }

    fn validate(&self) -> Result<()> {
        self.validate_hub()?;
        match (&self.config, self.path.as_os_str().is_empty()) {
            (Some(_), false) => bail!("model: give either `path` or `config`, not both"),
            (Some(_), true) if self.init != Some(Init::Random) => {
                bail!("model.config needs `init: random` (the only way to make weights from a config alone)")
            }
            (None, true) => bail!(
                "model.path is required (an HF directory or a .gguf file), or model.config with init: random"
            ),
            (None, false) if self.init.is_some() || self.seed.is_some() => {
                bail!("model.init and model.seed go with model.config, not with a pretrained model.path")
            }
            _ => Ok(()),
        }
    }

    /// A `revision` stays inside the cache's `refs/` (checked before any lookup).
    fn check_revision(&self) -> Result<()> {
        match &self.revision {
            Some(r) if !hf_cache::is_revision(r) => {
                bail!("model.revision {r:?} is not a branch, a tag or a full commit hash")
            }
            _ => Ok(()),
        }
    }

    /// `revision` and `snapshot` go with a Hugging Face id in `path`, and a
    /// snapshot must be one of that id's.
    fn validate_hub(&self) -> Result<()> {
        self.check_revision()?;
        let id = self.path.to_str().filter(|p| hf_cache::is_repo_id(p));
        match (&self.snapshot, id) {
            (Some(snap), Some(id)) => match Snapshot::from_folder(snap) {
                Some(s) if s.id == id && snap.is_absolute() => Ok(()),
                _ => bail!(
                    "model.snapshot {} is not a snapshot of {id} in a Hugging Face cache \
                     (an absolute …/{}/snapshots/<commit> folder)",
                    snap.display(),
                    hf_cache::repo_folder_name(id)
                ),
            },
            (Some(_), None) => bail!(
                "model.snapshot goes with a Hugging Face id (org/name) in model.path, not {}",
                self.path.display()
            ),
            (None, _) if self.revision.is_some() => bail!(
                "model.revision goes with a Hugging Face id (org/name) in model.path that is \
                 found in the local cache; {} is not one",
                if is_empty_path(&self.path) {
                    "an absent model.path".to_string()
                } else {
                    self.path.display().to_string()
                }
            ),
            (None, _) => Ok(()),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    CausalLm,
    Classification,
    MultipleChoice,
    /// SQuAD/DROP-style: a prompt, a written answer; trained on the answer's
    /// tokens (teacher forcing), evaluated by greedy decoding with F1 and EM.
    Generation,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    pub kind: TaskKind,
    /// A built-in template name (`sst2`, `rte`, `boolq`, `copa`) or a prompt with `{field}` placeholders.
    #[serde(default)]
    pub template: Option<String>,
    /// Field holding the label (classification) or the index of the right choice (multiple choice).
    #[serde(default = "label")]
    pub label_field: String,
    /// Label value → answer word (classification).  Built-in templates bring their own.
    #[serde(default)]
    pub label_words: Option<BTreeMap<String, String>>,
    /// Fields holding the candidate answers (multiple choice).
    #[serde(default)]
    pub choices: Vec<String>,
    /// Longest sequence in tokens; longer ones keep their end (the answer).
    #[serde(default = "max_length")]
    pub max_length: usize,
    /// Generation: the field holding the gold answer (or a JSON list of them);
    /// default `answer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer_field: Option<String>,
    /// Generation: the longest answer greedy decoding writes (default 16 tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_new_tokens: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// JSONL or CSV (with a header row) of training examples.
    pub train: PathBuf,
    /// Development set; without it a seeded `dev_fraction` of `train` is held out.
    #[serde(default)]
    pub dev: Option<PathBuf>,
    #[serde(default = "dev_fraction")]
    pub dev_fraction: f64,
    /// Test set, evaluated once with the best weights at the end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test: Option<PathBuf>,
    /// Without a test file: hold out this seeded fraction of `train` as test (default 0: none).
    #[serde(default, skip_serializing_if = "is_zero_f64")]
    pub test_fraction: f64,
    #[serde(default)]
    pub split_seed: u64,
    /// Keep only rows whose field has one of the listed values, e.g.
    /// `{category: [fresh, rotten]}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub filter: BTreeMap<String, Vec<String>>,
    /// Field holding the text (causal_lm, and the `sst2` template).
    #[serde(default = "text")]
    pub text_field: String,
    /// Few-shot sampling, the MeZO paper's RoBERTa setting (after LM-BFF): `k`
    /// training examples per value of `field` (default: `task.label_field`), drawn with
    /// `split_seed`; without a dev file the dev split is the next `k` per value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_class: Option<PerClass>,
    /// Use at most this many training / dev examples (after the split).
    #[serde(default)]
    pub max_train: Option<usize>,
    #[serde(default)]
    pub max_dev: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_test: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PerClass {
    /// Examples per class (the paper: 16 or 512).
    pub k: usize,
    /// The field whose values are the classes (default: `task.label_field`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MezoSpec {
    pub steps: u64,
    #[serde(default = "batch_size")]
    pub batch_size: usize,
    pub lr: f64,
    #[serde(default = "eps")]
    pub eps: f64,
    #[serde(default)]
    pub seed: u64,
    /// Seed of the batch order (default: `seed`).
    #[serde(default)]
    pub data_seed: Option<u64>,
    #[serde(default)]
    pub lr_schedule: LrSchedule,
    #[serde(default)]
    pub weight_decay: f64,
    /// Evaluate on dev every N steps (0: only before and after training).
    #[serde(default)]
    pub eval_every: u64,
    #[serde(default)]
    pub eval_batch_size: Option<usize>,
    /// How forward passes become an update: `mezo` (the default), `fzoo`,
    /// `sparse` or `lozo` (the README gives each one's rule).  Read through
    /// [`MezoSpec::estimator`], with its settings below.
    #[serde(default, skip_serializing_if = "EstimatorName::is_mezo")]
    estimator: EstimatorName,
    /// Directions per step.  MeZO: n-SPSA, each measured at the same weights,
    /// their projected gradients averaged (1: plain MeZO).  FZOO: the N
    /// one-sided directions (at least 2: the update is divided by their spread).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub directions: usize,
    /// Each element of z: `gaussian` or `rademacher` (±1); default: rademacher
    /// for fzoo, gaussian otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub perturbation: Option<Perturbation>,
    /// `sparse`: the fraction of each tensor's weights (the largest in
    /// magnitude) a step leaves alone; default 0.75.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sparsity: Option<f64>,
    /// `lozo`: the rank r of each weight matrix's direction `U·Vᵀ`; default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rank: Option<usize>,
    /// `lozo`: how many consecutive steps share one V (the paper's ν); default 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    basis_every: Option<u64>,
    /// What the two forward passes measure: `loss` (cross-entropy), or
    /// `accuracy` (−accuracy of the batch's candidate scoring: MeZO needs no
    /// gradient, so a non-differentiable metric can be the objective).
    #[serde(default, skip_serializing_if = "Objective::is_loss")]
    pub objective: Objective,
    /// Generator of z: `fast` (counter-based, parallel; the CPU default) or
    /// `torch` (PyTorch's own draws, as the reference code; the GPU default).
    /// A run keeps the generator it started with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rng: Option<Rng>,
    /// Snapshot the trainable weights every N steps (bounds replay on resume);
    /// default 100, or the daemon's `snapshot_every`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_every: Option<u64>,
}

impl MezoSpec {
    /// What a job without a `mezo:` section holds: no steps, every other
    /// setting its default (the seeds, the evaluation batch).
    pub fn absent() -> Self {
        MezoSpec {
            steps: 0,
            batch_size: batch_size(),
            lr: 0.0,
            eps: eps(),
            seed: 0,
            data_seed: None,
            lr_schedule: LrSchedule::default(),
            weight_decay: 0.0,
            eval_every: 0,
            eval_batch_size: None,
            estimator: EstimatorName::default(),
            directions: one(),
            perturbation: None,
            sparsity: None,
            rank: None,
            basis_every: None,
            objective: Objective::default(),
            rng: None,
            snapshot_every: None,
        }
    }

    /// Whether the job file had no `mezo:` section (or one saying nothing).
    pub(crate) fn is_absent(&self) -> bool {
        *self == MezoSpec::absent()
    }

    /// The job's estimator with its settings.  A parsed job file was
    /// validated, so its settings make one; the `Err` is for a spec built
    /// some other way and never validated.
    pub(crate) fn try_estimator(&self) -> Result<Estimator, String> {
        Estimator::from_settings(self.estimator, self.sparsity, self.rank, self.basis_every)
    }

    /// The job's estimator with its settings (defaults where the file has
    /// none).
    pub fn estimator(&self) -> Estimator {
        self.try_estimator()
            .expect("a validated job's estimator settings are valid")
    }

    /// Make the job use `estimator`, with its settings as the job file's keys.
    pub fn set_estimator(&mut self, estimator: Estimator) {
        self.estimator = estimator.name();
        (self.sparsity, self.rank, self.basis_every) = estimator.settings();
    }

    /// The job's direction distribution (its own, or its estimator's default).
    pub fn perturbation(&self) -> Perturbation {
        self.perturbation
            .unwrap_or_else(|| self.estimator().default_perturbation())
    }
}

fn label() -> String {
    "label".into()
}
fn text() -> String {
    "text".into()
}
fn max_length() -> usize {
    512
}
fn dev_fraction() -> f64 {
    0.1
}
fn batch_size() -> usize {
    16
}
fn eps() -> f64 {
    1e-3
}
fn is_empty_path(p: &Path) -> bool {
    p.as_os_str().is_empty()
}
fn one() -> usize {
    1
}
fn is_one(v: &usize) -> bool {
    *v == 1
}
fn is_zero(v: &i32) -> bool {
    *v == 0
}
fn is_zero_f64(v: &f64) -> bool {
    *v == 0.0
}

/// Deepest nesting a job file may have.  Real job files nest three levels;
/// the YAML parser's time grows with the square of the depth (a 200 KB file
/// nested 100,000 levels deep takes it minutes), so deeper files are refused
/// before parsing.
pub const MAX_NESTING: usize = 32;

/// Refuse YAML nested deeper than [`MAX_NESTING`]: flow collections (`[`,
/// `{`, outside quotes and comments) and compact block entries (`- - - x`).
/// Block indentation cannot nest deep in a bounded file (each level costs a
/// column on every line below it), so it is not counted.
fn check_nesting(text: &str) -> Result<()> {
    let mut flow = 0usize;
    let mut quote: Option<char> = None;
    for (n, line) in text.lines().enumerate() {
        let mut compact = 0;
        let mut chars = line.chars().peekable();
        let mut at_entry = quote.is_none() && flow == 0;
        let mut prev = ' ';
        while let Some(c) = chars.next() {
            match quote {
                Some('"') if c == '\\' => {
                    chars.next();
                }
                Some(q) if c == q => quote = None,
                Some(_) => {}
                None => match c {
                    '#' if prev == ' ' || prev == '\t' => break,
                    '"' | '\'' if matches!(prev, ' ' | '\t' | '[' | '{' | ',' | ':') => {
                        quote = Some(c)
                    }
                    '[' | '{' => flow += 1,
                    ']' | '}' => flow = flow.saturating_sub(1),
                    '-' | '?' if at_entry && chars.peek().is_none_or(|n| *n == ' ') => compact += 1,
                    ' ' | '\t' => {}
                    _ => at_entry = false,
                },
            }
            if flow > MAX_NESTING || compact > MAX_NESTING {
                bail!(
                    "invalid job file: nested deeper than {MAX_NESTING} levels at line {}",
                    n + 1
                );
            }
            prev = c;
        }
    }
    Ok(())
}

impl JobSpec {
    /// Parse YAML text; relative paths are taken from `workdir`, else from
    /// `base`, and a Hugging Face id in `model.path` is looked up in the local
    /// cache (`hf_cache`).
    pub fn parse(text: &str, base: &Path) -> Result<Self> {
        Self::parse_with_base(text, Some(base))
    }

    /// Parse YAML text; with no `base`, a relative path is an error unless the
    /// spec names its `workdir` (a spooled job has no meaningful folder of its
    /// own), and nothing is looked up in the Hugging Face cache: the text
    /// alone is read, as the root daemon must.
    pub fn parse_with_base(text: &str, base: Option<&Path>) -> Result<Self> {
        Self::parse_in(text, base, &hf_cache::cache_roots)
    }

    /// [`JobSpec::parse_with_base`] with the Hugging Face cache roots from
    /// `roots` (asked only when a Hugging Face id is looked up).
    fn parse_in(
        text: &str,
        base: Option<&Path>,
        roots: &dyn Fn() -> Vec<CacheRoot>,
    ) -> Result<Self> {
        check_nesting(text)?;
        let read_from_folder = base.is_some();
        let mut spec: JobSpec =
            serde_yaml::from_str(text).map_err(|e| anyhow::anyhow!("invalid job file: {e}"))?;
        if let Some(p) = spec.parallel {
            // One direction per replica unless the job says more.
            if p.replicas > 1 && spec.mezo.directions == 1 {
                spec.mezo.directions = p.replicas;
            }
        }
        if let Some(w) = &spec.workdir {
            if w.is_relative() {
                bail!("workdir must be an absolute path, not {}", w.display());
            }
        }
        // Absolute from here on: the spec is frozen into run folders and read
        // back from other working folders (a resume printed as
        // `mezod run examples/job.yaml …` must find the same files).
        let base = match spec.workdir.clone().or_else(|| base.map(Path::to_path_buf)) {
            // `job.yaml`'s folder is the empty path: the working folder.
            Some(b) if b.as_os_str().is_empty() => Some(std::env::current_dir()?),
            Some(b) => Some(
                std::path::absolute(&b)
                    .with_context(|| format!("making {} absolute", b.display()))?,
            ),
            None => None,
        };
        let abs = |p: &mut PathBuf, field: &str| -> Result<()> {
            if p.is_relative() {
                match &base {
                    Some(b) => *p = b.join(&*p),
                    None => bail!(
                        "{field} is a relative path ({}) in a job without `workdir`: use absolute \
                         paths, add `workdir: /the/folder`, or submit with `mezod submit`, which adds it",
                        p.display()
                    ),
                }
            }
            Ok(())
        };
        if !is_empty_path(&spec.model.path) {
            // Only a job file read from its folder looks a Hugging Face id up
            // (a spooled job names its workdir, but the root daemon parses it too).
            let folder = if read_from_folder {
                base.as_deref()
            } else {
                None
            };
            spec.model.resolve_path(folder, roots, &abs)?;
        }
        if let Some(c) = spec.model.config.as_mut() {
            abs(c, "model.config")?;
        }
        abs(&mut spec.data.train, "data.train")?;
        if let Some(d) = spec.data.dev.as_mut() {
            abs(d, "data.dev")?;
        }
        if let Some(t) = spec.data.test.as_mut() {
            abs(t, "data.test")?;
        }
        spec.validate()?;
        Ok(spec)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading job file {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, base).with_context(|| format!("in {}", path.display()))
    }

    /// Every rule a job file must meet (run by `parse`; public for specs
    /// built in code, such as `mezod bench`'s).
    pub fn validate(&self) -> Result<()> {
        self.validate_header()?;
        self.model.validate()?;
        self.validate_modes_and_tuning()?;
        self.validate_mezo()?;
        self.validate_parallel()?;
        self.validate_data()?;
        self.validate_task()
    }

    /// `name:`, `after:` and `notify:`: what the daemon reads besides the job.
    fn validate_header(&self) -> Result<()> {
        if let Some(name) = &self.name {
            if name.trim().is_empty() || as_job_name(name) != *name {
                bail!(
                    "name must be plain text of 1 to {MAX_NAME_CHARS} characters, without control characters"
                );
            }
        }
        if self.after.len() > MAX_AFTER {
            bail!(
                "after: lists {} jobs; a job may wait for at most {MAX_AFTER}",
                self.after.len()
            );
        }
        for r in &self.after {
            match r {
                JobRef::Id(0) => bail!("after: job ids start at 1"),
                JobRef::Name(n) if n.trim().is_empty() || as_job_name(n) != *n => bail!(
                    "after: {n:?} is not a job name (plain text of 1 to {MAX_NAME_CHARS} \
                     characters, without control characters)"
                ),
                _ => {}
            }
        }
        if let Some(n) = &self.notify {
            let Some(program) = n.command.first() else {
                bail!("notify.command must name a program, e.g. [/usr/bin/logger, done]");
            };
            if n.command.len() > MAX_NOTIFY_ARGS
                || n.command
                    .iter()
                    .any(|a| a.len() > MAX_NOTIFY_ARG_BYTES || a.contains('\0'))
            {
                bail!(
                    "notify.command may have at most {MAX_NOTIFY_ARGS} words of at most \
                     {MAX_NOTIFY_ARG_BYTES} bytes each, without NUL"
                );
            }
            if program.is_empty() || (program.contains('/') && !program.starts_with('/')) {
                bail!(
                    "notify.command's program must be an absolute path or a plain name found in \
                     /usr/local/bin:/usr/bin:/bin, not {program:?}"
                );
            }
        }
        Ok(())
    }

    /// `mode:` and the settings of its baselines; `tuning:` and its settings.
    fn validate_modes_and_tuning(&self) -> Result<()> {
        if self.mode.is_empty() {
            bail!("mode must list at least one of zero_shot, icl, linear_probe, mezo");
        }
        let baselines = self
            .mode
            .iter()
            .any(|m| matches!(m, Mode::Icl | Mode::LinearProbe));
        if baselines && self.task.kind == TaskKind::CausalLm {
            bail!("the icl and linear_probe modes need a classification or multiple_choice task");
        }
        if self.icl.is_some() && !self.mode.contains(&Mode::Icl) {
            bail!("`icl:` settings are given but `mode` does not list icl");
        }
        if self.lora.is_some() && self.tuning != TuningKind::Lora {
            bail!("`lora:` settings are given but `tuning` is not lora");
        }
        if self.prefix.is_some() && self.tuning != TuningKind::Prefix {
            bail!("`prefix:` settings are given but `tuning` is not prefix");
        }
        let lora = self.lora.clone().unwrap_or_default();
        if lora.r < 1 || !(lora.alpha.is_finite() && lora.alpha > 0.0) {
            bail!("lora.r must be at least 1 and lora.alpha positive (the paper: r 8, alpha 16)");
        }
        if !(1..=4096).contains(&self.prefix.clone().unwrap_or_default().tokens) {
            bail!("prefix.tokens must be between 1 and 4096 (the paper uses 5)");
        }
        Ok(())
    }

    /// `parallel:` against the steps it shares.
    fn validate_parallel(&self) -> Result<()> {
        let Some(p) = self.parallel else {
            return Ok(());
        };
        if !(1..=MAX_REPLICAS).contains(&p.replicas) {
            bail!("parallel.replicas must be between 1 and {MAX_REPLICAS}");
        }
        if p.replicas > 1 {
            if !self.mode.contains(&Mode::Mezo) {
                bail!("parallel.replicas shares MeZO's steps, but `mode` does not list mezo");
            }
            self.check_replicas(p.replicas)?;
        }
        Ok(())
    }

    /// The replica counts a daemon may run the job with, preferred first:
    /// `parallel.replicas`, then with `elastic: true` every smaller count
    /// that shares the directions evenly (down to one process).
    pub fn replica_counts(&self) -> Vec<usize> {
        let Some(p) = self.parallel.filter(|p| p.replicas > 1) else {
            return vec![1];
        };
        if !p.elastic {
            return vec![p.replicas];
        }
        (1..=p.replicas)
            .rev()
            .filter(|&k| self.check_replicas(k).is_ok())
            .collect()
    }

    /// Whether `replicas` processes can share this job's steps: each
    /// measures the same number of its directions, and the estimator is one
    /// whose directions are shared.
    pub fn check_replicas(&self, replicas: usize) -> Result<()> {
        if replicas <= 1 {
            return Ok(());
        }
        if !self.mezo.estimator().shares_directions() {
            bail!("replicas share the directions of mezo, sparse and lozo steps; fzoo's are not shared yet");
        }
        let n = self.mezo.directions;
        if n % replicas != 0 {
            bail!(
                "{replicas} replicas share mezo.directions {n}: each replica measures the same \
                 number of directions, so directions must be a multiple of {replicas}"
            );
        }
        Ok(())
    }

    /// `mezo:`: the steps, the estimator and its settings, the step's numbers.
    /// Only a job that fine-tunes needs them.
    fn validate_mezo(&self) -> Result<()> {
        let m = &self.mezo;
        if !self.mode.contains(&Mode::Mezo) {
            return Ok(());
        }
        if m.is_absent() {
            bail!(
                "mode lists mezo{} but the job has no `mezo:` section: give at least its steps \
                 and lr (e.g. `mezo: {{steps: 1000, lr: 1.0e-6}}`), or leave mezo out of mode \
                 to measure baselines only (e.g. `mode: [zero_shot, icl]`)",
                if is_default_modes(&self.mode) {
                    " (the default mode is [zero_shot, mezo])"
                } else {
                    ""
                }
            );
        }
        if !(1..=MAX_STEPS).contains(&m.steps) {
            bail!(
                "mezo.steps must be between 1 and {MAX_STEPS} (the paper runs 20,000 for OPT, \
                 100,000 for RoBERTa)"
            );
        }
        if !(1..=64).contains(&m.directions) {
            bail!("mezo.directions must be between 1 and 64 (the paper's n-SPSA uses a few)");
        }
        let estimator = m.try_estimator().map_err(anyhow::Error::msg)?;
        let (fewest, why) = estimator.min_directions();
        if m.directions < fewest {
            bail!("{why}");
        }
        if m.batch_size == 0 {
            bail!("mezo.batch_size must be at least 1");
        }
        if !(m.eps.is_finite() && m.eps > 0.0) {
            bail!("mezo.eps must be a positive number (the paper uses 1e-3)");
        }
        if !(m.lr.is_finite() && m.lr >= 0.0) {
            bail!("mezo.lr must be a non-negative number");
        }
        Ok(())
    }

    /// `data:`: the splits.
    fn validate_data(&self) -> Result<()> {
        if self.data.per_class.as_ref().is_some_and(|p| p.k == 0) {
            bail!("data.per_class.k must be at least 1 (the paper uses 16 or 512)");
        }
        if !(0.0..1.0).contains(&self.data.dev_fraction) {
            bail!("data.dev_fraction must be in [0, 1)");
        }
        if !(0.0..1.0).contains(&self.data.test_fraction)
            || self.data.dev_fraction + self.data.test_fraction >= 1.0
        {
            bail!("data.test_fraction must be in [0, 1) and leave training examples beside dev_fraction");
        }
        Ok(())
    }

    /// `task:` against the objective and the kind.
    fn validate_task(&self) -> Result<()> {
        let choice = matches!(
            self.task.kind,
            TaskKind::Classification | TaskKind::MultipleChoice
        );
        if self.mezo.objective == Objective::Accuracy && !choice {
            bail!("mezo.objective: accuracy needs a classification or multiple_choice task");
        }
        if self.mezo.objective == Objective::F1 && self.task.kind != TaskKind::Generation {
            bail!("mezo.objective: f1 needs a generation task");
        }
        if self.task.kind == TaskKind::Generation && self.task.template.is_none() {
            bail!(
                "task.template is required for generation (a prompt with {{field}} placeholders)"
            );
        }
        if self.task.kind == TaskKind::MultipleChoice
            && self.task.choices.is_empty()
            && self.task.template.as_deref() != Some(crate::prompts::COPA.name)
        {
            bail!("task.choices must name the fields holding the candidate answers");
        }
        Ok(())
    }

    /// MeZO steps the job runs: none when `mode` leaves out `mezo`.
    pub fn steps(&self) -> u64 {
        if self.mode.contains(&Mode::Mezo) {
            self.mezo.steps
        } else {
            0
        }
    }

    /// What the model is built to tune, adapters seeded by `mezo.seed`.
    pub fn tuning(&self) -> Tuning {
        let seed = self.mezo.seed;
        match self.tuning {
            TuningKind::Full => Tuning::Full,
            TuningKind::Lora => {
                let l = self.lora.clone().unwrap_or_default();
                Tuning::Lora(LoraConfig {
                    r: l.r,
                    alpha: l.alpha,
                    targets: l.targets,
                    seed,
                })
            }
            TuningKind::Prefix => Tuning::Prefix(PrefixConfig {
                tokens: self.prefix.clone().unwrap_or_default().tokens,
                seed,
            }),
        }
    }

    /// One line about what the job runs, for `mezod status ID`.
    pub fn summary(&self) -> String {
        let task = serde_json::to_value(self.task.kind).expect("a task kind serializes");
        let tuning = serde_json::to_value(self.tuning).expect("a tuning kind serializes");
        let dtype = serde_json::to_value(self.model.dtype).expect("a dtype serializes");
        if !self.mode.contains(&Mode::Mezo) {
            let modes: Vec<String> = self
                .mode
                .iter()
                .map(|m| serde_json::to_value(m).expect("a mode serializes"))
                .map(|m| m.as_str().unwrap_or("?").to_string())
                .collect();
            return format!(
                "{} ({} on {}), {}: baselines only ({}), no fine-tuning",
                self.model.describe(),
                dtype.as_str().unwrap_or("?"),
                self.model.device,
                task.as_str().unwrap_or("?"),
                modes.join(", ")
            );
        }
        format!(
            "{} ({} on {}), {} with {} tuning, {} steps of batch {} at lr {}",
            self.model.describe(),
            dtype.as_str().unwrap_or("?"),
            self.model.device,
            task.as_str().unwrap_or("?"),
            tuning.as_str().unwrap_or("?"),
            self.steps(),
            self.mezo.batch_size,
            self.mezo.lr
        ) + &self.mezo.estimator().summary_words()
    }

    pub fn data_seed(&self) -> u64 {
        self.mezo.data_seed.unwrap_or(self.mezo.seed)
    }

    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).expect("a parsed spec serializes")
    }

    /// Whether `other` computes what this job computes: the same in every
    /// field but its `name`, `priority`, `after`, `notify`, `export` and
    /// `parallel`, which only label it, order it, say what happens around it,
    /// which of its weights it hands back and how many processes share its
    /// steps (a run renamed in its job file resumes).  Devices compare by
    /// what they compute like (`Placement::computes_like`): a split over the
    /// CPU alone computes the CPU's bits, so `cpu` and `[cpu, cpu]` are one job.
    pub fn computes_the_same_as(&self, other: &JobSpec) -> bool {
        let unlabelled = |s: &JobSpec| {
            let mut s = JobSpec {
                name: None,
                priority: 0,
                after: vec![],
                notify: None,
                export: Export::Final,
                parallel: None,
                ..s.clone()
            };
            s.model.device = s.model.device.computes_like();
            s
        };
        unlabelled(self) == unlabelled(other)
    }

    /// Each field that differs from `newer`, as `path: old → new`.
    pub fn differences(&self, newer: &JobSpec) -> Vec<String> {
        fn flatten(prefix: &str, v: &serde_json::Value, out: &mut BTreeMap<String, String>) {
            match v {
                serde_json::Value::Object(m) => {
                    for (k, v) in m {
                        let key = if prefix.is_empty() {
                            k.clone()
                        } else {
                            format!("{prefix}.{k}")
                        };
                        flatten(&key, v, out);
                    }
                }
                other => {
                    out.insert(prefix.to_string(), other.to_string());
                }
            }
        }
        let (mut old, mut new) = (BTreeMap::new(), BTreeMap::new());
        let json = |s: &JobSpec| serde_json::to_value(s).expect("a parsed spec serializes");
        flatten("", &json(self), &mut old);
        flatten("", &json(newer), &mut new);
        let keys: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
        let none = "(unset)".to_string();
        keys.into_iter()
            .filter(|k| old.get(*k) != new.get(*k))
            .map(|k| {
                format!(
                    "{k}: {} → {}",
                    old.get(k).unwrap_or(&none),
                    new.get(k).unwrap_or(&none)
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::estimator::{DEFAULT_BASIS_EVERY, DEFAULT_RANK};
    use crate::model_ref::DeviceRef;

    #[test]
    fn deep_nesting_is_refused_before_parsing_and_quoted_brackets_are_text() {
        let deep = format!("a: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
        let t = std::time::Instant::now();
        let e = format!("{:#}", JobSpec::parse_with_base(&deep, None).unwrap_err());
        assert!(e.contains("nested deeper than 32 levels at line 1"), "{e}");
        assert!(t.elapsed().as_secs_f64() < 1.0, "refused before parsing");
        let compact = format!("a:\n  {}x\n", "- ".repeat(1000));
        let e = format!(
            "{:#}",
            JobSpec::parse_with_base(&compact, None).unwrap_err()
        );
        assert!(e.contains("nested deeper") && e.contains("line 2"), "{e}");
        // Brackets in quotes, comments and plain words do not count.
        let many = "[".repeat(40);
        for ok in [
            format!("a: \"{many}\"\n"),
            format!("a: '{many}'\n"),
            format!("a: 1 # {many}\n"),
            format!("a: \"x\\\" {many}\"\n"),
            "a: [[[1]]]\nb: {c: [d, e]}\n- - x\n".to_string(),
        ] {
            check_nesting(&ok).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
        }
    }

    const MINIMAL: &str = "model: {path: m, dtype: f32}\ntask: {kind: causal_lm}\n\
        data: {train: train.jsonl, text_field: text}\nmezo: {steps: 30, batch_size: 1, lr: 1.0e-3, eps: 1.0e-3, seed: 7}\n";

    #[test]
    fn estimator_settings_are_checked_and_belong_to_their_estimator() {
        let with = |mezo: &str| {
            JobSpec::parse(
                &MINIMAL.replace("seed: 7}", &format!("seed: 7, {mezo}}}")),
                Path::new("/j"),
            )
            .map_err(|e| format!("{e:#}"))
        };
        let lozo = with("estimator: lozo").unwrap();
        assert_eq!(
            lozo.mezo.estimator(),
            Estimator::Lozo {
                rank: DEFAULT_RANK,
                basis_every: DEFAULT_BASIS_EVERY
            }
        );
        let set = with("estimator: lozo, rank: 4, basis_every: 7").unwrap();
        assert_eq!(
            set.mezo.estimator(),
            Estimator::Lozo {
                rank: 4,
                basis_every: 7
            }
        );
        for (mezo, says) in [
            (
                "estimator: lozo, rank: 0",
                "mezo.rank must be between 1 and 64",
            ),
            (
                "estimator: lozo, rank: 65",
                "mezo.rank must be between 1 and 64",
            ),
            (
                "estimator: lozo, basis_every: 0",
                "mezo.basis_every must be at least 1",
            ),
            ("rank: 2", "settings of mezo.estimator: lozo"),
            (
                "estimator: sparse, basis_every: 5",
                "settings of mezo.estimator: lozo",
            ),
            (
                "estimator: lozo, sparsity: 0.5",
                "a setting of mezo.estimator: sparse",
            ),
            ("estimator: fzoo", "needs mezo.directions of at least 2"),
            ("estimator: lowrank", "unknown variant"),
        ] {
            let e = with(mezo).unwrap_err();
            assert!(e.contains(says), "{mezo}: {e}");
        }
    }

    #[test]
    fn a_job_name_is_plain_text_and_defaults_to_none() {
        assert_eq!(JobSpec::parse(MINIMAL, Path::new("/j")).unwrap().name, None);
        let named =
            JobSpec::parse(&format!("name: sst2 sweep\n{MINIMAL}"), Path::new("/j")).unwrap();
        assert_eq!(named.name.as_deref(), Some("sst2 sweep"));
        for bad in ["\"\"", "\"a\\nb\"", &"x".repeat(MAX_NAME_CHARS + 1)] {
            let e = JobSpec::parse(&format!("name: {bad}\n{MINIMAL}"), Path::new("/j"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("name must be plain text"), "{bad}: {e}");
        }
        assert_eq!(as_job_name("a\tb\u{1b}[2J"), "a_b_[2J");
        assert_eq!(as_job_name("abc\u{202E}gpj.exe\u{200B}"), "abc_gpj.exe_");
        let s = JobSpec::parse(MINIMAL, Path::new("/j")).unwrap().summary();
        assert_eq!(
            s,
            "/j/m (f32 on cpu), causal_lm with full tuning, 30 steps of batch 1 at lr 0.001"
        );
    }

    /// A job of baselines alone needs no `mezo:` section and writes none into
    /// its frozen spec; a fine-tuning job without one is told what to add.
    #[test]
    fn a_baselines_only_job_has_no_mezo_section() {
        let cls = "model: {path: m, dtype: f32}\ntask: {kind: classification, template: sst2, \
                   label_words: {\"0\": bad, \"1\": good}}\ndata: {train: train.jsonl}\n";
        let job =
            JobSpec::parse(&format!("{cls}mode: [zero_shot, icl]\n"), Path::new("/j")).unwrap();
        assert!(job.mezo.is_absent());
        assert_eq!(job.steps(), 0);
        assert!(!job.to_yaml().contains("mezo"), "{}", job.to_yaml());
        assert_eq!(
            JobSpec::parse(&job.to_yaml(), Path::new("/j")).unwrap(),
            job
        );
        assert!(
            job.summary()
                .ends_with("classification: baselines only (zero_shot, icl), no fine-tuning"),
            "{}",
            job.summary()
        );
        let e = JobSpec::parse(cls, Path::new("/j"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no `mezo:` section") && e.contains("the default mode is [zero_shot, mezo]"),
            "{e}"
        );
        let e = JobSpec::parse(&format!("{cls}mode: [mezo]\n"), Path::new("/j"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no `mezo:` section") && !e.contains("default mode"),
            "{e}"
        );
    }

    /// `parallel:` gives each replica a direction unless the job says more,
    /// must divide the directions, and changes nothing a job computes.
    #[test]
    fn replicas_share_directions_and_compute_the_same() {
        let with = |extra: &str| {
            JobSpec::parse(
                &MINIMAL.replace("seed: 7}", &format!("seed: 7{extra}")),
                Path::new("/j"),
            )
            .map_err(|e| format!("{e:#}"))
        };
        let two = JobSpec::parse(
            &format!("parallel: {{replicas: 2}}\n{MINIMAL}"),
            Path::new("/j"),
        )
        .unwrap();
        assert_eq!(two.mezo.directions, 2);
        let alone = with(", directions: 2}").unwrap();
        assert!(two.computes_the_same_as(&alone) && two != alone);
        // The frozen spec states the directions: it reads back the same with one replica.
        assert!(two.to_yaml().contains("directions: 2"), "{}", two.to_yaml());
        let e = JobSpec::parse(
            &format!(
                "parallel: {{replicas: 2}}\n{}",
                MINIMAL.replace("seed: 7}", "seed: 7, directions: 3}")
            ),
            Path::new("/j"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("directions must be a multiple of 2"), "{e}");
        assert!(alone.check_replicas(4).is_err() && alone.check_replicas(2).is_ok());
        let e = JobSpec::parse(
            &format!("parallel: {{replicas: 65}}\n{MINIMAL}"),
            Path::new("/j"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("between 1 and 64"), "{e}");
        assert_eq!(two.replica_counts(), vec![2]);
        assert_eq!(alone.replica_counts(), vec![1]);
        let elastic = JobSpec::parse(
            &format!(
                "parallel: {{replicas: 4, elastic: true}}\n{}",
                MINIMAL.replace("seed: 7}", "seed: 7, directions: 8}")
            ),
            Path::new("/j"),
        )
        .unwrap();
        assert_eq!(elastic.replica_counts(), vec![4, 2, 1], "each divides 8");
    }

    /// `export:` is `final` unless asked, and changing it changes no step.
    #[test]
    fn export_defaults_to_the_final_weights_and_computes_nothing_else() {
        let job = JobSpec::parse(MINIMAL, Path::new("/j")).unwrap();
        assert_eq!(job.export, Export::Final);
        assert!(!job.to_yaml().contains("export"));
        let best = JobSpec::parse(&format!("export: best\n{MINIMAL}"), Path::new("/j")).unwrap();
        assert_eq!(best.export, Export::Best);
        assert!(best.to_yaml().contains("export: best"));
        assert!(best.computes_the_same_as(&job) && best != job);
        let e = JobSpec::parse(&format!("export: last\n{MINIMAL}"), Path::new("/j"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("final") && e.contains("best"), "{e}");
    }

    /// `after:` holds ids and names (a quoted number is a name); `notify:` a
    /// program and its arguments.  Both survive a round trip through the
    /// frozen spec, and what cannot be meant is refused with the reason.
    #[test]
    fn after_and_notify_parse_strictly() {
        let parse = |head: &str| {
            JobSpec::parse(&format!("{head}\n{MINIMAL}"), Path::new("/j"))
                .map_err(|e| format!("{e:#}"))
        };
        let s = parse("after: [7, prep, \"12\"]\nnotify: {command: [/usr/bin/logger, -t, mezod]}")
            .unwrap();
        assert_eq!(
            s.after,
            vec![
                JobRef::Id(7),
                JobRef::Name("prep".into()),
                JobRef::Name("12".into())
            ]
        );
        assert_eq!(s.notify.as_ref().unwrap().command[0], "/usr/bin/logger");
        assert_eq!(JobSpec::parse(&s.to_yaml(), Path::new("/j")).unwrap(), s);
        assert!(parse("").unwrap().after.is_empty() && parse("").unwrap().notify.is_none());
        assert!(!parse("").unwrap().to_yaml().contains("after"));
        for (head, says) in [
            ("after: [0]", "ids start at 1"),
            ("after: [-3]", "a job id (a positive integer) or a job name"),
            (
                "after: [1.5]",
                "a job id (a positive integer) or a job name",
            ),
            (
                "after: [[1]]",
                "a job id (a positive integer) or a job name",
            ),
            ("after: 7", "a sequence"),
            ("after: [\"\"]", "is not a job name"),
            ("after: [\"a\\u001b[2J\"]", "is not a job name"),
            ("notify: {command: []}", "must name a program"),
            (
                "notify: {command: [bin/x]}",
                "absolute path or a plain name",
            ),
            ("notify: {command: logger}", "a sequence"),
            ("notify: {cmd: [logger]}", "unknown field"),
        ] {
            let e = parse(head).unwrap_err();
            assert!(e.contains(says), "{head}: {e}");
        }
        let many: Vec<String> = (1..=MAX_AFTER as u64 + 1).map(|i| i.to_string()).collect();
        let e = parse(&format!("after: [{}]", many.join(", "))).unwrap_err();
        assert!(e.contains("at most 64"), "{e}");
        assert_eq!(JobRef::from_arg("7"), JobRef::Id(7));
        assert_eq!(JobRef::from_arg("prep"), JobRef::Name("prep".into()));
    }

    #[test]
    fn minimal_spec_parses_with_defaults_and_absolute_paths() {
        let s = JobSpec::parse(MINIMAL, Path::new("/jobs")).unwrap();
        assert_eq!(s.model.path, PathBuf::from("/jobs/m"));
        assert_eq!(s.model.device, Placement::One(DeviceRef::Cpu));
        assert_eq!(s.mezo.snapshot_every, None);
        assert_eq!(s.priority, 0);
        assert_eq!(s.data_seed(), 7);
        assert_eq!(
            JobSpec::parse(&s.to_yaml(), Path::new("/elsewhere")).unwrap(),
            s
        );
    }

    /// `model.device`: one device stays the plain text it always was (a
    /// frozen spec of an old run reads and compares equal), a list splits the
    /// model, `auto` stands alone; and a list that cannot run is refused
    /// with the reason.
    #[test]
    fn devices_parse_as_one_a_list_or_auto_and_bad_lists_are_refused() {
        let parse = |device: &str| {
            JobSpec::parse(
                &MINIMAL.replace("dtype: f32}", &format!("dtype: f32, device: {device}}}")),
                Path::new("/j"),
            )
            .map_err(|e| format!("{e:#}"))
        };
        let one = parse("cuda:1").unwrap();
        assert_eq!(one.model.device, Placement::One(DeviceRef::Cuda(1)));
        assert!(
            one.to_yaml().contains("device: cuda:1"),
            "{}",
            one.to_yaml()
        );
        assert!(parse("\"[cpu]\"").unwrap_err().contains("unknown device"));
        assert_eq!(parse("[cpu]").unwrap().model.device, Placement::default());
        let split = parse("[cuda:0, cuda:1, cpu]").unwrap();
        assert_eq!(
            split.model.device,
            Placement::Split(vec![DeviceRef::Cuda(0), DeviceRef::Cuda(1), DeviceRef::Cpu])
        );
        assert!(split.model.device.is_gpu() && split.model.device.is_split());
        let back = JobSpec::parse(&split.to_yaml(), Path::new("/j")).unwrap();
        assert_eq!(back, split, "a split survives the frozen spec");
        assert_eq!(split.model.device.to_string(), "[cuda, cuda:1, cpu]");
        let auto = parse("auto").unwrap();
        assert_eq!(auto.model.device, Placement::Auto);
        assert!(auto.to_yaml().contains("device: auto"));
        assert_eq!(auto.model.device.devices(false), vec![DeviceRef::Cpu]);
        assert_eq!(auto.model.device.devices(true), vec![DeviceRef::Cuda(0)]);
        // The CPU alone, split or not, computes the same bits: a run moves between them.
        let cpu = parse("cpu").unwrap();
        let cpus = parse("[cpu, cpu]").unwrap();
        assert!(!cpus.model.device.is_gpu() && cpus.model.device.is_split());
        assert!(cpu.computes_the_same_as(&cpus) && cpu != cpus);
        assert!(!one.computes_the_same_as(&parse("[cuda:1, cpu]").unwrap()));
        assert!(!parse("[cuda:0, cuda:1]")
            .unwrap()
            .computes_the_same_as(&parse("cuda:0").unwrap()));
        for (device, says) in [
            ("[]", "empty list"),
            ("[cuda:0, cuda]", "lists cuda twice"),
            ("[cpu, cuda:0]", "after cpu"),
            ("[cuda:0, cpu, cuda:1]", "after cpu"),
            ("[cuda:0, auto]", "auto stands alone"),
            ("[cuda:0, tpu]", "unknown device"),
            ("gpu", "unknown device"),
            (
                "7",
                "a device (cpu, cuda or cuda:N), a list of devices, or auto",
            ),
            ("{a: 1}", "a list of devices"),
        ] {
            let e = parse(device).unwrap_err();
            assert!(e.contains(says), "{device}: {e}");
        }
    }

    #[test]
    fn a_job_file_named_without_a_folder_takes_the_working_folder() {
        // `mezod run job.yaml`: the file's folder is the empty path.
        let s = JobSpec::parse(MINIMAL, Path::new("")).unwrap();
        assert_eq!(s.model.path, std::env::current_dir().unwrap().join("m"));
    }

    #[test]
    fn a_name_or_priority_does_not_change_what_a_job_computes() {
        let base = JobSpec::parse(MINIMAL, Path::new("/jobs")).unwrap();
        let labelled = JobSpec::parse(
            &format!(
                "name: mine\npriority: 5\nafter: [3, prep]\nnotify: {{command: [logger, hi]}}\n\
                 {MINIMAL}"
            ),
            Path::new("/jobs"),
        )
        .unwrap();
        assert_ne!(base, labelled);
        assert!(base.computes_the_same_as(&labelled));
        let reseeded =
            JobSpec::parse(&MINIMAL.replace("seed: 7", "seed: 8"), Path::new("/jobs")).unwrap();
        assert!(!base.computes_the_same_as(&reseeded));
    }

    #[test]
    fn steps_are_bounded() {
        for bad in ["0", "10000001", "18446744073709551615"] {
            let text = MINIMAL.replace("steps: 30", &format!("steps: {bad}"));
            let e = JobSpec::parse(&text, Path::new("/"))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("mezo.steps must be between 1 and 10000000"),
                "{bad}: {e}"
            );
        }
        let most = MINIMAL.replace("steps: 30", "steps: 10000000");
        assert_eq!(
            JobSpec::parse(&most, Path::new("/")).unwrap().mezo.steps,
            MAX_STEPS
        );
    }

    #[test]
    fn workdir_anchors_relative_paths_and_spooled_jobs_need_one() {
        let s = JobSpec::parse(&format!("workdir: /data\n{MINIMAL}"), Path::new("/jobs")).unwrap();
        assert_eq!(s.data.train, PathBuf::from("/data/train.jsonl"));
        let e = JobSpec::parse_with_base(MINIMAL, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("model.path") && e.contains("workdir"), "{e}");
        let e = JobSpec::parse(&format!("workdir: rel\n{MINIMAL}"), Path::new("/")).unwrap_err();
        assert!(e.to_string().contains("absolute"), "{e}");
    }

    /// A Hugging Face cache under `root` holding `org/tiny`: snapshot
    /// `commit` (an empty folder is enough for the spec) and `refs/main` → it.
    fn hf_cache_with(root: &Path, commit: &str) -> PathBuf {
        let repo = root.join("models--org--tiny");
        let snap = repo.join("snapshots").join(commit);
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), commit).unwrap();
        snap
    }

    const HF_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const HF_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    fn hf_job(model: &str) -> String {
        MINIMAL.replace("{path: m, dtype: f32}", model)
    }

    fn hf_roots(root: &Path) -> impl Fn() -> Vec<CacheRoot> + '_ {
        move || {
            vec![CacheRoot {
                path: root.to_path_buf(),
                from: "HF_HUB_CACHE",
            }]
        }
    }

    fn no_roots() -> Vec<CacheRoot> {
        panic!("the cache was looked up")
    }

    #[test]
    fn an_hf_id_is_its_snapshot_and_the_frozen_spec_opens_nothing() {
        let (cache, jobs) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let snap = hf_cache_with(cache.path(), HF_A);
        let text = hf_job("{path: org/tiny}");
        let s = JobSpec::parse_in(&text, Some(jobs.path()), &hf_roots(cache.path())).unwrap();
        assert_eq!(s.model.path, PathBuf::from("org/tiny"), "kept as written");
        assert_eq!(s.model.snapshot.as_deref(), Some(snap.as_path()));
        assert_eq!(s.model.source(), ModelSource::Pretrained(snap.clone()));
        assert_eq!(s.model.describe(), "org/tiny at commit aaaaaaaaaaaa");
        // The frozen spec reads back as it was, anywhere, without the cache.
        let frozen = s.to_yaml();
        assert!(
            frozen.contains(&format!("snapshot: {}", snap.display())),
            "{frozen}"
        );
        assert_eq!(
            JobSpec::parse_in(&frozen, Some(Path::new("/elsewhere")), &no_roots).unwrap(),
            s
        );
        // A spooled job (no folder given, as the root daemon parses it) looks nothing up.
        let spooled = format!("workdir: {}\n{text}", jobs.path().display());
        let s = JobSpec::parse_in(&spooled, None, &no_roots).unwrap();
        assert_eq!(s.model.path, jobs.path().join("org/tiny"));
        assert_eq!(s.model.snapshot, None);
    }

    #[test]
    fn an_hf_id_shaped_folder_that_exists_stays_a_folder() {
        let jobs = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(jobs.path().join("models/opt")).unwrap();
        let s =
            JobSpec::parse_in(&hf_job("{path: models/opt}"), Some(jobs.path()), &no_roots).unwrap();
        assert_eq!(s.model.path, jobs.path().join("models/opt"));
        assert_eq!(s.model.snapshot, None);
        // Not id-shaped: a path, looked up nowhere.
        for path in ["./org/tiny", "a/b/c", "m"] {
            let s = JobSpec::parse_in(
                &hf_job(&format!("{{path: {path}}}")),
                Some(jobs.path()),
                &no_roots,
            )
            .unwrap();
            assert_eq!(s.model.path, jobs.path().join(path));
        }
    }

    #[test]
    fn an_hf_id_missing_from_the_cache_says_where_it_looked() {
        let (cache, jobs) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let e = JobSpec::parse_in(
            &hf_job("{path: org/tiny, revision: v2}"),
            Some(jobs.path()),
            &hf_roots(cache.path()),
        )
        .map_err(|e| format!("{e:#}"))
        .unwrap_err();
        for says in [
            format!(
                "model.path org/tiny is no file or folder (there is no {}/org/tiny)",
                jobs.path().display()
            ),
            "org/tiny at v2 is not in the Hugging Face cache".into(),
            format!(
                "{}/models--org--tiny (HF_HUB_CACHE)",
                cache.path().display()
            ),
            "hf download org/tiny --revision v2".into(),
        ] {
            assert!(e.contains(&says), "{says}\n  not in: {e}");
        }
    }

    #[test]
    fn hf_revision_and_snapshot_go_with_an_id() {
        let (cache, jobs) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let snap = hf_cache_with(cache.path(), HF_A);
        std::fs::create_dir_all(jobs.path().join("m")).unwrap();
        let other = snap
            .display()
            .to_string()
            .replace("org--tiny", "org--other");
        for (model, says) in [
            (
                "{path: m, revision: main}",
                "model.revision goes with a Hugging Face id",
            ),
            (
                "{config: c.json, init: random, revision: main}",
                "an absent model.path",
            ),
            ("{path: org/tiny, revision: ../x}", "is not a branch, a tag"),
            (
                &format!("{{path: m, snapshot: {}}}", snap.display()),
                "model.snapshot goes with a Hugging Face id",
            ),
            (
                &format!("{{path: org/tiny, snapshot: {other}}}"),
                "is not a snapshot of org/tiny",
            ),
            (
                "{path: org/tiny, snapshot: rel}",
                "is not a snapshot of org/tiny",
            ),
        ] {
            let e = JobSpec::parse_in(&hf_job(model), Some(jobs.path()), &hf_roots(cache.path()))
                .map_err(|e| format!("{e:#}"))
                .unwrap_err();
            assert!(e.contains(says), "{model}: {e}");
        }
    }

    #[test]
    fn hf_a_resume_keeps_the_commit_its_run_started_from() {
        let cache = tempfile::tempdir().unwrap();
        let jobs = tempfile::tempdir().unwrap();
        let roots = hf_roots(cache.path());
        let a = hf_cache_with(cache.path(), HF_A);
        let text = hf_job("{path: org/tiny}");
        let frozen = JobSpec::parse_in(&text, Some(jobs.path()), &roots).unwrap();
        // `refs/main` moves on to B: the job file now reads as B, the run keeps A.
        let b = hf_cache_with(cache.path(), HF_B);
        let mut now = JobSpec::parse_in(&text, Some(jobs.path()), &roots).unwrap();
        assert_eq!(now.model.snapshot.as_deref(), Some(b.as_path()));
        let note = now.model.keep_snapshot_of(&frozen.model).unwrap().unwrap();
        assert!(
            note.contains(&format!("main now resolves to {HF_B}"))
                && note.contains(&format!("goes on from commit {HF_A}")),
            "{note}"
        );
        assert_eq!(now, frozen);
        assert_eq!(now.model.keep_snapshot_of(&frozen.model).unwrap(), None);
        // An edited revision is an edit, for the spec comparison to refuse.
        let mut edited = JobSpec::parse_in(
            &hf_job("{path: org/tiny, revision: main}"),
            Some(jobs.path()),
            &roots,
        )
        .unwrap();
        assert_eq!(edited.model.keep_snapshot_of(&frozen.model).unwrap(), None);
        assert_ne!(edited, frozen);
        // A's snapshot gone from the cache: refused, with how to get it back.
        std::fs::remove_dir_all(&a).unwrap();
        let mut now = JobSpec::parse_in(&text, Some(jobs.path()), &roots).unwrap();
        let e = format!(
            "{:#}",
            now.model.keep_snapshot_of(&frozen.model).unwrap_err()
        );
        assert!(
            e.contains(&format!("this run started from org/tiny at commit {HF_A}"))
                && e.contains("--restart")
                && e.contains(&format!("hf download org/tiny --revision {HF_A}")),
            "{e}"
        );
    }

    #[test]
    fn a_model_comes_from_a_path_or_from_a_config_with_random_init() {
        let random = MINIMAL.replace(
            "model: {path: m, dtype: f32}",
            "model: {config: c/config.json, init: random, seed: 4}",
        );
        let s = JobSpec::parse(&random, Path::new("/jobs")).unwrap();
        assert_eq!(
            s.model.source(),
            ModelSource::Random {
                config: PathBuf::from("/jobs/c/config.json"),
                seed: 4
            }
        );
        assert_eq!(JobSpec::parse(&s.to_yaml(), Path::new("/x")).unwrap(), s);
        for (model, says) in [
            ("{config: c.json}", "init: random"),
            ("{path: m, config: c.json, init: random}", "not both"),
            ("{dtype: f32}", "model.path is required"),
            ("{path: m, seed: 3}", "go with model.config"),
        ] {
            let text = MINIMAL.replace("{path: m, dtype: f32}", model);
            let e = JobSpec::parse(&text, Path::new("/"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{model}: {e}");
        }
    }

    #[test]
    fn tuning_settings_have_the_papers_defaults_and_must_match_the_kind() {
        let s = JobSpec::parse(&format!("tuning: lora\n{MINIMAL}"), Path::new("/")).unwrap();
        let Tuning::Lora(l) = s.tuning() else {
            panic!("not lora")
        };
        assert_eq!((l.r, l.alpha, l.seed), (8, 16.0, 7));
        assert!(l.targets.is_empty());
        let s = JobSpec::parse(&format!("tuning: prefix\n{MINIMAL}"), Path::new("/")).unwrap();
        assert_eq!(
            s.tuning(),
            Tuning::Prefix(PrefixConfig { tokens: 5, seed: 7 })
        );
        assert_eq!(JobSpec::parse(&s.to_yaml(), Path::new("/")).unwrap(), s);
        let custom = format!("tuning: lora\nlora: {{r: 4, targets: [fc1]}}\n{MINIMAL}");
        let s = JobSpec::parse(&custom, Path::new("/")).unwrap();
        assert_eq!(s.lora.as_ref().unwrap().targets, vec!["fc1".to_string()]);
        assert_eq!(JobSpec::parse(&s.to_yaml(), Path::new("/")).unwrap(), s);
        for (text, says) in [
            ("lora: {r: 4}\n", "`tuning` is not lora"),
            ("tuning: prefix\nlora: {r: 4}\n", "`tuning` is not lora"),
            ("tuning: lora\nlora: {r: 0}\n", "lora.r"),
            ("tuning: prefix\nprefix: {tokens: 0}\n", "prefix.tokens"),
            ("tuning: adapters\n", "unknown variant"),
        ] {
            let e = JobSpec::parse(&format!("{text}{MINIMAL}"), Path::new("/"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn unknown_field_names_line_and_column() {
        let bad = MINIMAL.replace("seed: 7", "seed: 7, learning_rate: 3");
        let e = JobSpec::parse(&bad, Path::new("/"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("learning_rate") && e.contains("line 4 column"),
            "{e}"
        );
    }

    #[test]
    fn bad_values_are_explained() {
        let e =
            JobSpec::parse(&MINIMAL.replace("eps: 1.0e-3", "eps: 0"), Path::new("/")).unwrap_err();
        assert!(e.to_string().contains("mezo.eps"));
        let e = JobSpec::parse(&MINIMAL.replace("dtype: f32", "dtype: f8"), Path::new("/"))
            .unwrap_err();
        assert!(e.to_string().contains("dtype"), "{e}");
        let e = JobSpec::parse("model: [", Path::new("/")).unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
    }
}
