//! The LLaMA family: LLaMA 1–3 (GQA, `rope_theta`, llama3 `rope_scaling`,
//! explicit `head_dim`), Mistral (sliding window) and Qwen2 (q/k/v biases).
//! RoPE in transformers' rotate-half form (HF checkpoints are permuted for it),
//! RMSNorm in f32, SwiGLU MLP.

use anyhow::{bail, Result};
use serde::Deserialize;
use serde_json::Value;
use tch::{Kind, Tensor};

use super::adapters::KvPrefix;
use super::layers::{
    attention, attention_mask, merge_heads, moved, positions_from_mask, split_heads, LayerInputs,
    Linear, RmsNorm,
};
use super::placement::Part;
use super::weights::WeightLoader;
use super::Network;

#[derive(Debug, Clone, Deserialize)]
pub struct LlamaConfig {
    pub model_type: String,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    #[serde(default)]
    pub num_key_value_heads: Option<i64>,
    #[serde(default)]
    pub head_dim: Option<i64>,
    #[serde(default = "eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// Older configs: `rope_scaling`; transformers ≥ 5 writes `rope_parameters`.
    #[serde(default)]
    pub rope_scaling: Option<Value>,
    #[serde(default)]
    pub rope_parameters: Option<Value>,
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    #[serde(default)]
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub sliding_window: Option<i64>,
    #[serde(default)]
    pub use_sliding_window: bool,
    #[serde(default = "silu")]
    pub hidden_act: String,
}

fn eps() -> f64 {
    1e-6
}
fn silu() -> String {
    "silu".into()
}

impl LlamaConfig {
    fn head_dim(&self) -> i64 {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }
    fn kv_heads(&self) -> i64 {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    /// Qwen2 carries q/k/v biases by construction; others say so in `attention_bias`.
    fn qkv_bias(&self) -> bool {
        self.attention_bias.unwrap_or(self.model_type == "qwen2")
    }
    fn tied(&self) -> bool {
        self.tie_word_embeddings.unwrap_or(false)
    }
    fn sliding_window(&self) -> Result<Option<i64>> {
        match self.model_type.as_str() {
            "mistral" => Ok(self.sliding_window),
            "qwen2" if self.use_sliding_window => {
                bail!("Qwen2 with use_sliding_window is not supported")
            }
            _ => Ok(None),
        }
    }
    /// Inverse RoPE frequencies as transformers computes them (default or llama3).
    fn inv_freq(&self) -> Result<Tensor> {
        let params = self
            .rope_parameters
            .as_ref()
            .or(self.rope_scaling.as_ref())
            .filter(|v| !v.is_null());
        let get = |k: &str| params.and_then(|p| p.get(k)).and_then(Value::as_f64);
        let theta = get("rope_theta").or(self.rope_theta).unwrap_or(10000.0);
        let dim = self.head_dim();
        let idx = Tensor::arange_start_step(0, dim, 2, (Kind::Int64, tch::Device::Cpu))
            .to_kind(Kind::Float);
        let inv = (Tensor::from(theta as f32).pow(&(idx / dim as f64))).reciprocal();
        let rope_type = params
            .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
            .and_then(Value::as_str)
            .unwrap_or("default");
        match rope_type {
            "default" => Ok(inv),
            "llama3" => {
                let need = |k: &str| {
                    get(k).ok_or_else(|| anyhow::anyhow!("llama3 rope scaling lacks {k}"))
                };
                let factor = need("factor")?;
                let low = need("low_freq_factor")?;
                let high = need("high_freq_factor")?;
                let old = need("original_max_position_embeddings")?;
                let (low_wl, high_wl) = (old / low, old / high);
                let wavelen = inv.reciprocal() * (2.0 * std::f64::consts::PI);
                let scaled = inv.where_self(&wavelen.le(low_wl), &(&inv / factor));
                let smooth = ((wavelen.reciprocal() * old) - low) / (high - low);
                let smoothed: Tensor = (1.0 - &smooth) * &scaled / factor + &smooth * &scaled;
                let medium = wavelen.ge(high_wl).logical_and(&wavelen.le(low_wl));
                Ok(smoothed.where_self(&medium, &scaled))
            }
            other => bail!("rope type {other:?} is not supported (default, llama3)"),
        }
    }
}

struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    gate: Linear,
    up: Linear,
    down: Linear,
    input_norm: RmsNorm,
    post_norm: RmsNorm,
}

pub struct Llama {
    cfg: LlamaConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Tensor,
    inv_freq: Tensor,
    sliding_window: Option<i64>,
    prefix: KvPrefix,
}

impl Llama {
    /// Tensors are requested in transformers' `named_parameters()` order,
    /// each part on its device (a tied head is the embedding, on the first).
    pub fn load(cfg: LlamaConfig, w: &mut WeightLoader) -> Result<Self> {
        if cfg.hidden_act != "silu" {
            bail!("activation {:?} is not supported (silu)", cfg.hidden_act);
        }
        let (h, hd, nh, nkv) = (
            cfg.hidden_size,
            cfg.head_dim(),
            cfg.num_attention_heads,
            cfg.kv_heads(),
        );
        let (qkv_bias, mlp_bias) = (cfg.qkv_bias(), cfg.mlp_bias);
        let eps = cfg.rms_norm_eps;
        w.place(Part::Embeddings);
        let embed = w.param("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let mut layers = Vec::new();
        for i in 0..cfg.num_hidden_layers {
            w.place(Part::Layer(i as usize));
            let l = format!("model.layers.{i}");
            layers.push(Layer {
                q: Linear::load(w, &format!("{l}.self_attn.q_proj"), h, nh * hd, qkv_bias)?,
                k: Linear::load(w, &format!("{l}.self_attn.k_proj"), h, nkv * hd, qkv_bias)?,
                v: Linear::load(w, &format!("{l}.self_attn.v_proj"), h, nkv * hd, qkv_bias)?,
                o: Linear::load(
                    w,
                    &format!("{l}.self_attn.o_proj"),
                    nh * hd,
                    h,
                    cfg.attention_bias.unwrap_or(false),
                )?,
                gate: Linear::load(
                    w,
                    &format!("{l}.mlp.gate_proj"),
                    h,
                    cfg.intermediate_size,
                    mlp_bias,
                )?,
                up: Linear::load(
                    w,
                    &format!("{l}.mlp.up_proj"),
                    h,
                    cfg.intermediate_size,
                    mlp_bias,
                )?,
                down: Linear::load(
                    w,
                    &format!("{l}.mlp.down_proj"),
                    cfg.intermediate_size,
                    h,
                    mlp_bias,
                )?,
                input_norm: RmsNorm::load(w, &format!("{l}.input_layernorm"), h, eps)?,
                post_norm: RmsNorm::load(w, &format!("{l}.post_attention_layernorm"), h, eps)?,
            });
        }
        w.place(Part::Head);
        let norm = RmsNorm::load(w, "model.norm", h, eps)?;
        // Small models tie lm_head to the embedding; some tied checkpoints omit it, some store a copy.
        let lm_head = if cfg.tied() || !w.has("lm_head.weight") {
            embed.shallow_clone()
        } else {
            w.param("lm_head.weight", &[cfg.vocab_size, h])?
        };
        let inv_freq = cfg.inv_freq()?.to_device(embed.device());
        let sliding_window = cfg.sliding_window()?;
        Ok(Self {
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            inv_freq,
            sliding_window,
            prefix: KvPrefix::default(),
        })
    }

    /// cos/sin `[b, 1, t, head_dim]` computed in f32, then cast to the model dtype.
    fn rope(&self, pos: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let freqs = pos.to_kind(Kind::Float).unsqueeze(-1) * &self.inv_freq;
        let emb = Tensor::cat(&[&freqs, &freqs], -1).unsqueeze(1);
        (emb.cos().to_kind(kind), emb.sin().to_kind(kind))
    }

    fn layer(
        &self,
        i: usize,
        l: &Layer,
        x: Tensor,
        mask: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Tensor {
        let (hd, nh, nkv) = (
            self.cfg.head_dim(),
            self.cfg.num_attention_heads,
            self.cfg.kv_heads(),
        );
        let hs = l.input_norm.forward(&x);
        let q = apply_rope(&split_heads(&l.q.forward(&hs), nh, hd), cos, sin);
        let (k, v) = self.prefix.extend(
            i,
            apply_rope(&split_heads(&l.k.forward(&hs), nkv, hd), cos, sin),
            split_heads(&l.v.forward(&hs), nkv, hd),
        );
        let a = attention(&q, &k, &v, mask, (hd as f64).powf(-0.5));
        let x = &x + l.o.forward(&merge_heads(&a));
        let hs = l.post_norm.forward(&x);
        let m = l
            .down
            .forward(&(l.gate.forward(&hs).silu() * l.up.forward(&hs)));
        x + m
    }
}

fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size().last().unwrap() / 2;
    let parts = x.split(half, -1);
    Tensor::cat(&[&parts[1].neg(), &parts[0]], -1)
}

fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    x * cos + rotate_half(x) * sin
}

impl Network for Llama {
    fn hidden(&self, ids: &Tensor, mask: &Tensor) -> Tensor {
        let mut x = Tensor::embedding(&self.embed, ids, -1, false, false);
        let pos = self.prefix.shift_positions(positions_from_mask(mask));
        let (cos, sin) = self.rope(&pos, x.kind());
        let attn = self.prefix.widen_mask(
            attention_mask(mask, self.sliding_window),
            &pos,
            self.sliding_window,
        );
        let mut inputs = LayerInputs::new([attn, cos, sin]);
        for (i, l) in self.layers.iter().enumerate() {
            let device = l.input_norm.weight.device();
            let [attn, cos, sin] = inputs.on(device);
            x = self.layer(i, l, moved(x, device), attn, cos, sin);
        }
        self.norm.forward(&moved(x, self.norm.weight.device()))
    }

    fn head(&self, hidden: &Tensor) -> Tensor {
        moved(hidden.shallow_clone(), self.lm_head.device())
            .matmul(&self.lm_head.tr())
            .to_kind(Kind::Float)
    }

    fn kv_prefix(&self) -> Option<&KvPrefix> {
        Some(&self.prefix)
    }
    fn kv_prefix_mut(&mut self) -> Option<&mut KvPrefix> {
        Some(&mut self.prefix)
    }
}
