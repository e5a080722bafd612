//! A daemon under test (real processes, its own folders), as the daemon and
//! red-team tests drive it.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::*;

pub struct Daemon {
    pub root: PathBuf,
    pub child: Option<Child>,
    pub starts: usize,
}

impl Daemon {
    pub fn start(root: &Path, config: &str) -> Self {
        Self::start_with_env(root, config, &[])
    }

    pub fn start_with_env(root: &Path, config: &str, env: &[(&str, String)]) -> Self {
        std::fs::write(root.join("daemon.yaml"), config).unwrap();
        let mut d = Daemon {
            root: root.to_path_buf(),
            child: None,
            starts: 0,
        };
        d.restart(env);
        d
    }

    pub fn restart(&mut self, env: &[(&str, String)]) {
        self.starts += 1;
        let env: Vec<(&str, &std::ffi::OsStr)> =
            env.iter().map(|(k, v)| (*k, v.as_ref())).collect();
        let log = self.root.join(format!("daemon-{}.log", self.starts));
        self.child = Some(spawn_daemon(&self.root, &env, &log));
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.join(format!("daemon-{}.log", self.starts)))
            .unwrap_or_default()
    }

    pub fn socket(&self) -> PathBuf {
        self.root.join("run/mezod.sock")
    }

    pub fn spool(&self) -> PathBuf {
        self.root.join("spool")
    }

    pub fn job_dir(&self, id: u64) -> PathBuf {
        self.root.join("state/jobs").join(id.to_string())
    }

    pub fn weights_sha(&self, id: u64) -> String {
        sha256(&self.job_dir(id).join("run/model/model.safetensors"))
    }

    /// Job `id` exported the weights an uninterrupted `mezod run` of `job`
    /// exports (see [`solo_sha`]); on a mismatch, the message says where the
    /// two runs parted (first differing step record or evaluation) and shows
    /// the daemon's log, so that a rare failure explains itself.
    pub fn assert_same_weights(&self, id: u64, job: &Path, why: &str) {
        let solo = job.with_extension("solo");
        let (ours, theirs) = (
            self.job_dir(id).join("run/model/model.safetensors"),
            solo.join("model/model.safetensors"),
        );
        assert!(
            ours.is_file(),
            "{why}: job {id} exported nothing\njob: {:#}\ndaemon log:\n{}",
            self.job(id),
            self.log()
        );
        if sha256(&ours) == sha256(&theirs) {
            return;
        }
        let run = self.job_dir(id).join("run");
        panic!(
            "{why}: job {id} exported other weights than `mezod run` did\n{}\njob: {:#}\ndaemon log:\n{}",
            first_difference(&solo, &run),
            self.job(id),
            self.log()
        );
    }

    /// `mezod submit`, as a user types it; returns the job id.
    pub fn submit(&self, job: &Path) -> u64 {
        submit_to(&self.socket(), job)
    }

    pub fn jobs(&self) -> Vec<Value> {
        daemon_jobs(&self.socket())
    }

    pub fn job(&self, id: u64) -> Value {
        self.jobs()
            .into_iter()
            .find(|j| j["id"] == id)
            .unwrap_or_else(|| panic!("no job {id}"))
    }

    pub fn wait_until(&self, what: &str, mut ok: impl FnMut(&Daemon) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(180);
        while !ok(self) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; jobs: {:#?}\ndaemon log:\n{}",
                self.jobs(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn wait_done(&self, id: u64) -> Value {
        self.wait_until(&format!("job {id} to end"), |d| {
            d.job(id)["state"]
                .as_str()
                .is_some_and(|s| ["done", "failed", "cancelled"].contains(&s))
        });
        self.job(id)
    }

    pub fn wait_steps(&self, id: u64, steps: u64) {
        self.wait_until(&format!("job {id} at step {steps}"), |d| {
            d.job(id)["steps_done"].as_u64().unwrap() >= steps
        });
    }

    pub fn kill9(&mut self) {
        let mut c = self.child.take().unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
    }

    pub fn term(&mut self) -> (ExitStatus, Duration) {
        let mut c = self.child.take().unwrap();
        let t = Instant::now();
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        (c.wait().unwrap(), t.elapsed())
    }
}

impl Drop for Daemon {
    /// SIGTERM first (the daemon then removes what it made outside its
    /// folders, such as its jobs' cgroup folder), SIGKILL after 5 s.
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A causal-LM job file named `name` (absolute paths; one thread).
pub fn job_file(dir: &Path, name: &str, steps: u64, seed: u64) -> PathBuf {
    let p = causal_job(
        dir,
        "llama",
        &format!("steps: {steps}, batch_size: 4, lr: 2.0e-3, eps: 1.0e-3, seed: {seed}, eval_every: 40, snapshot_every: 25"),
    );
    let target = dir.join(format!("{name}.yaml"));
    std::fs::rename(p, &target).unwrap();
    target
}

/// SHA-256 of the weights an uninterrupted `mezod run` of `job` exports.
pub fn solo_sha(job: &Path) -> String {
    let out = job.with_extension("solo");
    run_to_end(job, &out, "solo run");
    sha256(&out.join("model/model.safetensors"))
}

/// Where two runs' metrics.jsonl files first differ: a step record (seed,
/// losses, projected gradient, batch) or an evaluation.
pub fn first_difference(a: &Path, b: &Path) -> String {
    let lines = |run: &Path| -> Vec<Value> {
        // Read leniently: this explains a failure and must not fail itself.
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|l| l["kind"] == "step" || l["kind"] == "eval")
            .collect()
    };
    let (la, lb) = (lines(a), lines(b));
    for kind in ["step", "eval"] {
        let pick = |l: &[Value]| -> Vec<Value> {
            l.iter().filter(|x| x["kind"] == kind).cloned().collect()
        };
        let (ka, kb) = (pick(&la), pick(&lb));
        if let Some(i) = (0..ka.len().min(kb.len())).find(|&i| ka[i] != kb[i]) {
            return format!(
                "first differing {kind} line ({i}):\n  {}: {}\n  {}: {}",
                a.display(),
                ka[i],
                b.display(),
                kb[i]
            );
        }
        if ka.len() != kb.len() {
            return format!("{} {kind} lines against {}", ka.len(), kb.len());
        }
    }
    "metrics.jsonl files agree (the export itself differs)".into()
}

/// Drop `job` into the spool as user 65534 would: the file's owner is the job's owner.
pub fn drop_as_nobody(d: &Daemon, job: &Path, name: &str) {
    let tmp = d.spool().join("tmp").join(name);
    std::fs::copy(job, &tmp).unwrap();
    std::os::unix::fs::chown(&tmp, Some(65534), Some(65534)).unwrap();
    std::fs::rename(&tmp, d.spool().join("new").join(name)).unwrap();
}

/// A copy of the llama fixture whose weights have file mode `mode`.
pub fn model_copy(dir: &Path, name: &str, mode: u32) -> PathBuf {
    let to = dir.join(name);
    std::fs::create_dir_all(&to).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        if fixture("llama").join(f).exists() {
            std::fs::copy(fixture("llama").join(f), to.join(f)).unwrap();
            std::fs::set_permissions(to.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
    std::fs::set_permissions(
        to.join("model.safetensors"),
        std::fs::Permissions::from_mode(mode),
    )
    .unwrap();
    to
}
