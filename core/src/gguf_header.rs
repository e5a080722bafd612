//! The header of a llama.cpp GGUF file: its metadata turned into
//! transformers' `config.json` and its tensor directory under transformers'
//! names, with no tensor read.  This is what admission needs (shapes for the
//! estimate); the engine's `model::gguf` reads the tensors and the tokenizer.
//!
//! Parsing comes from candle-core's `gguf_file` module (GGUF v1–v3), pure
//! Rust, so the control plane reads GGUF headers without libtorch.

use std::io::BufReader;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use serde_json::json;

/// True for paths mezod reads as GGUF.
pub fn is_gguf(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// What a GGUF file describes, before any tensor is read.
pub struct GgufHeader {
    /// transformers' `config.json` for this model.
    pub config: serde_json::Value,
    /// (HF name, shape) of every tensor.
    pub shapes: Vec<(String, Vec<usize>)>,
    /// The parsed file (metadata and tensor directory).
    pub content: Content,
    /// `general.architecture`.
    pub arch: String,
}

pub const ARCHITECTURES: [&str; 3] = ["llama", "mistral", "qwen2"];

pub fn meta<'a>(content: &'a Content, key: &str) -> Option<&'a Value> {
    content.metadata.get(key)
}

pub(crate) fn meta_u64(content: &Content, key: &str) -> Result<Option<u64>> {
    meta(content, key)
        .map(|v| match v {
            Value::U8(x) => Ok(*x as u64),
            Value::U16(x) => Ok(*x as u64),
            Value::U32(x) => Ok(*x as u64),
            Value::U64(x) => Ok(*x),
            Value::I32(x) if *x >= 0 => Ok(*x as u64),
            Value::I64(x) if *x >= 0 => Ok(*x as u64),
            other => Err(anyhow!("GGUF key {key} is {other:?}, not a count")),
        })
        .transpose()
}

pub(crate) fn meta_f64(content: &Content, key: &str) -> Result<Option<f64>> {
    meta(content, key)
        .map(|v| match v {
            Value::F32(x) => Ok(*x as f64),
            Value::F64(x) => Ok(*x),
            other => Err(anyhow!("GGUF key {key} is {other:?}, not a number")),
        })
        .transpose()
}

pub fn strings(content: &Content, key: &str) -> Result<Vec<String>> {
    let v = meta(content, key).with_context(|| format!("GGUF file lacks {key}"))?;
    v.to_vec()
        .map_err(|e| anyhow!("{key}: {e}"))?
        .iter()
        .map(|s| Ok(s.to_string().map_err(|e| anyhow!("{key}: {e}"))?.clone()))
        .collect()
}

/// llama.cpp tensor name → transformers name (LLaMA family).
pub fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(n) = fixed {
        return Some(n.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = part.rsplit_once('.')?;
    let target = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{target}.{kind}"))
}

/// Read the metadata and tensor directory of a GGUF file (no tensor data).
pub fn read_header(path: &Path) -> Result<GgufHeader> {
    let mut file = BufReader::new(crate::safe_fs::open_user_file(path)?);
    let content = Content::read(&mut file)
        .map_err(|e| anyhow!("{} is not a readable GGUF file: {e}", path.display()))?;
    let arch = meta(&content, "general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .with_context(|| format!("{} has no general.architecture", path.display()))?;
    if !ARCHITECTURES.contains(&arch.as_str()) {
        bail!(
            "{}: GGUF architecture {arch:?} is not supported (supported: {})",
            path.display(),
            ARCHITECTURES.join(", ")
        );
    }
    let config = config_json(&content, &arch)?;
    let mut shapes = Vec::new();
    for (name, info) in &content.tensor_infos {
        let hf = hf_name(name).with_context(|| {
            format!(
                "{}: tensor {name} has no transformers counterpart",
                path.display()
            )
        })?;
        shapes.push((hf, info.shape.dims().to_vec()));
    }
    shapes.sort();
    Ok(GgufHeader {
        config,
        shapes,
        content,
        arch,
    })
}

/// transformers' config for the model, from `<arch>.*` metadata.
fn config_json(c: &Content, arch: &str) -> Result<serde_json::Value> {
    let key = |k: &str| format!("{arch}.{k}");
    let need = |k: &str| -> Result<u64> {
        meta_u64(c, &key(k))?.with_context(|| format!("GGUF file lacks {}", key(k)))
    };
    let heads = need("attention.head_count")?;
    let hidden = need("embedding_length")?;
    let vocab = match meta_u64(c, &key("vocab_size"))? {
        Some(v) => v,
        None => strings(c, "tokenizer.ggml.tokens")?.len() as u64,
    };
    let head_dim = meta_u64(c, &key("rope.dimension_count"))?.unwrap_or(hidden / heads);
    let mut cfg = json!({
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": need("feed_forward_length")?,
        "num_hidden_layers": need("block_count")?,
        "num_attention_heads": heads,
        "num_key_value_heads": meta_u64(c, &key("attention.head_count_kv"))?.unwrap_or(heads),
        "head_dim": head_dim,
        "rms_norm_eps": meta_f64(c, &key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-6),
        "rope_theta": meta_f64(c, &key("rope.freq_base"))?.unwrap_or(10000.0),
        "max_position_embeddings": meta_u64(c, &key("context_length"))?.unwrap_or(2048),
        "vocab_size": vocab,
        "tie_word_embeddings": !c.tensor_infos.contains_key("output.weight"),
        "hidden_act": "silu",
    });
    if let Some(w) = meta_u64(c, &key("attention.sliding_window"))? {
        cfg["sliding_window"] = w.into();
    }
    for (hf, gg) in [
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
        ("pad_token_id", "tokenizer.ggml.padding_token_id"),
    ] {
        if let Some(id) = meta_u64(c, gg)? {
            cfg[hf] = id.into();
        }
    }
    Ok(cfg)
}
