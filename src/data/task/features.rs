//! Features for the `linear_probe` baseline: the final hidden state where
//! the model would predict the answer (a causal LM: the prompt's last token;
//! a masked LM: its mask token), and each example's right class.

use anyhow::{bail, Result};
use tch::{Kind, Tensor};

use super::masked_lm::needs_causal_lm;
use super::{Choice, Task};
use crate::data::Example;
use crate::model::LanguageModel;
use crate::tokenize::pad_left;

const CHOICE_TASKS_ONLY: &str =
    "the linear_probe baseline needs a classification or multiple_choice task";

impl Task {
    /// Linear-probe features of a batch: the final hidden state (f32) at the
    /// prompt's last token (a masked LM's: at its mask token), `[batch, hidden]`,
    /// and each example's right class.
    pub fn features(
        &self,
        model: &LanguageModel,
        batch: &[&Example],
    ) -> Result<(Tensor, Vec<i64>)> {
        let _guard = tch::no_grad_guard();
        match self {
            Task::Choice(t) => t.features(model, batch),
            // A generation example's one class is its first gold answer.
            Task::Generation(t) => {
                needs_causal_lm(model, "generation")?;
                let mut seqs = Vec::new();
                let mut gold = Vec::new();
                for ex in batch {
                    seqs.push(t.context_ids(model, ex)?);
                    gold.push(t.answers(ex)?.1 as i64);
                }
                Ok((last_token_features(model, &seqs), gold))
            }
            Task::CausalLm(_) => bail!(CHOICE_TASKS_ONLY),
        }
    }

    /// How many classes a choice task has.
    pub fn classes(&self, ex: &Example) -> Result<usize> {
        Ok(match self {
            Task::Choice(t) => t.answers(ex)?.0.len(),
            Task::Generation(t) => t.answers(ex)?.0.len(),
            Task::CausalLm(_) => bail!(CHOICE_TASKS_ONLY),
        })
    }
}

impl Choice {
    /// See [`Task::features`].
    fn features(&self, model: &LanguageModel, batch: &[&Example]) -> Result<(Tensor, Vec<i64>)> {
        if let Some(masked) = self.masked_lm(model)? {
            let (seqs, gold) = self.encode_masked_batch(model, batch, &masked)?;
            let h = masked.hidden_at_mask(model, &seqs);
            return Ok((h.to_kind(Kind::Float).to_device(tch::Device::Cpu), gold));
        }
        let mut seqs = Vec::new();
        let mut gold = Vec::new();
        for ex in batch {
            seqs.push(self.context_ids(model, ex)?);
            gold.push(self.answers(ex)?.1 as i64);
        }
        Ok((last_token_features(model, &seqs), gold))
    }
}

/// The final hidden state (f32, on the CPU) at each left-padded sequence's
/// last token, `[batch, hidden]`.
fn last_token_features(model: &LanguageModel, seqs: &[Vec<i64>]) -> Tensor {
    let (ids, mask) = pad_left(seqs, model.tokenizer.pad_id);
    let h = model
        .net
        .hidden(&ids.to_device(model.device), &mask.to_device(model.device));
    let last = h.size()[1] - 1;
    h.select(1, last)
        .to_kind(Kind::Float)
        .to_device(tch::Device::Cpu)
}
