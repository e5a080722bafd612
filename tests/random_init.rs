//! Random-weight models from a config alone (`model: {config, init: random, seed}`):
//! the same parameters as the pretrained checkpoint of that config, drawn as
//! documented, reproducible from the seed, sized by the estimator without
//! loading anything, and trainable through `mezod run`.

mod common;

use common::*;
use mezod::estimate::estimate;
use mezod::model::{Dtype, LanguageModel, ModelSource};
use mezod::spec::JobSpec;
use tch::{Device, Kind};

fn random(model: &str, seed: u64) -> LanguageModel {
    let source = ModelSource::Random {
        config: fixture(model).join("config.json"),
        seed,
    };
    LanguageModel::open(&source, Dtype::F32, Device::Cpu).unwrap()
}

#[test]
fn random_weights_have_the_checkpoints_shapes_and_the_documented_distribution() {
    for model in ["opt", "gpt2", "llama", "qwen2"] {
        let pretrained = LanguageModel::load(&fixture(model), Dtype::F32, Device::Cpu).unwrap();
        let drawn = random(model, 7);
        let shapes = |m: &LanguageModel| -> Vec<(String, Vec<i64>)> {
            m.params
                .iter()
                .map(|p| (p.name.clone(), p.tensor.size()))
                .collect()
        };
        assert_eq!(shapes(&drawn), shapes(&pretrained), "{model}");
        let mut matrices = 0;
        for p in drawn.params.iter() {
            let t = &p.tensor;
            let (mean, std) = (
                t.mean(Kind::Double).double_value(&[]),
                t.std(true).double_value(&[]),
            );
            if p.name.ends_with(".bias") {
                assert_eq!((mean, std), (0.0, 0.0), "{model} {}", p.name);
            } else if !p.decays {
                assert!(
                    t.eq(1.0).all().int64_value(&[]) == 1,
                    "{model} {}: norm weights are 1",
                    p.name
                );
            } else {
                matrices += 1;
                let n = t.numel() as f64;
                assert!(
                    mean.abs() < 5.0 * 0.02 / n.sqrt() + 1e-4,
                    "{model} {}: mean {mean}",
                    p.name
                );
                assert!((std - 0.02).abs() < 0.002, "{model} {}: std {std}", p.name);
            }
        }
        assert!(matrices > 4, "{model}: drew only {matrices} matrices");
        // The seed decides the weights.
        let again = random(model, 7);
        let other = random(model, 8);
        let same = |a: &LanguageModel, b: &LanguageModel| {
            a.params
                .iter()
                .zip(b.params.iter())
                .all(|(x, y)| x.tensor.equal(&y.tensor))
        };
        assert!(
            same(&drawn, &again),
            "{model}: same seed, different weights"
        );
        assert!(!same(&drawn, &other), "{model}: the seed changed nothing");
        // It runs: finite logits of the right shape.
        let ids = tch::Tensor::from_slice(&[1i64, 5, 9, 3]).view([1, 4]);
        let logits = drawn.logits(&ids, &ids.ones_like());
        assert_eq!(logits.size()[..2], [1, 4]);
        assert!(logits.isfinite().all().int64_value(&[]) == 1);
    }
}

#[test]
fn the_estimator_sizes_a_config_alone_like_its_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let pretrained =
        JobSpec::load(&causal_job(tmp.path(), "llama", "steps: 1, lr: 1.0e-3")).unwrap();
    let mut drawn = pretrained.clone();
    drawn.model.path = Default::default();
    drawn.model.config = Some(fixture("llama").join("config.json"));
    drawn.model.init = Some(mezod::spec::Init::Random);
    for gpu in [false, true] {
        assert_eq!(
            estimate(&drawn, gpu).unwrap(),
            estimate(&pretrained, gpu).unwrap(),
            "gpu: {gpu}"
        );
    }
}

#[test]
fn mezod_run_trains_a_random_model_from_its_config() {
    let tmp = tempfile::tempdir().unwrap();
    let job = causal_job(
        tmp.path(),
        "llama",
        "steps: 4, batch_size: 2, lr: 1.0e-3, seed: 2",
    );
    let text = std::fs::read_to_string(&job).unwrap().replace(
        &format!("path: {}", fixture("llama").display()),
        &format!(
            "config: {}, init: random, seed: 11",
            fixture("llama").join("config.json").display()
        ),
    );
    std::fs::write(&job, text).unwrap();
    let out = tmp.path().join("run");
    run_to_end(&job, &out, "mezod run on a random-weight model");
    let result: serde_json::Value = read_result(&out);
    assert_eq!(result["steps"], 4);
    // The export is an HF directory with the tokenizer that sat beside the config.
    assert!(out.join("model/model.safetensors").is_file());
    assert!(out.join("model/tokenizer.json").is_file());
    let exported = LanguageModel::load(&out.join("model"), Dtype::F32, Device::Cpu).unwrap();
    assert_eq!(exported.params.len(), random("llama", 11).params.len());
}
