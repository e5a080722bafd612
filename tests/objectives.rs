//! Objectives and estimators: `mezo.objective: accuracy` (MeZO on a
//! non-differentiable objective, minus the batch accuracy of the candidate
//! scoring) and `mezo.directions: n` (n-SPSA), each logged and resumed exactly.

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn accuracy_job(dir: &Path) -> PathBuf {
    let text = example_job_text("classification")
        .replace(
            "steps: 300",
            "steps: 200, objective: accuracy, snapshot_every: 7",
        )
        .replace("eps: 1.0e-3", "eps: 1.0e-1");
    assert!(text.contains("objective: accuracy"));
    let job = dir.join("accuracy.yaml");
    std::fs::write(&job, text).unwrap();
    job
}

#[test]
fn n_spsa_logs_every_direction_and_resumes_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let job = causal_job(
        tmp.path(),
        "llama",
        "steps: 150, batch_size: 4, lr: 2.0e-3, eps: 1.0e-3, seed: 5, directions: 3, \
         weight_decay: 0.1, snapshot_every: 40",
    );
    let solo = tmp.path().join("solo");
    run_to_end(&job, &solo, "n-SPSA run");
    let steps = metrics_steps(&solo);
    assert_eq!(steps.len(), 150);
    for s in &steps {
        let more = s["more"]
            .as_array()
            .expect("n-SPSA steps list their further directions");
        assert_eq!(more.len(), 2);
        let seeds = [&s["seed"], &more[0]["seed"], &more[1]["seed"]];
        assert!(seeds[0] != seeds[1] && seeds[1] != seeds[2] && seeds[0] != seeds[2]);
        assert!(more
            .iter()
            .all(|d| d["loss_plus"].as_f64().unwrap().is_finite()));
    }
    let r: serde_json::Value = read_result(&solo);
    assert!(
        r["best"].as_f64().unwrap() < r["zero_shot"].as_f64().unwrap(),
        "n-SPSA lowered no dev loss: {r}"
    );
    let run = tmp.path().join("killed");
    let killed_at = kill_and_resume(&job, &run, 20);
    assert!(killed_at < 150, "the run ended before it could be killed");
    assert_eq!(
        sha256(&run.join("model/model.safetensors")),
        sha256(&solo.join("model/model.safetensors"))
    );
}

#[test]
fn accuracy_as_the_objective_trains_and_resumes_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let job = accuracy_job(tmp.path());
    let solo = tmp.path().join("solo");
    run_to_end(&job, &solo, "accuracy run");
    let steps = metrics_steps(&solo);
    assert_eq!(steps.len(), 200);
    let spec: serde_json::Value = serde_json::to_value(
        serde_yaml::from_str::<serde_yaml::Value>(
            &std::fs::read_to_string(solo.join("spec.yaml")).unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    let batch = spec["mezo"]["batch_size"].as_f64().unwrap();
    for s in &steps {
        for key in ["loss_plus", "loss_minus"] {
            let v = s[key].as_f64().unwrap();
            let k = -v * batch;
            assert!(
                (0.0..=batch).contains(&k) && (k - k.round()).abs() < 1e-9,
                "{key} = {v} is not minus a batch accuracy"
            );
        }
    }
    assert!(
        steps
            .iter()
            .any(|s| s["projected_grad"].as_f64().unwrap() != 0.0),
        "the accuracy never moved under ±εz: nothing was trained"
    );

    // Killed mid-run and resumed: the same weights.
    let run = tmp.path().join("killed");
    let killed_at = kill_and_resume(&job, &run, 10);
    assert!(killed_at < 200, "the run ended before it could be killed");
    assert_eq!(
        sha256(&run.join("model/model.safetensors")),
        sha256(&solo.join("model/model.safetensors"))
    );
}

#[test]
fn accuracy_needs_a_task_with_an_accuracy() {
    let tmp = tempfile::tempdir().unwrap();
    let job = causal_job(
        tmp.path(),
        "llama",
        "steps: 2, lr: 1.0e-3, objective: accuracy",
    );
    let out = mezod()
        .arg("run")
        .arg(&job)
        .arg("--out")
        .arg(tmp.path().join("run"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("accuracy needs a classification"),
        "{stderr}"
    );
}
