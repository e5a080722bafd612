//! A [`Task`] from the job file's `task:` section: the kind's own fields,
//! a built-in prompt filled in where `task.template` names one (the presets
//! are `mezod_core::prompts`, the table the job check reads too), and what
//! the spec cannot say alone checked here (one `{mask}`, two or more
//! distinct answer words or choices).

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use mezod_core::prompts::{ClassificationPreset, COPA, DEFAULT_CLASSIFICATION, MASK};

use super::{Candidates, CausalLm, Choice, Generation, LabelWords, MaskTemplate, Prompt, Task};
use crate::spec::{JobSpec, TaskKind, TaskSpec};

impl Task {
    pub fn from_spec(spec: &JobSpec) -> Result<Self> {
        let t = &spec.task;
        Ok(match t.kind {
            TaskKind::Generation => Task::Generation(generation(t)?),
            TaskKind::CausalLm => Task::CausalLm(CausalLm {
                field: spec.data.text_field.clone(),
                max_length: t.max_length,
            }),
            TaskKind::Classification => Task::Choice(classification(t, &spec.data.text_field)?),
            TaskKind::MultipleChoice => Task::Choice(multiple_choice(t)?),
        })
    }
}

fn generation(t: &TaskSpec) -> Result<Generation> {
    Ok(Generation {
        template: t
            .template
            .clone()
            .context("task.template is required for generation")?,
        answer_field: t.answer_field.clone().unwrap_or_else(|| "answer".into()),
        max_length: t.max_length,
        max_new_tokens: t.max_new_tokens.unwrap_or(16),
    })
}

fn classification(t: &TaskSpec, text_field: &str) -> Result<Choice> {
    let (template, mask_template, default_words) =
        classification_prompts(t.template.as_deref(), text_field);
    let mask_template = split_at_mask(&mask_template)?;
    let label_words = t.label_words.clone().or(default_words).context(
        "task.label_words is required with a custom template (label value → answer word)",
    )?;
    let (words, class_of) = classes(&label_words)?;
    Ok(choice(
        t,
        Prompt::Template(template),
        Candidates::Words(LabelWords {
            words,
            class_of,
            mask_template,
        }),
    ))
}

/// (causal LM prompt, masked LM prompt, default label words) of a
/// classification task: a preset's, or the job's own prompt, whose masked
/// LM's answer goes at its end where it holds no `{mask}`.
fn classification_prompts(
    template: Option<&str>,
    text_field: &str,
) -> (String, String, Option<BTreeMap<String, String>>) {
    let name = template.unwrap_or(DEFAULT_CLASSIFICATION);
    match ClassificationPreset::named(name) {
        Some(preset) => (
            preset.template(text_field),
            preset.mask_template(text_field),
            Some(
                preset
                    .label_words()
                    .map(|(label, word)| (label.to_string(), word.to_string()))
                    .collect(),
            ),
        ),
        None if name.contains(MASK) => (name.to_string(), name.to_string(), None),
        None => (name.to_string(), format!("{name} {MASK}"), None),
    }
}

fn split_at_mask(template: &str) -> Result<MaskTemplate> {
    match template.split_once(MASK) {
        Some((before, after)) if !after.contains(MASK) => Ok(MaskTemplate {
            before: before.to_string(),
            after: after.to_string(),
        }),
        _ => bail!("task.template may hold {MASK} once (where a masked LM's answer goes)"),
    }
}

/// The distinct answer words (trimmed, in label order) and each label's class.
fn classes(
    label_words: &BTreeMap<String, String>,
) -> Result<(Vec<String>, BTreeMap<String, usize>)> {
    let mut words: Vec<String> = Vec::new();
    let mut class_of = BTreeMap::new();
    for (label, word) in label_words {
        let word = word.trim();
        if word.is_empty() {
            bail!("task.label_words: the word for label {label:?} is empty");
        }
        let idx = words.iter().position(|w| w == word).unwrap_or_else(|| {
            words.push(word.to_string());
            words.len() - 1
        });
        class_of.insert(label.clone(), idx);
    }
    if words.len() < 2 {
        bail!("task.label_words must give at least two different answer words");
    }
    Ok((words, class_of))
}

fn multiple_choice(t: &TaskSpec) -> Result<Choice> {
    let (prompt, fields) = match t.template.as_deref() {
        Some(name) if name == COPA.name => (
            Prompt::Copa,
            if t.choices.is_empty() {
                COPA.choices.map(String::from).to_vec()
            } else {
                t.choices.clone()
            },
        ),
        Some(custom) => (Prompt::Template(custom.to_string()), t.choices.clone()),
        None => bail!("task.template is required for multiple_choice (a prompt or \"copa\")"),
    };
    if fields.len() < 2 {
        bail!("task.choices must name at least two fields");
    }
    Ok(choice(t, prompt, Candidates::Fields(fields)))
}

fn choice(t: &TaskSpec, prompt: Prompt, candidates: Candidates) -> Choice {
    Choice {
        prompt,
        candidates,
        label_field: t.label_field.clone(),
        max_length: t.max_length,
        demos: Vec::new(),
        per_candidate: false,
    }
}
