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

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: u64,
    pub seed: u64,
    pub projected_grad: f64,
    pub loss_plus: f64,
    pub loss_minus: f64,
    pub lr: f64,
}

/// Fixed little-endian layout: exact f64 bits (a text round trip could move the
/// last bit of a projected gradient, and replay would drift).
pub const RECORD_BYTES: usize = 48;

impl StepRecord {
    pub fn to_bytes(&self) -> [u8; RECORD_BYTES] {
        let mut b = [0u8; RECORD_BYTES];
        let fields = [
            self.step,
            self.seed,
            self.projected_grad.to_bits(),
            self.loss_plus.to_bits(),
            self.loss_minus.to_bits(),
            self.lr.to_bits(),
        ];
        for (i, f) in fields.iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&f.to_le_bytes());
        }
        b
    }

    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() != RECORD_BYTES {
            return None;
        }
        let f = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap());
        Some(Self {
            step: f(0),
            seed: f(1),
            projected_grad: f64::from_bits(f(2)),
            loss_plus: f64::from_bits(f(3)),
            loss_minus: f64::from_bits(f(4)),
            lr: f64::from_bits(f(5)),
        })
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
    pub fn in_tree(tree: sled::Tree) -> Self {
        Self { tree, _db: None }
    }

    /// Append one step and flush it to disk.
    pub fn append(&self, rec: &StepRecord) -> Result<()> {
        self.tree
            .insert(rec.step.to_be_bytes(), rec.to_bytes().to_vec())?;
        self.tree.flush().context("flushing the seed log")?;
        Ok(())
    }

    /// Insert without flushing (the daemon flushes once per batch of records).
    pub fn insert(&self, rec: &StepRecord) -> Result<()> {
        self.tree
            .insert(rec.step.to_be_bytes(), rec.to_bytes().to_vec())?;
        Ok(())
    }

    pub fn flush(&self) -> Result<()> {
        self.tree.flush().context("flushing the seed log")?;
        Ok(())
    }

    /// The records of steps 0, 1, 2, … up to the first gap or unreadable record.
    pub fn contiguous(&self) -> Result<Vec<StepRecord>> {
        let mut out = Vec::new();
        for item in self.tree.iter() {
            let (k, v) = item?;
            let Ok(key) = <[u8; 8]>::try_from(k.as_ref()) else {
                break;
            };
            let Some(rec) = StepRecord::from_bytes(&v) else {
                break;
            };
            if u64::from_be_bytes(key) != out.len() as u64 || rec.step != out.len() as u64 {
                break;
            }
            out.push(rec);
        }
        Ok(out)
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
        }
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
