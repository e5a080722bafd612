//! The MeZO settings of a job that the control plane needs too: the generator
//! of z (it decides the size of z's temporary), the distribution of z and the
//! learning-rate schedule.  The estimator has its own module, `estimator`.

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
    pub fn default_for(device: crate::model_ref::DeviceRef) -> Rng {
        if device.is_gpu() {
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
