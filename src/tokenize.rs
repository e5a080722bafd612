//! Text ↔ token ids with the model's own `tokenizer.json`, and left-padded batches.

use std::path::Path;

use anyhow::{anyhow, Result};
use tch::Tensor;
use tokenizers::Tokenizer;

pub struct TextTokenizer {
    /// None for a random-weight model whose config has no `tokenizer.json`
    /// beside it: it can be benchmarked and sized, not fed text.
    inner: Option<Tokenizer>,
    /// Why there is none (said when text needs encoding).
    missing: String,
    /// Id used for padding slots; they are masked, so any valid id works.
    pub pad_id: i64,
}

impl TextTokenizer {
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            anyhow::bail!("missing tokenizer file {}", path.display());
        }
        let inner = Tokenizer::from_file(&path).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        Ok(Self::new(inner))
    }

    /// Wrap a tokenizer built in memory (from a GGUF file's metadata).
    pub fn new(inner: Tokenizer) -> Self {
        let pad_id = ["<pad>", "<|endoftext|>", "</s>", "<unk>"]
            .iter()
            .find_map(|t| inner.token_to_id(t))
            .unwrap_or(0) as i64;
        Self {
            inner: Some(inner),
            missing: String::new(),
            pad_id,
        }
    }

    /// No tokenizer: every use of text fails with `why`.
    pub fn missing(why: String) -> Self {
        Self {
            inner: None,
            missing: why,
            pad_id: 0,
        }
    }

    pub fn is_present(&self) -> bool {
        self.inner.is_some()
    }

    fn get(&self) -> Result<&Tokenizer> {
        self.inner
            .as_ref()
            .ok_or_else(|| anyhow!("{}", self.missing))
    }

    /// Write it as `tokenizer.json` (for exporting a GGUF-sourced model).
    pub fn save(&self, path: &Path) -> Result<()> {
        self.get()?
            .save(path, true)
            .map_err(|e| anyhow!("writing {}: {e}", path.display()))
    }

    /// Token ids; `special` adds what the model's post-processor adds (BOS for OPT, LLaMA).
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<i64>> {
        let enc = self
            .get()?
            .encode(text, special)
            .map_err(|e| anyhow!("tokenizing {text:?}: {e}"))?;
        Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
    }

    /// The vocabulary entry of one id, special tokens included.
    pub fn decode_token(&self, id: i64) -> Option<String> {
        self.inner.as_ref()?.id_to_token(id as u32)
    }

    pub fn decode(&self, ids: &[i64]) -> String {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        self.inner
            .as_ref()
            .and_then(|t| t.decode(&ids, false).ok())
            .unwrap_or_default()
    }
}

/// Left-pad sequences into `(ids, mask)` tensors `[batch, longest]`.
pub fn pad_left(seqs: &[Vec<i64>], pad_id: i64) -> (Tensor, Tensor) {
    let longest = seqs.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(seqs.len() * longest);
    let mut mask = Vec::with_capacity(seqs.len() * longest);
    for s in seqs {
        let pad = longest - s.len();
        ids.extend(std::iter::repeat(pad_id).take(pad).chain(s.iter().copied()));
        mask.extend(
            std::iter::repeat(0i64)
                .take(pad)
                .chain(std::iter::repeat(1).take(s.len())),
        );
    }
    let shape = [seqs.len() as i64, longest as i64];
    (
        Tensor::from_slice(&ids).view(shape),
        Tensor::from_slice(&mask).view(shape),
    )
}
