//! What must match for a resume to be bit-identical: the same device kind and
//! GPU model (CUDA's randn depends on the multiprocessor count), the same
//! libtorch, dtype and thread count, and the same generator of z.

use serde::{Deserialize, Serialize};

use crate::mezo::Rng;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub device: String,
    pub gpu: Option<String>,
    pub torch: String,
    pub dtype: String,
    pub threads: i32,
    /// Runs from before `mezo.rng` existed drew z with torch.
    #[serde(default = "torch_rng")]
    pub rng: Rng,
}

fn torch_rng() -> Rng {
    Rng::Torch
}

impl Fingerprint {
    pub fn current(
        device: mezod_core::model_ref::DeviceRef,
        dtype: crate::model::Dtype,
        threads: i32,
        rng: Rng,
    ) -> Self {
        let gpu = device.is_gpu().then(|| {
            crate::gpu::model_name()
                .unwrap_or_else(|| format!("{} CUDA device(s)", tch::Cuda::device_count()))
        });
        Self {
            device: if device.is_gpu() {
                "cuda".into()
            } else {
                "cpu".into()
            },
            gpu,
            torch: env!("MEZOD_TORCH_VERSION").to_string(),
            dtype: dtype.to_string(),
            threads,
            rng,
        }
    }
}

/// As a person reads it: `cpu, torch 2.11.0, f32, 2 threads, rng fast`.
impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.device)?;
        if let Some(gpu) = &self.gpu {
            write!(f, " ({gpu})")?;
        }
        write!(
            f,
            ", torch {}, {}, {} thread{}, rng {}",
            self.torch,
            self.dtype,
            self.threads,
            if self.threads == 1 { "" } else { "s" },
            self.rng
        )
    }
}
