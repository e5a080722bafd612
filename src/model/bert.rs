//! The BERT family with its masked-LM head: BERT (`bert`) and RoBERTa
//! (`roberta`), as transformers' `BertForMaskedLM` / `RobertaForMaskedLM`.
//!
//! A post-LN encoder: every query sees every real token (bidirectional), each
//! sublayer ends in `LayerNorm(residual + sublayer)`, the MLP uses the exact
//! (erf) GELU.  The head is `dense → GELU → LayerNorm → word embeddingsᵀ + bias`
//! (the decoder is tied to the word embeddings).  Token types are all 0.
//!
//! Positions are counted over real tokens, so a left-padded row reads exactly
//! what it reads alone: BERT's k-th real token gets position k (transformers
//! would number padding too unless given `position_ids`), RoBERTa's gets
//! `padding_idx + 1 + k`, which is what transformers'
//! `create_position_ids_from_input_ids` computes from the padding.

use std::path::Path;

use anyhow::{bail, Result};
use serde::Deserialize;
use tch::{Kind, Tensor};

use super::adapters::KvPrefix;
use super::layers::{
    attention, merge_heads, moved, positions_from_mask, split_heads, LayerInputs, LayerNorm, Linear,
};
use super::placement::Part;
use super::weights::WeightLoader;
use super::Network;
use crate::tokenize::TextTokenizer;

/// Model types that are masked language models (this file's), and the test
/// for them (kept beside the job-file types: estimates need it too).
pub use mezod_core::model_ref::{is_masked_lm, MASKED_LM_TYPES as MODEL_TYPES};

#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub model_type: String,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub intermediate_size: i64,
    pub max_position_embeddings: i64,
    #[serde(default = "two")]
    pub type_vocab_size: i64,
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "gelu")]
    pub hidden_act: String,
    /// RoBERTa's `padding_idx`: positions start after it.
    #[serde(default)]
    pub pad_token_id: Option<i64>,
    #[serde(default)]
    pub position_embedding_type: Option<String>,
    #[serde(default)]
    pub is_decoder: bool,
}

fn two() -> i64 {
    2
}
fn eps() -> f64 {
    1e-12
}
fn gelu() -> String {
    "gelu".into()
}

impl BertConfig {
    fn roberta(&self) -> bool {
        self.model_type == "roberta"
    }

    /// RoBERTa's padding index (transformers' default `pad_token_id` is 1).
    fn padding_idx(&self) -> i64 {
        self.pad_token_id.unwrap_or(1)
    }

    /// Module names of the checkpoint: the encoder's prefix and the MLM head's
    /// (bias, transform dense, transform norm).
    fn names(&self) -> (&'static str, [&'static str; 3]) {
        if self.roberta() {
            (
                "roberta",
                ["lm_head.bias", "lm_head.dense", "lm_head.layer_norm"],
            )
        } else {
            (
                "bert",
                [
                    "cls.predictions.bias",
                    "cls.predictions.transform.dense",
                    "cls.predictions.transform.LayerNorm",
                ],
            )
        }
    }

    fn check(&self) -> Result<()> {
        if self.hidden_act != "gelu" {
            bail!(
                "{} activation {:?} is not supported (only gelu)",
                self.model_type,
                self.hidden_act
            );
        }
        if let Some(p) = self.position_embedding_type.as_deref() {
            if p != "absolute" {
                bail!("position_embedding_type {p:?} is not supported (only absolute)");
            }
        }
        if self.is_decoder {
            bail!("a {} configured as a decoder (is_decoder: true) is not supported: mezod reads BERT-family models as masked LMs", self.model_type);
        }
        Ok(())
    }
}

struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    intermediate: Linear,
    out: Linear,
    out_norm: LayerNorm,
}

pub struct Bert {
    cfg: BertConfig,
    word_embeddings: Tensor,
    position_embeddings: Tensor,
    token_type_embeddings: Tensor,
    embed_norm: LayerNorm,
    layers: Vec<Layer>,
    head_bias: Tensor,
    head_dense: Linear,
    head_norm: LayerNorm,
    prefix: KvPrefix,
}

impl Bert {
    /// Tensors are requested in transformers' `named_parameters()` order, which
    /// differs between the two: RoBERTa creates its position table after the
    /// embedding LayerNorm.  Split over devices, the head's transform (dense,
    /// norm) is on the last device and its decoder, the word embeddings with
    /// the decoder's bias, on the first.
    pub fn load(cfg: BertConfig, w: &mut WeightLoader) -> Result<Self> {
        cfg.check()?;
        let (h, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        let (p, [bias_name, dense_name, norm_name]) = cfg.names();
        let e = format!("{p}.embeddings");
        w.place(Part::Embeddings);
        let word_embeddings =
            w.param(&format!("{e}.word_embeddings.weight"), &[cfg.vocab_size, h])?;
        let positions = |w: &mut WeightLoader| {
            w.param(
                &format!("{e}.position_embeddings.weight"),
                &[cfg.max_position_embeddings, h],
            )
        };
        let mut position_embeddings = None;
        if !cfg.roberta() {
            position_embeddings = Some(positions(w)?);
        }
        let token_type_embeddings = w.param(
            &format!("{e}.token_type_embeddings.weight"),
            &[cfg.type_vocab_size, h],
        )?;
        let embed_norm = LayerNorm::load(w, &format!("{e}.LayerNorm"), h, eps)?;
        let position_embeddings = match position_embeddings {
            Some(t) => t,
            None => positions(w)?,
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                w.place(Part::Layer(i as usize));
                Self::load_layer(&cfg, w, &format!("{p}.encoder.layer.{i}"))
            })
            .collect::<Result<Vec<_>>>()?;
        w.place(Part::Embeddings);
        let head_bias = w.param(bias_name, &[cfg.vocab_size])?;
        w.place(Part::Head);
        let head_dense = Linear::load(w, dense_name, h, h, true)?;
        let head_norm = LayerNorm::load(w, norm_name, h, eps)?;
        Ok(Self {
            cfg,
            word_embeddings,
            position_embeddings,
            token_type_embeddings,
            embed_norm,
            layers,
            head_bias,
            head_dense,
            head_norm,
            prefix: KvPrefix::default(),
        })
    }

    fn load_layer(cfg: &BertConfig, w: &mut WeightLoader, l: &str) -> Result<Layer> {
        let (h, eps, inter) = (cfg.hidden_size, cfg.layer_norm_eps, cfg.intermediate_size);
        Ok(Layer {
            query: Linear::load(w, &format!("{l}.attention.self.query"), h, h, true)?,
            key: Linear::load(w, &format!("{l}.attention.self.key"), h, h, true)?,
            value: Linear::load(w, &format!("{l}.attention.self.value"), h, h, true)?,
            attn_out: Linear::load(w, &format!("{l}.attention.output.dense"), h, h, true)?,
            attn_norm: LayerNorm::load(w, &format!("{l}.attention.output.LayerNorm"), h, eps)?,
            intermediate: Linear::load(w, &format!("{l}.intermediate.dense"), h, inter, true)?,
            out: Linear::load(w, &format!("{l}.output.dense"), inter, h, true)?,
            out_norm: LayerNorm::load(w, &format!("{l}.output.LayerNorm"), h, eps)?,
        })
    }

    /// Position ids of real tokens counted from the first one (see the module doc).
    fn positions(&self, mask: &Tensor) -> Tensor {
        if self.cfg.roberta() {
            let m = mask.to_kind(Kind::Int64);
            m.cumsum(-1, Kind::Int64) * &m + self.cfg.padding_idx()
        } else {
            positions_from_mask(mask)
        }
    }

    /// `BertLayer`: self-attention, then the MLP, each closed by a post-LN residual.
    fn layer(&self, i: usize, l: &Layer, x: Tensor, mask: &Tensor) -> Tensor {
        let heads = self.cfg.num_attention_heads;
        let hd = self.cfg.hidden_size / heads;
        let q = split_heads(&l.query.forward(&x), heads, hd);
        let (k, v) = self.prefix.extend(
            i,
            split_heads(&l.key.forward(&x), heads, hd),
            split_heads(&l.value.forward(&x), heads, hd),
        );
        let a = merge_heads(&attention(&q, &k, &v, mask, (hd as f64).powf(-0.5)));
        let x = l.attn_norm.forward(&(l.attn_out.forward(&a) + &x));
        let m = l.out.forward(&l.intermediate.forward(&x).gelu("none"));
        l.out_norm.forward(&(m + &x))
    }
}

/// Boolean attention mask `[b, 1, t, t]` for an encoder: every query sees
/// every real key, and itself (so a padding row never becomes NaN).
pub fn bidirectional_mask(mask: &Tensor) -> Tensor {
    let (b, t) = mask.size2().unwrap();
    let keys = mask.ne(0).view([b, 1, 1, t]);
    let own = Tensor::eye(t, (Kind::Bool, mask.device())).view([1, 1, t, t]);
    keys.logical_or(&own)
}

impl Network for Bert {
    fn hidden(&self, ids: &Tensor, mask: &Tensor) -> Tensor {
        let words = Tensor::embedding(&self.word_embeddings, ids, -1, false, false);
        let types = self.token_type_embeddings.get(0);
        // A prefix sits before the real tokens (prefix tuning).
        let positions = self.prefix.shift_positions(self.positions(mask));
        let pos = Tensor::embedding(&self.position_embeddings, &positions, -1, false, false);
        // transformers' order of the sums: (words + types) + positions.
        let mut x = self.embed_norm.forward(&(words + types + pos));
        let attn = self
            .prefix
            .widen_mask(bidirectional_mask(mask), &positions, None);
        let mut inputs = LayerInputs::new([attn]);
        for (i, l) in self.layers.iter().enumerate() {
            let device = l.query.weight.device();
            let [attn] = inputs.on(device);
            x = self.layer(i, l, moved(x, device), attn);
        }
        x
    }

    fn head(&self, hidden: &Tensor) -> Tensor {
        let hidden = moved(hidden.shallow_clone(), self.head_dense.weight.device());
        let x = self
            .head_norm
            .forward(&self.head_dense.forward(&hidden).gelu("none"));
        moved(x, self.word_embeddings.device())
            .linear(&self.word_embeddings, Some(&self.head_bias))
            .to_kind(Kind::Float)
    }

    fn kv_prefix(&self) -> Option<&KvPrefix> {
        Some(&self.prefix)
    }
    fn kv_prefix_mut(&mut self) -> Option<&mut KvPrefix> {
        Some(&mut self.prefix)
    }
}

/// The tokenizer's mask token and id: the `mask_token` of the model's
/// `tokenizer_config.json`, else `<mask>` (RoBERTa) or `[MASK]` (BERT) when
/// the tokenizer reads it as one token.
pub fn mask_token(tokenizer: &TextTokenizer, dir: &Path) -> Option<(String, i64)> {
    let configured = std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|c| match &c["mask_token"] {
            serde_json::Value::String(s) => Some(s.clone()),
            v => v["content"].as_str().map(str::to_string),
        });
    configured
        .into_iter()
        .chain(["<mask>".to_string(), "[MASK]".to_string()])
        .find_map(
            |text| match tokenizer.encode(&text, false).ok()?.as_slice() {
                [id] if tokenizer.decode_token(*id).as_deref() == Some(text.as_str()) => {
                    Some((text, *id))
                }
                _ => None,
            },
        )
}
