//! mezod's engine: fine-tune language models with MeZO (zeroth-order, forward
//! passes only).  Everything here needs libtorch; the control plane (job
//! files, estimates, the daemon) is the `mezod_core` crate.
//!
//! See ARCHITECTURE.md for the map of modules and their invariants.

pub mod baselines;
pub mod bench;
pub mod data;
pub mod estimate;
pub mod mezo;
pub mod model;
pub mod run;
pub mod tokenize;
pub mod worker;

// The control plane's modules, under the names the engine has always used.
pub use mezod_core::{daemon, gpu, procfs, spec};
