//! A causal LM's prompts and answers as token ids, within `max_length`
//! (cut from the left: the end is what the answer follows), and every
//! example of a split checked up front so that a bad row fails the job
//! before training, naming the row.

use anyhow::{bail, Context, Result};

use super::masked_lm::needs_causal_lm;
use super::prompts::answer_text;
use super::{get, Candidates, Choice, Generation, Task};
use crate::data::Example;
use crate::model::LanguageModel;

/// One example, tokenized: (context ⧺ answer ids, answer length) per candidate.
pub(super) struct ChoiceItem {
    pub(super) seqs: Vec<(Vec<i64>, usize)>,
    pub(super) gold: usize,
}

impl Task {
    /// Check every example up front so a bad row fails the job before training, naming the row.
    /// A masked LM is checked here too: only classification, a mask token,
    /// single-token label words.
    /// `origin(i)` says where example `i` is (its file and line).
    pub fn check(
        &self,
        model: &LanguageModel,
        examples: &[Example],
        origin: impl Fn(usize) -> String,
    ) -> Result<()> {
        let each = |check: &dyn Fn(&Example) -> Result<()>| -> Result<()> {
            for (i, ex) in examples.iter().enumerate() {
                check(ex).with_context(|| origin(i))?;
            }
            Ok(())
        };
        match self {
            Task::CausalLm(t) => {
                needs_causal_lm(model, "causal_lm")?;
                each(&|ex| get(ex, &t.field).map(|_| ()))
            }
            Task::Generation(t) => {
                needs_causal_lm(model, "generation")?;
                each(&|ex| t.encode_golds(model, ex).map(|_| ()))
            }
            Task::Choice(t) => match t.masked_lm(model)? {
                Some(masked) => {
                    masked.label_ids(model)?;
                    each(&|ex| t.encode_masked(model, ex, &masked).map(|_| ()))
                }
                None => each(&|ex| t.encode_choice(model, ex).map(|_| ())),
            },
        }
    }

    /// Each classification answer word as the model reads it after a prompt
    /// (a masked LM: at its mask), with its token ids.
    pub fn answer_word_ids(&self, model: &LanguageModel) -> Result<Vec<(String, Vec<i64>)>> {
        match self {
            Task::Choice(t) => t.answer_word_ids(model),
            _ => Ok(Vec::new()),
        }
    }
}

impl Choice {
    /// One sequence per candidate: the prompt (after any demonstrations) and the answer.
    pub(super) fn encode_choice(&self, model: &LanguageModel, ex: &Example) -> Result<ChoiceItem> {
        let context = model
            .tokenizer
            .encode(&self.context_text(ex, None)?, true)?;
        let (answers, gold) = self.answers(ex)?;
        encode_candidates(model, &context, answers, gold, self.max_length)
    }

    /// The prompt's token ids (after any demonstrations), cut to `max_length`.
    pub(super) fn context_ids(&self, model: &LanguageModel, ex: &Example) -> Result<Vec<i64>> {
        let text = self.context_text(ex, None)?;
        cut_context(model, &text, self.max_length)
    }

    /// See [`Task::answer_word_ids`]; empty for multiple choice.
    pub(super) fn answer_word_ids(&self, model: &LanguageModel) -> Result<Vec<(String, Vec<i64>)>> {
        let Candidates::Words(w) = &self.candidates else {
            return Ok(Vec::new());
        };
        if let Some(masked) = self.masked_lm(model)? {
            let ids = masked.label_ids(model)?;
            return Ok(w
                .words
                .iter()
                .zip(ids)
                .map(|(w, id)| (answer_text(w), vec![id]))
                .collect());
        }
        w.words
            .iter()
            .map(|w| {
                let text = answer_text(w);
                let ids = model.tokenizer.encode(&text, false)?;
                Ok((text, ids))
            })
            .collect()
    }
}

impl Generation {
    /// One sequence per gold answer: the prompt and the answer.
    pub(super) fn encode_golds(&self, model: &LanguageModel, ex: &Example) -> Result<ChoiceItem> {
        let context = model.tokenizer.encode(&self.prompt_text(ex)?, true)?;
        let (answers, gold) = self.answers(ex)?;
        encode_candidates(model, &context, answers, gold, self.max_length)
    }

    /// The prompt's token ids, cut to `max_length`.
    pub(super) fn context_ids(&self, model: &LanguageModel, ex: &Example) -> Result<Vec<i64>> {
        cut_context(model, &self.prompt_text(ex)?, self.max_length)
    }
}

/// `context` ⧺ each answer's ids, each sequence cut to `max_length` from the
/// left; an answer must be at least one token and leave room for context.
fn encode_candidates(
    model: &LanguageModel,
    context: &[i64],
    answers: Vec<String>,
    gold: usize,
    max_length: usize,
) -> Result<ChoiceItem> {
    let mut seqs = Vec::new();
    for a in answers {
        let ans = model.tokenizer.encode(&a, false)?;
        if ans.is_empty() || ans.len() >= max_length {
            bail!("answer {a:?} tokenizes to {} tokens", ans.len());
        }
        let mut ids = context.to_vec();
        ids.extend(&ans);
        let keep = ids.len().min(max_length);
        seqs.push((ids[ids.len() - keep..].to_vec(), ans.len()));
    }
    Ok(ChoiceItem { seqs, gold })
}

/// The token ids of a prompt, cut to `max_length` from the left (the end is
/// what the answer follows).
fn cut_context(model: &LanguageModel, text: &str, max_length: usize) -> Result<Vec<i64>> {
    let ids = model.tokenizer.encode(text, true)?;
    let keep = ids.len().min(max_length);
    Ok(ids[ids.len() - keep..].to_vec())
}
