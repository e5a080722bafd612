//! Models named by their Hugging Face id (`model: {path: org/name}`), read
//! from a local Hugging Face cache laid out as huggingface_hub lays it out
//! (`models--org--name/refs/<branch>` → `snapshots/<commit>/`, files linked
//! into `blobs/`), built here from the fixtures; never from the network.  A
//! run pins the commit it started from: a resume after the cache's `main`
//! moved on keeps it, and a `.mezo` file finds it again.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::daemon::Daemon;
use common::*;

const ID: &str = "test-org/tiny-llama";
const REPO: &str = "models--test-org--tiny-llama";
const A: &str = "0a1b2c3d4e5f60718293a4b5c6d7e8f901234567";
const B: &str = "b0c1d2e3f405162738495a6b7c8d9e0f1a2b3c4d";

/// Put `fixture`'s files into the cache at `root` as `ID`'s commit `commit`:
/// each file a blob named by its hash, linked from the snapshot folder.
fn add_snapshot(root: &Path, commit: &str, fixture_name: &str) -> PathBuf {
    let repo = root.join(REPO);
    let snapshot = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(&snapshot).unwrap();
    for file in std::fs::read_dir(fixture(fixture_name)).unwrap() {
        let file = file.unwrap().path();
        let blob = sha256(&file);
        let name = file.file_name().unwrap();
        std::fs::copy(&file, repo.join("blobs").join(&blob)).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/{blob}"), snapshot.join(name)).unwrap();
    }
    snapshot
}

/// Point `refs/<branch>` of `ID` at `commit`, as huggingface_hub writes it
/// (the hash, no newline).
fn set_ref(root: &Path, branch: &str, commit: &str) {
    let refs = root.join(REPO).join("refs");
    std::fs::create_dir_all(&refs).unwrap();
    std::fs::write(refs.join(branch), commit).unwrap();
}

/// `jobs/job.yaml` under `dir`: a short causal-LM job on the model `model`
/// (the text inside `model: {…}`), its data given by absolute path.
fn job_in(dir: &Path, model: &str, mezo: &str) -> PathBuf {
    let jobs = dir.join("jobs");
    std::fs::create_dir_all(&jobs).unwrap();
    let data = root().join("examples/data/reviews.jsonl");
    std::fs::write(
        jobs.join("job.yaml"),
        format!(
            "model: {{{model}, dtype: f32, threads: 1}}\ntask: {{kind: causal_lm}}\n\
             data: {{train: {}, dev: {}, text_field: text, max_dev: 8}}\n\
             mezo: {{steps: 4, batch_size: 2, lr: 2.0e-3, eps: 1.0e-3, seed: 5, {mezo}}}\n",
            data.display(),
            data.display()
        ),
    )
    .unwrap();
    jobs
}

/// `mezod ARGS` run in `folder` with only the Hugging Face variables in `env`
/// set (and `HOME` in `dir`, so no real cache is ever read).
fn mezod_in(folder: &Path, dir: &Path, env: &[(&str, &Path)], args: &[&str]) -> Output {
    let mut c: Command = mezod();
    c.current_dir(folder)
        .env("HOME", dir.join("home"))
        .env("HF_HUB_OFFLINE", "1");
    for var in [
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "HF_HOME",
        "XDG_CACHE_HOME",
    ] {
        c.env_remove(var);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    c.args(args).output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `mezod estimate job.yaml --json`'s total, in `jobs`.
fn estimate_total(jobs: &Path, dir: &Path, env: &[(&str, &Path)]) -> f64 {
    let out = check(
        mezod_in(jobs, dir, env, &["estimate", "job.yaml", "--json"]),
        "mezod estimate",
    );
    serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["total"]
        .as_f64()
        .unwrap()
}

/// The estimate of the same job on a fixture's own folder.
fn fixture_total(dir: &Path, name: &str) -> f64 {
    let there = dir.join(format!("direct-{name}"));
    let jobs = job_in(&there, &format!("path: {}", fixture(name).display()), "");
    estimate_total(&jobs, dir, &[])
}

/// SHA-256 of the weights the same job (`mezo` added to its settings) trains
/// on the fixture's own folder, under `dir/direct`: what a run on the cache's
/// copy must equal.
fn weights_on_the_folder(dir: &Path, mezo: &str) -> String {
    let direct = job_in(
        &dir.join("direct"),
        &format!("path: {}", fixture("llama").display()),
        mezo,
    );
    check(
        mezod_in(&direct, dir, &[], &["run", "job.yaml", "--out", "run"]),
        "mezod run on the fixture's folder",
    );
    sha256(&direct.join("run/model/model.safetensors"))
}

#[test]
fn estimate_and_run_read_an_hf_id_from_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = tmp.path().join("hub");
    let snapshot = add_snapshot(&hub, A, "llama");
    set_ref(&hub, "main", A);
    let env: &[(&str, &Path)] = &[("HF_HUB_CACHE", &hub)];
    let jobs = job_in(tmp.path(), &format!("path: {ID}"), "");

    assert_eq!(
        estimate_total(&jobs, tmp.path(), env),
        fixture_total(tmp.path(), "llama")
    );
    check(
        mezod_in(&jobs, tmp.path(), env, &["run", "job.yaml", "--out", "run"]),
        "mezod run",
    );
    // The frozen spec keeps the id as written and pins the snapshot it read.
    let frozen = std::fs::read_to_string(jobs.join("run/spec.yaml")).unwrap();
    assert!(frozen.contains(&format!("path: {ID}")), "{frozen}");
    assert!(
        frozen.contains(&format!("snapshot: {}", snapshot.display())),
        "{frozen}"
    );
    // The weights are those of the same job on the fixture's folder.
    assert_eq!(
        sha256(&jobs.join("run/model/model.safetensors")),
        weights_on_the_folder(tmp.path(), "")
    );
}

#[test]
fn a_revision_names_a_branch_or_a_full_commit() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = tmp.path().join("hub");
    add_snapshot(&hub, A, "llama");
    add_snapshot(&hub, B, "opt");
    set_ref(&hub, "main", A);
    set_ref(&hub, "v1", B);
    let env: &[(&str, &Path)] = &[("HF_HUB_CACHE", &hub)];
    let (llama, opt) = (
        fixture_total(tmp.path(), "llama"),
        fixture_total(tmp.path(), "opt"),
    );
    assert_ne!(llama, opt, "the two snapshots must tell apart");
    let (by_b, by_a) = (format!(", revision: {B}"), format!(", revision: {A}"));
    for (revision, want) in [
        ("", llama),
        (", revision: main", llama),
        (", revision: v1", opt),
        (by_b.as_str(), opt),
        (by_a.as_str(), llama),
    ] {
        let jobs = job_in(tmp.path(), &format!("path: {ID}{revision}"), "");
        assert_eq!(estimate_total(&jobs, tmp.path(), env), want, "{revision:?}");
    }
    // A revision goes with an id only.
    let jobs = job_in(
        tmp.path(),
        &format!("path: {}, revision: main", fixture("llama").display()),
        "",
    );
    let out = mezod_in(&jobs, tmp.path(), env, &["estimate", "job.yaml"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("model.revision goes with a Hugging Face id"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_miss_names_every_place_it_looked_and_how_to_fill_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let (hub, hf_home, xdg) = (
        tmp.path().join("hub"),
        tmp.path().join("hf-home"),
        tmp.path().join("xdg"),
    );
    // The cache exists but holds another branch only.
    add_snapshot(&hub, A, "llama");
    set_ref(&hub, "v1", A);
    let env: &[(&str, &Path)] = &[
        ("HF_HUB_CACHE", &hub),
        ("HF_HOME", &hf_home),
        ("XDG_CACHE_HOME", &xdg),
    ];
    let jobs = job_in(tmp.path(), &format!("path: {ID}"), "");
    for args in [
        &["estimate", "job.yaml"][..],
        &["run", "job.yaml", "--out", "run"],
    ] {
        let out = mezod_in(&jobs, tmp.path(), env, args);
        let e = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {e}");
        assert_eq!(e.lines().count(), 1, "one error line: {e}");
        for says in [
            format!(
                "model.path {ID} is no file or folder (there is no {}/{ID})",
                jobs.display()
            ),
            format!("{ID} at main is not in the Hugging Face cache"),
            format!(
                "{}/{REPO}/refs/main (HF_HUB_CACHE): no such file (branches and tags there: v1)",
                hub.display()
            ),
            format!("{}/hub/{REPO} (HF_HOME): no such folder", hf_home.display()),
            format!(
                "{}/huggingface/hub/{REPO} (XDG_CACHE_HOME): no such folder",
                xdg.display()
            ),
            format!(
                "{}/home/.cache/huggingface/hub/{REPO} (the default): no such folder",
                tmp.path().display()
            ),
            format!("`hf download {ID}`"),
            format!("copy its {REPO} folder into {}", hub.display()),
        ] {
            assert!(e.contains(&says), "{args:?}: {says}\n  not in: {e}");
        }
        assert!(!jobs.join("run").exists(), "nothing written");
    }
}

#[test]
fn the_cache_is_found_where_hf_home_xdg_or_the_home_folder_put_it() {
    let tmp = tempfile::tempdir().unwrap();
    let llama = fixture_total(tmp.path(), "llama");
    let jobs = job_in(tmp.path(), &format!("path: {ID}"), "");
    let (hf_home, xdg) = (tmp.path().join("hf-home"), tmp.path().join("xdg"));
    let default = tmp.path().join("home/.cache/huggingface/hub");
    for (env, cache) in [
        (vec![("HF_HOME", hf_home.as_path())], hf_home.join("hub")),
        (
            vec![("XDG_CACHE_HOME", xdg.as_path())],
            xdg.join("huggingface/hub"),
        ),
        (vec![], default.clone()),
    ] {
        add_snapshot(&cache, A, "llama");
        set_ref(&cache, "main", A);
        assert_eq!(estimate_total(&jobs, tmp.path(), &env), llama, "{env:?}");
        std::fs::remove_dir_all(&cache).unwrap();
    }
    // Under HF_HUB_CACHE first, as huggingface_hub reads it: there main is opt.
    let (hub, opt) = (tmp.path().join("hub"), fixture_total(tmp.path(), "opt"));
    add_snapshot(&hub, B, "opt");
    set_ref(&hub, "main", B);
    add_snapshot(&hf_home.join("hub"), A, "llama");
    set_ref(&hf_home.join("hub"), "main", A);
    let env: &[(&str, &Path)] = &[("HF_HUB_CACHE", &hub), ("HF_HOME", &hf_home)];
    assert_eq!(estimate_total(&jobs, tmp.path(), env), opt);
}

#[test]
fn a_resume_keeps_the_commit_its_run_started_from_after_main_moves_on() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = tmp.path().join("hub");
    let a = add_snapshot(&hub, A, "llama");
    set_ref(&hub, "main", A);
    let env: &[(&str, &Path)] = &[("HF_HUB_CACHE", &hub)];
    let jobs = job_in(tmp.path(), &format!("path: {ID}"), "snapshot_every: 2");
    let want = weights_on_the_folder(tmp.path(), "snapshot_every: 2");

    // Killed at its first snapshot, after two steps.
    let mut crash = mezod();
    crash
        .current_dir(&jobs)
        .env("HOME", tmp.path().join("home"))
        .env("HF_HUB_CACHE", &hub)
        .env("FAILPOINTS", "snapshot-before-hash=return")
        .args(["run", "job.yaml", "--out", "run"]);
    let crashed = crash.output().unwrap();
    assert!(
        stderr(&crashed).contains("crash points armed"),
        "this build has no crash points: build with --features failpoints (make test does)"
    );
    assert_eq!(
        crashed.status.signal(),
        Some(libc::SIGABRT),
        "{}",
        stderr(&crashed)
    );

    // The cache's main moves on to another model; the resume keeps A.
    add_snapshot(&hub, B, "opt");
    set_ref(&hub, "main", B);
    let mut resume = mezod();
    resume
        .current_dir(&jobs)
        .env("HOME", tmp.path().join("home"))
        .env("HF_HUB_CACHE", &hub)
        .env("MEZOD_LOG", "info")
        .args(["run", "job.yaml", "--out", "run"]);
    let resumed = check(resume.output().unwrap(), "the resume");
    assert!(
        stderr(&resumed).contains(&format!(
            "{ID} at main now resolves to {B}; the run goes on from commit {A}"
        )),
        "{}",
        stderr(&resumed)
    );
    assert_eq!(
        sha256(&jobs.join("run/model/model.safetensors")),
        want,
        "the resumed run is the uninterrupted one"
    );
    let frozen = std::fs::read_to_string(jobs.join("run/spec.yaml")).unwrap();
    assert!(frozen.contains(&format!("snapshots/{A}")), "{frozen}");

    // With A gone from the cache, the run is refused, with how to get A back.
    std::fs::remove_dir_all(&a).unwrap();
    let out = mezod_in(&jobs, tmp.path(), env, &["run", "job.yaml", "--out", "run"]);
    let e = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{e}");
    for says in [
        format!("this run started from {ID} at commit {A}"),
        format!("main now resolves to {B}"),
        "pass --restart".into(),
        format!("hf download {ID} --revision {A}"),
    ] {
        assert!(e.contains(&says), "{says}\n  not in: {e}");
    }
}

#[test]
fn a_mezo_file_pins_the_commit_and_finds_it_in_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = tmp.path().join("hub");
    add_snapshot(&hub, A, "llama");
    set_ref(&hub, "main", A);
    let env: &[(&str, &Path)] = &[("HF_HUB_CACHE", &hub)];
    let jobs = job_in(tmp.path(), &format!("path: {ID}"), "");
    check(
        mezod_in(&jobs, tmp.path(), env, &["run", "job.yaml", "--out", "run"]),
        "mezod run",
    );
    check(
        mezod_in(
            &jobs,
            tmp.path(),
            env,
            &["export", "run", "-o", "tune.mezo"],
        ),
        "mezod export",
    );
    let tune: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(jobs.join("tune.mezo")).unwrap()).unwrap();
    assert_eq!(tune["base"]["hub"]["id"], ID);
    assert_eq!(tune["base"]["hub"]["commit"], A);
    let want = sha256(&jobs.join("run/model/model.safetensors"));

    // main moves on; `--base ID` is still the file's commit.
    add_snapshot(&hub, B, "opt");
    set_ref(&hub, "main", B);
    check(
        mezod_in(
            &jobs,
            tmp.path(),
            env,
            &["apply", "tune.mezo", "--base", ID, "-o", "by-id"],
        ),
        "mezod apply --base ID",
    );
    assert_eq!(sha256(&jobs.join("by-id/model.safetensors")), want);

    // The cache moves (another machine): the recorded folder is gone, the
    // recorded id and commit are found in the cache named now.
    let moved = tmp.path().join("elsewhere");
    std::fs::rename(&hub, &moved).unwrap();
    let env: &[(&str, &Path)] = &[("HF_HUB_CACHE", &moved)];
    check(
        mezod_in(
            &jobs,
            tmp.path(),
            env,
            &["apply", "tune.mezo", "-o", "recorded"],
        ),
        "mezod apply",
    );
    assert_eq!(sha256(&jobs.join("recorded/model.safetensors")), want);

    // In no cache: the warning names where it looked and the commit to fetch.
    let empty = tmp.path().join("empty");
    let env: &[(&str, &Path)] = &[("HF_HUB_CACHE", &empty)];
    let out = mezod_in(
        &jobs,
        tmp.path(),
        env,
        &["apply", "tune.mezo", "-o", "nowhere"],
    );
    let e = stderr(&out);
    assert!(!out.status.success(), "{e}");
    for says in [
        format!("{ID} at {A} is not in the Hugging Face cache"),
        format!("{}/{REPO} (HF_HUB_CACHE): no such folder", empty.display()),
        format!("`hf download {ID} --revision {A}`"),
    ] {
        assert!(e.contains(&says), "{says}\n  not in: {e}");
    }
}

/// `mezod submit` of a job naming its model by id: the spooled job carries
/// the snapshot found in the submitter's cache, so the daemon (which looks
/// nothing up, and whose workers have none of the submitter's variables)
/// runs it, on that commit.
#[test]
fn a_submitted_job_runs_on_the_snapshot_its_submitter_found() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let snapshot = add_snapshot(&cache, A, "llama");
    set_ref(&cache, "main", A);
    let jobs = job_in(dir.path(), &format!("path: {ID}"), "");
    let daemon_root = dir.path().join("daemon");
    std::fs::create_dir_all(&daemon_root).unwrap();
    let d = Daemon::start(
        &daemon_root,
        "cpu_slots: 1\nretry_limit: 0\nrescan_interval_s: 1\n",
    );
    let out = mezod_in(
        &jobs,
        dir.path(),
        &[("HF_HUB_CACHE", &cache)],
        &[
            "submit",
            "job.yaml",
            "--socket",
            d.socket().to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let id: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let job = d.wait_done(id);
    assert_eq!(job["state"], "done", "{job:#}");
    let frozen = std::fs::read_to_string(d.job_dir(id).join("run/spec.yaml")).unwrap();
    assert!(
        frozen.contains(&format!("snapshot: {}", snapshot.display())),
        "{frozen}"
    );
}
