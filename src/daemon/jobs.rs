//! The job table: one record per job in the daemon's sled database.
//!
//! States: `queued → admitted → running → done | failed | cancelled`, and
//! `running → preempted → queued` when the daemon stops gracefully.  Ids come
//! from the daemon (a counter in the database), never from file names.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Admitted,
    Running,
    Preempted,
    Done,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Done | JobState::Failed | JobState::Cancelled
        )
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = serde_json::to_value(self).expect("a state serializes");
        f.write_str(s.as_str().unwrap_or("?"))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: u64,
    /// The file name it had in the spool.
    pub name: String,
    pub owner_uid: u32,
    pub owner_gid: u32,
    pub state: JobState,
    pub priority: i32,
    pub wants_gpu: bool,
    pub steps_total: u64,
    /// Steps durably in the seed log.
    pub steps_done: u64,
    pub last_loss: Option<f64>,
    /// Unix seconds.
    pub submitted_at: u64,
    pub started_at: Option<u64>,
    pub finished_at: Option<u64>,
    /// Worker starts, including retries and resumes after a daemon restart.
    pub attempts: u32,
    /// Crashed attempts counted against the retry limit.
    pub failures: u32,
    /// Do not admit before this time (retry backoff).
    pub not_before: Option<u64>,
    /// GPU UUIDs (empty for CPU jobs).
    pub gpus: Vec<String>,
    /// Why it waits, why it failed, or how it ended.
    pub reason: String,
    pub estimate_bytes: u64,
    /// Largest memory its worker was seen to hold (sampled by the daemon).
    pub peak_bytes: u64,
    /// The dev metric summary from result.json, once done.
    pub result: Option<serde_json::Value>,
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Job records in sled, keyed by big-endian id.
pub struct JobTable {
    db: sled::Db,
    jobs: sled::Tree,
}

impl JobTable {
    pub fn open(db: &sled::Db) -> Result<Self> {
        Ok(Self {
            db: db.clone(),
            jobs: db.open_tree("jobs")?,
        })
    }

    /// A fresh id, never handed out before (sled's monotonic counter survives crashes).
    pub fn next_id(&self) -> Result<u64> {
        Ok(self.db.generate_id()? + 1)
    }

    pub fn put(&self, job: &JobRecord) -> Result<()> {
        self.jobs
            .insert(job.id.to_be_bytes(), serde_json::to_vec(job)?)?;
        Ok(())
    }

    /// Write and make durable (state changes a crash must not forget).
    pub fn put_durable(&self, job: &JobRecord) -> Result<()> {
        self.put(job)?;
        self.db.flush().context("flushing the job table")?;
        Ok(())
    }

    pub fn get(&self, id: u64) -> Result<Option<JobRecord>> {
        self.jobs
            .get(id.to_be_bytes())?
            .map(|v| serde_json::from_slice(&v).context("reading a job record"))
            .transpose()
    }

    /// Every job, in id order.
    pub fn all(&self) -> Result<Vec<JobRecord>> {
        self.jobs
            .iter()
            .values()
            .map(|v| Ok(serde_json::from_slice(&v?)?))
            .collect()
    }

    pub fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }
}
