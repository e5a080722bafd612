//! GPT-2: learned absolute positions, `Conv1D` weights stored `[in, out]`,
//! GELU (tanh form), pre-LN, lm_head tied to the token embedding.

use anyhow::{bail, Result};
use serde::Deserialize;
use tch::{Kind, Tensor};

use super::adapters::{KvPrefix, Lora};
use super::layers::{
    attention, attention_mask, merge_heads, moved, positions_from_mask, split_heads, LayerInputs,
    LayerNorm,
};
use super::placement::Part;
use super::weights::WeightLoader;
use super::Network;

#[derive(Debug, Clone, Deserialize)]
pub struct Gpt2Config {
    pub vocab_size: i64,
    pub n_embd: i64,
    pub n_layer: i64,
    pub n_head: i64,
    pub n_positions: i64,
    #[serde(default)]
    pub n_inner: Option<i64>,
    #[serde(default = "eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "gelu_new")]
    pub activation_function: String,
    #[serde(default = "yes")]
    pub scale_attn_weights: bool,
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
}

fn eps() -> f64 {
    1e-5
}
fn gelu_new() -> String {
    "gelu_new".into()
}
fn yes() -> bool {
    true
}

/// GPT-2's `Conv1D`: `y = x W + b` with `W` stored `[in, out]`; a LoRA
/// adapter keeps PEFT's `[r, in]`/`[out, r]` layout (its merge is transposed).
struct Conv1D {
    weight: Tensor,
    bias: Tensor,
    lora: Option<Lora>,
}

impl Conv1D {
    fn load(w: &mut WeightLoader, name: &str, fan_in: i64, fan_out: i64) -> Result<Self> {
        let weight = w.param(&format!("{name}.weight"), &[fan_in, fan_out])?;
        let bias = w.param(&format!("{name}.bias"), &[fan_out])?;
        let lora = w.lora(name, fan_in, fan_out, true)?;
        Ok(Self { weight, bias, lora })
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        let y = x.matmul(&self.weight) + &self.bias;
        match &self.lora {
            Some(lora) => y + lora.delta(x),
            None => y,
        }
    }
}

struct Block {
    ln_1: LayerNorm,
    c_attn: Conv1D,
    attn_proj: Conv1D,
    ln_2: LayerNorm,
    c_fc: Conv1D,
    mlp_proj: Conv1D,
}

pub struct Gpt2 {
    cfg: Gpt2Config,
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    prefix: KvPrefix,
}

impl Gpt2 {
    /// Tensors are requested in transformers' `named_parameters()` order,
    /// each part on its device (the tied head is `wte`, on the first).
    pub fn load(cfg: Gpt2Config, w: &mut WeightLoader) -> Result<Self> {
        if !matches!(
            cfg.activation_function.as_str(),
            "gelu_new" | "gelu_pytorch_tanh"
        ) {
            bail!(
                "GPT-2 activation {:?} is not supported (gelu_new)",
                cfg.activation_function
            );
        }
        if cfg.scale_attn_by_inverse_layer_idx {
            bail!("GPT-2 with scale_attn_by_inverse_layer_idx is not supported");
        }
        let h = cfg.n_embd;
        let inner = cfg.n_inner.unwrap_or(4 * h);
        let eps = cfg.layer_norm_epsilon;
        w.place(Part::Embeddings);
        let wte = w.param("transformer.wte.weight", &[cfg.vocab_size, h])?;
        let wpe = w.param("transformer.wpe.weight", &[cfg.n_positions, h])?;
        let mut blocks = Vec::new();
        for i in 0..cfg.n_layer {
            w.place(Part::Layer(i as usize));
            let b = format!("transformer.h.{i}");
            blocks.push(Block {
                ln_1: LayerNorm::load(w, &format!("{b}.ln_1"), h, eps)?,
                c_attn: Conv1D::load(w, &format!("{b}.attn.c_attn"), h, 3 * h)?,
                attn_proj: Conv1D::load(w, &format!("{b}.attn.c_proj"), h, h)?,
                ln_2: LayerNorm::load(w, &format!("{b}.ln_2"), h, eps)?,
                c_fc: Conv1D::load(w, &format!("{b}.mlp.c_fc"), h, inner)?,
                mlp_proj: Conv1D::load(w, &format!("{b}.mlp.c_proj"), inner, h)?,
            });
        }
        w.place(Part::Head);
        let ln_f = LayerNorm::load(w, "transformer.ln_f", h, eps)?;
        Ok(Self {
            cfg,
            wte,
            wpe,
            blocks,
            ln_f,
            prefix: KvPrefix::default(),
        })
    }

    fn block(&self, i: usize, b: &Block, x: Tensor, mask: &Tensor) -> Tensor {
        let heads = self.cfg.n_head;
        let hd = self.cfg.n_embd / heads;
        let qkv = b
            .c_attn
            .forward(&b.ln_1.forward(&x))
            .split(self.cfg.n_embd, -1);
        let q = split_heads(&qkv[0], heads, hd);
        let (k, v) = self.prefix.extend(
            i,
            split_heads(&qkv[1], heads, hd),
            split_heads(&qkv[2], heads, hd),
        );
        let scale = if self.cfg.scale_attn_weights {
            (hd as f64).powf(-0.5)
        } else {
            1.0
        };
        let x = &x
            + b.attn_proj
                .forward(&merge_heads(&attention(&q, &k, &v, mask, scale)));
        let m = b
            .mlp_proj
            .forward(&b.c_fc.forward(&b.ln_2.forward(&x)).gelu("tanh"));
        x + m
    }
}

impl Network for Gpt2 {
    fn hidden(&self, ids: &Tensor, mask: &Tensor) -> Tensor {
        let pos = self.prefix.shift_positions(positions_from_mask(mask));
        let mut x = Tensor::embedding(&self.wte, ids, -1, false, false)
            + Tensor::embedding(&self.wpe, &pos, -1, false, false);
        let attn = self
            .prefix
            .widen_mask(attention_mask(mask, None), &pos, None);
        let mut inputs = LayerInputs::new([attn]);
        for (i, b) in self.blocks.iter().enumerate() {
            let device = b.ln_1.weight.device();
            let [attn] = inputs.on(device);
            x = self.block(i, b, moved(x, device), attn);
        }
        self.ln_f.forward(&moved(x, self.ln_f.weight.device()))
    }

    fn head(&self, hidden: &Tensor) -> Tensor {
        moved(hidden.shallow_clone(), self.wte.device())
            .matmul(&self.wte.tr())
            .to_kind(Kind::Float)
    }

    fn kv_prefix(&self) -> Option<&KvPrefix> {
        Some(&self.prefix)
    }
    fn kv_prefix_mut(&mut self) -> Option<&mut KvPrefix> {
        Some(&mut self.prefix)
    }
}
