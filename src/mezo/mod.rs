//! MeZO: the step itself (`step`: Algorithm 1 and n-SPSA), each other
//! estimator's own part (`fzoo`, Sparse MeZO's `mask`, LOZO's low-rank
//! directions in `lozo`), the one dispatch on the job's estimator (`method`),
//! n-SPSA's directions shared among replicas (`shared`), the generators of z,
//! and the pure schedule functions around it.

pub mod fast_rng;
pub mod fzoo;
pub mod lozo;
pub mod mask;
pub mod method;
pub mod schedule;
pub mod shared;
pub mod step;
pub mod sweep;
#[cfg(test)]
mod testing;

pub use fzoo::Measured;
pub use method::{live_step, live_step_among, replay_step, Logged, StepSeeds};
pub use schedule::{basis_seed, batch_indices, direction_seed, step_seed, LrSchedule};
pub use shared::{Measurement, Share};
pub use step::{mezo_step, spsa_step, Gradient, Gradients, StepConfig, StepOutcome};
pub use sweep::{Rng, ZSweep};
