//! n-SPSA with its directions shared among replicas: each replica measures
//! its own share of the step's directions, and the replicas exchange what
//! they measured (a few scalars per direction) before every one of them
//! applies all the directions' updates, in order.
//!
//! The result is bit-identical to the same step in one process
//! (`step::spsa_step_along`).  There, direction j is measured at the weights
//! that directions 0..j left: `+εz, −2εz, +εz` does not restore θ bit for
//! bit, so the weights drift in their last bits from one direction to the
//! next.  A replica therefore applies the same three perturbations for the
//! directions it does not measure, without their forward passes, in one
//! pass over the weights (z drawn once; each element gets the three
//! additions in the same order, so the same bits): every replica's weights
//! follow the single process's bit for bit, and so does every direction's
//! measurement (forward passes are deterministic for the same threads per
//! process).  The cost of sharing is that pass, not the exchange.

use super::step::{apply_average, measurement, perturb, StepConfig, StepOutcome};
use super::sweep::{Form, Update, ZSweep};
use crate::model::ParamList;
use anyhow::Result;

/// What a replica measured along one of its directions: the outcome, or the
/// reason it could not (a non-finite loss).
pub type Measurement = std::result::Result<StepOutcome, String>;

/// How a step's directions are shared among replicas.
pub trait Share {
    /// Whether this replica measures `direction`.
    fn measures(&self, direction: usize) -> bool;

    /// Every direction's outcome, in order and the same on every replica,
    /// from what each measured (`mine[j]` is `Some` for this replica's own
    /// directions); an error if any replica's measurement failed or the
    /// replicas cannot agree.
    fn exchange(&mut self, mine: &[Option<Measurement>]) -> Result<Vec<StepOutcome>>;
}

/// One n-SPSA step with the directions of `seeds` shared as `share` says:
/// the passes of `spsa_step_along` on every replica, forward passes only for
/// its own directions, then the exchange, then the updates.
pub(crate) fn spsa_step_shared(
    params: &ParamList,
    z: &ZSweep,
    form: &Form,
    seeds: &[u64],
    cfg: &StepConfig,
    share: &mut dyn Share,
    loss: &mut dyn FnMut() -> Result<f64>,
) -> Result<Vec<StepOutcome>> {
    let _guard = tch::no_grad_guard();
    let mut mine = Vec::with_capacity(seeds.len());
    for (j, &seed) in seeds.iter().enumerate() {
        if !share.measures(j) {
            // Another replica's direction: its three passes in one draw.
            let passes = [cfg.eps, -2.0 * cfg.eps, cfg.eps].map(Update::add);
            z.apply_in_turn(params, seed, form, |_| passes.to_vec());
            mine.push(None);
            continue;
        }
        perturb(params, z, form, seed, cfg.eps);
        let plus = loss();
        perturb(params, z, form, seed, -2.0 * cfg.eps);
        let minus = loss();
        perturb(params, z, form, seed, cfg.eps);
        mine.push(Some(measurement(j, plus, minus, cfg)));
    }
    let outcomes = share.exchange(&mine)?;
    apply_average(params, z, form, seeds, cfg, &outcomes);
    Ok(outcomes)
}
