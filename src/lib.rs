//! mezod's engine: fine-tune language models with MeZO (zeroth-order, forward
//! passes only).  Everything here needs libtorch; the control plane (job
//! files, estimates, the daemon) is the `mezod_core` crate.
//!
//! See ARCHITECTURE.md for the map of modules and their invariants.

pub mod baselines;
pub mod bench;
pub mod data;
pub mod estimate;
pub mod inspect;
pub mod mezo;
pub mod model;
pub mod replicas;
pub mod run;
pub mod tokenize;
pub mod worker;

/// torch's random generator is process-global and unit tests run on several
/// threads: every test that seeds it or draws from it holds this lock.
#[cfg(test)]
pub(crate) fn torch_rng_lock() -> std::sync::MutexGuard<'static, ()> {
    static TORCH_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());
    TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner())
}

// The control plane's modules, under the names the engine has always used.
pub use mezod_core::{daemon, gpu, procfs, spec};
