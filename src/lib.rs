//! mezod: fine-tune language models with MeZO (zeroth-order, forward passes only).
//!
//! See ARCHITECTURE.md for the map of modules and their invariants.

pub mod model;
pub mod tokenize;
pub mod mezo;
pub mod data;
pub mod spec;
pub mod run;
