//! A step of the job's estimator, live or replayed: the one place that turns
//! an [`Estimator`] into the passes of its step (`step` for MeZO and n-SPSA,
//! Sparse MeZO's mask, LOZO's low-rank directions, `fzoo`), and where a logged
//! record is checked against the estimator before it touches the weights.

use super::fzoo::{fzoo_step, FzooLog, Measured};
use super::mask::Mask;
use super::schedule::{basis_seed, direction_seed, step_seed};
use super::shared::{spsa_step_shared, Share};
use super::step::{mezo_step_along, spsa_step_along, Source, StepConfig};
use super::sweep::{Form, LowRank, ZSweep};
use crate::model::ParamList;
use anyhow::{bail, Result};
use mezod_core::estimator::Estimator;

/// The seeds a step draws its directions from: the step's own, one per
/// direction, and LOZO's seed of V (shared by `basis_every` steps).
#[derive(Debug, Clone)]
pub struct StepSeeds {
    pub step: u64,
    pub directions: Vec<u64>,
    pub basis: Option<u64>,
}

impl StepSeeds {
    /// The seeds of step `step` of a job seeded `seed` with `directions`
    /// directions: pure functions of the three, so a replay finds them again.
    pub fn of(estimator: Estimator, seed: u64, step: u64, directions: usize) -> StepSeeds {
        let step_seed = step_seed(seed, step);
        StepSeeds {
            step: step_seed,
            directions: (0..directions as u64)
                .map(|j| direction_seed(step_seed, j))
                .collect(),
            basis: match estimator {
                Estimator::Lozo { basis_every, .. } => Some(basis_seed(seed, step, basis_every)),
                Estimator::Mezo | Estimator::Sparse { .. } | Estimator::Fzoo => None,
            },
        }
    }
}

/// The shape of the step's z: Sparse MeZO's mask, computed from the weights
/// as the step finds them; LOZO's factors, V from the `basis` seed.
fn form(estimator: Estimator, params: &ParamList, basis: Option<u64>) -> Result<Form> {
    Ok(match (estimator, basis) {
        (Estimator::Sparse { sparsity }, _) => Form::Masked(Mask::of(params, sparsity)),
        (Estimator::Lozo { rank, .. }, Some(basis)) => Form::LowRank(LowRank { rank, basis }),
        (Estimator::Lozo { .. }, None) => bail!("a lozo step needs the seed of its V"),
        (Estimator::Mezo | Estimator::Fzoo, _) => Form::Dense,
    })
}

/// One live step of `estimator` along the directions of `seeds` (LOZO: with
/// V drawn from `basis`), in this process alone.
pub fn live_step(
    params: &ParamList,
    z: &ZSweep,
    estimator: Estimator,
    seeds: &[u64],
    basis: Option<u64>,
    cfg: &StepConfig,
    loss: &mut dyn FnMut() -> Result<f64>,
) -> Result<Measured> {
    live_step_among(params, z, estimator, seeds, basis, cfg, None, loss)
}

/// [`live_step`], with the directions shared among `replicas` when there are
/// any (see `shared`): bit-identical to the same step in one process.
/// Replicas share MeZO's family only (MeZO, Sparse MeZO, LOZO), and a step
/// of at least two directions.
#[allow(clippy::too_many_arguments)]
pub fn live_step_among(
    params: &ParamList,
    z: &ZSweep,
    estimator: Estimator,
    seeds: &[u64],
    basis: Option<u64>,
    cfg: &StepConfig,
    replicas: Option<&mut dyn Share>,
    loss: &mut dyn FnMut() -> Result<f64>,
) -> Result<Measured> {
    let form = form(estimator, params, basis)?;
    let measured = |outcomes| Measured {
        outcomes,
        spread: None,
    };
    match (estimator, seeds, replicas) {
        (Estimator::Fzoo, _, None) => fzoo_step(params, z, seeds, cfg, Source::Measure(loss)),
        (Estimator::Fzoo, _, Some(_)) => bail!("replicas do not share FZOO's directions yet"),
        (Estimator::Mezo | Estimator::Sparse { .. } | Estimator::Lozo { .. }, [seed], None) => {
            mezo_step_along(params, z, &form, *seed, cfg, Source::Measure(loss))
                .map(|o| measured(vec![o]))
        }
        (Estimator::Mezo | Estimator::Sparse { .. } | Estimator::Lozo { .. }, _, None) => {
            spsa_step_along(params, z, &form, seeds, cfg, Source::Measure(loss)).map(measured)
        }
        (
            Estimator::Mezo | Estimator::Sparse { .. } | Estimator::Lozo { .. },
            [] | [_],
            Some(_),
        ) => {
            bail!("replicas share a step's directions: the step needs at least two")
        }
        (Estimator::Mezo | Estimator::Sparse { .. } | Estimator::Lozo { .. }, _, Some(share)) => {
            spsa_step_shared(params, z, &form, seeds, cfg, share, loss).map(measured)
        }
    }
}

/// What a logged step holds beside its directions' seeds and gradients.
#[derive(Debug, Clone, Copy, Default)]
pub struct Logged {
    /// FZOO's σ.
    pub spread: Option<f64>,
    /// LOZO's seed of V.
    pub basis: Option<u64>,
}

/// Re-apply one logged step of `estimator` without any forward pass, once
/// the record is seen to be one of its steps.
pub fn replay_step(
    params: &ParamList,
    z: &ZSweep,
    estimator: Estimator,
    seeds: &[u64],
    grads: &[f64],
    logged: Logged,
    cfg: &StepConfig,
) -> Result<()> {
    if seeds.len() != grads.len() || seeds.is_empty() {
        bail!("a logged step needs one projected gradient per seed");
    }
    estimator
        .check_trailer(logged.spread, logged.basis)
        .map_err(anyhow::Error::msg)?;
    let form = form(estimator, params, logged.basis)?;
    match (estimator, logged.spread) {
        (Estimator::Fzoo, Some(spread)) => {
            fzoo_step(
                params,
                z,
                seeds,
                cfg,
                Source::Logged(FzooLog { grads, spread }),
            )?;
        }
        (Estimator::Fzoo, None) => bail!("an fzoo step was logged without its spread σ"),
        (Estimator::Mezo | Estimator::Sparse { .. } | Estimator::Lozo { .. }, _) => {
            if let [seed] = seeds {
                mezo_step_along(params, z, &form, *seed, cfg, Source::Logged(grads[0]))?;
            } else {
                spsa_step_along(params, z, &form, seeds, cfg, Source::Logged(grads))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mezo::sweep::{Perturbation, Rng};
    use crate::mezo::testing::*;
    use tch::Kind;

    #[test]
    fn every_estimator_replays_bit_identically_to_live_training() {
        let _rng = crate::torch_rng_lock();
        let methods = [
            (Estimator::Mezo, 1),
            (Estimator::Mezo, 3),
            (Estimator::Sparse { sparsity: 0.75 }, 1),
            (Estimator::Sparse { sparsity: 0.5 }, 2),
            (Estimator::Fzoo, 4),
            (lozo(1), 1),
            (lozo(3), 2),
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
                                matches!(method, Estimator::Lozo { .. }).then_some(7 + step / 2);
                            let mut loss = quadratic_loss(&live);
                            let m =
                                live_step(&live, &z, method, &seeds, basis, &DECAYED, &mut loss)
                                    .unwrap();
                            assert_eq!(m.outcomes.len(), n as usize);
                            assert_eq!(m.spread.is_some(), method == Estimator::Fzoo);
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
            Estimator::Fzoo,
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
        let e = replay(Estimator::Mezo, sigma);
        assert!(e.contains("not fzoo"), "{e}");
        let e = replay(lozo(1), Logged::default());
        assert!(e.contains("seed of its V"), "{e}");
        for method in [Estimator::Mezo, Estimator::Sparse { sparsity: 0.5 }] {
            let e = replay(method, basis);
            assert!(e.contains("not lozo"), "{e}");
        }
        assert!(replay_step(
            &p,
            &torch(),
            Estimator::Fzoo,
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
                let method = lozo(rank);
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
            let method = Estimator::Sparse { sparsity: 0.75 };
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
}
