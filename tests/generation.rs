//! Generation tasks (SQuAD-style): greedy decoding is the argmax of the model's
//! own next-token logits, step by step; a job trains on the answer's tokens,
//! reports SQuAD F1, and can take F1 itself as the MeZO objective.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use mezod::data::task::Task;
use mezod::data::{load_examples, Example};
use mezod::model::{Dtype, LanguageModel};
use mezod::spec::JobSpec;
use tch::{Device, Tensor};

fn generation_job(dir: &Path, mezo_extra: &str) -> PathBuf {
    let text = example_job_text("generation")
        .replace("steps: 50", &format!("steps: 6{mezo_extra}"))
        .replace("eval_every: 25", "eval_every: 3");
    let job = dir.join("generation.yaml");
    std::fs::write(&job, text).unwrap();
    job
}

/// Greedy decoding written out by hand with full forward passes.
fn greedy_by_hand(model: &LanguageModel, prompt: &str, max_new: usize) -> String {
    let mut ids = model.tokenizer.encode(prompt, true).unwrap();
    let mut written = Vec::new();
    for _ in 0..max_new {
        let t = Tensor::from_slice(&ids).view([1, -1]);
        let logits = model.logits(&t, &t.ones_like());
        let next = logits
            .get(0)
            .get(ids.len() as i64 - 1)
            .argmax(-1, false)
            .int64_value(&[]);
        if next == 2 {
            break; // the fixture's eos_token_id
        }
        written.push(next);
        ids.push(next);
        if model.tokenizer.decode(&written).contains('\n') {
            break;
        }
    }
    let text = model.tokenizer.decode(&written);
    text.split('\n').next().unwrap().trim().to_string()
}

#[test]
fn greedy_answers_are_the_models_own_argmax() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = JobSpec::load(&generation_job(tmp.path(), "")).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("llama").join("config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["eos_token_id"], 2);
    let task = Task::from_spec(&spec).unwrap();
    let model = LanguageModel::load(&fixture("llama"), Dtype::F32, Device::Cpu).unwrap();
    let examples: Vec<Example> = load_examples(&spec.data.train).unwrap()[..3].to_vec();
    let batch: Vec<&Example> = examples.iter().collect();
    let together = task.generate(&model, &batch).unwrap();
    assert!(
        together.iter().any(|a| !a.is_empty()),
        "nothing was written: {together:?}"
    );
    for (ex, got) in examples.iter().zip(&together) {
        let prompt = format!("{}\nQuestion: {}\nAnswer:", ex["context"], ex["question"]);
        let want = greedy_by_hand(&model, &prompt, 8);
        assert_eq!(&task.generate(&model, &[ex]).unwrap()[0], &want, "alone");
        assert_eq!(got, &want, "in a left-padded batch");
    }
}

#[test]
fn a_generation_job_reports_f1_and_f1_can_be_the_objective() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    run_to_end(&generation_job(tmp.path(), ""), &run, "generation job");
    let r: serde_json::Value = read_result(&run);
    assert_eq!(r["metric"], "f1");
    for k in ["zero_shot", "best", "final_metric"] {
        let v = r[k].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&v), "{k}: {v}");
    }
    let steps: Vec<f64> = read_jsonl(&run.join("metrics.jsonl"))
        .iter()
        .filter(|l| l["kind"] == "step")
        .map(|l| l["loss_plus"].as_f64().unwrap())
        .collect();
    assert!(
        steps.iter().all(|l| *l > 0.0 && l.is_finite()),
        "teacher-forced losses: {steps:?}"
    );

    let tmp2 = tempfile::tempdir().unwrap();
    let run = tmp2.path().join("run");
    run_to_end(
        &generation_job(tmp2.path(), ", objective: f1"),
        &run,
        "f1 objective",
    );
    for l in read_jsonl(&run.join("metrics.jsonl"))
        .iter()
        .filter(|l| l["kind"] == "step")
    {
        let v = l["loss_plus"].as_f64().unwrap();
        assert!((-1.0..=0.0).contains(&v), "minus a mean F1: {v}");
    }
}
