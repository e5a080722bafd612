//! Exact resume of real `mezod run` processes: kill -9 at random steps,
//! SIGTERM, and the refusals that protect a run directory.

mod common;
use common::*;

use std::path::Path;
use std::time::{Duration, Instant};

use rand::Rng;

fn step_records(run: &Path) -> Vec<(u64, u64, f64)> {
    read_jsonl(&run.join("metrics.jsonl"))
        .iter()
        .filter(|l| l["kind"] == "step")
        .map(|l| {
            (
                l["step"].as_u64().unwrap(),
                l["seed"].as_u64().unwrap(),
                l["projected_grad"].as_f64().unwrap(),
            )
        })
        .collect()
}

const STEPS: u64 = 240;

/// The resume job; `rng` is the generator of z (`fast` or `torch`: both must resume exactly).
fn job(dir: &Path, dtype: &str, rng: &str) -> std::path::PathBuf {
    let p = causal_job(
        dir,
        "llama",
        &format!("steps: {STEPS}, batch_size: 4, lr: 2.0e-3, eps: 1.0e-3, seed: 5, eval_every: 60, snapshot_every: 25, rng: {rng}"),
    );
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("dtype: f32", &format!("dtype: {dtype}"));
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn kill_9_at_random_steps_resumes_bit_identically_with_the_fast_generator() {
    let tmp = tempfile::tempdir().unwrap();
    let job = job(tmp.path(), "f32", "fast");
    let solo = tmp.path().join("solo");
    run_to_end(&job, &solo, "uninterrupted run");
    let want = sha256(&solo.join("model/model.safetensors"));

    let run = tmp.path().join("killed");
    let mut rng = rand::thread_rng();
    let mut kills = Vec::new();
    let mut target = 0usize;
    for _ in 0..3 {
        target += rng.gen_range(5..(STEPS as usize / 4));
        let mut child = spawn_run(&job, &run);
        if wait_for_steps(&mut child, &run, target) {
            child.kill().unwrap(); // SIGKILL
            kills.push(target);
        }
        child.wait().unwrap();
    }
    assert_eq!(kills.len(), 3, "each kill must land mid-run");
    run_to_end(&job, &run, "resumed run");
    println!("killed with -9 after steps {kills:?}");
    assert_eq!(
        sha256(&run.join("model/model.safetensors")),
        want,
        "weights after kill -9 at {kills:?} differ"
    );
    assert_eq!(
        step_records(&run),
        step_records(&solo),
        "metrics.jsonl must hold every step exactly once, equal"
    );
    let result: serde_json::Value = read_result(&run);
    assert!(result["resumed_from"].as_u64().unwrap() >= kills[2] as u64);
}

#[test]
fn sigterm_stops_at_a_step_boundary_and_bf16_with_torch_draws_resumes_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let job = job(tmp.path(), "bf16", "torch");
    let solo = tmp.path().join("solo");
    run_to_end(&job, &solo, "uninterrupted run");
    let want = sha256(&solo.join("model/model.safetensors"));

    let run = tmp.path().join("stopped");
    let mut child = spawn_run(&job, &run);
    assert!(wait_for_steps(&mut child, &run, 30));
    let t0 = Instant::now();
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let stopped_in = t0.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(128 + libc::SIGTERM), "{stderr}");
    assert!(stderr.contains("Resume with: mezod run"), "{stderr}");
    assert!(
        stopped_in < Duration::from_secs(10),
        "took {stopped_in:?} to stop"
    );
    assert!(
        !run.join("model").exists(),
        "an interrupted run exports nothing"
    );
    run_to_end(&job, &run, "resumed run");
    assert_eq!(
        sha256(&run.join("model/model.safetensors")),
        want,
        "bf16 weights after SIGTERM + resume differ"
    );
}

#[test]
fn a_changed_spec_is_refused_and_the_run_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let job = causal_job(
        tmp.path(),
        "opt",
        "steps: 3, batch_size: 2, lr: 1.0e-3, seed: 1",
    );
    let run = tmp.path().join("run");
    run_to_end(&job, &run, "first run");
    let before = sha256(&run.join("model/model.safetensors"));
    std::fs::write(
        &job,
        std::fs::read_to_string(&job)
            .unwrap()
            .replace("seed: 1", "seed: 2"),
    )
    .unwrap();
    let out = mezod_run(&job, &run);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("different job spec"), "{stderr}");
    assert!(
        stderr.contains("mezo.seed: 1 → 2"),
        "says what changed: {stderr}"
    );
    assert_eq!(sha256(&run.join("model/model.safetensors")), before);
}

/// A run that failed before its first step takes an edited job file without
/// ceremony (no `rm -rf` of its folder).
#[test]
fn a_run_without_steps_takes_an_edited_job() {
    let tmp = tempfile::tempdir().unwrap();
    let job = causal_job(
        tmp.path(),
        "llama",
        "steps: 5, batch_size: 2, lr: 1.0e-3, seed: 1",
    );
    let good = std::fs::read_to_string(&job).unwrap();
    let bad_data = tmp.path().join("bad.jsonl");
    std::fs::write(&bad_data, "not json\n").unwrap();
    let reviews = root()
        .join("examples/data/reviews.jsonl")
        .display()
        .to_string();
    std::fs::write(
        &job,
        good.replace(&reviews, &bad_data.display().to_string()),
    )
    .unwrap();
    let run = tmp.path().join("run");
    let failed = mezod_run(&job, &run);
    assert!(!failed.status.success());
    assert!(
        run.join("spec.yaml").is_file(),
        "the folder was claimed before the failure"
    );
    std::fs::write(&job, &good).unwrap();
    run_to_end(&job, &run, "the edited job in the same folder");
    assert!(run.join("model/model.safetensors").is_file());
}

#[test]
fn divergence_fails_naming_the_step_and_never_saves_nan_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let job = causal_job(
        tmp.path(),
        "opt",
        "steps: 200, batch_size: 2, lr: 1.0e+9, eps: 1.0e-3, seed: 3, snapshot_every: 1",
    );
    let run = tmp.path().join("run");
    let out = mezod_run(&job, &run);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a diverging run must fail");
    assert!(
        stderr.contains("non-finite loss") && stderr.contains("step "),
        "{stderr}"
    );
    assert!(!run.join("model").exists());
    for snap in std::fs::read_dir(run.join("snapshots"))
        .into_iter()
        .flatten()
    {
        let path = snap.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            for (name, t) in tch::Tensor::read_safetensors(&path).unwrap() {
                assert!(
                    t.isfinite().all().int64_value(&[]) == 1,
                    "{name} in {} is not finite",
                    path.display()
                );
            }
        }
    }
}

/// The Quick start's form: from a project folder, a job file with paths
/// relative to itself, `--out` relative to the working folder, Ctrl-C, then
/// exactly the command mezod printed; and `mezod export` on that
/// run from another working folder.  (Frozen specs once kept the relative
/// paths and were read back against the run folder.)
#[test]
fn ctrl_c_and_the_printed_command_resume_with_relative_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let project = tmp.path().join("project");
    let examples = project.join("examples");
    std::fs::create_dir_all(examples.join("data")).unwrap();
    std::fs::copy(
        root().join("examples/data/reviews.jsonl"),
        examples.join("data/reviews.jsonl"),
    )
    .unwrap();
    let models = project.join("models");
    std::fs::create_dir_all(&models).unwrap();
    let model = models.join("llama");
    std::fs::create_dir_all(&model).unwrap();
    for f in std::fs::read_dir(fixture("llama")).unwrap() {
        let f = f.unwrap();
        if f.file_type().unwrap().is_file() {
            std::fs::copy(f.path(), model.join(f.file_name())).unwrap();
        }
    }
    std::fs::write(
        examples.join("job.yaml"),
        "model: {path: ../models/llama, dtype: f32, threads: 1}\n\
         task: {kind: causal_lm}\n\
         data: {train: data/reviews.jsonl, text_field: text, dev_fraction: 0.1}\n\
         mezo: {steps: 200, batch_size: 4, lr: 1.0e-3, eps: 1.0e-3, seed: 7, eval_every: 100, snapshot_every: 40}\n",
    )
    .unwrap();
    let in_project = |args: &[&str]| {
        let mut c = mezod();
        c.current_dir(&project).args(args);
        c
    };
    let solo = check(
        in_project(&["run", "examples/job.yaml", "--out", "runs/solo"])
            .output()
            .unwrap(),
        "uninterrupted run",
    );
    drop(solo);
    let want = sha256(&project.join("runs/solo/model/model.safetensors"));

    let mut child = in_project(&["run", "examples/job.yaml", "--out", "runs/intr"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    assert!(wait_for_steps(&mut child, &project.join("runs/intr"), 30));
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let printed = stderr
        .lines()
        .find_map(|l| l.split("Resume with: ").nth(1))
        .unwrap_or_else(|| panic!("no resume command in: {stderr}"))
        .trim()
        .to_string();
    assert_eq!(printed, "mezod run examples/job.yaml --out runs/intr");
    let args: Vec<&str> = printed.split_whitespace().skip(1).collect();
    check(
        in_project(&args).output().unwrap(),
        "the printed resume command",
    );
    assert_eq!(
        sha256(&project.join("runs/intr/model/model.safetensors")),
        want,
        "resumed in the Quick start form, bit-identical"
    );
    // The frozen spec names absolute paths, so any working folder can use the run.
    let frozen = std::fs::read_to_string(project.join("runs/intr/spec.yaml")).unwrap();
    assert!(
        frozen.contains(&format!("path: {}", project.display())),
        "{frozen}"
    );
    let exported = mezod()
        .current_dir(tmp.path())
        .args(["export", "project/runs/intr", "-o", "intr.mezo"])
        .output()
        .unwrap();
    check(exported, "mezod export from another folder");
}

/// Running a finished run again shows its result and changes nothing: the
/// wall time and speed it measured stay (a no-op rerun once rewrote them).
#[test]
fn a_finished_run_run_again_keeps_its_result() {
    let tmp = tempfile::tempdir().unwrap();
    let job = causal_job(
        tmp.path(),
        "llama",
        "steps: 20, batch_size: 2, lr: 1.0e-3, seed: 1",
    );
    let run = tmp.path().join("run");
    let first = run_to_end(&job, &run, "first run");
    let result = std::fs::read(run.join("result.json")).unwrap();
    let weights = sha256(&run.join("model/model.safetensors"));
    let again = run_to_end(&job, &run, "the same command again");
    assert_eq!(
        std::fs::read(run.join("result.json")).unwrap(),
        result,
        "result.json rewritten by a rerun"
    );
    assert_eq!(sha256(&run.join("model/model.safetensors")), weights);
    let done = |o: &std::process::Output| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .find(|l| l.starts_with("done:"))
            .unwrap_or_default()
            .to_string()
    };
    assert!(!done(&first).is_empty());
    assert_eq!(
        done(&again),
        done(&first),
        "the rerun prints the result it has"
    );
}

/// `--restart` discards the run in the folder, says what it discarded, keeps
/// the user's own files, and starts afresh: the result is that of a run of
/// the edited job in a new folder.
#[test]
fn restart_discards_the_run_and_starts_the_edited_job_afresh() {
    let tmp = tempfile::tempdir().unwrap();
    let job = causal_job(
        tmp.path(),
        "opt",
        "steps: 3, batch_size: 2, lr: 1.0e-3, seed: 1",
    );
    let run = tmp.path().join("run");
    run_to_end(&job, &run, "first run");
    std::fs::write(run.join("notes.txt"), "mine").unwrap();
    let edited = std::fs::read_to_string(&job)
        .unwrap()
        .replace("seed: 1", "seed: 2");
    std::fs::write(&job, &edited).unwrap();
    let refused = mezod_run(&job, &run);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("pass --restart"),
        "offers the way out: {stderr}"
    );

    let out = check(
        mezod()
            .arg("run")
            .arg(&job)
            .arg("--out")
            .arg(&run)
            .arg("--restart")
            .output()
            .unwrap(),
        "run --restart",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--restart: discarded 3 recorded steps of"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(run.join("notes.txt")).unwrap(),
        "mine"
    );
    let fresh = tmp.path().join("fresh");
    run_to_end(&job, &fresh, "the edited job in a new folder");
    assert_eq!(
        sha256(&run.join("model/model.safetensors")),
        sha256(&fresh.join("model/model.safetensors")),
        "a restarted run is a run from step 0"
    );
    assert_eq!(step_lines(&run), 3, "no step of the old run is left");
}

/// `mezod run --out DIR` refuses a folder that holds other things and no run
/// (a model folder, a home folder) unless --force, and touches nothing there.
#[test]
fn a_folder_that_is_not_a_run_is_refused_unless_forced() {
    let tmp = tempfile::tempdir().unwrap();
    let job = causal_job(
        tmp.path(),
        "opt",
        "steps: 2, batch_size: 2, lr: 1.0e-3, seed: 1",
    );
    let theirs = tmp.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::fs::write(theirs.join("thesis.tex"), "x").unwrap();
    let out = mezod_run(&job, &theirs);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("is not empty and holds no mezod run (it has thesis.tex)")
            && stderr.contains("--force"),
        "{stderr}"
    );
    let left: Vec<_> = std::fs::read_dir(&theirs).unwrap().collect();
    assert_eq!(left.len(), 1, "nothing was written there");
    check(
        mezod()
            .arg("run")
            .arg(&job)
            .arg("--out")
            .arg(&theirs)
            .arg("--force")
            .output()
            .unwrap(),
        "run --force",
    );
    assert!(theirs.join("model/model.safetensors").is_file());
    // Now it holds a run: resumed without --force.
    run_to_end(&job, &theirs, "the run again");
}

/// A resume job for `mezo.estimator` other than MeZO's: shorter, since FZOO's
/// step costs N + 1 forward passes.
fn estimator_job(dir: &Path, name: &str, tuning: &str, mezo: &str) -> std::path::PathBuf {
    let p = causal_job(
        dir,
        "llama",
        &format!("steps: 90, batch_size: 4, eps: 1.0e-2, seed: 5, eval_every: 45, snapshot_every: 20, {mezo}"),
    );
    let text = format!("tuning: {tuning}\n{}", std::fs::read_to_string(&p).unwrap());
    let p = dir.join(format!("{name}.yaml"));
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn kill_9_resumes_bit_identically_with_every_estimator_in_full_and_lora_tuning() {
    let cases = [
        (
            "fzoo-full",
            "full",
            "estimator: fzoo, directions: 4, lr: 2.0e-5",
        ),
        (
            "sparse-full",
            "full",
            "estimator: sparse, sparsity: 0.75, lr: 2.0e-3",
        ),
        ("sparse-lora", "lora", "estimator: sparse, lr: 5.0e-2"),
        (
            "fzoo-lora-gaussian",
            "lora",
            "estimator: fzoo, directions: 3, perturbation: gaussian, lr: 1.0e-4",
        ),
        (
            "lozo-full",
            "full",
            "estimator: lozo, rank: 2, basis_every: 7, lr: 2.0e-3",
        ),
        ("lozo-lora", "lora", "estimator: lozo, lr: 5.0e-2"),
    ];
    let mut rng = rand::thread_rng();
    for (name, tuning, mezo) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let job = estimator_job(tmp.path(), name, tuning, mezo);
        let solo = tmp.path().join("solo");
        run_to_end(&job, &solo, &format!("{name}: uninterrupted run"));
        let base = sha256(&fixture("llama").join("model.safetensors"));
        let want = sha256(&solo.join("model/model.safetensors"));
        assert_ne!(want, base, "{name}: the run must move the weights");

        let run = tmp.path().join("killed");
        let mut kills = Vec::new();
        let mut target = 0usize;
        for _ in 0..2 {
            target += rng.gen_range(5..35);
            let mut child = spawn_run(&job, &run);
            if wait_for_steps(&mut child, &run, target) {
                child.kill().unwrap(); // SIGKILL
                kills.push(target);
            }
            child.wait().unwrap();
        }
        assert_eq!(kills.len(), 2, "{name}: each kill must land mid-run");
        run_to_end(&job, &run, &format!("{name}: resumed run"));
        println!("{name}: killed with -9 after steps {kills:?}");
        assert_eq!(
            sha256(&run.join("model/model.safetensors")),
            want,
            "{name}: weights after kill -9 at {kills:?} differ"
        );
        let (resumed, uninterrupted) = (metrics_steps(&run), metrics_steps(&solo));
        assert_eq!(resumed.len(), 90, "{name}");
        assert_eq!(resumed, uninterrupted, "{name}: metrics.jsonl steps differ");
        if name.starts_with("fzoo") {
            assert!(
                uninterrupted
                    .iter()
                    .all(|l| l["spread"].as_f64().is_some_and(|s| s > 0.0)),
                "{name}: every FZOO step logs its spread"
            );
        }
        if name.starts_with("lozo") {
            // One V per period: the logged basis seed changes exactly at its boundaries.
            let every = if name == "lozo-full" { 7 } else { 100 };
            let basis: Vec<u64> = uninterrupted
                .iter()
                .map(|l| l["basis"].as_u64().expect("every LOZO step logs its basis"))
                .collect();
            for t in 1..basis.len() {
                assert_eq!(basis[t] == basis[t - 1], t % every != 0, "{name}: step {t}");
            }
        }
        if tuning == "lora" {
            assert!(
                solo.join("adapter").is_dir(),
                "{name}: a LoRA run writes its adapter"
            );
        }
    }
}

/// A folder another run is using: a second `mezod run` there (with or
/// without `--restart`) says so with the holder's pid, exits 1 and changes
/// nothing; the first run goes on undisturbed.
#[test]
fn a_run_folder_in_use_is_refused_with_its_holders_pid_and_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    // Long enough to be running through both tries; stopped by SIGINT after.
    let job = causal_job(
        tmp.path(),
        "llama",
        "steps: 1000000, batch_size: 4, lr: 2.0e-3, eps: 1.0e-3, seed: 5",
    );
    let run = tmp.path().join("busy");
    let mut first = spawn_run(&job, &run);
    assert!(
        wait_for_steps(&mut first, &run, 2),
        "the first run ended early"
    );
    for restart in [false, true] {
        let mut cmd = mezod();
        cmd.arg("run").arg(&job).arg("--out").arg(&run);
        if restart {
            cmd.arg("--restart");
        }
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains(&format!(
                "{} is in use by another mezod run (pid {})",
                run.display(),
                first.id()
            )),
            "restart {restart}: {stderr}"
        );
        assert!(!stderr.contains("WouldBlock"), "{stderr}");
        for name in ["spec.yaml", "seedlog", "metrics.jsonl"] {
            assert!(run.join(name).exists(), "restart {restart} removed {name}");
        }
    }
    // The first run was never disturbed: it still stops at a step boundary.
    unsafe { libc::kill(first.id() as i32, libc::SIGINT) };
    let status = first.wait().unwrap();
    assert_eq!(status.code(), Some(130), "the first run");
    assert!(step_lines(&run) >= 2);
}

/// A batch larger than the training split is refused before any step, with
/// the numbers (each step takes distinct examples); nothing is trained.
#[test]
fn a_batch_larger_than_the_training_split_is_refused_with_the_numbers() {
    let tmp = tempfile::tempdir().unwrap();
    let job = causal_job(
        tmp.path(),
        "llama",
        "steps: 5, batch_size: 500, lr: 1.0e-3, eps: 1.0e-3, seed: 1",
    );
    let run = tmp.path().join("big-batch");
    let out = mezod_run(&job, &run);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("mezo.batch_size 500 is larger than the training set (")
            && stderr.contains("use a batch_size of at most"),
        "{stderr}"
    );
    assert_eq!(step_lines(&run), 0, "no step was taken");
}
