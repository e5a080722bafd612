//! Logits of every supported architecture against transformers' own, on the
//! committed fixtures written by `tests/fixtures/generate.py`.

mod common;
use common::ALL_FIXTURES;

use std::path::PathBuf;

use mezod::model::{Dtype, LanguageModel};
use mezod::tokenize::pad_left;
use serde::Deserialize;
use tch::{Device, Kind, Tensor};

#[derive(Deserialize)]
struct Case {
    text: Option<String>,
    ids: Vec<Vec<i64>>,
    attention_mask: Vec<Vec<i64>>,
    logits: Vec<Vec<Vec<f32>>>,
}

#[derive(Deserialize)]
struct Reference {
    param_order: Vec<String>,
    cases: Vec<Case>,
}

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn reference(name: &str) -> Reference {
    let text = std::fs::read_to_string(fixture(name).join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Max |logits − transformers'| over real (unpadded) positions of every case.
fn max_logit_error(name: &str) -> f64 {
    let r = reference(name);
    let model = LanguageModel::load(&fixture(name), Dtype::F32, Device::Cpu).unwrap();
    let order: Vec<&str> = model.params.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        order, r.param_order,
        "{name}: parameter order differs from transformers' named_parameters()"
    );
    let mut worst = 0f64;
    for case in &r.cases {
        if let Some(text) = &case.text {
            let ids = model.tokenizer.encode(text, true).unwrap();
            assert_eq!(
                ids, case.ids[0],
                "{name}: token ids for {text:?} differ from transformers'"
            );
            let (_, mask_t) = pad_left(&[ids], model.tokenizer.pad_id);
            assert_eq!(
                Vec::<i64>::try_from(mask_t.flatten(0, -1)).unwrap(),
                case.attention_mask[0]
            );
        }
        let flat_ids: Vec<i64> = case.ids.concat();
        let flat_mask: Vec<i64> = case.attention_mask.concat();
        let (b, t) = (case.ids.len() as i64, case.ids[0].len() as i64);
        let ids = Tensor::from_slice(&flat_ids).view([b, t]);
        let mask = Tensor::from_slice(&flat_mask).view([b, t]);
        let got = model.logits(&ids, &mask);
        let want_flat: Vec<f32> = case.logits.iter().flatten().flatten().copied().collect();
        let want = Tensor::from_slice(&want_flat).view([b, t, -1]);
        assert_eq!(got.size(), want.size(), "{name}: logits shape");
        let err = ((got - want).abs() * mask.unsqueeze(-1).to_kind(Kind::Float))
            .max()
            .double_value(&[]);
        worst = worst.max(err);
    }
    println!("{name}: max |logits - transformers| = {worst:.3e}");
    worst
}

macro_rules! parity {
    ($test:ident, $name:expr) => {
        #[test]
        fn $test() {
            let err = max_logit_error($name);
            assert!(
                err <= 1e-4,
                "{}: logits differ from transformers' by {err:e}",
                $name
            );
        }
    };
}

parity!(opt_pre_layer_norm, "opt");
parity!(opt_post_layer_norm_with_projections, "opt-postln");
parity!(gpt2, "gpt2");
parity!(llama_gqa_explicit_head_dim, "llama");
parity!(llama3_rope_scaling_tied, "llama3");
parity!(mistral_sliding_window, "mistral");
parity!(qwen2_qkv_bias_tied, "qwen2");
parity!(bert_masked_lm, "bert");
parity!(roberta_masked_lm, "roberta");

#[test]
fn left_padded_rows_equal_their_unpadded_logits() {
    // Padding must change nothing a real token sees: positions are counted over
    // real tokens (RoBERTa from its padding index) and padding keys are hidden.
    for name in ALL_FIXTURES {
        let model = LanguageModel::load(&fixture(name), Dtype::F32, Device::Cpu).unwrap();
        let texts = [
            "a dull film",
            "one of the best films of the year, full of life",
        ];
        let seqs: Vec<Vec<i64>> = texts
            .iter()
            .map(|t| model.tokenizer.encode(t, true).unwrap())
            .collect();
        let (ids, mask) = pad_left(&seqs, model.tokenizer.pad_id);
        let batch = model.logits(&ids, &mask);
        let t = ids.size()[1];
        for (row, seq) in seqs.iter().enumerate() {
            let (one, one_mask) = pad_left(std::slice::from_ref(seq), model.tokenizer.pad_id);
            let alone = model.logits(&one, &one_mask).get(0);
            let n = seq.len() as i64;
            let padded = batch.get(row as i64).narrow(0, t - n, n);
            let err = (padded - alone).abs().max().double_value(&[]);
            assert!(
                err < 1e-5,
                "{name} row {row}: padding changed logits by {err}"
            );
        }
    }
}

#[test]
fn logits_are_far_from_flat() {
    // Guards the fixtures themselves: near-uniform logits would make parity meaningless.
    for name in ["opt", "gpt2", "llama", "qwen2", "bert", "roberta"] {
        let r = reference(name);
        let row = &r.cases[0].logits[0][1];
        let (lo, hi) = row
            .iter()
            .fold((f32::MAX, f32::MIN), |(a, b), &x| (a.min(x), b.max(x)));
        assert!(hi - lo > 2.0, "{name}: logits span only {}", hi - lo);
    }
}

#[test]
fn bf16_and_f16_stay_close_to_f32() {
    let dir = fixture("llama");
    let r = reference("llama");
    let case = &r.cases[1];
    let ids = Tensor::from_slice(&case.ids[0]).view([1, -1]);
    let mask = Tensor::from_slice(&case.attention_mask[0]).view([1, -1]);
    let full = LanguageModel::load(&dir, Dtype::F32, Device::Cpu)
        .unwrap()
        .logits(&ids, &mask);
    for dtype in [Dtype::Bf16, Dtype::F16] {
        let m = LanguageModel::load(&dir, dtype, Device::Cpu).unwrap();
        assert_eq!(
            m.params.iter().next().unwrap().tensor.kind(),
            mezod::model::kind_of(dtype)
        );
        let err = (m.logits(&ids, &mask) - &full)
            .abs()
            .max()
            .double_value(&[]);
        let span = full.abs().max().double_value(&[]);
        assert!(
            err < 0.05 * span,
            "{dtype:?}: error {err} against a logit span of {span}"
        );
    }
}

#[test]
fn clear_errors_name_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let err = |dir: &std::path::Path| {
        LanguageModel::load(dir, Dtype::F32, Device::Cpu)
            .err()
            .unwrap()
            .to_string()
    };
    // Missing directory.
    assert!(err(&tmp.path().join("nope")).contains("does not exist"));
    // Missing config.
    assert!(err(tmp.path()).contains("config.json"));
    // Unknown model type.
    for f in ["tokenizer.json", "model.safetensors"] {
        std::fs::copy(fixture("opt").join(f), tmp.path().join(f)).unwrap();
    }
    std::fs::write(tmp.path().join("config.json"), r#"{"model_type": "bloom"}"#).unwrap();
    let e = err(tmp.path());
    assert!(e.contains("bloom") && e.contains("not supported"), "{e}");
    // Shape mismatch: config says a wider model than the weights hold.
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("opt").join("config.json")).unwrap())
            .unwrap();
    cfg["hidden_size"] = 64.into();
    cfg["word_embed_proj_dim"] = 64.into();
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    let e = format!(
        "{:#}",
        LanguageModel::load(tmp.path(), Dtype::F32, Device::Cpu)
            .err()
            .unwrap()
    );
    assert!(
        e.contains("model.decoder.embed_tokens.weight") && e.contains("expected [320, 64]"),
        "{e}"
    );
    // Missing weights file.
    std::fs::remove_file(tmp.path().join("model.safetensors")).unwrap();
    assert!(err(tmp.path()).contains("model.safetensors"));
    // Unsupported dtype string.
    assert!("f8"
        .parse::<Dtype>()
        .unwrap_err()
        .to_string()
        .contains("unsupported dtype"));
}

/// Copy a fixture's config and tokenizer into `dir`, with weights written by `write`.
fn rewritten(
    name: &str,
    dir: &std::path::Path,
    write: impl Fn(&[(String, Tensor)], &std::path::Path),
) {
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(fixture(name).join(f), dir.join(f)).unwrap();
    }
    let tensors = Tensor::read_safetensors(fixture(name).join("model.safetensors")).unwrap();
    write(&tensors, dir);
}

fn same_logits(a: &std::path::Path, b: &std::path::Path) -> f64 {
    let ids = Tensor::from_slice(&[1i64, 40, 50, 60, 70, 80]).view([1, -1]);
    let mask = ids.ones_like();
    let la = LanguageModel::load(a, Dtype::F32, Device::Cpu)
        .unwrap()
        .logits(&ids, &mask);
    let lb = LanguageModel::load(b, Dtype::F32, Device::Cpu)
        .unwrap()
        .logits(&ids, &mask);
    (la - lb).abs().max().double_value(&[])
}

#[test]
fn sharded_checkpoints_load_through_their_index() {
    let tmp = tempfile::tempdir().unwrap();
    rewritten("llama", tmp.path(), |tensors, dir| {
        let mut weight_map = serde_json::Map::new();
        for (i, half) in tensors.chunks(tensors.len() / 2 + 1).enumerate() {
            let file = format!("model-{:05}-of-00002.safetensors", i + 1);
            let refs: Vec<(String, &Tensor)> = half.iter().map(|(n, t)| (n.clone(), t)).collect();
            mezod::model::export::write_safetensors(&dir.join(&file), &refs, &[]).unwrap();
            for (n, _) in half {
                weight_map.insert(n.clone(), file.clone().into());
            }
        }
        let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    });
    assert!(!tmp.path().join("model.safetensors").exists());
    assert_eq!(same_logits(&fixture("llama"), tmp.path()), 0.0);
}

#[test]
fn names_without_the_transformer_prefix_load_too() {
    // Original GPT-2 checkpoints store `h.0.attn.c_attn.weight`, not `transformer.h.0…`.
    let tmp = tempfile::tempdir().unwrap();
    rewritten("gpt2", tmp.path(), |tensors, dir| {
        let renamed: Vec<(String, &Tensor)> = tensors
            .iter()
            .map(|(n, t)| (n.trim_start_matches("transformer.").to_string(), t))
            .collect();
        assert!(renamed.iter().all(|(n, _)| !n.starts_with("transformer.")));
        mezod::model::export::write_safetensors(&dir.join("model.safetensors"), &renamed, &[])
            .unwrap();
    });
    assert_eq!(same_logits(&fixture("gpt2"), tmp.path()), 0.0);
}

#[test]
fn logits_at_selected_positions_equal_the_full_logits_there() {
    for name in ["opt", "opt-postln", "gpt2", "llama"] {
        let model = LanguageModel::load(&fixture(name), Dtype::F32, Device::Cpu).unwrap();
        let seqs = vec![
            model
                .tokenizer
                .encode("a terrible waste of time", true)
                .unwrap(),
            model
                .tokenizer
                .encode("one of the best films of the year", true)
                .unwrap(),
        ];
        let (ids, mask) = pad_left(&seqs, model.tokenizer.pad_id);
        let t = ids.size()[1];
        let full = model.logits(&ids, &mask).narrow(1, t - 4, 3);
        let part = model.logits_at(&ids, &mask, t - 4, 3);
        assert_eq!(part.size(), full.size());
        let err = (part - full).abs().max().double_value(&[]);
        assert!(err < 1e-5, "{name}: {err}");
    }
}

#[test]
fn old_bert_checkpoints_load_gamma_beta_and_ignore_unused_tensors() {
    // bert-base-uncased and roberta-large also hold the pooler, the next-sentence
    // head, a position_ids buffer and (old files) LayerNorm `gamma`/`beta`.
    for name in ["bert", "roberta"] {
        let tmp = tempfile::tempdir().unwrap();
        rewritten(name, tmp.path(), |tensors, dir| {
            let extra = [
                (
                    "pooler.dense.weight",
                    Tensor::zeros([32, 32], (Kind::Float, Device::Cpu)),
                ),
                (
                    "pooler.dense.bias",
                    Tensor::zeros([32], (Kind::Float, Device::Cpu)),
                ),
                (
                    "embeddings.position_ids",
                    Tensor::arange(64, (Kind::Float, Device::Cpu)),
                ),
            ];
            let prefix = if name == "bert" { "bert" } else { "roberta" };
            let mut renamed: Vec<(String, Tensor)> = tensors
                .iter()
                .map(|(n, t)| {
                    let n = n
                        .replace("LayerNorm.weight", "LayerNorm.gamma")
                        .replace("LayerNorm.bias", "LayerNorm.beta");
                    (n, t.shallow_clone())
                })
                .collect();
            for (n, t) in extra {
                renamed.push((format!("{prefix}.{n}"), t));
            }
            renamed.push((
                "cls.seq_relationship.weight".into(),
                Tensor::zeros([2, 32], (Kind::Float, Device::Cpu)),
            ));
            assert!(renamed.iter().any(|(n, _)| n.ends_with(".gamma")));
            let refs: Vec<(String, &Tensor)> =
                renamed.iter().map(|(n, t)| (n.clone(), t)).collect();
            mezod::model::export::write_safetensors(&dir.join("model.safetensors"), &refs, &[])
                .unwrap();
        });
        assert_eq!(same_logits(&fixture(name), tmp.path()), 0.0, "{name}");
    }
}

#[test]
fn a_masked_lm_without_its_head_is_a_clear_error() {
    // A bare encoder (BertModel, e.g. a sentence-embedding checkpoint) has no MLM head.
    let tmp = tempfile::tempdir().unwrap();
    rewritten("bert", tmp.path(), |tensors, dir| {
        let encoder: Vec<(String, &Tensor)> = tensors
            .iter()
            .filter(|(n, _)| !n.starts_with("cls."))
            .map(|(n, t)| (n.clone(), t))
            .collect();
        mezod::model::export::write_safetensors(&dir.join("model.safetensors"), &encoder, &[])
            .unwrap();
    });
    let e = format!(
        "{:#}",
        LanguageModel::load(tmp.path(), Dtype::F32, Device::Cpu)
            .err()
            .unwrap()
    );
    assert!(
        e.contains("cls.predictions.bias") && e.contains("missing"),
        "{e}"
    );
}

#[test]
fn masked_lms_know_their_mask_token_and_positions() {
    for (name, token, positions) in [("bert", "[MASK]", 64), ("roberta", "<mask>", 64)] {
        let model = LanguageModel::load(&fixture(name), Dtype::F32, Device::Cpu).unwrap();
        assert!(model.is_masked_lm());
        let (text, id) = model.mask_token().unwrap();
        assert_eq!(text, token);
        assert_eq!(model.tokenizer.decode_token(id).as_deref(), Some(token));
        assert_eq!(model.max_positions(), Some(positions), "{name}");
    }
    let opt = LanguageModel::load(&fixture("opt"), Dtype::F32, Device::Cpu).unwrap();
    assert!(!opt.is_masked_lm());
    assert!(opt.mask_token().is_err());
}

/// The model types intake accepts are the ones the engine loads: each has a
/// fixture of that `model_type` that opens, and any other is refused naming them.
#[test]
fn every_accepted_model_type_loads_and_no_other() {
    for model_type in mezod_core::model_ref::MODEL_TYPES {
        let dir = fixture(model_type);
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["model_type"], model_type);
        mezod::model::LanguageModel::load(&dir, mezod::model::Dtype::F32, tch::Device::Cpu)
            .unwrap_or_else(|e| panic!("{model_type}: {e:#}"));
    }
    let tmp = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture("llama").join(f), tmp.path().join(f)).unwrap();
    }
    let text = std::fs::read_to_string(tmp.path().join("config.json"))
        .unwrap()
        .replace("\"llama\"", "\"falcon\"");
    std::fs::write(tmp.path().join("config.json"), text).unwrap();
    let e =
        mezod::model::LanguageModel::load(tmp.path(), mezod::model::Dtype::F32, tch::Device::Cpu)
            .err()
            .expect("falcon is refused");
    assert!(
        format!("{e:#}")
            .contains("not supported (opt, gpt2, llama, mistral, qwen2, bert, roberta)"),
        "{e:#}"
    );
}
