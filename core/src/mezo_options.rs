//! The MeZO settings of a job that the control plane needs too: the generator
//! of z (it decides the size of z's temporary) and the learning-rate schedule.

use serde::{Deserialize, Serialize};

/// Elements per chunk of the fast generator: 64 KiB of f32, at home in L2
/// (each thread holds one chunk).
pub const DEFAULT_CHUNK: usize = 16 * 1024;

/// Which generator draws z.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Rng {
    Fast,
    Torch,
}

/// As job files write it: `fast`, `torch`.
impl std::fmt::Display for Rng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Rng::Fast => "fast",
            Rng::Torch => "torch",
        })
    }
}

impl Rng {
    /// `fast` on CPU, `torch` on GPUs.
    pub fn default_for(device: &str) -> Rng {
        if device.starts_with("cuda") {
            Rng::Torch
        } else {
            Rng::Fast
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    /// The reference's choice for MeZO.
    #[default]
    Constant,
    /// Linear decay to zero at the last step.
    Linear,
}

impl LrSchedule {
    pub fn lr(self, base: f64, step: u64, total: u64) -> f64 {
        match self {
            LrSchedule::Constant => base,
            LrSchedule::Linear => base * (1.0 - step as f64 / total.max(1) as f64),
        }
    }
}

/// How a step turns forward passes into an update (`mezo.estimator`).
/// Every estimator logs what its update needs, so live and replayed steps run
/// the same operations on the weights and a resume is bit-identical.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Estimator {
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

impl Estimator {
    pub fn is_mezo(&self) -> bool {
        *self == Estimator::Mezo
    }

    /// Training forward passes per step with `directions` directions.
    pub fn forward_passes(self, directions: usize) -> usize {
        match self {
            Estimator::Mezo | Estimator::Sparse | Estimator::Lozo => 2 * directions,
            Estimator::Fzoo => directions + 1,
        }
    }

    /// What a step record of this estimator carries after its directions:
    /// FZOO's σ, LOZO's seed of V, or nothing.
    pub fn record_trailer(self) -> RecordTrailer {
        match self {
            Estimator::Fzoo => RecordTrailer::Spread,
            Estimator::Lozo => RecordTrailer::Basis,
            Estimator::Mezo | Estimator::Sparse => RecordTrailer::None,
        }
    }

    /// The direction distribution a job gets unless it names one: FZOO's
    /// analysis is for ±1 directions; MeZO's for Gaussian ones.
    pub fn default_perturbation(self) -> Perturbation {
        match self {
            Estimator::Fzoo => Perturbation::Rademacher,
            Estimator::Mezo | Estimator::Sparse | Estimator::Lozo => Perturbation::Gaussian,
        }
    }
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

/// As job files write it: `mezo`, `fzoo`, `sparse`, `lozo`.
impl std::fmt::Display for Estimator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Estimator::Mezo => "mezo",
            Estimator::Fzoo => "fzoo",
            Estimator::Sparse => "sparse",
            Estimator::Lozo => "lozo",
        })
    }
}

/// The distribution of each element of a direction z (`mezo.perturbation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Perturbation {
    /// Standard normal.
    #[default]
    Gaussian,
    /// ±1 with equal odds: one random bit per element, no transform.
    Rademacher,
}

impl Perturbation {
    pub fn is_gaussian(&self) -> bool {
        *self == Perturbation::Gaussian
    }
}

/// As job files write it: `gaussian`, `rademacher`.
impl std::fmt::Display for Perturbation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Perturbation::Gaussian => "gaussian",
            Perturbation::Rademacher => "rademacher",
        })
    }
}

/// Sparse MeZO's default: each step perturbs the 25 % smallest-magnitude
/// weights of every tensor.
pub const DEFAULT_SPARSITY: f64 = 0.75;

/// LOZO's default rank of each matrix's direction `U·Vᵀ` (the authors' script: 1;
/// each element of a rank-1 direction has variance 1, as MeZO's z, so MeZO's
/// learning rates carry over).
pub const DEFAULT_RANK: usize = 1;

/// LOZO's default number of steps that share one V (the authors' script: 100).
pub const DEFAULT_BASIS_EVERY: u64 = 100;
