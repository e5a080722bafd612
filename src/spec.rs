//! The job file: what to fine-tune, on what, and how.  Parsed strictly: an
//! unknown or misspelled field is an error that names its line and column.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::mezo::LrSchedule;
use crate::model::Dtype;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub model: ModelSpec,
    pub task: TaskSpec,
    pub data: DataSpec,
    pub mezo: MezoSpec,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// A Hugging Face model directory (config.json, safetensors, tokenizer.json).
    pub path: PathBuf,
    #[serde(default)]
    pub dtype: Dtype,
    /// `cpu`, `cuda` or `cuda:N`.
    #[serde(default = "cpu")]
    pub device: String,
    /// CPU threads for libtorch (default: all cores).  Part of the determinism fingerprint.
    #[serde(default)]
    pub threads: Option<i32>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    CausalLm,
    Classification,
    MultipleChoice,
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
    #[serde(default)]
    pub split_seed: u64,
    /// Field holding the text (causal_lm, and the `sst2` template).
    #[serde(default = "text")]
    pub text_field: String,
    /// Use at most this many training / dev examples (after the split).
    #[serde(default)]
    pub max_train: Option<usize>,
    #[serde(default)]
    pub max_dev: Option<usize>,
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
    /// Snapshot the trainable weights every N steps (bounds replay on resume).
    #[serde(default = "snapshot_every")]
    pub snapshot_every: u64,
}

fn cpu() -> String {
    "cpu".into()
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
fn snapshot_every() -> u64 {
    100
}

impl JobSpec {
    /// Parse YAML text; relative paths are taken from `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Self> {
        let mut spec: JobSpec =
            serde_yaml::from_str(text).map_err(|e| anyhow::anyhow!("invalid job file: {e}"))?;
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        abs(&mut spec.model.path);
        abs(&mut spec.data.train);
        if let Some(d) = spec.data.dev.as_mut() {
            abs(d);
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

    fn validate(&self) -> Result<()> {
        let m = &self.mezo;
        if m.steps == 0 {
            bail!("mezo.steps must be at least 1");
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
        if !(0.0..1.0).contains(&self.data.dev_fraction) {
            bail!("data.dev_fraction must be in [0, 1)");
        }
        self.model.dtype.kind();
        crate::model::parse_device(&self.model.device)?;
        if self.task.kind == TaskKind::MultipleChoice
            && self.task.choices.is_empty()
            && self.task.template.as_deref() != Some("copa")
        {
            bail!("task.choices must name the fields holding the candidate answers");
        }
        Ok(())
    }

    pub fn data_seed(&self) -> u64 {
        self.mezo.data_seed.unwrap_or(self.mezo.seed)
    }

    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).expect("a parsed spec serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "model: {path: m, dtype: f32}\ntask: {kind: causal_lm}\n\
        data: {train: train.jsonl, text_field: text}\nmezo: {steps: 30, batch_size: 1, lr: 1.0e-3, eps: 1.0e-3, seed: 7}\n";

    #[test]
    fn minimal_spec_parses_with_defaults_and_absolute_paths() {
        let s = JobSpec::parse(MINIMAL, Path::new("/jobs")).unwrap();
        assert_eq!(s.model.path, PathBuf::from("/jobs/m"));
        assert_eq!(s.model.device, "cpu");
        assert_eq!(s.mezo.snapshot_every, 100);
        assert_eq!(s.data_seed(), 7);
        assert_eq!(
            JobSpec::parse(&s.to_yaml(), Path::new("/elsewhere")).unwrap(),
            s
        );
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
