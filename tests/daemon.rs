//! The daemon end to end, with real processes: spool intake and rejection,
//! kill -9 of the daemon, SIGTERM and restart, a killed worker, concurrent
//! jobs, cancel and ownership, systemd notifications.

mod common;
use common::daemon::*;
use common::*;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::Value;

const CONFIG: &str = "cpu_slots: 1\nretry_limit: 2\nretry_backoff_s: 0.2\nrescan_interval_s: 1\nmemory_margin_mib: 64\n";

#[test]
fn jobs_are_accepted_or_rejected_and_every_file_lands_once() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(tmp.path(), CONFIG);
    let new = d.spool().join("new");
    let good = job_file(tmp.path(), "good", 30, 1);
    let good_text = std::fs::read_to_string(&good).unwrap();
    // Bad files, dropped straight into new/ as a careless user would.
    let bad = [
        ("syntax.yaml", "model: {path: [\n".to_string()),
        (
            "unknown.yaml",
            good_text.replace("seed: 1", "seed: 1, learning_rate: 3"),
        ),
        (
            "nomodel.yaml",
            good_text.replace("fixtures/llama", "fixtures/no-such-model"),
        ),
        (
            "relative.yaml",
            good_text.replace(&fixture("llama").display().to_string(), "models/llama"),
        ),
        (
            "huge.yaml",
            format!("{good_text}#{}\n", "x".repeat(2 << 20)),
        ),
    ];
    for (name, text) in &bad {
        std::fs::write(new.join(name), text).unwrap();
    }
    std::os::unix::fs::symlink(&good, new.join("link.yaml")).unwrap();
    std::fs::write(new.join(".editing.yaml"), "half-written").unwrap();

    let ids: Vec<u64> = (1..=3)
        .map(|i| d.submit(&job_file(tmp.path(), &format!("job{i}"), 30, i)))
        .collect();
    for &id in &ids {
        let job = d.wait_done(id);
        assert_eq!(job["state"], "done", "{job:#}");
        assert!(d.job_dir(id).join("run/model/model.safetensors").is_file());
        let result: Value = serde_json::from_str(
            &std::fs::read_to_string(d.job_dir(id).join("run/result.json")).unwrap(),
        )
        .unwrap();
        assert!(result["memory_estimate_bytes"].as_u64().unwrap() > 0);
        assert!(result["peak_memory_bytes"].as_u64().unwrap() > 0);
    }
    // Distinct ids, assigned by the daemon.
    assert_eq!(ids.len(), 3);
    assert!(ids[0] < ids[1] && ids[1] < ids[2]);

    // A file that fails its checks while fresh (perhaps still being copied in)
    // is looked at again after the settle time: wait for every verdict.
    // (The sidecar is written before the file moves: wait for the move too.)
    d.wait_until("a rejection for every bad file", |d| {
        bad.iter()
            .map(|(name, _)| *name)
            .chain(["link.yaml"])
            .all(|name| {
                let rejected = d.spool().join("rejected");
                rejected.join(format!("{name}.error")).is_file()
                    && rejected.join(name).symlink_metadata().is_ok()
            })
    });
    let error = |name: &str| {
        std::fs::read_to_string(d.spool().join("rejected").join(format!("{name}.error")))
            .unwrap_or_else(|_| panic!("no rejection for {name}; log:\n{}", d.log()))
    };
    assert!(
        error("syntax.yaml").contains("line 1 column"),
        "{}",
        error("syntax.yaml")
    );
    assert!(error("unknown.yaml").contains("learning_rate"));
    assert!(error("nomodel.yaml").contains("no-such-model"));
    assert!(error("relative.yaml").contains("workdir"));
    assert!(error("huge.yaml").contains("at most"));
    assert!(error("link.yaml").contains("regular file"));
    // Every dropped file is in exactly one place; the dotfile is left alone.
    let names = |sub: &str| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d.spool().join(sub))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names("new"), vec![".editing.yaml".to_string()]);
    assert_eq!(names("cur").len(), 3);
    assert_eq!(
        names("rejected")
            .iter()
            .filter(|n| !n.ends_with(".error"))
            .count(),
        bad.len() + 1
    );
    // Still serving after all that.
    let id = d.submit(&job_file(tmp.path(), "after", 10, 9));
    assert_eq!(d.wait_done(id)["state"], "done");
}

#[test]
fn kill_9_of_the_daemon_at_random_steps_resumes_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let job = job_file(tmp.path(), "long", 240, 5);
    let expected = solo_sha(&job);
    let mut d = Daemon::start(tmp.path(), CONFIG);
    let id = d.submit(&job);
    let job_run = d.job_dir(id).join("run");
    let mut rng = rand::thread_rng();
    let mut at = 0;
    for round in 0..3 {
        at += rng.gen_range(15..60);
        d.wait_steps(id, at);
        assert_eq!(worker_pids(&job_run).len(), 1, "one worker while running");
        d.kill9();
        // The worker dies with the daemon (PR_SET_PDEATHSIG).
        let deadline = Instant::now() + Duration::from_secs(5);
        while !worker_pids(&job_run).is_empty() {
            assert!(
                Instant::now() < deadline,
                "worker outlived the daemon (round {round})"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!("killed the daemon after step {at}");
        d.restart(&[]);
        at = d.job(id)["steps_done"].as_u64().unwrap();
    }
    let job = d.wait_done(id);
    assert_eq!(job["state"], "done", "{job:#}");
    assert_eq!(job["failures"], 0);
    assert_eq!(d.weights_sha(id), expected);
    let steps = read_jsonl(&d.job_dir(id).join("run/metrics.jsonl"))
        .iter()
        .filter(|l| l["kind"] == "step")
        .count();
    assert_eq!(steps, 240, "each step exactly once in metrics.jsonl");
}

#[test]
fn sigterm_exits_zero_quickly_and_a_restart_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let job = job_file(tmp.path(), "term", 200, 8);
    let expected = solo_sha(&job);
    let mut d = Daemon::start(tmp.path(), CONFIG);
    let id = d.submit(&job);
    d.wait_steps(id, 50);
    let (status, took) = d.term();
    assert!(
        status.success(),
        "daemon exit status {status}:\n{}",
        d.log()
    );
    assert!(took < Duration::from_secs(10), "stopping took {took:?}");
    assert!(d.log().contains("preempted at step"), "{}", d.log());
    d.restart(&[]);
    assert_eq!(d.wait_done(id)["state"], "done");
    assert_eq!(d.weights_sha(id), expected);
    // The second attempt started where the first stopped, not from scratch.
    let log = std::fs::read_to_string(d.job_dir(id).join("worker.log")).unwrap();
    let from: u64 = log
        .lines()
        .find(|l| l.starts_with("--- attempt 2"))
        .and_then(|l| l.split("from step ").nth(1))
        .and_then(|s| s.trim_end_matches(" ---").parse().ok())
        .unwrap_or_else(|| panic!("{log}"));
    assert!(from >= 50, "resumed from step {from}");
    // `mezod logs --follow` reads this file: plain lines, each attempt's pace
    // of its own steps, evaluations announced as they start.
    assert!(!log.contains('\r'), "carriage returns in worker.log");
    let second = log.split("--- attempt 2").nth(1).unwrap();
    let steps = second
        .lines()
        .filter(|l| l.contains(" steps/s, elapsed ") && l.contains(", ETA "));
    assert!(steps.count() >= 2, "{second}");
    assert!(
        second
            .lines()
            .any(|l| l.contains("evaluating") && l.contains("dev examples")),
        "{second}"
    );
}

#[test]
fn a_killed_worker_is_retried_and_still_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let job = job_file(tmp.path(), "victim", 160, 3);
    let expected = solo_sha(&job);
    let d = Daemon::start(tmp.path(), CONFIG);
    let id = d.submit(&job);
    d.wait_steps(id, 40);
    let pids = worker_pids(&d.job_dir(id).join("run"));
    assert_eq!(pids.len(), 1);
    unsafe { libc::kill(pids[0] as i32, libc::SIGKILL) };
    let job = d.wait_done(id);
    assert_eq!(job["state"], "done", "{job:#}");
    assert_eq!(job["failures"], 1);
    assert_eq!(job["attempts"], 2);
    assert_eq!(d.weights_sha(id), expected);
    let log = std::fs::read_to_string(d.job_dir(id).join("worker.log")).unwrap();
    assert!(log.contains("--- attempt 2"), "{log}");
}

/// A job that cannot succeed (here its loss is not finite: the same steps
/// diverge the same way every time) fails at its first attempt, with its
/// own error as the reason, not a worker's exit status.
#[test]
fn a_job_that_cannot_succeed_fails_at_once_with_its_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(tmp.path(), CONFIG);
    let job = job_file(tmp.path(), "nan", 50, 3);
    let text = std::fs::read_to_string(&job)
        .unwrap()
        .replace("lr: 2.0e-3", "lr: 1.0e+9");
    std::fs::write(&job, text).unwrap();
    let id = d.submit(&job);
    let rec = d.wait_done(id);
    assert_eq!(rec["state"], "failed", "{rec:#}");
    assert_eq!(
        (rec["attempts"].as_u64(), rec["failures"].as_u64()),
        (Some(1), Some(1)),
        "not retried: {rec:#}"
    );
    let reason = rec["reason"].as_str().unwrap();
    assert!(reason.contains("non-finite"), "{reason}");
    assert!(!reason.contains("exited with status"), "{reason}");
    let error = std::fs::read_to_string(d.job_dir(id).join("error")).unwrap();
    assert!(
        error.contains("non-finite") && error.contains("last lines of its log"),
        "{error}"
    );
    // The daemon is unharmed and serves the next job.
    let ok = d.submit(&job_file(tmp.path(), "fine", 10, 1));
    assert_eq!(d.wait_done(ok)["state"], "done");
}

/// A worker that crashes (here: aborts at its first snapshot, every attempt)
/// is retried up to the limit, and then the job fails saying so.
#[test]
fn a_crashing_worker_is_retried_up_to_the_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start_with_env(
        tmp.path(),
        CONFIG,
        &[("FAILPOINTS", "snapshot-before-hash=return".into())],
    );
    assert!(
        d.log().contains("crash points armed"),
        "this build has no crash points: build with --features failpoints (make test does)"
    );
    let id = d.submit(&job_file(tmp.path(), "crashes", 1000, 3));
    let rec = d.wait_done(id);
    assert_eq!(rec["state"], "failed", "{rec:#}");
    assert_eq!(rec["failures"], 3, "first try and two retries: {rec:#}");
    let reason = rec["reason"].as_str().unwrap();
    assert!(
        reason.contains("killed by signal 6") && reason.contains("gave up after 3 attempts"),
        "{reason}"
    );
}

#[test]
fn two_concurrent_cpu_jobs_each_equal_their_solo_run() {
    let tmp = tempfile::tempdir().unwrap();
    let a = job_file(tmp.path(), "a", 120, 11);
    // The second job tunes LoRA adapters: the daemon runs every kind of job.
    let b = job_file(tmp.path(), "b", 120, 12);
    let text = std::fs::read_to_string(&b).unwrap();
    std::fs::write(&b, format!("tuning: lora\n{text}")).unwrap();
    let (sha_a, sha_b) = (solo_sha(&a), solo_sha(&b));
    assert_ne!(sha_a, sha_b);
    let d = Daemon::start(tmp.path(), &CONFIG.replace("cpu_slots: 1", "cpu_slots: 2"));
    let ia = d.submit(&a);
    let ib = d.submit(&b);
    d.wait_until("both jobs running at once", |d| {
        d.jobs().iter().filter(|j| j["state"] == "running").count() == 2
            || d.jobs().iter().any(|j| j["state"] == "done")
    });
    assert!(
        d.jobs().iter().all(|j| j["state"] == "running"),
        "the two jobs did not overlap"
    );
    assert_eq!(d.wait_done(ia)["state"], "done");
    assert_eq!(d.wait_done(ib)["state"], "done");
    assert_eq!(d.weights_sha(ia), sha_a);
    assert_eq!(d.weights_sha(ib), sha_b);
    let adapter = "adapter/adapter_model.safetensors";
    assert_eq!(
        sha256(&d.job_dir(ib).join("run").join(adapter)),
        sha256(&b.with_extension("solo").join(adapter))
    );
}

#[test]
fn cancel_status_and_logs_over_the_socket() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let d = Daemon::start(tmp.path(), CONFIG);
    let long = d.submit(&job_file(tmp.path(), "long", 100_000, 1));
    let queued = d.submit(&job_file(tmp.path(), "queued", 10, 2));
    d.wait_steps(long, 5);
    let status = check(
        mezod()
            .args(["status", "--socket"])
            .arg(d.socket())
            .output()
            .unwrap(),
        "status",
    );
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("running") && text.contains("/100000"),
        "{text}"
    );
    assert!(text.contains("slots of CPU are busy"), "{text}");

    // SO_PEERCRED: another user may not cancel (checked where the tests run as root).
    if unsafe { libc::geteuid() } == 0 {
        let mut cmd = mezod();
        std::os::unix::process::CommandExt::uid(&mut cmd, 65534);
        let out = cmd
            .args(["cancel", &long.to_string(), "--socket"])
            .arg(d.socket())
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("only its owner or root"), "{err}");
    }
    for id in [queued, long] {
        check(
            mezod()
                .args(["cancel", &id.to_string(), "--socket"])
                .arg(d.socket())
                .output()
                .unwrap(),
            "cancel",
        );
    }
    assert_eq!(d.wait_done(long)["state"], "cancelled");
    assert_eq!(d.job(queued)["state"], "cancelled");
    let logs = check(
        mezod()
            .args(["logs", &long.to_string(), "--follow", "--socket"])
            .arg(d.socket())
            .output()
            .unwrap(),
        "logs",
    );
    let text = String::from_utf8_lossy(&logs.stdout);
    assert!(
        text.contains("--- attempt 1") && text.contains("stopped after step"),
        "{text}"
    );
}

#[test]
fn systemd_gets_ready_status_watchdog_and_stopping() {
    let tmp = tempfile::tempdir().unwrap();
    let sock_path = tmp.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut d = Daemon::start_with_env(
        tmp.path(),
        CONFIG,
        &[
            ("NOTIFY_SOCKET", sock_path.display().to_string()),
            ("WATCHDOG_USEC", "300000".into()),
        ],
    );
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        let n = sock.recv(&mut buf).unwrap();
        got.push(String::from_utf8_lossy(&buf[..n]).to_string());
    }
    let all = got.join("");
    assert!(all.contains("READY=1"), "{got:?}");
    assert!(
        all.contains("STATUS=0 queued, 0 running; CPU mode"),
        "{got:?}"
    );
    let pings = got.iter().filter(|m| m.contains("WATCHDOG=1")).count();
    assert!(
        pings >= 5,
        "{pings} watchdog pings in 3 s at a 300 ms watchdog: {got:?}"
    );
    let (status, _) = d.term();
    assert!(status.success());
    let mut stop = String::new();
    while let Ok(n) = sock.recv(&mut buf) {
        stop.push_str(&String::from_utf8_lossy(&buf[..n]));
        if stop.contains("STOPPING=1") {
            break;
        }
    }
    assert!(stop.contains("STOPPING=1"), "{stop}");
}

#[test]
fn a_crash_between_recording_and_moving_a_file_never_starts_it_twice() {
    let tmp = tempfile::tempdir().unwrap();
    // The state a crash leaves: job 1 recorded with its claim, file still in new/.
    let spool = mezod::daemon::spool::Spool::open(&tmp.path().join("spool"), false).unwrap();
    let job = job_file(tmp.path(), "claimed", 10, 1);
    std::fs::copy(&job, spool.new_dir().join("claimed.yaml")).unwrap();
    let inode = spool.inode("claimed.yaml").unwrap();
    {
        let db = sled::open(tmp.path().join("state/db")).unwrap();
        let table = mezod::daemon::jobs::JobTable::open(&db).unwrap();
        let id = table.next_id().unwrap();
        let dir = tmp.path().join("state/jobs").join(id.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(&job, dir.join("job.yaml")).unwrap();
        let mut claim = id.to_be_bytes().to_vec();
        claim.extend_from_slice(&inode.to_be_bytes());
        db.open_tree("claims")
            .unwrap()
            .insert("claimed.yaml", claim)
            .unwrap();
        table
            .put_durable(&mezod::daemon::jobs::JobRecord {
                id,
                name: "claimed".into(),
                spool_name: "claimed.yaml".into(),
                summary: String::new(),
                owner_uid: 0,
                owner_gid: 0,
                state: mezod::daemon::jobs::JobState::Queued { not_before: None },
                priority: 0,
                after: vec![],
                wants_gpu: false,
                steps_total: 10,
                steps_done: 0,
                last_loss: None,
                submitted_at: 0,
                started_at: None,
                attempts: 0,
                failures: 0,
                gpus: vec![],
                gpu_labels: vec![],
                reason: "queued".into(),
                // What a worker of the tiny fixture may hold: the daemon
                // stops a job past its estimate and margin.
                estimate_bytes: 1 << 30,
                peak_bytes: 0,
                preemptions: 0,
                replica_counts: vec![],
                replicas: 0,
            })
            .unwrap();
    }
    let d = Daemon::start(tmp.path(), CONFIG);
    d.wait_until("the file to move on", |d| {
        !d.spool().join("new/claimed.yaml").exists()
    });
    let id = d.jobs()[0]["id"].as_u64().unwrap();
    assert_eq!(d.wait_done(id)["state"], "done");
    assert_eq!(d.jobs().len(), 1, "the claimed file became no second job");
    assert!(d.spool().join(format!("cur/{id}-claimed.yaml")).is_file());
}

#[test]
fn polling_watcher_sighup_reload_and_waiting_reasons() {
    let tmp = tempfile::tempdir().unwrap();
    // No rescan timer to speak of: only the polling watcher can see drops.
    let config =
        CONFIG.replace("rescan_interval_s: 1", "rescan_interval_s: 3600") + "watch: poll\n";
    let mut d = Daemon::start(tmp.path(), &config);
    let a = d.submit(&job_file(tmp.path(), "a", 100_000, 1));
    let b = d.submit(&job_file(tmp.path(), "b", 100_000, 2));
    d.wait_steps(a, 2);
    d.wait_until("b to say why it waits", |d| {
        d.job(b)["reason"]
            .as_str()
            .unwrap()
            .contains("slots of CPU are busy")
    });
    assert_eq!(d.job(b)["state"], "queued");
    // More slots, by editing the config and sending SIGHUP.
    std::fs::write(
        tmp.path().join("daemon.yaml"),
        config.replace("cpu_slots: 1", "cpu_slots: 2"),
    )
    .unwrap();
    unsafe { libc::kill(d.child.as_ref().unwrap().id() as i32, libc::SIGHUP) };
    d.wait_steps(b, 2);
    assert_eq!(d.job(a)["state"], "running");
    let (status, _) = d.term();
    assert!(status.success());
    assert!(d.log().contains("SIGHUP: reloaded"), "{}", d.log());
}

/// CPU time (user + system, in clock ticks) a process has used.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn an_idle_daemon_sleeps() {
    // Regression: inotify reports the daemon's own reads of new/ as access
    // events; reacting to them made the main loop spin.
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(tmp.path(), CONFIG);
    let pid = d.child.as_ref().unwrap().id();
    std::thread::sleep(Duration::from_millis(500));
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(pid) - before;
    // 100 ticks per second: a spinning loop uses ~200 here, a sleeping one ~0.
    assert!(used < 40, "an idle daemon used {used} ticks of CPU in 2 s");
}

/// A job file whose name is fine in new/ but too long once the daemon adds
/// its id (`cur/<id>-<name>`) or `.error` is still taken, and neither it nor
/// a restart stops the daemon from serving the next job.
#[test]
fn a_job_named_at_the_length_limit_is_taken_and_the_daemon_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(tmp.path(), CONFIG);
    let job = job_file(tmp.path(), "short", 3, 1);
    let long = format!("{}.yaml", "n".repeat(249));
    assert_eq!(long.len(), 254);
    std::fs::copy(&job, d.spool().join("tmp").join(&long)).unwrap();
    std::fs::rename(
        d.spool().join("tmp").join(&long),
        d.spool().join("new").join(&long),
    )
    .unwrap();
    d.wait_until("the long-named job", |d| d.jobs().len() == 1);
    let id = d.jobs()[0]["id"].as_u64().unwrap();
    assert_eq!(d.wait_done(id)["state"], "done");
    let cur: Vec<String> = std::fs::read_dir(d.spool().join("cur"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(cur.len(), 1);
    assert!(cur[0].starts_with(&format!("{id}-nnn")) && cur[0].len() <= 255);
    assert!(std::fs::read_dir(d.spool().join("new"))
        .unwrap()
        .next()
        .is_none());
    d.term();
    d.restart(&[]);
    let next = d.submit(&job);
    assert_eq!(d.wait_done(next)["state"], "done");
    assert_eq!(next, id + 1, "ids stay consecutive across the restart");
}

/// FZOO, Sparse MeZO and LOZO through the daemon: the worker ships FZOO's
/// spread and LOZO's basis seed with each record, a killed worker's retry
/// replays each exactly, and each job ends with the weights and step lines of
/// its `mezod run`.
#[test]
fn fzoo_sparse_and_lozo_jobs_survive_a_killed_worker_and_equal_their_solo_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let jobs: Vec<_> = [
        (
            "fzoo",
            "estimator: fzoo, directions: 4, lr: 2.0e-5, eps: 1.0e-2",
        ),
        (
            "sparse",
            "estimator: sparse, sparsity: 0.5, lr: 2.0e-3, eps: 1.0e-3",
        ),
        (
            "lozo",
            "estimator: lozo, rank: 2, basis_every: 9, lr: 2.0e-3, eps: 1.0e-3",
        ),
    ]
    .into_iter()
    .map(|(name, mezo)| {
        let job = job_file(tmp.path(), name, 100, 7);
        let text = std::fs::read_to_string(&job).unwrap();
        assert!(text.contains("lr: 2.0e-3, eps: 1.0e-3"), "{text}");
        std::fs::write(&job, text.replace("lr: 2.0e-3, eps: 1.0e-3", mezo)).unwrap();
        job
    })
    .collect();
    let d = Daemon::start(tmp.path(), CONFIG);
    for job in &jobs {
        let expected = solo_sha(job);
        let id = d.submit(job);
        d.wait_steps(id, 30);
        let pids = worker_pids(&d.job_dir(id).join("run"));
        assert_eq!(pids.len(), 1);
        unsafe { libc::kill(pids[0] as i32, libc::SIGKILL) };
        let state = d.wait_done(id);
        assert_eq!(state["state"], "done", "{state:#}");
        assert_eq!(state["attempts"], 2, "{state:#}");
        assert_eq!(d.weights_sha(id), expected, "{}", job.display());
        let daemon_steps = metrics_steps(&d.job_dir(id).join("run"));
        assert_eq!(daemon_steps.len(), 100);
        assert_eq!(daemon_steps, metrics_steps(&job.with_extension("solo")));
        if job.ends_with("fzoo.yaml") {
            assert!(daemon_steps.iter().all(|l| l["spread"].as_f64().is_some()));
        }
        if job.ends_with("lozo.yaml") {
            assert!(daemon_steps.iter().all(|l| l["basis"].as_u64().is_some()));
        }
    }
}

/// A finished classification job's status carries its test comparison with
/// the base model (`test_paired`), as `mezod run`'s result.json has it: a user
/// of the daemon sees the confidence interval without opening the run folder.
#[test]
fn a_done_jobs_status_carries_the_paired_test_comparison() {
    let tmp = tempfile::tempdir().unwrap();
    let job = tmp.path().join("sentiment.yaml");
    let text = std::fs::read_to_string(root().join("examples/classification.yaml"))
        .unwrap()
        .replace(
            "../tests/fixtures/opt",
            &fixture("opt").display().to_string(),
        )
        .replace(
            "data/reviews.jsonl",
            &root()
                .join("examples/data/reviews.jsonl")
                .display()
                .to_string(),
        )
        .replace(
            "dev_fraction: 0.2,",
            "dev_fraction: 0.2, test_fraction: 0.2,",
        )
        .replace("steps: 300,", "steps: 40,")
        .replace("eval_every: 100", "eval_every: 20");
    assert!(
        text.contains("test_fraction") && text.contains("steps: 40"),
        "{text}"
    );
    std::fs::write(&job, text).unwrap();
    let d = Daemon::start(tmp.path(), CONFIG);
    let id = d.submit(&job);
    let state = d.wait_done(id);
    assert_eq!(state["state"], "done", "{state:#}");
    let on_disk: Value = serde_json::from_str(
        &std::fs::read_to_string(d.job_dir(id).join("run/result.json")).unwrap(),
    )
    .unwrap();
    let paired = &on_disk["test_paired"];
    assert!(paired["n"].as_u64().is_some_and(|n| n > 0), "{on_disk:#}");
    assert_eq!(state["result"]["test_paired"], *paired, "{state:#}");
    assert_eq!(
        state["result"]["test_metric"], on_disk["test_metric"],
        "{state:#}"
    );
    let shown = check(
        mezod()
            .args(["status", &id.to_string(), "--socket"])
            .arg(d.socket())
            .output()
            .unwrap(),
        "mezod status ID",
    );
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown.contains("exported   step 40: the final weights (step 40"),
        "{shown}"
    );
    assert_eq!(
        state["result"]["exported"], on_disk["exported"],
        "{state:#}"
    );
    let n = paired["n"].to_string();
    assert!(
        shown.contains("test vs base")
            && shown.contains("% CI")
            && shown.contains(&format!("n {n})")),
        "{shown}"
    );
}

/// A job file of `replicas` replicas (`parallel:`), each step's directions
/// shared among them: `directions` defaults to the replicas.
fn replicated_job(dir: &Path, name: &str, steps: u64, seed: u64, parallel: &str) -> PathBuf {
    let job = job_file(dir, name, steps, seed);
    let text = std::fs::read_to_string(&job).unwrap();
    std::fs::write(&job, format!("parallel: {parallel}\n{text}")).unwrap();
    job
}

/// The rank a worker was given (torchrun's `RANK`), from its environment.
fn rank_of(pid: u32) -> Option<usize> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    environ
        .split(|&b| b == 0)
        .find_map(|kv| kv.strip_prefix(b"RANK="))
        .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
}

/// The daemon admits a 2-replica job to two CPU slots, runs its two
/// workers (torchrun's variables, one port), and when one replica is
/// killed stops the other, queues the job again and resumes it: the
/// weights are those of the job run alone (and of one process with its
/// two directions).
#[test]
fn a_replicated_job_is_admitted_run_and_requeued_when_a_replica_dies() {
    let tmp = tempfile::tempdir().unwrap();
    let job = replicated_job(tmp.path(), "pair", 240, 5, "{replicas: 2}");
    let expected = solo_sha(&job);
    let d = Daemon::start(tmp.path(), &CONFIG.replace("cpu_slots: 1", "cpu_slots: 2"));
    let id = d.submit(&job);
    d.wait_steps(id, 40);
    let rec = d.job(id);
    assert_eq!(rec["replicas"], 2, "{rec:#}");
    assert_eq!(rec["reason"], "running on CPU (2 replicas)", "{rec:#}");
    let shown = mezod()
        .args(["status", &id.to_string(), "--socket"])
        .arg(d.socket())
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout).into_owned();
    assert!(
        shown.contains("2 processes, each measuring its share"),
        "{shown}"
    );
    let run = d.job_dir(id).join("run");
    let pids = worker_pids(&run);
    assert_eq!(pids.len(), 2, "one worker per replica");
    let mut ranks: Vec<usize> = pids.iter().filter_map(|&p| rank_of(p)).collect();
    ranks.sort();
    assert_eq!(ranks, [0, 1]);
    let follower = *pids.iter().find(|&&p| rank_of(p) == Some(1)).unwrap();
    unsafe { libc::kill(follower as i32, libc::SIGKILL) };

    let rec = d.wait_done(id);
    assert_eq!(rec["state"], "done", "{rec:#}");
    assert_eq!(rec["attempts"], 2, "{rec:#}");
    assert_eq!(rec["failures"], 1, "{rec:#}");
    assert_eq!(d.weights_sha(id), expected, "bit for bit the job run alone");
    assert!(
        d.log().contains(&format!(
            "job {id}: replica 1 ended (worker was killed by signal 9): stopping the others"
        )),
        "{}",
        d.log()
    );
    let log = std::fs::read_to_string(d.job_dir(id).join("worker.log")).unwrap();
    assert!(log.contains("--- attempt 2 on CPU, CPU"), "{log}");
    // Only the leader logs steps: the seed log has each step once.
    let steps = metrics_steps(&run);
    assert_eq!(steps.len(), 240);
}

/// More replicas than CPU slots never start; with `elastic: true` the job
/// runs on the slots there are once it has waited `elastic_wait_s`, and
/// computes the same bits.
#[test]
fn replicas_past_the_slots_fail_at_once_unless_elastic() {
    let tmp = tempfile::tempdir().unwrap();
    let fixed = replicated_job(tmp.path(), "fixed", 30, 6, "{replicas: 2}");
    let elastic = replicated_job(tmp.path(), "elastic", 60, 6, "{replicas: 2, elastic: true}");
    let expected = solo_sha(&elastic);
    let d = Daemon::start(tmp.path(), &format!("{CONFIG}elastic_wait_s: 0\n"));
    let id = d.submit(&fixed);
    let rec = d.wait_done(id);
    assert_eq!(rec["state"], "failed", "{rec:#}");
    assert!(
        rec["reason"]
            .as_str()
            .unwrap()
            .contains("its 2 replicas need a pool each, and the daemon has 1 CPU slots"),
        "{rec:#}"
    );
    let id = d.submit(&elastic);
    let rec = d.wait_done(id);
    assert_eq!(rec["state"], "done", "{rec:#}");
    assert!(
        rec.get("replicas").is_none_or(|r| r == 0),
        "one process: {rec:#}"
    );
    assert_eq!(
        d.weights_sha(id),
        expected,
        "one process computes what two do"
    );
}
