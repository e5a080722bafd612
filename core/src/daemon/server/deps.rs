//! Jobs that wait for other jobs (`after:` in a job file, `mezod submit
//! --after`).
//!
//! At intake a file's `after:` is resolved to ids, each one of a job that
//! exists then and belongs to the file's owner (root may name anyone's): an
//! id as given, a name as the owner's newest job of that name.  Anything
//! else rejects the file with the reason.  Because every id a job waits for
//! existed before the job was recorded, it is lower than the job's own id,
//! and no chain of dependencies can ever lead back to where it started: the
//! daemon needs no cycle check.
//!
//! A queued job is a candidate for admission only once every job it waits
//! for is `done` (done is final: a done job is never restarted, so each is
//! dropped from the record once seen, and a `mezod clean` of it later
//! changes nothing).  If one of them fails or is cancelled, the job fails at
//! once with that reason instead of waiting forever; `mezod restart` of the
//! dependency, then of the job, runs both again.

use super::*;
use crate::spec::JobRef;

/// What a queued job's dependencies allow.
pub(super) enum Gate {
    /// All done (or none): admission may consider it.
    Open,
    /// Why it waits (`waiting for job 7 (running)`).
    Wait(String),
    /// Why it can never run (`job 7 it depends on was cancelled`).
    Fail(String),
}

impl Daemon {
    /// The ids `after` names for a file of `uid`, or why the file is
    /// refused.  The outer `Err` is the daemon's own failure (its database),
    /// not the file's: the file then waits for the next pass.
    pub(super) fn resolve_after(
        &self,
        uid: u32,
        after: &[JobRef],
    ) -> Result<Result<Vec<u64>, String>> {
        let mut ids = Vec::new();
        for r in after {
            let id = match r {
                JobRef::Id(id) => match self.table.get(*id)? {
                    None => {
                        return Ok(Err(format!(
                            "after: there is no job {id} (a job may wait only for jobs that \
                             exist when it is submitted)"
                        )))
                    }
                    Some(job) if !self.may_wait_for(uid, &job) => {
                        return Ok(Err(format!(
                            "after: job {id} belongs to another user; a job may wait only for \
                             its owner's own jobs"
                        )))
                    }
                    Some(_) => *id,
                },
                JobRef::Name(name) => match self.table.newest_named(uid, name) {
                    Some(id) => id,
                    None => {
                        return Ok(Err(format!(
                            "after: you have no job named {name:?} (`mezod status` lists \
                             your jobs and their names)"
                        )))
                    }
                },
            };
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        Ok(Ok(ids))
    }

    /// May a file of `uid` wait for `job`?  Its own jobs; root, anyone's (as
    /// may anyone with a daemon that is not root, which runs one user's jobs).
    fn may_wait_for(&self, uid: u32, job: &JobRecord) -> bool {
        uid == 0 || !self.as_root || job.owner_uid == uid
    }

    /// Whether queued `job` may be admitted as far as its dependencies go.
    /// Those seen done are dropped from its record.
    pub(super) fn gate(&mut self, job: &JobRecord) -> Result<Gate> {
        if job.after.is_empty() {
            return Ok(Gate::Open);
        }
        let mut waiting = Vec::new();
        for &dep in &job.after {
            let Some(d) = self.table.get(dep)? else {
                // Only an ended job is cleaned, and a done one would have
                // been dropped here before: this one ended otherwise, or
                // was cleaned before this pass saw it done.
                return Ok(Gate::Fail(format!(
                    "job {dep} it depends on was forgotten (`mezod clean`) before it was seen \
                     done"
                )));
            };
            match d.state {
                JobState::Done { .. } => {}
                JobState::Failed { .. } => {
                    return Ok(Gate::Fail(format!("job {dep} it depends on failed")))
                }
                JobState::Cancelled { .. } => {
                    return Ok(Gate::Fail(format!("job {dep} it depends on was cancelled")))
                }
                ref s => waiting.push((dep, s.name())),
            }
        }
        if waiting.len() != job.after.len() {
            if let Some(mut rec) = self.table.get(job.id)? {
                rec.after = waiting.iter().map(|(id, _)| *id).collect();
                self.table.put(&rec)?;
            }
        }
        if waiting.is_empty() {
            return Ok(Gate::Open);
        }
        let each: Vec<String> = waiting
            .iter()
            .map(|(id, state)| format!("job {id} ({state})"))
            .collect();
        Ok(Gate::Wait(format!("waiting for {}", each.join(" and "))))
    }
}

/// `job 7` or `jobs 7, 9`.
pub(super) fn describe_ids(ids: &[u64]) -> String {
    let list: Vec<String> = ids.iter().map(u64::to_string).collect();
    match ids.len() {
        1 => format!("job {}", list[0]),
        _ => format!("jobs {}", list.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::admission::ScriptedProbe;

    /// A daemon whose CPU pool has room for no job (so a candidate waits
    /// for memory and says so), with no worker ever started.
    fn daemon() -> (Daemon, Receiver<Event>, tempfile::TempDir) {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let probe = ScriptedProbe {
            cpu_available: 0,
            cpu_total: 1 << 40,
            ..Default::default()
        };
        let (daemon, rx) = super::super::tests::test_daemon(root, DaemonConfig::default(), probe);
        (daemon, rx, tmp)
    }

    /// Job `id` of `owner` called `name`, in `state`, waiting for `after`.
    fn put(d: &Daemon, id: u64, owner: u32, name: &str, state: &str, after: &[u64]) {
        let job: JobRecord = serde_json::from_value(serde_json::json!({
            "id": id, "name": name, "owner_uid": owner, "owner_gid": owner,
            "state": state, "finished_at": 1, "by_uid": owner, "pool": "cpu", "since": 1,
            "after": after,
            "priority": 0, "wants_gpu": false, "steps_total": 10, "steps_done": 0,
            "submitted_at": 0, "attempts": 0, "failures": 0, "gpus": [],
            "reason": "queued", "estimate_bytes": 1, "peak_bytes": 0
        }))
        .unwrap();
        d.table.put_durable(&job).unwrap();
        JobDir::prepare(&d.jobs, &d.dirs.jobs(), id, None).unwrap();
    }

    fn job(d: &Daemon, id: u64) -> JobRecord {
        d.table.get(id).unwrap().unwrap()
    }

    /// Names and ids resolve to the owner's jobs (a name to its newest);
    /// an unknown one, or another user's, refuses the file with the reason.
    #[test]
    fn after_resolves_to_the_owners_jobs_only() {
        let (d, _rx, _tmp) = daemon();
        put(&d, 1, 1000, "prep", "done", &[]);
        put(&d, 2, 1000, "prep", "running", &[]);
        put(&d, 3, 2000, "theirs", "queued", &[]);
        let resolve = |uid, after: &[JobRef]| d.resolve_after(uid, after).unwrap();
        let name = |n: &str| JobRef::Name(n.into());
        assert_eq!(
            resolve(1000, &[JobRef::Id(1), name("prep"), JobRef::Id(2)]),
            Ok(vec![1, 2])
        );
        assert_eq!(resolve(1000, &[]), Ok(vec![]));
        let why = resolve(1000, &[JobRef::Id(9)]).unwrap_err();
        assert!(why.contains("there is no job 9"), "{why}");
        let why = resolve(1000, &[name("theirs")]).unwrap_err();
        assert!(why.contains("no job named \"theirs\""), "{why}");
        let theirs = resolve(1000, &[JobRef::Id(3)]);
        if d.as_root {
            let why = theirs.unwrap_err();
            assert!(why.contains("job 3 belongs to another user"), "{why}");
            assert_eq!(
                resolve(0, &[JobRef::Id(3)]),
                Ok(vec![3]),
                "root names anyone's"
            );
        } else {
            // A daemon of one user runs that user's files alone.
            assert_eq!(theirs, Ok(vec![3]));
        }
    }

    /// A job waiting for others is no candidate until they are all done,
    /// and says what it waits for; one whose dependency failed or was
    /// cancelled fails at once with that reason; a dependency seen done is
    /// dropped, so cleaning it later changes nothing.
    #[test]
    fn a_job_waits_for_its_dependencies_and_fails_with_them() {
        let (mut d, _rx, _tmp) = daemon();
        put(&d, 1, 1000, "a", "running", &[]);
        put(&d, 2, 1000, "b", "done", &[]);
        put(&d, 3, 1000, "c", "cancelled", &[]);
        put(&d, 4, 1000, "d", "failed", &[]);
        put(&d, 5, 1000, "after-a-b", "queued", &[1, 2]);
        put(&d, 6, 1000, "after-b", "queued", &[2]);
        put(&d, 7, 1000, "after-a-c", "queued", &[1, 3]);
        put(&d, 8, 1000, "after-d", "queued", &[4]);
        d.schedule().unwrap();
        let j5 = job(&d, 5);
        assert!(
            matches!(j5.state, JobState::Queued { .. }),
            "{:?}",
            j5.state
        );
        assert_eq!(j5.reason, "waiting for job 1 (running)");
        assert_eq!(j5.after, vec![1], "job 2 is done: dropped");
        // Its dependencies done, job 6 is a candidate: it waits for memory.
        let j6 = job(&d, 6);
        assert!(j6.after.is_empty() && !j6.reason.contains("waiting for job"));
        assert!(j6.reason.contains("free"), "{}", j6.reason);
        let j7 = job(&d, 7);
        assert!(
            matches!(j7.state, JobState::Failed { .. }),
            "{:?}",
            j7.state
        );
        assert_eq!(j7.reason, "job 3 it depends on was cancelled");
        assert_eq!(job(&d, 8).reason, "job 4 it depends on failed");
        // Job 1 ends done; then it and job 2 are cleaned: job 5 goes on.
        let mut j1 = job(&d, 1);
        j1.state = JobState::Done {
            finished_at: 2,
            result: None,
        };
        d.table.put(&j1).unwrap();
        d.schedule().unwrap();
        assert!(job(&d, 5).after.is_empty());
        d.table.remove(&job(&d, 1)).unwrap();
        d.table.remove(&job(&d, 2)).unwrap();
        d.schedule().unwrap();
        let j5 = job(&d, 5);
        assert!(
            matches!(j5.state, JobState::Queued { .. }),
            "{:?}",
            j5.state
        );
        assert!(!j5.reason.contains("job 1"), "{}", j5.reason);
        // A dependency forgotten before it was seen done fails the job.
        put(&d, 9, 1000, "e", "queued", &[]);
        put(&d, 10, 1000, "after-e", "queued", &[9]);
        d.table.remove(&job(&d, 9)).unwrap();
        d.schedule().unwrap();
        assert!(job(&d, 10)
            .reason
            .contains("job 9 it depends on was forgotten"));
    }
}
