//! A fine-tune in kilobytes: `mezod export` writes a `.mezo` file,
//! `mezod apply` and `scripts/mezo_rebuild.py` (PyTorch, no mezod) rebuild the
//! fine-tuned weights from it, bit-identical to what the run exported, with
//! either generator of z; a different base is refused.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// A 30-step run exporting `export` (`final` or `best`) with `directions`;
/// `best` at a learning rate whose dev loss is best at step 20 of 30 (`fast`
/// f32), so that the run rebuilds that step from its log.
fn run_job(dir: &Path, rng: &str, dtype: &str, directions: usize, export: &str) -> PathBuf {
    let lr = if export == "best" { "5.0e-3" } else { "2.0e-3" };
    run_exporting(
        dir,
        rng,
        dtype,
        &format!("lr: {lr}, directions: {directions}"),
        export,
    )
}

/// A 30-step run of the LLaMA fixture with `settings` among its `mezo:` ones.
fn run_with(dir: &Path, rng: &str, dtype: &str, settings: &str) -> PathBuf {
    run_exporting(dir, rng, dtype, settings, "final")
}

/// `run_with`, handing back the `export` weights.
fn run_exporting(dir: &Path, rng: &str, dtype: &str, settings: &str, export: &str) -> PathBuf {
    let job = causal_job(
        dir,
        "llama",
        &format!(
            "steps: 30, batch_size: 4, eps: 1.0e-3, seed: 5, eval_every: 10, \
             weight_decay: 0.1, rng: {rng}, {settings}"
        ),
    );
    let text = std::fs::read_to_string(&job)
        .unwrap()
        .replace("dtype: f32", &format!("dtype: {dtype}"))
        + &format!("export: {export}\n");
    std::fs::write(&job, text).unwrap();
    let tag: String = format!("{settings}{export}")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    let out = dir.join(format!("run-{rng}-{dtype}-{tag}"));
    run_to_end(&job, &out, "mezod run");
    out
}

/// `mezo_rebuild.py FILE`, checked bit for bit against `against`.
fn python_rebuild(file: &Path, rebuilt: &Path, against: &Path) -> String {
    let out = check(
        python()
            .arg(root().join("scripts/mezo_rebuild.py"))
            .arg(file)
            .arg("--base")
            .arg(fixture("llama"))
            .arg("-o")
            .arg(rebuilt)
            .arg("--check")
            .arg(against)
            .output()
            .unwrap(),
        "scripts/mezo_rebuild.py",
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn every_estimator_rebuilds_the_exported_weights_in_rust_and_in_python() {
    let tmp = tempfile::tempdir().unwrap();
    for (rng, dtype, settings, estimator, perturbation) in [
        (
            "fast",
            "f32",
            "estimator: fzoo, directions: 3, lr: 3.0e-6",
            "fzoo",
            "rademacher",
        ),
        (
            "torch",
            "bf16",
            "estimator: fzoo, directions: 2, lr: 3.0e-6",
            "fzoo",
            "rademacher",
        ),
        (
            "fast",
            "f32",
            "estimator: sparse, sparsity: 0.5, lr: 4.0e-3",
            "sparse",
            "gaussian",
        ),
        (
            "torch",
            "bf16",
            "estimator: sparse, directions: 2, lr: 4.0e-3",
            "sparse",
            "gaussian",
        ),
        (
            "fast",
            "bf16",
            "perturbation: rademacher, lr: 2.0e-3",
            "mezo",
            "rademacher",
        ),
        (
            "torch",
            "f32",
            "estimator: sparse, perturbation: rademacher, lr: 4.0e-3",
            "sparse",
            "rademacher",
        ),
        (
            "fast",
            "f32",
            "estimator: lozo, rank: 2, basis_every: 3, lr: 2.0e-3",
            "lozo",
            "gaussian",
        ),
        (
            "torch",
            "bf16",
            "estimator: lozo, directions: 2, basis_every: 4, lr: 4.0e-3",
            "lozo",
            "gaussian",
        ),
        (
            "torch",
            "f32",
            "estimator: lozo, rank: 3, perturbation: rademacher, lr: 2.0e-3",
            "lozo",
            "rademacher",
        ),
        (
            "fast",
            "bf16",
            "estimator: lozo, perturbation: rademacher, lr: 4.0e-3",
            "lozo",
            "rademacher",
        ),
    ] {
        let what = format!("{rng} {dtype} {settings}");
        let run = run_with(tmp.path(), rng, dtype, settings);
        assert_eq!(read_result(&run)["exported"]["step"], 30, "{what}");
        let file = tmp.path().join(format!(
            "{}.mezo",
            run.file_name().unwrap().to_string_lossy()
        ));
        export(&run, &file, &[]);
        let tune: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        let version = if estimator == "lozo" { 4 } else { 3 };
        assert_eq!(tune["version"], version, "{what}");
        assert_eq!(
            tune["estimator"].as_str().unwrap_or("mezo"),
            estimator,
            "{what}"
        );
        assert_eq!(
            tune["perturbation"].as_str().unwrap_or("gaussian"),
            perturbation,
            "{what}"
        );
        assert_eq!(
            tune["steps"][0]["spread"].is_f64(),
            estimator == "fzoo",
            "{what}"
        );
        assert_eq!(
            tune["steps"][0]["basis"].is_u64(),
            estimator == "lozo",
            "{what}"
        );

        let applied = tmp.path().join(format!(
            "applied-{}",
            run.file_name().unwrap().to_string_lossy()
        ));
        check(apply(&file, &applied, &[]), "mezod apply");
        assert_eq!(
            sha256(&applied.join("model.safetensors")),
            sha256(&run.join("model/model.safetensors")),
            "{what}: mezod apply differs from the run's exported weights"
        );
        let rebuilt = applied.with_extension("safetensors");
        let said = python_rebuild(&file, &rebuilt, &applied.join("model.safetensors"));
        assert!(said.contains("bit for bit"), "{what}: {said}");
    }
}

fn export(run: &Path, file: &Path, extra: &[&str]) {
    check(
        mezod()
            .arg("export")
            .arg(run)
            .arg("-o")
            .arg(file)
            .args(extra)
            .output()
            .unwrap(),
        "mezod export",
    );
}

fn apply(file: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    mezod()
        .arg("apply")
        .arg(file)
        .arg("-o")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn a_mezo_file_rebuilds_the_exported_weights_in_rust_and_in_python() {
    let tmp = tempfile::tempdir().unwrap();
    // `export: best` rebuilds the best step's weights from the log at the
    // end of the run; `final` hands back those in memory.
    for (rng, dtype, n, weights) in [
        ("fast", "f32", 1, "best"),
        ("torch", "f32", 1, "final"),
        ("fast", "bf16", 1, "final"),
        ("torch", "bf16", 2, "final"),
    ] {
        let run = run_job(tmp.path(), rng, dtype, n, weights);
        let dtype = format!("{dtype}-{n}");
        let result: serde_json::Value = read_result(&run);
        let best = result["exported"]["step"].as_u64().unwrap();
        let want_step = if weights == "best" {
            result["best_step"].as_u64().unwrap()
        } else {
            30
        };
        assert_eq!(best, want_step, "{rng} {dtype} {weights}: {result:#}");
        assert!(
            weights == "final" || best < 30,
            "{rng} {dtype}: the best dev step should come before the last, so that the run \
             rebuilds it from the log: {result:#}"
        );
        assert!(
            best > 0,
            "{rng} {dtype}: the fixture run should improve on zero-shot"
        );
        let file = tmp.path().join(format!("{rng}-{dtype}.mezo"));
        export(&run, &file, &[]);
        let tune: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        assert_eq!(tune["steps"].as_array().unwrap().len() as u64, best);
        assert_eq!(tune["rng"], rng);
        let more = tune["steps"][0]["more"].as_array().map_or(0, |m| m.len());
        assert_eq!(more, n - 1, "n-SPSA steps carry their further directions");
        assert!(
            std::fs::metadata(&file).unwrap().len() < 16 * 1024,
            "kilobytes"
        );

        let want = sha256(&run.join("model/model.safetensors"));
        let applied = tmp.path().join(format!("applied-{rng}-{dtype}"));
        check(apply(&file, &applied, &[]), "mezod apply");
        assert_eq!(
            sha256(&applied.join("model.safetensors")),
            want,
            "{rng} {dtype}: mezod apply differs from the run's exported weights"
        );

        let rebuilt = tmp.path().join(format!("python-{rng}-{dtype}.safetensors"));
        let said = python_rebuild(&file, &rebuilt, &applied.join("model.safetensors"));
        assert!(said.contains("bit for bit"), "{rng} {dtype}: {said}");

        // Every step counts: one step more or less gives other weights.
        let other = if best == 30 { "29" } else { "30" };
        let all = tmp.path().join(format!("all-{rng}-{dtype}.mezo"));
        export(&run, &all, &["--step", other]);
        let applied_all = tmp.path().join(format!("applied-all-{rng}-{dtype}"));
        check(apply(&all, &applied_all, &[]), "mezod apply (30 steps)");
        assert_ne!(sha256(&applied_all.join("model.safetensors")), want);
    }
}

#[test]
fn apply_refuses_another_base_and_a_changed_config_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    let run = run_job(tmp.path(), "fast", "f32", 1, "final");
    let file = tmp.path().join("tune.mezo");
    export(&run, &file, &[]);

    // Other weights: refused, whatever --force says.
    let out = apply(
        &file,
        &tmp.path().join("x"),
        &["--base", fixture("llama3").to_str().unwrap(), "--force"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("not the one the fine-tune was made on"),
        "{stderr}"
    );
    assert!(
        !tmp.path().join("x").exists(),
        "nothing written for a refused base"
    );

    // The same weights under a changed config: refused unless --force.
    let changed = tmp.path().join("changed");
    std::fs::create_dir(&changed).unwrap();
    for f in std::fs::read_dir(fixture("llama")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, changed.join(f.file_name().unwrap())).unwrap();
    }
    let cfg = std::fs::read_to_string(changed.join("config.json")).unwrap();
    let cfg = cfg.replace("\"rope_theta\": 50000.0", "\"rope_theta\": 20000.0");
    assert!(
        cfg.contains("20000"),
        "the fixture config has rope_theta 50000"
    );
    std::fs::write(changed.join("config.json"), cfg).unwrap();
    let base = ["--base", changed.to_str().unwrap()];
    let out = apply(&file, &tmp.path().join("y"), &base);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("config.json differs"),
        "{stderr}"
    );
    check(
        apply(&file, &tmp.path().join("y"), &[base[0], base[1], "--force"]),
        "apply --force",
    );
    assert_eq!(
        sha256(&tmp.path().join("y/model.safetensors")),
        sha256(&run.join("model/model.safetensors"))
    );

    // Not a .mezo file: a plain error.
    let bogus = tmp.path().join("bogus.mezo");
    std::fs::write(&bogus, "{\"format\": \"zip\"}").unwrap();
    let out = apply(&bogus, &tmp.path().join("z"), &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a .mezo file"));
}

/// `mezod apply -o DIR` writes only into an absent or empty folder or one an
/// earlier apply wrote (it says so in mezod-apply.json); a model folder given
/// by mistake is refused and left as it was, unless --force.
#[test]
fn apply_refuses_a_folder_it_did_not_write_unless_forced() {
    let tmp = tempfile::tempdir().unwrap();
    let job = causal_job(
        tmp.path(),
        "llama",
        "steps: 2, batch_size: 2, lr: 1.0e-3, seed: 1",
    );
    let run = tmp.path().join("run");
    run_to_end(&job, &run, "mezod run");
    let file = tmp.path().join("tune.mezo");
    export(&run, &file, &["--step", "2"]);

    let base_copy = tmp.path().join("base-copy");
    std::fs::create_dir(&base_copy).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture("llama").join(f), base_copy.join(f)).unwrap();
    }
    let before = sha256(&base_copy.join("model.safetensors"));
    let out = apply(&file, &base_copy, &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "not written by mezod apply (it has config.json, model.safetensors, tokenizer.json)"
        ),
        "{stderr}"
    );
    assert_eq!(sha256(&base_copy.join("model.safetensors")), before);

    let applied = tmp.path().join("applied");
    check(apply(&file, &applied, &[]), "apply into a new folder");
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(applied.join("mezod-apply.json")).unwrap())
            .unwrap();
    assert_eq!(record["steps"], 2);
    check(
        apply(&file, &applied, &[]),
        "apply again into its own folder",
    );
    check(apply(&file, &base_copy, &["--force"]), "apply --force");
    assert_eq!(
        sha256(&base_copy.join("model.safetensors")),
        sha256(&applied.join("model.safetensors"))
    );
}
