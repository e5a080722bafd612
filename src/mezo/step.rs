//! The MeZO step (Malladi et al., 2023, Algorithm 1), in place, without
//! autograd, and n-SPSA, its average over several directions; the passes over
//! the weights every estimator shares (`mezo::method` picks the estimator;
//! `fzoo` is the one that measures differently).
//!
//! z is never stored: it is regenerated from the step seed in each of the
//! passes over the parameters (same seed, same canonical order, same draws).
//! Live training and replay of a logged step run the very same passes with the
//! same floating-point operations, so replay reproduces the weights bit for bit
//! even in bf16/f16, where `+ε` then `−2ε` then `+ε` does not restore θ exactly.

use super::sweep::{Form, Update, ZSweep};
use crate::model::ParamList;
use anyhow::{bail, Result};

/// Hyperparameters of one step.
#[derive(Debug, Clone, Copy)]
pub struct StepConfig {
    pub eps: f64,
    pub lr: f64,
    pub weight_decay: f64,
}

/// What a step measured (losses are NaN on replay: nothing was evaluated).
#[derive(Debug, Clone, Copy)]
pub struct StepOutcome {
    pub projected_grad: f64,
    pub loss_plus: f64,
    pub loss_minus: f64,
}

/// Where a step's numbers come from: forward passes now, or the record that
/// logged them when the step first ran.
pub enum Source<'a, Logged> {
    /// Live training: evaluate the loss at the weights as they are now.
    Measure(&'a mut dyn FnMut() -> Result<f64>),
    /// Replay: what the step's record holds.
    Logged(Logged),
}

/// MeZO's projected gradient: the loss at θ+εz and θ−εz, or the logged scalar.
pub type Gradient<'a> = Source<'a, f64>;

/// n-SPSA's projected gradients: one per direction.
pub type Gradients<'a> = Source<'a, &'a [f64]>;

/// Algorithm 1: one MeZO step (live or replayed) on `params` with step seed
/// `seed`, z shaped by `form` (dense; Sparse MeZO's mask; LOZO's `U·Vᵀ`).
///
/// A non-finite loss restores θ (as closely as the dtype allows) and fails the
/// step; nothing non-finite is ever added to the weights.
pub(crate) fn mezo_step_along(
    params: &ParamList,
    z: &ZSweep,
    form: &Form,
    seed: u64,
    cfg: &StepConfig,
    gradient: Gradient,
) -> Result<StepOutcome> {
    let _guard = tch::no_grad_guard();
    perturb(params, z, form, seed, cfg.eps);
    let (loss_plus, loss_minus, g) = match gradient {
        Gradient::Measure(loss) => {
            let plus = loss();
            perturb(params, z, form, seed, -2.0 * cfg.eps);
            let minus = loss();
            let (plus, minus) = match (plus, minus) {
                (Ok(p), Ok(m)) if p.is_finite() && m.is_finite() => (p, m),
                (p, m) => {
                    restore_and_update(params, z, form, seed, cfg, 0.0);
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
            perturb(params, z, form, seed, -2.0 * cfg.eps);
            (f64::NAN, f64::NAN, g)
        }
    };
    restore_and_update(params, z, form, seed, cfg, g);
    Ok(StepOutcome {
        projected_grad: g,
        loss_plus,
        loss_minus,
    })
}

/// n-SPSA (`mezo.directions: n`): every direction is measured at the same θ
/// (+εz_j, −2εz_j, then +εz_j to restore), then the directions are applied in
/// turn, `p ← p − (η/n)·g_j·z_j`, weight decay with the first.  Never more than
/// one z exists; 4n passes instead of 3.
pub(crate) fn spsa_step_along(
    params: &ParamList,
    z: &ZSweep,
    form: &Form,
    seeds: &[u64],
    cfg: &StepConfig,
    mut gradients: Gradients,
) -> Result<Vec<StepOutcome>> {
    let _guard = tch::no_grad_guard();
    let mut outcomes = Vec::with_capacity(seeds.len());
    for (j, &seed) in seeds.iter().enumerate() {
        perturb(params, z, form, seed, cfg.eps);
        let outcome = match &mut gradients {
            Gradients::Measure(loss) => {
                let plus = loss();
                perturb(params, z, form, seed, -2.0 * cfg.eps);
                let minus = loss();
                perturb(params, z, form, seed, cfg.eps);
                measurement(j, plus, minus, cfg)
                    .map_err(|why| anyhow::anyhow!("{why}; weights left as they were"))?
            }
            Gradients::Logged(grads) => {
                perturb(params, z, form, seed, -2.0 * cfg.eps);
                perturb(params, z, form, seed, cfg.eps);
                StepOutcome {
                    projected_grad: grads[j],
                    loss_plus: f64::NAN,
                    loss_minus: f64::NAN,
                }
            }
        };
        outcomes.push(outcome);
    }
    apply_average(params, z, form, seeds, cfg, &outcomes);
    Ok(outcomes)
}

/// Direction `j`'s outcome from its two losses, or why there is none (a
/// loss that failed or is not finite).
pub(super) fn measurement(
    j: usize,
    plus: Result<f64>,
    minus: Result<f64>,
    cfg: &StepConfig,
) -> std::result::Result<StepOutcome, String> {
    match (plus, minus) {
        (Ok(p), Ok(m)) if p.is_finite() && m.is_finite() => Ok(StepOutcome {
            projected_grad: (p - m) / (2.0 * cfg.eps),
            loss_plus: p,
            loss_minus: m,
        }),
        (p, m) => Err(format!(
            "non-finite loss in direction {j} (loss+ = {:?}, loss- = {:?})",
            p.ok(),
            m.ok()
        )),
    }
}

/// [`mezo_step_along`] with a dense z: plain MeZO.
pub fn mezo_step(
    params: &ParamList,
    z: &ZSweep,
    seed: u64,
    cfg: &StepConfig,
    gradient: Gradient,
) -> Result<StepOutcome> {
    mezo_step_along(params, z, &Form::Dense, seed, cfg, gradient)
}

/// [`spsa_step_along`] with dense directions.
pub fn spsa_step(
    params: &ParamList,
    z: &ZSweep,
    seeds: &[u64],
    cfg: &StepConfig,
    gradients: Gradients,
) -> Result<Vec<StepOutcome>> {
    spsa_step_along(params, z, &Form::Dense, seeds, cfg, gradients)
}

/// Pass 1 and 2: `p += scale·z`.
pub(super) fn perturb(params: &ParamList, z: &ZSweep, form: &Form, seed: u64, scale: f64) {
    z.apply_shaped(params, seed, form, |_| Update::add(scale));
}

/// Pass 3: restore θ and apply the update in one sweep:
/// `p ← (1 − η·λ)·(p + εz) − η·g·z` (λ only where weight decay applies).
fn restore_and_update(
    params: &ParamList,
    z: &ZSweep,
    form: &Form,
    seed: u64,
    cfg: &StepConfig,
    g: f64,
) {
    z.apply_shaped(params, seed, form, |decays| {
        if cfg.weight_decay != 0.0 && decays {
            Update {
                keep: 1.0 - cfg.lr * cfg.weight_decay,
                pre: cfg.eps,
                post: -cfg.lr * g,
            }
        } else {
            Update::add(cfg.eps - cfg.lr * g)
        }
    });
}

/// n-SPSA's update: each direction's `p ← p − (η/n)·g_j·z_j` in turn (see
/// [`apply_updates`]).
pub(super) fn apply_average(
    params: &ParamList,
    z: &ZSweep,
    form: &Form,
    seeds: &[u64],
    cfg: &StepConfig,
    outcomes: &[StepOutcome],
) {
    let n = seeds.len() as f64;
    let posts: Vec<f64> = outcomes
        .iter()
        .map(|o| -cfg.lr * o.projected_grad / n)
        .collect();
    apply_updates(params, z, form, seeds, cfg, &posts);
}

/// The update passes of a step with several directions, one per direction:
/// `p ← p + post_j·z_j`, weight decay `(1 − ηλ)` with the first.
pub(super) fn apply_updates(
    params: &ParamList,
    z: &ZSweep,
    form: &Form,
    seeds: &[u64],
    cfg: &StepConfig,
    posts: &[f64],
) {
    for (j, (&seed, &post)) in seeds.iter().zip(posts).enumerate() {
        z.apply_shaped(params, seed, form, |decays| Update {
            keep: if j == 0 && cfg.weight_decay != 0.0 && decays {
                1.0 - cfg.lr * cfg.weight_decay
            } else {
                1.0
            },
            pre: 0.0,
            post,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mezo::method::{live_step, replay_step, Logged};
    use crate::mezo::sweep::{Perturbation, Rng, DEFAULT_CHUNK};
    use crate::mezo::testing::*;
    use crate::model::{Param, ParamList};
    use mezod_core::estimator::Estimator;
    use tch::{Device, Kind, Tensor};

    #[test]
    fn replay_is_bit_identical_to_live_training_even_in_bf16() {
        let _rng = crate::torch_rng_lock();
        for rng in [Rng::Torch, Rng::Fast] {
            let z = ZSweep::new(rng, 2);
            for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
                let live = params(kind);
                let replayed = copy(&live);
                let seeds = [1u64, 99, 12345];
                let grads = train(&live, &z, &DECAYED, &seeds);
                for (&seed, g) in seeds.iter().zip(grads) {
                    mezo_step(&replayed, &z, seed, &DECAYED, Gradient::Logged(g)).unwrap();
                }
                assert!(
                    same(&live, &replayed),
                    "{rng:?} {kind:?}: replay drifted from live training"
                );
                assert!(
                    !same(&live, &params(kind)),
                    "{rng:?} {kind:?}: the steps changed nothing"
                );
            }
        }
    }

    #[test]
    fn fast_rng_gives_the_same_weights_for_any_thread_count_and_chunk_size() {
        let _rng = crate::torch_rng_lock();
        // Big enough that the chunks split every tensor in several places.
        let big = |kind| {
            tch::manual_seed(5);
            ParamList(vec![
                Param {
                    name: "w".into(),
                    tensor: Tensor::randn([300, 257], (kind, Device::Cpu)),
                    decays: true,
                },
                Param {
                    name: "b".into(),
                    tensor: Tensor::randn([1001], (kind, Device::Cpu)),
                    decays: false,
                },
            ])
        };
        for kind in [Kind::Float, Kind::BFloat16] {
            let reference = big(kind);
            let grads = train(&reference, &ZSweep::new(Rng::Fast, 1), &DECAYED, &[3, 4, 5]);
            for (threads, chunk) in [(2, DEFAULT_CHUNK), (1, 1000), (2, 77)] {
                let other = big(kind);
                let z = ZSweep::with_chunk(Rng::Fast, threads, chunk);
                let again = train(&other, &z, &DECAYED, &[3, 4, 5]);
                assert_eq!(grads, again, "{kind:?}, {threads} threads, chunk {chunk}");
                assert!(
                    same(&reference, &other),
                    "{kind:?}, {threads} threads, chunk {chunk}"
                );
            }
        }
        // LOZO's U·Vᵀ, whose chunks start mid-row (257 columns), and Sparse
        // MeZO's mask, whose chunks start mid-byte (chunk 77).
        let shaped = |z: &ZSweep, method: Estimator, basis: Option<u64>| {
            let p = big(Kind::Float);
            for seed in [3u64, 4] {
                let mut loss = quadratic_loss(&p);
                live_step(&p, z, method, &[seed], basis, &DECAYED, &mut loss).unwrap();
            }
            p
        };
        for (method, basis) in [
            (lozo(2), Some(9)),
            (Estimator::Sparse { sparsity: 0.75 }, None),
        ] {
            let reference = shaped(&ZSweep::new(Rng::Fast, 1), method, basis);
            assert!(!same(&reference, &big(Kind::Float)));
            for (threads, chunk) in [(2, DEFAULT_CHUNK), (1, 1000), (2, 77)] {
                let other = shaped(
                    &ZSweep::with_chunk(Rng::Fast, threads, chunk),
                    method,
                    basis,
                );
                assert!(
                    same(&reference, &other),
                    "{method:?}, {threads} threads, chunk {chunk}"
                );
            }
        }
    }

    #[test]
    fn update_follows_the_reference_rule() {
        let _rng = crate::torch_rng_lock();
        // p_new = p - lr*(g*z + wd*p) for decayed tensors, p - lr*g*z for exempt ones.
        for (rng, kind, tol) in [
            (Rng::Torch, Kind::Double, 1e-12),
            (Rng::Fast, Kind::Float, 1e-6),
        ] {
            let p = params(kind);
            let before = copy(&p);
            let cfg = StepConfig {
                eps: 1e-3,
                lr: 0.1,
                weight_decay: 0.5,
            };
            mezo_step(&p, &ZSweep::new(rng, 2), 7, &cfg, Gradient::Logged(2.0)).unwrap();
            for ((new, old), z) in p.iter().zip(before.iter()).zip(drawn_z(rng, &before, 7)) {
                let wd = if old.decays { 0.5 } else { 0.0 };
                let want = &old.tensor - (&z * 2.0 + &old.tensor * wd) * 0.1;
                let err = (&new.tensor - want).abs().max().double_value(&[]);
                assert!(err < tol, "{rng:?} {}: {err}", new.name);
            }
        }
    }

    #[test]
    fn z_is_what_each_generator_draws_from_the_seed() {
        let _rng = crate::torch_rng_lock();
        // torch: manual_seed + randn per tensor in order, as PyTorch draws it.
        // fast: the counter-based stream of each tensor's index.
        for (rng, kind) in [(Rng::Torch, Kind::Double), (Rng::Fast, Kind::Float)] {
            let p = params(kind);
            let before = copy(&p);
            perturb(&p, &ZSweep::new(rng, 2), &Form::Dense, 42, 1.0);
            for ((new, old), z) in p.iter().zip(before.iter()).zip(drawn_z(rng, &before, 42)) {
                let err = (&new.tensor - &old.tensor - z)
                    .abs()
                    .max()
                    .double_value(&[]);
                assert!(err < 1e-6, "{rng:?} {}: {err}", new.name);
            }
        }
    }

    #[test]
    fn n_spsa_replays_exactly_and_follows_the_averaged_rule() {
        let _rng = crate::torch_rng_lock();
        for rng in [Rng::Torch, Rng::Fast] {
            let z = ZSweep::new(rng, 2);
            for kind in [Kind::Float, Kind::BFloat16] {
                let live = params(kind);
                let replayed = copy(&live);
                for seeds in [[1u64, 2, 3], [4, 5, 6]] {
                    let mut loss = quadratic_loss(&live);
                    let outs =
                        spsa_step(&live, &z, &seeds, &DECAYED, Gradients::Measure(&mut loss))
                            .unwrap();
                    assert_eq!(outs.len(), 3);
                    let grads: Vec<f64> = outs.iter().map(|o| o.projected_grad).collect();
                    replay_step(
                        &replayed,
                        &z,
                        Estimator::Mezo,
                        &seeds,
                        &grads,
                        Logged::default(),
                        &DECAYED,
                    )
                    .unwrap();
                }
                assert!(same(&live, &replayed), "{rng:?} {kind:?}: replay drifted");
                assert!(
                    !same(&live, &params(kind)),
                    "{rng:?} {kind:?}: nothing changed"
                );
            }
        }
        // θ ← (1 − ηλ)·θ − (η/n)·Σ g_j·z_j, all directions drawn at the same θ.
        let p = params(Kind::Double);
        let before = copy(&p);
        let cfg = StepConfig {
            eps: 1e-3,
            lr: 0.1,
            weight_decay: 0.5,
        };
        replay_step(
            &p,
            &torch(),
            Estimator::Mezo,
            &[7, 8],
            &[2.0, -1.0],
            Logged::default(),
            &cfg,
        )
        .unwrap();
        let (z7, z8) = (
            drawn_z(Rng::Torch, &before, 7),
            drawn_z(Rng::Torch, &before, 8),
        );
        for (i, (new, old)) in p.iter().zip(before.iter()).enumerate() {
            let keep = if old.decays { 1.0 - 0.1 * 0.5 } else { 1.0 };
            let want = &old.tensor * keep - (&z7[i] * 2.0 - &z8[i]) * (0.1 / 2.0);
            let err = (&new.tensor - want).abs().max().double_value(&[]);
            assert!(err < 1e-12, "{}: {err}", new.name);
        }
    }

    #[test]
    fn non_finite_loss_fails_and_restores() {
        let _rng = crate::torch_rng_lock();
        let p = params(Kind::Double);
        let before = copy(&p);
        let cfg = StepConfig {
            eps: 1e-3,
            lr: 0.1,
            weight_decay: 0.0,
        };
        let mut loss = || Ok(f64::NAN);
        let err = mezo_step(&p, &torch(), 3, &cfg, Gradient::Measure(&mut loss)).unwrap_err();
        assert!(err.to_string().contains("non-finite"));
        for (a, b) in p.iter().zip(before.iter()) {
            assert!((&a.tensor - &b.tensor).abs().max().double_value(&[]) < 1e-12);
        }
    }

    #[test]
    fn rademacher_directions_are_the_same_for_any_thread_count_and_chunk_size() {
        let _rng = crate::torch_rng_lock();
        let zeros = || {
            ParamList(vec![Param {
                name: "w".into(),
                tensor: Tensor::zeros([300, 257], (Kind::Float, Device::Cpu)),
                decays: true,
            }])
        };
        let reference = zeros();
        ZSweep::new(Rng::Fast, 1)
            .with_perturbation(Perturbation::Rademacher)
            .apply(&reference, 5, |_| Update::add(1.0));
        let want = drawn(Rng::Fast, Perturbation::Rademacher, &reference, 5);
        assert!(reference.0[0].tensor.equal(&want[0]));
        for (threads, chunk) in [(2, DEFAULT_CHUNK), (2, 77), (1, 1000)] {
            let other = zeros();
            ZSweep::with_chunk(Rng::Fast, threads, chunk)
                .with_perturbation(Perturbation::Rademacher)
                .apply(&other, 5, |_| Update::add(1.0));
            assert!(same(&reference, &other), "{threads} threads, chunk {chunk}");
        }
    }
}
