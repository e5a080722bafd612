//! The metrics file's figures, from the daemon's state: its job table's
//! counts (kept in the table's index, so a write costs what users and
//! states cost, not a scan of every job), the pools as the last admission
//! pass saw them, the fair-share ledger, intake.  What the file is and how it
//! is written: [`crate::daemon::metrics`].

use super::*;
use crate::daemon::metrics::{MetricsFile, PoolFigures, Snapshot};

impl Daemon {
    /// What the metrics file says now (`up`: false in the last write of a
    /// clean stop).
    pub(super) fn metrics_snapshot(&self, up: bool) -> Snapshot {
        let mut names: HashMap<u32, String> = HashMap::new();
        let mut user = |uid: u32| {
            names
                .entry(uid)
                .or_insert_with(|| crate::identity::name_of(uid).unwrap_or_else(|| uid.to_string()))
                .clone()
        };
        let mut s = Snapshot {
            version: env!("CARGO_PKG_VERSION").to_string(),
            up,
            ..Default::default()
        };
        let (counts, preemptions) = self.table.tally();
        for (uid, state, n) in counts {
            s.add_jobs(&user(uid), state, n as u64, &control::STATES);
        }
        s.preemptions = Some(preemptions);
        if let Some(res) = &self.resources {
            let ours = |pool: &Pool| {
                self.running.values().fold((0u64, 0u64), |(bytes, n), r| {
                    // A replicated job reserves its estimate per replica here.
                    let here = r.holds(pool) as u64;
                    (
                        bytes.saturating_add(r.estimate.saturating_mul(here)),
                        n + u64::from(here > 0),
                    )
                })
            };
            for g in &res.gpus {
                let (reserved_bytes, running_jobs) = ours(&Pool::Gpu(g.uuid.clone()));
                s.pools.push(PoolFigures {
                    name: g.label(),
                    uuid: Some(g.uuid.clone()),
                    total_bytes: g.total_bytes,
                    free_bytes: g.free_bytes,
                    reserved_bytes,
                    running_jobs,
                });
            }
            let (reserved_bytes, running_jobs) = ours(&Pool::Cpu);
            s.pools.push(PoolFigures {
                name: "CPU".into(),
                uuid: None,
                total_bytes: res.cpu_total,
                free_bytes: res.cpu_available,
                reserved_bytes,
                running_jobs,
            });
        }
        for (uid, u) in self.ledger.all(now_f64()) {
            *s.usage.entry(user(uid)).or_insert(0.0) += u;
        }
        s.intake_backlog = self.files_waiting().map(|n| n as u64);
        s.intake_checking = self.checking.len() as u64;
        s.disk_low = self.disk.low().is_some();
        s
    }

    /// Files in `new/` that may be jobs and are not being checked (a
    /// listing only: nothing is renamed or read).
    fn files_waiting(&self) -> Option<usize> {
        let entries = std::fs::read_dir(self.spool.new_dir()).ok()?;
        Some(
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !super::super::spool::is_ignored(n) && !self.checking.contains_key(n))
                .count(),
        )
    }

    /// Write the metrics file if it is due (`metrics_file:`, followed across
    /// a reload of the config); `up: false` writes it now, the last time.
    pub(super) fn write_metrics(&self, file: &mut Option<MetricsFile>, up: bool) {
        if file.as_ref().map(|f| f.path()) != self.cfg.metrics_file.as_deref() {
            *file = self.cfg.metrics_file.clone().map(MetricsFile::new);
        }
        if let Some(f) = file.as_mut().filter(|f| f.due() || !up) {
            f.write(&self.metrics_snapshot(up));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::admission::ScriptedProbe;

    fn record(id: u64, owner: u32) -> JobRecord {
        serde_json::from_value(serde_json::json!({
            "id": id, "name": format!("j{id}"), "owner_uid": owner, "owner_gid": owner,
            "state": "queued", "priority": 0, "wants_gpu": false, "steps_total": 10,
            "steps_done": 0, "submitted_at": 0, "attempts": 0, "failures": 0,
            "gpus": [], "reason": "queued", "estimate_bytes": 1, "peak_bytes": 0
        }))
        .unwrap()
    }

    /// The counts follow every write and removal of the table (a job that
    /// ends, one restarted, one cleaned), and survive a reopen; a user
    /// the user database does not know is its uid; preemptions only grow.
    #[test]
    fn the_snapshot_follows_the_job_table() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let cfg = DaemonConfig {
            metrics_file: Some(root.join("mezod.prom")),
            ..DaemonConfig::default()
        };
        let (mut daemon, _rx) =
            super::super::tests::test_daemon(root, cfg, ScriptedProbe::default());
        // 4294967 is no one (a uid far past any system's users).
        let stranger = 4_294_967u32;
        let root_name = crate::identity::name_of(0).unwrap_or_else(|| "0".into());
        let mut jobs: Vec<JobRecord> = (1..=4).map(|id| record(id, 0)).collect();
        jobs.push(record(5, stranger));
        for j in &jobs {
            daemon.table.put(j).unwrap();
        }
        jobs[0].apply(Transition::Fail { at: 1 }).unwrap();
        jobs[1]
            .apply(Transition::Cancel { at: 1, by_uid: 0 })
            .unwrap();
        jobs[2].preemptions = 2;
        for j in &jobs[..3] {
            daemon.table.put(j).unwrap();
        }
        let count = |d: &Daemon, user: &str, state: &str| {
            d.metrics_snapshot(true).jobs[&(user.to_string(), state.to_string())]
        };
        assert_eq!(count(&daemon, &root_name, "queued"), 2);
        assert_eq!(count(&daemon, &root_name, "failed"), 1);
        assert_eq!(count(&daemon, &root_name, "cancelled"), 1);
        assert_eq!(count(&daemon, &root_name, "done"), 0);
        assert_eq!(count(&daemon, &stranger.to_string(), "queued"), 1);
        // Restarted, then cleaned.
        jobs[0].apply(Transition::Restart).unwrap();
        daemon.table.put(&jobs[0]).unwrap();
        daemon.table.remove(&jobs[1]).unwrap();
        daemon.table.remove(&jobs[2]).unwrap();
        let s = daemon.metrics_snapshot(true);
        assert_eq!(count(&daemon, &root_name, "queued"), 2);
        assert_eq!(count(&daemon, &root_name, "failed"), 0);
        assert_eq!(count(&daemon, &root_name, "cancelled"), 0);
        assert_eq!(
            s.preemptions,
            Some(2),
            "a counter does not drop with a clean"
        );
        // What a reopened table counts is what it holds.
        daemon.table.flush().unwrap();
        let reopened = JobTable::open(&daemon.db).unwrap();
        let (mut counts, _) = reopened.tally();
        counts.sort();
        assert_eq!(counts, vec![(0, "queued", 2), (stranger, "queued", 1)]);
        // No probe has answered yet: no pools; the spool is empty.
        assert!(s.pools.is_empty());
        assert_eq!(s.intake_backlog, Some(0));
        std::fs::write(daemon.spool.new_dir().join("a.yaml"), "x").unwrap();
        std::fs::write(daemon.spool.new_dir().join(".hidden"), "x").unwrap();
        assert_eq!(daemon.metrics_snapshot(true).intake_backlog, Some(1));
        // Written at once, then not again before it is due; the last
        // write of a stop at once, saying so.
        let mut file = None;
        daemon.write_metrics(&mut file, true);
        let path = root.join("mezod.prom");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\nmezod_up 1\n"), "{text}");
        std::fs::remove_file(&path).unwrap();
        daemon.write_metrics(&mut file, true);
        assert!(!path.exists());
        daemon.write_metrics(&mut file, false);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\nmezod_up 0\n"), "{text}");
        // The file follows the config (a reload).
        daemon.cfg.metrics_file = Some(root.join("other.prom"));
        daemon.write_metrics(&mut file, true);
        assert!(root.join("other.prom").exists());
    }
}
