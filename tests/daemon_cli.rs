//! The daemon's command line as users type it: jobs that cannot run refused
//! with the reason, a job's own error as its reason, names, the status list
//! and its filters, one job in detail, cancel of several jobs, restart,
//! clean, the end of a log, and output piped into `head`.

mod common;
use common::daemon::*;
use common::*;

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

const CONFIG: &str = "cpu_slots: 1\nretry_limit: 2\nretry_backoff_s: 0.2\nrescan_interval_s: 1\nmemory_margin_mib: 64\n";

/// `mezod ARGS --socket SOCKET` (the socket goes last, after the command's own arguments).
fn mezod_at(d: &Daemon, args: &[&str]) -> Output {
    mezod()
        .args(args)
        .arg("--socket")
        .arg(d.socket())
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A copy of the llama fixture with `edit` applied to its folder.
fn model_with(dir: &Path, name: &str, edit: impl Fn(&Path)) -> PathBuf {
    let to = model_copy(dir, name, 0o644);
    edit(&to);
    to
}

/// The llama job's text with its model (and optionally its data) replaced.
fn job_with(dir: &Path, name: &str, model: &Path, data: Option<&Path>) -> PathBuf {
    let base = job_file(dir, &format!("{name}-base"), 20, 1);
    let mut text = std::fs::read_to_string(&base).unwrap().replace(
        &fixture("llama").display().to_string(),
        &model.display().to_string(),
    );
    if let Some(data) = data {
        text = text.replace(
            &root()
                .join("examples/data/reviews.jsonl")
                .display()
                .to_string(),
            &data.display().to_string(),
        );
    }
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Rows of reviews with `text`, but line `bad` (1-based) without it.
fn data_missing_text_at(dir: &Path, rows: usize, bad: usize) -> PathBuf {
    let path = dir.join(format!("missing-at-{bad}.jsonl"));
    let text: String = (1..=rows)
        .map(|i| {
            if i == bad {
                format!("{{\"body\": \"row {i}\"}}\n")
            } else {
                format!("{{\"text\": \"a fine review, number {i}\"}}\n")
            }
        })
        .collect();
    std::fs::write(&path, text).unwrap();
    path
}

/// Everything knowable before a worker starts is refused by `mezod submit`
/// (nothing queued) and by the daemon's intake (a file dropped into the
/// spool), with the reason; `mezod estimate` exits non-zero on each.
#[test]
fn a_job_that_cannot_run_is_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let d = Daemon::start(dir, CONFIG);
    let config = |m: &Path, from: &str, to: &str| {
        let c = std::fs::read_to_string(m.join("config.json")).unwrap();
        assert!(c.contains(from), "{c}");
        std::fs::write(m.join("config.json"), c.replacen(from, to, 1)).unwrap();
    };
    let falcon = model_with(dir, "falcon", |m| {
        config(m, "\"model_type\": \"llama\"", "\"model_type\": \"falcon\"")
    });
    let untokenized = model_with(dir, "untokenized", |m| {
        std::fs::remove_file(m.join("tokenizer.json")).unwrap()
    });
    let wide = model_with(dir, "wide", |m| {
        let c: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(m.join("config.json")).unwrap()).unwrap();
        let h = c["hidden_size"].as_u64().unwrap();
        config(
            m,
            &format!("\"hidden_size\": {h}"),
            &format!("\"hidden_size\": {}", 2 * h),
        );
    });
    let llama = fixture("llama");
    let bad_data = data_missing_text_at(dir, 30, 21);
    let cases = [
        (
            "falcon",
            job_with(dir, "falcon", &falcon, None),
            "model_type \"falcon\" is not supported",
        ),
        (
            "notok",
            job_with(dir, "notok", &untokenized, None),
            "tokenizer.json is missing",
        ),
        ("wide", job_with(dir, "wide", &wide, None), "hidden_size"),
        (
            "baddata",
            job_with(dir, "baddata", &llama, Some(&bad_data)),
            &format!("{} line 21: no field \"text\"", bad_data.display()),
        ),
    ];
    for (name, job, why) in &cases {
        let est = mezod().arg("estimate").arg(job).output().unwrap();
        assert!(!est.status.success(), "{name}: estimate exited 0");
        assert!(stderr(&est).contains(why), "{name}: {}", stderr(&est));
        assert!(
            stdout(&est).contains("total"),
            "{name}: the estimate is still shown"
        );

        let sub = mezod_at(&d, &["submit", job.to_str().unwrap()]);
        assert!(!sub.status.success(), "{name}: submitted");
        assert!(stderr(&sub).contains(why), "{name}: {}", stderr(&sub));
    }
    assert!(d.jobs().is_empty(), "nothing was queued: {:#?}", d.jobs());
    let spooled = |sub: &str| std::fs::read_dir(d.spool().join(sub)).unwrap().count();
    assert_eq!((spooled("new"), spooled("cur")), (0, 0));

    // The same files dropped into the spool directly: rejected by intake.
    for (name, job, _) in &cases {
        std::fs::copy(job, d.spool().join("new").join(format!("{name}.yaml"))).unwrap();
    }
    let error = |name: &str| {
        d.spool()
            .join("rejected")
            .join(format!("{name}.yaml.error"))
    };
    d.wait_until("every file to be rejected", |_| {
        cases.iter().all(|(n, _, _)| error(n).is_file())
    });
    for (name, _, why) in &cases {
        let text = std::fs::read_to_string(error(name)).unwrap();
        assert!(text.contains(why), "{name}: {text}");
    }
    assert!(d.jobs().is_empty());
    // A good job still passes both.
    let good = job_with(dir, "good", &llama, None);
    assert!(mezod()
        .arg("estimate")
        .arg(&good)
        .status()
        .unwrap()
        .success());
}

/// A data error past the rows intake reads fails the job at its first
/// attempt, and the reason names the file and the line.
#[test]
fn a_bad_row_fails_the_job_at_once_naming_its_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    // Another user reaches the socket (as on a shared machine).
    std::fs::set_permissions(
        tmp.path(),
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755),
    )
    .unwrap();
    let d = Daemon::start(tmp.path(), CONFIG);
    let data = data_missing_text_at(tmp.path(), 300, 250);
    let id = d.submit(&job_with(
        tmp.path(),
        "late-bad-row",
        &fixture("llama"),
        Some(&data),
    ));
    let rec = d.wait_done(id);
    assert_eq!(rec["state"], "failed", "{rec:#}");
    assert_eq!(
        (rec["attempts"].as_u64(), rec["failures"].as_u64()),
        (Some(1), Some(1))
    );
    let reason = rec["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!("{} line 250", data.display()))
            && reason.contains("no field \"text\""),
        "{reason}"
    );
    // Its owner sees the reason in the list and in the detail view.
    let list = stdout(&mezod_at(&d, &["status"]));
    assert!(list.contains("line 250"), "{list}");
    let detail = stdout(&mezod_at(&d, &["status", &id.to_string()]));
    assert!(
        detail.contains("no field \"text\"") && detail.contains("error:"),
        "{detail}"
    );
    // Another user sees that it failed, not why (a reason may quote paths and data).
    if unsafe { libc::geteuid() } == 0 {
        let mut cmd = mezod();
        std::os::unix::process::CommandExt::uid(&mut cmd, 65534);
        let other = cmd
            .args(["status", "--json", "--socket"])
            .arg(d.socket())
            .output()
            .unwrap();
        let text = stdout(&other);
        assert!(
            text.contains("\"failed\"") && !text.contains("line 250"),
            "{text}"
        );
    }
}

/// Names, the list's filters, one job in detail, JSON into `head`.
#[test]
fn status_lists_by_name_filters_and_shows_one_job_in_detail() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(tmp.path(), CONFIG);
    let plain = d.submit(&job_file(tmp.path(), "sst2-sweep", 10, 1));
    let named_file = job_file(tmp.path(), "other", 10, 2);
    let text = std::fs::read_to_string(&named_file).unwrap();
    std::fs::write(&named_file, format!("name: lr sweep, run 2\n{text}")).unwrap();
    let named = d.submit(&named_file);
    assert_eq!(d.wait_done(plain)["state"], "done");
    assert_eq!(d.wait_done(named)["state"], "done");
    // The file's stem, not the spool's temporary name; or the job's own name.
    assert_eq!(d.job(plain)["name"], "sst2-sweep");
    assert_eq!(d.job(named)["name"], "lr sweep, run 2");
    let list = stdout(&mezod_at(&d, &["status"]));
    assert!(
        list.contains("sst2-sweep —") && list.contains("lr sweep, run 2 —"),
        "{list}"
    );

    // Filters: by state, by user (name or uid), and the newest N ended.
    let ids = |args: &[&str]| -> Vec<u64> {
        let mut all = vec!["status", "--json"];
        all.extend(args);
        let out = mezod_at(&d, &all);
        assert!(out.status.success(), "{}", stderr(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].as_u64().unwrap())
            .collect()
    };
    let me = unsafe { libc::geteuid() }.to_string();
    assert_eq!(ids(&[]), vec![plain, named]);
    assert_eq!(ids(&["--state", "done"]), vec![plain, named]);
    assert_eq!(ids(&["--state", "failed,cancelled"]), Vec::<u64>::new());
    assert_eq!(ids(&["--user", &me]), vec![plain, named]);
    assert_eq!(ids(&["--user", "65534"]), Vec::<u64>::new());
    assert_eq!(ids(&["--last", "1"]), vec![named]);
    let bad = mezod_at(&d, &["status", "--state", "finished"]);
    assert!(
        !bad.status.success() && stderr(&bad).contains("the states are"),
        "{}",
        stderr(&bad)
    );
    let nobody = mezod_at(&d, &["status", "--user", "no-such-user-here"]);
    assert!(!nobody.status.success() && stderr(&nobody).contains("no user"));

    // One job in detail.
    let detail = stdout(&mezod_at(&d, &["status", &plain.to_string()]));
    for want in [
        format!("job {plain}: sst2-sweep"),
        "state      done: finished".into(),
        "attempts   1 (0 failed)".into(),
        "UTC (".into(),
        format!("job file   {}", d.job_dir(plain).join("job.yaml").display()),
        format!("run folder {}", d.job_dir(plain).join("run").display()),
        "causal_lm with full tuning, 10 steps of batch 4".into(),
        "result".into(),
    ] {
        assert!(detail.contains(&want), "{want:?} not in:\n{detail}");
    }
    assert!(
        !detail.contains("Some(") && !detail.contains("None"),
        "{detail}"
    );

    // Output into a pipe that closes early: a quiet end, as other tools.
    let mut child = mezod()
        .args(["status", "--all", "--json", "--socket"])
        .arg(d.socket())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
    let shell = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{} completions bash | head -1; {} status --json --socket {} | head -1",
            env!("CARGO_BIN_EXE_mezod"),
            env!("CARGO_BIN_EXE_mezod"),
            d.socket().display()
        ))
        .output()
        .unwrap();
    assert!(shell.status.success());
    assert_eq!(stderr(&shell), "", "nothing but the lines asked for");
}

/// `cancel` takes several ids; `restart` queues a cancelled job again and it
/// resumes from its seed log (its weights equal an uninterrupted run's);
/// `logs -n` prints the end of a log; `clean` forgets ended jobs, keeping
/// their folders unless `--purge`.
#[test]
fn cancel_restart_clean_and_the_end_of_a_log() {
    let tmp = tempfile::tempdir().unwrap();
    let job = job_file(tmp.path(), "long", 240, 4);
    let expected = solo_sha(&job);
    let d = Daemon::start(tmp.path(), CONFIG);
    let long = d.submit(&job);
    let waiting = d.submit(&job_file(tmp.path(), "waiting", 10, 5));
    d.wait_steps(long, 30);
    let out = mezod_at(
        &d,
        &["cancel", &long.to_string(), &waiting.to_string(), "99"],
    );
    assert!(!out.status.success(), "job 99 does not exist");
    assert!(
        stderr(&out).contains("error: no job 99\n"),
        "{}",
        stderr(&out)
    );
    assert_eq!(d.wait_done(long)["state"], "cancelled");
    assert_eq!(d.wait_done(waiting)["state"], "cancelled");
    let at = d.job(long)["steps_done"].as_u64().unwrap();
    assert!(at >= 30);

    let out = mezod_at(&d, &["restart", &long.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!("resumes from step {at}")),
        "{}",
        stdout(&out)
    );
    let rec = d.wait_done(long);
    assert_eq!(rec["state"], "done", "{rec:#}");
    assert_eq!(rec["attempts"], 2);
    assert_eq!(d.weights_sha(long), expected, "resumed exactly");
    let log = std::fs::read_to_string(d.job_dir(long).join("worker.log")).unwrap();
    assert!(
        log.contains(&format!("--- attempt 2 on CPU, from step {at}")),
        "{log}"
    );
    let again = mezod_at(&d, &["restart", &long.to_string()]);
    assert!(!again.status.success() && stderr(&again).contains("a done job cannot be restarted"));

    // The end of a log.
    let tail = stdout(&mezod_at(&d, &["logs", &long.to_string(), "-n", "3"]));
    let last: Vec<&str> = log
        .lines()
        .rev()
        .take(3)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    assert_eq!(tail.lines().collect::<Vec<_>>(), last);

    // clean: forgotten, folders kept; --purge deletes them.
    let out = mezod_at(&d, &["clean", &waiting.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(d.jobs().iter().all(|j| j["id"] != waiting));
    assert!(d.job_dir(waiting).is_dir());
    let out = mezod_at(&d, &["clean", "--purge"]);
    assert!(
        stdout(&out).contains(&format!("1 job(s) forgotten, folders deleted: {long}")),
        "{}",
        stdout(&out)
    );
    assert!(d.jobs().is_empty() && !d.job_dir(long).exists());
    // Ids go on from where they were.
    let next = d.submit(&job_file(tmp.path(), "next", 5, 6));
    assert_eq!(next, waiting + 1);
}

/// Every argument of every command is described, with an example per command;
/// completions for three shells.
#[test]
fn help_describes_every_argument_and_completions_are_printed() {
    for shell in ["bash", "zsh", "fish"] {
        let out = check(
            mezod().args(["completions", shell]).output().unwrap(),
            "completions",
        );
        assert!(stdout(&out).contains("restart"), "{shell}");
    }
    for sub in [
        "daemon",
        "submit",
        "status",
        "cancel",
        "restart",
        "clean",
        "logs",
        "wait",
        "estimate",
        "completions",
        "run",
        "export",
        "apply",
        "forward",
        "inspect",
        "bench",
    ] {
        let help = stdout(&check(mezod().args([sub, "--help"]).output().unwrap(), sub));
        assert!(help.contains("Example"), "{sub}: no example\n{help}");
        // clap's long help: each argument's name line is followed by its description.
        // (Arguments are indented 2 to 6 columns; possible values and
        // descriptions 10.)
        let lines: Vec<&str> = help.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            let t = l.trim_start();
            let indent = l.len() - t.len();
            let names_an_argument = t.starts_with('-') || t.starts_with('<') || t.starts_with('[');
            if names_an_argument && (2..10).contains(&indent) {
                // Described on the same line (short help: a column after the
                // name) or on the next (long help).
                let same_line = t
                    .split_once("  ")
                    .is_some_and(|(_, d)| !d.trim().is_empty());
                let next_line = lines
                    .get(i + 1)
                    .is_some_and(|n| n.starts_with("          ") && !n.trim().is_empty());
                let described = same_line || next_line;
                assert!(described, "{sub}: {t:?} is not described\n{help}");
            }
        }
    }
    let top = stdout(&check(mezod().arg("--help").output().unwrap(), "help"));
    assert!(top.contains("MEZOD_LOG") && top.contains("restart") && top.contains("completions"));
    let export = stdout(&check(
        mezod().args(["export", "--help"]).output().unwrap(),
        "export",
    ));
    assert!(!export.contains("seed-log"), "{export}");
}

/// `mezod submit` of `job` with `args` after it; returns the id.
fn submit_with(d: &Daemon, job: &Path, args: &[&str]) -> u64 {
    let mut all = vec!["submit", job.to_str().unwrap()];
    all.extend(args);
    let out = mezod_at(d, &all);
    assert!(out.status.success(), "submit {args:?}: {}", stderr(&out));
    stdout(&out).trim().parse().unwrap()
}

/// Issue 25 item 6: with a free slot beside it, a job `after:` another
/// (by name in its file, or by id with `submit --after`) waits until that
/// one is done, saying what it waits for; `mezod wait` prints each job as
/// it ends and exits 0 when all ended done.
#[test]
fn a_job_after_another_starts_once_it_is_done() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let d = Daemon::start(dir, &CONFIG.replace("cpu_slots: 1", "cpu_slots: 3"));
    // Long enough (seconds) to look at the others while it runs.
    let first = d.submit(&job_file(dir, "first", 1000, 1));
    let by_name = job_file(dir, "by-name", 10, 2);
    let text = std::fs::read_to_string(&by_name).unwrap();
    std::fs::write(&by_name, format!("after: [first]\n{text}")).unwrap();
    let by_name = d.submit(&by_name);
    let by_id = submit_with(
        &d,
        &job_file(dir, "by-id", 10, 3),
        &["--after", &first.to_string()],
    );
    // Resolved to the id at intake, and the wait said while the first runs.
    d.wait_steps(first, 5);
    for id in [by_name, by_id] {
        let j = d.job(id);
        assert_eq!(j["state"], "queued", "{j:#}");
        assert_eq!(j["after"], serde_json::json!([first]), "{j:#}");
        assert_eq!(
            j["reason"],
            format!("waiting for job {first} (running)"),
            "{j:#}"
        );
    }
    let list = stdout(&mezod_at(&d, &["status"]));
    assert!(
        list.contains(&format!("by-id — waiting for job {first} (running)")),
        "{list}"
    );
    let detail = stdout(&mezod_at(&d, &["status", &by_id.to_string()]));
    assert!(
        detail.contains(&format!("waits for  job(s) {first} (after:)")),
        "{detail}"
    );
    let out = mezod_at(
        &d,
        &[
            "wait",
            &by_id.to_string(),
            &first.to_string(),
            &by_name.to_string(),
        ],
    );
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let lines: Vec<String> = stdout(&out).lines().map(str::to_string).collect();
    assert_eq!(lines[0], format!("job {first} (first): done"), "{lines:?}");
    assert_eq!(lines.len(), 3, "{lines:?}");
    for (id, name) in [(by_name, "by-name"), (by_id, "by-id")] {
        assert!(
            lines.contains(&format!("job {id} ({name}): done")),
            "{lines:?}"
        );
        let j = d.job(id);
        assert!(
            j["started_at"].as_u64().unwrap() >= d.job(first)["finished_at"].as_u64().unwrap(),
            "job {id} started before job {first} ended: {j:#}\n{:#}",
            d.job(first)
        );
    }
}

/// Issue 25 item 6: a job after one that is cancelled fails at once with
/// that reason (never queued forever); `mezod wait` exits 1 when a job did
/// not end done, 2 for an unknown id, 124 past its timeout; `submit
/// --after` of a job that does not exist is refused with the reason.
#[test]
fn a_job_after_a_cancelled_one_fails_at_once_and_wait_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let d = Daemon::start(dir, CONFIG);
    let long = d.submit(&job_file(dir, "long", 100_000, 1));
    let after = submit_with(
        &d,
        &job_file(dir, "after-long", 10, 2),
        &["--after", &long.to_string()],
    );
    d.wait_steps(long, 2);
    let out = mezod_at(&d, &["wait", &long.to_string(), "--timeout", "1"]);
    assert_eq!(out.status.code(), Some(124), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("still waiting for job {long} (running)")),
        "{}",
        stderr(&out)
    );
    let out = mezod_at(&d, &["wait", &long.to_string(), "9999"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("error: no job 9999\n"),
        "{}",
        stderr(&out)
    );
    let out = mezod_at(
        &d,
        &[
            "submit",
            job_file(dir, "nothing", 5, 3).to_str().unwrap(),
            "--after",
            "9999",
        ],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("there is no job 9999"),
        "{}",
        stderr(&out)
    );

    let waiter = mezod()
        .args(["wait", &after.to_string(), &long.to_string(), "--socket"])
        .arg(d.socket())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(mezod_at(&d, &["cancel", &long.to_string()])
        .status
        .success());
    let j = d.wait_done(after);
    assert_eq!(j["state"], "failed", "{j:#}");
    assert_eq!(
        j["reason"],
        format!("job {long} it depends on was cancelled")
    );
    assert_eq!(j["attempts"], 0, "it never started: {j:#}");
    let out = waiter.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let said = stdout(&out);
    assert!(
        said.contains(&format!("job {long} (long): cancelled")),
        "{said}"
    );
    assert!(
        said.contains(&format!(
            "job {after} (after-long): failed: job {long} it depends on was cancelled"
        )),
        "{said}"
    );
    // Both restarted (the dependency first): it waits for it again.
    for id in [long, after] {
        let out = mezod_at(&d, &["restart", &id.to_string()]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    d.wait_until("the job to wait again", |d| {
        d.job(after)["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with(&format!("waiting for job {long} (")))
    });
    assert!(mezod_at(&d, &["cancel", &long.to_string()])
        .status
        .success());
    assert_eq!(d.wait_done(after)["state"], "failed");
}

/// Issue 25 item 6: a job's `notify: {command: [...]}` runs once when the
/// job ends, done or not, with its id, name, state and run folder in its
/// environment; how it ended is at the end of the job's log.
#[test]
fn a_notify_command_runs_once_when_the_job_ends() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let d = Daemon::start(dir, CONFIG);
    let told = dir.join("told");
    let with_notify = |name: &str, steps: u64| {
        let job = job_file(dir, name, steps, 1);
        let text = std::fs::read_to_string(&job).unwrap();
        let script = format!(
            "echo \"$MEZOD_JOB_ID|$MEZOD_JOB_NAME|$MEZOD_JOB_STATE|$MEZOD_JOB_RESULT\" >> {}; \
             echo said it",
            told.display()
        );
        std::fs::write(
            &job,
            format!(
                "notify: {{command: [/bin/sh, -c, {}]}}\n{text}",
                serde_json::to_string(&script).unwrap()
            ),
        )
        .unwrap();
        d.submit(&job)
    };
    let done = with_notify("quick", 5);
    let long = d.submit(&job_file(dir, "long", 100_000, 2));
    let cancelled = with_notify("never", 5);
    assert_eq!(d.wait_done(done)["state"], "done");
    assert!(mezod_at(&d, &["cancel", &cancelled.to_string()])
        .status
        .success());
    assert!(mezod_at(&d, &["cancel", &long.to_string()])
        .status
        .success());
    d.wait_until("both notify commands", |_| {
        std::fs::read_to_string(&told).is_ok_and(|t| t.lines().count() >= 2)
    });
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let lines: Vec<String> = std::fs::read_to_string(&told)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(
        lines,
        vec![
            format!(
                "{done}|quick|done|{}",
                d.job_dir(done).join("run").display()
            ),
            format!(
                "{cancelled}|never|cancelled|{}",
                d.job_dir(cancelled).join("run").display()
            ),
        ],
        "once per job, when it ends"
    );
    d.wait_until("the notify lines in the log", |d| {
        std::fs::read_to_string(d.job_dir(done).join("worker.log"))
            .is_ok_and(|l| l.contains("--- notify: /bin/sh exited with status 0"))
    });
    let log = std::fs::read_to_string(d.job_dir(done).join("worker.log")).unwrap();
    assert!(log.ends_with("its output: ---\nsaid it\n"), "{log}");
}

/// The samples of a Prometheus text-format file (0.0.4), each as
/// (name, labels as written, value), checked line by line as a scraper
/// reads it: every sample's family has its HELP and TYPE lines before it,
/// a family's samples come together, no series twice, label values quoted
/// with only `\\`, `\"` and `\n` escaped, values numbers.
fn parse_prometheus_text(text: &str) -> Vec<(String, String, f64)> {
    use std::collections::HashSet;
    assert!(text.ends_with('\n'), "the last line must end: {text:?}");
    let is_name = |n: &str| {
        !n.is_empty()
            && !n.starts_with(|c: char| c.is_ascii_digit())
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    let (mut helped, mut typed) = (HashSet::new(), HashSet::new());
    let (mut finished, mut series) = (HashSet::new(), HashSet::new());
    let mut current: Option<String> = None;
    let mut samples = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let at = format!("line {}: {line:?}", i + 1);
        if let Some(rest) = line.strip_prefix("# ") {
            let mut words = rest.splitn(3, ' ');
            let (kw, name) = (words.next().unwrap(), words.next().unwrap_or(""));
            assert!(is_name(name), "{at}");
            match kw {
                "HELP" => assert!(helped.insert(name.to_string()), "HELP twice, {at}"),
                "TYPE" => {
                    let kind = words.next().unwrap_or("");
                    assert!(["gauge", "counter", "untyped"].contains(&kind), "{at}");
                    assert!(kind != "counter" || name.ends_with("_total"), "{at}");
                    assert!(typed.insert(name.to_string()), "TYPE twice, {at}");
                }
                _ => panic!("{at}"),
            }
            continue;
        }
        assert!(!line.is_empty() && !line.starts_with('#'), "{at}");
        let end = line.find(['{', ' ']).expect(&at);
        let name = &line[..end];
        assert!(is_name(name), "{at}");
        assert!(
            helped.contains(name) && typed.contains(name),
            "no HELP/TYPE before, {at}"
        );
        if current.as_deref() != Some(name) {
            if let Some(prev) = current.replace(name.to_string()) {
                finished.insert(prev);
            }
            assert!(!finished.contains(name), "family split, {at}");
        }
        let mut rest = &line[end..];
        let mut labels = String::new();
        if let Some(inner) = rest.strip_prefix('{') {
            let mut chars = inner.char_indices();
            let mut names = HashSet::new();
            loop {
                let mut label = String::new();
                for (_, c) in chars.by_ref() {
                    if c == '=' {
                        break;
                    }
                    label.push(c);
                }
                assert!(
                    is_name(&label) && names.insert(label.clone()),
                    "label name, {at}"
                );
                assert_eq!(chars.next().map(|(_, c)| c), Some('"'), "{at}");
                let mut escaped = false;
                for (_, c) in chars.by_ref() {
                    match (escaped, c) {
                        (true, '\\' | '"' | 'n') => escaped = false,
                        (true, _) => panic!("bad escape, {at}"),
                        (false, '\\') => escaped = true,
                        (false, '"') => break,
                        (false, '\n') => panic!("{at}"),
                        _ => {}
                    }
                }
                match chars.next() {
                    Some((_, ',')) => continue,
                    Some((j, '}')) => {
                        labels = inner[..j].to_string();
                        rest = &inner[j + 1..];
                        break;
                    }
                    other => panic!("{other:?}, {at}"),
                }
            }
        }
        let value = rest.strip_prefix(' ').expect(&at);
        let v: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().expect(&at),
        };
        assert!(
            series.insert(format!("{name}{{{labels}}}")),
            "series twice, {at}"
        );
        samples.push((name.to_string(), labels, v));
    }
    samples
}

/// Issue 25 item 8: with `metrics_file:` the daemon keeps a Prometheus text
/// file for node-exporter's textfile collector: well-formed line by line,
/// world-readable, with the job that ended counted under its owner's name,
/// and `mezod_up 0` once the daemon has stopped.
#[test]
fn the_metrics_file_counts_jobs_for_node_exporter() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let collector = dir.join("textfile_collector");
    std::fs::create_dir(&collector).unwrap();
    let prom = collector.join("mezod.prom");
    let mut d = Daemon::start(dir, &format!("{CONFIG}metrics_file: {}\n", prom.display()));
    d.wait_until("the metrics file at start", |_| prom.exists());
    let id = d.submit(&job_file(dir, "counted", 5, 1));
    assert_eq!(d.wait_done(id)["state"], "done");
    let me = String::from_utf8(
        std::process::Command::new("id")
            .arg("-un")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .to_string();
    let done_line = format!("mezod_jobs{{state=\"done\",user=\"{me}\"}} 1");
    // Rewritten every 15 s.
    d.wait_until("the job in the metrics file", |_| {
        std::fs::read_to_string(&prom).is_ok_and(|t| t.lines().any(|l| l == done_line))
    });
    let text = std::fs::read_to_string(&prom).unwrap();
    let samples = parse_prometheus_text(&text);
    let value = |name: &str, labels: &str| {
        samples
            .iter()
            .find(|(n, l, _)| n == name && l == labels)
            .map(|s| s.2)
    };
    assert_eq!(value("mezod_up", ""), Some(1.0), "{text}");
    assert_eq!(
        value("mezod_jobs", &format!("state=\"queued\",user=\"{me}\"")),
        Some(0.0),
        "every state of a user with jobs, zeros too: {text}"
    );
    assert!(
        value("mezod_pool_total_bytes", "pool=\"CPU\"").is_some_and(|v| v > 0.0),
        "{text}"
    );
    assert_eq!(value("mezod_pool_running_jobs", "pool=\"CPU\""), Some(0.0));
    assert!(
        value("mezod_user_usage_device_seconds", &format!("user=\"{me}\""))
            .is_some_and(|v| v > 0.0),
        "the job's time is in fair share: {text}"
    );
    assert_eq!(value("mezod_intake_backlog", ""), Some(0.0));
    assert!(value("mezod_preemptions_total", "").is_some(), "{text}");
    assert_eq!(
        std::fs::metadata(&prom).unwrap().permissions().mode() & 0o777,
        0o644
    );
    let left: Vec<_> = std::fs::read_dir(&collector)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        left,
        vec![std::ffi::OsString::from("mezod.prom")],
        "no temporary left"
    );
    let (status, _) = d.term();
    assert!(status.success());
    let text = std::fs::read_to_string(&prom).unwrap();
    assert_eq!(
        value_of(&parse_prometheus_text(&text), "mezod_up"),
        Some(0.0),
        "{text}"
    );
}

fn value_of(samples: &[(String, String, f64)], name: &str) -> Option<f64> {
    samples.iter().find(|(n, _, _)| n == name).map(|s| s.2)
}
