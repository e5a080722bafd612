//! The README's command blocks marked `sh test:NAME` run here exactly as
//! written — read from README.md, not copied — so the README cannot drift
//! from what mezod does.  They run as a user types them: with `sh`, from a
//! folder shaped like the repository root (its `examples/` and `tests/`
//! linked in, so every relative path means what it means there, while the
//! `runs/` they write stays out of the checkout), with `target/release` on
//! `PATH`.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The commands of the README block marked `test:NAME`: comments dropped,
/// one command per line.
fn readme_block(name: &str) -> Vec<String> {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let mut lines = readme.lines();
    let marker = format!("test:{name}");
    lines
        .find(|l| l.starts_with("```") && l.split_whitespace().any(|w| w == marker))
        .unwrap_or_else(|| panic!("README.md has no block marked {marker}"));
    lines
        .take_while(|l| !l.starts_with("```"))
        .map(strip_comment)
        .filter(|l| !l.is_empty())
        .collect()
}

/// A shell line without its `# comment` (a `#` inside quotes is text).
fn strip_comment(line: &str) -> String {
    let mut quote = None;
    for (i, c) in line.char_indices() {
        match (c, quote) {
            ('"' | '\'', None) => quote = Some(c),
            (q, Some(open)) if q == open => quote = None,
            ('#', None) if i == 0 || line[..i].ends_with(char::is_whitespace) => {
                return line[..i].trim().to_string()
            }
            _ => {}
        }
    }
    line.trim().to_string()
}

/// A folder shaped like the repository root for the README's relative paths.
fn repo_like_root() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["examples", "tests"] {
        std::os::unix::fs::symlink(root().join(name), tmp.path().join(name)).unwrap();
    }
    tmp
}

/// `sh -c LINE` in `dir` with the built binaries first on PATH.
fn shell(dir: &Path, line: &str) -> Command {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_mezod"));
    let path = format!(
        "{}:{}",
        bin.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(line)
        .current_dir(dir)
        .env("PATH", path)
        .env("MEZOD_LOG", "info");
    c
}

fn run_line(dir: &Path, line: &str) -> std::process::Output {
    run_line_as(dir, line, None)
}

/// `run_line` as `user` (see [`as_user`]); `None`: as the test's own user.
fn run_line_as(dir: &Path, line: &str, user: Option<u32>) -> std::process::Output {
    let what = match user {
        Some(uid) => format!("{line} (as uid {uid})"),
        None => line.to_string(),
    };
    check(as_user(shell(dir, line), user).output().unwrap(), &what)
}

#[test]
fn quick_start_interrupted_and_resumed_by_the_printed_command_then_exported_and_applied() {
    let tmp = repo_like_root();
    let dir = tmp.path();
    let quick = readme_block("quick-start");
    assert_eq!(quick.len(), 3, "{quick:?}");
    let forward = run_line(dir, &quick[0]);
    assert!(String::from_utf8_lossy(&forward.stdout).contains("mean next-token cross-entropy"));
    let inspect = run_line(dir, &quick[1]);
    assert!(String::from_utf8_lossy(&inspect.stdout).contains("answer words"));

    // The run, stopped by Ctrl-C (SIGINT) part way.
    let run_cmd = &quick[2];
    let out_dir = run_cmd
        .split_whitespace()
        .skip_while(|w| *w != "--out")
        .nth(1)
        .expect("the run names its --out");
    let run = dir.join(out_dir);
    let mut child = shell(dir, &format!("exec {run_cmd}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(
        wait_for_steps(&mut child, &run, 20),
        "the run stopped early"
    );
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let stopped = child.wait_with_output().unwrap();
    assert_eq!(stopped.status.code(), Some(130), "Ctrl-C exits 130");
    let said = String::from_utf8_lossy(&stopped.stderr);
    let resume = said
        .lines()
        .find_map(|l| l.split("Resume with: ").nth(1))
        .unwrap_or_else(|| panic!("no resume command printed: {said}"))
        .trim()
        .to_string();
    assert_eq!(&resume, run_cmd, "the resume command is the command typed");
    run_line(dir, &resume);

    // The same job uninterrupted, beside it: the same weights, byte for byte.
    let solo_cmd = run_cmd.replace(out_dir, "runs/solo");
    run_line(dir, &solo_cmd);
    let weights = |run: &Path| sha256(&run.join("model/model.safetensors"));
    assert_eq!(weights(&run), weights(&dir.join("runs/solo")));

    // Export and apply as the README writes them: the model rebuilt bit for bit.
    let export_apply = readme_block("export-apply");
    assert_eq!(export_apply.len(), 2, "{export_apply:?}");
    for line in &export_apply {
        run_line(dir, line);
    }
    let applied = export_apply[1]
        .split_whitespace()
        .skip_while(|w| *w != "-o")
        .nth(1)
        .unwrap();
    assert_eq!(
        sha256(&dir.join(applied).join("model.safetensors")),
        weights(&run),
        "apply rebuilds the run's exported weights"
    );
}

/// The `-o`/`--out` folder a README command writes.
fn written_by(line: &str) -> &str {
    line.split_whitespace()
        .skip_while(|w| *w != "-o" && *w != "--out")
        .nth(1)
        .unwrap_or_else(|| panic!("{line} names no output"))
}

#[test]
fn the_estimator_examples_run_export_apply_and_estimate_as_written() {
    let tmp = repo_like_root();
    let dir = tmp.path();
    let lines = readme_block("estimators");
    assert_eq!(lines.len(), 7, "{lines:?}");
    let outputs: Vec<_> = lines.iter().map(|l| run_line(dir, l)).collect();

    let fzoo = dir.join(written_by(&lines[0]));
    let steps = metrics_steps(&fzoo);
    assert_eq!(steps.len(), 60);
    for s in &steps {
        assert_eq!(
            s["more"].as_array().map(Vec::len),
            Some(7),
            "8 directions: {s}"
        );
        assert!(s["spread"].as_f64().is_some_and(|v| v > 0.0), "{s}");
    }
    let mezo_file = std::fs::read(dir.join(written_by(&lines[1]))).unwrap();
    assert!(
        String::from_utf8_lossy(&mezo_file).contains("fzoo"),
        "the .mezo file names its estimator"
    );
    assert_eq!(
        sha256(&dir.join(written_by(&lines[2])).join("model.safetensors")),
        sha256(&fzoo.join("model/model.safetensors")),
        "apply rebuilds the FZOO run's weights"
    );
    let estimate = String::from_utf8_lossy(&outputs[3].stdout);
    assert!(
        estimate.lines().any(|l| l.starts_with("mask")),
        "{estimate}"
    );
    let sparse = dir.join(written_by(&lines[4]));
    assert!(sparse.join("adapter").is_dir());
    let result = read_result(&sparse);
    assert_eq!(result["steps"], 200, "{result:#}");
    let estimate = String::from_utf8_lossy(&outputs[5].stdout);
    assert!(
        estimate.lines().any(|l| l.starts_with("factors")),
        "{estimate}"
    );
    let lozo = metrics_steps(&dir.join(written_by(&lines[6])));
    assert_eq!(lozo.len(), 60);
    let basis: Vec<u64> = lozo.iter().map(|s| s["basis"].as_u64().unwrap()).collect();
    assert!(basis[..20].iter().all(|&b| b == basis[0]), "{basis:?}");
    assert!(
        basis[20] != basis[19] && basis[40] != basis[39],
        "{basis:?}"
    );
}

#[test]
fn comments_are_dropped_but_quoted_hashes_kept() {
    assert_eq!(strip_comment("mezod status   # the queue"), "mezod status");
    assert_eq!(
        strip_comment("mezod forward --text \"a # b\" # c"),
        "mezod forward --text \"a # b\""
    );
    assert_eq!(strip_comment("# only a comment"), "");
}

/// Stops a background command of a README block when the test ends, however it ends.
struct Background(std::process::Child);

impl Drop for Background {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

/// The README's daemon session as a user types it in `dir`: `mezod daemon &`
/// as the test's own user (root), every other line as `user` (the test's
/// own user when `None`), each in its own shell, the `export` lines holding
/// for the lines after them as in the user's shell.
struct DaemonSession {
    /// Each line run, beside what it printed on stdout.
    said: Vec<(String, String)>,
    /// The session's `export` lines, as a prefix for more lines.
    exports: String,
    user: Option<u32>,
    /// Last, so the daemon stops only after everything above.
    _daemon: Background,
}

impl DaemonSession {
    fn run(dir: &Path, user: Option<u32>) -> Self {
        let session = readme_block("daemon");
        let mut daemon = None;
        let mut said = Vec::new();
        let mut exports = String::new();
        for line in &session {
            if line.starts_with("export ") {
                exports.push_str(&format!("{line}; "));
                continue;
            }
            if let Some(background) = line.strip_suffix('&') {
                let child = shell(dir, &format!("exec {}", background.trim()))
                    .stderr(std::fs::File::create(dir.join("daemon.log")).unwrap())
                    .spawn()
                    .unwrap();
                daemon = Some(Background(child));
                // Its socket is ./var/run/mezod.sock once it serves.
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
                while !dir.join("var/run/mezod.sock").exists() {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "the daemon did not start"
                    );
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                continue;
            }
            let out = run_line_as(dir, &format!("{exports}{line}"), user);
            said.push((
                line.clone(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
            ));
        }
        assert!(
            exports.contains("MEZOD_SOCKET"),
            "the session names the daemon's socket: clients never take one from the current folder"
        );
        Self {
            said,
            exports,
            user,
            _daemon: daemon.expect("the session starts a daemon"),
        }
    }

    /// What the session's line starting with `prefix` printed.
    fn output_of(&self, prefix: &str) -> &str {
        &self
            .said
            .iter()
            .find(|(l, _)| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` in the session"))
            .1
    }

    /// One more line in the session's shell, as its user.
    fn then(&self, dir: &Path, line: &str) -> std::process::Output {
        run_line_as(dir, &format!("{}{line}", self.exports), self.user)
    }

    /// What every run of the session must show: the ids printed, job 1's
    /// log and detail, the completions written, and job 2, cancelled and
    /// restarted, run to its end.
    fn check_as_written(&self, dir: &Path) {
        assert_eq!(
            self.output_of("mezod submit examples/causal-lm.yaml")
                .trim(),
            "1"
        );
        assert_eq!(
            self.output_of("mezod submit examples/classification.yaml")
                .trim(),
            "2"
        );
        assert!(self.output_of("mezod logs 1 --follow").contains("done"));
        let detail = self.output_of("mezod status 1");
        assert!(
            detail.contains("causal-lm") && detail.contains("done"),
            "{detail}"
        );
        assert!(std::fs::read_to_string(dir.join("mezod.bash"))
            .unwrap()
            .contains("complete"));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
        loop {
            let out = self.then(dir, "mezod status 2 --json");
            let job: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let state = job["state"]["state"]
                .as_str()
                .or(job["state"].as_str())
                .unwrap_or_default()
                .to_string();
            if state == "done" {
                break;
            }
            assert!(
                !["failed", "cancelled"].contains(&state.as_str()),
                "job 2 ended {state}: {job}"
            );
            assert!(
                std::time::Instant::now() < deadline,
                "job 2 did not finish: {job}"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
}

/// `cmd` as `user` (its own group and no other, as std sets them when root
/// switches), with that user's `HOME`, `USER` and `LOGNAME`, as `su` gives.
fn as_user(mut cmd: Command, user: Option<u32>) -> Command {
    use std::os::unix::process::CommandExt;
    if let Some(uid) = user {
        let pw = unsafe { libc::getpwuid(uid) };
        assert!(!pw.is_null(), "no user {uid} in the user database");
        let field = |p: *const libc::c_char| {
            unsafe { std::ffi::CStr::from_ptr(p) }
                .to_string_lossy()
                .into_owned()
        };
        let (name, home, gid) =
            unsafe { (field((*pw).pw_name), field((*pw).pw_dir), (*pw).pw_gid) };
        cmd.uid(uid)
            .gid(gid)
            .env("HOME", home)
            .env("USER", &name)
            .env("LOGNAME", &name);
    }
    cmd
}

#[test]
fn the_daemon_session_runs_as_written() {
    let tmp = repo_like_root();
    let dir = tmp.path();
    DaemonSession::run(dir, None).check_as_written(dir);
}

/// Issue 25 item 1: the same session with the daemon as root and every
/// other line as user 65534 (nobody), in a folder of that user's, as on a
/// shared server; a normal user's `submit` once exited 1 on every call.
#[test]
fn the_daemon_session_runs_as_written_for_a_normal_user() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    const NOBODY: u32 = 65534;
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test plays root (the daemon) and another user: run it as root"
    );
    let tmp = repo_like_root();
    let dir = tmp.path();
    // The user's own folder: it writes `mezod.bash` there, the root daemon `var/`.
    std::os::unix::fs::chown(dir, Some(NOBODY), Some(NOBODY)).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let session = DaemonSession::run(dir, Some(NOBODY));
    session.check_as_written(dir);

    // The jobs are the user's, and its lines ran as that user.
    assert!(
        session.output_of("mezod status 1").contains("(uid 65534)"),
        "{}",
        session.output_of("mezod status 1")
    );
    let out = session.then(dir, "mezod status --all --json");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let jobs = status["jobs"].as_array().unwrap();
    assert!(
        jobs.iter().any(|j| j["id"] == 2),
        "job 2 is listed: {status:#}"
    );
    for job in jobs {
        assert_eq!(job["owner_uid"], NOBODY, "{job:#}");
    }
    for id in [1, 2] {
        let run = dir.join(format!("var/state/jobs/{id}/run"));
        assert_eq!(
            std::fs::metadata(&run).unwrap().uid(),
            NOBODY,
            "job {id}'s run folder"
        );
    }
    assert_eq!(
        std::fs::metadata(dir.join("mezod.bash")).unwrap().uid(),
        NOBODY
    );
}

/// `make demo-small`'s commands, read from the Makefile, run as written.
#[test]
fn make_demo_small_runs_as_written() {
    let makefile = std::fs::read_to_string(root().join("Makefile")).unwrap();
    let recipe: Vec<String> = makefile
        .lines()
        .skip_while(|l| !l.starts_with("demo-small:"))
        .skip(1)
        .take_while(|l| l.starts_with('\t'))
        .filter(|l| l.contains("$(MEZOD)"))
        .map(|l| l.trim().replace("$(MEZOD)", "mezod"))
        .collect();
    assert_eq!(recipe.len(), 2, "{recipe:?}");
    let tmp = repo_like_root();
    for line in &recipe {
        run_line(tmp.path(), line);
        let out = line
            .split_whitespace()
            .skip_while(|w| *w != "--out")
            .nth(1)
            .unwrap();
        let run = tmp.path().join(out);
        for file in [
            "result.json",
            "metrics.jsonl",
            "loss.svg",
            "model/model.safetensors",
        ] {
            assert!(run.join(file).is_file(), "{line}: no {file}");
        }
    }
}

#[test]
fn the_replicas_section_runs_as_written_and_matches_one_process() {
    let tmp = repo_like_root();
    let dir = tmp.path();
    let lines = readme_block("replicas");
    assert_eq!(lines.len(), 2, "{lines:?}");
    for line in &lines {
        let out = run_line(dir, line);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("done: 100 steps"),
            "{line}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // The same job in one process: the same weights, byte for byte.
    let alone = weights_without(
        dir,
        "examples/replicas.yaml",
        "parallel: {replicas: 2}\n",
        "",
    );
    let weights = |run: &str| sha256(&dir.join(run).join("model/model.safetensors"));
    assert_eq!(weights(written_by(&lines[0])), alone);
    assert_eq!(weights(written_by(&lines[1])), alone);
}

/// The weights of `example` run in `dir` with `what` replaced by `with`
/// (the job without its parallelism): SHA-256 of its exported model.
fn weights_without(dir: &Path, example: &str, what: &str, with: &str) -> String {
    let text = std::fs::read_to_string(root().join(example)).unwrap();
    let alone = text.replace(what, with);
    assert_ne!(alone, text, "{example} has no {what:?}");
    std::fs::write(
        dir.join("alone.yaml"),
        alone
            .replace("../tests/", "tests/")
            .replace("train: data/", "train: examples/data/"),
    )
    .unwrap();
    run_line(dir, "mezod run alone.yaml --out runs/alone");
    sha256(&dir.join("runs/alone/model/model.safetensors"))
}

#[test]
fn the_split_section_runs_as_written_and_matches_one_device() {
    let tmp = repo_like_root();
    let dir = tmp.path();
    let lines = readme_block("split");
    assert_eq!(lines.len(), 2, "{lines:?}");
    let estimate = String::from_utf8_lossy(&run_line(dir, &lines[0]).stdout).to_string();
    assert!(estimate.contains("split over 2 devices"), "{estimate}");
    let out = run_line(dir, &lines[1]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("done: 50 steps"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The same job on one device: the same weights, byte for byte.
    let alone = weights_without(dir, "examples/split.yaml", ", device: [cpu, cpu]}", "}");
    let split = sha256(
        &dir.join(written_by(&lines[1]))
            .join("model/model.safetensors"),
    );
    assert_eq!(split, alone);
}
