//! The job table: one record per job in the daemon's sled database.
//!
//! A record's state and its moves are the [`lifecycle`](super::lifecycle)'s;
//! ids come from the daemon (a counter in the database), never from file names.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

pub use super::lifecycle::{IllegalTransition, JobState, Transition};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: u64,
    /// What `mezod status` calls it: the job file's `name:`, else the
    /// dropped file's name without its extension.
    pub name: String,
    /// The file name it had in the spool (what `mezod submit` asks about).
    /// Empty in records of older versions, whose `name` was the spool name.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub spool_name: String,
    /// One line about what it runs (model, task, tuning, steps), from its check.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub summary: String,
    pub owner_uid: u32,
    pub owner_gid: u32,
    #[serde(flatten)]
    pub state: JobState,
    pub priority: i32,
    /// Jobs it still waits for (`after:`, resolved to ids at intake; each
    /// is dropped once seen `done`, so that a `mezod clean` of it later
    /// does not leave this one waiting on a job it can no longer see).
    /// Every id is lower than this job's own: a job can wait only for jobs
    /// that existed when its file was taken, so dependencies never form a
    /// cycle.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<u64>,
    pub wants_gpu: bool,
    pub steps_total: u64,
    /// Steps durably in the seed log.
    pub steps_done: u64,
    pub last_loss: Option<f64>,
    /// Unix seconds.
    pub submitted_at: u64,
    /// When its first worker started.
    pub started_at: Option<u64>,
    /// Worker starts, including retries and resumes after a daemon restart.
    pub attempts: u32,
    /// Crashed attempts counted against the retry limit.
    pub failures: u32,
    /// GPU UUIDs (`GPU-…`, or `MIG-…` for a MIG instance; empty for CPU jobs).
    pub gpus: Vec<String>,
    /// The same GPUs as people name them: "GPU 0 (NVIDIA H100 …)", "GPU 0
    /// MIG 2 (… MIG 1g.10gb)".  Empty in records of older versions.
    #[serde(default)]
    pub gpu_labels: Vec<String>,
    /// Why it waits, why it failed, or how it ended.
    pub reason: String,
    pub estimate_bytes: u64,
    /// Largest memory its worker was seen to hold (sampled by the daemon).
    pub peak_bytes: u64,
    /// Times it was stopped at a step boundary for a job of higher priority
    /// and queued again (never counted as a failure).
    #[serde(default)]
    pub preemptions: u32,
    /// How many replicas it may run with (`parallel:`), preferred first;
    /// empty for a job of one process (and in records of older versions).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replica_counts: Vec<usize>,
    /// The replicas of its current (or last) attempt, each on a pool of its
    /// own; 0 for a job of one process.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub replicas: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl JobRecord {
    /// The spool name it was made from (the index key of [`JobTable::find_name`]).
    pub(crate) fn spool_key(&self) -> &str {
        if self.spool_name.is_empty() {
            &self.name
        } else {
            &self.spool_name
        }
    }

    /// Move to the state after `t`, or refuse (the record is then unchanged).
    pub fn apply(&mut self, t: Transition) -> Result<(), IllegalTransition> {
        self.state = self.state.next(t)?;
        Ok(())
    }
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Job records in sled, keyed by big-endian id, with in-memory indexes so that
/// the daemon's loop costs what its *active* jobs cost, however many finished
/// jobs the table holds.
pub struct JobTable {
    db: sled::Db,
    jobs: sled::Tree,
    /// `last_id`: the last id handed out.
    meta: sled::Tree,
    /// spool name → id (what `mezod submit` asks about while it waits).
    names: sled::Tree,
    index: Mutex<Index>,
}

/// Built by one scan at start, then kept up to date by [`JobTable::put`].
#[derive(Default)]
struct Index {
    /// Jobs not yet done, failed or cancelled, as last written: the loop
    /// reads these every turn, without sled reads or JSON decoding.
    active: BTreeMap<u64, JobRecord>,
    /// Every job in the table.
    count: usize,
    /// Records the database refused (a full disk): what the daemon knows,
    /// kept until a reopened database takes them ([`JobTable::unsaved`]).
    unsaved: BTreeMap<u64, JobRecord>,
    /// Jobs that ended since the daemon last asked ([`JobTable::take_ended`]).
    ended: Vec<u64>,
    /// owner → name → ids of every job in the table: what an `after:` name
    /// means, found without reading the table (a file naming a job that
    /// does not exist must not cost a scan of every record).
    by_name: HashMap<u32, HashMap<String, BTreeSet<u64>>>,
    /// Every job's (owner, state, preemptions) as last written, the jobs of
    /// each (owner, state), and preemptions seen since the table was opened
    /// (on top of those its records held then): the metrics file's figures
    /// without a scan of the table.
    tallied: HashMap<u64, (u32, &'static str, u32)>,
    by_owner_state: HashMap<(u32, &'static str), usize>,
    preemptions: u64,
}

impl Index {
    /// Count `job` (written) as it is now, or job `id` out (removed).
    fn tally(&mut self, id: u64, job: Option<&JobRecord>) {
        let now = job.map(|j| (j.owner_uid, j.state.name(), j.preemptions));
        let old = match now {
            Some(k) => self.tallied.insert(id, k),
            None => self.tallied.remove(&id),
        };
        if let Some((owner, state, preemptions)) = old {
            if let Some(n) = self.by_owner_state.get_mut(&(owner, state)) {
                *n -= 1;
                if *n == 0 {
                    self.by_owner_state.remove(&(owner, state));
                }
            }
            if let Some((_, _, p)) = now {
                self.preemptions += u64::from(p.saturating_sub(preemptions));
            }
        } else if let Some((_, _, p)) = now {
            self.preemptions += u64::from(p);
        }
        if let Some((owner, state, _)) = now {
            *self.by_owner_state.entry((owner, state)).or_default() += 1;
        }
    }

    /// File `job` under its owner and name (neither ever changes).
    fn name(&mut self, job: &JobRecord) {
        let names = self.by_name.entry(job.owner_uid).or_default();
        match names.get_mut(job.name.as_str()) {
            Some(ids) => {
                ids.insert(job.id);
            }
            None => {
                names.insert(job.name.clone(), BTreeSet::from([job.id]));
            }
        }
    }

    fn unname(&mut self, job: &JobRecord) {
        if let Some(names) = self.by_name.get_mut(&job.owner_uid) {
            if let Some(ids) = names.get_mut(job.name.as_str()) {
                ids.remove(&job.id);
                if ids.is_empty() {
                    names.remove(job.name.as_str());
                }
            }
        }
    }
}

impl JobTable {
    pub fn open(db: &sled::Db) -> Result<Self> {
        let table = Self {
            db: db.clone(),
            jobs: db.open_tree("jobs")?,
            meta: db.open_tree("meta")?,
            names: db.open_tree("names")?,
            index: Mutex::new(Index::default()),
        };
        let mut index = Index::default();
        for job in table.all()? {
            index.count += 1;
            index.name(&job);
            index.tally(job.id, Some(&job));
            if !job.state.is_final() {
                index.active.insert(job.id, job.clone());
            }
            if !table.names.contains_key(job.spool_key().as_bytes())? {
                table
                    .names
                    .insert(job.spool_key().as_bytes(), &job.id.to_be_bytes())?;
            }
        }
        *table.index.lock().expect("index lock") = index;
        Ok(table)
    }

    /// A fresh id: one more than the last (ids stay consecutive across
    /// restarts, unlike sled's `generate_id`, which jumps ahead on each open).
    /// It becomes durable with the job's record (same database, same flush);
    /// an id whose record was lost to a crash may be handed out again, which
    /// is harmless since nothing refers to it.
    pub fn next_id(&self) -> Result<u64> {
        let highest_job = self.jobs.last()?.map_or(0, |(k, _)| {
            u64::from_be_bytes(k.as_ref().try_into().unwrap_or([0; 8]))
        });
        let id = self
            .meta
            .update_and_fetch("last_id", |old| {
                let last = old.map_or(0, |v| u64::from_be_bytes(v.try_into().unwrap_or([0; 8])));
                Some((last.max(highest_job) + 1).to_be_bytes().to_vec())
            })?
            .expect("just set");
        Ok(u64::from_be_bytes(id.as_ref().try_into()?))
    }

    pub fn put(&self, job: &JobRecord) -> Result<()> {
        let mut index = self.index.lock().expect("index lock");
        // The index follows what the daemon decided even when the disk
        // refuses the write: status stays true and a reopened database gets
        // the record then.
        index.name(job);
        index.tally(job.id, Some(job));
        if job.state.is_final() {
            if index.active.remove(&job.id).is_some() {
                index.ended.push(job.id);
            }
        } else {
            index.active.insert(job.id, job.clone());
        }
        let written = serde_json::to_vec(job)
            .map_err(anyhow::Error::from)
            .and_then(|bytes| Ok(self.jobs.insert(job.id.to_be_bytes(), bytes)?));
        let old = match written {
            Ok(old) => old,
            Err(e) => {
                index.unsaved.insert(job.id, job.clone());
                return Err(e);
            }
        };
        index.unsaved.remove(&job.id);
        if old.is_none() {
            index.count += 1;
            drop(index);
            self.names
                .insert(job.spool_key().as_bytes(), &job.id.to_be_bytes())?;
        }
        Ok(())
    }

    /// The jobs that ended (moved from active to done, failed or cancelled)
    /// since the last call, in the order they ended: each end is told once.
    pub(crate) fn take_ended(&self) -> Vec<u64> {
        std::mem::take(&mut self.index.lock().expect("index lock").ended)
    }

    /// Records the database refused, for a reopened one.
    pub(crate) fn unsaved(&self) -> Vec<JobRecord> {
        let index = self.index.lock().expect("index lock");
        index.unsaved.values().cloned().collect()
    }

    /// Write and make durable (state changes a crash must not forget).
    pub fn put_durable(&self, job: &JobRecord) -> Result<()> {
        self.put(job)?;
        self.db.flush().context("flushing the job table")?;
        Ok(())
    }

    pub fn get(&self, id: u64) -> Result<Option<JobRecord>> {
        let index = self.index.lock().expect("index lock");
        if let Some(job) = index.active.get(&id).or_else(|| index.unsaved.get(&id)) {
            return Ok(Some(job.clone()));
        }
        drop(index);
        self.jobs
            .get(id.to_be_bytes())?
            .map(|v| serde_json::from_slice(&v).context("reading a job record"))
            .transpose()
    }

    /// The jobs not yet ended, in id order (the loop's working set).
    pub(crate) fn active(&self) -> Result<Vec<JobRecord>> {
        Ok(self
            .index
            .lock()
            .expect("index lock")
            .active
            .values()
            .cloned()
            .collect())
    }

    /// Up to `n` ended jobs, newest first.
    pub fn recent_finished(&self, n: usize) -> Result<Vec<JobRecord>> {
        Ok(self.recent_finished_matching(n, None)?.0)
    }

    /// Up to `n` ended jobs that pass `keep` (all, without it), newest
    /// first, and how many more pass it.  Without `keep` the count comes
    /// from the index and the scan stops at `n`; with it every ended job is
    /// read once.
    pub(crate) fn recent_finished_matching(
        &self,
        n: usize,
        keep: Option<&dyn Fn(&JobRecord) -> bool>,
    ) -> Result<(Vec<JobRecord>, usize)> {
        let mut out = Vec::new();
        let mut more = 0;
        for entry in self.jobs.iter().rev() {
            if out.len() >= n && keep.is_none() {
                break;
            }
            let (_, v) = entry?;
            let job: JobRecord = serde_json::from_slice(&v).context("reading a job record")?;
            if !job.state.is_final() || !keep.is_none_or(|k| k(&job)) {
                continue;
            }
            if out.len() < n {
                out.push(job);
            } else {
                more += 1;
            }
        }
        if keep.is_none() {
            let (count, active) = self.counts();
            more = count.saturating_sub(active + out.len());
        }
        Ok((out, more))
    }

    /// Forget an ended job: its record and its spool name (its seed log
    /// and folder are the caller's to remove).
    pub fn remove(&self, job: &JobRecord) -> Result<()> {
        let mut index = self.index.lock().expect("index lock");
        if self.jobs.remove(job.id.to_be_bytes())?.is_some() {
            index.count = index.count.saturating_sub(1);
        }
        index.active.remove(&job.id);
        index.unsaved.remove(&job.id);
        index.unname(job);
        index.tally(job.id, None);
        drop(index);
        self.names.remove(job.spool_key().as_bytes())?;
        Ok(())
    }

    /// (jobs in the table, of which active).
    pub fn counts(&self) -> (usize, usize) {
        let index = self.index.lock().expect("index lock");
        (index.count, index.active.len())
    }

    /// How many jobs each (owner, state) has in the table, and the
    /// preemptions its jobs had when it was opened plus those seen since
    /// (never less while it is open, also after a `clean`).
    pub(crate) fn tally(&self) -> (Vec<(u32, &'static str, usize)>, u64) {
        let index = self.index.lock().expect("index lock");
        let counts = index
            .by_owner_state
            .iter()
            .map(|(&(owner, state), &n)| (owner, state, n))
            .collect();
        (counts, index.preemptions)
    }

    /// The job made from the spool file `name`, if any.
    pub(crate) fn find_name(&self, name: &str) -> Result<Option<JobRecord>> {
        match self.names.get(name.as_bytes())? {
            Some(id) => self.get(u64::from_be_bytes(id.as_ref().try_into()?)),
            None => Ok(None),
        }
    }

    /// The newest job of `owner` called `name` (what an `after:` name
    /// means), from the in-memory index.
    pub(crate) fn newest_named(&self, owner: u32, name: &str) -> Option<u64> {
        let index = self.index.lock().expect("index lock");
        index
            .by_name
            .get(&owner)
            .and_then(|names| names.get(name))
            .and_then(|ids| ids.last().copied())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_consecutive_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let ids = |n| {
            let db = sled::open(dir.path()).unwrap();
            let table = JobTable::open(&db).unwrap();
            let ids: Vec<u64> = (0..n).map(|_| table.next_id().unwrap()).collect();
            table.flush().unwrap();
            ids
        };
        assert_eq!(ids(2), vec![1, 2]);
        assert_eq!(ids(1), vec![3]);
        assert_eq!(ids(2), vec![4, 5]);
    }

    fn record(id: u64, state: JobState) -> JobRecord {
        JobRecord {
            id,
            name: format!("job-{id}"),
            spool_name: format!("job-{id}.yaml"),
            summary: String::new(),
            owner_uid: 1000,
            owner_gid: 1000,
            state,
            priority: 0,
            after: vec![],
            wants_gpu: false,
            steps_total: 10,
            steps_done: 0,
            last_loss: None,
            submitted_at: 0,
            started_at: None,
            attempts: 0,
            failures: 0,
            gpus: vec![],
            gpu_labels: vec![],
            reason: String::new(),
            estimate_bytes: 0,
            peak_bytes: 0,
            preemptions: 0,
            replica_counts: vec![],
            replicas: 0,
        }
    }

    #[test]
    fn the_index_follows_states_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            let table = JobTable::open(&db).unwrap();
            for id in 1..=6 {
                let state = if id % 2 == 0 {
                    JobState::Failed { finished_at: 1 }
                } else {
                    JobState::Queued { not_before: None }
                };
                table.put(&record(id, state)).unwrap();
            }
            let ids = |jobs: Vec<JobRecord>| jobs.iter().map(|j| j.id).collect::<Vec<_>>();
            assert_eq!(ids(table.active().unwrap()), vec![1, 3, 5]);
            assert_eq!(table.counts(), (6, 3));
            // A job that ends leaves the working set; newest finished first.
            table
                .put(&record(3, JobState::Failed { finished_at: 2 }))
                .unwrap();
            assert_eq!(ids(table.active().unwrap()), vec![1, 5]);
            assert_eq!(table.take_ended(), vec![3], "each end told once");
            assert!(table.take_ended().is_empty());
            assert_eq!(ids(table.recent_finished(2).unwrap()), vec![6, 4]);
            assert_eq!(ids(table.recent_finished(10).unwrap()), vec![6, 4, 3, 2]);
            assert_eq!(table.find_name("job-4.yaml").unwrap().unwrap().id, 4);
            assert!(table.find_name("nope").unwrap().is_none());
            table.flush().unwrap();
        }
        let db = sled::open(dir.path()).unwrap();
        let table = JobTable::open(&db).unwrap();
        assert_eq!(table.counts(), (6, 2));
        assert_eq!(table.find_name("job-5.yaml").unwrap().unwrap().id, 5);
        // Filtered: the newest matching, and how many more match.
        let odd = |j: &JobRecord| j.id % 2 == 1;
        let (some, more) = table.recent_finished_matching(1, Some(&odd)).unwrap();
        assert_eq!((some[0].id, more), (3, 0));
        let (_, more) = table.recent_finished_matching(1, None).unwrap();
        assert_eq!(more, 3);
        // Forgotten: gone from the table, its count and its spool name.
        table.remove(&table.get(4).unwrap().unwrap()).unwrap();
        assert_eq!(table.counts(), (5, 2));
        assert!(table.get(4).unwrap().is_none());
        assert!(table.find_name("job-4.yaml").unwrap().is_none());
        assert_eq!(table.next_id().unwrap(), 7, "ids are never reused");
    }

    /// An `after:` name is the owner's newest job of that name, ended or
    /// not; another owner's job of that name is not it.
    #[test]
    fn a_name_finds_the_owners_newest_job_of_that_name() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let table = JobTable::open(&db).unwrap();
        let named = |id: u64, owner: u32, name: &str, state: JobState| {
            let mut r = record(id, state);
            r.owner_uid = owner;
            r.name = name.into();
            table.put(&r).unwrap();
        };
        let done = || JobState::Done {
            finished_at: 1,
            result: None,
        };
        named(1, 1000, "prep", done());
        named(2, 1000, "prep", done());
        named(3, 1000, "train", JobState::Queued { not_before: None });
        named(4, 2000, "prep", JobState::Queued { not_before: None });
        named(5, 2000, "other", done());
        assert_eq!(table.newest_named(1000, "prep"), Some(2));
        assert_eq!(table.newest_named(2000, "prep"), Some(4));
        assert_eq!(table.newest_named(1000, "train"), Some(3));
        assert_eq!(table.newest_named(1000, "other"), None);
        named(6, 1000, "prep", JobState::Queued { not_before: None });
        assert_eq!(table.newest_named(1000, "prep"), Some(6));
        // Forgotten: the name means the one before; kept across a reopen.
        table.remove(&table.get(6).unwrap().unwrap()).unwrap();
        assert_eq!(table.newest_named(1000, "prep"), Some(2));
        table.remove(&table.get(3).unwrap().unwrap()).unwrap();
        assert_eq!(table.newest_named(1000, "train"), None);
        table.flush().unwrap();
        let table = JobTable::open(&db).unwrap();
        assert_eq!(table.newest_named(1000, "prep"), Some(2));
        assert_eq!(table.newest_named(2000, "prep"), Some(4));
        // An old record (no `after` field) still loads.
        let mut old = serde_json::to_value(record(7, done())).unwrap();
        old.as_object_mut().unwrap().remove("after");
        let back: JobRecord = serde_json::from_value(old).unwrap();
        assert!(back.after.is_empty());
    }

    /// Records of older versions: `name` was the spool name, and still finds the job.
    #[test]
    fn an_old_record_is_found_by_its_spool_name() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let mut old =
            serde_json::to_value(record(1, JobState::Queued { not_before: None })).unwrap();
        old["name"] = "causal-lm-1796-17693.yaml".into();
        old.as_object_mut().unwrap().remove("spool_name");
        old.as_object_mut().unwrap().remove("summary");
        db.open_tree("jobs")
            .unwrap()
            .insert(1u64.to_be_bytes(), serde_json::to_vec(&old).unwrap())
            .unwrap();
        let table = JobTable::open(&db).unwrap();
        let job = table
            .find_name("causal-lm-1796-17693.yaml")
            .unwrap()
            .unwrap();
        assert_eq!((job.id, job.spool_name.as_str()), (1, ""));
    }
}
