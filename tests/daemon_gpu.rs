//! The daemon in GPU mode, on scripted GPUs: its real `SystemProbe`
//! (nvml-wrapper's loader, `Nvml::init()`, the daemon's admission) runs
//! against the test-only NVML of tests/fake-nvml, whose GPUs, memory and
//! processes each test writes as JSON and rewrites while the daemon runs.
//!
//! No CUDA starts here: the machines that run these tests may have no GPU, and
//! even on one, a worker's `CUDA_VISIBLE_DEVICES` names a scripted GPU that CUDA
//! does not know. So every worker fails when it moves its model to `cuda:0`,
//! and these tests check the daemon's decisions (where a job goes, what its
//! worker is given, why a job waits, what a started job reserves), never a
//! training step on a GPU.

mod common;
use common::*;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mezod::estimate::human_bytes;
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const MARGIN: u64 = 64 * MIB;
/// Failures settle at once (no retries), so a job's end is its first attempt's.
const CONFIG: &str = "jobs_per_gpu: 4\nretry_limit: 0\nretry_backoff_s: 0.2\n\
                      rescan_interval_s: 1\nmemory_margin_mib: 64\n";
const UUID0: &str = "GPU-aaaaaaaa-1111-2222-3333-000000000000";
const UUID1: &str = "GPU-bbbbbbbb-1111-2222-3333-111111111111";
/// pids of other users' processes, beyond any pid_max, so never a worker of ours.
const FOREIGN: u32 = 3_999_999_001;
const FOREIGN2: u32 = 3_999_999_002;

/// The fake NVML, `<target>/<profile>/libnvidia_ml.so`: built with the
/// workspace, or here when only this test was asked for.
fn fake_nvml() -> PathBuf {
    static BUILT: Mutex<()> = Mutex::new(());
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let lib = profile_dir.join("libnvidia_ml.so");
    let _once = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !lib.is_file() {
        let profile = profile_dir.file_name().unwrap().to_str().unwrap();
        let profile = if profile == "debug" { "dev" } else { profile };
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = std::process::Command::new(cargo)
            .args([
                "build",
                "-p",
                "fake-nvml",
                "--profile",
                profile,
                "--target-dir",
            ])
            .arg(profile_dir.parent().unwrap())
            .current_dir(root())
            .output()
            .unwrap();
        check(out, "building tests/fake-nvml");
    }
    assert!(lib.is_file(), "{} was not built", lib.display());
    lib
}

/// One scripted GPU; its free memory is its total less what `processes` hold.
fn gpu(uuid: &str, name: &str, total: u64, processes: &[(u32, u64)]) -> Value {
    let processes: Vec<Value> = processes
        .iter()
        .map(|&(pid, used)| json!({"pid": pid, "used_bytes": used}))
        .collect();
    json!({"uuid": uuid, "name": name, "total_bytes": total, "processes": processes})
}

/// A causal-LM job on the llama fixture that asks for a GPU.
fn gpu_job(dir: &Path, name: &str, seed: u64) -> PathBuf {
    let data = root().join("examples/data/reviews.jsonl");
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &path,
        format!(
            "model: {{path: {}, dtype: f32, threads: 1, device: cuda}}\n\
             task: {{kind: causal_lm}}\n\
             data: {{train: {}, dev: {}, text_field: text, max_dev: 16}}\n\
             mezo: {{steps: 5, batch_size: 4, lr: 1.0e-3, eps: 1.0e-3, seed: {seed}}}\n",
            fixture("llama").display(),
            data.display(),
            data.display()
        ),
    )
    .unwrap();
    path
}

/// What `mezod estimate --gpu` says the job needs on a GPU.
fn gpu_estimate(job: &Path) -> u64 {
    let out = check(
        mezod()
            .args(["estimate", "--gpu", "--json"])
            .arg(job)
            .output()
            .unwrap(),
        "mezod estimate",
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let e = v["total"].as_u64().unwrap();
    // The scripted sizes below are chosen around this (the CUDA context
    // dominates a fixture model's estimate).
    assert!(
        (256 * MIB..GIB).contains(&e),
        "estimate {e}: the scripts assume 256 MiB .. 1 GiB"
    );
    e
}

/// A daemon whose NVML is the fake, serving the GPUs in its script.
struct GpuDaemon {
    root: PathBuf,
    script: PathBuf,
    child: Child,
}

impl GpuDaemon {
    fn start(root: &Path, gpus: Value) -> Self {
        Self::start_with(root, gpus, "")
    }

    /// A daemon whose config is the tests' plus `extra` lines.
    fn start_with(root: &Path, gpus: Value, extra: &str) -> Self {
        let script = root.join("gpus.json");
        write_script(&script, &gpus);
        // nvml-wrapper dlopens the bare name libnvidia-ml.so.1: LD_LIBRARY_PATH finds ours.
        let lib_dir = root.join("nvml");
        std::fs::create_dir_all(&lib_dir).unwrap();
        std::os::unix::fs::symlink(fake_nvml(), lib_dir.join("libnvidia-ml.so.1")).unwrap();
        let ld = match std::env::var("LD_LIBRARY_PATH") {
            Ok(p) if !p.is_empty() => format!("{}:{p}", lib_dir.display()),
            _ => lib_dir.display().to_string(),
        };
        std::fs::write(root.join("daemon.yaml"), format!("{CONFIG}{extra}")).unwrap();
        let engine = gated_engine(root);
        let env = [
            ("LD_LIBRARY_PATH", std::ffi::OsStr::new(&ld)),
            ("MEZOD_FAKE_NVML", script.as_os_str()),
            ("MEZOD_ENGINE", engine.as_os_str()),
        ];
        let child = spawn_daemon(root, &env, &root.join("daemon.log"));
        GpuDaemon {
            root: root.to_path_buf(),
            script,
            child,
        }
    }

    /// Rewrite the GPUs the fake NVML reports, from its next call on.
    fn script(&self, gpus: Value) {
        write_script(&self.script, &gpus);
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.root.join("daemon.log")).unwrap_or_default()
    }

    fn socket(&self) -> PathBuf {
        self.root.join("run/mezod.sock")
    }

    fn job_dir(&self, id: u64) -> PathBuf {
        self.root.join("state/jobs").join(id.to_string())
    }

    fn job_file(&self, id: u64, name: &str) -> String {
        std::fs::read_to_string(self.job_dir(id).join(name)).unwrap_or_default()
    }

    /// `mezod submit`; returns the job id.
    fn submit(&self, job: &Path) -> u64 {
        submit_to(&self.socket(), job)
    }

    /// The status report over the socket, as JSON.
    fn status(&self) -> Value {
        daemon_status(&self.socket())
    }

    /// `mezod status` (or `mezod status --json`) as a user runs it.
    fn status_cli(&self, json: bool) -> String {
        let mut cmd = mezod();
        cmd.arg("status").arg("--socket").arg(self.socket());
        if json {
            cmd.arg("--json");
        }
        String::from_utf8(check(cmd.output().unwrap(), "mezod status").stdout).unwrap()
    }

    fn job(&self, id: u64) -> Value {
        self.status()["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["id"] == id)
            .unwrap_or_else(|| panic!("no job {id}"))
            .clone()
    }

    /// The free memory of GPU `index` the daemon saw on its last pass.
    fn free_seen(&self, index: usize) -> u64 {
        self.status()["pools"][index]["free_bytes"]
            .as_u64()
            .unwrap()
    }

    fn wait_until(&self, what: &str, mut ok: impl FnMut(&GpuDaemon) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ok(self) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; status: {:#}\ndaemon log:\n{}",
                self.status(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_ended(&self, id: u64) -> Value {
        self.wait_until(&format!("job {id} to end"), |d| {
            d.job(id)["state"]
                .as_str()
                .is_some_and(|s| ["done", "failed", "cancelled"].contains(&s))
        });
        self.job(id)
    }
}

impl Drop for GpuDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Written whole and renamed over, so the daemon never reads half a script.
fn write_script(path: &Path, gpus: &Value) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, gpus.to_string()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The reason admission gives when the roomiest GPU lacks memory.
fn lacks(need: u64, gpu: &str, room: u64) -> String {
    format!(
        "needs {} but {gpu} has {} free after reservations and margin",
        human_bytes(need),
        human_bytes(room)
    )
}

#[test]
fn status_shows_nvml_memory_and_a_job_goes_to_the_only_gpu_it_fits() {
    let tmp = tempfile::tempdir().unwrap();
    let job = gpu_job(tmp.path(), "fits-on-1", 1);
    let e = gpu_estimate(&job);
    // GPU 0 is the bigger one, but another user holds all of it but 512 MiB.
    let d = GpuDaemon::start(
        tmp.path(),
        json!({"gpus": [
            gpu(UUID0, "Fake H100", 16 * GIB, &[(FOREIGN, 16 * GIB - 512 * MIB)]),
            gpu(UUID1, "Fake A100", 2 * GIB, &[]),
        ]}),
    );
    let text = d.status_cli(false);
    assert!(text.starts_with("mode: gpu\n"), "{text}");
    assert!(
        text.contains(&format!(
            "GPU 0 (Fake H100) {UUID0}: 512.0 MiB free of 16.00 GiB, 0 job(s) of ours"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "GPU 1 (Fake A100) {UUID1}: 2.00 GiB free of 2.00 GiB, 0 job(s) of ours"
        )),
        "{text}"
    );
    let pools = &d.status()["pools"];
    assert_eq!(pools[0]["free_bytes"], 512 * MIB);
    assert_eq!(pools[0]["total_bytes"], 16 * GIB);
    assert_eq!(pools[1]["free_bytes"], 2 * GIB);
    // NVML is read again on every pass, not once.
    d.script(json!({"gpus": [
        gpu(UUID0, "Fake H100", 16 * GIB, &[(FOREIGN, 16 * GIB - 768 * MIB)]),
        gpu(UUID1, "Fake A100", 2 * GIB, &[]),
    ]}));
    d.wait_until("the new free memory in status", |d| {
        d.status_cli(false)
            .contains(&format!("{UUID0}: 768.0 MiB free of 16.00 GiB"))
    });
    assert!(e + MARGIN > 768 * MIB && e + MARGIN <= 2 * GIB);

    let id = d.submit(&job);
    let rec = d.wait_ended(id);
    assert_eq!(
        rec["estimate_bytes"], e,
        "the daemon's estimate is `mezod estimate --gpu`'s"
    );
    assert_eq!(rec["gpus"], json!([UUID1]), "{rec:#}");
    assert_eq!(rec["attempts"], 1, "{rec:#}");
    let log = d.job_file(id, "worker.log");
    assert!(
        log.contains("--- attempt 1 on GPU 1 (Fake A100), from step 0 ---"),
        "{log}"
    );
    // The worker reports the GPU it was given, by UUID, as CUDA will see it.
    assert!(
        log.contains(&format!("CUDA_VISIBLE_DEVICES=\"{UUID1}\", device cuda:0")),
        "{log}"
    );
    assert!(
        d.log().contains(&format!("job {id}: started worker")),
        "{}",
        d.log()
    );
    assert!(
        d.log().contains(&format!("on GPU 1 (Fake A100) {UUID1}")),
        "{}",
        d.log()
    );
    // Its CUDA start fails here (no CUDA for a scripted GPU), and with no
    // retries configured the job ends failed with that reason.
    assert_eq!(rec["state"], "failed", "{rec:#}");
    let error = d.job_file(id, "error");
    assert!(error.contains("cuda:0 is not available"), "{error}");
}

/// A GPU in MIG mode is its instances: each a pool with its own memory,
/// `gpus:` naming the GPU selects them all, and a job's worker gets the
/// instance's `MIG-…` UUID; status names the instance by GPU index, slot,
/// name and UUID.
#[test]
fn mig_instances_are_pools_and_a_job_goes_to_the_one_it_fits() {
    const PARENT: &str = "GPU-cccccccc-1111-2222-3333-000000000000";
    const MIG_A: &str = "MIG-aaaaaaaa-1111-2222-3333-000000000000";
    const MIG_B: &str = "MIG-bbbbbbbb-1111-2222-3333-000000000000";
    let tmp = tempfile::tempdir().unwrap();
    let job = gpu_job(tmp.path(), "on-mig", 1);
    let e = gpu_estimate(&job);
    let mut h100 = gpu(PARENT, "Fake H100", 80 * GIB, &[]);
    h100["mig"] = json!([
        gpu(
            MIG_A,
            "Fake H100 MIG 3g.40gb",
            4 * GIB,
            &[(FOREIGN, 4 * GIB - 256 * MIB)]
        ),
        null,
        gpu(MIG_B, "Fake H100 MIG 1g.10gb", 2 * GIB, &[]),
    ]);
    // GPU 1 is roomy, but the config gives the daemon GPU 0 alone.
    let d = GpuDaemon::start_with(
        tmp.path(),
        json!({"gpus": [h100, gpu(UUID1, "Fake A100", 16 * GIB, &[])]}),
        &format!("gpus: [{PARENT}]\n"),
    );
    let text = d.status_cli(false);
    assert!(
        text.contains(&format!(
            "GPU 0 MIG 0 (Fake H100 MIG 3g.40gb) {MIG_A}: 256.0 MiB free of 4.00 GiB"
        )) && text.contains(&format!(
            "GPU 0 MIG 2 (Fake H100 MIG 1g.10gb) {MIG_B}: 2.00 GiB free of 2.00 GiB"
        )),
        "{text}"
    );
    assert!(
        !text.contains(UUID1) && !text.contains("80.00 GiB"),
        "{text}"
    );
    assert_eq!(
        d.status()["pools"].as_array().unwrap().len(),
        3,
        "two instances and the CPU"
    );

    assert!(e + MARGIN <= 2 * GIB);
    let id = d.submit(&job);
    let rec = d.wait_ended(id);
    assert_eq!(rec["gpus"], json!([MIG_B]), "{rec:#}");
    assert_eq!(
        rec["gpu_labels"],
        json!(["GPU 0 MIG 2 (Fake H100 MIG 1g.10gb)"])
    );
    let log = d.job_file(id, "worker.log");
    assert!(
        log.contains("--- attempt 1 on GPU 0 MIG 2 (Fake H100 MIG 1g.10gb), from step 0 ---"),
        "{log}"
    );
    assert!(
        log.contains(&format!("CUDA_VISIBLE_DEVICES=\"{MIG_B}\", device cuda:0")),
        "{log}"
    );
    let detail = String::from_utf8(
        check(
            mezod()
                .args(["status", &id.to_string(), "--socket"])
                .arg(d.socket())
                .output()
                .unwrap(),
            "mezod status ID",
        )
        .stdout,
    )
    .unwrap();
    assert!(
        detail.contains(&format!(
            "gpu        GPU 0 MIG 2 (Fake H100 MIG 1g.10gb) {MIG_B}\n"
        )),
        "{detail}"
    );
}

#[test]
fn a_job_larger_than_every_gpu_fails_at_once_and_never_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let job = gpu_job(tmp.path(), "too-big", 1);
    let e = gpu_estimate(&job);
    assert!(e + MARGIN > 768 * MIB);
    let d = GpuDaemon::start(
        tmp.path(),
        json!({"gpus": [
            gpu(UUID0, "Fake T4", 512 * MIB, &[]),
            gpu(UUID1, "Fake T4", 768 * MIB, &[]),
        ]}),
    );
    let id = d.submit(&job);
    let rec = d.wait_ended(id);
    assert_eq!(rec["state"], "failed", "{rec:#}");
    let reason = rec["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!(
            "needs about {} (plus a 64.0 MiB safety margin) but the largest GPU has 768.0 MiB in all",
            human_bytes(e)
        )),
        "{reason}"
    );
    assert!(d.job_file(id, "error").contains(reason));
    // Failed by admission: no worker was ever started, nothing is retried.
    std::thread::sleep(Duration::from_secs(1));
    let rec = d.job(id);
    assert_eq!(
        (rec["attempts"].as_u64(), rec["failures"].as_u64()),
        (Some(0), Some(0))
    );
    assert!(!d.job_dir(id).join("worker.log").exists());
    assert!(!d.log().contains("started worker"), "{}", d.log());
}

#[test]
fn a_job_waits_with_its_reason_in_status_until_memory_frees() {
    let tmp = tempfile::tempdir().unwrap();
    let job = gpu_job(tmp.path(), "patient", 1);
    let e = gpu_estimate(&job);
    let busy = json!({"gpus": [
        gpu(UUID0, "Fake H100", 16 * GIB, &[(FOREIGN, 16 * GIB - 512 * MIB)]),
        gpu(UUID1, "Fake A100", 2 * GIB, &[(FOREIGN2, 2 * GIB - 256 * MIB)]),
    ]});
    let d = GpuDaemon::start(tmp.path(), busy);
    let id = d.submit(&job);
    // The roomiest GPU is named: 512 MiB free less the 64 MiB margin.
    let why = lacks(e, "GPU 0 (Fake H100)", 448 * MIB);
    d.wait_until("the job to say why it waits", |d| {
        d.job(id)["reason"] == why
    });
    let rec = d.job(id);
    assert_eq!(rec["state"], "queued", "{rec:#}");
    assert_eq!(rec["attempts"], 0);
    let text = d.status_cli(false);
    let row = text
        .lines()
        .find(|l| l.contains("patient"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(row.contains("queued") && row.ends_with(&why), "{text}");
    let report: Value = serde_json::from_str(&d.status_cli(true)).unwrap();
    assert_eq!(report["mode"], "gpu");
    assert_eq!(report["jobs"][0]["reason"], why, "{report:#}");
    assert_eq!(report["jobs"][0]["state"], "queued");
    // Still waiting a few passes later: nothing changed.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(d.job(id)["attempts"], 0);

    // The other user on GPU 1 exits: the job starts there.
    d.script(json!({"gpus": [
        gpu(UUID0, "Fake H100", 16 * GIB, &[(FOREIGN, 16 * GIB - 512 * MIB)]),
        gpu(UUID1, "Fake A100", 2 * GIB, &[]),
    ]}));
    let rec = d.wait_ended(id);
    assert_eq!(rec["attempts"], 1, "{rec:#}");
    assert_eq!(rec["gpus"], json!([UUID1]), "{rec:#}");
    let log = d.job_file(id, "worker.log");
    assert!(
        log.contains(&format!("CUDA_VISIBLE_DEVICES=\"{UUID1}\"")),
        "{log}"
    );
}

/// An engine that holds a worker back while its run folder has a `.hold`
/// beside it (`<job>/run.hold`), as a worker still loading a big model would
/// be held; anything else goes straight to the real engine.
fn gated_engine(root: &Path) -> PathBuf {
    let path = root.join("gated-engine.sh");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\nif [ \"$1\" = worker ]; then while [ -e \"$3.hold\" ]; do sleep 0.02; done; fi\nexec {} \"$@\"\n",
            env!("CARGO_BIN_EXE_mezod-engine")
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Hold job `id`'s worker at its start (before it has allocated anything).
fn stall_worker_of(d: &GpuDaemon, id: u64) {
    std::fs::write(d.job_dir(id).join("run.hold"), "").unwrap();
}

fn release(d: &GpuDaemon, id: u64) {
    std::fs::remove_file(d.job_dir(id).join("run.hold")).unwrap();
}

#[test]
fn a_started_job_keeps_its_estimate_reserved_until_its_process_holds_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (job_a, job_b) = (gpu_job(tmp.path(), "a", 1), gpu_job(tmp.path(), "b", 2));
    let e = gpu_estimate(&job_a);
    assert_eq!(gpu_estimate(&job_b), e);
    let total = 4 * GIB;
    let gpu0 = |foreign: u64, ours: &[(u32, u64)]| {
        let mut p = vec![(FOREIGN, foreign)];
        p.extend_from_slice(ours);
        json!({"gpus": [gpu(UUID0, "Fake L4", total, &p)]})
    };
    // Free memory for A plus half a job more.
    let free = e + MARGIN + e / 2;
    // A waits on a full GPU, so its worker can be stalled before it starts.
    let d = GpuDaemon::start(tmp.path(), gpu0(total, &[]));
    let a = d.submit(&job_a);
    d.wait_until("a to wait", |d| {
        d.job(a)["reason"] == lacks(e, "GPU 0 (Fake L4)", 0)
    });
    stall_worker_of(&d, a);
    d.script(gpu0(total - free, &[]));
    let a_run = d.job_dir(a).join("run");
    d.wait_until("a's worker to start", |_| worker_pids(&a_run).len() == 1);
    let pid_a = worker_pids(&a_run)[0];
    assert_eq!(d.job(a)["state"], "running");
    assert_eq!(d.job(a)["gpus"], json!([UUID0]));

    // B would fit in what NVML reports free, but not beside A's reservation.
    assert!(free - MARGIN >= e);
    let b = d.submit(&job_b);
    let why = lacks(e, "GPU 0 (Fake L4)", e / 2);
    d.wait_until("b to wait for a's reservation", |d| {
        d.job(b)["reason"] == why
    });

    // A's process allocates half its estimate: NVML's free memory drops by
    // that, A's reservation by as much, and the room left stays the same.
    d.script(gpu0(total - free, &[(pid_a, e / 2)]));
    // (Waiting for a pass that saw both: the memory read and A's usage.)
    d.wait_until("the allocation to be seen", |d| {
        d.free_seen(0) == free - e / 2 && d.job(a)["peak_bytes"] == e / 2
    });
    let rec_b = d.job(b);
    assert_eq!(rec_b["reason"], why, "A's memory counts once, not twice");
    assert_eq!(rec_b["state"], "queued");
    // All of it: no reservation left, the same room.
    d.script(gpu0(total - free, &[(pid_a, e)]));
    d.wait_until("the whole allocation to be seen", |d| {
        d.free_seen(0) == free - e && d.job(a)["peak_bytes"] == e
    });
    assert_eq!(d.job(b)["reason"], why);

    // A ends (its CUDA start fails here): its reservation goes with it, and
    // its memory once NVML shows it free; then B starts.  (NVML is never
    // scripted to free a running worker's memory: a pass reading the process
    // list just before and the free memory just after that would see room
    // that is not there, as it would on a real GPU.)
    assert_eq!(d.job(b)["attempts"], 0, "b waits while a runs");
    release(&d, a);
    let rec_a = d.wait_ended(a);
    assert_eq!(rec_a["state"], "failed", "{rec_a:#}");
    assert!(
        d.job_file(a, "error").contains("cuda:0 is not available"),
        "{}",
        d.job_file(a, "error")
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(d.job(b)["reason"], why, "a's memory is still taken");
    d.script(gpu0(total - free, &[]));
    let rec_b = d.wait_ended(b);
    assert_eq!(rec_b["attempts"], 1, "{rec_b:#}");
    assert_eq!(rec_b["gpus"], json!([UUID0]));
}

#[test]
fn a_queued_gpu_job_waits_out_an_nvml_outage() {
    let tmp = tempfile::tempdir().unwrap();
    let job = gpu_job(tmp.path(), "outage", 1);
    let e = gpu_estimate(&job);
    let full = json!({"gpus": [gpu(UUID0, "Fake H100", 2 * GIB, &[(FOREIGN, 2 * GIB)])]});
    let d = GpuDaemon::start(tmp.path(), full);
    let id = d.submit(&job);
    d.wait_until("the job to wait", |d| {
        d.job(id)["reason"] == lacks(e, "GPU 0 (Fake H100)", 0)
    });
    // Every NVML call fails for a while (as after a driver hiccup).
    std::fs::write(tmp.path().join("broken.json"), "not a script").unwrap();
    std::fs::rename(tmp.path().join("broken.json"), &d.script).unwrap();
    d.wait_until("the outage to be seen", |d| {
        d.status()["mode"].as_str().unwrap().starts_with("cpu only")
    });
    std::thread::sleep(Duration::from_secs(1));
    let rec = d.job(id);
    assert_eq!(rec["state"], "queued", "{rec:#}");
    assert!(
        rec["reason"]
            .as_str()
            .unwrap()
            .starts_with("waiting for a GPU: none is usable now"),
        "{rec:#}"
    );
    // NVML answers again, with room: the job starts on the GPU.
    d.script(json!({"gpus": [gpu(UUID0, "Fake H100", 2 * GIB, &[])]}));
    let rec = d.wait_ended(id);
    assert_eq!(rec["attempts"], 1, "{rec:#}");
    assert_eq!(rec["gpus"], json!([UUID0]));
    assert_eq!(d.status()["mode"], "gpu");
}

/// One variable of a process's environment.
fn env_of(pid: u32, name: &str) -> Option<String> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let prefix = format!("{name}=");
    environ
        .split(|&b| b == 0)
        .find_map(|kv| kv.strip_prefix(prefix.as_bytes()))
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// A job of two replicas takes two GPUs, the leader (rank 0) the roomier:
/// each worker sees only its own GPU, and both get torchrun's variables
/// with one port.  Status and the worker log name both GPUs.
#[test]
fn a_replicated_job_gets_a_gpu_per_replica() {
    let tmp = tempfile::tempdir().unwrap();
    let job = gpu_job(tmp.path(), "pair", 1);
    let text = std::fs::read_to_string(&job).unwrap();
    std::fs::write(&job, format!("parallel: {{replicas: 2}}\n{text}")).unwrap();
    let e = gpu_estimate(&job);
    let script = |free1: u64| {
        json!({"gpus": [
            gpu(UUID0, "Fake H100", 16 * GIB, &[]),
            gpu(UUID1, "Fake A100", 8 * GIB, &[(FOREIGN, 8 * GIB - free1)]),
        ]})
    };
    // GPU 1 has room for no replica: the job waits for a second GPU.
    let d = GpuDaemon::start(tmp.path(), script(e / 2));
    let id = d.submit(&job);
    d.wait_until("the job to wait for a second GPU", |d| {
        d.job(id)["reason"].as_str().is_some_and(|r| {
            r.contains("its 2 replicas need a GPU each") && r.contains("1 GPU(s) have that now")
        })
    });
    stall_worker_of(&d, id);
    d.script(script(4 * GIB));
    let run = d.job_dir(id).join("run");
    d.wait_until("both workers to start", |_| worker_pids(&run).len() == 2);
    let mut seen: Vec<(String, String, String, String)> = worker_pids(&run)
        .into_iter()
        .map(|pid| {
            let var = |name| env_of(pid, name).unwrap_or_default();
            (
                var("RANK"),
                var("CUDA_VISIBLE_DEVICES"),
                var("WORLD_SIZE"),
                var("MASTER_PORT"),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(seen[0].0, "0");
    assert_eq!(seen[0].1, UUID0, "the leader on the roomier GPU");
    assert_eq!((seen[1].0.as_str(), seen[1].1.as_str()), ("1", UUID1));
    assert!(seen.iter().all(|s| s.2 == "2"), "{seen:?}");
    assert!(
        !seen[0].3.is_empty() && seen[0].3 == seen[1].3,
        "one port: {seen:?}"
    );
    let rec = d.job(id);
    assert_eq!(rec["gpus"], json!([UUID0, UUID1]), "{rec:#}");
    assert_eq!(rec["replicas"], 2, "{rec:#}");
    assert!(
        d.status_cli(false).contains("GPU 1 (Fake A100)"),
        "{}",
        d.status_cli(false)
    );
    release(&d, id);
    // Their CUDA start fails here: the job's own error, not a crash.
    let rec = d.wait_ended(id);
    assert_eq!(rec["state"], "failed", "{rec:#}");
    assert_eq!(rec["attempts"], 1, "{rec:#}");
    let log = d.job_file(id, "worker.log");
    assert!(
        log.contains("--- attempt 1 on GPU 0 (Fake H100), GPU 1 (Fake A100), from step 0 ---"),
        "{log}"
    );
}
