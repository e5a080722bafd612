//! One worker process per job (`mezod-engine worker`, internal): its launch
//! and its step-record pipe, the daemon's side (the worker's side is the
//! engine's `worker` module).
//!
//! Why a process: torch's RNG is process-global, so two jobs in one process
//! would draw each other's z.  A process also contains crashes: a segfault or
//! an OOM kill ends the worker, never the daemon.
//!
//! The worker's input is its stdin, an anonymous memory file (memfd) the
//! daemon fills before the start: the job file's text from the daemon's own
//! copy, then the step records already logged.  The worker, which runs as the
//! job's owner, opens no file the daemon read for it, so what was checked at
//! intake is what runs.  Its output is one line per finished step on stdout,
//! `R <96 hex digits>` (the 48-byte seed-log record, exact f64 bits); the
//! daemon makes each durable in its sled database.  The worker's stderr is the
//! job's log.  Workers die with the daemon (`PR_SET_PDEATHSIG`) and stop at a
//! step boundary on SIGTERM.
//!
//! How a worker ends tells the daemon whether trying again can help.  A job
//! that cannot succeed (a model it cannot load, a row its task cannot use, a
//! loss that is not finite: the same inputs fail the same way every time)
//! says why on stdout, `E <JSON string>`, and exits with [`JOB_ERROR_EXIT`]:
//! the daemon fails it at once with that reason.  Anything else (a signal, an
//! OOM kill, a crash, running out of memory or disk) is retried.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};

use anyhow::{bail, Context, Result};

use crate::gpu::GpuInfo;
use crate::identity::Identity;
use crate::seedlog::StepRecord;

/// What a worker tells the daemon.
#[derive(Debug)]
pub enum WorkerEvent {
    Record(StepRecord),
    /// Why the job cannot succeed (sent before an exit with [`JOB_ERROR_EXIT`]).
    JobError(String),
    /// The pipe carried what no worker of ours writes (a line too long to
    /// be a record): the owner, who can take a worker's pipes, wrote into it.
    /// The daemon stops the job; nothing more is read.
    Violation(String),
    Exited(ExitStatus),
}

/// A worker's exit status when the job itself failed (its own error, which
/// would recur on every retry).  65 is sysexits' EX_DATAERR: not 1 (any
/// uncaught error), 101 (a Rust panic) or 128 + a signal.
pub const JOB_ERROR_EXIT: u8 = 65;

/// The longest line read from a worker: the largest step record any job can
/// log (64 directions, in hex) or a job error (cut to [`MAX_JOB_ERROR`] by
/// the worker, JSON-escaped).  A longer line is a violation of the protocol.
const MAX_LINE: usize = 32 << 10;
/// Bytes of a job's log (`worker.log`, all attempts together) the daemon
/// keeps; past it, a worker's stderr is read and dropped.
pub const MAX_LOG_BYTES: u64 = 32 << 20;
/// The longest job error kept as a job's reason.
pub const MAX_JOB_ERROR: usize = 4 << 10;

/// The line that tells the daemon why the job failed, the message cut to
/// [`MAX_JOB_ERROR`] bytes (so the line, JSON-escaped, stays under the
/// longest line the daemon reads).
pub fn encode_job_error(message: &str) -> String {
    format!(
        "E {}\n",
        serde_json::to_string(&cut(message.to_string())).expect("a string serializes")
    )
}

/// The message of an `E` line, cut to [`MAX_JOB_ERROR`] bytes.
pub(crate) fn decode_job_error(line: &str) -> Option<String> {
    let message: String = serde_json::from_str(line.trim_end().strip_prefix("E ")?).ok()?;
    Some(cut(message))
}

fn cut(mut message: String) -> String {
    if message.len() > MAX_JOB_ERROR {
        let mut cut = MAX_JOB_ERROR;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push('…');
    }
    message
}

/// Whether an error may go away on a retry: memory or disk ran out (the
/// daemon's disk guard handles a full disk of its own), the daemon went away,
/// the storage or the GPU faulted (an I/O error other than a missing,
/// forbidden or malformed file; a CUDA, cuBLAS, cuDNN or NCCL error).  What
/// remains — a bad row, a wrong config, a non-finite loss, a missing file —
/// is the job's own and would recur.
pub fn is_transient(e: &anyhow::Error) -> bool {
    use std::io::ErrorKind as K;
    let io = e.chain().filter_map(|c| c.downcast_ref::<std::io::Error>());
    if io.into_iter().any(|io| {
        !matches!(
            io.kind(),
            K::NotFound
                | K::PermissionDenied
                | K::InvalidData
                | K::InvalidInput
                | K::AlreadyExists
                | K::UnexpectedEof
                | K::IsADirectory
                | K::NotADirectory
                | K::Unsupported
        )
    }) {
        return true;
    }
    // libtorch's errors arrive as text.
    let text = format!("{e:#}").to_lowercase();
    [
        "out of memory",
        "no space left on device",
        "disk quota exceeded",
        "input/output error",
        "stale file handle",
        "cuda error",
        "cuda driver",
        "no cuda gpus are available",
        "cublas_status",
        "cudnn_status",
        "nccl",
        "ecc error",
    ]
    .iter()
    .any(|m| text.contains(m))
}

/// Everything needed to start one job's worker.
pub struct Launch<'a> {
    pub exe: &'a Path,
    /// The job file's text (the daemon's copy).
    pub spec: &'a str,
    /// The run folder the worker writes into (its owner's).
    pub out: &'a Path,
    pub gpu: Option<&'a GpuInfo>,
    pub threads: i32,
    pub snapshot_every: u64,
    pub estimate: u64,
    /// Run as this user: a root daemon runs each job as its owner.
    pub run_as: Option<Identity>,
    /// The job's own cgroup, entered before the worker execs (so nothing it
    /// starts escapes a cancel, and its limits hold from its first byte).
    pub cgroup: Option<&'a super::cgroup::JobCgroup>,
    /// One of a replicated job's processes (none for a job of one process).
    pub replica: Option<&'a ReplicaSeat>,
}

/// Which of a replicated job's processes a worker is, in torchrun's terms:
/// the engine reads `RANK`, `WORLD_SIZE`, `MASTER_ADDR` and `MASTER_PORT` as
/// it does under torchrun, so a daemon's replicas are the same code.
#[derive(Debug, Clone)]
pub struct ReplicaSeat {
    pub rank: usize,
    pub world: usize,
    /// The leader's store, on loopback: one port per attempt.
    pub port: u16,
    /// The store's key prefix (`TORCHELASTIC_RUN_ID`): fresh for every
    /// attempt, so a late process of an earlier one never joins this one,
    /// and known only to the job's processes (another user cannot read
    /// their environment), so nobody else can guess the keys they exchange by.
    pub run_id: String,
}

impl ReplicaSeat {
    /// The seats of one attempt of a job with `world` replicas.
    pub fn attempt(world: usize) -> Result<Vec<ReplicaSeat>> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("finding a free port on loopback for the replicas")?
            .port();
        let mut secret = [0u8; 16];
        // SAFETY: getrandom(2) writes at most the buffer's length into it.
        let n = unsafe { libc::getrandom(secret.as_mut_ptr().cast(), secret.len(), 0) };
        if n != secret.len() as isize {
            bail!(
                "reading 16 random bytes: {}",
                std::io::Error::last_os_error()
            );
        }
        let run_id: String = std::iter::once("mezod-".to_string())
            .chain(secret.iter().map(|b| format!("{b:02x}")))
            .collect();
        Ok((0..world)
            .map(|rank| ReplicaSeat {
                rank,
                world,
                port,
                run_id: run_id.clone(),
            })
            .collect())
    }
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

/// First line of a worker's input (a worker of another version refuses it).
const INPUT_MAGIC: &[u8] = b"mezod worker input 1\n";

/// A worker's input: the magic line, the job file's length (u32,
/// little-endian) and text, then each record as its length and its bytes.
pub fn encode_input(spec: &str, records: &[StepRecord]) -> Vec<u8> {
    let mut bytes = Vec::new();
    write_input(&mut bytes, spec, |write| {
        for r in records {
            write(r)?;
        }
        Ok(records.len() as u64)
    })
    .expect("writing to memory");
    bytes
}

/// Write a worker's input to `to`: the header and the job file, then the
/// records `records` hands to its writer one at a time (so a job's history
/// is streamed from the seed log, never held whole); returns how many.
pub(crate) fn write_input<W: std::io::Write>(
    to: &mut W,
    spec: &str,
    records: impl FnOnce(&mut dyn FnMut(&StepRecord) -> Result<()>) -> Result<u64>,
) -> Result<u64> {
    to.write_all(INPUT_MAGIC)?;
    to.write_all(&(spec.len() as u32).to_le_bytes())?;
    to.write_all(spec.as_bytes())?;
    records(&mut |r: &StepRecord| {
        let b = r.to_bytes();
        to.write_all(&(b.len() as u32).to_le_bytes())?;
        to.write_all(&b)?;
        Ok(())
    })
}

/// The job file's text and the records for steps 0, 1, 2, … up to the first gap.
pub fn decode_input(bytes: &[u8]) -> Result<(String, Vec<StepRecord>)> {
    let Some(rest) = bytes.strip_prefix(INPUT_MAGIC) else {
        bail!(
            "the worker's input does not start with {:?}",
            String::from_utf8_lossy(INPUT_MAGIC)
        );
    };
    let field = |at: usize| -> Option<&[u8]> {
        let len = u32::from_le_bytes(rest.get(at..at + 4)?.try_into().ok()?) as usize;
        rest.get(at + 4..at + 4 + len)
    };
    let spec = field(0).context("the worker's input is cut inside the job file")?;
    let spec = String::from_utf8(spec.to_vec()).context("the job file is not UTF-8")?;
    let mut at = 4 + spec.len();
    let mut records = Vec::new();
    while at < rest.len() {
        let Some(rec) = field(at).and_then(StepRecord::from_bytes) else {
            bail!("the worker's input is damaged at byte {at}");
        };
        if rec.step != records.len() as u64 {
            break;
        }
        at += 4 + rec.to_bytes().len();
        records.push(rec);
    }
    Ok((spec, records))
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

/// A worker's input as an anonymous memory file: the job file's text, then
/// the records of steps 0, 1, … (up to `limit`) streamed from `log`; returns
/// the file and how many records it holds.
pub(crate) fn input_file(
    spec: &str,
    log: &crate::seedlog::SeedLog,
    limit: u64,
) -> Result<(File, u64)> {
    use std::io::{Seek, Write};
    let file = crate::safe_fs::memory_file("mezod-worker-input", &[])?;
    let mut w = std::io::BufWriter::new(file);
    let n = write_input(&mut w, spec, |write| {
        log.for_each_contiguous(limit, |r| write(&r))
    })?;
    w.flush()?;
    let mut file = w.into_inner().map_err(|e| e.into_error())?;
    file.rewind()?;
    Ok((file, n))
}

/// A following replica's input: the job file alone (the leader sends it the
/// records it replays).
pub(crate) fn job_only_input(spec: &str) -> Result<File> {
    crate::safe_fs::memory_file("mezod-worker-input", &encode_input(spec, &[]))
}

/// Where a job's log goes: the daemon's own file, appended to by the daemon
/// from the worker's stderr pipe, up to [`MAX_LOG_BYTES`] for the job.  The
/// worker never holds a descriptor of a root-owned file.
pub struct LogSink {
    pub file: File,
    /// Bytes the job's log may still grow by.
    pub room: u64,
}

impl LogSink {
    fn write(&mut self, bytes: &[u8]) {
        use std::io::Write;
        if self.room == 0 {
            return;
        }
        let take = bytes.len().min(self.room as usize);
        self.room -= take as u64;
        let _ = self.file.write_all(&bytes[..take]);
        if self.room == 0 {
            let _ = writeln!(
                self.file,
                "\n[mezod: this job's log reached {} MiB; further output is dropped]",
                MAX_LOG_BYTES >> 20
            );
        }
    }
}

/// Start the worker; `report` receives its step records, then its exit.
/// Call from the daemon's main thread: the death signal fires when the
/// *thread* that forked the child ends.
pub fn spawn(
    launch: &Launch,
    input: File,
    log: LogSink,
    report: impl Fn(WorkerEvent) + Send + 'static,
) -> Result<WorkerHandle> {
    let mut cmd = Command::new(launch.exe);
    cmd.arg("worker")
        .arg("--out")
        .arg(launch.out)
        .arg("--threads")
        .arg(launch.threads.to_string())
        .arg("--snapshot-every")
        .arg(launch.snapshot_every.to_string())
        .arg("--estimate")
        .arg(launch.estimate.to_string())
        .stdin(Stdio::from(input))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(cg) = launch.cgroup {
        // First of the child's steps: still root, every descriptor open.
        cg.place(&mut cmd)?;
    }
    super::handoff::owner_environment(&mut cmd, launch.run_as.as_ref());
    cmd.env(
        "MEZOD_LOG",
        std::env::var("MEZOD_LOG").unwrap_or("info".into()),
    )
    // Its own process group: a Ctrl-C at the daemon's terminal is for the
    // daemon, which then stops each worker at a step boundary.
    .process_group(0);
    if let Some(seat) = launch.replica {
        let (rank, world) = (seat.rank.to_string(), seat.world.to_string());
        cmd.env("RANK", &rank)
            .env("LOCAL_RANK", &rank)
            .env("WORLD_SIZE", &world)
            .env("LOCAL_WORLD_SIZE", &world)
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", seat.port.to_string())
            .env("TORCHELASTIC_RUN_ID", &seat.run_id);
        if seat.rank > 0 && std::env::var_os("MEZOD_LOG").is_none() {
            // The leader speaks for the job; the others say what goes wrong.
            cmd.env("MEZOD_LOG", "warn");
        }
    }
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
    super::handoff::become_owner_at_exec(
        &mut cmd,
        launch.run_as.clone(),
        "the daemon exited while starting a worker",
    );
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
    let exited = handle.pidfd.try_clone()?;
    std::thread::Builder::new()
        .name(format!("worker-{pid}"))
        .spawn(move || {
            read_worker(&mut child, &exited, log, &report);
            let status = child.wait().expect("waiting for a child of ours");
            report(WorkerEvent::Exited(status));
        })?;
    Ok(handle)
}

/// Read a worker's stdout (records, its job error) and stderr (its log)
/// until it exits.  The end is the process's exit, seen on its pidfd, not
/// the pipes' end: the owner can hold a copy of either pipe open forever,
/// and must not keep a finished job "running" by doing so.
fn read_worker(
    child: &mut Child,
    exited: &OwnedFd,
    mut log: LogSink,
    report: &impl Fn(WorkerEvent),
) {
    let mut out = child.stdout.take().map(OwnedFd::from);
    let mut err = child.stderr.take().map(OwnedFd::from);
    let mut lines = LineReader::default();
    let mut buf = vec![0u8; 64 << 10];
    let mut gone = false;
    while !gone && (out.is_some() || err.is_some()) {
        let mut fds: Vec<libc::pollfd> = [out.as_ref(), err.as_ref(), Some(exited)]
            .iter()
            .map(|fd| libc::pollfd {
                fd: fd.map_or(-1, |f| f.as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: three pollfds (-1 entries are ignored).
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 3, -1) };
        if r < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        gone = fds[2].revents != 0;
        if fds[0].revents != 0 && !pump(&mut out, &mut buf, |b| lines.feed(b, report)) {
            out = None;
        }
        if fds[1].revents != 0 && !pump(&mut err, &mut buf, |b| log.write(b)) {
            err = None;
        }
        if lines.violated {
            // Nothing more is read from a pipe someone else has written into.
            out = None;
        }
    }
    // The worker has exited: what it wrote last is still in the pipes.
    // Read what is there now, a bounded amount, without waiting.
    for (fd, to_log) in [(&mut out, false), (&mut err, true)] {
        let Some(f) = fd.as_ref() else { continue };
        // SAFETY: fcntl on a descriptor we own.
        unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        for _ in 0..64 {
            let more = if to_log {
                pump(fd, &mut buf, |b| log.write(b))
            } else {
                pump(fd, &mut buf, |b| lines.feed(b, report))
            };
            if !more || lines.violated {
                break;
            }
        }
    }
}

/// Read once from `fd` into `buf` and hand the bytes to `take`; false at
/// the pipe's end, on an error, or when nothing is there now (non-blocking).
fn pump(fd: &mut Option<OwnedFd>, buf: &mut [u8], mut take: impl FnMut(&[u8])) -> bool {
    let Some(f) = fd.as_ref() else { return false };
    // SAFETY: read into a buffer we own, of its length.
    let n = unsafe { libc::read(f.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n <= 0 {
        return false;
    }
    take(&buf[..n as usize]);
    true
}

/// Splits a worker's stdout into lines of at most [`MAX_LINE`] bytes and
/// reports each record or job error; a longer line is a violation.
#[derive(Default)]
struct LineReader {
    pending: Vec<u8>,
    violated: bool,
}

impl LineReader {
    fn feed(&mut self, mut bytes: &[u8], report: &impl Fn(WorkerEvent)) {
        while !self.violated && !bytes.is_empty() {
            match bytes.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    self.pending.extend_from_slice(&bytes[..=i]);
                    bytes = &bytes[i + 1..];
                    let line = std::mem::take(&mut self.pending);
                    if line.len() > MAX_LINE {
                        return self.violation(line.len(), report);
                    }
                    if let Ok(text) = std::str::from_utf8(&line) {
                        if let Some(rec) = decode(text) {
                            report(WorkerEvent::Record(rec));
                        } else if let Some(message) = decode_job_error(text) {
                            report(WorkerEvent::JobError(message));
                        }
                    }
                }
                None => {
                    self.pending.extend_from_slice(bytes);
                    bytes = &[];
                }
            }
            if self.pending.len() > MAX_LINE {
                return self.violation(self.pending.len(), report);
            }
        }
    }

    fn violation(&mut self, len: usize, report: &impl Fn(WorkerEvent)) {
        self.violated = true;
        self.pending = Vec::new();
        report(WorkerEvent::Violation(format!(
            "its worker's output held a line of over {len} bytes, longer than any record \
             (was something else writing into the worker's pipe?)"
        )));
    }
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
            spread: None,
            basis: None,
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
        // An FZOO step carries σ too.
        let fzoo = StepRecord {
            spread: Some(1.0 / 7.0),
            ..nspsa
        };
        assert_eq!(decode(&encode(&fzoo)).unwrap().spread, Some(1.0 / 7.0));
        // A LOZO step carries the seed of its V.
        let lozo = StepRecord {
            spread: None,
            basis: Some(u64::MAX),
            ..fzoo
        };
        assert_eq!(decode(&encode(&lozo)).unwrap().to_bytes(), lozo.to_bytes());
        assert_eq!(decode(&encode(&lozo)).unwrap().basis, Some(u64::MAX));
    }

    #[test]
    fn a_job_error_crosses_the_pipe_cut_to_its_bound() {
        let line = encode_job_error("data.jsonl line 21: no field \"text\"\nsecond line");
        assert_eq!(line.lines().count(), 1, "one line on the pipe");
        assert_eq!(
            decode_job_error(&line).unwrap(),
            "data.jsonl line 21: no field \"text\"\nsecond line"
        );
        assert!(decode(&line).is_none() && decode_job_error("R 00").is_none());
        let long = decode_job_error(&encode_job_error(&"é".repeat(MAX_JOB_ERROR))).unwrap();
        assert!(long.len() <= MAX_JOB_ERROR + '…'.len_utf8() && long.ends_with('…'));
    }

    #[test]
    fn faults_of_memory_disk_storage_gpu_and_daemon_are_transient() {
        let io = |kind| anyhow::Error::from(std::io::Error::from(kind)).context("writing");
        assert!(is_transient(&io(std::io::ErrorKind::StorageFull)));
        assert!(is_transient(&io(std::io::ErrorKind::BrokenPipe)));
        // EIO and ESTALE from a network filesystem.
        assert!(is_transient(
            &anyhow::Error::from(std::io::Error::from_raw_os_error(libc::EIO)).context("reading")
        ));
        assert!(is_transient(&anyhow::Error::from(
            std::io::Error::from_raw_os_error(libc::ESTALE)
        )));
        assert!(is_transient(&anyhow::anyhow!(
            "CUDA error: an illegal memory access was encountered"
        )));
        assert!(is_transient(&anyhow::anyhow!(
            "CUBLAS_STATUS_EXECUTION_FAILED"
        )));
        assert!(!is_transient(&io(std::io::ErrorKind::PermissionDenied)));
        assert!(!is_transient(&anyhow::anyhow!(
            "data.jsonl line 21: no field \"text\""
        )));
        assert!(is_transient(&anyhow::anyhow!(
            "CUDA out of memory. Tried to allocate 2.00 GiB"
        )));
        assert!(!is_transient(&io(std::io::ErrorKind::NotFound)));
        assert!(!is_transient(&anyhow::anyhow!(
            "model_type \"falcon\" is not supported"
        )));
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
    fn worker_input_holds_the_spec_and_records_of_any_length() {
        let one = |step| StepRecord {
            step,
            seed: step + 100,
            projected_grad: 0.5,
            loss_plus: 1.0,
            loss_minus: 2.0,
            lr: 1e-3,
            more: vec![],
            spread: None,
            basis: None,
        };
        let mut records = vec![one(0), one(1), one(2)];
        records[2].spread = Some(0.3);
        records[1].more.push(Direction {
            seed: 9,
            projected_grad: 0.25,
            loss_plus: 1.0,
            loss_minus: 1.5,
        });
        let spec = "model: {path: /m}\n# é\n";
        let bytes = encode_input(spec, &records);
        assert_eq!(
            decode_input(&bytes).unwrap(),
            (spec.to_string(), records.clone())
        );
        // Read back through the memory file a worker gets as stdin.
        let mut back = Vec::new();
        std::io::Read::read_to_end(
            &mut crate::safe_fs::memory_file("t", &bytes).unwrap(),
            &mut back,
        )
        .unwrap();
        assert_eq!(back, bytes);
        let mut cut = bytes.clone();
        cut.truncate(bytes.len() - 3);
        assert!(format!("{:#}", decode_input(&cut).unwrap_err()).contains("damaged"));
        assert!(decode_input(b"R 00").is_err());
        assert_eq!(
            decode_input(&encode_input("", &[])).unwrap(),
            (String::new(), vec![])
        );
    }
}
