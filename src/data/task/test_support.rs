//! What the task module's tests share: examples, tasks from a job file's
//! `task:` line, and a small byte-level BPE model.

use super::{Choice, Task};
use crate::data::Example;
use crate::model::LanguageModel;
use crate::spec::JobSpec;

pub(super) fn example(text: &str, label: &str) -> Example {
    [("text", text), ("label", label)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub(super) fn task(yaml_task: &str) -> Task {
    let spec = JobSpec::parse(
        &format!(
            "model: {{path: m}}\ntask: {yaml_task}\n\
             data: {{train: t.jsonl}}\nmezo: {{steps: 1, lr: 0}}\n"
        ),
        std::path::Path::new("/"),
    )
    .unwrap();
    Task::from_spec(&spec).unwrap()
}

/// The classification or multiple-choice task inside `task`.
pub(super) fn choice(task: &Task) -> &Choice {
    match task {
        Task::Choice(t) => t,
        other => panic!("not a choice task: {other:?}"),
    }
}

/// A byte-level BPE tokenizer (GPT-2's kind, as SmolLM2's and LLaMA 3's).
pub(super) fn byte_level_model() -> LanguageModel {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpt2");
    LanguageModel::load(&dir, crate::model::Dtype::F32, tch::Device::Cpu).unwrap()
}
