//! Parameter-efficient tuning: what MeZO perturbs when it is not every weight.
//!
//! * **LoRA** (Hu et al.): a target linear layer `y = W x + b` becomes
//!   `y = W x + b + (α/r)·B A x` with `A [r, in]` drawn as PEFT draws it
//!   (Kaiming-uniform, `U(±1/√in)`) and `B [out, r] = 0`, so the tuned model starts
//!   exactly at the base model.  Only `A` and `B` are trainable; the base weights
//!   stay frozen and are merged (`W + (α/r)·B A`) only when the model is exported.
//! * **Prefix tuning** (Li & Liang; the MeZO paper's "prefix"): every attention
//!   layer gets `n` extra key/value slots in front of the sequence, initialized
//!   from the real keys and values of `n` random vocabulary tokens.  Real tokens
//!   are positioned after the prefix, as if those tokens were text before them
//!   (the way transformers treats a cached prefix), so the untrained prefix turns
//!   the model into exactly "the same model reading those tokens first".
//!
//! Both start from the job's seed: LoRA's `A` is drawn on the CPU in f32 (then
//! cast and moved), the same everywhere; a prefix's token ids are drawn the same
//! way, but its values come from a forward pass at the job's dtype and device,
//! so its last bits may differ elsewhere (runs record its SHA-256 to check).

use std::cell::RefCell;

use tch::{Device, Kind, Tensor};

pub use mezod_core::tuning::{default_lora_targets, is_target, LoraConfig, PrefixConfig, Tuning};

/// A LoRA adapter on one linear layer.
pub struct Lora {
    /// `[r, in]`
    pub a: Tensor,
    /// `[out, r]`
    pub b: Tensor,
    /// α / r
    pub scale: f64,
}

impl Lora {
    /// `(α/r)·B A x` for `x [..., in]`.
    pub fn delta(&self, x: &Tensor) -> Tensor {
        x.linear::<Tensor>(&self.a, None)
            .linear::<Tensor>(&self.b, None)
            * self.scale
    }

    /// `(α/r)·B A` `[out, in]`, computed in f32 and returned in `kind`.
    pub fn delta_weight(&self, kind: Kind) -> Tensor {
        (self
            .b
            .to_kind(Kind::Float)
            .matmul(&self.a.to_kind(Kind::Float))
            * self.scale)
            .to_kind(kind)
    }
}

/// Initial `A` of adapter number `index`: `manual_seed(seed + index)`, then
/// `U(−1/√in, 1/√in)` in f32 on the CPU (torch's `kaiming_uniform_(a=√5)`,
/// PEFT's default); cast to `kind` and moved to `device`.
pub fn lora_a_init(
    seed: u64,
    index: usize,
    r: i64,
    fan_in: i64,
    kind: Kind,
    device: Device,
) -> Tensor {
    let _guard = tch::no_grad_guard();
    tch::manual_seed(seed.wrapping_add(index as u64) as i64);
    let bound = 1.0 / (fan_in as f64).sqrt();
    let mut a = Tensor::empty([r, fan_in], (Kind::Float, Device::Cpu));
    let _ = a.uniform_(-bound, bound);
    a.to_kind(kind).to_device(device)
}

/// The `n` random vocabulary tokens whose activations start a prefix:
/// `manual_seed(seed)`, then `randint(vocab, [n])` on the CPU (the MeZO
/// reference draws them the same way).
pub fn prefix_init_tokens(seed: u64, n: i64, vocab: i64) -> Tensor {
    tch::manual_seed(seed as i64);
    Tensor::randint(vocab, [1, n], (Kind::Int64, Device::Cpu))
}

/// Per-layer key/value prefixes of one network, and the hook its attention
/// layers call.  Empty (no prefix) for full and LoRA tuning: every method is
/// then the identity.
#[derive(Default)]
pub struct KvPrefix {
    /// `(key, value)` per layer, each `[kv_heads, n, head_dim]` (keys after
    /// any rotary embedding, as a cache holds them).
    layers: Vec<(Tensor, Tensor)>,
    /// While some: attention layers record their keys and values here.
    capture: RefCell<Option<Vec<(Tensor, Tensor)>>>,
}

impl KvPrefix {
    /// Prefix length in tokens (0 without a prefix).
    pub fn len(&self) -> i64 {
        self.layers.first().map(|(k, _)| k.size()[1]).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Install per-layer prefixes (shallow clones of the trainable tensors).
    pub fn set(&mut self, layers: Vec<(Tensor, Tensor)>) {
        self.layers = layers;
    }

    /// Positions of the real tokens: after the prefix.
    pub fn shift_positions(&self, positions: Tensor) -> Tensor {
        match self.len() {
            0 => positions,
            n => positions + n,
        }
    }

    /// A boolean attention mask `[b, 1, t, t]` widened to `[b, 1, t, n + t]`:
    /// every query sees the whole prefix, or with a sliding window (Mistral)
    /// the prefix slots less than `window` positions behind it.  `positions`
    /// `[b, t]` are the queries' positions after [`KvPrefix::shift_positions`].
    pub fn widen_mask(&self, mask: Tensor, positions: &Tensor, window: Option<i64>) -> Tensor {
        let n = self.len();
        if n == 0 {
            return mask;
        }
        let (b, _, t, _) = mask.size4().unwrap();
        let seen = match window {
            None => Tensor::ones([b, 1, t, n], (Kind::Bool, mask.device())),
            Some(w) => {
                let slots = Tensor::arange(n, (Kind::Int64, mask.device())).view([1, 1, n]);
                (positions.unsqueeze(-1) - slots).lt(w).unsqueeze(1)
            }
        };
        Tensor::cat(&[seen, mask], -1)
    }

    /// Keys and values `[b, kv_heads, t, d]` of attention layer `layer`, with
    /// that layer's prefix in front; recorded first while capturing.
    pub fn extend(&self, layer: usize, k: Tensor, v: Tensor) -> (Tensor, Tensor) {
        if let Some(seen) = self.capture.borrow_mut().as_mut() {
            seen.push((k.shallow_clone(), v.shallow_clone()));
        }
        match self.layers.get(layer) {
            None => (k, v),
            Some((pk, pv)) => {
                let b = k.size()[0];
                let grow = |p: &Tensor, x: &Tensor| {
                    let s = p.size();
                    Tensor::cat(
                        &[&p.unsqueeze(0).expand([b, s[0], s[1], s[2]], false), x],
                        2,
                    )
                };
                (grow(pk, &k), grow(pv, &v))
            }
        }
    }

    /// Run `forward` while recording every attention layer's keys and values.
    pub fn capture(&self, forward: impl FnOnce()) -> Vec<(Tensor, Tensor)> {
        *self.capture.borrow_mut() = Some(Vec::new());
        forward();
        self.capture.borrow_mut().take().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_match_whole_name_segments() {
        let t = vec!["q_proj".to_string(), "v_proj".to_string()];
        assert!(is_target("model.layers.0.self_attn.q_proj", &t));
        assert!(is_target("v_proj", &t));
        assert!(!is_target("model.layers.0.self_attn.xq_proj", &t));
        assert!(!is_target("model.layers.0.self_attn.k_proj", &t));
    }

    #[test]
    fn lora_starts_at_the_base_model_and_merges_to_the_same_layer() {
        let _rng = crate::torch_rng_lock();
        let a = lora_a_init(7, 3, 4, 10, Kind::Float, Device::Cpu);
        let bound = 1.0 / 10f64.sqrt();
        assert!(a.abs().max().double_value(&[]) <= bound);
        assert!(a.std(true).double_value(&[]) > 0.5 * bound / 3f64.sqrt());
        // Same seed and index: same draw; another index: another draw.
        assert!(a.equal(&lora_a_init(7, 3, 4, 10, Kind::Float, Device::Cpu)));
        assert!(!a.equal(&lora_a_init(7, 4, 4, 10, Kind::Float, Device::Cpu)));
        let b = Tensor::zeros([6, 4], (Kind::Float, Device::Cpu));
        let x = Tensor::randn([2, 10], (Kind::Float, Device::Cpu));
        let lora = Lora { a, b, scale: 2.0 };
        assert_eq!(lora.delta(&x).abs().max().double_value(&[]), 0.0);
        let lora = Lora {
            b: Tensor::randn([6, 4], (Kind::Float, Device::Cpu)),
            ..lora
        };
        let w = Tensor::randn([6, 10], (Kind::Float, Device::Cpu));
        let unmerged = x.linear::<Tensor>(&w, None) + lora.delta(&x);
        let merged = x.linear::<Tensor>(&(&w + lora.delta_weight(Kind::Float)), None);
        assert!(unmerged.allclose(&merged, 1e-5, 1e-5, false));
    }

    #[test]
    fn prefix_widens_keys_values_and_mask() {
        // torch's generator is process-wide: draws here would shift another
        // test's seeded draws.
        let _rng = crate::torch_rng_lock();
        let mut p = KvPrefix::default();
        let opts = (Kind::Float, Device::Cpu);
        let (k, v) = (
            Tensor::randn([2, 3, 4, 5], opts),
            Tensor::randn([2, 3, 4, 5], opts),
        );
        let seen = p.capture(|| {
            let _ = p.extend(0, k.shallow_clone(), v.shallow_clone());
        });
        assert_eq!(seen.len(), 1);
        assert!(p.is_empty());
        p.set(vec![(
            Tensor::randn([3, 2, 5], opts),
            Tensor::randn([3, 2, 5], opts),
        )]);
        assert_eq!(p.len(), 2);
        let (k2, v2) = p.extend(0, k.shallow_clone(), v.shallow_clone());
        assert_eq!(k2.size(), vec![2, 3, 6, 5]);
        assert!(k2.narrow(2, 2, 4).equal(&k));
        assert!(v2.narrow(2, 0, 2).get(1).equal(&p.layers[0].1));
        let mask = Tensor::zeros([2, 1, 4, 4], (Kind::Bool, Device::Cpu));
        let pos = p.shift_positions(Tensor::arange(4, (Kind::Int64, Device::Cpu)).view([1, 4]));
        assert_eq!(
            Vec::<i64>::try_from(pos.view([4])).unwrap(),
            vec![2, 3, 4, 5]
        );
        let pos = pos.expand([2, 4], false);
        let wide = p.widen_mask(mask.shallow_clone(), &pos, None);
        assert_eq!(wide.size(), vec![2, 1, 4, 6]);
        let count = |m: &Tensor| m.to_kind(Kind::Int64).sum(Kind::Int64).int64_value(&[]);
        assert_eq!(count(&wide), 2 * 4 * 2);
        // Window 4: the query at position 5 no longer sees slot 1 (5 − 1 = 4), nor slot 0.
        let windowed = p.widen_mask(mask, &pos, Some(4));
        assert_eq!(count(&windowed), 2 * (2 + 2 + 1));
    }
}
