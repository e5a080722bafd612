//! Replicas: one job's n-SPSA directions measured by K processes at once,
//! each on its own device, exchanging only scalars per step over PyTorch's
//! own c10d (Gloo), started as torchrun starts workers.
//!
//! Replica r measures the directions j with j mod K = r; each step ends with
//! one all-gather of a fixed-size frame per replica (the step, a stop flag,
//! and four numbers per direction), after which every replica holds every
//! direction's projected gradient and applies the same updates.

pub mod c10d;
pub mod launch_env;
pub mod local;

use anyhow::{bail, Result};

use crate::mezo::{Measurement, Share, StepOutcome};
use crate::run::seedlog::StepRecord;

/// What carries the frames between replicas: c10d's Gloo group in a run, a
/// group of threads in tests.
pub trait AllGather {
    /// This replica's place, 0-based.
    fn rank(&self) -> usize;
    /// How many replicas there are.
    fn world(&self) -> usize;
    /// Every replica's `frame`, in rank order; all replicas pass frames of
    /// the same length.
    fn all_gather(&self, frame: &[u8]) -> Result<Vec<Vec<u8>>>;
}

impl AllGather for c10d::Group {
    fn rank(&self) -> usize {
        c10d::Group::rank(self)
    }
    fn world(&self) -> usize {
        c10d::Group::world(self)
    }
    fn all_gather(&self, frame: &[u8]) -> Result<Vec<Vec<u8>>> {
        c10d::Group::all_gather(self, frame)
    }
}

/// This replica's side of a replicated job's steps.
pub struct Replicas {
    group: Box<dyn AllGather>,
    /// The step being exchanged, checked against every replica's.
    step: u64,
    /// This replica was asked to stop (sent with the step's frame).
    stop_here: bool,
    /// Some replica was asked to stop (read from the last exchange).
    stop_anywhere: bool,
}

/// Bytes of the leader's records sent per exchange at the start.
const START_PIECE: usize = 64 * 1024;

/// A frame's header: the step (u64) and the stop flag (u8).
const HEADER: usize = 9;
/// Per direction: whether the sender measured it (0 no, 1 yes, 2 failed),
/// then loss+, loss− and the projected gradient as f64.
const PER_DIRECTION: usize = 1 + 3 * 8;

impl Replicas {
    pub fn new(group: Box<dyn AllGather>) -> Self {
        Replicas {
            group,
            step: 0,
            stop_here: false,
            stop_anywhere: false,
        }
    }

    pub fn rank(&self) -> usize {
        self.group.rank()
    }

    pub fn world(&self) -> usize {
        self.group.world()
    }

    /// The next exchange is step `step`'s, and says whether this replica
    /// was asked to stop.
    pub fn begin_step(&mut self, step: u64, stop: bool) {
        self.step = step;
        self.stop_here = stop;
    }

    /// Whether any replica asked to stop at the last exchange: then all of
    /// them stop after this step, at the same boundary.
    pub fn stop_asked(&self) -> bool {
        self.stop_anywhere
    }

    /// The first replica leads: it alone writes the seed log, snapshots,
    /// evaluations and outputs.
    pub fn leads(&self) -> bool {
        self.rank() == 0
    }

    /// Where the run starts, as the leader found it: whether it has finished
    /// already, and the records of its seed log (which only the leader can
    /// open).  The leader passes `Some`, the others `None`; every replica
    /// gets the leader's.
    pub fn share_start(
        &self,
        leader: Option<(bool, &[StepRecord])>,
    ) -> Result<(bool, Vec<StepRecord>)> {
        let text = match leader {
            Some((_, records)) => serde_json::to_vec(records)?,
            None => Vec::new(),
        };
        let mut head = [0u8; 9];
        if let Some((finished, _)) = leader {
            head[0] = finished as u8;
            head[1..].copy_from_slice(&(text.len() as u64).to_le_bytes());
        }
        let heads = self.group.all_gather(&head)?;
        let finished = heads[0][0] != 0;
        let len = u64::from_le_bytes(heads[0][1..9].try_into().expect("eight bytes")) as usize;
        let mut received = Vec::with_capacity(len);
        while received.len() < len {
            let at = received.len();
            let mut piece = vec![0u8; START_PIECE];
            if leader.is_some() {
                let end = (at + START_PIECE).min(len);
                piece[..end - at].copy_from_slice(&text[at..end]);
            }
            let pieces = self.group.all_gather(&piece)?;
            let take = (len - at).min(START_PIECE);
            received.extend_from_slice(&pieces[0][..take]);
        }
        let records = serde_json::from_slice(&received)
            .map_err(|e| anyhow::anyhow!("the leading replica's step records do not read: {e}"))?;
        Ok((finished, records))
    }

    fn encode(&self, mine: &[Option<Measurement>]) -> Vec<u8> {
        let mut frame = Vec::with_capacity(HEADER + mine.len() * PER_DIRECTION);
        frame.extend_from_slice(&self.step.to_le_bytes());
        frame.push(self.stop_here as u8);
        for m in mine {
            let (tag, o) = match m {
                None => (0u8, None),
                Some(Ok(o)) => (1, Some(*o)),
                Some(Err(_)) => (2, None),
            };
            frame.push(tag);
            let o = o.unwrap_or(StepOutcome {
                projected_grad: f64::NAN,
                loss_plus: f64::NAN,
                loss_minus: f64::NAN,
            });
            for x in [o.loss_plus, o.loss_minus, o.projected_grad] {
                frame.extend_from_slice(&x.to_le_bytes());
            }
        }
        frame
    }
}

fn f64_at(frame: &[u8], at: usize) -> f64 {
    f64::from_le_bytes(frame[at..at + 8].try_into().expect("eight bytes"))
}

impl Share for Replicas {
    fn measures(&self, direction: usize) -> bool {
        direction % self.world() == self.rank()
    }

    fn exchange(&mut self, mine: &[Option<Measurement>]) -> Result<Vec<StepOutcome>> {
        let n = mine.len();
        if let Some((j, Some(Err(why)))) = mine
            .iter()
            .enumerate()
            .find(|(_, m)| matches!(m, Some(Err(_))))
        {
            // Still exchange, so the others learn of it instead of waiting.
            let _ = self.group.all_gather(&self.encode(mine));
            bail!("{why} (direction {j}, measured by replica {})", self.rank());
        }
        let frames = self.group.all_gather(&self.encode(mine))?;
        let world = self.world();
        let mut outcomes = Vec::with_capacity(n);
        self.stop_anywhere = false;
        for (r, frame) in frames.iter().enumerate() {
            if frame.len() != HEADER + n * PER_DIRECTION {
                bail!(
                    "replica {r} sent {} bytes for a step of {n} directions: the replicas run different jobs",
                    frame.len()
                );
            }
            let step = u64::from_le_bytes(frame[..8].try_into().expect("eight bytes"));
            if step != self.step {
                bail!(
                    "replica {r} is at step {step} and this one ({}) at step {}: the replicas are out of step",
                    self.rank(),
                    self.step
                );
            }
            self.stop_anywhere |= frame[8] != 0;
        }
        for j in 0..n {
            let owner = j % world;
            let at = HEADER + j * PER_DIRECTION;
            let frame = &frames[owner];
            match frame[at] {
                1 => outcomes.push(StepOutcome {
                    loss_plus: f64_at(frame, at + 1),
                    loss_minus: f64_at(frame, at + 9),
                    projected_grad: f64_at(frame, at + 17),
                }),
                2 => bail!(
                    "non-finite loss in direction {j}, measured by replica {owner}; weights \
                     left unchanged by this step's update"
                ),
                _ => bail!("replica {owner} did not measure direction {j}, which is its own"),
            }
        }
        Ok(outcomes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mezo::sweep::{Rng, ZSweep};
    use crate::mezo::{live_step, live_step_among, StepConfig};
    use crate::model::{Param, ParamList};
    use mezod_core::estimator::{Estimator, DEFAULT_BASIS_EVERY};
    use std::sync::{Arc, Barrier, Mutex};
    use tch::{Kind, Tensor};

    /// Replicas as threads of one process: each puts its frame in a shared
    /// table, and all read the table once all have written.
    struct Threads {
        rank: usize,
        table: Arc<Mutex<Vec<Vec<u8>>>>,
        barrier: Arc<Barrier>,
    }

    fn threads(world: usize) -> Vec<Threads> {
        let table = Arc::new(Mutex::new(vec![Vec::new(); world]));
        let barrier = Arc::new(Barrier::new(world));
        (0..world)
            .map(|rank| Threads {
                rank,
                table: Arc::clone(&table),
                barrier: Arc::clone(&barrier),
            })
            .collect()
    }

    impl AllGather for Threads {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world(&self) -> usize {
            self.barrier_world()
        }
        fn all_gather(&self, frame: &[u8]) -> Result<Vec<Vec<u8>>> {
            self.table.lock().unwrap()[self.rank] = frame.to_vec();
            self.barrier.wait();
            let all = self.table.lock().unwrap().clone();
            self.barrier.wait();
            Ok(all)
        }
    }

    impl Threads {
        fn barrier_world(&self) -> usize {
            self.table.lock().unwrap().len()
        }
    }

    /// Parameters big enough for several chunks, at `kind`.
    fn params(kind: Kind) -> ParamList {
        let t = |shape: &[i64], seed: i64| {
            let mut x = vec![0f32; shape.iter().product::<i64>() as usize];
            crate::mezo::fast_rng::fill_normals(seed as u64, 0, 0, &mut x);
            Tensor::from_slice(&x).view(shape).to_kind(kind)
        };
        ParamList(vec![
            Param {
                name: "w".into(),
                tensor: t(&[40, 33], 1),
                decays: true,
            },
            Param {
                name: "b".into(),
                tensor: t(&[33], 2),
                decays: false,
            },
        ])
    }

    fn loss_of(p: &ParamList) -> impl FnMut() -> Result<f64> {
        let (w, b) = (p.0[0].tensor.shallow_clone(), p.0[1].tensor.shallow_clone());
        move || {
            let w = w.to_kind(Kind::Float);
            Ok((w.sin().sum(Kind::Float)
                + b.to_kind(Kind::Float).pow_tensor_scalar(2).sum(Kind::Float))
            .double_value(&[]))
        }
    }

    const CFG: StepConfig = StepConfig {
        eps: 1e-3,
        lr: 1e-2,
        weight_decay: 0.1,
    };

    /// Three steps of `estimator` with `n` directions, in one process.
    fn alone(estimator: Estimator, kind: Kind, n: usize) -> (ParamList, Vec<Vec<f64>>) {
        let p = params(kind);
        let z = ZSweep::new(Rng::Fast, 1);
        let mut grads = Vec::new();
        for step in 0..3u64 {
            let seeds: Vec<u64> = (0..n as u64).map(|j| 100 * step + j).collect();
            let mut loss = loss_of(&p);
            let m = live_step(&p, &z, estimator, &seeds, Some(7), &CFG, &mut loss).unwrap();
            grads.push(m.outcomes.iter().map(|o| o.projected_grad).collect());
        }
        (p, grads)
    }

    /// The same steps with the directions shared among `world` replicas
    /// (threads), each with its own copy of the weights.
    fn shared(
        estimator: Estimator,
        kind: Kind,
        n: usize,
        world: usize,
    ) -> Vec<(ParamList, Vec<Vec<f64>>)> {
        let handles: Vec<_> = threads(world)
            .into_iter()
            .map(|group| {
                std::thread::spawn(move || {
                    let p = params(kind);
                    let z = ZSweep::new(Rng::Fast, 1);
                    let mut replicas = Replicas::new(Box::new(group));
                    let mut grads = Vec::new();
                    for step in 0..3u64 {
                        let seeds: Vec<u64> = (0..n as u64).map(|j| 100 * step + j).collect();
                        let mut loss = loss_of(&p);
                        replicas.begin_step(step, false);
                        let m = live_step_among(
                            &p,
                            &z,
                            estimator,
                            &seeds,
                            Some(7),
                            &CFG,
                            Some(&mut replicas),
                            &mut loss,
                        )
                        .unwrap();
                        grads.push(m.outcomes.iter().map(|o| o.projected_grad).collect());
                    }
                    (p, grads)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    fn same(a: &ParamList, b: &ParamList) -> bool {
        a.iter()
            .zip(b.iter())
            .all(|(x, y)| x.tensor.equal(&y.tensor))
    }

    #[test]
    fn shared_directions_are_bit_identical_to_one_process() {
        let estimators = [
            Estimator::Mezo,
            Estimator::Sparse { sparsity: 0.75 },
            Estimator::Lozo {
                rank: 2,
                basis_every: DEFAULT_BASIS_EVERY,
            },
        ];
        for estimator in estimators {
            for kind in [Kind::Float, Kind::BFloat16] {
                for (n, world) in [(2, 2), (4, 2), (4, 4), (6, 3)] {
                    let (want, want_grads) = alone(estimator, kind, n);
                    assert!(!same(&want, &params(kind)), "the steps changed nothing");
                    for (rank, (p, grads)) in shared(estimator, kind, n, world).iter().enumerate() {
                        let what =
                            format!("{estimator:?} {kind:?} n {n}, replica {rank} of {world}");
                        assert_eq!(grads, &want_grads, "{what}");
                        assert!(same(p, &want), "{what}: weights differ");
                    }
                }
            }
        }
    }

    #[test]
    fn every_replica_starts_from_the_leaders_records() {
        let records: Vec<StepRecord> = (0..3000)
            .map(|step| StepRecord {
                step,
                seed: step * 7,
                projected_grad: step as f64 / 3.0,
                loss_plus: 1.0,
                loss_minus: 0.5,
                lr: 1e-3,
                more: Vec::new(),
                spread: None,
                basis: Some(step / 100),
            })
            .collect();
        assert!(serde_json::to_vec(&records).unwrap().len() > 2 * START_PIECE);
        let handles: Vec<_> = threads(3)
            .into_iter()
            .map(|group| {
                let records = records.clone();
                std::thread::spawn(move || {
                    let leads = group.rank == 0;
                    let replicas = Replicas::new(Box::new(group));
                    assert_eq!(replicas.leads(), leads);
                    replicas
                        .share_start(leads.then_some((true, &records[..])))
                        .unwrap()
                })
            })
            .collect();
        for h in handles {
            let (finished, got) = h.join().unwrap();
            assert!(finished);
            assert_eq!(got, records);
        }
    }

    #[test]
    fn a_failed_direction_and_a_stop_reach_every_replica() {
        // Replica 1's loss is NaN: both replicas fail the step, naming it.
        let handles: Vec<_> = threads(2)
            .into_iter()
            .map(|group| {
                std::thread::spawn(move || {
                    let p = params(Kind::Float);
                    let z = ZSweep::new(Rng::Fast, 1);
                    let rank = group.rank;
                    let mut replicas = Replicas::new(Box::new(group));
                    replicas.begin_step(0, rank == 0);
                    let mut ok = loss_of(&p);
                    let ran = live_step_among(
                        &p,
                        &z,
                        Estimator::Mezo,
                        &[1, 2],
                        None,
                        &CFG,
                        Some(&mut replicas),
                        &mut ok,
                    );
                    assert!(ran.is_ok() && replicas.stop_asked(), "replica {rank}");
                    replicas.begin_step(1, false);
                    let mut nan = move || Ok(if rank == 1 { f64::NAN } else { 1.0 });
                    let failed = live_step_among(
                        &p,
                        &z,
                        Estimator::Mezo,
                        &[3, 4],
                        None,
                        &CFG,
                        Some(&mut replicas),
                        &mut nan,
                    );
                    format!("{:#}", failed.unwrap_err())
                })
            })
            .collect();
        for (rank, h) in handles.into_iter().enumerate() {
            let why = h.join().unwrap();
            assert!(
                why.contains("non-finite loss in direction 1") && why.contains("replica 1"),
                "replica {rank}: {why}"
            );
        }
    }
}
