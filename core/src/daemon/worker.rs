//! One worker process per job (`mezod-engine worker`, internal): its launch
//! and its step-record pipe, the daemon's side (the worker's side is the
//! engine's `worker` module).
//!
//! Why a process: torch's RNG is process-global, so two jobs in one process
//! would draw each other's z.  A process also contains crashes: a segfault or
//! an OOM kill ends the worker, never the daemon.
//!
//! The protocol is one line per finished step on the worker's stdout,
//! `R <96 hex digits>` (the 48-byte seed-log record, exact f64 bits); the
//! daemon makes each durable in its sled database.  The records already
//! logged reach the worker as a file (`replay.bin`) written before it starts.
//! The worker's stderr is the job's log.  Workers die with the daemon
//! (`PR_SET_PDEATHSIG`) and stop at a step boundary on SIGTERM.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};

use anyhow::{bail, Context, Result};

use crate::gpu::GpuInfo;
use crate::seedlog::StepRecord;

/// What a worker tells the daemon.
#[derive(Debug)]
pub enum WorkerEvent {
    Record(StepRecord),
    Exited(ExitStatus),
}

/// Everything needed to start one job's worker.
pub struct Launch<'a> {
    pub exe: &'a Path,
    pub job_dir: &'a Path,
    pub gpu: Option<&'a GpuInfo>,
    pub threads: i32,
    pub snapshot_every: u64,
    pub estimate: u64,
    /// Run as this (uid, gid): a root daemon runs each job as its owner.
    pub run_as: Option<(u32, u32)>,
}

pub fn encode(rec: &StepRecord) -> String {
    let hex: String = rec.to_bytes().iter().map(|b| format!("{b:02x}")).collect();
    format!("R {hex}\n")
}

pub fn decode(line: &str) -> Option<StepRecord> {
    let hex = line.trim_end().strip_prefix("R ")?;
    if hex.len() % 2 != 0 || !hex.is_ascii() {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok())
        .collect();
    StepRecord::from_bytes(&bytes?)
}

/// replay.bin: each record as its length (u32, little-endian) then its bytes.
fn write_replay(path: &Path, records: &[StepRecord]) -> Result<()> {
    let mut bytes = Vec::new();
    for r in records {
        let b = r.to_bytes();
        bytes.extend((b.len() as u32).to_le_bytes());
        bytes.extend(b);
    }
    crate::durable::write(path, bytes)
}

/// The records of replay.bin for steps 0, 1, 2, … up to the first gap.
pub fn read_replay(path: &Path) -> Result<Vec<StepRecord>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut records = Vec::new();
    let mut at = 0;
    while at + 4 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let Some(rec) = bytes
            .get(at + 4..at + 4 + len)
            .and_then(StepRecord::from_bytes)
        else {
            bail!("{} is damaged at byte {at}", path.display());
        };
        if rec.step != records.len() as u64 {
            break;
        }
        records.push(rec);
        at += 4 + len;
    }
    Ok(records)
}

/// A live handle on a worker process.  Signals go through a pidfd opened
/// before anyone could reap the child, so once the worker has exited (and its
/// reader thread has reaped it) a signal fails with ESRCH instead of reaching
/// whatever process reused the pid.
pub struct WorkerHandle {
    pid: u32,
    pidfd: OwnedFd,
}

impl WorkerHandle {
    /// Open a handle on `child`, which must not have been waited for yet.
    pub fn open(child: &Child) -> std::io::Result<Self> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            pid: child.id(),
            // SAFETY: the fd was just returned to us and is owned by nobody else.
            pidfd: unsafe { OwnedFd::from_raw_fd(fd as i32) },
        })
    }

    /// The worker's pid, for reading its memory (never for signalling).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Send `sig` to the worker if it is still the process this handle opened.
    pub fn signal(&self, sig: i32) -> std::io::Result<()> {
        // SAFETY: pidfd_send_signal with a valid pidfd, no siginfo, no flags.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Start the worker; `report` receives its step records, then its exit.
/// Call from the daemon's main thread: the death signal fires when the
/// *thread* that forked the child ends.
pub fn spawn(
    launch: &Launch,
    records: &[StepRecord],
    log: File,
    report: impl Fn(WorkerEvent) + Send + 'static,
) -> Result<WorkerHandle> {
    let replay = launch.job_dir.join("replay.bin");
    write_replay(&replay, records)?;
    let mut cmd = Command::new(launch.exe);
    cmd.arg("worker")
        .arg("--job")
        .arg(launch.job_dir.join("job.yaml"))
        .arg("--out")
        .arg(launch.job_dir.join("run"))
        .arg("--replay")
        .arg(&replay)
        .arg("--threads")
        .arg(launch.threads.to_string())
        .arg("--snapshot-every")
        .arg(launch.snapshot_every.to_string())
        .arg("--estimate")
        .arg(launch.estimate.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .env(
            "MEZOD_LOG",
            std::env::var("MEZOD_LOG").unwrap_or("info".into()),
        )
        // Its own process group: a Ctrl-C at the daemon's terminal is for the
        // daemon, which then stops each worker at a step boundary.
        .process_group(0);
    match launch.gpu {
        Some(g) => {
            cmd.env("CUDA_VISIBLE_DEVICES", &g.uuid)
                .env("MEZOD_GPU_NAME", &g.name)
                .arg("--device")
                .arg("cuda:0");
        }
        None => {
            cmd.env("CUDA_VISIBLE_DEVICES", "");
        }
    }
    if let Some((uid, gid)) = launch.run_as {
        cmd.uid(uid).gid(gid);
    }
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: prctl and getppid are async-signal-safe; this runs after the
    // uid/gid change (which would clear the death signal) and before exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                return Err(std::io::Error::other(
                    "the daemon exited while starting a worker",
                ));
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {} worker", launch.exe.display()))?;
    let pid = child.id();
    let handle = match WorkerHandle::open(&child) {
        Ok(h) => h,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e).context("opening a pidfd on the worker (Linux 5.3 or later is needed)");
        }
    };
    let stdout = child.stdout.take().expect("stdout is piped");
    std::thread::Builder::new()
        .name(format!("worker-{pid}"))
        .spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(rec) = decode(&line) {
                    report(WorkerEvent::Record(rec));
                }
            }
            let status = child.wait().expect("waiting for a child of ours");
            report(WorkerEvent::Exited(status));
        })?;
    Ok(handle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seedlog::Direction;

    #[test]
    fn records_cross_the_pipe_with_exact_bits() {
        let rec = StepRecord {
            step: 12,
            seed: u64::MAX >> 12,
            projected_grad: -0.1 - f64::EPSILON,
            loss_plus: 6.25,
            loss_minus: f64::MIN_POSITIVE,
            lr: 1e-7,
            more: vec![],
        };
        let line = encode(&rec);
        assert_eq!(decode(&line), Some(rec.clone()));
        assert_eq!(decode("R 00"), None);
        assert_eq!(decode("hello"), None);
        // An n-SPSA step carries its further directions.
        let nspsa = StepRecord {
            more: vec![
                Direction {
                    seed: 3,
                    projected_grad: 1.0 / 3.0,
                    loss_plus: 2.0,
                    loss_minus: f64::NAN,
                },
                Direction {
                    seed: 4,
                    projected_grad: -0.0,
                    loss_plus: 1.5,
                    loss_minus: 1.25,
                },
            ],
            ..rec.clone()
        };
        let back = decode(&encode(&nspsa)).unwrap();
        assert_eq!(back.to_bytes(), nspsa.to_bytes(), "bits, NaN included");
        assert_eq!(back.seeds(), vec![u64::MAX >> 12, 3, 4]);
    }

    #[test]
    fn a_handle_signals_its_worker_and_never_a_reaped_pid() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let handle = WorkerHandle::open(&child).unwrap();
        assert_eq!(handle.pid(), child.id());
        handle.signal(libc::SIGTERM).unwrap();
        let status = child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGTERM)
        );
        // Reaped: the pid may now belong to anyone; the handle refuses.
        let err = handle.signal(libc::SIGKILL).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ESRCH));
    }

    #[test]
    fn replay_files_hold_records_of_any_length() {
        let dir = tempfile::tempdir().unwrap();
        let one = |step| StepRecord {
            step,
            seed: step + 100,
            projected_grad: 0.5,
            loss_plus: 1.0,
            loss_minus: 2.0,
            lr: 1e-3,
            more: vec![],
        };
        let mut records = vec![one(0), one(1), one(2)];
        records[1].more.push(Direction {
            seed: 9,
            projected_grad: 0.25,
            loss_plus: 1.0,
            loss_minus: 1.5,
        });
        let path = dir.path().join("replay.bin");
        write_replay(&path, &records).unwrap();
        assert_eq!(read_replay(&path).unwrap(), records);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.truncate(bytes.len() - 3);
        std::fs::write(&path, bytes).unwrap();
        assert!(read_replay(&path)
            .unwrap_err()
            .to_string()
            .contains("damaged"));
    }
}
