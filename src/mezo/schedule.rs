//! Pure functions of (seed, step): the step seed, the batch, the learning rate.
//! Nothing here keeps state, so a resumed run recomputes any step exactly.

pub use mezod_core::mezo_options::LrSchedule;
use rand::seq::SliceRandom;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// The seed of step `step` of a job seeded `job_seed` (52 bits: exact in any JSON reader).
pub fn step_seed(job_seed: u64, step: u64) -> u64 {
    let mut rng = ChaCha20Rng::seed_from_u64(job_seed);
    rng.set_stream(step);
    rng.next_u64() >> 12
}

/// The seed of direction `j` of an n-SPSA step whose own seed is `step_seed`
/// (direction 0 is the step seed itself, so one direction is plain MeZO).
pub fn direction_seed(step_seed: u64, j: u64) -> u64 {
    if j == 0 {
        return step_seed;
    }
    let mut rng = ChaCha20Rng::seed_from_u64(step_seed);
    rng.set_stream(j);
    rng.next_u64() >> 12
}

/// LOZO: the seed of V for step `step`, the same for the `every` steps of a
/// period (ChaCha streams from 2⁶³ up: never a step seed's stream).
pub fn basis_seed(job_seed: u64, step: u64, every: u64) -> u64 {
    let mut rng = ChaCha20Rng::seed_from_u64(job_seed);
    rng.set_stream((1 << 63) | (step / every.max(1)));
    rng.next_u64() >> 12
}

/// Example indices of the batch for `step`: epochs are seeded permutations of
/// the training set, consumed `batch_size` at a time across epoch boundaries.
pub fn batch_indices(data_seed: u64, step: u64, batch_size: usize, n: usize) -> Vec<usize> {
    assert!(n > 0, "empty training set");
    let mut out = Vec::with_capacity(batch_size);
    let mut cached: Option<(u64, Vec<usize>)> = None;
    for j in 0..batch_size as u64 {
        let i = step * batch_size as u64 + j;
        let (epoch, pos) = (i / n as u64, (i % n as u64) as usize);
        if cached.as_ref().map(|c| c.0) != Some(epoch) {
            cached = Some((epoch, epoch_permutation(data_seed, epoch, n)));
        }
        out.push(cached.as_ref().unwrap().1[pos]);
    }
    out
}

fn epoch_permutation(data_seed: u64, epoch: u64, n: usize) -> Vec<usize> {
    let mut rng = ChaCha20Rng::seed_from_u64(data_seed);
    rng.set_stream(epoch);
    let mut perm: Vec<usize> = (0..n).collect();
    perm.shuffle(&mut rng);
    perm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_basis_seed_holds_for_its_period_and_is_never_a_step_seed() {
        assert_eq!(basis_seed(7, 0, 100), basis_seed(7, 99, 100));
        assert_ne!(basis_seed(7, 99, 100), basis_seed(7, 100, 100));
        assert_ne!(basis_seed(7, 5, 1), basis_seed(7, 6, 1));
        let steps: std::collections::HashSet<u64> = (0..1000).map(|t| step_seed(7, t)).collect();
        assert!((0..1000).all(|t| !steps.contains(&basis_seed(7, t, 1))));
        assert!(basis_seed(7, 3, 1) < 1 << 52);
    }

    #[test]
    fn seeds_are_stable_distinct_and_json_safe() {
        assert_eq!(step_seed(7, 3), step_seed(7, 3));
        let seeds: std::collections::HashSet<u64> = (0..1000).map(|t| step_seed(7, t)).collect();
        assert_eq!(seeds.len(), 1000);
        assert_ne!(step_seed(7, 0), step_seed(8, 0));
        assert!(seeds.iter().all(|&s| s < 1 << 52));
    }

    #[test]
    fn batches_cover_each_epoch_once_and_are_pure() {
        let n = 10;
        let mut seen: Vec<usize> = (0..5).flat_map(|t| batch_indices(1, t, 2, n)).collect();
        seen.sort();
        assert_eq!(seen, (0..n).collect::<Vec<_>>());
        assert_eq!(batch_indices(1, 37, 3, n), batch_indices(1, 37, 3, n));
        assert_ne!(
            (0..5)
                .map(|t| batch_indices(1, t, 2, n))
                .collect::<Vec<_>>(),
            (0..5)
                .map(|t| batch_indices(2, t, 2, n))
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn linear_schedule_decays_to_zero() {
        assert_eq!(LrSchedule::Linear.lr(1.0, 0, 10), 1.0);
        assert!((LrSchedule::Linear.lr(1.0, 5, 10) - 0.5).abs() < 1e-12);
        assert_eq!(LrSchedule::Constant.lr(0.3, 9, 10), 0.3);
    }
}
