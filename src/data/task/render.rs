//! An example as the model reads it, for `mezod inspect`: the prompt (with
//! any demonstrations and, for a masked LM, its mask token), each candidate
//! answer with its token ids, which one is right, and how long the longest
//! sequence is before `max_length` cuts it.

use anyhow::Result;

use super::masked_lm::needs_causal_lm;
use super::{get, Task};
use crate::data::Example;
use crate::model::LanguageModel;

/// One example as the model reads it (see [`Task::render`]).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Rendering {
    pub prompt: String,
    /// Each candidate answer: its text and its token ids.
    pub answers: Vec<(String, Vec<i64>)>,
    /// The right answer's index (choice and generation tasks).
    pub gold: Option<usize>,
    /// Tokens of the longest sequence before `max_length` cuts it.
    pub tokens: usize,
}

impl Task {
    /// `ex` as the model reads it (for `mezod inspect`): the prompt, each
    /// candidate answer with its token ids, which one is right, and how many
    /// tokens its longest sequence takes before `max_length` cuts it.
    pub fn render(&self, model: &LanguageModel, ex: &Example) -> Result<Rendering> {
        let tokenizer = &model.tokenizer;
        match self {
            Task::CausalLm(t) => {
                let text = get(ex, &t.field)?;
                Ok(Rendering {
                    prompt: text.to_string(),
                    answers: Vec::new(),
                    gold: None,
                    tokens: tokenizer.encode(text, true)?.len(),
                })
            }
            Task::Generation(t) => {
                needs_causal_lm(model, "generation")?;
                let prompt = t.prompt_text(ex)?;
                let context = tokenizer.encode(&prompt, true)?.len();
                after_prompt(model, prompt, context, t.answers(ex)?)
            }
            Task::Choice(t) => match t.masked_lm(model)? {
                // A masked LM reads one token per label word, at its mask.
                Some(masked) => {
                    let prompt = t.context_text(ex, Some(&masked))?;
                    let context = tokenizer.encode(&prompt, true)?.len();
                    let (texts, gold) = t.answers(ex)?;
                    let ids = masked.label_ids(model)?.into_iter().map(|id| vec![id]);
                    Ok(Rendering {
                        prompt,
                        answers: texts.into_iter().zip(ids).collect(),
                        gold: Some(gold),
                        tokens: context,
                    })
                }
                None => {
                    let prompt = t.context_text(ex, None)?;
                    let context = tokenizer.encode(&prompt, true)?.len();
                    after_prompt(model, prompt, context, t.answers(ex)?)
                }
            },
        }
    }
}

/// A causal LM's rendering: each answer tokenized after a prompt of `context` tokens.
fn after_prompt(
    model: &LanguageModel,
    prompt: String,
    context: usize,
    (texts, gold): (Vec<String>, usize),
) -> Result<Rendering> {
    let ids = texts
        .iter()
        .map(|a| model.tokenizer.encode(a, false))
        .collect::<Result<Vec<_>>>()?;
    let longest = ids.iter().map(Vec::len).max().unwrap_or(0);
    Ok(Rendering {
        prompt,
        answers: texts.into_iter().zip(ids).collect(),
        gold: Some(gold),
        tokens: context + longest,
    })
}
