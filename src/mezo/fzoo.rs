//! FZOO (Dang et al., 2025): the loss at θ, then one-sided differences along
//! N directions (±1 by default), the update divided by σ, the spread of the N
//! perturbed losses.  It logs σ beside the directions, so a replay runs the
//! same sweeps from the record.

use super::step::{apply_updates, perturb, Source, StepConfig, StepOutcome};
use super::sweep::{Form, ZSweep};
use crate::model::ParamList;
use anyhow::{bail, Result};

/// What a live step measured: one outcome per direction, and FZOO's σ.
#[derive(Debug, Clone)]
pub struct Measured {
    pub outcomes: Vec<StepOutcome>,
    pub spread: Option<f64>,
}

/// What an FZOO record holds: each direction's one-sided projected gradient,
/// and σ.
#[derive(Debug, Clone, Copy)]
pub struct FzooLog<'a> {
    pub grads: &'a [f64],
    pub spread: f64,
}

/// FZOO's losses: measured (the loss at θ, then at θ + εu_i for every
/// direction), or logged.
pub type Losses<'a> = Source<'a, FzooLog<'a>>;

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
        Source::Measure(loss) => {
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
        Source::Logged(FzooLog { grads, spread }) => {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mezo::method::live_step;
    use crate::mezo::sweep::{Perturbation, Rng};
    use crate::mezo::testing::*;
    use mezod_core::estimator::Estimator;
    use tch::{Kind, Tensor};

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
            let m = live_step(&p, &z, Estimator::Fzoo, &seeds, None, &cfg, &mut loss).unwrap();
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
}
