//! MeZO: the step itself, the generators of z, and the pure schedule functions around it.

pub mod fast_rng;
pub mod mask;
pub mod schedule;
pub mod step;
pub mod sweep;

pub use schedule::{basis_seed, batch_indices, direction_seed, step_seed, LrSchedule};
pub use step::{
    live_step, mezo_step, replay_step, spsa_step, Gradient, Gradients, Logged, Measured, Method,
    StepConfig, StepOutcome,
};
pub use sweep::{Rng, ZSweep};
