//! MeZO: the step itself and the pure schedule functions around it.

pub mod schedule;
pub mod step;

pub use schedule::{batch_indices, step_seed, LrSchedule};
pub use step::{mezo_step, Gradient, StepConfig, StepOutcome};
