//! llama.cpp's GGUF files as a model source.
//!
//! A GGUF file holds what an HF directory spreads over three files: the
//! config (as `llama.*` metadata), the tokenizer (as `tokenizer.ggml.*`
//! metadata) and the weights (often quantized).  We turn each into what the
//! rest of mezod already reads: a `config.json` value, a `tokenizers`
//! tokenizer, and f32 tensors under transformers' names.
//!
//! Parsing and dequantization come from candle-core's `gguf_file` module,
//! which reads GGUF v1–v3 and dequantizes every ggml block type (F32, F16,
//! BF16, Q4_0, Q4_1, Q5_*, Q8_0 and the K-quants) as ggml does; writing our
//! own would duplicate that for no gain.
//!
//! Two things llama.cpp's converter changes are undone here: tensor names
//! (`blk.N.attn_q.weight` → `model.layers.N.self_attn.q_proj.weight`), and
//! the row order of q/k projections in LLaMA-family files, which the
//! converter permutes for llama.cpp's interleaved RoPE (transformers uses the
//! rotate-half form).  The tokenizer is built as transformers builds it from
//! the same metadata (byte-level BPE from the vocabulary and merges, control
//! tokens as special tokens, the split pattern of known `tokenizer.ggml.pre`
//! kinds), so token ids agree with transformers' GGUF loader.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use tch::Tensor;

pub use mezod_core::gguf_header::{hf_name, is_gguf, read_header, GgufHeader};
use mezod_core::gguf_header::{meta, strings};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// A GGUF model read in full: config, tokenizer, f32 tensors under HF names.
pub struct GgufModel {
    pub config: serde_json::Value,
    pub tokenizer: Tokenizer,
    pub tensors: HashMap<String, Tensor>,
}

/// Undo llama.cpp's q/k row permutation (its converter's `permute`, inverted):
/// rows grouped per head as [half, 2] go back to [2, half].
fn unpermute(w: &Tensor, heads: i64) -> Tensor {
    let size = w.size();
    let (rows, rest) = (size[0], &size[1..]);
    let mut shape = vec![heads, rows / heads / 2, 2];
    shape.extend_from_slice(rest);
    w.reshape(&shape[..]).transpose(1, 2).reshape(&size[..])
}

/// Read a GGUF model in full: every tensor dequantized to f32 on CPU.
pub fn load(path: &Path) -> Result<GgufModel> {
    let header = read_header(path)?;
    let tokenizer = tokenizer(&header.content)
        .with_context(|| format!("building the tokenizer of {}", path.display()))?;
    let mut file = BufReader::new(File::open(path)?);
    let device = candle_core::Device::Cpu;
    let permuted = header.arch != "qwen2";
    let heads = header.config["num_attention_heads"].as_i64().unwrap_or(1);
    let kv_heads = header.config["num_key_value_heads"]
        .as_i64()
        .unwrap_or(heads);
    let mut tensors = HashMap::new();
    for name in header.content.tensor_infos.keys() {
        let q = header
            .content
            .tensor(&mut file, name, &device)
            .map_err(|e| anyhow!("reading tensor {name} of {}: {e}", path.display()))?;
        let t = q
            .dequantize(&device)
            .and_then(|t| t.to_dtype(candle_core::DType::F32))
            .map_err(|e| anyhow!("dequantizing {name} ({:?}): {e}", q.dtype()))?;
        let shape: Vec<i64> = t.dims().iter().map(|&d| d as i64).collect();
        let data: Vec<f32> = t
            .flatten_all()
            .and_then(|t| t.to_vec1())
            .map_err(|e| anyhow!("{name}: {e}"))?;
        let mut t = Tensor::from_slice(&data).reshape(&shape[..]);
        if permuted && name.ends_with("attn_q.weight") {
            t = unpermute(&t, heads);
        } else if permuted && name.ends_with("attn_k.weight") {
            t = unpermute(&t, kv_heads);
        }
        tensors.insert(hf_name(name).expect("checked in read_header"), t);
    }
    Ok(GgufModel {
        config: header.config,
        tokenizer,
        tensors,
    })
}

/// GPT-2's byte ↔ printable-character table, which byte-level vocabularies are spelt in.
fn byte_alphabet() -> HashMap<u8, char> {
    let mut bytes: Vec<u8> = (b'!'..=b'~')
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars: Vec<u32> = bytes.iter().map(|&b| b as u32).collect();
    let mut n = 0;
    for b in 0..=255u8 {
        if !bytes.contains(&b) {
            bytes.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    bytes
        .into_iter()
        .zip(chars)
        .map(|(b, c)| (b, char::from_u32(c).expect("valid code point")))
        .collect()
}

/// Split patterns of `tokenizer.ggml.pre` kinds whose merges were learned on
/// something other than GPT-2's split (as transformers maps them).
fn split_pattern(pre: &str) -> Option<&'static str> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "smaug-bpe" | "dbrx" => Some(LLAMA3),
        "qwen2" | "deepseek-r1-qwen" => Some(QWEN2),
        _ => None,
    }
}

/// The tokenizer a GGUF file describes (byte-level BPE: `tokenizer.ggml.model = gpt2`).
fn tokenizer(c: &Content) -> Result<Tokenizer> {
    let kind = meta(c, "tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    if kind != "gpt2" {
        bail!(
            "tokenizer kind {kind:?} is not supported; byte-level BPE (\"gpt2\": LLaMA 3, Qwen, SmolLM) is"
        );
    }
    let tokens = strings(c, "tokenizer.ggml.tokens")?;
    let merges = strings(c, "tokenizer.ggml.merges")?;
    let spelling = byte_alphabet();
    let alphabet: std::collections::HashSet<char> = spelling.values().copied().collect();
    let in_alphabet = |t: &str| t.chars().all(|ch| alphabet.contains(&ch));
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let spelt = if in_alphabet(t) {
                t.clone()
            } else {
                t.bytes().map(|b| spelling[&b]).collect()
            };
            (spelt, i as u32)
        })
        .collect();
    let merges: Vec<(String, String)> = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .with_context(|| format!("malformed merge {m:?}"))
        })
        .collect::<Result<_>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| anyhow!("{e}"))?;
    let mut tok = Tokenizer::new(bpe);
    let pre = meta(c, "tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    match split_pattern(&pre) {
        Some(pattern) => {
            let split = Split::new(
                SplitPattern::Regex(pattern.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| anyhow!("{e}"))?;
            tok.with_pre_tokenizer(Some(Sequence::new(vec![
                split.into(),
                ByteLevel::new(false, true, false).into(),
            ])));
        }
        None => {
            tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        }
    }
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    // Control tokens (type 3) stay whole as special tokens, user-defined ones
    // (type 4) as plain added tokens, as llama.cpp and transformers do.
    let types = match meta(c, "tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()
            .map_err(|e| anyhow!("{e}"))?
            .iter()
            .map(|t| match t {
                Value::I32(x) => *x,
                Value::U32(x) => *x as i32,
                _ => 1,
            })
            .collect(),
        None => vec![1; tokens.len()],
    };
    let special: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(t, &ty)| ty == 3 && in_alphabet(t))
        .map(|(t, _)| AddedToken::from(t.clone(), true).normalized(false))
        .collect();
    tok.add_special_tokens(special)
        .map_err(|e| anyhow!("{e}"))?;
    let user: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, &ty)| ty == 4)
        .map(|(t, _)| AddedToken::from(t.clone(), false).normalized(false))
        .collect();
    tok.add_tokens(user).map_err(|e| anyhow!("{e}"))?;
    Ok(tok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_transformers() {
        assert_eq!(
            hf_name("blk.12.attn_k.weight").as_deref(),
            Some("model.layers.12.self_attn.k_proj.weight")
        );
        assert_eq!(
            hf_name("blk.0.ffn_norm.weight").as_deref(),
            Some("model.layers.0.post_attention_layernorm.weight")
        );
        assert_eq!(
            hf_name("token_embd.weight").as_deref(),
            Some("model.embed_tokens.weight")
        );
        assert_eq!(hf_name("blk.0.attn_q_norm.weight"), None);
    }

    #[test]
    fn unpermute_inverts_the_converters_permutation() {
        // llama.cpp: w.reshape(heads, 2, rows/heads/2, cols).swapaxes(1, 2).reshape(rows, cols)
        let (heads, rows, cols) = (3, 12, 5);
        let w =
            Tensor::arange(rows * cols, (tch::Kind::Float, tch::Device::Cpu)).reshape([rows, cols]);
        let permuted = w
            .reshape([heads, 2, rows / heads / 2, cols])
            .transpose(1, 2)
            .reshape([rows, cols]);
        assert!(unpermute(&permuted, heads).equal(&w));
        assert!(!permuted.equal(&w));
    }

    #[test]
    fn the_byte_alphabet_is_gpt2s() {
        let a = byte_alphabet();
        assert_eq!(a.len(), 256);
        assert_eq!(a[&b' '], 'Ġ');
        assert_eq!(a[&b'\n'], 'Ċ');
        assert_eq!(a[&b'A'], 'A');
    }
}
