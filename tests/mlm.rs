//! Masked LMs (BERT, RoBERTa) on classification: the prompt with the mask
//! token, label words scored at the mask, the probe's features there, the
//! refusals, and a whole `mezod run` with the baselines beside MeZO.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use mezod::data::task::Task;
use mezod::data::Example;
use mezod::model::{Dtype, LanguageModel};
use mezod::spec::JobSpec;
use mezod::tokenize::pad_left;
use tch::{Device, Kind, Tensor};

const REVIEWS: [(&str, &str); 4] = [
    ("The movie felt tedious and boring.", "0"),
    ("The cast is charming.", "1"),
    (
        "Every scene is simply funny, and the rest is beautiful.",
        "1",
    ),
    ("A terrible waste of time.", "0"),
];

fn examples() -> Vec<Example> {
    REVIEWS
        .iter()
        .map(|(text, label)| {
            [("text", *text), ("label", *label)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

fn task(task_yaml: &str) -> Task {
    let spec = JobSpec::parse(
        &format!(
            "model: {{path: m}}\ntask: {task_yaml}\ndata: {{train: t.jsonl}}\nmezo: {{steps: 1, lr: 0}}\n"
        ),
        Path::new("/"),
    )
    .unwrap();
    Task::from_spec(&spec).unwrap()
}

fn sst2() -> Task {
    task("{kind: classification, template: sst2, label_words: {\"0\": terrible, \"1\": great}}")
}

fn load(name: &str) -> LanguageModel {
    LanguageModel::load(&fixture(name), Dtype::F32, Device::Cpu).unwrap()
}

/// By hand, one review at a time: `"{text} It was {mask}."` through
/// `LanguageModel::logits`, log-softmax at the mask, the label words' tokens
/// (" terrible" then " great").  Also the hidden state at the mask.
fn by_hand(model: &LanguageModel, text: &str) -> (Vec<f64>, Tensor) {
    let (mask_text, mask_id) = model.mask_token().unwrap();
    let ids = model
        .tokenizer
        .encode(&format!("{text} It was {mask_text}."), true)
        .unwrap();
    let at = ids.iter().position(|&i| i == mask_id).unwrap() as i64;
    let t = Tensor::from_slice(&ids).view([1, -1]);
    let mask = t.ones_like();
    let lp = model
        .logits(&t, &mask)
        .get(0)
        .get(at)
        .log_softmax(-1, Kind::Float);
    let scores = [" terrible", " great"]
        .iter()
        .map(|w| {
            let tok = model.tokenizer.encode(w, false).unwrap();
            assert_eq!(tok.len(), 1, "{w:?} must be one token of the fixture");
            lp.double_value(&[tok[0]])
        })
        .collect();
    let _guard = tch::no_grad_guard();
    let hidden = model.net.hidden(&t, &mask).get(0).get(at);
    (scores, hidden)
}

#[test]
fn mask_prompt_scores_are_the_mlm_log_probs_of_the_label_words_at_the_mask() {
    for name in ["bert", "roberta"] {
        let model = load(name);
        let task = sst2();
        let exs = examples();
        let batch: Vec<&Example> = exs.iter().collect();
        // One left-padded batch of different lengths.
        let scores = task.class_scores(&model, &batch).unwrap();
        assert_eq!(scores.size(), [4, 2], "{name}");
        let mut hand = Vec::new();
        for (i, (text, _)) in REVIEWS.iter().enumerate() {
            let (want, _) = by_hand(&model, text);
            for (c, w) in want.iter().enumerate() {
                let got = scores.double_value(&[i as i64, c as i64]);
                assert!(
                    (got - w).abs() < 1e-5,
                    "{name} {text:?} class {c}: {got} vs {w}"
                );
            }
            hand.push(want);
        }
        // Loss: cross-entropy over the two class scores; accuracy: their argmax.
        let mut ce = 0.0;
        let mut right = Vec::new();
        for (s, (_, label)) in hand.iter().zip(REVIEWS) {
            let gold: usize = label.parse().unwrap();
            let norm = (s[0].exp() + s[1].exp()).ln();
            ce += norm - s[gold];
            right.push((s[1] > s[0]) == (gold == 1));
        }
        let correct = right.iter().filter(|&&r| r).count();
        let loss = task.loss(&model, &batch).unwrap();
        assert!(
            (loss - ce / 4.0).abs() < 1e-5,
            "{name}: {loss} vs {}",
            ce / 4.0
        );
        // In batches of 3: each example's answer kept in order across batches.
        let e = task.evaluate(&model, &exs, 3).unwrap();
        assert!((e.metric - correct as f64 / 4.0).abs() < 1e-12, "{name}");
        assert_eq!(e.correct, Some(right), "{name}");
        let acc = task
            .objective(&model, &batch, mezod::spec::Objective::Accuracy)
            .unwrap();
        assert!((acc + correct as f64 / 4.0).abs() < 1e-12, "{name}");
    }
}

#[test]
fn probe_features_of_a_masked_lm_are_its_hidden_state_at_the_mask() {
    for name in ["bert", "roberta"] {
        let model = load(name);
        let exs = examples();
        let batch: Vec<&Example> = exs.iter().collect();
        let (x, gold) = sst2().features(&model, &batch).unwrap();
        assert_eq!(gold, vec![0, 1, 1, 0]);
        for (i, (text, _)) in REVIEWS.iter().enumerate() {
            let (_, h) = by_hand(&model, text);
            let err = (x.get(i as i64) - h).abs().max().double_value(&[]);
            assert!(err < 1e-5, "{name} {text:?}: {err}");
        }
    }
}

#[test]
fn an_explicit_mask_placeholder_puts_the_answer_where_it_says() {
    let model = load("roberta");
    let exs = examples();
    let batch: Vec<&Example> = exs.iter().collect();
    // The same prompt spelled out equals the built-in sst2 one.
    let explicit = task(
        "{kind: classification, template: \"{text} It was {mask}.\", \
         label_words: {\"0\": terrible, \"1\": great}}",
    );
    let a = explicit.class_scores(&model, &batch).unwrap();
    let b = sst2().class_scores(&model, &batch).unwrap();
    assert_eq!((a - b).abs().max().double_value(&[]), 0.0);
    // The mask first: a different prompt, different scores.
    let first = task(
        "{kind: classification, template: \"{mask}! {text}\", \
         label_words: {\"0\": terrible, \"1\": great}}",
    );
    let c = first.class_scores(&model, &batch).unwrap();
    let b = sst2().class_scores(&model, &batch).unwrap();
    assert!((c - b).abs().max().double_value(&[]) > 1e-3);
}

#[test]
fn masked_lms_refuse_what_they_cannot_do_clearly() {
    let bert = load("bert");
    let exs = examples();
    let err = |t: &Task, m: &LanguageModel| {
        format!(
            "{:#}",
            t.check(m, &exs, |i| format!("training example {}", i + 1))
                .unwrap_err()
        )
    };
    for yaml in [
        "{kind: causal_lm}",
        "{kind: multiple_choice, template: copa}",
        "{kind: generation, template: \"Q: {text} A:\"}",
    ] {
        let e = err(&task(yaml), &bert);
        assert!(
            e.contains("masked LM") && e.contains("classification tasks only"),
            "{e}"
        );
    }
    // A label word the tokenizer splits cannot fill one mask.
    let e = err(
        &task("{kind: classification, template: sst2, label_words: {\"0\": xyzzy, \"1\": great}}"),
        &bert,
    );
    assert!(e.contains("\" xyzzy\"") && e.contains("one token"), "{e}");
    // `{mask}` is meaningless to a causal LM.
    let e = err(
        &task("{kind: classification, template: \"{text} It was {mask}.\", label_words: {\"0\": bad, \"1\": good}}"),
        &load("opt"),
    );
    assert!(e.contains("{mask}") && e.contains("causal LM"), "{e}");
    // Twice is ambiguous.
    let spec = JobSpec::parse(
        "model: {path: m}\ntask: {kind: classification, template: \"{mask} {text} {mask}\", \
         label_words: {\"0\": bad, \"1\": good}}\ndata: {train: t.jsonl}\nmezo: {steps: 1, lr: 0}\n",
        Path::new("/"),
    )
    .unwrap();
    assert!(Task::from_spec(&spec).is_err());
    // A mask cut off by max_length.
    let long = task(
        "{kind: classification, template: \"{mask}: {text}\", max_length: 5, \
         label_words: {\"0\": terrible, \"1\": great}}",
    );
    let e = err(&long, &bert);
    assert!(e.contains("cuts off the mask"), "{e}");
}

#[test]
fn a_long_prompt_keeps_its_first_token_and_its_mask() {
    let model = load("bert");
    let mut t = sst2();
    t.limit_length(8);
    let exs = examples();
    let batch: Vec<&Example> = exs[2..3].iter().collect();
    let (x, _) = t.features(&model, &batch).unwrap();
    // By hand: [CLS] + the last 7 tokens of the full prompt.
    let (mask_text, mask_id) = model.mask_token().unwrap();
    let full = model
        .tokenizer
        .encode(&format!("{} It was {mask_text}.", REVIEWS[2].0), true)
        .unwrap();
    assert!(full.len() > 8);
    let cut: Vec<i64> = std::iter::once(full[0])
        .chain(full[full.len() - 7..].iter().copied())
        .collect();
    let (ids, mask) = pad_left(std::slice::from_ref(&cut), model.tokenizer.pad_id);
    let at = cut.iter().position(|&i| i == mask_id).unwrap() as i64;
    let _guard = tch::no_grad_guard();
    let h = model.net.hidden(&ids, &mask).get(0).get(at);
    assert_eq!((x.get(0) - h).abs().max().double_value(&[]), 0.0);
}

fn mlm_job(dir: &Path, mode: &str, mezo_extra: &str) -> PathBuf {
    let text = example_job_text("mlm")
        .replace("mode: [zero_shot, linear_probe, mezo]", mode)
        .replace("steps: 200", &format!("steps: 12{mezo_extra}"))
        .replace("eval_every: 100", "eval_every: 6")
        .replace("split_seed: 1", "split_seed: 1, test_fraction: 0.2");
    assert!(text.contains("steps: 12") && text.contains(mode), "{text}");
    let job = dir.join("mlm.yaml");
    std::fs::write(&job, text).unwrap();
    job
}

#[test]
fn a_roberta_job_reports_zero_shot_baselines_and_mezo() {
    let tmp = tempfile::tempdir().unwrap();
    let job = mlm_job(
        tmp.path(),
        "mode: [zero_shot, icl, linear_probe, mezo]\nicl: {k: 2}",
        "",
    );
    let run = tmp.path().join("run");
    run_to_end(&job, &run, "a masked-LM job");
    let r = read_result(&run);
    assert_eq!(r["metric"], "accuracy");
    assert_eq!(r["steps"], 12);
    for k in [
        "zero_shot",
        "best",
        "final_metric",
        "test_metric",
        "zero_shot_test",
    ] {
        let v = r[k]
            .as_f64()
            .unwrap_or_else(|| panic!("result.json lacks {k}: {r}"));
        assert!((0.0..=1.0).contains(&v), "{k}: {v}");
    }
    let b = &r["baselines"];
    for name in ["icl", "linear_probe"] {
        for split in ["dev", "test"] {
            let v = b[name][split]
                .as_f64()
                .unwrap_or_else(|| panic!("{name} has no {split} accuracy: {r}"));
            assert!((0.0..=1.0).contains(&v), "{name} {split}: {v}");
        }
    }
    // 32 features at the mask, ~150 examples: the probe fits better than chance.
    assert!(b["linear_probe_train"].as_f64().unwrap() > 0.6, "{r}");
    let steps: Vec<serde_json::Value> = read_jsonl(&run.join("metrics.jsonl"))
        .into_iter()
        .filter(|l| l["kind"] == "step")
        .collect();
    assert_eq!(steps.len(), 12);
    assert!(steps.iter().all(|s| {
        let (p, m) = (
            s["loss_plus"].as_f64().unwrap(),
            s["loss_minus"].as_f64().unwrap(),
        );
        p.is_finite() && m.is_finite() && p > 0.0
    }));
    assert!(
        steps.iter().any(|s| s["loss_plus"] != s["loss_minus"]),
        "±εz never changed the masked-LM loss"
    );
    // `mezod estimate` sizes it: one sequence and one logit position per example.
    let out = check(
        mezod()
            .arg("estimate")
            .arg(&job)
            .arg("--json")
            .output()
            .unwrap(),
        "estimate",
    );
    let f: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(f["logits"].as_u64().unwrap(), 64 * 500 * 12, "{f}");
}

#[test]
fn accuracy_as_the_objective_works_for_a_masked_lm() {
    let tmp = tempfile::tempdir().unwrap();
    let job = mlm_job(
        tmp.path(),
        "mode: [zero_shot, mezo]",
        ", objective: accuracy",
    );
    let run = tmp.path().join("run");
    run_to_end(&job, &run, "a masked-LM accuracy job");
    for s in read_jsonl(&run.join("metrics.jsonl"))
        .iter()
        .filter(|l| l["kind"] == "step")
    {
        let k = -s["loss_plus"].as_f64().unwrap() * 64.0;
        assert!(
            (0.0..=64.0).contains(&k) && (k - k.round()).abs() < 1e-9,
            "{s} is not minus a batch accuracy"
        );
    }
}

#[test]
fn forward_on_a_masked_lm_reads_its_mask_token() {
    let run = |text: &str| {
        mezod()
            .args(["forward", "--model"])
            .arg(fixture("roberta"))
            .args(["--text", text])
            .output()
            .unwrap()
    };
    let out = check(run("the movie was <mask>."), "forward at the mask");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("top tokens at the mask"), "{stdout}");
    assert!(!stdout.contains("next-token"), "{stdout}");
    let out = run("the movie was great");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("mask token"));
    // Token ids outside the vocabulary are an error, not a libtorch panic.
    let out = mezod()
        .args(["forward", "--ids", "5,999", "--model"])
        .arg(fixture("roberta"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("outside the model's vocabulary"));
}
