//! `mezod inspect`: what a user checks before spending GPU hours — splits,
//! labels, prompts and answers as token ids, lengths, memory, warnings — read
//! from a job on a byte-level BPE fixture, as a user runs it.

mod common;
use common::*;

use std::path::Path;

use mezod::tokenize::TextTokenizer;

/// Rows of `text`/`label`; every third a long one.
fn write_rows(path: &Path, n: usize, label: impl Fn(usize) -> &'static str) {
    let rows: Vec<String> = (0..n)
        .map(|i| {
            let text = if i % 3 == 0 {
                "a long review that goes on and on about the plot and the cast and the music. "
                    .repeat(3)
            } else {
                format!("review number {i} was short.")
            };
            serde_json::json!({"text": text, "label": label(i)}).to_string()
        })
        .collect();
    std::fs::write(path, rows.join("\n") + "\n").unwrap();
}

fn job(dir: &Path, label_words: &str, batch_size: usize) -> std::path::PathBuf {
    write_rows(&dir.join("train.jsonl"), 6, |i| {
        if i % 2 == 0 {
            "0"
        } else {
            "1"
        }
    });
    write_rows(&dir.join("dev.jsonl"), 5, |_| "1");
    let job = dir.join("job.yaml");
    std::fs::write(
        &job,
        format!(
            "model: {{path: {}}}\n\
             task: {{kind: classification, template: \"Review: {{text}}\\nSentiment:\", \
             label_words: {label_words}, max_length: 100}}\n\
             data: {{train: train.jsonl, dev: dev.jsonl}}\n\
             mezo: {{steps: 1, batch_size: {batch_size}, lr: 1.0e-3}}\n",
            fixture("gpt2").display()
        ),
    )
    .unwrap();
    job
}

fn inspect_json(job: &Path, extra: &[&str]) -> serde_json::Value {
    let out = check(
        mezod()
            .arg("inspect")
            .arg(job)
            .arg("--json")
            .args(extra)
            .output()
            .unwrap(),
        "inspect --json",
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn inspect_shows_what_the_model_reads_and_warns_of_what_looks_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    // A word written with its own space, one with none, and a third class
    // that no row has.
    let job = job(tmp.path(), "{\"0\": \" bad\", \"1\": good, \"2\": okay}", 8);
    let r = inspect_json(&job, &[]);
    let tok = TextTokenizer::load(&fixture("gpt2")).unwrap();
    let ids = |t: &str| serde_json::json!(tok.encode(t, false).unwrap());

    // Each answer is one space and the trimmed word, shown with its ids and pieces.
    let words = r["answer_words"].as_array().unwrap();
    let texts: Vec<&str> = words.iter().map(|w| w["text"].as_str().unwrap()).collect();
    assert_eq!(texts, [" bad", " good", " okay"]);
    assert_eq!(words[0]["ids"], ids(" bad"));
    assert_ne!(
        words[0]["ids"],
        ids("  bad"),
        "the fixture tells one space from two"
    );
    assert_eq!(words[1]["labels"], serde_json::json!(["1"]));
    let first_piece = tok
        .decode_token(tok.encode(" good", false).unwrap()[0])
        .unwrap();
    assert_eq!(words[1]["pieces"][0], serde_json::json!(first_piece));

    // Splits: sizes, labels per value, three examples each with the gold marked.
    let splits = r["splits"].as_array().unwrap();
    assert_eq!(splits[0]["examples"], 6);
    assert_eq!(splits[0]["labels"], serde_json::json!({"0": 3, "1": 3}));
    assert_eq!(splits[1]["labels"], serde_json::json!({"1": 5}));
    let shown = splits[0]["shown"].as_array().unwrap();
    assert_eq!(shown.len(), 3);
    assert!(shown[1]["prompt"]
        .as_str()
        .unwrap()
        .starts_with("Review: review number 1 was short.\nSentiment:"));
    let gold: Vec<bool> = shown[1]["answers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["gold"].as_bool().unwrap())
        .collect();
    assert_eq!(gold, [false, true, false], "row 1 is labelled 1 (good)");

    // Lengths against max_length — the fixture's 64 positions, below the job's
    // 100: the long rows (every third) are cut.
    assert_eq!(
        (r["max_length"].as_u64(), r["job_max_length"].as_u64()),
        (Some(64), Some(100))
    );
    let t = &splits[0]["tokens"];
    assert!(t["max"].as_u64() >= t["p99"].as_u64() && t["p99"].as_u64() >= t["p50"].as_u64());
    assert!(t["max"].as_u64().unwrap() > 64);
    assert_eq!(splits[0]["cut"], 2);
    assert!(r["memory"]["bytes"].as_u64().unwrap() > 0);

    // The base model (tiny: it is loaded) scored the first dev batch: all 5 rows.
    let p = &r["predictions"];
    assert!(p["skipped"].is_null(), "{p}");
    assert_eq!(p["examples"], 5);
    let picked: u64 = p["picked"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(picked, 5);

    let warnings: Vec<&str> = r["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap())
        .collect();
    let has = |needle: &str| warnings.iter().any(|w| w.contains(needle));
    assert!(
        has("2 of 6 train examples are longer than max_length 64"),
        "{warnings:?}"
    );
    assert!(
        has("no train example has the answer \" okay\""),
        "{warnings:?}"
    );
    assert!(
        has("no dev example has the answer \" bad\""),
        "{warnings:?}"
    );
    assert!(
        has("mezo.batch_size 8 is larger than the training set"),
        "{warnings:?}"
    );
    // A word the base model never picks is named, and only such a word.
    for (word, n) in p["picked"].as_object().unwrap() {
        let warned = has(&format!("never picks {}", serde_json::json!(word)));
        assert_eq!(warned, n == 0, "{word}: picked {n}, {warnings:?}");
    }

    // The report as people read it, from the job's own folder with a relative path.
    let out = check(
        mezod()
            .current_dir(tmp.path())
            .args(["inspect", "job.yaml", "--no-predict"])
            .output()
            .unwrap(),
        "inspect",
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("\"Review: review number 1 was short.\\nSentiment:\""),
        "{text}"
    );
    assert!(
        text.contains(&format!("\" bad\": {}", ids(" bad"))),
        "{text}"
    );
    assert!(
        text.contains("base model predictions: skipped (--no-predict)"),
        "{text}"
    );
    assert!(!text.contains("Some("), "no Rust debug formatting: {text}");
}

#[test]
fn inspect_fails_on_what_would_stop_the_run_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let job = job(tmp.path(), "{\"0\": bad, \"1\": good}", 2);
    std::fs::write(
        tmp.path().join("dev.jsonl"),
        "{\"review\": \"no text field\", \"label\": \"1\"}\n",
    )
    .unwrap();
    let out = mezod().arg("inspect").arg(&job).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("dev") && err.contains("field \"text\""),
        "{err}"
    );
}
