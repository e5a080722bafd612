//! Replicas (`parallel: {replicas: K}`): K processes share each step's
//! directions and exchange only scalars over c10d, and the run is bit for bit
//! the one process with the same directions gives, however it was started
//! (by `mezod run` itself or by torchrun) and however many replicas resume it.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A causal-LM job on the LLaMA fixture with `directions` directions, one
/// thread per process, written as `name.yaml` with `extra` appended.
fn job(dir: &Path, name: &str, steps: u64, directions: Option<usize>, extra: &str) -> PathBuf {
    let directions = directions.map_or(String::new(), |n| format!(", directions: {n}"));
    let text = format!(
        "model: {{path: {}, dtype: f32, threads: 1}}\ntask: {{kind: causal_lm}}\n\
         data: {{train: {}, text_field: text, max_dev: 8}}\n\
         mezo: {{steps: {steps}, batch_size: 4, lr: 2.0e-3, eps: 1.0e-3, seed: 5, \
         eval_every: 50, snapshot_every: 30{directions}}}\n{extra}",
        fixture("llama").display(),
        root().join("examples/data/reviews.jsonl").display(),
    );
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn weights(run: &Path) -> String {
    sha256(&run.join("model/model.safetensors"))
}

/// Each logged step's seeds and projected gradients, from metrics.jsonl.
fn gradients(run: &Path) -> Vec<serde_json::Value> {
    metrics_steps(run)
        .iter()
        .map(|s| serde_json::json!([s["seed"], s["projected_grad"], s["more"]]))
        .collect()
}

#[test]
fn replicas_started_by_mezod_run_are_bit_identical_to_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    // (directions, replicas, estimator): one direction each, several each,
    // and Sparse MeZO, whose mask each replica computes from its weights.
    for (n, k, estimator) in [(2, 2, "mezo"), (4, 2, "mezo"), (3, 3, "sparse")] {
        let tag = format!("{n}-{k}-{estimator}");
        let with_estimator = |path: &Path| {
            let text = std::fs::read_to_string(path)
                .unwrap()
                .replace("seed: 5,", &format!("seed: 5, estimator: {estimator},"));
            std::fs::write(path, text).unwrap();
        };
        let alone = job(tmp.path(), &format!("alone-{tag}"), 12, Some(n), "");
        with_estimator(&alone);
        // Directions default to one per replica.
        let shared = job(
            tmp.path(),
            &format!("shared-{tag}"),
            12,
            (n != k).then_some(n),
            &format!("parallel: {{replicas: {k}}}\n"),
        );
        with_estimator(&shared);
        let one = tmp.path().join(format!("one-{tag}"));
        let many = tmp.path().join(format!("many-{tag}"));
        run_to_end(&alone, &one, "one process");
        let out = run_to_end(&shared, &many, "replicas");
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.contains("done: 12 steps"), "{said}");
        assert_eq!(weights(&many), weights(&one), "{tag}: weights differ");
        assert_eq!(gradients(&many), gradients(&one), "{tag}");
        // The followers' working folders; the leader's seed log alone.
        assert!(many.join(format!("replicas/{}", k - 1)).is_dir(), "{tag}");
        assert!(!many.join("replicas/1/seedlog").exists(), "{tag}");
    }
}

#[test]
fn torchrun_launches_a_replicated_job() {
    let torchrun = root().join(".venv/bin/torchrun");
    assert!(
        torchrun.is_file(),
        "the Makefile's setup installs torchrun into .venv"
    );
    let tmp = tempfile::tempdir().unwrap();
    let alone = job(tmp.path(), "alone", 12, Some(2), "");
    let shared = job(tmp.path(), "shared", 12, None, "parallel: {replicas: 2}\n");
    let one = tmp.path().join("one");
    run_to_end(&alone, &one, "one process");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let many = tmp.path().join("many");
    let out = Command::new(&torchrun)
        .args(["--no-python", "--nproc-per-node", "2", "--master-port"])
        .arg(port.to_string())
        .arg(env!("CARGO_BIN_EXE_mezod"))
        .arg("run")
        .arg(&shared)
        .arg("--out")
        .arg(&many)
        .env("MEZOD_LOG", "warn")
        .output()
        .unwrap();
    check(out, "torchrun --no-python mezod run");
    assert_eq!(weights(&many), weights(&one));
}

fn wait_for(run: &Path, steps: usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while step_lines(run) < steps {
        assert!(
            Instant::now() < deadline,
            "the replicas did not reach step {steps}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The pids of `pid`'s children.
fn children(pid: u32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect()
}

/// A long job run to its end in one process (`one`), and the same job with
/// two replicas started in the background and past step 40 (`many`).
fn one_and_many_under_way(dir: &Path, steps: u64) -> (PathBuf, PathBuf, std::process::Child) {
    let alone = job(dir, "alone", steps, Some(2), "");
    let one = dir.join("one");
    run_to_end(&alone, &one, "one process");
    let shared = job(dir, "shared", steps, None, "parallel: {replicas: 2}\n");
    let many = dir.join("many");
    let child = spawn_run(&shared, &many);
    wait_for(&many, 40);
    (one, many, child)
}

#[test]
fn a_run_stopped_with_two_replicas_resumes_with_one_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let steps = 600;
    let (one, many, child) = one_and_many_under_way(tmp.path(), steps);
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{said}");
    assert_eq!(
        said.matches("Resume with: mezod run").count(),
        1,
        "the leader alone says how to resume: {said}"
    );
    let stopped_at = step_lines(&many);
    assert!(stopped_at < steps as usize, "stopped at {stopped_at}");

    // The same job on one process, its directions stated: it resumes the run.
    let single = job(
        tmp.path(),
        "shared",
        steps,
        Some(2),
        "parallel: {replicas: 1}\n",
    );
    let out = run_to_end(&single, &many, "resumed on one process");
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("done: {steps} steps")));
    assert_eq!(weights(&many), weights(&one));
    assert_eq!(read_result(&many)["resumed_from"], stopped_at as u64);
}

#[test]
fn a_replica_killed_with_sigkill_leaves_a_run_that_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let steps = 600;
    let (one, many, child) = one_and_many_under_way(tmp.path(), steps);
    let shared = tmp.path().join("shared.yaml");
    let replicas = children(child.id());
    assert_eq!(replicas.len(), 2, "{replicas:?}");
    // The follower (started second) dies without a word.
    unsafe { libc::kill(replicas[1], libc::SIGKILL) };
    let started = Instant::now();
    let out = child.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the leader hung: {said}"
    );
    assert!(
        said.contains("replica"),
        "the leader says a replica has gone: {said}"
    );
    let out = run_to_end(&shared, &many, "the same command again");
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("done: {steps} steps")));
    assert_eq!(weights(&many), weights(&one));
}

#[test]
fn replicas_are_refused_where_they_cannot_share_the_steps() {
    let tmp = tempfile::tempdir().unwrap();
    for (directions, extra, want) in [
        (
            Some(3),
            "parallel: {replicas: 2}\n",
            "directions must be a multiple of 2",
        ),
        (
            None,
            "parallel: {replicas: 0}\n",
            "parallel.replicas must be between 1 and 64",
        ),
    ] {
        let bad = job(tmp.path(), "bad", 4, directions, extra);
        let out = mezod_run(&bad, &tmp.path().join("bad"));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(want), "{err}");
    }
    let fzoo = job(tmp.path(), "fzoo", 4, Some(4), "parallel: {replicas: 2}\n");
    let text = std::fs::read_to_string(&fzoo)
        .unwrap()
        .replace("seed: 5,", "seed: 5, estimator: fzoo,");
    std::fs::write(&fzoo, text).unwrap();
    let out = mezod_run(&fzoo, &tmp.path().join("fzoo"));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("fzoo's are not shared yet"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
