//! In-context demonstrations (the `icl` baseline): training examples with
//! their right answers put before every prompt of a choice task, in the
//! form the model is asked in — for a causal LM the prompt, the answer and
//! a blank line; for a masked LM the prompt with the label word in the
//! mask's place, then a space (LM-BFF's).

use anyhow::{bail, Result};

use super::masked_lm::MaskedLm;
use super::{Choice, Task};
use crate::data::Example;

impl Task {
    /// The same task with `examples` as in-context demonstrations before every
    /// prompt, each with its right answer.
    pub fn with_demonstrations(&self, examples: &[&Example]) -> Result<Task> {
        let Task::Choice(t) = self else {
            bail!("in-context demonstrations need a classification or multiple_choice task");
        };
        Ok(Task::Choice(t.with_demonstrations(examples)?))
    }
}

impl Choice {
    /// See [`Task::with_demonstrations`].
    pub(super) fn with_demonstrations(&self, examples: &[&Example]) -> Result<Choice> {
        for ex in examples {
            self.answers(ex)?;
        }
        let mut task = self.clone();
        task.demos = examples.iter().map(|&ex| ex.clone()).collect();
        Ok(task)
    }

    /// The prompt of `ex` (for a masked LM: with its mask token), after the
    /// demonstrations if there are any.
    pub(super) fn context_text(&self, ex: &Example, masked: Option<&MaskedLm>) -> Result<String> {
        let mut text = String::new();
        for demo in &self.demos {
            text.push_str(&self.demonstration(demo, masked)?);
        }
        text.push_str(&match masked {
            Some(masked) => masked.prompt_text(ex)?,
            None => self.prompt_text(ex)?,
        });
        Ok(text)
    }

    /// One demonstration with its right answer.
    fn demonstration(&self, ex: &Example, masked: Option<&MaskedLm>) -> Result<String> {
        let (answers, gold) = self.answers(ex)?;
        match masked {
            None => Ok(format!("{}{}\n\n", self.prompt_text(ex)?, answers[gold])),
            Some(masked) => masked.demonstration(ex, &answers[gold]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::masked_lm::MaskToken;
    use super::super::test_support::example;
    use super::super::Candidates;
    use super::*;
    use crate::spec::JobSpec;

    #[test]
    fn demonstrations_come_before_the_prompt_with_their_right_answers() {
        let spec = JobSpec::parse(
            "model: {path: m}\ntask: {kind: classification, template: sst2}\n\
             data: {train: t.jsonl}\nmezo: {steps: 1, lr: 0}\n",
            std::path::Path::new("/"),
        )
        .unwrap();
        let Task::Choice(task) = Task::from_spec(&spec).unwrap() else {
            panic!("classification is a choice task")
        };
        let (a, b, query) = (
            example("Loved it.", "1"),
            example("Dull.", "0"),
            example("Fine.", "1"),
        );
        assert_eq!(task.context_text(&query, None).unwrap(), "Fine. It was");
        let icl = task.with_demonstrations(&[&a, &b]).unwrap();
        assert_eq!(
            icl.context_text(&query, None).unwrap(),
            "Loved it. It was great\n\nDull. It was terrible\n\nFine. It was"
        );
        assert_eq!(icl.answers(&query).unwrap(), task.answers(&query).unwrap());
        // A masked LM: the paper's prompt with the mask token; demonstrations
        // with their label word in its place.
        let mask = MaskToken {
            text: "<mask>".into(),
            id: 0,
        };
        let Candidates::Words(words) = &task.candidates else {
            panic!("classification has label words")
        };
        let mask = MaskedLm { words, token: mask };
        assert_eq!(
            task.context_text(&query, Some(&mask)).unwrap(),
            "Fine. It was <mask>."
        );
        assert_eq!(
            icl.context_text(&query, Some(&mask)).unwrap(),
            "Loved it. It was great. Dull. It was terrible. Fine. It was <mask>."
        );
    }
}
