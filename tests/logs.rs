//! `MEZOD_LOG` and what logging may never do: a bare level is mezod's own
//! lines (dependencies stay at `warn` unless named), the README's
//! per-module filter shows the daemon's debug lines, and a log whose reader
//! goes (`mezod run … 2>&1 | head`) ends the run within a step, as SIGPIPE
//! would, leaving a folder that resumes bit-identically.  Before, that
//! pipeline hung the engine for good: a failed log write panicked inside
//! one of sled's I/O threads, and every later flush waited on it.

mod common;
use common::daemon::*;
use common::*;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// How long a pipeline whose reader has gone may take to end: a step of
/// the fixture takes milliseconds, the load a second or two.
const ENDS_WITHIN: Duration = Duration::from_secs(30);

/// A run of the llama fixture long enough to be stopped in the middle,
/// with progress lines every 3 steps.
fn job(dir: &Path) -> std::path::PathBuf {
    causal_job(
        dir,
        "llama",
        "steps: 60, batch_size: 4, lr: 2.0e-3, eps: 1.0e-3, seed: 3, eval_every: 30, snapshot_every: 25",
    )
}

/// `MEZOD_LOG=debug mezod run JOB --out OUT 2>&1 | READER` through `sh`:
/// the engine's exit status, and what the reader printed.  Panics (after
/// killing the pipeline) if it has not ended within [`ENDS_WITHIN`].
fn run_into(job: &Path, out: &Path, reader: &str) -> (String, String) {
    let dir = out.parent().unwrap();
    let status = dir.join("engine-status");
    let printed = dir.join("reader-output");
    let script = format!(
        r#"{{ MEZOD_LOG=debug "$0" run "$1" --out "$2" 2>&1; echo $? > "$3"; }} | {reader} > "$4""#
    );
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_mezod"))
        .arg(job)
        .arg(out)
        .arg(&status)
        .arg(&printed)
        .process_group(0)
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > ENDS_WITHIN {
            // SAFETY: kill on the process group this test started.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            panic!(
                "`mezod run … 2>&1 | {reader}` still ran after {ENDS_WITHIN:?} (the reader printed {:?})",
                std::fs::read_to_string(&printed).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    (
        std::fs::read_to_string(&status)
            .unwrap_or_default()
            .trim()
            .to_string(),
        std::fs::read_to_string(&printed).unwrap_or_default(),
    )
}

/// Both `| head -5` (gone during the load) and a reader that quits at step
/// 12 (gone while it trains) end the run within seconds with SIGPIPE's
/// status, a run folder that the same command resumes to the weights of an
/// uninterrupted run, bit for bit.
#[test]
fn a_debug_log_into_head_ends_the_run_at_once_and_it_resumes_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let job = job(tmp.path());
    let solo = tmp.path().join("solo");
    run_to_end(&job, &solo, "uninterrupted run");
    let want = sha256(&solo.join("model/model.safetensors"));

    // Where each stops: at the first step boundary after a write found the
    // reader gone, before the last step in any case.
    for (name, reader, stopped_by) in [
        ("head", "head -5", 0..60),
        ("step12", r"sed -n '/step 12\//{p;q;}'", 12..60),
    ] {
        let run = tmp.path().join(name);
        let (status, printed) = run_into(&job, &run, reader);
        assert_eq!(
            status, "141",
            "{reader}: the run ends as SIGPIPE would (128 + 13); the reader printed:\n{printed}"
        );
        match name {
            "head" => assert_eq!(printed.lines().count(), 5, "{printed}"),
            _ => assert!(printed.contains("step 12/60"), "{printed}"),
        }
        let steps = step_lines(&run);
        assert!(
            stopped_by.contains(&steps) && !run.join("model").exists(),
            "{reader}: stopped after {steps} steps"
        );
        run_to_end(&job, &run, "resumed run");
        assert_eq!(
            sha256(&run.join("model/model.safetensors")),
            want,
            "{reader}: weights after the stop and a resume differ from an uninterrupted run's"
        );
    }
}

/// `mezod run` with `MEZOD_LOG` set to `setting`, its output.
fn run_logging(job: &Path, out: &Path, setting: &str) -> Output {
    check(
        mezod()
            .env("MEZOD_LOG", setting)
            .arg("run")
            .arg(job)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap(),
        &format!("MEZOD_LOG={setting} mezod run"),
    )
}

/// The targets of a log's debug lines (`… DEBUG target: message`).
fn debug_targets(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| l.split_once(" DEBUG ")?.1.split_once(": ").map(|t| t.0))
        .map(str::to_string)
        .collect()
}

#[test]
fn debug_is_mezods_own_lines_and_a_dependency_only_when_named() {
    let tmp = tempfile::tempdir().unwrap();
    let job = causal_job(
        tmp.path(),
        "llama",
        "steps: 4, batch_size: 4, lr: 2.0e-3, eps: 1.0e-3, seed: 3",
    );
    let run = tmp.path().join("run");
    let out = run_logging(&job, &run, "debug");
    let log = String::from_utf8_lossy(&out.stderr);
    let targets = debug_targets(&log);
    // What was loaded and replayed, from the engine.
    assert!(log.contains("seed log: 0 of 4 steps recorded"), "{log}");
    assert!(log.contains("replaying steps 0..0"), "{log}");
    assert!(
        !targets.is_empty() && targets.iter().all(|t| t.starts_with("mezod")),
        "debug lines of other crates: {targets:?}"
    );
    assert!(
        !log.contains("sled::"),
        "sled's internals at a bare debug:\n{log}"
    );

    // Named, a dependency shows its debug lines too (run again: the run has
    // finished, and opening its seed log is sled's work).
    let out = run_logging(&job, &run, "debug,sled=debug");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        debug_targets(&log).iter().any(|t| t.starts_with("sled::")),
        "{log}"
    );
    // The default shows none.
    let out = run_logging(&job, &run, "");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(debug_targets(&log).is_empty(), "{log}");
}

#[test]
fn the_readmes_per_module_filter_shows_the_daemons_debug_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start_with_env(
        tmp.path(),
        "cpu_slots: 1\nrescan_interval_s: 1\nmemory_margin_mib: 64\n",
        &[("MEZOD_LOG", "info,mezod_core::daemon=debug".into())],
    );
    let id = d.submit(&job_file(tmp.path(), "small", 4, 1));
    assert_eq!(d.wait_done(id)["state"], "done", "{}", d.log());
    let log = d.log();
    // What the daemon loaded, checked, admitted and replayed.
    for said in [
        "config (from",
        "checking ",
        &format!("job {id}: admitted to CPU"),
        &format!("job {id}: 0 logged steps go to its worker to replay, of 4"),
    ] {
        assert!(
            log.contains(said),
            "no {said:?} in the daemon's log:\n{log}"
        );
    }
    let targets = debug_targets(&log);
    assert!(
        targets.iter().all(|t| t.starts_with("mezod_core::daemon")),
        "debug lines outside mezod_core::daemon: {targets:?}"
    );
}
