//! OPT (facebook/opt-*): learned positions with offset 2, ReLU MLP, pre-LN
//! (125m, 1.3b, …) or post-LN with `project_in`/`project_out` (350m).

use anyhow::Result;
use serde::Deserialize;
use tch::Tensor;

use super::adapters::KvPrefix;
use super::layers::{
    attention, attention_mask, merge_heads, moved, split_heads, LayerInputs, LayerNorm, Linear,
};
use super::placement::Part;
use super::weights::WeightLoader;
use super::Network;

#[derive(Debug, Clone, Deserialize)]
pub struct OptConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub ffn_dim: i64,
    pub max_position_embeddings: i64,
    #[serde(default)]
    pub word_embed_proj_dim: Option<i64>,
    #[serde(default = "yes")]
    pub do_layer_norm_before: bool,
    #[serde(default)]
    pub _remove_final_layer_norm: bool,
    #[serde(default = "yes")]
    pub enable_bias: bool,
    #[serde(default = "relu")]
    pub activation_function: String,
}

fn yes() -> bool {
    true
}
fn relu() -> String {
    "relu".into()
}

/// OPT's learned position table starts at index 2 (fairseq legacy).
const POSITION_OFFSET: i64 = 2;

struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    attn_norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    mlp_norm: LayerNorm,
}

pub struct Opt {
    cfg: OptConfig,
    embed_tokens: Tensor,
    embed_positions: Tensor,
    project_in: Option<Tensor>,
    project_out: Option<Tensor>,
    final_norm: Option<LayerNorm>,
    layers: Vec<Layer>,
    prefix: KvPrefix,
}

impl Opt {
    /// Tensors are requested in transformers' `named_parameters()` order,
    /// which puts the end of the decoder (`project_out`, the final norm)
    /// before its layers; each part goes on its device all the same (the
    /// tied head is `embed_tokens`, on the first).
    pub fn load(cfg: OptConfig, w: &mut WeightLoader) -> Result<Self> {
        let h = cfg.hidden_size;
        let proj = cfg.word_embed_proj_dim.unwrap_or(h);
        let p = "model.decoder";
        w.place(Part::Embeddings);
        let embed_tokens = w.param(&format!("{p}.embed_tokens.weight"), &[cfg.vocab_size, proj])?;
        let embed_positions = w.param(
            &format!("{p}.embed_positions.weight"),
            &[cfg.max_position_embeddings + POSITION_OFFSET, h],
        )?;
        let (project_out, project_in) = if proj != h {
            w.place(Part::Head);
            let out = w.param(&format!("{p}.project_out.weight"), &[proj, h])?;
            w.place(Part::Embeddings);
            let inp = w.param(&format!("{p}.project_in.weight"), &[h, proj])?;
            (Some(out), Some(inp))
        } else {
            (None, None)
        };
        w.place(Part::Head);
        let final_norm = if cfg.do_layer_norm_before && !cfg._remove_final_layer_norm {
            Some(LayerNorm::load(
                w,
                &format!("{p}.final_layer_norm"),
                h,
                1e-5,
            )?)
        } else {
            None
        };
        let mut layers = Vec::new();
        for i in 0..cfg.num_hidden_layers {
            w.place(Part::Layer(i as usize));
            let l = format!("{p}.layers.{i}");
            let bias = cfg.enable_bias;
            let k = Linear::load(w, &format!("{l}.self_attn.k_proj"), h, h, bias)?;
            let v = Linear::load(w, &format!("{l}.self_attn.v_proj"), h, h, bias)?;
            let q = Linear::load(w, &format!("{l}.self_attn.q_proj"), h, h, bias)?;
            let out = Linear::load(w, &format!("{l}.self_attn.out_proj"), h, h, bias)?;
            let attn_norm = LayerNorm::load(w, &format!("{l}.self_attn_layer_norm"), h, 1e-5)?;
            let fc1 = Linear::load(w, &format!("{l}.fc1"), h, cfg.ffn_dim, bias)?;
            let fc2 = Linear::load(w, &format!("{l}.fc2"), cfg.ffn_dim, h, bias)?;
            let mlp_norm = LayerNorm::load(w, &format!("{l}.final_layer_norm"), h, 1e-5)?;
            layers.push(Layer {
                q,
                k,
                v,
                out,
                attn_norm,
                fc1,
                fc2,
                mlp_norm,
            });
        }
        if cfg.activation_function != "relu" {
            anyhow::bail!(
                "OPT activation {:?} is not supported (only relu)",
                cfg.activation_function
            );
        }
        Ok(Self {
            cfg,
            embed_tokens,
            embed_positions,
            project_in,
            project_out,
            final_norm,
            layers,
            prefix: KvPrefix::default(),
        })
    }

    fn layer(&self, i: usize, l: &Layer, x: Tensor, mask: &Tensor) -> Tensor {
        let heads = self.cfg.num_attention_heads;
        let hd = self.cfg.hidden_size / heads;
        let pre = self.cfg.do_layer_norm_before;
        let residual = &x;
        let hs = if pre {
            l.attn_norm.forward(&x)
        } else {
            x.shallow_clone()
        };
        // transformers scales q before the product and then uses scale 1.
        let q = split_heads(&(l.q.forward(&hs) * (hd as f64).powf(-0.5)), heads, hd);
        let (k, v) = self.prefix.extend(
            i,
            split_heads(&l.k.forward(&hs), heads, hd),
            split_heads(&l.v.forward(&hs), heads, hd),
        );
        let a = l
            .out
            .forward(&merge_heads(&attention(&q, &k, &v, mask, 1.0)));
        let mut x = residual + a;
        if !pre {
            x = l.attn_norm.forward(&x);
        }
        let residual = &x;
        let hs = if pre {
            l.mlp_norm.forward(&x)
        } else {
            x.shallow_clone()
        };
        let m = l.fc2.forward(&l.fc1.forward(&hs).relu());
        let mut x = residual + m;
        if !pre {
            x = l.mlp_norm.forward(&x);
        }
        x
    }
}

impl Network for Opt {
    fn hidden(&self, ids: &Tensor, mask: &Tensor) -> Tensor {
        let mut x = Tensor::embedding(&self.embed_tokens, ids, -1, false, false);
        if let Some(p) = &self.project_in {
            x = x.matmul(&p.tr());
        }
        let maskl = mask.to_kind(tch::Kind::Int64);
        let pos = self
            .prefix
            .shift_positions(maskl.cumsum(-1, tch::Kind::Int64) * &maskl - 1 + POSITION_OFFSET);
        x = x + Tensor::embedding(&self.embed_positions, &pos, -1, false, false);
        let attn = self
            .prefix
            .widen_mask(attention_mask(mask, None), &pos, None);
        let mut inputs = LayerInputs::new([attn]);
        for (i, l) in self.layers.iter().enumerate() {
            let device = l.q.weight.device();
            let [attn] = inputs.on(device);
            x = self.layer(i, l, moved(x, device), attn);
        }
        if let Some(n) = &self.final_norm {
            x = n.forward(&moved(x, n.weight.device()));
        }
        if let Some(p) = &self.project_out {
            x = moved(x, p.device()).matmul(&p.tr());
        }
        x
    }

    fn head(&self, hidden: &Tensor) -> Tensor {
        moved(hidden.shallow_clone(), self.embed_tokens.device())
            .matmul(&self.embed_tokens.tr())
            .to_kind(tch::Kind::Float)
    }

    fn kv_prefix(&self) -> Option<&KvPrefix> {
        Some(&self.prefix)
    }
    fn kv_prefix_mut(&mut self) -> Option<&mut KvPrefix> {
        Some(&mut self.prefix)
    }
}
