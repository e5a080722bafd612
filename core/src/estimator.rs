//! A job's estimator: how a step turns forward passes into an update
//! (`mezo.estimator` and the settings that belong to it), as one typed value.
//!
//! Everything the code asks about an estimator is answered here, by an
//! exhaustive `match`: how many forward passes a step costs, which directions
//! it draws by default, what its step records carry beside the directions and
//! how a record is checked against the job, the memory it adds to an estimate,
//! the `.mezo` file version it needs, and how it reads in a summary.  So a new
//! estimator is a new variant, and the compiler lists every place that must
//! learn it.  The engine's step code matches on it the same way
//! (`mezo::method`).

use serde::{Deserialize, Serialize};

use crate::mezo_options::Perturbation;

/// Sparse MeZO's default: each step perturbs the 25 % smallest-magnitude
/// weights of every tensor.
pub const DEFAULT_SPARSITY: f64 = 0.75;

/// LOZO's default rank of each matrix's direction `U·Vᵀ` (the authors' script: 1;
/// each element of a rank-1 direction has variance 1, as MeZO's z, so MeZO's
/// learning rates carry over).
pub const DEFAULT_RANK: usize = 1;

/// LOZO's default number of steps that share one V (the authors' script: 100).
pub const DEFAULT_BASIS_EVERY: u64 = 100;

/// LOZO's largest rank: a low-rank direction is the point; past this use `mezo`.
pub const MAX_RANK: usize = 64;

/// An estimator by the word a job file (and `mezod bench --estimator`) names
/// it with; its settings are separate keys of `mezo:` beside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EstimatorName {
    /// MeZO (Malladi et al., 2023): two-sided difference along one direction
    /// (or the average of `directions`, n-SPSA).
    #[default]
    Mezo,
    /// FZOO (Dang et al., 2025): the loss at θ, then one-sided differences along
    /// N ±1 directions, the update divided by the spread of the N losses.
    Fzoo,
    /// Sparse MeZO (Liu et al., 2024): MeZO that perturbs and updates only the
    /// small-magnitude weights of each tensor.
    Sparse,
    /// LOZO (Chen et al., 2025): MeZO whose direction for each weight matrix is
    /// low rank, `U·Vᵀ`, with U fresh every step and V kept for `basis_every` steps.
    Lozo,
}

impl EstimatorName {
    pub fn is_mezo(&self) -> bool {
        *self == EstimatorName::Mezo
    }
}

/// As job files write it: `mezo`, `fzoo`, `sparse`, `lozo`.
impl std::fmt::Display for EstimatorName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EstimatorName::Mezo => "mezo",
            EstimatorName::Fzoo => "fzoo",
            EstimatorName::Sparse => "sparse",
            EstimatorName::Lozo => "lozo",
        })
    }
}

/// A job's estimator with its own settings.  Every estimator logs what its
/// update needs, so live and replayed steps run the same operations on the
/// weights and a resume is bit-identical.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Estimator {
    /// MeZO, or n-SPSA with several directions.
    Mezo,
    /// MeZO on the weights a mask selects at the start of each step: each
    /// tensor's `sparsity` largest in magnitude are left alone.
    Sparse { sparsity: f64 },
    /// FZOO: one-sided differences from the loss at θ, scaled by 1/σ.
    Fzoo,
    /// LOZO: MeZO along low-rank directions `U·Vᵀ` of rank `rank` on every
    /// matrix, V drawn anew every `basis_every` steps.
    Lozo { rank: usize, basis_every: u64 },
}

/// The part of a step record after its directions (see `seedlog`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordTrailer {
    None,
    /// FZOO's σ.
    Spread,
    /// LOZO's seed of V.
    Basis,
}

/// The state an estimator keeps beside the weights during a step, for the
/// memory estimate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepState {
    /// Nothing beyond z.
    None,
    /// Sparse MeZO's mask: one bit per trainable weight.
    Mask,
    /// LOZO's factors U and V of this rank for every matrix.
    Factors { rank: usize },
}

impl Estimator {
    /// The estimator a job file's `mezo:` section names, with its settings
    /// (each defaulted where absent).  `Err` is the reason, in the job file's
    /// words: a setting of another estimator, or a value out of range.
    pub fn from_settings(
        name: EstimatorName,
        sparsity: Option<f64>,
        rank: Option<usize>,
        basis_every: Option<u64>,
    ) -> Result<Estimator, String> {
        if sparsity.is_some() && name != EstimatorName::Sparse {
            return Err("mezo.sparsity is a setting of mezo.estimator: sparse".into());
        }
        if (rank.is_some() || basis_every.is_some()) && name != EstimatorName::Lozo {
            return Err(
                "mezo.rank and mezo.basis_every are settings of mezo.estimator: lozo".into(),
            );
        }
        Ok(match name {
            EstimatorName::Mezo => Estimator::Mezo,
            EstimatorName::Fzoo => Estimator::Fzoo,
            EstimatorName::Sparse => {
                let sparsity = sparsity.unwrap_or(DEFAULT_SPARSITY);
                if !(sparsity.is_finite() && (0.0..1.0).contains(&sparsity)) {
                    return Err(format!(
                        "mezo.sparsity must be in [0, 1): the fraction of each tensor's weights a \
                         step leaves alone (Sparse MeZO's default here: {DEFAULT_SPARSITY})"
                    ));
                }
                Estimator::Sparse { sparsity }
            }
            EstimatorName::Lozo => {
                let rank = rank.unwrap_or(DEFAULT_RANK);
                if !(1..=MAX_RANK).contains(&rank) {
                    return Err(format!(
                        "mezo.rank must be between 1 and {MAX_RANK}: the rank of each weight \
                         matrix's direction U·Vᵀ (LOZO's default here: {DEFAULT_RANK})"
                    ));
                }
                let basis_every = basis_every.unwrap_or(DEFAULT_BASIS_EVERY);
                if basis_every == 0 {
                    return Err(format!(
                        "mezo.basis_every must be at least 1: how many steps share one V \
                         (LOZO's default here: {DEFAULT_BASIS_EVERY})"
                    ));
                }
                Estimator::Lozo { rank, basis_every }
            }
        })
    }

    /// The estimator `name` with the settings given, else this one's own
    /// where it is the same estimator (a job's settings kept under flags
    /// that only name its estimator); `Err` as [`Estimator::from_settings`].
    pub fn renamed(
        &self,
        name: EstimatorName,
        sparsity: Option<f64>,
        rank: Option<usize>,
    ) -> Result<Estimator, String> {
        let (own_sparsity, own_rank, own_basis_every) = if self.name() == name {
            self.settings()
        } else {
            (None, None, None)
        };
        Estimator::from_settings(
            name,
            sparsity.or(own_sparsity),
            rank.or(own_rank),
            own_basis_every,
        )
    }

    /// Its word in a job file.
    pub fn name(&self) -> EstimatorName {
        match self {
            Estimator::Mezo => EstimatorName::Mezo,
            Estimator::Sparse { .. } => EstimatorName::Sparse,
            Estimator::Fzoo => EstimatorName::Fzoo,
            Estimator::Lozo { .. } => EstimatorName::Lozo,
        }
    }

    /// Its settings as a job file's keys: (sparsity, rank, basis_every).
    pub fn settings(&self) -> (Option<f64>, Option<usize>, Option<u64>) {
        match *self {
            Estimator::Mezo | Estimator::Fzoo => (None, None, None),
            Estimator::Sparse { sparsity } => (Some(sparsity), None, None),
            Estimator::Lozo { rank, basis_every } => (None, Some(rank), Some(basis_every)),
        }
    }

    /// Whether replicas can share a step's directions (`parallel:`): each
    /// measures its own at the same weights and they exchange the scalars.
    /// FZOO's update needs the spread of all its losses first (not shared yet).
    pub(crate) fn shares_directions(&self) -> bool {
        match self {
            Estimator::Mezo | Estimator::Sparse { .. } | Estimator::Lozo { .. } => true,
            Estimator::Fzoo => false,
        }
    }

    /// Training forward passes per step with `directions` directions.
    pub fn forward_passes(&self, directions: usize) -> usize {
        match self {
            Estimator::Mezo | Estimator::Sparse { .. } | Estimator::Lozo { .. } => 2 * directions,
            Estimator::Fzoo => directions + 1,
        }
    }

    /// The fewest directions a step of it can take, and why.
    pub(crate) fn min_directions(&self) -> (usize, &'static str) {
        match self {
            Estimator::Mezo | Estimator::Sparse { .. } | Estimator::Lozo { .. } => (1, ""),
            Estimator::Fzoo => (
                2,
                "mezo.estimator: fzoo needs mezo.directions of at least 2 (its N one-sided \
                 directions: the update is divided by the spread of their N losses); try 8",
            ),
        }
    }

    /// Directions per step where nothing else says: FZOO's paper uses 8;
    /// the others are MeZO with one.
    pub fn default_directions(&self) -> usize {
        match self {
            Estimator::Fzoo => 8,
            Estimator::Mezo | Estimator::Sparse { .. } | Estimator::Lozo { .. } => 1,
        }
    }

    /// The direction distribution a job gets unless it names one: FZOO's
    /// analysis is for ±1 directions; MeZO's for Gaussian ones.
    pub(crate) fn default_perturbation(&self) -> Perturbation {
        match self {
            Estimator::Fzoo => Perturbation::Rademacher,
            Estimator::Mezo | Estimator::Sparse { .. } | Estimator::Lozo { .. } => {
                Perturbation::Gaussian
            }
        }
    }

    /// What a step record of this estimator carries after its directions:
    /// FZOO's σ, LOZO's seed of V, or nothing.
    pub fn record_trailer(&self) -> RecordTrailer {
        match self {
            Estimator::Fzoo => RecordTrailer::Spread,
            Estimator::Lozo { .. } => RecordTrailer::Basis,
            Estimator::Mezo | Estimator::Sparse { .. } => RecordTrailer::None,
        }
    }

    /// Whether a logged step's trailer (FZOO's σ, LOZO's seed of V) is the
    /// one a step of this estimator logs.  The daemon asks it of every record
    /// a worker sends; a replay asks it before touching the weights.
    pub fn check_trailer(&self, spread: Option<f64>, basis: Option<u64>) -> Result<(), String> {
        match (self, spread, basis) {
            (_, Some(_), Some(_)) => {
                Err("a logged step has both FZOO's spread and LOZO's seed of V".into())
            }
            (Estimator::Fzoo, None, _) => {
                Err("an fzoo step was logged without its spread σ".into())
            }
            (Estimator::Lozo { .. }, _, None) => Err("a lozo step needs the seed of its V".into()),
            (Estimator::Mezo | Estimator::Sparse { .. }, Some(_), _) => {
                Err("a logged step has FZOO's spread but the job's estimator is not fzoo".into())
            }
            (Estimator::Mezo | Estimator::Sparse { .. }, _, Some(_)) => {
                Err("a step has LOZO's seed of V but the job's estimator is not lozo".into())
            }
            (Estimator::Fzoo, Some(_), None)
            | (Estimator::Lozo { .. }, None, Some(_))
            | (Estimator::Mezo | Estimator::Sparse { .. }, None, None) => Ok(()),
        }
    }

    /// What a step keeps beside the weights, for the memory estimate.
    pub(crate) fn step_state(&self) -> StepState {
        match *self {
            Estimator::Mezo | Estimator::Fzoo => StepState::None,
            Estimator::Sparse { .. } => StepState::Mask,
            Estimator::Lozo { rank, .. } => StepState::Factors { rank },
        }
    }

    /// The `.mezo` file version its steps need: 4 for LOZO's bases, 3 for
    /// any other estimator or ±1 directions, else 1 (full) or 2 (adapters).
    pub fn tune_file_version(&self, perturbation: Perturbation, full_tuning: bool) -> u32 {
        match (self, perturbation) {
            (Estimator::Lozo { .. }, _) => 4,
            (Estimator::Sparse { .. } | Estimator::Fzoo, _)
            | (Estimator::Mezo, Perturbation::Rademacher) => 3,
            (Estimator::Mezo, Perturbation::Gaussian) if full_tuning => 1,
            (Estimator::Mezo, Perturbation::Gaussian) => 2,
        }
    }

    /// How a job's one-line summary names it: nothing for plain MeZO.
    pub(crate) fn summary_words(&self) -> String {
        match self {
            Estimator::Mezo => String::new(),
            Estimator::Sparse { .. } | Estimator::Fzoo | Estimator::Lozo { .. } => {
                format!(" ({})", self.name())
            }
        }
    }
}

/// As job files write its name.
impl std::fmt::Display for Estimator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.name().fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Settings belong to their estimator and default where absent; the
    /// typed value gives them back as the job file's keys.
    #[test]
    fn settings_are_parsed_into_their_estimator_and_back() {
        use EstimatorName as N;
        let lozo = Estimator::from_settings(N::Lozo, None, Some(4), None).unwrap();
        assert_eq!(
            lozo,
            Estimator::Lozo {
                rank: 4,
                basis_every: DEFAULT_BASIS_EVERY
            }
        );
        assert_eq!(lozo.settings(), (None, Some(4), Some(DEFAULT_BASIS_EVERY)));
        assert_eq!(
            Estimator::from_settings(N::Sparse, None, None, None).unwrap(),
            Estimator::Sparse {
                sparsity: DEFAULT_SPARSITY
            }
        );
        for (name, sparsity, rank, basis, why) in [
            (
                N::Mezo,
                Some(0.5),
                None,
                None,
                "a setting of mezo.estimator: sparse",
            ),
            (
                N::Sparse,
                None,
                None,
                Some(5),
                "settings of mezo.estimator: lozo",
            ),
            (N::Sparse, Some(1.0), None, None, "must be in [0, 1)"),
            (N::Lozo, None, Some(0), None, "between 1 and 64"),
            (N::Lozo, None, None, Some(0), "at least 1"),
        ] {
            let e = Estimator::from_settings(name, sparsity, rank, basis).unwrap_err();
            assert!(e.contains(why), "{name}: {e}");
        }
    }

    /// Each estimator accepts the trailer its steps log, and only that one.
    #[test]
    fn a_record_trailer_is_checked_against_the_estimator() {
        let all = [
            Estimator::Mezo,
            Estimator::Sparse { sparsity: 0.5 },
            Estimator::Fzoo,
            Estimator::Lozo {
                rank: 1,
                basis_every: 1,
            },
        ];
        for e in all {
            for (spread, basis) in [
                (None, None),
                (Some(1.0), None),
                (None, Some(3)),
                (Some(1.0), Some(3)),
            ] {
                let trailer = match (spread, basis) {
                    (None, None) => Some(RecordTrailer::None),
                    (Some(_), None) => Some(RecordTrailer::Spread),
                    (None, Some(_)) => Some(RecordTrailer::Basis),
                    (Some(_), Some(_)) => None,
                };
                assert_eq!(
                    e.check_trailer(spread, basis).is_ok(),
                    trailer == Some(e.record_trailer()),
                    "{e:?} with {spread:?}, {basis:?}"
                );
            }
        }
    }
}
