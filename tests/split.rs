//! One model split over several devices (`model.device: [cpu, cpu]`).  On one
//! machine's CPUs a split takes every path a split over GPUs takes (layers
//! placed by free memory, each weight loaded where its part goes, hidden
//! states and masks moved to each layer's device, z drawn and added where
//! each weight is, the split recorded and kept by a resume) while every
//! operation runs on the CPU: its results must equal the unsplit model's
//! bit for bit.  What only real GPUs show (the copies between them) is
//! `bench/gpu.sh`'s to measure.

mod common;
use common::*;

use std::path::Path;
use std::sync::Mutex;

use mezod::model::adapters::{LoraConfig, PrefixConfig, Tuning};
use mezod::model::{DeviceMap, Dtype, LanguageModel, ModelSource};
use mezod_core::model_ref::DeviceRef;
use mezod_core::placement::{layer_index, on_first_device, Split};
use serde::Deserialize;
use tch::{Device, Tensor};

/// torch's generator is process-wide and adapters draw from it: tests that
/// build models with adapters take turns.
static TORCH_RNG: Mutex<()> = Mutex::new(());

#[derive(Deserialize)]
struct Case {
    ids: Vec<Vec<i64>>,
    attention_mask: Vec<Vec<i64>>,
}

#[derive(Deserialize)]
struct Reference {
    cases: Vec<Case>,
}

/// The fixture's reference inputs (left-padded batches among them).
fn inputs(name: &str) -> Vec<(Tensor, Tensor)> {
    let text = std::fs::read_to_string(fixture(name).join("reference.json")).unwrap();
    let r: Reference = serde_json::from_str(&text).unwrap();
    r.cases
        .iter()
        .map(|c| {
            let (b, t) = (c.ids.len() as i64, c.ids[0].len() as i64);
            (
                Tensor::from_slice(&c.ids.concat()).view([b, t]),
                Tensor::from_slice(&c.attention_mask.concat()).view([b, t]),
            )
        })
        .collect()
}

fn source(name: &str) -> ModelSource {
    ModelSource::Pretrained(fixture(name))
}

/// The model placed over `cpus` CPU entries by free memory, as `mezod run` places it.
fn split_model(name: &str, cpus: usize, tuning: &Tuning) -> (LanguageModel, Split) {
    let (map, split) =
        DeviceMap::plan(&source(name), Dtype::F32, &vec![DeviceRef::Cpu; cpus]).unwrap();
    let model = LanguageModel::open_placed(&source(name), Dtype::F32, map, tuning).unwrap();
    (model, split)
}

/// Weights (names and bits) and logits of every reference input equal.
fn assert_same_model(name: &str, one: &LanguageModel, split: &LanguageModel) {
    let names = |m: &LanguageModel| m.params.iter().map(|p| p.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(one), names(split), "{name}: canonical order");
    for (a, b) in one.params.iter().zip(split.params.iter()) {
        assert!(a.tensor.equal(&b.tensor), "{name}: {} differs", a.name);
    }
    for (ids, mask) in inputs(name) {
        let (a, b) = (one.logits(&ids, &mask), split.logits(&ids, &mask));
        assert_eq!(b.device(), Device::Cpu);
        assert!(a.equal(&b), "{name}: split logits differ");
    }
}

/// Each weight went where the split says: its layer's device, else the
/// first device (embeddings, a tied decoder's bias) or the last (the final
/// norm, the head), exactly as the estimate counts its bytes.
fn assert_placed_as_split(name: &str, model: &LanguageModel, split: &Split) {
    let slots = split.layer_slots();
    let last = split.devices.len() - 1;
    assert!(!model.placed.is_empty());
    for (weight, slot) in &model.placed {
        let want = match layer_index(weight) {
            Some(i) => slots[i],
            None if on_first_device(weight) => 0,
            None => last,
        };
        assert_eq!(*slot, want, "{name}: {weight} on device {slot}, not {want}");
    }
}

#[test]
fn every_architecture_split_over_two_cpus_gives_the_logits_of_one() {
    for name in ALL_FIXTURES {
        let one = LanguageModel::load(&fixture(name), Dtype::F32, Device::Cpu).unwrap();
        let (two, split) = split_model(name, 2, &Tuning::Full);
        assert_eq!(split.layers, [1, 1], "{name}: 2 layers on 2 equal devices");
        assert_eq!(two.map.devices().len(), 2);
        assert_placed_as_split(name, &two, &split);
        assert_same_model(name, &one, &two);
    }
}

/// More devices than layers: a device is left without layers (the split
/// says so in the run's log), and the model still computes the same.
#[test]
fn three_cpus_for_two_layers_leave_the_middle_one_empty() {
    for name in ["llama", "gpt2", "opt-postln", "roberta"] {
        let one = LanguageModel::load(&fixture(name), Dtype::F32, Device::Cpu).unwrap();
        let (three, split) = split_model(name, 3, &Tuning::Full);
        assert_eq!(split.layers, [1, 0, 1], "{name}");
        assert!(three.placed.iter().all(|(_, slot)| *slot != 1), "{name}");
        assert_placed_as_split(name, &three, &split);
        assert_same_model(name, &one, &three);
    }
}

/// LoRA adapters are made on their layer's device; a prefix comes from a
/// forward pass through the split model.  Both equal the unsplit ones.
#[test]
fn adapters_live_with_their_layer_and_equal_the_unsplit_ones() {
    let _rng = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let lora = Tuning::Lora(LoraConfig {
        r: 4,
        alpha: 8.0,
        targets: vec![],
        seed: 3,
    });
    let prefix = Tuning::Prefix(PrefixConfig { tokens: 3, seed: 3 });
    for name in ["llama", "gpt2", "opt", "bert"] {
        for tuning in [&lora, &prefix] {
            let one =
                LanguageModel::open_tuned(&source(name), Dtype::F32, Device::Cpu, tuning).unwrap();
            let (two, split) = split_model(name, 2, tuning);
            assert_placed_as_split(name, &two, &split);
            if let Tuning::Lora(_) = tuning {
                let adapters: Vec<_> = two
                    .placed
                    .iter()
                    .filter(|(n, _)| n.contains("lora_"))
                    .collect();
                assert!(!adapters.is_empty(), "{name}: LoRA adapters");
                assert!(adapters.iter().any(|(_, slot)| *slot == 1), "{name}");
            }
            assert_same_model(name, &one, &two);
        }
    }
}

/// A job file's text with `device:` added to its model.
fn with_device(job: &Path, device: &str, file: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(job)
        .unwrap()
        .replace("threads: 1}", &format!("threads: 1, device: {device}}}"));
    assert!(text.contains("device:"));
    let path = job.with_file_name(file);
    std::fs::write(&path, text).unwrap();
    path
}

/// The seed log's records, each written out in full (Rust prints a float
/// with the digits that read back as exactly it).
fn seed_log(run: &Path) -> Vec<String> {
    mezod_core::seedlog::SeedLog::open(&run.join("seedlog"))
        .unwrap()
        .contiguous()
        .unwrap()
        .iter()
        .map(|r| format!("{r:?}"))
        .collect()
}

#[test]
fn a_split_run_logs_and_exports_what_one_device_does() {
    let tmp = tempfile::tempdir().unwrap();
    for rng in ["fast", "torch"] {
        let one = causal_job(
            tmp.path(),
            "llama",
            &format!("steps: 12, batch_size: 2, lr: 2.0e-3, eps: 1.0e-3, seed: 4, eval_every: 6, rng: {rng}"),
        );
        let split = with_device(&one, "[cpu, cpu]", "split.yaml");
        let (a, b) = (
            tmp.path().join(format!("one-{rng}")),
            tmp.path().join(format!("split-{rng}")),
        );
        run_to_end(&one, &a, "one device");
        run_to_end(&split, &b, "two devices");
        let log = seed_log(&a);
        assert_eq!(log.len(), 12);
        assert_eq!(seed_log(&b), log, "rng {rng}: seed-log records differ");
        assert_eq!(metrics_steps(&b), metrics_steps(&a), "rng {rng}");
        assert_eq!(
            sha256(&b.join("model/model.safetensors")),
            sha256(&a.join("model/model.safetensors")),
            "rng {rng}: exported weights differ"
        );
        let recorded: Split =
            serde_json::from_str(&std::fs::read_to_string(b.join("placement.json")).unwrap())
                .unwrap();
        assert_eq!(recorded.devices, [DeviceRef::Cpu, DeviceRef::Cpu]);
        assert_eq!(recorded.layers, [1, 1]);
        assert!(!a.join("placement.json").exists(), "one device: no split");
        let fingerprint = std::fs::read_to_string(b.join("fingerprint.json")).unwrap();
        assert!(fingerprint.contains("\"device\": \"cpu\""), "{fingerprint}");
    }
}

/// Killed with SIGKILL mid-run, a split run resumes bit for bit; and a run
/// started on `cpu` goes on as `[cpu, cpu]` (the same computation), both
/// ending on the weights of an uninterrupted run on one device.
#[test]
fn a_killed_split_run_resumes_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let one = causal_job(
        tmp.path(),
        "llama",
        "steps: 120, batch_size: 4, lr: 2.0e-3, eps: 1.0e-3, seed: 5, eval_every: 60, snapshot_every: 25",
    );
    let split = with_device(&one, "[cpu, cpu]", "split.yaml");
    let solo = tmp.path().join("solo");
    run_to_end(&one, &solo, "uninterrupted run on one device");
    let want = sha256(&solo.join("model/model.safetensors"));

    let killed = tmp.path().join("killed");
    let died_at = kill_and_resume(&split, &killed, 40);
    assert!(died_at < 120, "the kill must land mid-run (at {died_at})");
    assert_eq!(
        sha256(&killed.join("model/model.safetensors")),
        want,
        "a split run killed after {died_at} steps resumed elsewhere"
    );
    assert_eq!(metrics_steps(&killed), metrics_steps(&solo));
    assert_eq!(seed_log(&killed), seed_log(&solo));

    let moved = tmp.path().join("moved");
    let mut child = spawn_run(&one, &moved);
    assert!(wait_for_steps(&mut child, &moved, 30));
    child.kill().unwrap();
    child.wait().unwrap();
    run_to_end(&split, &moved, "the run of `cpu` resumed as `[cpu, cpu]`");
    assert_eq!(sha256(&moved.join("model/model.safetensors")), want);
    let frozen = std::fs::read_to_string(moved.join("spec.yaml")).unwrap();
    assert!(
        frozen.contains("- cpu\n"),
        "the run goes on as the split: {frozen}"
    );
}

#[test]
fn estimate_shows_each_devices_layers_and_bytes_and_bad_lists_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let one = causal_job(tmp.path(), "llama", "steps: 2, batch_size: 2, lr: 1.0e-3");
    let split = with_device(&one, "[cpu, cpu]", "split.yaml");
    let json = |job: &Path| -> serde_json::Value {
        let out = check(
            mezod()
                .arg("estimate")
                .arg(job)
                .arg("--json")
                .output()
                .unwrap(),
            "mezod estimate --json",
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let (e1, e2) = (json(&one), json(&split));
    assert!(e1.get("devices").is_none(), "one device: no split shown");
    let devices = e2["devices"].as_array().unwrap();
    let layers: Vec<u64> = devices
        .iter()
        .map(|d| d["layers"].as_u64().unwrap())
        .collect();
    assert_eq!(layers, [1, 1]);
    let weights: u64 = devices.iter().map(|d| d["weights"].as_u64().unwrap()).sum();
    assert_eq!(
        weights,
        e2["weights"].as_u64().unwrap(),
        "every byte on one device"
    );
    assert_eq!(e2["total"], e1["total"]);
    let text = check(
        mezod().arg("estimate").arg(&split).output().unwrap(),
        "mezod estimate",
    );
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("split over 2 devices"), "{text}");
    assert_eq!(
        text.lines().filter(|l| l.contains("1 layer ")).count(),
        2,
        "{text}"
    );

    let bad = with_device(&one, "[cpu, cuda:0]", "bad.yaml");
    let out = mezod_run(&bad, &tmp.path().join("bad"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("after cpu"), "{stderr}");
}
