//! The MeZO step (Malladi et al., 2023, Algorithm 1), in place, without autograd,
//! and the estimators beside it (`mezo.estimator`): n-SPSA, Sparse MeZO, FZOO,
//! LOZO.
//!
//! z is never stored: it is regenerated from the step seed in each of the
//! passes over the parameters (same seed, same canonical order, same draws).
//! Live training and replay of a logged step run the very same passes with the
//! same floating-point operations, so replay reproduces the weights bit for bit
//! even in bf16/f16, where `+ε` then `−2ε` then `+ε` does not restore θ exactly.

use super::mask::Mask;
use super::sweep::{Form, LowRank, Update, ZSweep};
use crate::model::ParamList;
use anyhow::{bail, Result};
use mezod_core::mezo_options::Estimator;

/// A job's estimator with its settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Method {
    /// MeZO, or n-SPSA with several directions.
    Mezo,
    /// MeZO on the weights a [`Mask`] selects at the start of each step.
    Sparse { sparsity: f64 },
    /// FZOO: one-sided differences from the loss at θ, scaled by 1/σ.
    Fzoo,
    /// LOZO: MeZO along low-rank directions `U·Vᵀ` on every matrix.
    Lozo { rank: usize },
}

impl Method {
    pub fn of(spec: &mezod_core::spec::MezoSpec) -> Method {
        Method::from_parts(spec.estimator, Some(spec.sparsity()), Some(spec.rank()))
    }

    /// From an estimator and, for `sparse`, its sparsity, for `lozo` its rank
    /// (defaults if absent).
    pub fn from_parts(estimator: Estimator, sparsity: Option<f64>, rank: Option<usize>) -> Method {
        use mezod_core::mezo_options::{DEFAULT_RANK, DEFAULT_SPARSITY};
        match estimator {
            Estimator::Mezo => Method::Mezo,
            Estimator::Sparse => Method::Sparse {
                sparsity: sparsity.unwrap_or(DEFAULT_SPARSITY),
            },
            Estimator::Fzoo => Method::Fzoo,
            Estimator::Lozo => Method::Lozo {
                rank: rank.unwrap_or(DEFAULT_RANK),
            },
        }
    }

    /// The shape of the step's z: Sparse MeZO's mask, computed from the weights
    /// as the step finds them; LOZO's factors, V from the logged `basis` seed.
    fn form(&self, params: &ParamList, basis: Option<u64>) -> Result<Form> {
        Ok(match (*self, basis) {
            (Method::Sparse { sparsity }, None) => Form::Masked(Mask::of(params, sparsity)),
            (Method::Lozo { rank }, Some(basis)) => Form::LowRank(LowRank { rank, basis }),
            (Method::Lozo { .. }, None) => bail!("a lozo step needs the seed of its V"),
            (_, Some(_)) => {
                bail!("a step has LOZO's seed of V but the job's estimator is not lozo")
            }
            (Method::Mezo | Method::Fzoo, None) => Form::Dense,
        })
    }
}

/// What a live step measured: one outcome per direction, and FZOO's σ.
#[derive(Debug, Clone)]
pub struct Measured {
    pub outcomes: Vec<StepOutcome>,
    pub spread: Option<f64>,
}

/// One live step of `method` along the directions of `seeds` (LOZO: with V
/// drawn from `basis`).
pub fn live_step(
    params: &ParamList,
    z: &ZSweep,
    method: Method,
    seeds: &[u64],
    basis: Option<u64>,
    cfg: &StepConfig,
    loss: &mut dyn FnMut() -> Result<f64>,
) -> Result<Measured> {
    let form = method.form(params, basis)?;
    match (method, seeds) {
        (Method::Fzoo, _) => fzoo_step(params, z, seeds, cfg, Losses::Measure(loss)),
        (_, [seed]) => {
            shaped_mezo_step(params, z, &form, *seed, cfg, Gradient::Measure(loss)).map(|o| {
                Measured {
                    outcomes: vec![o],
                    spread: None,
                }
            })
        }
        _ => shaped_spsa_step(params, z, &form, seeds, cfg, Gradients::Measure(loss)).map(|o| {
            Measured {
                outcomes: o,
                spread: None,
            }
        }),
    }
}

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

/// Pass 1 and 2: `p += scale·z`.
fn perturb(params: &ParamList, z: &ZSweep, form: &Form, seed: u64, scale: f64) {
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

/// One MeZO step (live or replayed) on `params` with step seed `seed`.
///
/// A non-finite loss restores θ (as closely as the dtype allows) and fails the
/// step; nothing non-finite is ever added to the weights.
pub fn mezo_step(
    params: &ParamList,
    z: &ZSweep,
    seed: u64,
    cfg: &StepConfig,
    gradient: Gradient,
) -> Result<StepOutcome> {
    shaped_mezo_step(params, z, &Form::Dense, seed, cfg, gradient)
}

/// [`mezo_step`] with z shaped by `form` (Sparse MeZO, LOZO).
fn shaped_mezo_step(
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

/// Where n-SPSA's projected gradients come from.
pub enum Gradients<'a> {
    /// Live training: evaluate the loss at θ ± εz_j for every direction j.
    Measure(&'a mut dyn FnMut() -> Result<f64>),
    /// Replay: one logged scalar per direction.
    Logged(&'a [f64]),
}

/// n-SPSA (`mezo.directions: n`): every direction is measured at the same θ
/// (+εz_j, −2εz_j, then +εz_j to restore), then the directions are applied in
/// turn, `p ← p − (η/n)·g_j·z_j`, weight decay with the first.  Never more than
/// one z exists; 4n passes instead of 3.
pub fn spsa_step(
    params: &ParamList,
    z: &ZSweep,
    seeds: &[u64],
    cfg: &StepConfig,
    gradients: Gradients,
) -> Result<Vec<StepOutcome>> {
    shaped_spsa_step(params, z, &Form::Dense, seeds, cfg, gradients)
}

/// [`spsa_step`] with z shaped by `form` (Sparse MeZO, LOZO).
fn shaped_spsa_step(
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
                match (plus, minus) {
                    (Ok(p), Ok(m)) if p.is_finite() && m.is_finite() => StepOutcome {
                        projected_grad: (p - m) / (2.0 * cfg.eps),
                        loss_plus: p,
                        loss_minus: m,
                    },
                    (p, m) => bail!(
                        "non-finite loss in direction {j} (loss+ = {:?}, loss- = {:?}); weights left as they were",
                        p.ok(),
                        m.ok()
                    ),
                }
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
    let n = seeds.len() as f64;
    let posts: Vec<f64> = outcomes
        .iter()
        .map(|o| -cfg.lr * o.projected_grad / n)
        .collect();
    apply_updates(params, z, form, seeds, cfg, &posts);
    Ok(outcomes)
}

/// The update passes of a step with several directions, one per direction:
/// `p ← p + post_j·z_j`, weight decay `(1 − ηλ)` with the first.
fn apply_updates(
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

/// Where FZOO's losses come from.
pub enum Losses<'a> {
    /// Live training: the loss at θ, then at θ + εu_i for every direction.
    Measure(&'a mut dyn FnMut() -> Result<f64>),
    /// Replay: each direction's one-sided projected gradient and σ, as logged.
    Logged { grads: &'a [f64], spread: f64 },
}

/// σ: the population standard deviation of the N perturbed losses.
pub fn spread_of(losses: &[f64]) -> f64 {
    let n = losses.len() as f64;
    let mean = losses.iter().sum::<f64>() / n;
    (losses.iter().map(|l| (l - mean) * (l - mean)).sum::<f64>() / n).sqrt()
}

/// FZOO's coefficient of direction j: `−η·g_j / (N·σ)`; no step when σ is 0
/// (every perturbed loss equal: the directions carry no information).
pub fn fzoo_post(lr: f64, g: f64, n: usize, spread: f64) -> f64 {
    if spread > 0.0 {
        -lr * g / (n as f64 * spread)
    } else {
        0.0
    }
}

/// One FZOO step (Dang et al., 2025): `l₀ = L(θ)`; for each of the N
/// directions u_i, `l_i = L(θ + εu_i)` (then `−εu_i` back); `g_i = (l_i − l₀)/ε`,
/// σ the spread of the l_i, and `θ ← θ − η/(N·σ)·Σ g_i·u_i`.  N + 1 forward
/// passes and 3N sweeps; replay runs the same sweeps from the logged g_i and σ.
pub fn fzoo_step(
    params: &ParamList,
    z: &ZSweep,
    seeds: &[u64],
    cfg: &StepConfig,
    losses: Losses,
) -> Result<Measured> {
    let _guard = tch::no_grad_guard();
    let (outcomes, spread) = match losses {
        Losses::Measure(loss) => {
            let base = loss()?;
            let mut perturbed = Vec::with_capacity(seeds.len());
            for &seed in seeds {
                perturb(params, z, &Form::Dense, seed, cfg.eps);
                let l = loss();
                perturb(params, z, &Form::Dense, seed, -cfg.eps);
                perturbed.push(l);
            }
            let perturbed: Vec<f64> = match perturbed.into_iter().collect::<Result<Vec<_>>>() {
                Ok(l) if base.is_finite() && l.iter().all(|l| l.is_finite()) => l,
                other => bail!(
                    "non-finite loss (at θ: {base}, perturbed: {}); weights left as they were",
                    other
                        .map(|l| format!("{l:?}"))
                        .unwrap_or_else(|e| format!("error: {e:#}"))
                ),
            };
            let outcomes: Vec<StepOutcome> = perturbed
                .iter()
                .map(|&l| StepOutcome {
                    projected_grad: (l - base) / cfg.eps,
                    loss_plus: l,
                    loss_minus: base,
                })
                .collect();
            (outcomes, spread_of(&perturbed))
        }
        Losses::Logged { grads, spread } => {
            for &seed in seeds {
                perturb(params, z, &Form::Dense, seed, cfg.eps);
                perturb(params, z, &Form::Dense, seed, -cfg.eps);
            }
            let outcomes: Vec<StepOutcome> = grads
                .iter()
                .map(|&g| StepOutcome {
                    projected_grad: g,
                    loss_plus: f64::NAN,
                    loss_minus: f64::NAN,
                })
                .collect();
            (outcomes, spread)
        }
    };
    let posts: Vec<f64> = outcomes
        .iter()
        .map(|o| fzoo_post(cfg.lr, o.projected_grad, seeds.len(), spread))
        .collect();
    apply_updates(params, z, &Form::Dense, seeds, cfg, &posts);
    Ok(Measured {
        outcomes,
        spread: Some(spread),
    })
}

/// What a logged step holds beside its directions' seeds and gradients.
#[derive(Debug, Clone, Copy, Default)]
pub struct Logged {
    /// FZOO's σ.
    pub spread: Option<f64>,
    /// LOZO's seed of V.
    pub basis: Option<u64>,
}

/// Re-apply one logged step of `method` without any forward pass.
pub fn replay_step(
    params: &ParamList,
    z: &ZSweep,
    method: Method,
    seeds: &[u64],
    grads: &[f64],
    logged: Logged,
    cfg: &StepConfig,
) -> Result<()> {
    if seeds.len() != grads.len() || seeds.is_empty() {
        bail!("a logged step needs one projected gradient per seed");
    }
    let spread = logged.spread;
    let form = method.form(params, logged.basis)?;
    match (method, spread) {
        (Method::Fzoo, Some(spread)) => {
            fzoo_step(params, z, seeds, cfg, Losses::Logged { grads, spread })?;
        }
        (Method::Fzoo, None) => bail!("an fzoo step was logged without its spread σ"),
        (_, Some(_)) => {
            bail!("a logged step has FZOO's spread but the job's estimator is not fzoo")
        }
        _ if seeds.len() == 1 => {
            shaped_mezo_step(params, z, &form, seeds[0], cfg, Gradient::Logged(grads[0]))?;
        }
        _ => {
            shaped_spsa_step(params, z, &form, seeds, cfg, Gradients::Logged(grads))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mezo::sweep::{Perturbation, Rng, DEFAULT_CHUNK};
    use crate::model::{Param, ParamList};
    use tch::{Device, Kind, Tensor};

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

    fn torch() -> ZSweep {
        ZSweep::new(Rng::Torch, 1)
    }

    /// ‖w‖² of the first parameter, read live (it moves with the perturbations).
    fn quadratic_loss(p: &ParamList) -> impl FnMut() -> Result<f64> {
        let w = p.0[0].tensor.shallow_clone();
        move || {
            Ok(w.to_kind(Kind::Float)
                .pow_tensor_scalar(2)
                .sum(Kind::Float)
                .double_value(&[]))
        }
    }

    /// A few steps of live training with a quadratic loss; returns the gradients.
    fn train(p: &ParamList, z: &ZSweep, cfg: &StepConfig, seeds: &[u64]) -> Vec<f64> {
        seeds
            .iter()
            .map(|&seed| {
                let mut loss = quadratic_loss(p);
                mezo_step(p, z, seed, cfg, Gradient::Measure(&mut loss))
                    .unwrap()
                    .projected_grad
            })
            .collect()
    }

    const DECAYED: StepConfig = StepConfig {
        eps: 1e-3,
        lr: 1e-2,
        weight_decay: 0.1,
    };

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
        let shaped = |z: &ZSweep, method: Method, basis: Option<u64>| {
            let p = big(Kind::Float);
            for seed in [3u64, 4] {
                let mut loss = quadratic_loss(&p);
                live_step(&p, z, method, &[seed], basis, &DECAYED, &mut loss).unwrap();
            }
            p
        };
        for (method, basis) in [
            (Method::Lozo { rank: 2 }, Some(9)),
            (Method::Sparse { sparsity: 0.75 }, None),
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

    /// z of each tensor as the step must have drawn it.
    fn drawn_z(rng: Rng, p: &ParamList, seed: u64) -> Vec<Tensor> {
        match rng {
            Rng::Torch => {
                tch::manual_seed(seed as i64);
                p.iter().map(|q| q.tensor.randn_like()).collect()
            }
            Rng::Fast => p
                .iter()
                .enumerate()
                .map(|(i, q)| {
                    let mut z = vec![0f32; q.tensor.numel()];
                    crate::mezo::fast_rng::fill_normals(seed, i as u32, 0, &mut z);
                    Tensor::from_slice(&z)
                        .to_kind(q.tensor.kind())
                        .view(q.tensor.size().as_slice())
                })
                .collect(),
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
                        Method::Mezo,
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
            Method::Mezo,
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

    /// z as a sweep with `perturbation` draws it (torch's or the fast generator's).
    fn drawn(rng: Rng, perturbation: Perturbation, p: &ParamList, seed: u64) -> Vec<Tensor> {
        match (rng, perturbation) {
            (_, Perturbation::Gaussian) => drawn_z(rng, p, seed),
            (Rng::Torch, Perturbation::Rademacher) => {
                tch::manual_seed(seed as i64);
                p.iter()
                    .map(|q| q.tensor.randint_like(2) * 2.0 - 1.0)
                    .collect()
            }
            (Rng::Fast, Perturbation::Rademacher) => p
                .iter()
                .enumerate()
                .map(|(i, q)| {
                    let mut z = vec![0f32; q.tensor.numel()];
                    crate::mezo::fast_rng::fill_signs(seed, i as u32, 0, &mut z);
                    Tensor::from_slice(&z)
                        .to_kind(q.tensor.kind())
                        .view(q.tensor.size().as_slice())
                })
                .collect(),
        }
    }

    #[test]
    fn every_estimator_replays_bit_identically_to_live_training() {
        let _rng = crate::torch_rng_lock();
        let methods = [
            (Method::Mezo, 1),
            (Method::Mezo, 3),
            (Method::Sparse { sparsity: 0.75 }, 1),
            (Method::Sparse { sparsity: 0.5 }, 2),
            (Method::Fzoo, 4),
            (Method::Lozo { rank: 1 }, 1),
            (Method::Lozo { rank: 3 }, 2),
        ];
        for rng in [Rng::Torch, Rng::Fast] {
            for perturbation in [Perturbation::Gaussian, Perturbation::Rademacher] {
                let z = ZSweep::new(rng, 2).with_perturbation(perturbation);
                for (method, n) in methods {
                    for kind in [Kind::Float, Kind::BFloat16] {
                        let live = params(kind);
                        let replayed = copy(&live);
                        for step in 0..3u64 {
                            let seeds: Vec<u64> = (0..n).map(|j| 100 * step + j).collect();
                            // LOZO: V changes after two steps.
                            let basis =
                                matches!(method, Method::Lozo { .. }).then_some(7 + step / 2);
                            let mut loss = quadratic_loss(&live);
                            let m =
                                live_step(&live, &z, method, &seeds, basis, &DECAYED, &mut loss)
                                    .unwrap();
                            assert_eq!(m.outcomes.len(), n as usize);
                            assert_eq!(m.spread.is_some(), method == Method::Fzoo);
                            let grads: Vec<f64> =
                                m.outcomes.iter().map(|o| o.projected_grad).collect();
                            let logged = Logged {
                                spread: m.spread,
                                basis,
                            };
                            replay_step(&replayed, &z, method, &seeds, &grads, logged, &DECAYED)
                                .unwrap();
                        }
                        let what = format!("{rng:?} {perturbation:?} {method:?}×{n} {kind:?}");
                        assert!(same(&live, &replayed), "{what}: replay drifted");
                        assert!(!same(&live, &params(kind)), "{what}: nothing changed");
                    }
                }
            }
        }
    }

    #[test]
    fn a_replay_refuses_a_record_of_another_estimator() {
        let p = params(Kind::Float);
        let e = replay_step(
            &p,
            &torch(),
            Method::Fzoo,
            &[1, 2],
            &[0.5, 0.5],
            Logged::default(),
            &DECAYED,
        )
        .unwrap_err();
        assert!(e.to_string().contains("spread"), "{e}");
        let replay = |method, logged| {
            replay_step(&p, &torch(), method, &[1], &[0.5], logged, &DECAYED)
                .unwrap_err()
                .to_string()
        };
        let sigma = Logged {
            spread: Some(1.0),
            basis: None,
        };
        let basis = Logged {
            spread: None,
            basis: Some(3),
        };
        let e = replay(Method::Mezo, sigma);
        assert!(e.contains("not fzoo"), "{e}");
        let e = replay(Method::Lozo { rank: 1 }, Logged::default());
        assert!(e.contains("seed of its V"), "{e}");
        for method in [Method::Mezo, Method::Sparse { sparsity: 0.5 }] {
            let e = replay(method, basis);
            assert!(e.contains("not lozo"), "{e}");
        }
        assert!(replay_step(
            &p,
            &torch(),
            Method::Fzoo,
            &[1, 2],
            &[0.5, 0.5],
            Logged {
                basis: Some(3),
                spread: Some(1.0)
            },
            &DECAYED
        )
        .is_err());
    }

    /// LOZO's direction as the sweep must draw it: `U·Vᵀ` on matrices (U from
    /// the step's seed, V from the basis seed), the dense z elsewhere.
    fn drawn_low_rank(rng: Rng, p: &ParamList, seed: u64, basis: u64, rank: i64) -> Vec<Tensor> {
        let dense = drawn_z(rng, p, seed);
        let fast = |seed: u64, stream: usize, rows: i64| {
            let mut x = vec![0f32; (rows * rank) as usize];
            crate::mezo::fast_rng::fill_normals(seed, stream as u32, 0, &mut x);
            Tensor::from_slice(&x).view([rows, rank])
        };
        let mut vs = Vec::new();
        if rng == Rng::Torch {
            tch::manual_seed(basis as i64);
            for q in p.iter().filter(|q| q.tensor.dim() == 2) {
                vs.push(Tensor::randn(
                    [q.tensor.size()[1], rank],
                    (q.tensor.kind(), Device::Cpu),
                ));
            }
            tch::manual_seed(seed as i64);
        }
        let mut vs = vs.into_iter();
        p.iter()
            .enumerate()
            .map(|(i, q)| {
                let size = q.tensor.size();
                if size.len() != 2 {
                    return match rng {
                        Rng::Torch => q.tensor.randn_like(),
                        Rng::Fast => dense[i].shallow_clone(),
                    };
                }
                let (u, v) = match rng {
                    Rng::Torch => (
                        Tensor::randn([size[0], rank], (q.tensor.kind(), Device::Cpu)),
                        vs.next().unwrap(),
                    ),
                    Rng::Fast => (fast(seed, i, size[0]), fast(basis, i, size[1])),
                };
                u.to_kind(Kind::Double)
                    .matmul(&v.to_kind(Kind::Double).tr())
                    .to_kind(q.tensor.kind())
            })
            .collect()
    }

    #[test]
    fn lozo_follows_the_mezo_rule_along_low_rank_directions() {
        let _rng = crate::torch_rng_lock();
        // θ ← (1 − ηλ)·θ − η·g·U·Vᵀ on matrices, − η·g·z on the others.
        for rng in [Rng::Torch, Rng::Fast] {
            for rank in [1usize, 3] {
                let p = params(Kind::Float);
                let before = copy(&p);
                let cfg = StepConfig {
                    eps: 1e-3,
                    lr: 0.1,
                    weight_decay: 0.5,
                };
                let logged = Logged {
                    spread: None,
                    basis: Some(42),
                };
                let method = Method::Lozo { rank };
                replay_step(&p, &ZSweep::new(rng, 2), method, &[7], &[2.0], logged, &cfg).unwrap();
                let zs = drawn_low_rank(rng, &before, 7, 42, rank as i64);
                for ((new, old), z) in p.iter().zip(before.iter()).zip(&zs) {
                    let keep = if old.decays { 1.0 - 0.1 * 0.5 } else { 1.0 };
                    let want = &old.tensor * keep - z * 0.2;
                    let err = (&new.tensor - want).abs().max().double_value(&[]);
                    assert!(err < 1e-5, "{rng:?} rank {rank} {}: {err}", new.name);
                }
                // The matrix's step has the rank asked for.
                let moved = (&p.0[0].tensor - &before.0[0].tensor * 0.95).to_kind(Kind::Double);
                let (_, s, _) = moved.svd(true, false);
                let s = Vec::<f64>::try_from(s).unwrap();
                assert!(
                    s[rank - 1] > 1e-3 * s[0],
                    "{rng:?}: rank below {rank}: {s:?}"
                );
                assert!(s[rank] < 1e-4 * s[0], "{rng:?}: rank above {rank}: {s:?}");
                // Another basis seed, another V.
                let other = drawn_low_rank(rng, &before, 7, 43, rank as i64);
                assert!(!other[0].equal(&zs[0]) && other[1].equal(&zs[1]), "{rng:?}");
            }
        }
    }

    #[test]
    fn fzoo_follows_its_rule() {
        let _rng = crate::torch_rng_lock();
        // θ ← (1 − ηλ)·θ − η/(N·σ)·Σ g_i·u_i with g_i = (L(θ + εu_i) − L(θ))/ε,
        // σ the population standard deviation of the L(θ + εu_i), u_i = ±1.
        for rng in [Rng::Torch, Rng::Fast] {
            let z = ZSweep::new(rng, 2).with_perturbation(Perturbation::Rademacher);
            let kind = if rng == Rng::Torch {
                Kind::Double
            } else {
                Kind::Float
            };
            let p = params(kind);
            let before = copy(&p);
            let seeds = [11u64, 12, 13, 14];
            let cfg = StepConfig {
                eps: 1e-3,
                lr: 0.05,
                weight_decay: 0.5,
            };
            let mut loss = quadratic_loss(&p);
            let m = live_step(&p, &z, Method::Fzoo, &seeds, None, &cfg, &mut loss).unwrap();
            // The loss as `quadratic_loss` computes it, at weights of the params' kind.
            let w0 = before.0[0].tensor.shallow_clone();
            let l = |t: &Tensor| {
                t.to_kind(Kind::Float)
                    .pow_tensor_scalar(2)
                    .sum(Kind::Float)
                    .double_value(&[])
            };
            let us: Vec<Vec<Tensor>> = seeds
                .iter()
                .map(|&s| drawn(rng, Perturbation::Rademacher, &before, s))
                .collect();
            for u in &us {
                let values = Vec::<f64>::try_from(u[0].to_kind(Kind::Double).view([-1])).unwrap();
                assert!(values.iter().all(|v| *v == 1.0 || *v == -1.0));
            }
            let base = l(&w0);
            let perturbed: Vec<f64> = us.iter().map(|u| l(&(&w0 + &u[0] * 1e-3))).collect();
            let sigma = spread_of(&perturbed);
            for (o, lp) in m.outcomes.iter().zip(&perturbed) {
                let g = (lp - base) / 1e-3;
                assert!(
                    (o.projected_grad - g).abs() < 1e-3 * (1.0 + g.abs()),
                    "{rng:?}: {} vs {g}",
                    o.projected_grad
                );
            }
            assert!((m.spread.unwrap() - sigma).abs() < 1e-3 * sigma, "{rng:?}");
            let n = seeds.len() as f64;
            let sigma = m.spread.unwrap();
            for (i, (new, old)) in p.iter().zip(before.iter()).enumerate() {
                let keep = if old.decays { 1.0 - 0.05 * 0.5 } else { 1.0 };
                let mut want = old.tensor.to_kind(Kind::Double) * keep;
                for (u, o) in us.iter().zip(&m.outcomes) {
                    want -= u[i].to_kind(Kind::Double) * (0.05 * o.projected_grad / (n * sigma));
                }
                let err = (new.tensor.to_kind(Kind::Double) - want)
                    .abs()
                    .max()
                    .double_value(&[]);
                assert!(err < 1e-5, "{rng:?} {}: {err}", new.name);
            }
        }
    }

    #[test]
    fn sparse_moves_only_the_small_weights_and_those_by_the_mezo_rule() {
        let _rng = crate::torch_rng_lock();
        for rng in [Rng::Torch, Rng::Fast] {
            let p = params(Kind::Float);
            let before = copy(&p);
            let cfg = StepConfig {
                eps: 1e-3,
                lr: 0.1,
                weight_decay: 0.0,
            };
            let method = Method::Sparse { sparsity: 0.75 };
            replay_step(
                &p,
                &ZSweep::new(rng, 2),
                method,
                &[7],
                &[2.0],
                Logged::default(),
                &cfg,
            )
            .unwrap();
            let zs = drawn_z(rng, &before, 7);
            for ((new, old), z) in p.iter().zip(before.iter()).zip(zs) {
                let h = crate::mezo::mask::threshold(&old.tensor, 0.25);
                let small = old.tensor.abs().le(h);
                let moved = new.tensor.ne_tensor(&old.tensor);
                assert!(
                    moved
                        .logical_and(&small.logical_not())
                        .sum(Kind::Int64)
                        .int64_value(&[])
                        == 0,
                    "{rng:?} {}: a large weight moved",
                    new.name
                );
                let want = &old.tensor - &z * small.to_kind(Kind::Float) * 0.2;
                let err = (&new.tensor - want).abs().max().double_value(&[]);
                assert!(err < 1e-6, "{rng:?} {}: {err}", new.name);
                let frac = small
                    .to_kind(Kind::Float)
                    .mean(Kind::Float)
                    .double_value(&[]);
                assert!((0.2..0.35).contains(&frac), "{}: {frac}", new.name);
            }
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
