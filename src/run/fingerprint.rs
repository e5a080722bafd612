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
        Self::of_devices(&[device], dtype, threads, rng)
    }

    /// The fingerprint of a model on `devices` (several: split over them).
    /// The device is their kinds: `cpu`, `cuda`, `cuda×2` for a split over
    /// two GPUs (torch's generator draws on each GPU from its own state),
    /// `cuda+cpu` for a split that ends on the CPU; a split over the CPU
    /// alone is `cpu`, as its bits are the CPU's.
    pub fn of_devices(
        devices: &[mezod_core::model_ref::DeviceRef],
        dtype: crate::model::Dtype,
        threads: i32,
        rng: Rng,
    ) -> Self {
        let gpus = devices.iter().filter(|d| d.is_gpu()).count();
        let any_cpu = devices.iter().any(|d| !d.is_gpu());
        let gpu = (gpus > 0).then(|| {
            crate::gpu::model_name()
                .unwrap_or_else(|| format!("{} CUDA device(s)", tch::Cuda::device_count()))
        });
        let on_gpus = match gpus {
            0 => None,
            1 => Some("cuda".to_string()),
            n => Some(format!("cuda×{n}")),
        };
        Self {
            device: match (on_gpus, any_cpu) {
                (Some(g), true) => format!("{g}+cpu"),
                (Some(g), false) => g,
                (None, _) => "cpu".into(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use mezod_core::model_ref::DeviceRef::{Cpu, Cuda};

    #[test]
    fn a_split_is_fingerprinted_by_the_kinds_of_its_devices() {
        let device = |devices: &[mezod_core::model_ref::DeviceRef]| {
            Fingerprint::of_devices(devices, crate::model::Dtype::F32, 1, Rng::Fast).device
        };
        assert_eq!(device(&[Cpu]), "cpu");
        assert_eq!(device(&[Cpu, Cpu]), "cpu", "the CPU's bits, split or not");
        assert_eq!(device(&[Cuda(1)]), "cuda");
        assert_eq!(device(&[Cuda(0), Cuda(1)]), "cuda×2");
        assert_eq!(device(&[Cuda(0), Cpu, Cpu]), "cuda+cpu");
    }
}
