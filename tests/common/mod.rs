//! Helpers shared by the integration tests: fixtures, job files, the binary, Python.
#![allow(dead_code)]

pub mod daemon;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every fixture model: each architecture file and its variants, decoders
/// and masked LMs.
pub const ALL_FIXTURES: [&str; 9] = [
    "opt",
    "opt-postln",
    "gpt2",
    "llama",
    "llama3",
    "mistral",
    "qwen2",
    "bert",
    "roberta",
];

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
/// The text of `examples/<name>.yaml` with its relative paths (the fixture
/// model, the data file) made absolute, for a test to edit and write elsewhere.
pub fn example_job_text(name: &str) -> String {
    std::fs::read_to_string(root().join(format!("examples/{name}.yaml")))
        .unwrap()
        .replace(
            "path: ../tests/fixtures/",
            &format!("path: {}/tests/fixtures/", root().display()),
        )
        .replace(
            "train: data/",
            &format!("train: {}/examples/data/", root().display()),
        )
}

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

/// The step lines of a run's metrics.jsonl, as JSON (seeds, projected
/// gradients, losses, FZOO's spread of each step).
pub fn metrics_steps(run: &Path) -> Vec<serde_json::Value> {
    read_jsonl(&run.join("metrics.jsonl"))
        .into_iter()
        .filter(|l| l["kind"] == "step")
        .collect()
}

/// How many steps a run's metrics.jsonl holds.
pub fn step_lines(run: &Path) -> usize {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .map(|t| t.matches("\"kind\":\"step\"").count())
        .unwrap_or(0)
}

/// `mezod run JOB --out OUT` in the background.
pub fn spawn_run(job: &Path, out: &Path) -> Child {
    mezod()
        .arg("run")
        .arg(job)
        .arg("--out")
        .arg(out)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Wait until the run has logged at least `steps` steps (or has ended).
pub fn wait_for_steps(child: &mut Child, run: &Path, steps: usize) -> bool {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if step_lines(run) >= steps {
            return true;
        }
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    panic!("run did not reach step {steps}");
}

/// `mezod run JOB --out OUT`, whatever its outcome.
pub fn mezod_run(job: &Path, out: &Path) -> Output {
    mezod()
        .arg("run")
        .arg(job)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

/// `mezod run JOB --out OUT` to its end; fails the test with its output otherwise.
pub fn run_to_end(job: &Path, out: &Path, what: &str) -> Output {
    check(mezod_run(job, out), what)
}

/// `mezod export RUN -o FILE` to its end, and the `.mezo` file it wrote.
pub fn export_tune_file(run: &Path, file: &Path) -> serde_json::Value {
    check(
        mezod()
            .arg("export")
            .arg(run)
            .arg("-o")
            .arg(file)
            .output()
            .unwrap(),
        "mezod export",
    );
    serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap()
}

/// A finished run's result.json.
pub fn read_result(run: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("result.json")).unwrap()).unwrap()
}

/// Start `mezod run`, kill it with SIGKILL once it has logged `at` steps, and
/// run it again to its end; returns how many steps were logged when it died.
pub fn kill_and_resume(job: &Path, out: &Path, at: usize) -> usize {
    let mut child = spawn_run(job, out);
    wait_for_steps(&mut child, out, at);
    let _ = child.kill();
    let _ = child.wait();
    let killed_at = step_lines(out);
    run_to_end(job, out, "resumed run");
    killed_at
}

/// `mezod daemon` over `root` (config `root/daemon.yaml`; spool, state and
/// runtime folders inside `root`), with `env` set and stderr into `log`;
/// returns once its control socket answers (panics if it exits first).
pub fn spawn_daemon(root: &Path, env: &[(&str, &std::ffi::OsStr)], log: &Path) -> Child {
    use mezod::daemon::control::{request, Request};
    let mut cmd = mezod();
    cmd.env("MEZOD_LOG", "info")
        .env_remove("FAILPOINTS")
        .arg("daemon")
        .arg("--config")
        .arg(root.join("daemon.yaml"))
        .arg("--spool")
        .arg(root.join("spool"))
        .arg("--state")
        .arg(root.join("state"))
        .arg("--runtime")
        .arg(root.join("run"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while request(&root.join("run/mezod.sock"), &Request::Hello).is_err() {
        if let Some(st) = child.try_wait().unwrap() {
            panic!(
                "daemon exited at start ({st}):\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "daemon did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// `mezod submit JOB --socket SOCKET`, as a user types it; returns the job id.
pub fn submit_to(socket: &Path, job: &Path) -> u64 {
    let out = check(
        mezod()
            .arg("submit")
            .arg(job)
            .arg("--socket")
            .arg(socket)
            .output()
            .unwrap(),
        "mezod submit",
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// The daemon's status report over `socket`, every ended job included, as JSON.
pub fn daemon_status(socket: &Path) -> serde_json::Value {
    use mezod::daemon::control::{request, Request, Response};
    let all = Request::Status {
        id: None,
        finished: Some(usize::MAX),
        states: vec![],
        owner: None,
    };
    match request(socket, &all).unwrap() {
        Response::Status(r) => serde_json::to_value(r).unwrap(),
        other => panic!("{other:?}"),
    }
}

/// Every job the daemon at `socket` knows, as JSON.
pub fn daemon_jobs(socket: &Path) -> Vec<serde_json::Value> {
    daemon_status(socket)["jobs"].as_array().unwrap().clone()
}

/// pids of daemon workers writing into `run` (their `--out`).
pub fn worker_pids(run: &Path) -> Vec<u32> {
    let needle = format!(" --out {} ", run.display());
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let c = String::from_utf8_lossy(&c).replace('\0', " ");
                c.contains(" worker ") && c.contains(&needle)
            })
        })
        .collect()
}
