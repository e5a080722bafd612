//! The MeZO step (Malladi et al., 2023, Algorithm 1), in place, without autograd.
//!
//! z is never stored: it is regenerated from the step seed in each of the three
//! passes over the parameters (same seed, same canonical order, same draws).
//! Live training and replay of a logged step run the very same passes with the
//! same floating-point operations, so replay reproduces the weights bit for bit
//! even in bf16/f16, where `+ε` then `−2ε` then `+ε` does not restore θ exactly.

use anyhow::{bail, Result};
use tch::Tensor;

use crate::model::ParamList;

/// Hyperparameters of one step.
#[derive(Debug, Clone, Copy)]
pub struct StepConfig {
    pub eps: f64,
    pub lr: f64,
    pub weight_decay: f64,
}

/// Where the projected gradient comes from.
pub enum Gradient<'a> {
    /// Live training: evaluate the loss at θ+εz and θ−εz.
    Measure(&'a mut dyn FnMut() -> Result<f64>),
    /// Replay: the scalar was logged when the step first ran.
    Logged(f64),
}

/// What a step measured (losses are NaN on replay: nothing was evaluated).
#[derive(Debug, Clone, Copy)]
pub struct StepOutcome {
    pub projected_grad: f64,
    pub loss_plus: f64,
    pub loss_minus: f64,
}

/// `p += scale·z` for every parameter, z ~ N(0, 1) drawn from `seed` in canonical
/// order exactly as PyTorch's `torch.manual_seed(seed); torch.normal(0, 1, p.shape)`.
/// One temporary the size of the current tensor.
fn perturb(params: &ParamList, seed: u64, scale: f64) {
    tch::manual_seed(seed as i64);
    for p in params.iter() {
        let mut z = p.tensor.randn_like();
        let _ = z.g_mul_scalar_(scale);
        let mut t = p.tensor.shallow_clone();
        let _ = t.g_add_(&z);
    }
}

/// Pass 3: restore θ and apply the update in one sweep:
/// `p ← (1 − η·λ)·(p + εz) − η·g·z` (λ only where weight decay applies).
fn restore_and_update(params: &ParamList, seed: u64, cfg: &StepConfig, g: f64) {
    tch::manual_seed(seed as i64);
    for p in params.iter() {
        let mut z: Tensor = p.tensor.randn_like();
        let mut t = p.tensor.shallow_clone();
        if cfg.weight_decay != 0.0 && p.decays {
            let _ = z.g_mul_scalar_(cfg.eps);
            let _ = t.g_add_(&z);
            let _ = t.g_mul_scalar_(1.0 - cfg.lr * cfg.weight_decay);
            let _ = z.g_mul_scalar_(-cfg.lr * g / cfg.eps);
            let _ = t.g_add_(&z);
        } else {
            let _ = z.g_mul_scalar_(cfg.eps - cfg.lr * g);
            let _ = t.g_add_(&z);
        }
    }
}

/// One MeZO step (live or replayed) on `params` with step seed `seed`.
///
/// A non-finite loss restores θ (as closely as the dtype allows) and fails the
/// step; nothing non-finite is ever added to the weights.
pub fn mezo_step(params: &ParamList, seed: u64, cfg: &StepConfig, gradient: Gradient) -> Result<StepOutcome> {
    let _guard = tch::no_grad_guard();
    perturb(params, seed, cfg.eps);
    let (loss_plus, loss_minus, g) = match gradient {
        Gradient::Measure(loss) => {
            let plus = loss();
            perturb(params, seed, -2.0 * cfg.eps);
            let minus = loss();
            let (plus, minus) = match (plus, minus) {
                (Ok(p), Ok(m)) if p.is_finite() && m.is_finite() => (p, m),
                (p, m) => {
                    restore_and_update(params, seed, cfg, 0.0);
                    let show = |r: Result<f64>| r.map(|v| v.to_string()).unwrap_or_else(|e| format!("error: {e:#}"));
                    bail!("non-finite loss (loss+ = {}, loss- = {}); weights left as they were", show(p), show(m));
                }
            };
            (plus, minus, (plus - minus) / (2.0 * cfg.eps))
        }
        Gradient::Logged(g) => {
            perturb(params, seed, -2.0 * cfg.eps);
            (f64::NAN, f64::NAN, g)
        }
    };
    restore_and_update(params, seed, cfg, g);
    Ok(StepOutcome { projected_grad: g, loss_plus, loss_minus })
}
