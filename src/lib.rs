//! mezod: fine-tune language models with MeZO (zeroth-order, forward passes only).
//!
//! See ARCHITECTURE.md for the map of modules and their invariants.

pub mod baselines;
pub mod bench;
pub mod daemon;
pub mod data;
pub mod estimate;
pub mod gpu;
pub mod mezo;
pub mod model;
pub mod procfs;
pub mod run;
pub mod spec;
pub mod tokenize;
