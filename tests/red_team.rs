//! A root daemon against a local attacker: user 65534 (and 65533 as a second,
//! nosy user) with only ordinary shell commands, symlinks, FIFOs and hostile
//! names.  Each test is one promise of docs/security.md.
//!
//! These tests need root (to be the daemon's root and to become other users);
//! CI runs as root, so they fail rather than skip without it.

mod common;
use common::daemon::*;
use common::*;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const CONFIG: &str =
    "cpu_slots: 1\nretry_limit: 1\nretry_backoff_s: 0.2\nrescan_interval_s: 1\nmemory_margin_mib: 64\n";
const NOBODY: u32 = 65534;
const NOSY: u32 = 65533;
const SECRET: &str = "LEAK-root-only-value-42";

fn need_root() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the red-team tests play root and other users: run them as root"
    );
}

/// A temporary folder other users may pass through, with a root-only secret
/// in `secret/private` (a folder of 0700, a file of 0600).
fn arena() -> (tempfile::TempDir, PathBuf) {
    need_root();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let dir = tmp.path().join("secret");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let secret = dir.join("private");
    std::fs::write(&secret, format!("{{\"metric\": \"{SECRET}\"}}\n")).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    (tmp, secret)
}

/// `sh -c script` as `uid` (its own group, no others).
fn shell_as(uid: u32, script: &str) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .uid(uid)
        .gid(uid)
        .output()
        .unwrap()
}

/// `mezod ARGS --socket S` as `uid`.
fn mezod_as(uid: u32, d: &Daemon, args: &[&str]) -> Output {
    mezod()
        .args(args)
        .arg("--socket")
        .arg(d.socket())
        .uid(uid)
        .gid(uid)
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn owner_and_mode(path: &Path) -> (u32, u32) {
    let m = std::fs::symlink_metadata(path).unwrap();
    (m.uid(), m.mode() & 0o7777)
}

/// The example reviews, the training data of `job_file`'s jobs.
fn reviews() -> String {
    root()
        .join("examples/data/reviews.jsonl")
        .display()
        .to_string()
}

/// A causal-LM job file `dir/name.yaml` (see [`job_file`]) on a copy of the
/// llama fixture anyone may read (`dir/name-model`), as another user's job
/// needs: the fixture's own folder is the repository's.
fn readable_job(dir: &Path, name: &str, steps: u64, seed: u64) -> PathBuf {
    let job = job_file(dir, name, steps, seed);
    let model = model_copy(dir, &format!("{name}-model"), 0o644);
    let text = std::fs::read_to_string(&job).unwrap().replace(
        &fixture("llama").display().to_string(),
        &model.display().to_string(),
    );
    std::fs::write(&job, text).unwrap();
    job
}

/// Drop a job of user 65534 on a model copy anyone may read, training on
/// `data` (default: the example reviews); returns its id once taken.
fn drop_nobody_job(d: &Daemon, dir: &Path, name: &str, steps: u64, data: Option<&Path>) -> u64 {
    let job = readable_job(dir, name, steps, 1);
    if let Some(data) = data {
        let text = std::fs::read_to_string(&job).unwrap();
        std::fs::write(&job, text.replace(&reviews(), &data.display().to_string())).unwrap();
    }
    let before = d.jobs().len();
    drop_as_nobody(d, &job, &format!("{name}.yaml"));
    d.wait_until("the job to be taken", |d| d.jobs().len() == before + 1);
    d.jobs()[before]["id"].as_u64().unwrap()
}

/// A job of user 65534 on the example reviews; returns its id once ended.
fn nobody_job(d: &Daemon, dir: &Path, name: &str, steps: u64) -> u64 {
    let id = drop_nobody_job(d, dir, name, steps, None);
    d.wait_done(id);
    id
}

/// Items 1, 2, 8 and 10: an owner reaches its results and nothing of the
/// daemon's: it cannot plant links in its job folder (so the daemon never
/// follows one), read the daemon's copy of its job or anyone's log directly,
/// or swap the job file the worker runs; another user reads none of it.
#[test]
fn an_owner_reaches_its_results_and_nothing_of_the_daemons() {
    let (tmp, secret) = arena();
    let d = Daemon::start(tmp.path(), CONFIG);
    let id = nobody_job(&d, tmp.path(), "mine", 3);
    assert_eq!(d.job(id)["state"], "done", "{:#}", d.job(id));
    let dir = d.job_dir(id);
    let state = tmp.path().join("state");

    // Modes: the daemon's folders and files are its own; run/ is the owner's.
    assert_eq!(owner_and_mode(&state), (0, 0o711));
    assert_eq!(owner_and_mode(&state.join("db")), (0, 0o700));
    assert_eq!(owner_and_mode(&state.join("jobs")), (0, 0o711));
    assert_eq!(owner_and_mode(&dir), (0, 0o711));
    for f in ["job.yaml", "worker.log"] {
        assert_eq!(owner_and_mode(&dir.join(f)), (0, 0o600), "{f}");
    }
    assert_eq!(owner_and_mode(&dir.join("run")), (NOBODY, 0o700));
    for s in ["cur", "rejected"] {
        assert_eq!(owner_and_mode(&d.spool().join(s)), (0, 0o700), "spool/{s}");
    }

    // The owner, with a shell: its results yes, the daemon's files no.
    let d_ = dir.display();
    let ok = shell_as(
        NOBODY,
        &format!("ls {d_}/run/model && head -c 20 {d_}/run/result.json"),
    );
    assert!(ok.status.success(), "{}", text(&ok));
    for attack in [
        format!("ln -s {} {d_}/worker.log.new", secret.display()),
        format!("rm -f {d_}/worker.log"),
        format!("echo 'mezo: {{steps: 7}}' > {d_}/job.yaml"),
        format!("mv {d_}/run {d_}/run.old"),
        format!("cat {d_}/job.yaml"),
        format!("cat {d_}/worker.log"),
        format!("ls {d_}"),
        format!("ls {}", state.join("db").display()),
        format!("ls {}", d.spool().join("cur").display()),
        format!("ls {}", d.spool().join("rejected").display()),
    ] {
        let out = shell_as(NOBODY, &attack);
        assert!(
            !out.status.success(),
            "user {NOBODY} could: {attack}\n{}",
            text(&out)
        );
        assert!(
            text(&out).contains("Permission denied"),
            "{attack}: {}",
            text(&out)
        );
    }
    // Another user: not even the results.
    let out = shell_as(NOSY, &format!("ls {d_}/run"));
    assert!(
        !out.status.success(),
        "user {NOSY} listed another user's results"
    );

    // The only place the owner can plant links is its own run/: links to the
    // secret there reach nobody but the owner itself.
    let plant = shell_as(
        NOBODY,
        &format!(
            "cd {d_}/run && rm -f result.json && ln -s {s} result.json && ln -s {s} worker.log",
            s = secret.display()
        ),
    );
    assert!(plant.status.success(), "{}", text(&plant));
    // `mezod logs` (as the owner): the job's log, never the secret.
    let logs = mezod_as(NOBODY, &d, &["logs", &id.to_string()]);
    assert!(logs.status.success(), "{}", text(&logs));
    assert!(text(&logs).contains("--- attempt 1"), "{}", text(&logs));
    assert!(!text(&logs).contains(SECRET));
    // Another user's `mezod logs` is refused.
    let nosy = mezod_as(NOSY, &d, &["logs", &id.to_string()]);
    assert!(
        !nosy.status.success() && text(&nosy).contains("only its owner"),
        "{}",
        text(&nosy)
    );
    // And the status the daemon shows never holds the secret.
    let status = mezod_as(NOBODY, &d, &["status", "--json"]);
    assert!(!text(&status).contains(SECRET));
    assert_eq!(
        std::fs::read_to_string(&secret).unwrap().contains(SECRET),
        true
    );
    assert_eq!(
        owner_and_mode(&secret),
        (0, 0o600),
        "the secret kept its owner and mode"
    );
}

/// Item 1: a job whose attempts fail, with its owner planting links and
/// FIFOs wherever it can between attempts: every root-owned file keeps its
/// owner, mode and content, and the job still ends (failed, with its log).
#[test]
fn links_planted_between_attempts_take_nothing_over() {
    let (tmp, secret) = arena();
    let victims: Vec<PathBuf> = (0..3)
        .map(|i| {
            let p = tmp.path().join("secret").join(format!("victim{i}"));
            std::fs::write(&p, "root's file\n").unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
            p
        })
        .collect();
    // A job whose worker crashes at every attempt (at its first snapshot's
    // hash), so the daemon retries it: a job's own error would fail at once.
    let d = Daemon::start_with_env(
        tmp.path(),
        CONFIG,
        &[("FAILPOINTS", "snapshot-before-hash=return".into())],
    );
    let id = drop_nobody_job(&d, tmp.path(), "failing", 30, None);
    let run = d.job_dir(id).join("run");
    // While it retries, plant links to root's files under every name the
    // daemon or the worker might use, in the job folder (refused now: older
    // versions gave it to the owner) and in run/, the one the owner may write.
    let plant = format!(
        "for d in {} {}; do cd $d || continue; for n in worker.log replay.bin error result.json spec.yaml; do \
         ln -sf {} $n 2>/dev/null; done; ln -sf {} log.jsonl 2>/dev/null; \
         ln -sf {} .result.json.partial 2>/dev/null; done; true",
        d.job_dir(id).display(),
        run.display(),
        victims[0].display(),
        victims[1].display(),
        victims[2].display()
    );
    for _ in 0..20 {
        shell_as(NOBODY, &plant);
        if d.job(id)["state"] == "failed" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let rec = d.wait_done(id);
    assert_eq!(rec["state"], "failed", "{rec:#}");
    assert!(
        rec["failures"].as_u64().unwrap() >= 2,
        "it was retried: {rec:#}"
    );
    for v in victims.iter().chain([&secret]) {
        assert_eq!(owner_and_mode(v), (0, 0o600), "{}", v.display());
        let content = std::fs::read_to_string(v).unwrap();
        assert!(
            content == "root's file\n" || content.contains(SECRET),
            "{} was written: {content:?}",
            v.display()
        );
    }
    let error = std::fs::read_to_string(d.job_dir(id).join("error")).unwrap();
    assert!(error.contains("last lines of its log"), "{error}");
    assert!(!error.contains(SECRET));
}

/// Items 9 and 11: intake checks a job as its owner would see it, so a root
/// daemon tells no user whether a root-only file exists, how big it is or
/// what it says; a model the owner may read runs, as the owner.
#[test]
fn intake_sees_only_what_the_owner_may_see() {
    let (tmp, secret) = arena();
    let quoted = secret.with_file_name("quoted.json");
    std::fs::write(&quoted, format!("\"{SECRET}\"")).unwrap();
    std::fs::set_permissions(&quoted, std::fs::Permissions::from_mode(0o600)).unwrap();
    let hidden_model = model_copy(&secret.parent().unwrap(), "model", 0o644);
    let d = Daemon::start(tmp.path(), CONFIG);

    let id = nobody_job(&d, tmp.path(), "readable", 3);
    assert_eq!(d.job(id)["state"], "done", "{:#}", d.job(id));
    assert_eq!(
        owner_and_mode(&d.job_dir(id).join("run/result.json")).0,
        NOBODY
    );

    let job = job_file(tmp.path(), "probe", 3, 1);
    let text_ = std::fs::read_to_string(&job).unwrap();
    let llama = fixture("llama").display().to_string();
    let private_weights = model_copy(tmp.path(), "private-model", 0o600);
    let probes = [
        (
            "private-weights",
            text_.replace(&llama, &private_weights.display().to_string()),
        ),
        (
            "hidden-model",
            text_.replace(&llama, &hidden_model.display().to_string()),
        ),
        (
            "secret-data",
            text_.replace(&reviews(), &secret.display().to_string()),
        ),
        (
            "secret-config",
            text_.replace(
                &format!("path: {llama}"),
                &format!("config: {}, init: random", quoted.display()),
            ),
        ),
    ];
    for (name, body) in &probes {
        let f = tmp.path().join(format!("{name}.yaml"));
        std::fs::write(&f, body).unwrap();
        drop_as_nobody(&d, &f, &format!("{name}.yaml"));
    }
    let error = |name: &str| {
        d.spool()
            .join("rejected")
            .join(format!("{name}.yaml.error"))
    };
    d.wait_until("every probe to be rejected", |_| {
        probes.iter().all(|(name, _)| error(name).is_file())
    });
    for (name, _) in &probes {
        let why = std::fs::read_to_string(error(name)).unwrap();
        assert!(!why.contains(SECRET), "{name}: {why}");
        assert!(
            why.contains("Permission denied") || why.contains("not a file you can read"),
            "{name}: {why}"
        );
        assert!(!why.contains("does not exist"), "{name}: {why}");
    }
    assert_eq!(d.jobs().len(), 1, "no probe became a job");
}

/// Item 11: a job runs with its owner's supplementary groups, so a dataset
/// readable only by one of them is readable by the job.
#[test]
fn a_job_runs_with_its_owners_supplementary_groups() {
    let (tmp, _) = arena();
    let group = Group::new_with_member("nobody");
    let data_dir = tmp.path().join("group-data");
    std::fs::create_dir(&data_dir).unwrap();
    let data = data_dir.join("reviews.jsonl");
    std::fs::copy(reviews(), &data).unwrap();
    std::os::unix::fs::chown(&data_dir, Some(0), Some(group.gid)).unwrap();
    std::os::unix::fs::chown(&data, Some(0), Some(group.gid)).unwrap();
    std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o750)).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o640)).unwrap();
    let d = Daemon::start(tmp.path(), CONFIG);
    let id = drop_nobody_job(&d, tmp.path(), "grouped", 2, Some(&data));
    let rec = d.wait_done(id);
    assert_eq!(
        rec["state"],
        "done",
        "{rec:#}\n{}",
        std::fs::read_to_string(d.job_dir(id).join("worker.log")).unwrap_or_default()
    );
}

/// A group that exists for one test, with `member` in it.
struct Group {
    name: String,
    gid: u32,
}

impl Group {
    fn new_with_member(member: &str) -> Self {
        Self::new(&["--users", member], "m")
    }

    /// A group with no member.
    fn new_empty() -> Self {
        Self::new(&[], "e")
    }

    fn new(args: &[&str], tag: &str) -> Self {
        let name = format!("mezodt{tag}{}", std::process::id());
        let out = Command::new("groupadd")
            .args(args)
            .arg(&name)
            .output()
            .expect("groupadd (from the passwd package) is needed");
        assert!(out.status.success(), "groupadd: {}", text(&out));
        let line = Command::new("getent")
            .args(["group", &name])
            .output()
            .unwrap();
        let gid = String::from_utf8_lossy(&line.stdout)
            .split(':')
            .nth(2)
            .unwrap()
            .parse()
            .unwrap();
        Group { name, gid }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        let _ = Command::new("groupdel").arg(&self.name).output();
    }
}

/// Peak resident memory of process `pid`, in bytes (VmHWM).
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap();
    kb << 10
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o666) }, 0);
}

/// `job` with a billion-laughs alias bomb (10^8 strings once expanded) in
/// its data filter, a field that takes lists.
fn alias_bomb(job: &str) -> String {
    let mut levels = vec!["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]".to_string()];
    for i in 1..9 {
        let refs = vec![format!("*l{}", i - 1); 10].join(", ");
        levels.push(format!("l{i}: &l{i} [{refs}]"));
    }
    let bombed = job.replace(
        "max_dev: 16}",
        &format!("max_dev: 16, filter: {{{}}}}}", levels.join(", ")),
    );
    assert_ne!(bombed, job);
    bombed
}

/// Item 4: FIFOs, devices, a YAML nesting bomb and an alias bomb, in the spool or named by
/// a job, are rejected with their reason; the daemon neither blocks nor
/// grows, answers status meanwhile, and runs the next job.
#[test]
fn bombs_fifos_and_devices_are_rejected_and_cost_the_daemon_nothing() {
    let (tmp, _) = arena();
    let d = Daemon::start(tmp.path(), CONFIG);
    let job = job_file(tmp.path(), "base", 3, 1);
    let text_ = std::fs::read_to_string(&job).unwrap();
    let llama = fixture("llama").display().to_string();
    let fifo = tmp.path().join("config-fifo.json");
    mkfifo(&fifo);
    let random = |config: &Path| {
        text_.replace(
            &format!("path: {llama}"),
            &format!("config: {}, init: random", config.display()),
        )
    };
    let hostile = [
        (
            "deep",
            format!("a: {}{}\n{text_}", "[".repeat(100_000), "]".repeat(100_000)),
            "nested deeper than 32",
        ),
        ("zero", random(Path::new("/dev/zero")), "not a regular file"),
        ("aliases", alias_bomb(&text_), "invalid type"),
        ("fifo-config", random(&fifo), "not a regular file"),
        (
            "fifo-data",
            text_.replace(&reviews(), &fifo.display().to_string()),
            "not a file you can read",
        ),
    ];
    for (name, body, _) in &hostile {
        let f = tmp.path().join(format!("{name}.yaml"));
        std::fs::write(&f, body).unwrap();
        drop_as_nobody(&d, &f, &format!("{name}.yaml"));
    }
    // A FIFO in the spool itself, made by the user.
    let out = shell_as(
        NOBODY,
        &format!("mkfifo {}", d.spool().join("new/spool-fifo.yaml").display()),
    );
    assert!(out.status.success(), "{}", text(&out));

    let error = |name: &str| {
        d.spool()
            .join("rejected")
            .join(format!("{name}.yaml.error"))
    };
    let t = std::time::Instant::now();
    let mut slowest_status = std::time::Duration::ZERO;
    d.wait_until("every hostile file to be rejected", |d| {
        let s = std::time::Instant::now();
        d.jobs();
        slowest_status = slowest_status.max(s.elapsed());
        hostile
            .iter()
            .map(|h| h.0)
            .chain(["spool-fifo"])
            .all(|n| error(n).is_file())
    });
    let took = t.elapsed();
    for (name, _, why) in &hostile {
        let got = std::fs::read_to_string(error(name)).unwrap();
        assert!(got.contains(why), "{name}: {got}");
    }
    assert!(std::fs::read_to_string(error("spool-fifo"))
        .unwrap()
        .contains("not a regular file"));
    let pid = d.child.as_ref().unwrap().id();
    let peak = peak_rss(pid);
    eprintln!(
        "hostile files rejected in {:.2} s; slowest status {:.0} ms; daemon peak RSS {:.1} MiB",
        took.as_secs_f64(),
        slowest_status.as_secs_f64() * 1e3,
        peak as f64 / (1 << 20) as f64
    );
    assert!(
        slowest_status < std::time::Duration::from_secs(2),
        "status waited {slowest_status:?}"
    );
    assert!(peak < 100 << 20, "daemon peak RSS {peak} bytes");
    // Still serving.
    let id = nobody_job(&d, tmp.path(), "after", 2);
    assert_eq!(d.job(id)["state"], "done");
}

/// Item 5: a job file whose name is not UTF-8, or holds a newline and a
/// terminal escape, runs under a safe name shown on one line.
#[test]
fn unprintable_names_run_under_safe_ones() {
    use std::os::unix::ffi::OsStrExt;
    let (tmp, _) = arena();
    let d = Daemon::start(tmp.path(), CONFIG);
    let job = job_file(tmp.path(), "named", 2, 1);
    let model = model_copy(tmp.path(), "named-model", 0o644);
    let body = std::fs::read_to_string(&job).unwrap().replace(
        &fixture("llama").display().to_string(),
        &model.display().to_string(),
    );
    for raw in [&b"caf\xe9.yaml"[..], b"two\nlines\x1b[2J.yaml"] {
        let name = std::ffi::OsStr::from_bytes(raw);
        let staged = d.spool().join("tmp").join(name);
        std::fs::write(&staged, &body).unwrap();
        std::os::unix::fs::chown(&staged, Some(NOBODY), Some(NOBODY)).unwrap();
        std::fs::rename(&staged, d.spool().join("new").join(name)).unwrap();
    }
    d.wait_until("both jobs to be taken", |d| d.jobs().len() == 2);
    let names = |key: &str| {
        let mut names: Vec<String> = d
            .jobs()
            .iter()
            .map(|j| j[key].as_str().unwrap().to_string())
            .collect();
        names.sort();
        names
    };
    assert_eq!(names("spool_name"), ["caf_.yaml", "two_lines_[2J.yaml"]);
    // Named after the (safe) file name without its extension.
    assert_eq!(names("name"), ["caf_", "two_lines_[2J"]);
    for j in d.jobs() {
        let id = j["id"].as_u64().unwrap();
        assert_eq!(d.wait_done(id)["state"], "done");
        assert_eq!(j["owner_uid"], NOBODY);
    }
    let table = mezod_as(0, &d, &["status"]);
    assert_eq!(
        text(&table).matches("caf_ —").count(),
        1,
        "{}",
        text(&table)
    );
    assert!(!d.log().contains("ERROR"), "{}", d.log());
}

/// A tmpfs mounted for one test, unmounted (lazily) when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Self {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(at)
            .output()
            .expect("mount");
        assert!(
            out.status.success(),
            "mounting a tmpfs failed (the disk-full test needs root and mount): {}",
            text(&out)
        );
        Tmpfs(at.to_path_buf())
    }

    /// Fill it to the last byte (again if the daemon gave back its reserve
    /// meanwhile); returns a filler to remove.
    fn fill(&self) -> Vec<PathBuf> {
        static FILLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let mut fillers = Vec::new();
        for _ in 0..5 {
            let n = FILLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let f = self.0.join(format!("filler-{n}"));
            let _ = Command::new("dd")
                .args(["if=/dev/zero", "bs=64k", "count=1000000"])
                .arg(format!("of={}", f.display()))
                .output()
                .unwrap();
            fillers.push(f);
            if rustix_free(&self.0) == 0 {
                return fillers;
            }
        }
        panic!("could not fill {}", self.0.display());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).output();
    }
}

fn rustix_free(path: &Path) -> u64 {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    st.f_bavail * st.f_frsize
}

/// Item 7: the state disk fills up under a running job.  The daemon keeps
/// answering, says why in status, holds new files in new/, requeues (not
/// fails) the job the full disk stopped, and once space returns takes the
/// file and finishes the job, bit-identical to an uninterrupted run, without
/// a restart.  Restarts on the full disk and on the freed one open the
/// database, and a failed job stays failed.
#[test]
fn a_full_disk_pauses_the_daemon_and_space_brings_it_back() {
    let (tmp, _) = arena();
    let state = Tmpfs::mount(&tmp.path().join("state"), "24m");
    let config = format!("{CONFIG}disk_reserve_mib: 2\n");
    let mut d = Daemon::start(tmp.path(), &config);
    // A job that fails on its own (row 250 of its data is not JSON, past the
    // rows checked before it runs): it must stay failed.
    let bad_data = tmp.path().join("bad.jsonl");
    let good: Vec<String> = std::fs::read_to_string(reviews())
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let mut rows: Vec<String> = good.iter().cycle().take(300).cloned().collect();
    rows[249] = "not json".into();
    std::fs::write(&bad_data, rows.join("\n") + "\n").unwrap();
    let failing = job_file(tmp.path(), "failing", 3, 1);
    let body = std::fs::read_to_string(&failing)
        .unwrap()
        .replace(&reviews(), &bad_data.display().to_string());
    std::fs::write(&failing, body).unwrap();
    let failed = d.submit(&failing);
    assert_eq!(d.wait_done(failed)["state"], "failed");
    let attempts = d.job(failed)["attempts"].clone();

    let long = job_file(tmp.path(), "long", 1500, 3);
    solo_sha(&long);
    let id = d.submit(&long);
    d.wait_steps(id, 10);
    let filler = state.fill();
    // The daemon gives back its reserve; the runaway writer takes that too.
    d.wait_until("status to say the disk is full", |d| {
        daemon_status(&d.socket())["mode"]
            .as_str()
            .unwrap()
            .contains("DISK FULL")
    });
    let filler2 = state.fill();
    // A file dropped while the disk is full waits in new/.
    let later = job_file(tmp.path(), "later", 3, 4);
    std::fs::copy(&later, d.spool().join("tmp/later.yaml")).unwrap();
    std::fs::rename(
        d.spool().join("tmp/later.yaml"),
        d.spool().join("new/later.yaml"),
    )
    .unwrap();
    d.wait_until("status to say the disk is full", |d| {
        daemon_status(&d.socket())["mode"]
            .as_str()
            .unwrap()
            .contains("DISK FULL")
    });
    d.wait_until("the job to stop on the full disk", |d| {
        d.job(id)["state"] == "queued"
    });
    let rec = d.job(id);
    assert!(rec["reason"].as_str().unwrap().contains("disk"), "{rec:#}");
    assert_eq!(
        rec["failures"], 0,
        "a full disk is not the job's failure: {rec:#}"
    );
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert!(
        d.spool().join("new/later.yaml").exists(),
        "intake waits for space"
    );
    assert_eq!(d.jobs().len(), 2);

    // Space returns: no restart needed.
    for f in filler.iter().chain(&filler2) {
        std::fs::remove_file(f).unwrap();
    }
    let freed = std::time::Instant::now();
    d.wait_until("the waiting file to be taken", |d| d.jobs().len() == 3);
    eprintln!(
        "intake back {:.2} s after space returned{}",
        freed.elapsed().as_secs_f64(),
        if d.log().contains("reopened the job database") {
            " (database reopened)"
        } else {
            ""
        }
    );
    assert_eq!(d.wait_done(id)["state"], "done", "{:#}", d.job(id));
    let result = read_result(&d.job_dir(id).join("run"));
    eprintln!(
        "the long job resumed at step {} ({} steps replayed, {} s)",
        result["resumed_from"], result["replayed_steps"], result["wall_time_s"]
    );
    d.assert_same_weights(id, &long, "resumed bit-identically after the full disk");
    let later_id = d.jobs()[2]["id"].as_u64().unwrap();
    assert_eq!(d.wait_done(later_id)["state"], "done");

    // A restart on a full disk opens the database and serves status.
    d.kill9();
    let filler = state.fill();
    d.restart(&[]);
    let status = daemon_status(&d.socket());
    assert!(
        status["mode"].as_str().unwrap().contains("DISK FULL"),
        "{status:#}"
    );
    assert_eq!(d.jobs().len(), 3);
    d.kill9();
    // And one after space has returned.
    for f in &filler {
        std::fs::remove_file(f).unwrap();
    }
    d.restart(&[]);
    assert_eq!(d.jobs().len(), 3);
    let rec = d.job(failed);
    assert_eq!(rec["state"], "failed");
    assert_eq!(
        rec["attempts"], attempts,
        "a failed job never runs again by itself"
    );
    assert!(!d.log().contains("corrupt"), "{}", d.log());
}

/// A worker that ends after the full disk has already failed the job
/// database (sled's own flush met ENOSPC first) is still seen to end: its job
/// waits for space instead of showing `running` for good, and resumes
/// bit-identically once space returns.
#[test]
fn a_worker_that_ends_after_the_full_disk_failed_the_database_is_seen_to_end() {
    let (tmp, _) = arena();
    let state = Tmpfs::mount(&tmp.path().join("state"), "24m");
    let config = format!("{CONFIG}disk_reserve_mib: 2\n");
    let d = Daemon::start(tmp.path(), &config);
    let long = job_file(tmp.path(), "long", 1500, 3);
    solo_sha(&long);
    let id = d.submit(&long);
    d.wait_steps(id, 10);
    let started = format!("job {id}: started worker ");
    let log = d.log();
    let pid: i32 = log[log.find(&started).expect("the worker's start is logged") + started.len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // The worker holds still while the disk fills and the database fails.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let mut fillers = state.fill();
    d.wait_until("status to say the disk is full", |d| {
        daemon_status(&d.socket())["mode"]
            .as_str()
            .unwrap()
            .contains("DISK FULL")
    });
    fillers.extend(state.fill());
    d.wait_until("the database to fail on the full disk", |d| {
        d.log()
            .lines()
            .any(|l| l.contains("ERROR mezod_core::daemon::server:") && l.contains("StorageFull"))
    });
    assert_eq!(d.job(id)["state"], "running");
    unsafe { libc::kill(pid, libc::SIGKILL) };
    d.wait_until("the job to stop on the full disk", |d| {
        d.job(id)["state"] == "queued"
    });
    let rec = d.job(id);
    assert!(rec["reason"].as_str().unwrap().contains("disk"), "{rec:#}");
    assert_eq!(rec["failures"], 0, "{rec:#}");

    for f in &fillers {
        std::fs::remove_file(f).unwrap();
    }
    assert_eq!(d.wait_done(id)["state"], "done", "{:#}", d.job(id));
    d.assert_same_weights(id, &long, "resumed bit-identically after the full disk");
}

// ---- the owner's own processes are hostile (issue 24 cases 1, 3, 4, 6, 7, 8) ----

/// An attacker with only perl: find this user's own process whose command
/// line contains ARGV[0], take its descriptor ARGV[1] with `pidfd_getfd`
/// (as any user may of its own processes) and write the file ARGV[2] into it.
/// With ARGV[3], stop the process first and kill it after (a check child:
/// the daemon then reads the attacker's answer and the end of the pipe).
const TAKE_FD_PL: &str = r#"
use strict;
my ($pattern, $fd, $file, $stop, $marker) = @ARGV;
my $deadline = time + 120;
my $pid;
FIND: while (time < $deadline) {
    opendir(my $d, "/proc") or die "opendir: $!\n";
    for my $p (grep { /^\d+$/ } readdir($d)) {
        next if $p == $$;
        my @st = stat("/proc/$p");
        next unless @st && $st[4] == $<;
        open(my $c, "<", "/proc/$p/cmdline") or next;
        local $/;
        my $cmd = <$c>;
        next unless defined $cmd;
        $cmd =~ s/\0/ /g;
        next unless index($cmd, $pattern) >= 0;
        if (defined $marker) {
            open(my $i, "<", "/proc/$p/fd/0") or next;
            my $input = <$i>;
            next unless defined $input && index($input, $marker) >= 0;
        }
        $pid = $p;
        last FIND;
    }
}
die "no process of mine matches $pattern\n" unless $pid;
kill 'STOP', $pid if $stop;
my $pidfd = syscall(434, $pid + 0, 0);
die "pidfd_open: $!\n" if $pidfd < 0;
my $got = syscall(438, $pidfd, $fd + 0, 0);
die "pidfd_getfd: $!\n" if $got < 0;
open(my $in, "<", $file) or die "$file: $!\n";
binmode $in;
open(my $out, ">&=", $got) or die "fdopen: $!\n";
binmode $out;
my $buf;
while (read($in, $buf, 1 << 16)) { print $out $buf or die "write: $!\n"; }
close $out;
kill 'KILL', $pid if $stop;
print "took fd $fd of $pid\n";
"#;

/// Start the perl attacker as `uid` (see [`TAKE_FD_PL`]); `stop_marked`:
/// stop the process first (and kill it after), and take only one whose
/// stdin holds this text.
fn take_fd_as(
    uid: u32,
    pattern: &str,
    fd: u32,
    payload: &Path,
    stop_marked: Option<&str>,
) -> std::process::Child {
    let mut c = Command::new("perl");
    c.arg("-e")
        .arg(TAKE_FD_PL)
        .arg(pattern)
        .arg(fd.to_string())
        .arg(payload);
    if let Some(marker) = stop_marked {
        c.arg("stop").arg(marker);
    }
    c.uid(uid)
        .gid(uid)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Whether the attacker took the descriptor (and, with `finished`, wrote
/// all of its payload); panics (saying why) if it could not, and returns
/// false where the kernel lacks `pidfd_getfd` (Linux 5.6).
fn attack_made(child: std::process::Child, finished: bool) -> bool {
    let out = child.wait_with_output().unwrap();
    let said = text(&out);
    if said.contains("pidfd_getfd: Function not implemented") {
        eprintln!("skipped: this kernel has no pidfd_getfd (Linux 5.6)");
        return false;
    }
    for failure in [
        "pidfd_open:",
        "pidfd_getfd:",
        "no process of mine",
        "fdopen:",
    ] {
        assert!(
            !said.contains(failure),
            "the attack could not be made: {said}"
        );
    }
    if finished {
        assert!(out.status.success(), "the attack could not be made: {said}");
    }
    true
}

/// Drop `job` into the spool as `uid` (the file's owner is the job's owner).
fn drop_as(d: &Daemon, job: &Path, name: &str, uid: u32) {
    let tmp = d.spool().join("tmp").join(name);
    std::fs::copy(job, &tmp).unwrap();
    std::os::unix::fs::chown(&tmp, Some(uid), Some(uid)).unwrap();
    std::fs::rename(&tmp, d.spool().join("new").join(name)).unwrap();
}

/// Case 1: the owner rewrites its own intake check's answer (stops the
/// `mezod check` child, takes its stdout with `pidfd_getfd`, answers
/// "accepted" for a file without a tokenizer with the highest priority and
/// the largest estimate).  The daemon takes the priority from the file,
/// and the estimate fails the job at once instead of wrapping into a small
/// one: the victim's job behind it runs.
#[test]
fn a_forged_intake_verdict_decides_nothing() {
    let (tmp, _) = arena();
    let d = Daemon::start(tmp.path(), CONFIG);
    // A random-weight model without a tokenizer: its check starts the
    // engine for the config's shapes, long enough to be caught.
    let model = tmp.path().join("no-tokenizer");
    std::fs::create_dir(&model).unwrap();
    std::fs::copy(
        fixture("llama").join("config.json"),
        model.join("config.json"),
    )
    .unwrap();
    let job = job_file(tmp.path(), "forged", 3, 1);
    let body = std::fs::read_to_string(&job).unwrap().replace(
        &format!("path: {}", fixture("llama").display()),
        &format!(
            "config: {}, init: random",
            model.join("config.json").display()
        ),
    );
    assert!(body.contains("init: random"), "{body}");
    std::fs::write(&job, body).unwrap();
    let forged = tmp.path().join("forged-answer");
    std::fs::write(
        &forged,
        format!(
            "{{\"accepted\":{{\"wants_gpu\":false,\"priority\":{},\"steps\":10000000,\
             \"estimate_bytes\":{},\"name\":\"first\",\"summary\":\"\"}}}}\n",
            i32::MAX,
            u64::MAX
        ),
    )
    .unwrap();
    std::fs::set_permissions(&forged, std::fs::Permissions::from_mode(0o644)).unwrap();
    let marker = model.display().to_string();
    let attacker = take_fd_as(NOBODY, "mezod check", 1, &forged, Some(&marker));
    drop_as_nobody(&d, &job, "forged.yaml");
    if !attack_made(attacker, true) {
        return;
    }
    d.wait_until("the forged job to be taken", |d| d.jobs().len() == 1);
    let forged_id = d.jobs()[0]["id"].as_u64().unwrap();
    // The victim: another user's job, dropped after the forged one.
    let victim = drop_victim(&d, tmp.path());
    let rec = d.wait_done(victim);
    assert_eq!(rec["state"], "done", "{rec:#}");
    let f = d.wait_done(forged_id);
    assert_eq!(f["priority"], 0, "the priority is the file's: {f:#}");
    assert_eq!(f["steps_total"], 3, "the steps are the file's: {f:#}");
    assert_eq!(f["state"], "failed", "{f:#}");
    assert!(
        f["reason"].as_str().unwrap().contains("largest machine"),
        "{f:#}"
    );
}

/// A replicated job of an ordinary user: its two workers run as that user
/// (the follower's working folder inside the owner's run folder), and the
/// job ends with the weights of the same job run alone.
#[test]
fn a_users_replicated_job_runs_as_that_user_and_computes_what_one_process_does() {
    let (tmp, _) = arena();
    let d = Daemon::start(tmp.path(), &CONFIG.replace("cpu_slots: 1", "cpu_slots: 2"));
    let job = readable_job(tmp.path(), "pair", 60, 4);
    let text = std::fs::read_to_string(&job).unwrap();
    std::fs::write(&job, format!("parallel: {{replicas: 2}}\n{text}")).unwrap();
    let expected = solo_sha(&job);
    drop_as_nobody(&d, &job, "pair.yaml");
    d.wait_until("the job to be taken", |d| d.jobs().len() == 1);
    let id = d.jobs()[0]["id"].as_u64().unwrap();
    let rec = d.wait_done(id);
    assert_eq!(rec["state"], "done", "{rec:#}");
    assert_eq!(rec["owner_uid"], NOBODY, "{rec:#}");
    assert_eq!(rec["replicas"], 2, "{rec:#}");
    let follower = d.job_dir(id).join("run/replicas/1");
    assert_eq!(std::fs::metadata(&follower).unwrap().uid(), NOBODY);
    assert_eq!(d.weights_sha(id), expected);
}

/// A job of user 65533 on a model copy anyone may read; its id once taken.
fn drop_victim(d: &Daemon, dir: &Path) -> u64 {
    let job = readable_job(dir, "victim", 3, 2);
    let before = d.jobs().len();
    drop_as(d, &job, "victim.yaml", NOSY);
    d.wait_until("the victim's job to be taken", |d| {
        d.jobs().len() == before + 1
    });
    d.jobs().iter().find(|j| j["owner_uid"] == NOSY).unwrap()["id"]
        .as_u64()
        .unwrap()
}

/// Case 3: a job file made in a setgid folder carries that folder's group,
/// one its owner is not in.  The job runs with the owner's own groups (the
/// user database's), so data only that group may read is refused, as the
/// owner's own shell would be.
#[test]
fn a_setgid_folder_lends_no_group() {
    let (tmp, _) = arena();
    let group = Group::new_empty();
    let data_dir = tmp.path().join("group-data");
    std::fs::create_dir(&data_dir).unwrap();
    let data = data_dir.join("reviews.jsonl");
    std::fs::copy(reviews(), &data).unwrap();
    std::os::unix::fs::chown(&data_dir, Some(0), Some(group.gid)).unwrap();
    std::os::unix::fs::chown(&data, Some(0), Some(group.gid)).unwrap();
    std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o750)).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o640)).unwrap();
    // A folder anyone may write whose files take the group.
    let setgid = tmp.path().join("setgid");
    std::fs::create_dir(&setgid).unwrap();
    std::os::unix::fs::chown(&setgid, Some(0), Some(group.gid)).unwrap();
    std::fs::set_permissions(&setgid, std::fs::Permissions::from_mode(0o2777)).unwrap();
    let d = Daemon::start(tmp.path(), CONFIG);
    let job = readable_job(tmp.path(), "grouped", 2, 1);
    let body = std::fs::read_to_string(&job)
        .unwrap()
        .replace(&reviews(), &data.display().to_string());
    std::fs::write(&job, &body).unwrap();
    std::fs::set_permissions(&job, std::fs::Permissions::from_mode(0o644)).unwrap();
    // As the owner: its own shell cannot read the data; its file has the group.
    let own = shell_as(NOBODY, &format!("head -c1 {}", data.display()));
    assert!(text(&own).contains("Permission denied"), "{}", text(&own));
    let made = shell_as(
        NOBODY,
        &format!(
            "cp {j} {s}/grouped.yaml && stat -c %g {s}/grouped.yaml && mv {s}/grouped.yaml {n}/",
            j = job.display(),
            s = setgid.display(),
            n = d.spool().join("new").display()
        ),
    );
    assert!(made.status.success(), "{}", text(&made));
    assert!(
        text(&made).contains(&group.gid.to_string()),
        "{}",
        text(&made)
    );
    let error = d.spool().join("rejected/grouped.yaml.error");
    d.wait_until("the file to be rejected or become a job", |d| {
        error.is_file() || !d.jobs().is_empty()
    });
    assert!(
        d.jobs().is_empty(),
        "it ran with the folder's group: {:#?}",
        d.jobs()
    );
    let why = std::fs::read_to_string(&error).unwrap();
    assert!(
        why.contains("Permission denied") || why.contains("not a file you can read"),
        "{why}"
    );
}

/// Bytes in the files under `dir`.
fn tree_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| {
                    let m = e.metadata().unwrap();
                    if m.is_dir() {
                        tree_bytes(&e.path())
                    } else {
                        m.len()
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

/// Case 4: the owner takes its worker's stderr and stdout with `pidfd_getfd`.
/// Its writes into the log stop at the log's bound (the daemon writes the
/// log from the pipe; the worker holds no descriptor of it), and a step
/// record of the wrong step, or a line no record is as long as, stops the
/// job with the reason: the database takes nothing of it.
#[test]
fn a_workers_pipes_carry_no_ones_words_but_its_own() {
    let (tmp, _) = arena();
    let d = Daemon::start(tmp.path(), CONFIG);
    let junk = tmp.path().join("junk");
    std::fs::write(&junk, vec![b'x'; 40 << 20]).unwrap();
    // A step record for a step far ahead, of the right shape, then a line
    // of 512 KB of hex (what a record with 16,000 directions would be).
    let record = |step: u64| -> String {
        let mut bytes = vec![0u8; 48];
        bytes[..8].copy_from_slice(&step.to_le_bytes());
        for f in 2..6 {
            bytes[f * 8..f * 8 + 8].copy_from_slice(&1.5f64.to_le_bytes());
        }
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        format!("R {hex}\n")
    };
    let fake_step = tmp.path().join("fake-step");
    std::fs::write(&fake_step, record(99_999)).unwrap();
    let huge = tmp.path().join("huge-record");
    std::fs::write(&huge, format!("R {}\n", "00".repeat(512 << 10))).unwrap();
    for f in [&junk, &fake_step, &huge] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let db = tmp.path().join("state/db");
    for (name, payload, why) in [
        ("stepped", &fake_step, "where step"),
        ("flooded", &huge, "longer than any record"),
    ] {
        let id = drop_nobody_job(&d, tmp.path(), name, 100_000, None);
        d.wait_steps(id, 1);
        let db_before = tree_bytes(&db);
        let run = d.job_dir(id).join("run");
        let pattern = run.display().to_string();
        if !attack_made(take_fd_as(NOBODY, &pattern, 2, &junk, None), true) {
            return;
        }
        // Its write may end in EPIPE: the daemon stops reading a violated pipe.
        assert!(attack_made(
            take_fd_as(NOBODY, &pattern, 1, payload, None),
            false
        ));
        let rec = d.wait_done(id);
        assert_eq!(rec["state"], "failed", "{rec:#}");
        let reason = rec["reason"].as_str().unwrap();
        assert!(reason.contains(why), "{name}: {reason}");
        let log = std::fs::metadata(d.job_dir(id).join("worker.log"))
            .unwrap()
            .len();
        assert!(
            log <= (32 << 20) + (64 << 10),
            "{name}: the log grew to {log} bytes"
        );
        assert!(
            rec["steps_done"].as_u64().unwrap() < 99_999,
            "{name}: the fake step was taken: {rec:#}"
        );
        let grown = tree_bytes(&db).saturating_sub(db_before);
        assert!(
            grown < 8 << 20,
            "{name}: the database grew by {grown} bytes"
        );
    }
}

/// The pid of job `id`'s worker (found by its run folder on its command line).
fn worker_pid(d: &Daemon, id: u64) -> u32 {
    let run = d.job_dir(id).join("run").display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .is_ok_and(|c| c.contains(" worker ") && c.contains(&run))
        })
        .unwrap_or_else(|| panic!("no worker of job {id}"))
}

/// A daemon started with a secret in its environment, `HOME=/root`, and a
/// descriptor its parent left open (not close-on-exec): the file it is
/// open on (kept open by the returned handle) and that handle.
fn daemon_with_a_secret_and_a_leaked_descriptor(dir: &Path) -> (Daemon, PathBuf, std::fs::File) {
    let leaked = dir.join("secret/leaked-descriptor");
    let file = std::fs::File::create(&leaked).unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
    unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
    let d = Daemon::start_with_env(
        dir,
        CONFIG,
        &[
            ("SEC_ROOT_TOKEN", SECRET.to_string()),
            ("HOME", "/root".to_string()),
        ],
    );
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    (d, leaked, file)
}

/// Case 7: a worker starts with a fixed environment (no secret of the
/// daemon's, the owner's HOME, a plain PATH) and no descriptor the daemon
/// inherited.
#[test]
fn a_worker_inherits_neither_the_daemons_environment_nor_its_descriptors() {
    let (tmp, _) = arena();
    let (d, leaked, file) = daemon_with_a_secret_and_a_leaked_descriptor(tmp.path());
    let id = drop_nobody_job(&d, tmp.path(), "hand-off", 100_000, None);
    d.wait_steps(id, 1);
    let pid = worker_pid(&d, id);
    let environ = String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/environ")).unwrap())
        .replace('\0', "\n");
    assert!(!environ.contains(SECRET), "{environ}");
    assert!(!environ.contains("HOME=/root"), "{environ}");
    assert!(
        environ.contains("HOME=/nonexistent"),
        "nobody's home: {environ}"
    );
    assert!(
        environ.contains("PATH=/usr/local/bin:/usr/bin:/bin"),
        "{environ}"
    );
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        let target = std::fs::read_link(e.path()).unwrap_or_default();
        assert_ne!(
            target,
            leaked,
            "the worker holds the daemon's descriptor {:?}",
            e.file_name()
        );
        assert!(
            !target.starts_with(d.job_dir(id).join("worker.log")),
            "the worker holds the root-owned log"
        );
    }
    let out = mezod_as(0, &d, &["cancel", &id.to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    d.wait_done(id);
    drop(file);
}

/// Cases 6 and 8: another user sees a job's state, owner, name and
/// progress, not its results or losses; a job root cancelled is restarted by
/// root alone, not by its owner.
#[test]
fn others_see_no_results_and_owners_do_not_undo_roots_cancel() {
    let (tmp, _) = arena();
    let d = Daemon::start(tmp.path(), CONFIG);
    let done = nobody_job(&d, tmp.path(), "private", 3);
    let json = |uid: u32| -> serde_json::Value {
        let out = mezod_as(uid, &d, &["status", &done.to_string(), "--json"]);
        assert!(out.status.success(), "{}", text(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let human = |uid: u32| -> String {
        let out = mezod_as(uid, &d, &["status", &done.to_string()]);
        assert!(out.status.success(), "{}", text(&out));
        text(&out)
    };
    let (mine, theirs) = (json(NOBODY), json(NOSY));
    assert!(
        mine["result"].is_object(),
        "the owner sees its results: {mine:#}"
    );
    assert!(mine["last_loss"].is_number(), "{mine:#}");
    assert!(human(NOBODY).contains("last loss"), "{}", human(NOBODY));
    assert!(
        theirs["result"].is_null(),
        "another user sees the results: {theirs:#}"
    );
    assert!(theirs["last_loss"].is_null(), "{theirs:#}");
    assert_eq!(theirs["peak_bytes"], 0, "{theirs:#}");
    assert_eq!(
        (&theirs["state"], &theirs["steps_done"]),
        (&mine["state"], &mine["steps_done"])
    );
    assert_eq!(theirs["name"], mine["name"]);
    let seen = human(NOSY);
    assert!(
        !seen.contains("last loss") && !seen.contains("result"),
        "{seen}"
    );
    let list = mezod_as(NOSY, &d, &["status", "--json"]);
    assert!(
        !text(&list).contains("last_loss\":0") && !text(&list).contains("wall_time_s"),
        "{}",
        text(&list)
    );

    let id = drop_nobody_job(&d, tmp.path(), "stopped-by-root", 100_000, None);
    d.wait_steps(id, 1);
    let out = mezod_as(0, &d, &["cancel", &id.to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    d.wait_done(id);
    let undo = mezod_as(NOBODY, &d, &["restart", &id.to_string()]);
    assert!(
        !undo.status.success(),
        "the owner undid root's cancel: {}",
        text(&undo)
    );
    assert!(text(&undo).contains("only root"), "{}", text(&undo));
    assert_eq!(d.job(id)["state"], "cancelled");
    let root = mezod_as(0, &d, &["restart", &id.to_string()]);
    assert!(root.status.success(), "{}", text(&root));
    d.wait_until("the job to run again", |d| {
        d.job(id)["state"] != "cancelled"
    });
    let out = mezod_as(0, &d, &["cancel", &id.to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    d.wait_done(id);
    // The owner's own cancel stays the owner's to undo.
    let out = mezod_as(NOBODY, &d, &["restart", &id.to_string()]);
    assert!(!out.status.success(), "{}", text(&out));
}

/// A job file of user 65534 whose check is slow (a random-weight model: the
/// check starts the engine for its shapes) and fails (no tokenizer).
fn slow_bad_job(dir: &Path, name: &str) -> PathBuf {
    let model = dir.join(format!("{name}-model"));
    std::fs::create_dir_all(&model).unwrap();
    std::fs::copy(
        fixture("llama").join("config.json"),
        model.join("config.json"),
    )
    .unwrap();
    let job = job_file(dir, name, 3, 1);
    let body = std::fs::read_to_string(&job).unwrap().replace(
        &format!("path: {}", fixture("llama").display()),
        &format!(
            "config: {}, init: random",
            model.join("config.json").display()
        ),
    );
    std::fs::write(&job, body).unwrap();
    job
}

/// Case 5 (checks): one user's backlog of slow files, named to come first,
/// does not hold every intake check: files are taken round-robin over their
/// owners, each user with at most two checks at once, so another user's
/// file is taken while most of the backlog still waits.
#[test]
fn one_users_slow_files_do_not_hold_up_anothers() {
    let (tmp, _) = arena();
    let d = Daemon::start(tmp.path(), CONFIG);
    const BACKLOG: usize = 16;
    for i in 0..BACKLOG {
        let job = slow_bad_job(tmp.path(), &format!("000-hog-{i:02}"));
        drop_as_nobody(&d, &job, &format!("000-hog-{i:02}.yaml"));
    }
    let t = std::time::Instant::now();
    let victim = drop_victim(&d, tmp.path());
    let latency = t.elapsed();
    let rejected = |d: &Daemon| {
        std::fs::read_dir(d.spool().join("rejected"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".error")
            })
            .count()
    };
    let decided_before = rejected(&d);
    eprintln!(
        "the victim's file was taken after {:.1} s, with {decided_before} of the {BACKLOG} slow files decided",
        latency.as_secs_f64()
    );
    assert!(
        decided_before <= BACKLOG / 2,
        "the victim's file waited for {decided_before} of the other user's {BACKLOG} files"
    );
    d.wait_until("every slow file to be rejected", |d| rejected(d) == BACKLOG);
    assert_eq!(d.wait_done(victim)["state"], "done");
}

/// Issue 25 items 3 and 4 at intake: a user's job above the priority
/// ceiling is refused with the reason, root's is not; a user past its jobs
/// limit is refused, root never is.
#[test]
fn a_user_cannot_jump_the_queue_or_flood_it() {
    let (tmp, _) = arena();
    let d = Daemon::start(tmp.path(), &format!("{CONFIG}jobs_per_user: 2\n"));
    let job = readable_job(tmp.path(), "urgent", 3, 1);
    let body = std::fs::read_to_string(&job).unwrap();
    std::fs::write(&job, format!("priority: 1000\n{body}")).unwrap();
    drop_as_nobody(&d, &job, "urgent.yaml");
    let error = d.spool().join("rejected/urgent.yaml.error");
    d.wait_until("the raised priority to be refused", |_| error.is_file());
    let why = std::fs::read_to_string(&error).unwrap();
    assert!(why.contains("priority 1000 is above 0"), "{why}");
    // Root may.
    let root = tmp.path().join("root-urgent.yaml");
    std::fs::copy(&job, &root).unwrap();
    std::fs::rename(&root, d.spool().join("new/root-urgent.yaml")).unwrap();
    d.wait_until("root's job to be taken", |d| d.jobs().len() == 1);
    assert_eq!(d.jobs()[0]["priority"], 1000);

    // Two long jobs of nobody's are all it may have waiting or running.
    let long: Vec<u64> = (0..2)
        .map(|i| drop_nobody_job(&d, tmp.path(), &format!("long{i}"), 100_000, None))
        .collect();
    let third = readable_job(tmp.path(), "third", 3, 1);
    drop_as_nobody(&d, &third, "third.yaml");
    let error = d.spool().join("rejected/third.yaml.error");
    d.wait_until("the third job to be refused", |_| error.is_file());
    let why = std::fs::read_to_string(&error).unwrap();
    assert!(why.contains("you have 2 jobs waiting or running"), "{why}");
    for id in long {
        let out = mezod_as(0, &d, &["cancel", &id.to_string()]);
        assert!(out.status.success(), "{}", text(&out));
    }
}

/// Case 2: the check measures a small model, then the owner swaps the file
/// for a big one before the worker starts.  Nothing the check said binds
/// the run, so the daemon enforces the reservation: the job is stopped with
/// how much it used against what it reserved.
#[test]
fn a_job_that_outgrows_its_reservation_is_stopped() {
    let (tmp, _) = arena();
    let d = Daemon::start(tmp.path(), CONFIG);
    // A slot-holder, so the swapped job waits in the queue after its check.
    let blocker = drop_nobody_job(&d, tmp.path(), "blocker", 100_000, None);
    d.wait_steps(blocker, 1);
    let model = tmp.path().join("swapped-model");
    std::fs::create_dir(&model).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture("llama").join(f), model.join(f)).unwrap();
    }
    let small = std::fs::read_to_string(model.join("config.json")).unwrap();
    let big = small
        .replace("\"hidden_size\": 48", "\"hidden_size\": 1024")
        .replace("\"head_dim\": 16", "\"head_dim\": 64")
        .replace("\"intermediate_size\": 96", "\"intermediate_size\": 4096")
        .replace("\"num_attention_heads\": 4", "\"num_attention_heads\": 16")
        .replace("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 16")
        .replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 8");
    assert_ne!(big, small);
    std::fs::write(tmp.path().join("big.json"), big).unwrap();
    for p in [&model, &model.join("config.json")] {
        std::os::unix::fs::chown(p, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    let job = job_file(tmp.path(), "swapped", 3, 1);
    let body = std::fs::read_to_string(&job).unwrap().replace(
        &format!("path: {}", fixture("llama").display()),
        &format!(
            "config: {}, init: random",
            model.join("config.json").display()
        ),
    );
    std::fs::write(&job, body).unwrap();
    drop_as_nobody(&d, &job, "swapped.yaml");
    d.wait_until("the small job to be taken", |d| d.jobs().len() == 2);
    let id = d.jobs()[1]["id"].as_u64().unwrap();
    assert_eq!(d.job(id)["state"], "queued", "{:#}", d.job(id));
    let swap = shell_as(
        NOBODY,
        &format!(
            "cp {} {}",
            tmp.path().join("big.json").display(),
            model.join("config.json").display()
        ),
    );
    assert!(swap.status.success(), "{}", text(&swap));
    let out = mezod_as(0, &d, &["cancel", &blocker.to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    let rec = d.wait_done(id);
    assert_eq!(rec["state"], "failed", "{rec:#}");
    let reason = rec["reason"].as_str().unwrap();
    assert!(
        reason.contains("it reserved") || reason.contains("memory limit"),
        "{reason}"
    );
    eprintln!("job {id}: {reason}");
}

/// Case 11: a process the worker starts with `setsid` (its own session and
/// process group, as the owner can make its worker do) ends with the job:
/// each job runs in its own cgroup, and a cancel ends the whole cgroup.
#[test]
fn nothing_a_cancelled_job_started_outlives_it() {
    let (tmp, _) = arena();
    let wrapper = tmp.path().join("engine.sh");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nif [ \"$1\" = worker ]; then setsid sleep 1777 </dev/null >/dev/null 2>&1 & fi\nexec {} \"$@\"\n",
            env!("CARGO_BIN_EXE_mezod-engine")
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let d = Daemon::start_with_env(
        tmp.path(),
        CONFIG,
        &[("MEZOD_ENGINE", wrapper.display().to_string())],
    );
    let escaped = || -> Vec<u32> {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| c == b"sleep\x001777\x00")
            })
            .collect()
    };
    let id = drop_nobody_job(&d, tmp.path(), "escaper", 100_000, None);
    d.wait_steps(id, 1);
    assert!(!escaped().is_empty(), "the worker started no setsid child");
    let out = mezod_as(NOBODY, &d, &["cancel", &id.to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(d.wait_done(id)["state"], "cancelled");
    d.wait_until("the job's setsid child to end", |_| escaped().is_empty());
}

/// Case 5 (connections): one user holding 400 idle connections to the
/// control socket does not make another user wait: connections are capped
/// per user, and the victim is answered at once.
#[test]
fn one_users_idle_connections_do_not_hold_up_anothers_status() {
    let (tmp, _) = arena();
    let d = Daemon::start(tmp.path(), CONFIG);
    let mut hog = Command::new("perl")
        .arg("-e")
        .arg(
            r#"use IO::Socket::UNIX;
               my @s;
               for (1 .. 400) {
                   my $c = IO::Socket::UNIX->new(Type => SOCK_STREAM(), Peer => $ARGV[0]) or last;
                   push @s, $c;
               }
               print scalar(@s), "\n";
               STDOUT->flush;
               sleep 120;"#,
        )
        .arg(d.socket())
        .uid(NOBODY)
        .gid(NOBODY)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut opened = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(hog.stdout.take().unwrap()),
        &mut opened,
    )
    .unwrap();
    let t = std::time::Instant::now();
    let victim = mezod_as(NOSY, &d, &["status"]);
    let latency = t.elapsed();
    // The hog itself is told why, at once.
    let refused = mezod_as(NOBODY, &d, &["status"]);
    let _ = hog.kill();
    let _ = hog.wait();
    eprintln!(
        "with {} idle connections of another user, `mezod status` answered in {:.0} ms",
        opened.trim(),
        latency.as_secs_f64() * 1e3
    );
    assert!(victim.status.success(), "{}", text(&victim));
    assert!(
        latency < std::time::Duration::from_secs(5),
        "the victim waited {latency:?} behind another user's connections"
    );
    // (Told why, or, while its hundreds of refused connections drain,
    // closed without a word: `control::tests` checks the words.)
    assert!(!refused.status.success(), "{}", text(&refused));
}

// ---- a fair queue (issue 25 items 2, 3 and 4) ----

/// The order in which `ids` were first seen running (or ended), polling status.
fn start_order(d: &Daemon, ids: &[u64]) -> Vec<u64> {
    let mut order = Vec::new();
    d.wait_until("every job to start", |d| {
        for j in d.jobs() {
            let id = j["id"].as_u64().unwrap();
            if ids.contains(&id) && j["state"] != "queued" && !order.contains(&id) {
                order.push(id);
            }
        }
        order.len() == ids.len()
    });
    order
}

/// Fair share, as two users of one server see it through the CLI: one
/// user's backlog does not hold the other's one job behind all of it, a
/// waiting job says where its owner stands, and a user cannot raise a
/// priority (root can; an owner may lower its own).
#[test]
fn one_users_backlog_does_not_hold_anothers_job_behind_it() {
    let (tmp, _) = arena();
    let d = Daemon::start(tmp.path(), CONFIG);
    let flood: Vec<u64> = (0..4)
        .map(|i| drop_nobody_job(&d, tmp.path(), &format!("flood{i}"), 40, None))
        .collect();
    d.wait_until("the first flood job to run", |d| {
        d.job(flood[0])["state"] == "running"
    });
    let victim = drop_victim(&d, tmp.path());
    d.wait_until("the others to say why they wait", |d| {
        d.job(flood[1])["reason"]
            .as_str()
            .unwrap()
            .contains("fair share: nobody used")
    });
    // Priorities: the owner may lower, not raise; root may raise.
    let raise = mezod_as(NOBODY, &d, &["priority", &flood[2].to_string(), "5"]);
    assert!(
        !raise.status.success(),
        "a user raised a priority: {}",
        text(&raise)
    );
    assert!(text(&raise).contains("only root"), "{}", text(&raise));
    let lower = mezod_as(NOBODY, &d, &["priority", &flood[3].to_string(), "-1"]);
    assert!(lower.status.success(), "{}", text(&lower));
    assert_eq!(d.job(flood[3])["priority"], -1);
    let nosy = mezod_as(NOSY, &d, &["priority", &flood[2].to_string(), "-5"]);
    assert!(
        !nosy.status.success(),
        "another user changed a priority: {}",
        text(&nosy)
    );
    let root = mezod_as(0, &d, &["priority", &flood[2].to_string(), "3"]);
    assert!(root.status.success(), "{}", text(&root));
    let order = start_order(&d, &[flood[0], victim, flood[1], flood[2], flood[3]]);
    // flood[2] (raised by root) first; then the victim, whose owner used
    // nothing, ahead of flood[1], which was there before it (first come,
    // first served would run flood[1] first); flood[3], lowered, last.
    eprintln!("start order: {order:?} (flood {flood:?}, victim {victim})");
    assert_eq!(
        order,
        vec![flood[0], flood[2], victim, flood[1], flood[3]],
        "start order"
    );
    let status = mezod_as(NOSY, &d, &["status", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(report["users"][0]["uid"], NOBODY, "{report:#}");
    assert!(
        report["users"][0]["share"].as_f64().unwrap() > 0.5,
        "{report:#}"
    );
    let human = mezod_as(NOSY, &d, &["status"]);
    assert!(
        text(&human).contains("fair share (usage halves every 1 day): nobody"),
        "{}",
        text(&human)
    );
    for id in [victim, flood[1], flood[3]] {
        d.wait_done(id);
    }
}

/// Without fair share's help a second user waits for the first user's
/// running limit: `running_per_user` keeps one user from holding every slot.
#[test]
fn a_user_at_the_running_limit_leaves_the_slot_to_another() {
    let (tmp, _) = arena();
    let d = Daemon::start(
        tmp.path(),
        &CONFIG
            .replace("cpu_slots: 1", "cpu_slots: 2")
            .to_string()
            .replace(
                "memory_margin_mib: 64",
                "memory_margin_mib: 64\nrunning_per_user: 1",
            ),
    );
    let a = drop_nobody_job(&d, tmp.path(), "first", 100_000, None);
    let b = drop_nobody_job(&d, tmp.path(), "second", 100_000, None);
    d.wait_until("the first to run", |d| d.job(a)["state"] == "running");
    d.wait_until("the second to say why it waits", |d| {
        d.job(b)["reason"]
            .as_str()
            .unwrap()
            .contains("running_per_user: 1")
    });
    let victim = drop_victim(&d, tmp.path());
    assert_eq!(d.wait_done(victim)["state"], "done");
    assert_eq!(d.job(b)["state"], "queued", "{:#}", d.job(b));
    for id in [a, b] {
        mezod_as(0, &d, &["cancel", &id.to_string()]);
    }
}

/// Issue 25 item 5: preemption that loses nothing.  A user's long job is
/// stopped at a step boundary twice for root's urgent jobs (priority 10),
/// queued again each time (not a failure), and still exports exactly the
/// weights an uninterrupted `mezod run` of it exports.
#[test]
fn a_job_preempted_twice_ends_bit_identical_to_an_uninterrupted_run() {
    let (tmp, _) = arena();
    let d = Daemon::start(
        tmp.path(),
        &format!("{CONFIG}preemption: true\npreemption_min_run_s: 0\n"),
    );
    // The user's job, on a model copy anyone may read; its solo run first.
    let job = readable_job(tmp.path(), "long", 400, 5);
    run_to_end(&job, &job.with_extension("solo"), "solo run");
    drop_as_nobody(&d, &job, "long.yaml");
    d.wait_until("the long job to be taken", |d| d.jobs().len() == 1);
    let id = d.jobs()[0]["id"].as_u64().unwrap();
    for (round, at) in [(1u64, 40u64), (2, 120)] {
        d.wait_steps(id, at);
        let urgent = job_file(tmp.path(), &format!("urgent{round}"), 3, round);
        let body = std::fs::read_to_string(&urgent).unwrap();
        std::fs::write(&urgent, format!("priority: 10\n{body}")).unwrap();
        let taken = d.jobs().len();
        std::fs::rename(&urgent, d.spool().join(format!("new/urgent{round}.yaml"))).unwrap();
        d.wait_until("the urgent job to be taken", |d| {
            d.jobs().len() == taken + 1
        });
        let urgent_id = d.jobs()[taken]["id"].as_u64().unwrap();
        assert_eq!(d.wait_done(urgent_id)["state"], "done");
        let long = d.job(id);
        assert_eq!(long["preemptions"], round, "{long:#}");
        assert!(
            long["state"] != "done",
            "the long job ended before it could be preempted again: {long:#}"
        );
    }
    let rec = d.wait_done(id);
    assert_eq!(rec["state"], "done", "{rec:#}");
    assert_eq!(rec["failures"], 0, "a preemption is not a failure: {rec:#}");
    assert_eq!(rec["preemptions"], 2, "{rec:#}");
    d.assert_same_weights(id, &job, "preempted twice");
    let shown = mezod_as(NOBODY, &d, &["status", &id.to_string()]);
    assert!(
        text(&shown).contains("preempted 2 times"),
        "{}",
        text(&shown)
    );
}

// ---- the client cannot be fooled (issue 24 cases 9 and 10; issue 25 item 1) ----

/// What a hostile name carries to a terminal: retitle it, then clear it.
const ESCAPES: &str = "\x1b]0;PWNED\x07\x1b[2J";
/// The same, as mezod prints it.
const ESCAPED: &str = "\\x1b]0;PWNED\\x07\\x1b[2J";

/// `p` as a YAML string (JSON's quoting is YAML's): control characters escaped.
fn quoted(p: &Path) -> String {
    serde_json::to_string(p.to_str().unwrap()).unwrap()
}

/// Issue 24 case 9: a job of nobody's whose model folder and data path hold
/// terminal escapes (and whose data fails it at a row the check did not
/// read, so its reason, error and log name that path).  Root's `mezod
/// status`, `status ID` and `logs ID` print them escaped; not one ESC or BEL
/// byte reaches root's terminal.
#[test]
fn escapes_never_reach_roots_terminal() {
    let (tmp, _) = arena();
    let d = Daemon::start(tmp.path(), CONFIG);
    let model = model_copy(tmp.path(), &format!("m{ESCAPES}"), 0o644);
    let data_dir = tmp.path().join(format!("d{ESCAPES}"));
    std::fs::create_dir(&data_dir).unwrap();
    let data = data_dir.join("reviews.jsonl");
    let rows = std::fs::read_to_string(reviews()).unwrap();
    std::fs::write(&data, format!("{rows}{{\"no text\": \"here\"}}\n")).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o644)).unwrap();
    let job = tmp.path().join("hostile.yaml");
    std::fs::write(
        &job,
        format!(
            "model: {{path: {m}, dtype: f32, threads: 1}}\ntask: {{kind: causal_lm}}\n\
             data: {{train: {t}, dev: {t}, text_field: text, max_dev: 16}}\n\
             mezo: {{steps: 3, batch_size: 4, lr: 2.0e-3, eps: 1.0e-3, seed: 1}}\n",
            m = quoted(&model),
            t = quoted(&data)
        ),
    )
    .unwrap();
    drop_as_nobody(&d, &job, "hostile.yaml");
    d.wait_until("the job to be taken", |d| d.jobs().len() == 1);
    let id = d.jobs()[0]["id"].as_u64().unwrap();
    d.wait_done(id);
    let id = id.to_string();

    // The daemon hands the escapes over as data (JSON escapes them itself).
    let json = mezod_as(0, &d, &["status", &id, "--json"]);
    assert!(
        String::from_utf8_lossy(&json.stdout).contains("\\u001b]0;PWNED\\u0007\\u001b[2J"),
        "{}",
        text(&json)
    );
    let raw_log = match mezod::daemon::control::request(
        &d.socket(),
        &mezod::daemon::control::Request::Logs {
            id: id.parse().unwrap(),
            offset: 0,
            tail: None,
        },
    )
    .unwrap()
    {
        mezod::daemon::control::Response::Logs { data, .. } => data,
        other => panic!("{other:?}"),
    };
    assert!(raw_log.contains(ESCAPES), "{raw_log}");

    for args in [
        vec!["status"],
        vec!["status", &id],
        vec!["logs", &id],
        vec!["logs", &id, "-n", "5"],
    ] {
        let out = mezod_as(0, &d, &args);
        let both = [&out.stdout[..], &out.stderr[..]].concat();
        assert!(
            !both.iter().any(|&b| b == 0x1b || b == 0x07),
            "`mezod {}` printed a raw escape: {:?}",
            args.join(" "),
            text(&out)
        );
        if args.len() == 2 {
            assert!(
                text(&out).contains(ESCAPED),
                "`mezod {}` shows the escaped name: {}",
                args.join(" "),
                text(&out)
            );
        }
    }
}

/// Listen at `path` as a fake daemon would, answering every request with a
/// Hello that names `spool`; returns how many connections it has had.
fn fake_daemon(path: &Path, spool: &Path) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    use std::io::{BufRead, Write};
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
    let answer = format!(
        "{}\n",
        serde_json::json!({"hello": {"spool": spool, "version": "0"}})
    );
    let counted = hits.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut line = String::new();
            let _ = std::io::BufReader::new(&stream).read_line(&mut line);
            let _ = (&stream).write_all(answer.as_bytes());
        }
    });
    hits
}

/// Names in `dir`.
fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Issue 24 case 10: user nobody plants `var/run/mezod.sock` (a fake
/// daemon whose Hello names a spool of links into a root-only folder) in a
/// folder of its own; root runs `mezod status` and `mezod submit` there.
/// Neither connects to it; named with `--socket`, it is refused for its
/// owner.  A spool of nobody's, or one whose `tmp/` is a link, gets nothing
/// written through it.
#[test]
fn a_socket_planted_in_the_current_folder_is_not_used() {
    let (tmp, secret) = arena();
    let vault = secret.parent().unwrap().to_path_buf();
    let before = names_in(&vault);
    let trap = tmp.path().join("trap");
    std::fs::create_dir_all(trap.join("var/run")).unwrap();
    std::fs::create_dir_all(trap.join("spool")).unwrap();
    for sub in ["tmp", "new"] {
        std::os::unix::fs::symlink(&vault, trap.join("spool").join(sub)).unwrap();
    }
    job_file(&trap, "job", 2, 1);
    let hits = fake_daemon(&trap.join("var/run/mezod.sock"), &trap.join("spool"));
    for p in [
        "",
        "var",
        "var/run",
        "var/run/mezod.sock",
        "spool",
        "spool/tmp",
        "spool/new",
        "job.yaml",
    ] {
        let p = trap.join(p);
        std::os::unix::fs::lchown(&p, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    let root_in_trap = |args: &[&str]| {
        let out = mezod()
            .args(args)
            .current_dir(&trap)
            .env_remove("MEZOD_SOCKET")
            .output()
            .unwrap();
        (out.status.success(), text(&out))
    };
    let connections = || hits.load(std::sync::atomic::Ordering::SeqCst);
    let system_daemon = Path::new(mezod::daemon::control::SYSTEM_SOCKET).exists();

    // No socket named: the systemd unit's is the only one looked at.
    for args in [&["status"][..], &["submit", "job.yaml", "--wait", "1"]] {
        let (ok, said) = root_in_trap(args);
        assert_eq!(
            connections(),
            0,
            "`mezod {}` used the planted socket",
            args.join(" ")
        );
        if !system_daemon {
            assert!(!ok, "{said}");
            assert!(
                said.contains("/run/mezod/mezod.sock") && said.contains("--socket"),
                "says where it looked and how to point elsewhere: {said}"
            );
        }
    }
    // Named explicitly: refused for its owner, before connecting.
    for args in [
        &["status", "--socket", "./var/run/mezod.sock"][..],
        &[
            "submit",
            "job.yaml",
            "--wait",
            "1",
            "--socket",
            "./var/run/mezod.sock",
        ],
    ] {
        let (ok, said) = root_in_trap(args);
        assert!(!ok, "{said}");
        assert!(said.contains("belongs to uid 65534"), "{said}");
        assert_eq!(connections(), 0, "`mezod {}` connected", args.join(" "));
    }
    // Through MEZOD_SOCKET too.
    let out = mezod()
        .arg("status")
        .current_dir(&trap)
        .env("MEZOD_SOCKET", "var/run/mezod.sock")
        .output()
        .unwrap();
    assert!(
        !out.status.success() && text(&out).contains("belongs to uid 65534"),
        "{}",
        text(&out)
    );
    assert_eq!(connections(), 0);

    // The spool named outright: nobody's, whose tmp/ and new/ lead into
    // root's folder; then root's own spool folder whose tmp/ is a link.
    let submit_into = |spool: &Path| {
        let out = mezod()
            .args(["submit", "job.yaml", "--wait", "1", "--socket"])
            .arg(tmp.path().join("no-daemon.sock"))
            .arg("--spool")
            .arg(spool)
            .current_dir(&trap)
            .output()
            .unwrap();
        (out.status.success(), text(&out))
    };
    let (ok, said) = submit_into(&trap.join("spool"));
    assert!(!ok && said.contains("belongs to uid 65534"), "{said}");
    let linked = tmp.path().join("linked-spool");
    std::fs::create_dir(&linked).unwrap();
    std::fs::create_dir(linked.join("new")).unwrap();
    std::os::unix::fs::symlink(&vault, linked.join("tmp")).unwrap();
    let (ok, said) = submit_into(&linked);
    assert!(!ok && said.contains("link is not followed"), "{said}");
    assert_eq!(
        names_in(&vault),
        before,
        "nothing was written through a link"
    );
    assert!(names_in(&linked.join("new")).is_empty());
}

/// Issue 25 item 1: user nobody runs `mezod submit` in a folder of its own,
/// as the README shows; it exits 0 with the id, and root's `mezod status`
/// shows one job for it.  A second submit (of a copy) is a second job, with
/// its own id, and no error.
#[test]
fn a_normal_user_submits_and_gets_the_id() {
    let (tmp, _) = arena();
    let d = Daemon::start(tmp.path(), CONFIG);
    let home = tmp.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let job = readable_job(&home, "job", 2, 1);
    let text_of_job = std::fs::read_to_string(&job).unwrap();
    std::fs::write(home.join("again.yaml"), &text_of_job).unwrap();
    for p in ["", "job.yaml", "again.yaml"] {
        std::os::unix::fs::chown(home.join(p), Some(NOBODY), Some(NOBODY)).unwrap();
    }
    let submit = |file: &str| {
        let out = mezod()
            .args(["submit", file, "--socket"])
            .arg(d.socket())
            .current_dir(&home)
            .uid(NOBODY)
            .gid(NOBODY)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "nobody's submit of {file}: {}",
            text(&out)
        );
        let id: u64 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("stdout is the id: {}", text(&out)));
        id
    };
    let first = submit("job.yaml");
    let jobs = d.jobs();
    assert_eq!(jobs.len(), 1, "{jobs:#?}");
    assert_eq!(jobs[0]["id"], first);
    assert_eq!(jobs[0]["owner_uid"], NOBODY);
    let second = submit("again.yaml");
    assert_ne!(first, second);
    let table = text(&mezod_as(0, &d, &["status"]));
    for (id, name) in [(first, "job"), (second, "again")] {
        assert_eq!(
            d.jobs().iter().filter(|j| j["id"] == id).count(),
            1,
            "{table}"
        );
        assert_eq!(d.job(id)["name"], name);
        assert_eq!(d.job(id)["owner_uid"], NOBODY);
    }
    assert_eq!(d.jobs().len(), 2, "{table}");
    assert!(
        table
            .lines()
            .filter(|l| l.contains(" nobody ") || l.contains(" 65534 "))
            .count()
            == 2,
        "{table}"
    );
}

// ---- dependencies (issue 25 item 6) ----

/// Issue 25 item 6: user 65534 names user 65533's job in `after:`, by id
/// and by name, in a file dropped into the spool and with `mezod submit
/// --after`: each is refused with the reason, and nothing of 65534's is
/// queued.  Root may make a job wait for anyone's.
#[test]
fn a_user_cannot_make_a_job_wait_for_anothers() {
    let (tmp, _) = arena();
    let d = Daemon::start(tmp.path(), CONFIG);
    let victim = drop_victim(&d, tmp.path());
    let home = tmp.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let job = readable_job(&home, "sneaky", 3, 1);
    let body = std::fs::read_to_string(&job).unwrap();
    for p in ["", "sneaky.yaml"] {
        std::os::unix::fs::chown(home.join(p), Some(NOBODY), Some(NOBODY)).unwrap();
    }
    let dropped = tmp.path().join("dropped.yaml");
    for (name, after) in [("by-id", victim.to_string()), ("by-name", "victim".into())] {
        std::fs::write(&dropped, format!("after: [{after}]\n{body}")).unwrap();
        drop_as_nobody(&d, &dropped, &format!("{name}.yaml"));
    }
    let error = |name: &str| d.spool().join(format!("rejected/{name}.yaml.error"));
    d.wait_until("both files to be refused", |_| {
        error("by-id").is_file() && error("by-name").is_file()
    });
    let why = std::fs::read_to_string(error("by-id")).unwrap();
    assert!(
        why.contains(&format!("after: job {victim} belongs to another user")),
        "{why}"
    );
    let why = std::fs::read_to_string(error("by-name")).unwrap();
    assert!(why.contains("you have no job named \"victim\""), "{why}");
    let out = mezod()
        .args([
            "submit",
            "sneaky.yaml",
            "--after",
            &victim.to_string(),
            "--socket",
        ])
        .arg(d.socket())
        .current_dir(&home)
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("job {victim} belongs to another user")),
        "{}",
        text(&out)
    );
    assert!(
        d.jobs().iter().all(|j| j["owner_uid"] != NOBODY),
        "{:#?}",
        d.jobs()
    );
    // Root's job may wait for another user's.
    let root_job = tmp.path().join("root-after.yaml");
    std::fs::write(&root_job, format!("after: [{victim}]\n{body}")).unwrap();
    std::fs::rename(&root_job, d.spool().join("new/root-after.yaml")).unwrap();
    d.wait_until("root's job to be taken", |d| {
        d.jobs().iter().any(|j| j["owner_uid"] == 0)
    });
    let root_id = d.jobs().iter().find(|j| j["owner_uid"] == 0).unwrap()["id"]
        .as_u64()
        .unwrap();
    assert_eq!(d.wait_done(root_id)["state"], "done");
    assert_eq!(d.wait_done(victim)["state"], "done");
}

/// Issue 25 item 6: a job's `notify:` command runs as the job's owner
/// (its uid and groups), with the fixed environment and no descriptor of
/// the daemon's, like its worker; a command that outlives its job's end is
/// not waited for by the daemon, which answers meanwhile.
#[test]
fn a_notify_command_runs_as_its_owner_and_nothing_more() {
    let (tmp, _) = arena();
    let (d, _leaked, file) = daemon_with_a_secret_and_a_leaked_descriptor(tmp.path());
    let out_dir = tmp.path().join("nobody-out");
    std::fs::create_dir(&out_dir).unwrap();
    std::os::unix::fs::chown(&out_dir, Some(NOBODY), Some(NOBODY)).unwrap();
    let told = out_dir.join("told");
    let job = readable_job(tmp.path(), "notified", 3, 1);
    let body = std::fs::read_to_string(&job).unwrap();
    let script = format!(
        "{{ id -u; id -G; env; ls -l /proc/self/fd/; }} > {0}.part; mv {0}.part {0}; sleep 20",
        told.display()
    );
    std::fs::write(
        &job,
        format!(
            "notify: {{command: [/bin/sh, -c, {}]}}\n{body}",
            serde_json::to_string(&script).unwrap()
        ),
    )
    .unwrap();
    drop_as_nobody(&d, &job, "notified.yaml");
    d.wait_until("the job to be taken", |d| d.jobs().len() == 1);
    let id = d.jobs()[0]["id"].as_u64().unwrap();
    assert_eq!(d.wait_done(id)["state"], "done");
    d.wait_until("the notify command", |_| told.is_file());
    // It sleeps on; the daemon answers.
    let t = std::time::Instant::now();
    assert!(mezod_as(NOBODY, &d, &["status"]).status.success());
    assert!(t.elapsed() < std::time::Duration::from_secs(5));
    let said = std::fs::read_to_string(&told).unwrap();
    let mut lines = said.lines();
    assert_eq!(lines.next(), Some("65534"), "{said}");
    assert_eq!(lines.next(), Some("65534"), "its own group alone: {said}");
    assert!(said.contains(&format!("MEZOD_JOB_ID={id}")), "{said}");
    assert!(said.contains("MEZOD_JOB_STATE=done"), "{said}");
    assert!(said.contains("HOME=/nonexistent"), "nobody's home: {said}");
    assert!(!said.contains(SECRET), "{said}");
    assert!(
        !said.contains("leaked-descriptor") && !said.contains("worker.log"),
        "a descriptor of the daemon's: {said}"
    );
    drop(file);
}

/// A file dropped into spool/new/ by hand: its owner asks `mezod why` and
/// reads the job it became or why it was rejected (rejected/ itself is
/// root's alone); another user learns nothing of it.
#[test]
fn an_owner_reads_why_a_file_dropped_by_hand_was_rejected() {
    let (tmp, _) = arena();
    let d = Daemon::start(tmp.path(), CONFIG);
    let bad = tmp.path().join("bad.yaml");
    std::fs::write(&bad, "model: {path: /nowhere}\nmezo: [not, a, map]\n").unwrap();
    std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o644)).unwrap();
    drop_as_nobody(&d, &bad, "by-hand.yaml");
    d.wait_until("the file to be judged", |d| {
        !d.spool().join("new/by-hand.yaml").exists()
    });
    let mine = mezod_as(NOBODY, &d, &["why", "by-hand.yaml"]);
    assert_eq!(mine.status.code(), Some(1), "{}", text(&mine));
    assert!(
        text(&mine).contains("by-hand.yaml was rejected:") && text(&mine).contains("mezo"),
        "{}",
        text(&mine)
    );
    // A path is taken by its last part, as the file was named in new/.
    let by_path = mezod_as(NOBODY, &d, &["why", "somewhere/by-hand.yaml"]);
    assert_eq!(by_path.status.code(), Some(1), "{}", text(&by_path));
    let nosy = mezod_as(NOSY, &d, &["why", "by-hand.yaml"]);
    assert_eq!(nosy.status.code(), Some(2), "{}", text(&nosy));
    assert!(!text(&nosy).contains("rejected"), "{}", text(&nosy));

    let id = drop_nobody_job(&d, tmp.path(), "good", 2, None);
    let taken = mezod_as(NOBODY, &d, &["why", "good.yaml"]);
    assert_eq!(taken.status.code(), Some(0), "{}", text(&taken));
    assert!(
        text(&taken).contains(&format!("good.yaml became job {id}")),
        "{}",
        text(&taken)
    );
}
