//! The text a causal LM reads: each kind's prompt for an example and the
//! answers that follow it.  (A masked LM's prompt is `masked_lm`'s.)
//!
//! **One spacing rule for answers** (classification, multiple choice, ICL
//! demonstrations, generation golds): an answer is the prompt with its
//! trailing spaces dropped, one space, and the word with its surrounding
//! whitespace trimmed.  So `" great"`, `"great"` and `"great "` are the same
//! answer with the same token ids: a word written with its own leading space
//! must not become a stray space token plus the word, which costs a byte-level
//! BPE model (GPT-2, LLaMA 3, SmolLM2) several points of accuracy.

use anyhow::{bail, Context, Result};
use mezod_core::prompts::{COPA, MASK};

use super::{get, Candidates, Choice, Generation, Prompt};
use crate::data::{fill_template, Example};

/// What follows a prompt as an answer: one space and the trimmed word.
pub(super) fn answer_text(word: &str) -> String {
    format!(" {}", word.trim())
}

/// A prompt as the answer follows it: without trailing spaces or tabs (the
/// answer brings its one space).
fn prompt_end(text: String) -> String {
    text.trim_end_matches([' ', '\t']).to_string()
}

/// `template` filled from `ex`; a template with `{mask}` is a masked LM's.
fn filled(template: &str, ex: &Example) -> Result<String> {
    if template.contains(MASK) {
        bail!(
            "the template holds {MASK}, which marks a masked LM's answer; \
             a causal LM reads the answer after the prompt: drop {MASK}"
        );
    }
    fill_template(template, ex)
}

impl Choice {
    /// The prompt of `ex` alone (without demonstrations).
    pub(super) fn prompt_text(&self, ex: &Example) -> Result<String> {
        let text = match &self.prompt {
            Prompt::Template(t) => filled(t, ex)?,
            Prompt::Copa => {
                let premise = get(ex, COPA.premise)?.trim_end_matches(['.', ' ']);
                let joiner = if get(ex, COPA.question)? == "cause" {
                    "because"
                } else {
                    "so"
                };
                format!("{premise} {joiner}")
            }
        };
        Ok(prompt_end(text))
    }

    /// The candidate answers of `ex` — each its one leading space and the
    /// trimmed word (the spacing rule) — and the index of the right one.
    pub(super) fn answers(&self, ex: &Example) -> Result<(Vec<String>, usize)> {
        let label = get(ex, &self.label_field)?;
        Ok(match &self.candidates {
            Candidates::Words(w) => {
                let gold = *w.class_of.get(label.trim()).with_context(|| {
                    format!(
                        "label {label:?} has no answer word (known: {})",
                        w.class_of.keys().cloned().collect::<Vec<_>>().join(", ")
                    )
                })?;
                (w.words.iter().map(|w| answer_text(w)).collect(), gold)
            }
            Candidates::Fields(fields) => {
                let answers = fields
                    .iter()
                    .map(|f| {
                        let a = get(ex, f)?;
                        Ok(if matches!(self.prompt, Prompt::Copa) {
                            answer_text(&lower_first(a.trim()))
                        } else {
                            answer_text(a)
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                let gold: usize = label
                    .trim()
                    .parse()
                    .with_context(|| format!("label {label:?} is not a choice index"))?;
                if gold >= answers.len() {
                    bail!("label {gold} is out of range for {} choices", answers.len());
                }
                (answers, gold)
            }
        })
    }
}

impl Generation {
    /// The filled template.
    pub(super) fn prompt_text(&self, ex: &Example) -> Result<String> {
        Ok(prompt_end(filled(&self.template, ex)?))
    }

    /// The gold answers of `ex` under the spacing rule; the first is the one
    /// a model is taught (index 0).
    pub(super) fn answers(&self, ex: &Example) -> Result<(Vec<String>, usize)> {
        let golds = self.golds(ex)?;
        Ok((golds.iter().map(|g| answer_text(g)).collect(), 0))
    }

    /// The gold answers of `ex`: the answer field, or the strings of a JSON
    /// list in it.
    pub(super) fn golds(&self, ex: &Example) -> Result<Vec<String>> {
        let raw = get(ex, &self.answer_field)?;
        let golds: Vec<String> = match serde_json::from_str::<Vec<String>>(raw) {
            Ok(list) => list,
            Err(_) => vec![raw.to_string()],
        };
        let golds: Vec<String> = golds
            .into_iter()
            .map(|g| g.trim().to_string())
            .filter(|g| !g.is_empty())
            .collect();
        if golds.is_empty() {
            bail!("the answer field {:?} is empty", self.answer_field);
        }
        Ok(golds)
    }
}

fn lower_first(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_lowercase().chain(c).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{byte_level_model, choice, example, task};
    use super::super::Task;
    use super::*;
    use crate::model::LanguageModel;

    /// The answer part of each candidate's token ids.
    fn answer_ids(task: &Task, model: &LanguageModel, ex: &Example) -> Vec<Vec<i64>> {
        let item = match task {
            Task::Choice(t) => t.encode_choice(model, ex),
            Task::Generation(t) => t.encode_golds(model, ex),
            Task::CausalLm(_) => panic!("a causal_lm task has no answers"),
        }
        .unwrap();
        item.seqs
            .iter()
            .map(|(ids, n)| ids[ids.len() - n..].to_vec())
            .collect()
    }

    #[test]
    fn an_answer_is_one_space_and_the_trimmed_word_whatever_the_job_wrote() {
        let model = byte_level_model();
        let enc = |t: &str| model.tokenizer.encode(t, false).unwrap();
        // The fixture tells one space from two (else this test could not fail).
        assert_ne!(enc(" great"), enc("  great"));
        let want = vec![enc(" terrible"), enc(" great")];
        let ex = example("Fine.", "1");
        for words in [
            "{\"0\": terrible, \"1\": great}",
            "{\"0\": \" terrible\", \"1\": \" great\"}",
            "{\"0\": \"terrible \", \"1\": \" great \"}",
        ] {
            for template in ["\"{text} It was\"", "\"{text} It was \""] {
                let t = task(&format!(
                    "{{kind: classification, template: {template}, label_words: {words}}}"
                ));
                assert_eq!(
                    answer_ids(&t, &model, &ex),
                    want,
                    "{words} after {template}"
                );
                let t = choice(&t);
                let item = t.encode_choice(&model, &ex).unwrap();
                assert_eq!(
                    item.seqs[1].0,
                    model.tokenizer.encode("Fine. It was great", true).unwrap(),
                    "the prompt and the answer read as one text ({words}, {template})"
                );
                // Demonstrations follow the same rule.
                let icl = t
                    .with_demonstrations(&[&example("Loved it.", "1")])
                    .unwrap();
                assert_eq!(
                    icl.context_text(&ex, None).unwrap(),
                    "Loved it. It was great\n\nFine. It was"
                );
            }
        }
        // Multiple choice: the answers are fields of the example, spaced alike.
        let mc = task("{kind: multiple_choice, template: \"{q}\", choices: [a, b]}");
        let row = |a: &str, b: &str| -> Example {
            [("q", "Pick one:"), ("a", a), ("b", b), ("label", "0")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let plain = answer_ids(&mc, &model, &row("red", "blue"));
        assert_eq!(plain, vec![enc(" red"), enc(" blue")]);
        assert_eq!(answer_ids(&mc, &model, &row(" red", "blue\n")), plain);
        // Generation: the gold answer a model is taught is spaced alike.
        let gen = task("{kind: generation, template: \"Q: {q} A:\", answer_field: a}");
        let gold = |a: &str| -> Vec<Vec<i64>> {
            let ex: Example = [("q", "Capital?"), ("a", a)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            answer_ids(&gen, &model, &ex)[..1].to_vec()
        };
        assert_eq!(gold("Paris"), vec![enc(" Paris")]);
        assert_eq!(gold("  Paris "), gold("Paris"));
    }
}
