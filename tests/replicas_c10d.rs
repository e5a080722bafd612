//! Replicas over c10d with real processes on loopback: this test binary starts
//! copies of itself as the ranks (`--exact rank_process`, with the launcher's
//! variables set), by hand and through torchrun, and checks what each rank
//! gathered, and that a killed rank is an error for the others, not a hang.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mezod::replicas::c10d::Group;
use mezod::replicas::launch_env::LaunchEnv;

/// Set in a rank's environment: what `rank_process` does ("1" or "gather":
/// check a few hundred exchanges and exit; "loop": exchange until an error).
const CHILD_ENV: &str = "MEZOD_C10D_CHILD";
/// The test that is a rank when `CHILD_ENV` is set.
const CHILD_TEST: &str = "rank_process";
/// The ranks' timeout for joining and for each collective: far above what
/// the tests allow for a killed rank to be noticed. `MEZOD_C10D_TIMEOUT_MS`
/// in a rank's environment overrides it.
const TIMEOUT: Duration = Duration::from_secs(20);
/// The bytes one rank sends per step.
const FRAME: usize = 32;

/// Launcher variables the test process may have inherited (a test run under
/// Slurm or torchrun): the ranks get only the ones each test sets.
const LAUNCH_VARS: [&str; 11] = [
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_USE_AGENT_STORE",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_RESTART_COUNT",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
];

/// Rank `rank`'s frame at `step`: its rank, the step, an f64 and a u64 seed
/// that both depend on the two.
fn frame(rank: usize, step: u64) -> [u8; FRAME] {
    let mut b = [0u8; FRAME];
    let x = (rank as f64 + 1.0).sqrt() + step as f64;
    let seed = (rank as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ step;
    b[0..8].copy_from_slice(&(rank as u64).to_le_bytes());
    b[8..16].copy_from_slice(&step.to_le_bytes());
    b[16..24].copy_from_slice(&x.to_le_bytes());
    b[24..32].copy_from_slice(&seed.to_le_bytes());
    b
}

/// Every rank's frame, decoded and checked against what that rank sent.
fn check(all: &[Vec<u8>], world: usize, step: u64) {
    assert_eq!(all.len(), world, "one frame per rank");
    for (r, b) in all.iter().enumerate() {
        let word = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        assert_eq!(b.len(), FRAME, "rank {r}'s frame length");
        assert_eq!(word(0), r as u64, "frame {r} comes from rank {r}");
        assert_eq!(word(8), step, "rank {r} is at step {step}");
        let x = f64::from_le_bytes(b[16..24].try_into().unwrap());
        assert_eq!(x, (r as f64 + 1.0).sqrt() + step as f64, "rank {r}'s f64");
        assert_eq!(b[..], frame(r, step)[..], "rank {r}'s bytes");
    }
}

/// Not a test of its own (it passes at once in a plain run): the rank process
/// the other tests start, acting on `MEZOD_C10D_CHILD`.
#[test]
fn rank_process() {
    let Ok(mode) = std::env::var(CHILD_ENV) else {
        return;
    };
    let env = LaunchEnv::from_env()
        .unwrap_or_else(|e| panic!("{e:#}"))
        .expect("a rank is started with RANK and WORLD_SIZE");
    let timeout = std::env::var("MEZOD_C10D_TIMEOUT_MS")
        .map_or(TIMEOUT, |ms| Duration::from_millis(ms.parse().unwrap()));
    let group = Group::join(&env, timeout).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!((group.rank(), group.world()), (env.rank, env.world));
    match mode.as_str() {
        "1" | "gather" => gather(group, &env),
        "loop" => gather_until_error(group),
        other => panic!("{CHILD_ENV}={other:?}: expected 1, gather or loop"),
    }
}

/// A few hundred exchanges, each checked; prints the latency and who hosted
/// the store.
fn gather(group: Group, env: &LaunchEnv) {
    let (r, w) = (group.rank(), group.world());
    let (warm_up, timed) = (20u64, 200u64);
    let mut micros = Vec::new();
    for step in 0..warm_up + timed {
        let t = Instant::now();
        let all = group
            .all_gather(&frame(r, step))
            .unwrap_or_else(|e| panic!("{e:#}"));
        if step >= warm_up {
            micros.push(t.elapsed().as_secs_f64() * 1e6);
        }
        check(&all, w, step);
    }
    group.barrier().unwrap_or_else(|e| panic!("{e:#}"));
    micros.sort_by(f64::total_cmp);
    let at = |q: f64| micros[((micros.len() - 1) as f64 * q).round() as usize];
    let store = if env.agent_store {
        "torchrun's agent"
    } else {
        "rank 0"
    };
    println!(
        "c10d-child rank {r} of {w}: {timed} all_gathers of {FRAME} B checked, median {:.0} us, \
         p90 {:.0} us (store hosted by {store})",
        at(0.5),
        at(0.9)
    );
    drop(group);
    println!("c10d-child rank {r} done");
}

/// An exchange every 50 ms until one fails: prints the error, exits 3.
fn gather_until_error(group: Group) {
    let (r, w) = (group.rank(), group.world());
    for step in 0..1200 {
        let t = Instant::now();
        match group.all_gather(&frame(r, step)) {
            Ok(all) => {
                check(&all, w, step);
                println!("c10d-child rank {r} step {step}");
            }
            Err(e) => {
                let waited = t.elapsed().as_secs_f64();
                println!("c10d-child rank {r} error after {waited:.3} s: {e:#}");
                group.abandon();
                std::process::exit(3);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("rank {r}: no error in a minute of exchanges");
}

/// A port nobody listens on now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// This test binary, as a rank.
fn rank_command(mode: &str) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", CHILD_TEST, "--nocapture", "--test-threads=1"]);
    for var in LAUNCH_VARS {
        cmd.env_remove(var);
    }
    cmd.env_remove("MEZOD_C10D_TIMEOUT_MS").env(CHILD_ENV, mode);
    cmd
}

/// A started process whose stdout and stderr are collected as they come;
/// killed (SIGTERM, then SIGKILL) if still running when dropped.
struct Proc {
    name: String,
    child: Child,
    out: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

impl Proc {
    fn spawn(name: &str, cmd: &mut Command) -> Proc {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let out = Arc::new(Mutex::new(String::new()));
        let pipes: [Box<dyn Read + Send>; 2] = [
            Box::new(child.stdout.take().unwrap()),
            Box::new(child.stderr.take().unwrap()),
        ];
        let readers = pipes
            .into_iter()
            .map(|pipe| {
                let out = Arc::clone(&out);
                std::thread::spawn(move || {
                    for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                        let mut out = out.lock().unwrap();
                        out.push_str(&line);
                        out.push('\n');
                    }
                })
            })
            .collect();
        Proc {
            name: name.into(),
            child,
            out,
            readers,
        }
    }

    fn output(&self) -> String {
        self.out.lock().unwrap().clone()
    }

    /// Waits for the exit, then (briefly) for the last of its output.
    fn wait(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let drained = Instant::now() + Duration::from_secs(5);
                while self.readers.iter().any(|r| !r.is_finished()) && Instant::now() < drained {
                    std::thread::sleep(Duration::from_millis(10));
                }
                return status;
            }
            if Instant::now() > deadline {
                self.stop();
                panic!(
                    "{} still running after {limit:?}:\n{}",
                    self.name,
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Blocks until the output holds `text`.
    fn wait_for(&mut self, text: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.output().contains(text) {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "{} exited ({status}) before printing {text:?}:\n{}",
                    self.name,
                    self.output()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "{} printed no {text:?} within {limit:?}:\n{}",
                    self.name,
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM (torchrun then stops its workers), SIGKILL 5 s later.
    fn stop(&mut self) {
        if self.child.try_wait().unwrap().is_some() {
            return;
        }
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `world` ranks started by hand, as a launcher would: rank 0 hosts the store.
fn launch(world: usize, mode: &str) -> Vec<Proc> {
    launch_with(world, mode, &[])
}

fn launch_with(world: usize, mode: &str, vars: &[(&str, &str)]) -> Vec<Proc> {
    let port = free_port().to_string();
    (0..world)
        .map(|rank| {
            let mut cmd = rank_command(mode);
            cmd.envs(vars.iter().copied());
            cmd.env("RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port);
            Proc::spawn(&format!("rank {rank} of {world}"), &mut cmd)
        })
        .collect()
}

/// Every rank exits 0 having checked every exchange; returns their output.
fn all_succeed(world: usize) -> String {
    let mut ranks = launch(world, "gather");
    let mut outputs = String::new();
    for (r, rank) in ranks.iter_mut().enumerate() {
        let status = rank.wait(Duration::from_secs(60));
        let out = rank.output();
        assert!(status.success(), "{} failed ({status}):\n{out}", rank.name);
        assert!(out.contains(&format!("c10d-child rank {r} done")), "{out}");
        outputs.push_str(&out);
    }
    for r in 0..world {
        assert!(
            outputs.contains(&format!("c10d-child rank {r} of {world}: 200 all_gathers")),
            "rank {r} reported no exchanges:\n{outputs}"
        );
    }
    outputs
}

fn latency_lines(outputs: &str) {
    for line in outputs.lines().filter(|l| l.contains("all_gathers of")) {
        eprintln!("{line}");
    }
}

#[test]
fn two_ranks_gather_each_others_frames() {
    let out = all_succeed(2);
    assert!(out.contains("store hosted by rank 0"), "{out}");
    latency_lines(&out);
}

#[test]
fn four_ranks_gather_each_others_frames() {
    latency_lines(&all_succeed(4));
}

#[test]
fn a_killed_rank_is_an_error_for_the_other_not_a_hang() {
    let mut ranks = launch(2, "loop");
    // Both exchanging: rank 0 has been through a few steps with rank 1.
    ranks[0].wait_for("c10d-child rank 0 step 5\n", Duration::from_secs(40));
    let killed = Instant::now();
    ranks[1].child.kill().unwrap(); // SIGKILL
    let _ = ranks[1].child.wait();
    let status = ranks[0].wait(Duration::from_secs(15));
    let noticed = killed.elapsed();
    let out = ranks[0].output();
    assert_eq!(
        status.code(),
        Some(3),
        "rank 0 should report the error and exit 3:\n{out}"
    );
    let error = out
        .lines()
        .find(|l| l.contains("error after"))
        .unwrap_or_default();
    assert!(error.contains("replica 1 of 2 has gone"), "{out}");
    assert!(error.contains("(c10d/Gloo)"), "{out}");
    assert!(
        noticed < Duration::from_secs(5),
        "rank 0 noticed the killed rank after {noticed:?} (the timeout is {TIMEOUT:?}):\n{out}"
    );
    eprintln!("noticed {noticed:?} after SIGKILL: {error}");
}

#[test]
fn a_hung_rank_is_a_timeout_for_the_other() {
    let timeout = Duration::from_secs(5);
    let ms = timeout.as_millis().to_string();
    let mut ranks = launch_with(2, "loop", &[("MEZOD_C10D_TIMEOUT_MS", ms.as_str())]);
    ranks[0].wait_for("c10d-child rank 0 step 5\n", Duration::from_secs(40));
    let stopped = Instant::now();
    unsafe { libc::kill(ranks[1].child.id() as libc::pid_t, libc::SIGSTOP) };
    let status = ranks[0].wait(Duration::from_secs(20));
    let noticed = stopped.elapsed();
    let out = ranks[0].output();
    let _ = ranks[1].child.kill(); // SIGKILL ends a stopped process too
    assert_eq!(
        status.code(),
        Some(3),
        "rank 0 should report the error and exit 3:\n{out}"
    );
    let error = out
        .lines()
        .find(|l| l.contains("error after"))
        .unwrap_or_default();
    assert!(
        error.contains("no answer from the other replicas within 5s"),
        "{out}"
    );
    assert!(
        noticed >= timeout - Duration::from_millis(100) && noticed < timeout * 2,
        "rank 0 noticed the hung rank after {noticed:?} (the timeout is {timeout:?}):\n{out}"
    );
    eprintln!("noticed {noticed:?} after SIGSTOP: {error}");
}

#[test]
fn a_missing_rank_is_a_timeout_at_join() {
    let env = LaunchEnv {
        rank: 0,
        world: 2,
        local_rank: 0,
        master_addr: "127.0.0.1".into(),
        master_port: free_port(),
        agent_store: false,
        run_id: "none".into(),
        restart: 0,
    };
    let started = Instant::now();
    let joined = Group::join(&env, Duration::from_secs(1));
    let waited = started.elapsed();
    let e = format!("{:#}", joined.err().expect("no group"));
    assert!(
        e.starts_with("no answer from the other replicas within 1s (rank 0 of 2"),
        "{e}"
    );
    assert!(e.contains("1/2 clients joined"), "{e}");
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    eprintln!("join failed after {waited:?}: {e}");
}

#[test]
fn a_world_of_one_gathers_its_own_frame() {
    let env = LaunchEnv {
        rank: 0,
        world: 1,
        local_rank: 0,
        master_addr: "127.0.0.1".into(),
        master_port: free_port(),
        agent_store: false,
        run_id: "none".into(),
        restart: 0,
    };
    let group = Group::join(&env, Duration::from_secs(10)).unwrap();
    check(&group.all_gather(&frame(0, 7)).unwrap(), 1, 7);
    assert_eq!(group.all_gather(&[]).unwrap(), vec![Vec::<u8>::new()]);
    group.barrier().unwrap();
}

/// The venv's torchrun, next to the python the tests use (tests/common's
/// `python()`: `MEZOD_PYTHON`, else .venv/bin/python).
fn torchrun() -> PathBuf {
    std::env::var("MEZOD_PYTHON")
        .ok()
        .and_then(|py| PathBuf::from(py).parent().map(|bin| bin.join("torchrun")))
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/torchrun"))
}

#[test]
fn torchrun_starts_the_ranks() {
    let torchrun = torchrun();
    if !torchrun.exists() {
        eprintln!(
            "SKIPPED: {} is missing (`make setup` installs it)",
            torchrun.display()
        );
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(&torchrun);
    cmd.args(["--no-python", "--nproc-per-node", "2", "--master-port"])
        .arg(free_port().to_string())
        .arg(exe)
        .args(["--exact", CHILD_TEST, "--nocapture", "--test-threads=1"]);
    for var in LAUNCH_VARS {
        cmd.env_remove(var);
    }
    cmd.env(CHILD_ENV, "1");
    let mut run = Proc::spawn("torchrun", &mut cmd);
    let status = run.wait(Duration::from_secs(60));
    let out = run.output();
    assert!(status.success(), "torchrun failed ({status}):\n{out}");
    for r in 0..2 {
        assert!(
            out.contains(&format!("c10d-child rank {r} of 2: 200 all_gathers")),
            "rank {r} reported no exchanges:\n{out}"
        );
    }
    // torchrun's agent hosts the store: rank 0 connected instead of listening.
    assert!(out.contains("store hosted by torchrun's agent"), "{out}");
    latency_lines(&out);
}
