//! The seed log: one small record per MeZO step in an embedded sled database.
//!
//! A step is fully described by its seed and its projected gradient, so this
//! log *is* the fine-tune: replaying it over the base weights rebuilds them
//! bit for bit.  Records are keyed by big-endian step, so iteration is in step
//! order.  sled may lose the last records on a crash (its fsync is imperfect);
//! that is harmless because any lost step is recomputed identically.

use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: u64,
    pub seed: u64,
    pub projected_grad: f64,
    pub loss_plus: f64,
    pub loss_minus: f64,
    pub lr: f64,
    /// n-SPSA (`mezo.directions` > 1): the step's further directions, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub more: Vec<Direction>,
    /// FZOO: σ, the spread (population standard deviation) of the N perturbed
    /// losses, which divides the update.  There, each direction's `loss_plus` is
    /// its perturbed loss, `loss_minus` the loss at θ, and `projected_grad`
    /// their one-sided difference over ε.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread: Option<f64>,
    /// LOZO: the seed of V, the right factor every direction `U·Vᵀ` of the step
    /// shares (the same for `basis_every` consecutive steps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basis: Option<u64>,
}

/// One further direction of an n-SPSA step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Direction {
    pub seed: u64,
    pub projected_grad: f64,
    pub loss_plus: f64,
    pub loss_minus: f64,
}

/// Fixed little-endian layout: exact f64 bits (a text round trip could move the
/// last bit of a projected gradient, and replay would drift).  48 bytes for a
/// one-direction step, then 32 per further direction, then for FZOO and LOZO
/// a 16-byte trailer (a tag, then σ or V's seed); the lengths never collide
/// (48 + 32k, or + 16), so logs written before n-SPSA, FZOO or LOZO existed
/// read unchanged.
pub const RECORD_BYTES: usize = 48;
const DIRECTION_BYTES: usize = 32;
const TRAILER_BYTES: usize = 16;
/// The trailer's tag, "spread" in ASCII: a record cut in the wrong place is
/// refused rather than read as σ.
const SPREAD_TAG: u64 = u64::from_le_bytes(*b"spread\0\0");
/// The tag of LOZO's trailer, "basis" in ASCII.
const BASIS_TAG: u64 = u64::from_le_bytes(*b"basis\0\0\0");

/// Bytes of a record of `directions` directions with `trailer`.
pub(crate) fn record_bytes(directions: usize, trailer: crate::estimator::RecordTrailer) -> usize {
    let trailer = match trailer {
        crate::estimator::RecordTrailer::None => 0,
        crate::estimator::RecordTrailer::Spread | crate::estimator::RecordTrailer::Basis => {
            TRAILER_BYTES
        }
    };
    RECORD_BYTES + directions.saturating_sub(1) * DIRECTION_BYTES + trailer
}

impl StepRecord {
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        let mut fields = vec![
            self.step,
            self.seed,
            self.projected_grad.to_bits(),
            self.loss_plus.to_bits(),
            self.loss_minus.to_bits(),
            self.lr.to_bits(),
        ];
        for d in &self.more {
            fields.extend([
                d.seed,
                d.projected_grad.to_bits(),
                d.loss_plus.to_bits(),
                d.loss_minus.to_bits(),
            ]);
        }
        if let Some(spread) = self.spread {
            fields.extend([SPREAD_TAG, spread.to_bits()]);
        }
        if let Some(basis) = self.basis {
            fields.extend([BASIS_TAG, basis]);
        }
        fields.iter().flat_map(|f| f.to_le_bytes()).collect()
    }

    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        let rest = b.len().checked_sub(RECORD_BYTES)?;
        let (directions, trailer_at) = match rest % DIRECTION_BYTES {
            0 => (rest / DIRECTION_BYTES, None),
            TRAILER_BYTES => (rest / DIRECTION_BYTES, Some(b.len() - TRAILER_BYTES)),
            _ => return None,
        };
        let f = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap());
        let (spread, basis) = match trailer_at.map(|at| (f(at / 8), f(at / 8 + 1))) {
            Some((SPREAD_TAG, bits)) => (Some(f64::from_bits(bits)), None),
            Some((BASIS_TAG, seed)) => (None, Some(seed)),
            Some(_) => return None,
            None => (None, None),
        };
        let more = (0..directions)
            .map(|k| {
                let at = RECORD_BYTES / 8 + 4 * k;
                Direction {
                    seed: f(at),
                    projected_grad: f64::from_bits(f(at + 1)),
                    loss_plus: f64::from_bits(f(at + 2)),
                    loss_minus: f64::from_bits(f(at + 3)),
                }
            })
            .collect();
        Some(Self {
            step: f(0),
            seed: f(1),
            projected_grad: f64::from_bits(f(2)),
            loss_plus: f64::from_bits(f(3)),
            loss_minus: f64::from_bits(f(4)),
            lr: f64::from_bits(f(5)),
            more,
            spread,
            basis,
        })
    }

    /// The seeds of every direction, first the step's own.
    pub fn seeds(&self) -> Vec<u64> {
        std::iter::once(self.seed)
            .chain(self.more.iter().map(|d| d.seed))
            .collect()
    }

    /// The projected gradients of every direction, in order.
    pub fn grads(&self) -> Vec<f64> {
        std::iter::once(self.projected_grad)
            .chain(self.more.iter().map(|d| d.projected_grad))
            .collect()
    }
}

/// Where a run's step records go.  `mezod run` keeps them in its own sled
/// database; a daemon worker streams them to the daemon, which owns the sled
/// database (sled allows one process per database).
pub trait StepLog {
    /// The records of steps 0, 1, 2, … up to the first gap.
    fn contiguous(&self) -> Result<Vec<StepRecord>>;
    /// Record one step durably (or hand it to whoever makes it durable).
    fn append(&mut self, rec: &StepRecord) -> Result<()>;
    /// Drop every record from `step` on (what lies beyond a gap is recomputed).
    fn truncate_from(&mut self, step: u64) -> Result<()>;
}

/// A seed log in a sled tree: a run's own database, or one tree per job in
/// the daemon's database.
pub struct SeedLog {
    tree: sled::Tree,
    /// Keeps a run's own database open for as long as the log lives.
    _db: Option<sled::Db>,
}

impl SeedLog {
    pub fn open(dir: &Path) -> Result<Self> {
        let db = sled::open(dir).with_context(|| format!("opening seed log {}", dir.display()))?;
        Ok(Self {
            tree: (*db).clone(),
            _db: Some(db),
        })
    }

    /// The log held in one tree of a larger database.
    pub(crate) fn in_tree(tree: sled::Tree) -> Self {
        Self { tree, _db: None }
    }

    /// Append one step and flush it to disk.
    pub fn append(&self, rec: &StepRecord) -> Result<()> {
        self.tree.insert(rec.step.to_be_bytes(), rec.to_bytes())?;
        self.tree.flush().context("flushing the seed log")?;
        Ok(())
    }

    /// Insert without flushing (the daemon flushes once per batch of records).
    pub fn insert(&self, rec: &StepRecord) -> Result<()> {
        self.tree.insert(rec.step.to_be_bytes(), rec.to_bytes())?;
        Ok(())
    }

    pub fn flush(&self) -> Result<()> {
        self.tree.flush().context("flushing the seed log")?;
        Ok(())
    }

    /// The records of steps 0, 1, 2, … up to the first gap or unreadable record.
    pub fn contiguous(&self) -> Result<Vec<StepRecord>> {
        let mut out = Vec::new();
        self.for_each_contiguous(u64::MAX, |rec| {
            out.push(rec);
            Ok(())
        })?;
        Ok(out)
    }

    /// How many records [`contiguous`](Self::contiguous) would return, without
    /// holding them: a daemon's job may have millions.
    pub(crate) fn contiguous_len(&self) -> Result<u64> {
        self.for_each_contiguous(u64::MAX, |_| Ok(()))
    }

    /// Visit the records of steps 0, 1, 2, … up to the first gap, an
    /// unreadable record or step `limit`, one at a time; returns how many.
    pub(crate) fn for_each_contiguous(
        &self,
        limit: u64,
        mut visit: impl FnMut(StepRecord) -> Result<()>,
    ) -> Result<u64> {
        let mut n = 0u64;
        for item in self.tree.iter() {
            if n >= limit {
                break;
            }
            let (k, v) = item?;
            let Ok(key) = <[u8; 8]>::try_from(k.as_ref()) else {
                break;
            };
            let Some(rec) = StepRecord::from_bytes(&v) else {
                break;
            };
            if u64::from_be_bytes(key) != n || rec.step != n {
                break;
            }
            visit(rec)?;
            n += 1;
        }
        Ok(n)
    }

    /// Drop every record from `step` on (what lies beyond a gap is recomputed).
    pub fn truncate_from(&self, step: u64) -> Result<()> {
        for item in self.tree.range(step.to_be_bytes()..) {
            let (k, _) = item?;
            self.tree.remove(k)?;
        }
        self.tree.flush()?;
        Ok(())
    }
}

impl StepLog for SeedLog {
    fn contiguous(&self) -> Result<Vec<StepRecord>> {
        SeedLog::contiguous(self)
    }
    fn append(&mut self, rec: &StepRecord) -> Result<()> {
        SeedLog::append(self, rec)
    }
    fn truncate_from(&mut self, step: u64) -> Result<()> {
        SeedLog::truncate_from(self, step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(step: u64) -> StepRecord {
        StepRecord {
            step,
            seed: step * 3 + 1,
            projected_grad: step as f64 * 0.5,
            loss_plus: 1.0,
            loss_minus: 2.0,
            lr: 1e-3,
            // Odd steps are n-SPSA steps with one further direction.
            more: (0..step % 2)
                .map(|k| Direction {
                    seed: 1000 + step + k,
                    projected_grad: -0.25,
                    loss_plus: 3.0,
                    loss_minus: 4.0,
                })
                .collect(),
            spread: None,
            basis: None,
        }
    }

    #[test]
    fn a_lozo_record_keeps_the_seed_of_its_v_and_is_never_read_as_fzoo() {
        for step in [2, 3] {
            let mut lozo = rec(step);
            lozo.basis = Some(u64::MAX - 5); // all 64 bits matter
            let bytes = lozo.to_bytes();
            assert_eq!(bytes.len(), lozo.to_bytes().len());
            assert_eq!(bytes.len(), RECORD_BYTES + 32 * (step as usize % 2) + 16);
            let back = StepRecord::from_bytes(&bytes).unwrap();
            assert_eq!(back, lozo);
            assert_eq!(back.spread, None, "a basis trailer read as σ");
            let json = serde_json::to_string(&lozo).unwrap();
            assert_eq!(serde_json::from_str::<StepRecord>(&json).unwrap(), lozo);
        }
        assert!(!serde_json::to_string(&rec(3)).unwrap().contains("basis"));
    }

    #[test]
    fn an_fzoo_record_keeps_its_spread_exactly_and_a_cut_one_is_refused() {
        let mut fzoo = rec(3);
        fzoo.spread = Some(0.1 + 0.2); // a value whose decimal form is long
        let bytes = fzoo.to_bytes();
        assert_eq!(bytes.len(), RECORD_BYTES + 32 + 16);
        assert_eq!(StepRecord::from_bytes(&bytes), Some(fzoo.clone()));
        for cut in [8, 24] {
            assert_eq!(
                StepRecord::from_bytes(&bytes[..bytes.len() - cut]),
                None,
                "{cut}"
            );
        }
        // Cut at the trailer it reads as a step without σ, which an fzoo
        // replay refuses (the engine's `a_replay_refuses_a_record_of_another_estimator`).
        let without = StepRecord::from_bytes(&bytes[..bytes.len() - 16]).unwrap();
        assert_eq!(without.spread, None);
        let mut wrong_tag = bytes.clone();
        wrong_tag[RECORD_BYTES + 32] ^= 1;
        assert_eq!(StepRecord::from_bytes(&wrong_tag), None);
        let json = serde_json::to_string(&fzoo).unwrap();
        assert_eq!(serde_json::from_str::<StepRecord>(&json).unwrap(), fzoo);
        assert!(!serde_json::to_string(&rec(3)).unwrap().contains("spread"));
    }

    #[test]
    fn records_written_before_n_spsa_read_as_one_direction() {
        let one = rec(2);
        let bytes = one.to_bytes();
        assert_eq!(bytes.len(), RECORD_BYTES);
        assert_eq!(StepRecord::from_bytes(&bytes), Some(one));
        let two = rec(3);
        assert_eq!(two.to_bytes().len(), RECORD_BYTES + 32);
        assert_eq!(StepRecord::from_bytes(&two.to_bytes()), Some(two));
        assert_eq!(StepRecord::from_bytes(&bytes[..47]), None);
    }

    #[test]
    fn records_survive_reopening_in_step_order_and_stop_at_gaps() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = SeedLog::open(dir.path()).unwrap();
            for s in [0, 1, 2, 3, 5, 300] {
                log.append(&rec(s)).unwrap();
            }
        }
        let log = SeedLog::open(dir.path()).unwrap();
        assert_eq!(
            log.contiguous().unwrap(),
            (0..4).map(rec).collect::<Vec<_>>()
        );
        log.truncate_from(4).unwrap();
        log.append(&rec(4)).unwrap();
        assert_eq!(log.contiguous().unwrap().len(), 5);
    }
}
