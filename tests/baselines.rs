//! The paper's baselines beside MeZO in one job (`mode`): in-context learning
//! and linear probing reported in result.json, and a job of baselines alone.

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn classification_job(dir: &Path, extra_top: &str, steps: u64) -> PathBuf {
    let text = example_job_text("classification")
        .replace("steps: 300", &format!("steps: {steps}"))
        .replace("eval_every: 100", "eval_every: 0")
        .replace("split_seed: 1", "split_seed: 1, test_fraction: 0.2");
    let job = dir.join("job.yaml");
    std::fs::write(&job, format!("{extra_top}\n{text}")).unwrap();
    job
}

#[test]
fn icl_and_linear_probe_are_reported_beside_mezo() {
    let tmp = tempfile::tempdir().unwrap();
    let job = classification_job(
        tmp.path(),
        "mode: [zero_shot, icl, linear_probe, mezo]\nicl: {k: 3}",
        10,
    );
    let run = tmp.path().join("run");
    run_to_end(&job, &run, "a job with baselines");
    let r = read_result(&run);
    assert_eq!(r["steps"], 10);
    let b = &r["baselines"];
    assert_eq!(b["icl_k"], 3);
    for (name, score) in [("icl", &b["icl"]), ("linear_probe", &b["linear_probe"])] {
        for split in ["dev", "test"] {
            let v = score[split]
                .as_f64()
                .unwrap_or_else(|| panic!("{name} has no {split} accuracy: {r}"));
            assert!((0.0..=1.0).contains(&v), "{name} {split}: {v}");
        }
    }
    // The probe really fits its training features (32 dimensions, ~70 examples).
    assert!(b["linear_probe_train"].as_f64().unwrap() >= 0.75, "{r}");
    // Measured once, before training: a resumed run reads them back.
    let first = std::fs::read_to_string(run.join("baselines.json")).unwrap();
    run_to_end(&job, &run, "the finished job again");
    assert_eq!(
        std::fs::read_to_string(run.join("baselines.json")).unwrap(),
        first
    );
}

#[test]
fn a_job_of_baselines_alone_trains_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let job = classification_job(tmp.path(), "mode: [zero_shot, icl]", 50);
    let run = tmp.path().join("run");
    run_to_end(&job, &run, "baselines only");
    let r = read_result(&run);
    assert_eq!(r["steps"], 0);
    assert!(r["baselines"]["icl"]["dev"].as_f64().is_some(), "{r}");
    assert!(r["baselines"].get("linear_probe").is_none());
    assert_eq!(step_lines(&run), 0, "no MeZO step ran");

    let bad = classification_job(tmp.path(), "mode: [mezo]\nicl: {k: 2}", 5);
    let out = mezod()
        .arg("run")
        .arg(&bad)
        .arg("--out")
        .arg(tmp.path().join("bad"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not list icl"));
}
