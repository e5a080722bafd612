//! Classification as a masked LM (BERT, RoBERTa) reads it, the MeZO paper's
//! RoBERTa setting after LM-BFF: one sequence per example, the template with
//! the mask token where the answer goes, and each class scored by its label
//! word's token at the mask.  A masked LM runs no other task kind: a
//! [`MaskedLm`] comes from classification's label words alone, and every
//! other kind asks [`needs_causal_lm`] first.

use anyhow::{bail, Result};
use mezod_core::prompts::MASK;
use tch::Tensor;

use super::prompts::answer_text;
use super::{Candidates, Choice, LabelWords};
use crate::data::{fill_template, Example};
use crate::model::LanguageModel;
use crate::tokenize::pad_left;

/// Between demonstrations for a masked LM (LM-BFF joins them with spaces).
const MASKED_DEMO_SEPARATOR: &str = " ";

/// A masked LM's mask token: its text (what `{mask}` becomes) and its id.
pub(super) struct MaskToken {
    pub(super) text: String,
    pub(super) id: i64,
}

/// A classification task's words and prompt as a masked LM reads them.
pub(super) struct MaskedLm<'a> {
    pub(super) words: &'a LabelWords,
    pub(super) token: MaskToken,
}

/// Refuses a masked LM for a task `kind` that needs a causal LM.
pub(super) fn needs_causal_lm(model: &LanguageModel, kind: &str) -> Result<()> {
    if model.is_masked_lm() {
        bail!(
            "{} is a masked LM ({}): it runs classification tasks only (label words \
             scored at its mask token); a {kind} task needs a causal LM",
            model.dir.display(),
            model.model_type
        )
    }
    Ok(())
}

impl Choice {
    /// How a masked `model` reads this task; None for a causal LM.  A
    /// multiple-choice task is refused.
    pub(super) fn masked_lm(&self, model: &LanguageModel) -> Result<Option<MaskedLm<'_>>> {
        if !model.is_masked_lm() {
            return Ok(None);
        }
        match &self.candidates {
            Candidates::Words(words) => {
                let (text, id) = model.mask_token()?;
                Ok(Some(MaskedLm {
                    words,
                    token: MaskToken { text, id },
                }))
            }
            Candidates::Fields(_) => {
                needs_causal_lm(model, "multiple_choice")?;
                Ok(None)
            }
        }
    }

    /// A masked LM's prompt for `ex` with exactly one mask token, within
    /// `max_length` (the first token, [CLS] or <s>, stays; the text after it
    /// loses its beginning), and the right class.
    pub(super) fn encode_masked(
        &self,
        model: &LanguageModel,
        ex: &Example,
        masked: &MaskedLm,
    ) -> Result<(Vec<i64>, usize)> {
        let mask = &masked.token;
        let gold = self.answers(ex)?.1;
        let mut ids = model
            .tokenizer
            .encode(&self.context_text(ex, Some(masked))?, true)?;
        let count = |ids: &[i64]| ids.iter().filter(|&&i| i == mask.id).count();
        if count(&ids) != 1 {
            bail!(
                "the prompt holds the mask token {} {} times, not once (does the text contain it?)",
                mask.text,
                count(&ids)
            );
        }
        let max_length = self.max_length.max(2);
        if ids.len() > max_length {
            ids.drain(1..1 + ids.len() - max_length);
            if count(&ids) != 1 {
                bail!(
                    "task.max_length {max_length} cuts off the mask token: put {MASK} nearer \
                     the end of the template or raise max_length"
                );
            }
        }
        Ok((ids, gold))
    }

    /// [`Choice::encode_masked`] of each example: the sequences and the right classes.
    pub(super) fn encode_masked_batch(
        &self,
        model: &LanguageModel,
        batch: &[&Example],
        masked: &MaskedLm,
    ) -> Result<(Vec<Vec<i64>>, Vec<i64>)> {
        let mut seqs = Vec::new();
        let mut gold = Vec::new();
        for ex in batch {
            let (ids, g) = self.encode_masked(model, ex, masked)?;
            seqs.push(ids);
            gold.push(g as i64);
        }
        Ok((seqs, gold))
    }
}

impl MaskedLm<'_> {
    /// The filled template with the mask token where `{mask}` was.
    pub(super) fn prompt_text(&self, ex: &Example) -> Result<String> {
        let t = &self.words.mask_template;
        fill_template(&format!("{}{}{}", t.before, self.token.text, t.after), ex)
    }

    /// A demonstration: the prompt with `answer` in place of the mask, then a space.
    pub(super) fn demonstration(&self, ex: &Example, answer: &str) -> Result<String> {
        let t = &self.words.mask_template;
        // The word brings its own leading space (as RoBERTa's `<mask>` takes the one before it).
        let filled = format!("{} {}{}", t.before.trim_end(), answer.trim(), t.after);
        Ok(format!(
            "{}{MASKED_DEMO_SEPARATOR}",
            fill_template(&filled, ex)?.trim()
        ))
    }

    /// The token of each class's label word at the mask (with its leading
    /// space, as RoBERTa's " great"); a word of several tokens is an error.
    pub(super) fn label_ids(&self, model: &LanguageModel) -> Result<Vec<i64>> {
        self.words
            .words
            .iter()
            .map(|w| {
                let word = answer_text(w);
                match model.tokenizer.encode(&word, false)?.as_slice() {
                    [id] => Ok(*id),
                    ids => bail!(
                        "label word {word:?} is {} tokens for this tokenizer; a masked LM fills \
                         one token at its mask: choose a one-token word",
                        ids.len()
                    ),
                }
            })
            .collect()
    }

    /// The final hidden state at each sequence's (one) mask token, `[batch, hidden]`.
    pub(super) fn hidden_at_mask(&self, model: &LanguageModel, seqs: &[Vec<i64>]) -> Tensor {
        let (ids, mask) = pad_left(seqs, model.tokenizer.pad_id);
        let t = ids.size()[1];
        let rows: Vec<i64> = seqs
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let at = s
                    .iter()
                    .position(|&id| id == self.token.id)
                    .expect("checked");
                i as i64 * t + t - s.len() as i64 + at as i64
            })
            .collect();
        let h = model
            .net
            .hidden(&ids.to_device(model.device), &mask.to_device(model.device));
        let d = h.size()[2];
        h.reshape([-1, d])
            .index_select(0, &Tensor::from_slice(&rows).to_device(h.device()))
    }
}
