//! Parameter-efficient tuning: `tuning: lora` and `tuning: prefix` on every
//! architecture (decoders and the BERT family) lower the loss, tune only their own tensors, resume
//! bit-identically after SIGKILL and travel as `.mezo` files; their PEFT
//! adapters load in the `peft` package and compute what mezod computes (LoRA:
//! the merged export; prefix: mezod's own logits); a prefix
//! initialized from random tokens' activations is exactly the base model
//! reading those tokens first.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use mezod::model::adapters::{prefix_init_tokens, LoraConfig, PrefixConfig, Tuning};
use mezod::model::{Dtype, LanguageModel, ModelSource};
use tch::{Device, Tensor};

/// The encoders (masked LMs) join the decoders for adapters and resume.
const ALL: [&str; 5] = ["opt", "gpt2", "llama", "bert", "roberta"];

/// (lr, eps) for the fixtures: their tiny random weights need large steps
/// (prefixes most) to move the loss within a test's few hundred steps.
fn step_sizes(tuning: &str) -> (&'static str, &'static str) {
    if tuning == "prefix" {
        ("1.0", "1.0e-1")
    } else {
        ("5.0e-2", "1.0e-2")
    }
}

fn tuned_job(dir: &Path, arch: &str, tuning: &str) -> PathBuf {
    let (lr, eps) = step_sizes(tuning);
    let job = causal_job(
        dir,
        arch,
        &format!(
            "steps: 200, batch_size: 4, lr: {lr}, eps: {eps}, seed: 5, eval_every: 100, \
             snapshot_every: 30"
        ),
    );
    let text = format!(
        "tuning: {tuning}\n{}",
        std::fs::read_to_string(&job).unwrap()
    );
    let job = dir.join(format!("{arch}-{tuning}.yaml"));
    std::fs::write(&job, text).unwrap();
    job
}

/// A prompt-classification job on a masked-LM fixture (examples/mlm.yaml)
/// without a dev split, so the exported weights are the trained ones.
fn masked_job(dir: &Path, arch: &str, tuning: &str) -> PathBuf {
    let (lr, eps) = step_sizes(tuning);
    let text = example_job_text("mlm")
        .replace("fixtures/roberta", &format!("fixtures/{arch}"))
        .replace(
            "mode: [zero_shot, linear_probe, mezo]",
            "mode: [zero_shot, mezo]",
        )
        .replace("dev_fraction: 0.2", "dev_fraction: 0.0")
        .replace(
            "steps: 200, batch_size: 64, lr: 1.0e-6, eps: 1.0e-3, seed: 1, eval_every: 100",
            &format!(
                "steps: 200, batch_size: 8, lr: {lr}, eps: {eps}, seed: 1, snapshot_every: 30"
            ),
        );
    assert!(text.contains("dev_fraction: 0.0") && text.contains("snapshot_every"));
    let job = dir.join(format!("{arch}-{tuning}.yaml"));
    std::fs::write(&job, format!("tuning: {tuning}\n{text}")).unwrap();
    job
}

/// Trains, checks what was trained, kills and resumes; returns the finished run.
fn train_and_resume(dir: &Path, arch: &str, tuning: &str, trained: &[&str]) -> PathBuf {
    let masked = matches!(arch, "bert" | "roberta");
    let job = if masked {
        masked_job(dir, arch, tuning)
    } else {
        tuned_job(dir, arch, tuning)
    };
    let solo = dir.join(format!("{arch}-{tuning}-solo"));
    run_to_end(&job, &solo, &format!("{arch} {tuning} run"));
    let r = read_result(&solo);
    assert!(
        masked || r["best"].as_f64().unwrap() < r["zero_shot"].as_f64().unwrap() - 0.01,
        "{arch} {tuning}: no lower dev loss: {r}"
    );
    let snapshot = std::fs::read_dir(solo.join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .expect("a snapshot");
    let bytes = std::fs::read(&snapshot).unwrap();
    let names: Vec<String> = safetensors::SafeTensors::deserialize(&bytes)
        .unwrap()
        .names()
        .into_iter()
        .map(str::to_string)
        .collect();
    assert!(!names.is_empty());
    assert!(
        names.iter().all(|n| trained.iter().any(|t| n.contains(t))),
        "{arch} {tuning}: snapshots hold more than the tuned tensors: {names:?}"
    );
    let run = dir.join(format!("{arch}-{tuning}-killed"));
    let killed_at = kill_and_resume(&job, &run, 40);
    assert!(killed_at < 200, "{arch} {tuning}: ended before the kill");
    let mut files = vec!["model/model.safetensors"];
    if tuning == "prefix" {
        files.push("model/prefix.safetensors");
    }
    if tuning == "lora" || !masked {
        files.push("adapter/adapter_model.safetensors");
    }
    for file in files {
        assert!(solo.join(file).is_file(), "{arch} {tuning}: no {file}");
        assert_eq!(
            sha256(&run.join(file)),
            sha256(&solo.join(file)),
            "{arch} {tuning}: {file} after a kill at step {killed_at}"
        );
    }
    solo
}

#[test]
fn lora_lowers_the_loss_resumes_exactly_and_its_peft_adapter_equals_the_merged_model() {
    let tmp = tempfile::tempdir().unwrap();
    for arch in ALL {
        let run = train_and_resume(tmp.path(), arch, "lora", &[".lora_A.", ".lora_B."]);
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(run.join("adapter/adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            (config["r"].as_i64(), config["lora_alpha"].as_f64()),
            (Some(8), Some(16.0))
        );
        assert_eq!(
            config["base_model_name_or_path"].as_str(),
            Some(fixture(arch).to_str().unwrap()),
            "the adapter records its base"
        );
        check(
            python()
                .arg(root().join("scripts/check_peft_adapter.py"))
                .arg(fixture(arch))
                .arg(run.join("adapter"))
                .arg(run.join("model"))
                .output()
                .unwrap(),
            &format!("{arch}: the PEFT adapter against the merged model"),
        );
        // The merged export really moved: the base's own weights differ from it.
        assert_ne!(
            sha256(&run.join("model/model.safetensors")),
            sha256(&fixture(arch).join("model.safetensors"))
        );
    }
}

#[test]
fn prefix_tuning_lowers_the_loss_resumes_exactly_and_its_peft_adapter_computes_the_same() {
    let tmp = tempfile::tempdir().unwrap();
    for arch in ALL {
        let run = train_and_resume(tmp.path(), arch, "prefix", &["prefix."]);
        assert_eq!(
            sha256(&run.join("model/model.safetensors")),
            sha256(&export_of_base(tmp.path(), arch)),
            "{arch}: prefix tuning changed the base weights"
        );
        if matches!(arch, "bert" | "roberta") {
            assert!(
                !run.join("adapter").exists(),
                "PEFT has no masked-LM prefix"
            );
            continue;
        }
        let expect = tmp.path().join(format!("{arch}-prefix-logits.json"));
        write_prefix_logits(arch, &run, &expect);
        check(
            python()
                .arg(root().join("scripts/check_peft_adapter.py"))
                .arg(fixture(arch))
                .arg(run.join("adapter"))
                .arg("--expect")
                .arg(&expect)
                .output()
                .unwrap(),
            &format!("{arch}: the PEFT prefix adapter against mezod's logits"),
        );
    }
}

/// mezod's logits, with the prefixes a run exported, for two token sequences
/// (the `--expect` file of scripts/check_peft_adapter.py).
fn write_prefix_logits(arch: &str, run: &Path, out: &Path) {
    // tuned_job's settings: 5 tokens, seed 5 (the trained values replace them).
    let model = open(arch, &Tuning::Prefix(PrefixConfig { tokens: 5, seed: 5 }));
    let bytes = std::fs::read(run.join("model/prefix.safetensors")).unwrap();
    let stored = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    tch::no_grad(|| {
        for p in model.params.iter() {
            let view = stored.tensor(&p.name).unwrap();
            let t = Tensor::from_data_size(view.data(), &p.tensor.size(), tch::Kind::Float);
            p.tensor.shallow_clone().copy_(&t);
        }
    });
    let ids: Vec<Vec<i64>> = vec![vec![5, 17, 42, 99, 7, 3], vec![11, 2, 250, 31]];
    let logits: Vec<Vec<Vec<f32>>> = ids
        .iter()
        .map(|s| {
            let t = Tensor::from_slice(s).view([1, s.len() as i64]);
            Vec::<Vec<f32>>::try_from(model.logits(&t, &t.ones_like()).get(0)).unwrap()
        })
        .collect();
    let json = serde_json::json!({"ids": ids, "logits": logits});
    std::fs::write(out, json.to_string()).unwrap();
}

/// The base model exported untouched (same dtype and layout as a run's export).
fn export_of_base(dir: &Path, arch: &str) -> PathBuf {
    let out = dir.join(format!("{arch}-base"));
    let model = LanguageModel::load(&fixture(arch), Dtype::F32, Device::Cpu).unwrap();
    mezod::model::export::export_hf(&model, &out).unwrap();
    out.join("model.safetensors")
}

#[test]
fn lora_and_prefix_fine_tunes_travel_as_mezo_files() {
    let tmp = tempfile::tempdir().unwrap();
    for tuning in ["lora", "prefix"] {
        let job = tuned_job(tmp.path(), "llama", tuning);
        let run = tmp.path().join(format!("run-{tuning}"));
        run_to_end(&job, &run, "run");
        let file = tmp.path().join(format!("{tuning}.mezo"));
        let tune = export_tune_file(&run, &file);
        assert_eq!(tune["tuning"], tuning);
        assert!(std::fs::metadata(&file).unwrap().len() < 64 * 1024);
        let out = tmp.path().join(format!("applied-{tuning}"));
        check(
            mezod()
                .arg("apply")
                .arg(&file)
                .arg("-o")
                .arg(&out)
                .output()
                .unwrap(),
            "mezod apply",
        );
        let files: &[&str] = if tuning == "prefix" {
            &["model.safetensors", "prefix.safetensors"]
        } else {
            &["model.safetensors"]
        };
        for f in files {
            assert_eq!(
                sha256(&out.join(f)),
                sha256(&run.join("model").join(f)),
                "{tuning} {f}"
            );
        }
        // Version 2 (an older mezod refuses it), with the run's starting adapters.
        assert_eq!(tune["version"], 2);
        let initial = std::fs::read_to_string(run.join("initial.sha256")).unwrap();
        assert_eq!(tune["initial_sha256"], initial.trim());
        // Another start is refused (a prefix built on another device), unless forced.
        let mut other = tune.clone();
        other["initial_sha256"] = "0".repeat(64).into();
        let other_file = tmp.path().join(format!("{tuning}-other.mezo"));
        std::fs::write(&other_file, other.to_string()).unwrap();
        let refused = mezod()
            .arg("apply")
            .arg(&other_file)
            .arg("-o")
            .arg(tmp.path().join("refused"))
            .output()
            .unwrap();
        assert!(!refused.status.success());
        assert!(String::from_utf8_lossy(&refused.stderr).contains("--force"));
        check(
            mezod()
                .arg("apply")
                .arg(&other_file)
                .arg("-o")
                .arg(tmp.path().join(format!("forced-{tuning}")))
                .arg("--force")
                .output()
                .unwrap(),
            "mezod apply --force",
        );
        // A resume that would start elsewhere is refused too (the export is
        // removed so that there is something to resume: a finished run run
        // again only shows its result).
        std::fs::write(run.join("initial.sha256"), "0".repeat(64)).unwrap();
        let model_dir = run.join("model");
        let kept = tmp.path().join(format!("{tuning}-model-kept"));
        std::fs::rename(&model_dir, &kept).unwrap();
        let resumed = mezod_run(&job, &run);
        assert!(!resumed.status.success());
        assert!(String::from_utf8_lossy(&resumed.stderr).contains("starting"));
        std::fs::rename(&kept, &model_dir).unwrap();
        let py = python()
            .arg(root().join("scripts/mezo_rebuild.py"))
            .arg(&file)
            .arg("--base")
            .arg(fixture("llama"))
            .arg("-o")
            .arg(tmp.path().join("py.safetensors"))
            .output()
            .unwrap();
        assert!(!py.status.success());
        assert!(String::from_utf8_lossy(&py.stderr).contains("mezod apply"));
    }
}

fn open(arch: &str, tuning: &Tuning) -> LanguageModel {
    LanguageModel::open_tuned(
        &ModelSource::Pretrained(fixture(arch)),
        Dtype::F32,
        Device::Cpu,
        tuning,
    )
    .unwrap()
}

#[test]
fn a_prefix_from_real_activations_is_the_model_reading_those_tokens_first() {
    let ids = Tensor::from_slice(&[5i64, 17, 42, 99, 7, 3]).view([1, 6]);
    let mask = ids.ones_like();
    for arch in ["opt", "gpt2", "llama", "mistral", "qwen2"] {
        let (n, seed) = (4, 11);
        let base = LanguageModel::load(&fixture(arch), Dtype::F32, Device::Cpu).unwrap();
        let tuned = open(arch, &Tuning::Prefix(PrefixConfig { tokens: n, seed }));
        assert_eq!(tuned.params.len(), 2 * layers(&base));
        assert!(tuned
            .params
            .iter()
            .all(|p| p.name.starts_with("prefix.") && p.tensor.size()[1] == n));
        let config: serde_json::Value = serde_json::from_str(&base.config_text).unwrap();
        let vocab = config["vocab_size"].as_i64().unwrap();
        let first = prefix_init_tokens(seed, n, vocab);
        let joined = Tensor::cat(&[&first, &ids], 1);
        let expected = base.logits(&joined, &joined.ones_like()).narrow(1, n, 6);
        let got = tuned.logits(&ids, &mask);
        let diff = (&got - &expected).abs().max().double_value(&[]);
        assert!(
            diff < 1e-4,
            "{arch}: prefix vs reading the tokens first: {diff}"
        );
        // And the prefix matters: without it the logits are another model's.
        let plain = base.logits(&ids, &mask);
        assert!(
            (&got - &plain).abs().max().double_value(&[]) > 1e-3,
            "{arch}"
        );
    }
}

fn layers(model: &LanguageModel) -> usize {
    model
        .params
        .iter()
        .filter(|p| {
            ["q_proj.weight", "c_attn.weight", "self.query.weight"]
                .iter()
                .any(|q| p.name.ends_with(q))
        })
        .count()
}

#[test]
fn lora_starts_at_the_base_model_and_tunes_only_its_adapters() {
    let ids = Tensor::from_slice(&[5i64, 17, 42, 99, 7, 3]).view([1, 6]);
    for arch in ALL {
        let base = LanguageModel::load(&fixture(arch), Dtype::F32, Device::Cpu).unwrap();
        let lora = |targets: Vec<String>| {
            Tuning::Lora(LoraConfig {
                r: 4,
                alpha: 8.0,
                targets,
                seed: 3,
            })
        };
        let tuned = open(arch, &lora(Vec::new()));
        assert!(tuned
            .logits(&ids, &ids.ones_like())
            .equal(&base.logits(&ids, &ids.ones_like())));
        assert_eq!(tuned.params.len(), 2 * tuned.lora_sites.len());
        let per_layer = if arch == "gpt2" { 1 } else { 2 };
        assert_eq!(tuned.lora_sites.len(), per_layer * layers(&base), "{arch}");
        assert_eq!(tuned.frozen.len(), base.params.len());
        for s in &tuned.lora_sites {
            assert_eq!(s.lora.a.size()[0], 4);
            assert_eq!(s.lora.b.abs().max().double_value(&[]), 0.0);
        }
        let e = LanguageModel::open_tuned(
            &ModelSource::Pretrained(fixture(arch)),
            Dtype::F32,
            Device::Cpu,
            &lora(vec!["nonexistent".into()]),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            e.contains("\"nonexistent\"") && e.contains("linear layers"),
            "{e}"
        );
    }
}

#[test]
fn the_lora_example_asks_for_the_papers_adapters() {
    let spec = mezod::spec::JobSpec::parse(&example_job_text("lora"), &root()).unwrap();
    assert_eq!(
        spec.tuning(),
        Tuning::Lora(LoraConfig {
            r: 8,
            alpha: 16.0,
            targets: vec!["q_proj".into(), "v_proj".into()],
            seed: 1,
        })
    );
}

#[test]
fn prefixed_rows_in_a_left_padded_batch_read_as_alone() {
    let rows: [&[i64]; 2] = [&[5, 17, 42, 99, 7, 3], &[11, 2, 25]];
    for arch in ALL {
        let model = open(arch, &Tuning::Prefix(PrefixConfig { tokens: 3, seed: 2 }));
        let (ids, mask) =
            mezod::tokenize::pad_left(&rows.iter().map(|r| r.to_vec()).collect::<Vec<_>>(), 0);
        let batch = model.logits(&ids, &mask);
        for (i, row) in rows.iter().enumerate() {
            let t = Tensor::from_slice(row).view([1, row.len() as i64]);
            let alone = model.logits(&t, &t.ones_like()).get(0);
            let n = row.len() as i64;
            let padded = batch.get(i as i64).narrow(0, 6 - n, n);
            let diff = (&padded - &alone).abs().max().double_value(&[]);
            assert!(diff < 1e-4, "{arch} row {i}: {diff}");
        }
    }
}

#[test]
fn a_prefix_longer_than_the_learned_positions_is_a_clear_error() {
    for arch in ["gpt2", "opt", "roberta"] {
        let base = LanguageModel::load(&fixture(arch), Dtype::F32, Device::Cpu).unwrap();
        let limit = base.max_positions().unwrap() as i64;
        let e = LanguageModel::open_tuned(
            &ModelSource::Pretrained(fixture(arch)),
            Dtype::F32,
            Device::Cpu,
            &Tuning::Prefix(PrefixConfig {
                tokens: limit,
                seed: 0,
            }),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            e.contains("prefix.tokens") && e.contains("learned"),
            "{arch}: {e}"
        );
    }
}
