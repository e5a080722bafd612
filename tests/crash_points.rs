//! Crash points: the process dies on the spot (abort: no destructors, no
//! flushes) at each boundary of intake, record, move, step record and
//! snapshot; a restart then loses nothing, duplicates nothing, and the run's
//! weights equal an uninterrupted run's, bit for bit.
//!
//! Needs a build with crash points (`--features failpoints`, as `make test`
//! builds); without them these tests fail and say so.

mod common;
use common::*;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

const CONFIG: &str =
    "cpu_slots: 1\nmemory_margin_mib: 0\nsnapshot_every: 3\nretry_backoff_s: 0.2\n";

struct Daemon {
    root: PathBuf,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// Start a daemon over `root`, with `FAILPOINTS=failpoints` when given.
    fn start(root: &Path, failpoints: Option<&str>, n: usize) -> Daemon {
        std::fs::write(root.join("daemon.yaml"), CONFIG).unwrap();
        let log = root.join(format!("daemon-{n}.log"));
        let env: Vec<(&str, &std::ffi::OsStr)> = failpoints
            .iter()
            .map(|f| ("FAILPOINTS", std::ffi::OsStr::new(*f)))
            .collect();
        let child = spawn_daemon(root, &env, &log);
        Daemon {
            root: root.to_path_buf(),
            child,
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait for the armed point to kill the daemon, and check that it did.
    fn expect_crash_at(mut self, point: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon never reached {point}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let log = self.log();
        assert!(
            log.contains("crash points armed"),
            "this build has no crash points: build with --features failpoints (make test does)"
        );
        assert_eq!(status.signal(), Some(libc::SIGABRT), "{log}");
        assert!(log.contains(&format!("crash point {point}")), "{log}");
    }

    fn jobs(&self) -> Vec<serde_json::Value> {
        daemon_jobs(&self.root.join("run/mezod.sock"))
    }

    fn wait_all_done(&self) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let jobs = self.jobs();
            if !jobs.is_empty() && jobs.iter().all(|j| j["state"] == "done") {
                return jobs;
            }
            assert!(
                jobs.iter().all(|j| j["state"] != "failed"),
                "{jobs:#?}\n{}",
                self.log()
            );
            assert!(Instant::now() < deadline, "{jobs:#?}\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn job(dir: &Path) -> PathBuf {
    causal_job(
        dir,
        "llama",
        "steps: 8, batch_size: 4, lr: 2.0e-3, eps: 1.0e-3, seed: 5, eval_every: 40, snapshot_every: 3",
    )
}

/// One job, dropped into the spool the way `mezod submit` does.
fn drop_job(root: &Path, job: &Path) {
    std::fs::create_dir_all(root.join("spool/tmp")).unwrap();
    let tmp = root.join("spool/tmp/crash.yaml");
    std::fs::copy(job, &tmp).unwrap();
    std::fs::rename(&tmp, root.join("spool/new/crash.yaml")).unwrap();
}

#[test]
fn a_daemon_killed_at_any_intake_or_record_boundary_loses_and_duplicates_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let job = job(tmp.path());
    let solo = tmp.path().join("solo");
    run_to_end(&job, &solo, "solo run");
    let expected = sha256(&solo.join("model/model.safetensors"));
    for point in [
        "intake-before-record",
        "record-before-move",
        "record-after-move",
        "worker-record-before-flush",
    ] {
        let root = tmp.path().join(point);
        std::fs::create_dir_all(&root).unwrap();
        let armed = Daemon::start(&root, Some(&format!("{point}=return")), 1);
        drop_job(&root, &job);
        armed.expect_crash_at(point);
        let d = Daemon::start(&root, None, 2);
        let jobs = d.wait_all_done();
        assert_eq!(jobs.len(), 1, "{point}: exactly one job: {jobs:#?}");
        let id = jobs[0]["id"].as_u64().unwrap();
        assert_eq!(
            files_in(&root.join("spool/new")),
            Vec::<String>::new(),
            "{point}"
        );
        assert_eq!(
            files_in(&root.join("spool/rejected")),
            Vec::<String>::new(),
            "{point}"
        );
        assert_eq!(
            files_in(&root.join("spool/cur")),
            vec![format!("{id}-crash.yaml")],
            "{point}"
        );
        let weights = root.join(format!("state/jobs/{id}/run/model/model.safetensors"));
        assert_eq!(
            sha256(&weights),
            expected,
            "{point}: not exact after the crash"
        );
    }
}

#[test]
fn a_run_killed_between_a_snapshot_and_its_hash_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let job = job(tmp.path());
    let solo = tmp.path().join("solo");
    run_to_end(&job, &solo, "solo run");
    let out = tmp.path().join("crashed");
    let crashed = mezod()
        .arg("run")
        .arg(&job)
        .arg("--out")
        .arg(&out)
        .env("FAILPOINTS", "snapshot-before-hash=return")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&crashed.stderr);
    assert!(
        stderr.contains("crash points armed"),
        "this build has no crash points: build with --features failpoints (make test does)"
    );
    assert_eq!(crashed.status.signal(), Some(libc::SIGABRT), "{stderr}");
    assert!(
        stderr.contains("crash point snapshot-before-hash"),
        "{stderr}"
    );
    run_to_end(&job, &out, "the rerun");
    assert_eq!(
        sha256(&out.join("model/model.safetensors")),
        sha256(&solo.join("model/model.safetensors"))
    );
}
