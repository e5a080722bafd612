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
pub fn mezo_step(
    params: &ParamList,
    seed: u64,
    cfg: &StepConfig,
    gradient: Gradient,
) -> Result<StepOutcome> {
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
                    let show = |r: Result<f64>| {
                        r.map(|v| v.to_string())
                            .unwrap_or_else(|e| format!("error: {e:#}"))
                    };
                    bail!(
                        "non-finite loss (loss+ = {}, loss- = {}); weights left as they were",
                        show(p),
                        show(m)
                    );
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
    Ok(StepOutcome {
        projected_grad: g,
        loss_plus,
        loss_minus,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Param, ParamList};
    use tch::{Device, Kind, Tensor};

    /// torch's RNG is process-global and tests run on several threads.
    static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn params(kind: Kind) -> ParamList {
        tch::manual_seed(123);
        ParamList(vec![
            Param {
                name: "layers.0.fc.weight".into(),
                tensor: Tensor::randn([8, 16], (kind, Device::Cpu)),
                decays: true,
            },
            Param {
                name: "layers.0.fc.bias".into(),
                tensor: Tensor::randn([8], (kind, Device::Cpu)),
                decays: false,
            },
        ])
    }

    fn copy(p: &ParamList) -> ParamList {
        ParamList(
            p.iter()
                .map(|q| Param {
                    name: q.name.clone(),
                    tensor: q.tensor.copy(),
                    decays: q.decays,
                })
                .collect(),
        )
    }

    fn same(a: &ParamList, b: &ParamList) -> bool {
        a.iter()
            .zip(b.iter())
            .all(|(x, y)| x.tensor.equal(&y.tensor))
    }

    #[test]
    fn replay_is_bit_identical_to_live_training_even_in_bf16() {
        let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
        for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
            let live = params(kind);
            let replayed = copy(&live);
            let cfg = StepConfig {
                eps: 1e-3,
                lr: 1e-2,
                weight_decay: 0.1,
            };
            let mut grads = Vec::new();
            for seed in [1u64, 99, 12345] {
                let w = live.0[0].tensor.shallow_clone();
                let mut loss = || {
                    Ok(w.to_kind(Kind::Float)
                        .pow_tensor_scalar(2)
                        .sum(Kind::Float)
                        .double_value(&[]))
                };
                grads.push(
                    mezo_step(&live, seed, &cfg, Gradient::Measure(&mut loss))
                        .unwrap()
                        .projected_grad,
                );
            }
            for (seed, g) in [1u64, 99, 12345].into_iter().zip(grads) {
                mezo_step(&replayed, seed, &cfg, Gradient::Logged(g)).unwrap();
            }
            assert!(
                same(&live, &replayed),
                "{kind:?}: replay drifted from live training"
            );
            assert!(
                !same(&live, &params(kind)),
                "{kind:?}: the steps changed nothing"
            );
        }
    }

    #[test]
    fn update_follows_the_reference_rule() {
        let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
        // p_new = p - lr*(g*z + wd*p) for decayed tensors, p - lr*g*z for exempt ones.
        let p = params(Kind::Double);
        let before = copy(&p);
        let cfg = StepConfig {
            eps: 1e-3,
            lr: 0.1,
            weight_decay: 0.5,
        };
        mezo_step(&p, 7, &cfg, Gradient::Logged(2.0)).unwrap();
        tch::manual_seed(7);
        for (new, old) in p.iter().zip(before.iter()) {
            let z = old.tensor.randn_like();
            let wd = if old.decays { 0.5 } else { 0.0 };
            let want = &old.tensor - (&z * 2.0 + &old.tensor * wd) * 0.1;
            let err = (&new.tensor - want).abs().max().double_value(&[]);
            assert!(err < 1e-12, "{}: {err}", new.name);
        }
    }

    #[test]
    fn z_is_what_pytorch_draws_from_the_seed() {
        let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
        // Perturbing with +eps then reading back θ+εz must equal manual_seed + randn per tensor in order.
        let p = params(Kind::Double);
        let before = copy(&p);
        let _g = tch::no_grad_guard();
        perturb(&p, 42, 1.0);
        tch::manual_seed(42);
        for (new, old) in p.iter().zip(before.iter()) {
            let z = Tensor::randn(old.tensor.size(), (Kind::Double, Device::Cpu));
            assert!(
                (&new.tensor - &old.tensor - z)
                    .abs()
                    .max()
                    .double_value(&[])
                    < 1e-12
            );
        }
    }

    #[test]
    fn non_finite_loss_fails_and_restores() {
        let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
        let p = params(Kind::Double);
        let before = copy(&p);
        let cfg = StepConfig {
            eps: 1e-3,
            lr: 0.1,
            weight_decay: 0.0,
        };
        let mut loss = || Ok(f64::NAN);
        let err = mezo_step(&p, 3, &cfg, Gradient::Measure(&mut loss)).unwrap_err();
        assert!(err.to_string().contains("non-finite"));
        for (a, b) in p.iter().zip(before.iter()) {
            assert!((&a.tensor - &b.tensor).abs().max().double_value(&[]) < 1e-12);
        }
    }
}
