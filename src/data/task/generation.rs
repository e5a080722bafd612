//! Generation's answers: greedy decoding (no sampling, so an evaluation is
//! deterministic), each answer cut at its first line break or end-of-sequence
//! token, and the SQuAD F1 against the gold answers (the task's metric, and
//! its MeZO objective with `objective: f1`).

use anyhow::{bail, Result};

use super::masked_lm::needs_causal_lm;
use super::{Generation, Task};
use crate::data::{squad, Example};
use crate::model::LanguageModel;
use crate::tokenize::pad_left;

impl Task {
    /// Greedy answers to `batch` (no sampling), cut at the first line break or
    /// end-of-sequence token.  A run's stop ends it between two tokens with
    /// [`Stopped`](crate::run::interrupt::Stopped): a batch of long answers is
    /// many forward passes.
    pub fn generate(&self, model: &LanguageModel, batch: &[&Example]) -> Result<Vec<String>> {
        self.generation()?.generate(model, batch)
    }

    /// Sum of the SQuAD F1 of greedy answers to `batch`.
    pub(super) fn f1_sum(&self, model: &LanguageModel, batch: &[&Example]) -> Result<f64> {
        self.generation()?.f1_sum(model, batch)
    }

    fn generation(&self) -> Result<&Generation> {
        match self {
            Task::Generation(t) => Ok(t),
            _ => bail!("only generation tasks write answers"),
        }
    }
}

impl Generation {
    /// See [`Task::generate`].
    fn generate(&self, model: &LanguageModel, batch: &[&Example]) -> Result<Vec<String>> {
        needs_causal_lm(model, "generation")?;
        let _guard = tch::no_grad_guard();
        let eos = eos_ids(&model.config_text);
        let mut seqs = batch
            .iter()
            .map(|ex| self.context_ids(model, ex))
            .collect::<Result<Vec<_>>>()?;
        let mut written: Vec<Vec<i64>> = vec![Vec::new(); seqs.len()];
        let mut done = vec![false; seqs.len()];
        for _ in 0..self.max_new_tokens {
            crate::run::interrupt::check()?;
            let (ids, mask) = pad_left(&seqs, model.tokenizer.pad_id);
            let t = ids.size()[1];
            let next: Vec<i64> = model
                .logits_at(&ids, &mask, t - 1, 1)
                .squeeze_dim(1)
                .argmax(-1, false)
                .to_device(tch::Device::Cpu)
                .try_into()?;
            for (i, &tok) in next.iter().enumerate() {
                if done[i] {
                    continue;
                }
                if eos.contains(&tok) {
                    done[i] = true;
                    continue;
                }
                written[i].push(tok);
                if model.tokenizer.decode(&written[i]).contains('\n') {
                    done[i] = true;
                }
                seqs[i].push(tok);
                let over = seqs[i].len().saturating_sub(self.max_length);
                seqs[i].drain(..over);
            }
            if done.iter().all(|&d| d) {
                break;
            }
        }
        Ok(written
            .iter()
            .map(|w| {
                let text = model.tokenizer.decode(w);
                text.split('\n').next().unwrap_or("").trim().to_string()
            })
            .collect())
    }

    /// See [`Task::f1_sum`].
    pub(super) fn f1_sum(&self, model: &LanguageModel, batch: &[&Example]) -> Result<f64> {
        let answers = self.generate(model, batch)?;
        let mut f1 = 0.0;
        for (ex, a) in batch.iter().zip(&answers) {
            f1 += squad::best_of(squad::f1, a, &self.golds(ex)?);
        }
        Ok(f1)
    }
}

/// The end-of-sequence ids of a config (`eos_token_id`: a number or a list).
fn eos_ids(config_text: &str) -> Vec<i64> {
    let cfg: serde_json::Value = serde_json::from_str(config_text).unwrap_or_default();
    match &cfg["eos_token_id"] {
        serde_json::Value::Number(n) => n.as_i64().into_iter().collect(),
        serde_json::Value::Array(a) => a.iter().filter_map(|v| v.as_i64()).collect(),
        _ => Vec::new(),
    }
}
