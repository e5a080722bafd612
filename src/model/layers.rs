//! Building blocks shared by the architectures: linear, norms, masks, attention.
//!
//! Everything runs under `no_grad` on tensors without `requires_grad`.  Norms and
//! softmax follow transformers' precision rules so bf16/f16 runs match it.

use anyhow::Result;
use tch::{Device, Kind, Tensor};

use super::adapters::Lora;
use super::weights::WeightLoader;

/// `y = x Wᵀ + b` with `W` stored `[out, in]` (nn.Linear), plus a LoRA
/// adapter's `(α/r)·B A x` when the job tunes this layer with LoRA.
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<Lora>,
}

impl Linear {
    /// Load `{name}.weight` `[fan_out, fan_in]` and, when `bias`, `{name}.bias`.
    pub fn load(
        w: &mut WeightLoader,
        name: &str,
        fan_in: i64,
        fan_out: i64,
        bias: bool,
    ) -> Result<Self> {
        let weight = w.param(&format!("{name}.weight"), &[fan_out, fan_in])?;
        let bias = if bias {
            Some(w.param(&format!("{name}.bias"), &[fan_out])?)
        } else {
            None
        };
        let lora = w.lora(name, fan_in, fan_out, false)?;
        Ok(Self { weight, bias, lora })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let y = x.linear(&self.weight, self.bias.as_ref());
        match &self.lora {
            Some(lora) => y + lora.delta(x),
            None => y,
        }
    }
}

/// nn.LayerNorm (transformers runs it in the model dtype; libtorch accumulates in f32).
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn load(w: &mut WeightLoader, name: &str, n: i64, eps: f64) -> Result<Self> {
        let weight = w.param(&format!("{name}.weight"), &[n])?;
        let bias = w.param(&format!("{name}.bias"), &[n])?;
        Ok(Self { weight, bias, eps })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let n = *x.size().last().unwrap();
        x.layer_norm([n], Some(&self.weight), Some(&self.bias), self.eps, true)
    }
}

/// LLaMA's RMSNorm: statistics in f32, back to the input dtype before the weight.
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn load(w: &mut WeightLoader, name: &str, n: i64, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: w.param(&format!("{name}.weight"), &[n])?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let xf = x.to_kind(Kind::Float);
        let var = xf.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let normed = (xf * (var + self.eps).rsqrt()).to_kind(kind);
        &self.weight * normed
    }
}

/// `x` on `device`: the tensor itself where it is there already.  A model
/// split over several devices moves its hidden states to each layer's
/// device with this; unsplit, nothing moves and nothing changes.
pub fn moved(x: Tensor, device: Device) -> Tensor {
    if x.device() == device {
        x
    } else {
        x.to_device(device)
    }
}

/// What every layer reads besides the hidden states (the attention mask,
/// rotary tables), kept on the device of the layer that reads it.  The
/// layers on one device are consecutive, so each device receives one copy.
pub struct LayerInputs<const N: usize>([Tensor; N]);

impl<const N: usize> LayerInputs<N> {
    pub fn new(inputs: [Tensor; N]) -> Self {
        Self(inputs)
    }

    /// The inputs on `device`, moved there first where they are elsewhere.
    pub fn on(&mut self, device: Device) -> &[Tensor; N] {
        for t in &mut self.0 {
            if t.device() != device {
                *t = t.to_device(device);
            }
        }
        &self.0
    }
}

/// Positions counted over real tokens only (left padding shifts nothing);
/// padding slots get position 1, as transformers' `generate()` does.
pub fn positions_from_mask(mask: &Tensor) -> Tensor {
    let pos = mask.to_kind(Kind::Int64).cumsum(-1, Kind::Int64) - 1;
    pos.masked_fill(&mask.eq(0), 1)
}

/// Boolean attention mask `[b, 1, t, t]`: causal, padding keys hidden, and an
/// optional sliding window (Mistral).  Every query may always see itself, so a
/// padding row is never fully masked (that would turn softmax into NaN and
/// poison the batch through the padded keys).
pub fn attention_mask(mask: &Tensor, sliding_window: Option<i64>) -> Tensor {
    let (b, t) = mask.size2().unwrap();
    let dev = mask.device();
    let q = Tensor::arange(t, (Kind::Int64, dev)).view([t, 1]);
    let k = Tensor::arange(t, (Kind::Int64, dev)).view([1, t]);
    let mut allowed = k.le_tensor(&q);
    if let Some(w) = sliding_window {
        allowed = allowed.logical_and(&k.gt_tensor(&(&q - w)));
    }
    let keys = mask.ne(0).view([b, 1, 1, t]);
    let allowed = allowed.view([1, 1, t, t]).logical_and(&keys);
    allowed.logical_or(&Tensor::eye(t, (Kind::Bool, dev)).view([1, 1, t, t]))
}

/// Scaled dot-product attention over `[b, heads, t, head_dim]` tensors.  Grouped
/// key/value heads (GQA) are handled by libtorch (`enable_gqa`).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Tensor {
    let gqa = q.size()[1] != k.size()[1];
    Tensor::scaled_dot_product_attention(q, k, v, Some(mask), 0.0, false, scale, gqa)
}

/// `[b, t, heads*d]` → `[b, heads, t, d]`.
pub fn split_heads(x: &Tensor, heads: i64, head_dim: i64) -> Tensor {
    let (b, t, _) = x.size3().unwrap();
    x.view([b, t, heads, head_dim]).transpose(1, 2)
}

/// `[b, heads, t, d]` → `[b, t, heads*d]`.
pub fn merge_heads(x: &Tensor) -> Tensor {
    let (b, h, t, d) = x.size4().unwrap();
    x.transpose(1, 2).contiguous().view([b, t, h * d])
}
