//! Turning examples into a loss (for MeZO) and a metric (for evaluation).
//!
//! * `causal_lm`: mean next-token cross-entropy over the real tokens of the batch.
//! * `classification` / `multiple_choice`: one sequence per candidate answer;
//!   score = mean log-probability of the answer tokens; loss = cross-entropy
//!   over the candidates' scores; metric = accuracy of the argmax (as the MeZO paper).
//! * `classification` with a masked LM (BERT, RoBERTa; the paper's RoBERTa
//!   setting, after LM-BFF): one sequence per example, the template with the
//!   mask token where the answer goes (`{mask}`); score of a class = the
//!   log-probability of its label word's token at the mask; loss and metric as
//!   above.  Other task kinds need a causal LM.
//! * `generation`: loss = the gold answer's mean negative log-probability
//!   after the prompt; metric = SQuAD F1 of greedy answers.
//!
//! Sequences are left-padded with attention masks.
//!
//! [`Task`] is one type per kind, so each kind's data and methods live
//! together; the files split the work by concern:
//!
//! * `from_spec`: a task from the job file (the presets from `mezod_core::prompts`);
//! * `prompts`: the text a causal LM reads, and the one spacing rule for answers;
//! * `encoding`: that text as token ids, every example checked up front;
//! * `masked_lm`: classification as a masked LM reads it;
//! * `scoring`: losses, class scores, the MeZO objective and evaluations;
//! * `generation`: greedy answers and their F1;
//! * `demonstrations`: in-context examples before the prompt (the `icl` baseline);
//! * `features`: hidden states for the `linear_probe` baseline;
//! * `render`: an example as the model reads it (`mezod inspect`).

use std::collections::BTreeMap;

use anyhow::{Context, Result};

use super::Example;

mod demonstrations;
mod encoding;
mod features;
mod from_spec;
mod generation;
mod masked_lm;
mod prompts;
mod render;
mod scoring;
#[cfg(test)]
mod test_support;

pub use render::Rendering;
pub use scoring::{causal_lm_loss, Evaluation};

/// A job's task: what its examples say and how a model is scored on them.
#[derive(Debug, Clone)]
pub enum Task {
    CausalLm(CausalLm),
    Choice(Choice),
    Generation(Generation),
}

/// `causal_lm`: a text field, every token of it predicted.
#[derive(Debug, Clone)]
pub struct CausalLm {
    field: String,
    max_length: usize,
}

/// `classification` and `multiple_choice`: a prompt, candidate answers after
/// it, and a label naming the right one.
#[derive(Debug, Clone)]
pub struct Choice {
    prompt: Prompt,
    candidates: Candidates,
    label_field: String,
    max_length: usize,
    /// In-context demonstrations put before every prompt (the `icl` baseline).
    demos: Vec<Example>,
    /// Score one sequence per candidate even where every answer is one
    /// token (`mezod bench --scoring per-candidate`: the path one
    /// sequence per example replaced, for comparison).
    per_candidate: bool,
}

/// `generation`: a prompt and the gold answers greedy decoding should write.
#[derive(Debug, Clone)]
pub struct Generation {
    template: String,
    answer_field: String,
    max_length: usize,
    max_new_tokens: usize,
}

/// Where a choice task's prompt comes from.
#[derive(Debug, Clone)]
enum Prompt {
    Template(String),
    /// COPA: the premise joined to the candidates with "because" or "so".
    Copa,
}

#[derive(Debug, Clone)]
enum Candidates {
    /// Classification: one answer word per class.
    Words(LabelWords),
    /// Multiple choice: the answers are fields of the example; the label is an index.
    Fields(Vec<String>),
}

/// Classification's answers, and the prompt a masked LM reads them in.
#[derive(Debug, Clone)]
struct LabelWords {
    /// One answer word per class.
    words: Vec<String>,
    /// Label value → class.
    class_of: BTreeMap<String, usize>,
    /// A masked LM's template, split where `{mask}` is.
    mask_template: MaskTemplate,
}

/// A masked LM's template around its one `{mask}`.
#[derive(Debug, Clone)]
struct MaskTemplate {
    before: String,
    after: String,
}

impl Task {
    /// Metric name as reported in metrics and results.
    pub fn metric_name(&self) -> &'static str {
        match self {
            Task::CausalLm(_) => "loss",
            Task::Choice(_) => "accuracy",
            Task::Generation(_) => "f1",
        }
    }

    pub fn higher_is_better(&self) -> bool {
        !matches!(self, Task::CausalLm(_))
    }

    /// Never feed more than `limit` tokens (a model's learned positions end
    /// there); longer sequences keep their end, where the answer is.
    pub fn limit_length(&mut self, limit: usize) {
        let max_length = match self {
            Task::CausalLm(t) => &mut t.max_length,
            Task::Choice(t) => &mut t.max_length,
            Task::Generation(t) => &mut t.max_length,
        };
        *max_length = (*max_length).min(limit);
    }

    /// The longest sequence fed (after [`Task::limit_length`]).
    pub fn max_length(&self) -> usize {
        match self {
            Task::CausalLm(t) => t.max_length,
            Task::Choice(t) => t.max_length,
            Task::Generation(t) => t.max_length,
        }
    }

    /// Score one sequence per candidate always (for benchmarks that compare
    /// it with one sequence per example).
    pub fn score_per_candidate(&mut self) {
        if let Task::Choice(t) = self {
            t.per_candidate = true;
        }
    }

    /// The class index of each label value (classification), for counting
    /// labels per class; None for other tasks.
    pub fn classes_by_label(&self) -> Option<(&[String], &BTreeMap<String, usize>)> {
        match self {
            Task::Choice(Choice {
                candidates: Candidates::Words(w),
                ..
            }) => Some((&w.words, &w.class_of)),
            _ => None,
        }
    }

    /// The field that holds each example's right answer (choice tasks).
    pub fn label_field(&self) -> Option<&str> {
        match self {
            Task::Choice(t) => Some(&t.label_field),
            _ => None,
        }
    }
}

/// The text of `field` in `ex`; its absence is an error naming the fields it has.
fn get<'a>(ex: &'a Example, field: &str) -> Result<&'a str> {
    ex.get(field).map(String::as_str).with_context(|| {
        let fields: Vec<&str> = ex.keys().map(String::as_str).collect();
        format!("no field {field:?} (fields: {})", fields.join(", "))
    })
}
