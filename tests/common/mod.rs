//! Helpers shared by the integration tests: fixtures, job files, the binary, Python.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures").join(name)
}

pub fn mezod() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mezod"));
    c.env("MEZOD_LOG", "warn");
    c
}

/// The Python with torch and transformers (the Makefile's venv).
pub fn python() -> Command {
    let py = std::env::var("MEZOD_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root().join(".venv/bin/python"));
    let mut c = Command::new(py);
    c.env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_VERBOSITY", "error");
    c
}

pub fn check(out: Output, what: &str) -> Output {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Write a causal-LM job on a fixture model over the example reviews.
pub fn causal_job(dir: &Path, model: &str, mezo: &str) -> PathBuf {
    let spec = format!(
        "model: {{path: {}, dtype: f32, threads: 1}}\ntask: {{kind: causal_lm}}\n\
         data: {{train: {}, dev: {}, text_field: text, max_dev: 16}}\nmezo: {{{mezo}}}\n",
        fixture(model).display(),
        root().join("examples/data/reviews.jsonl").display(),
        root().join("examples/data/reviews.jsonl").display(),
    );
    let path = dir.join(format!("{model}.yaml"));
    std::fs::write(&path, spec).unwrap();
    path
}

pub fn sha256(path: &Path) -> String {
    mezod::run::snapshot::sha256_file(path).unwrap()
}

pub fn read_jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}
