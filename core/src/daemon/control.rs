//! The control socket: `mezod status | cancel | logs | submit` talk to the
//! daemon over a Unix socket in its runtime directory, one JSON request and
//! one JSON response per connection.  The daemon learns who is asking from
//! the kernel (`SO_PEERCRED`), never from the request.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{oneshot, Semaphore};

use super::jobs::JobRecord;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    /// The daemon's spool and version.
    Hello,
    /// One job, or every active job and the `finished` newest ended ones
    /// (default [`DEFAULT_FINISHED_SHOWN`]), of the given states and owner
    /// if named.
    Status {
        id: Option<u64>,
        #[serde(default)]
        finished: Option<usize>,
        /// Only jobs in these states (`queued`, `running`, `failed`, …).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        states: Vec<String>,
        /// Only jobs of this uid.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<u32>,
    },
    /// One job in detail (its owner or root see its files, summary and error).
    Show {
        id: u64,
    },
    Cancel {
        id: u64,
    },
    /// Queue a failed or cancelled job again (it resumes from its seed log).
    Restart {
        id: u64,
    },
    /// Forget ended jobs (`ids`, or all of the asker's when empty); with
    /// `purge` their folders go too.
    Clean {
        #[serde(default)]
        ids: Vec<u64>,
        #[serde(default)]
        purge: bool,
    },
    /// Bytes of the job's log from `offset` on; with `tail`, its last `tail`
    /// lines instead (and the log's length as the next offset).
    Logs {
        id: u64,
        offset: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tail: Option<usize>,
    },
    /// What became of a file dropped into the spool.
    Lookup {
        name: String,
    },
    /// Set a job's priority: root and the admin group to any value, its
    /// owner only lower than it is.
    Priority {
        id: u64,
        priority: i32,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Hello {
        spool: PathBuf,
        version: String,
    },
    Status(StatusReport),
    Job(Box<JobDetail>),
    Cancelled {
        id: u64,
        state: String,
    },
    Restarted {
        id: u64,
        from_step: u64,
    },
    Cleaned {
        ids: Vec<u64>,
        purged: bool,
    },
    Logs {
        data: String,
        offset: u64,
        finished: bool,
    },
    Lookup(Lookup),
    Prioritized {
        id: u64,
        priority: i32,
    },
    Error(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Lookup {
    Pending,
    Accepted { id: u64 },
    Rejected { reason: String },
}

/// Ended jobs `mezod status` lists unless asked for more.
pub const DEFAULT_FINISHED_SHOWN: usize = 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    /// "gpu" or "cpu only (why)".
    pub mode: String,
    pub pools: Vec<PoolView>,
    pub jobs: Vec<JobView>,
    /// Ended jobs in the table but not in `jobs`.
    #[serde(default)]
    pub finished_not_shown: usize,
    /// Fair share: each user's recent usage, largest first.
    #[serde(default)]
    pub users: Vec<UserUsage>,
    /// The half-life usage decays with, in hours.
    #[serde(default)]
    pub half_life_h: f64,
}

/// One user's recent usage (decayed device-seconds) and its share of all.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserUsage {
    pub uid: u32,
    pub device_seconds: f64,
    /// This user's part of every user's usage, 0 to 1.
    pub share: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolView {
    pub name: String,
    pub total_bytes: u64,
    pub free_bytes: u64,
    pub running: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobView {
    #[serde(flatten)]
    pub job: JobRecord,
    pub steps_per_s: Option<f64>,
    pub eta_s: Option<f64>,
}

/// One job in detail: `mezod status ID`.  The paths, summary and error
/// are given to the job's owner and root only.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobDetail {
    #[serde(flatten)]
    pub view: JobView,
    /// The job file as the daemon accepted it.
    pub job_file: Option<PathBuf>,
    /// What the worker writes (the owner's).
    pub run_dir: Option<PathBuf>,
    /// The last lines of the job's error file, if it failed.
    #[serde(default)]
    pub error_tail: Vec<String>,
}

/// States a `Status` request may filter on.
pub const STATES: [&str; 7] = [
    "queued",
    "admitted",
    "running",
    "preempted",
    "done",
    "failed",
    "cancelled",
];

/// Who is on the other end of a connection, as the kernel says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: i32,
}

impl Peer {
    /// Only the job's owner or root may cancel it or read its log.
    pub(crate) fn may_manage(&self, owner_uid: u32) -> bool {
        self.uid == 0 || self.uid == owner_uid
    }
}

/// A request waiting for the daemon's main loop to answer it.
pub struct Call {
    pub request: Request,
    pub peer: Peer,
    pub reply: oneshot::Sender<Response>,
}

/// What any one client can cost the daemon: every byte on the socket comes
/// from a local user, possibly a hostile one.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; more wait in the kernel's backlog.
    pub connections: usize,
    /// Connections one uid may hold at once (root: no limit); more are
    /// answered at once with an error and closed, so that one user's idle
    /// connections never take the slots other users need.
    pub per_uid: usize,
    /// The longest request line.
    pub request_bytes: usize,
    /// How long a client has to send its request.
    pub read_timeout: Duration,
    /// How long the main loop has to answer it.
    pub answer_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            connections: 64,
            per_uid: 8,
            request_bytes: 64 << 10,
            read_timeout: Duration::from_secs(10),
            answer_timeout: Duration::from_secs(30),
        }
    }
}

/// Accept connections on one thread forever, handing each request to `submit`.
///
/// tokio (a current-thread runtime) rather than a thread per connection: idle
/// or slow clients cost a task each, not a thread, and a semaphore bounds how
/// many are served at once.  The main loop stays a plain thread that owns all
/// state; it answers through a oneshot channel.
///
/// Each uid but root holds at most [`Limits::per_uid`] of those slots: a
/// connection over its uid's share is answered at once ("too many
/// connections") and closed, and gives its slot back before anything else
/// (see [`refuse`]).
pub fn serve(
    listener: UnixListener,
    limits: Limits,
    submit: impl Fn(Call) + Send + Sync + Clone + 'static,
) -> Result<()> {
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .context("starting the control socket's runtime")?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            runtime.block_on(async move {
                let listener = match tokio::net::UnixListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => return tracing::error!("control socket: {e}"),
                };
                let permits = Arc::new(Semaphore::new(limits.connections));
                let refusals = Arc::new(Semaphore::new(REFUSALS));
                let held = Arc::new(Mutex::new(HashMap::new()));
                loop {
                    let Ok(permit) = permits.clone().acquire_owned().await else {
                        return;
                    };
                    let stream = match listener.accept().await {
                        Ok((stream, _)) => stream,
                        Err(e) => {
                            tracing::debug!("control socket accept: {e}");
                            continue;
                        }
                    };
                    let peer = match stream.peer_cred() {
                        Ok(cred) => Peer {
                            uid: cred.uid(),
                            gid: cred.gid(),
                            pid: cred.pid().unwrap_or(0),
                        },
                        Err(e) => {
                            tracing::debug!("control connection: SO_PEERCRED: {e}");
                            continue;
                        }
                    };
                    let Some(share) = UidShare::take(&held, peer.uid, limits.per_uid) else {
                        drop(permit);
                        // Answered outside the connection slots, a few at a
                        // time; past that, closed without an answer.
                        if let Ok(r) = refusals.clone().try_acquire_owned() {
                            tokio::spawn(async move {
                                refuse(stream, peer.uid, limits).await;
                                drop(r);
                            });
                        }
                        continue;
                    };
                    let submit = submit.clone();
                    tokio::spawn(async move {
                        if let Err(e) = answer(stream, peer, limits, submit).await {
                            tracing::debug!("control connection: {e:#}");
                        }
                        drop(share);
                        drop(permit);
                    });
                }
            })
        })
        .context("spawning the control thread")?;
    Ok(())
}

/// Connections over their uid's share being answered at once, at most.
const REFUSALS: usize = 16;

/// How long a refused connection may take to send its request (read and
/// dropped, so that a client that writes after the answer is not cut off by
/// a broken pipe before it reads it).
const REFUSAL_DRAIN: Duration = Duration::from_millis(200);

/// One of a uid's connection slots, given back when dropped.
struct UidShare {
    held: Arc<Mutex<HashMap<u32, usize>>>,
    uid: u32,
}

impl UidShare {
    /// A slot for `uid` if it holds fewer than `cap` (root: always, uncounted).
    fn take(held: &Arc<Mutex<HashMap<u32, usize>>>, uid: u32, cap: usize) -> Option<Option<Self>> {
        if uid == 0 {
            return Some(None);
        }
        let mut map = held.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(uid).or_insert(0);
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(Some(Self {
            held: held.clone(),
            uid,
        }))
    }
}

impl Drop for UidShare {
    fn drop(&mut self) {
        let mut map = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.uid);
            }
        }
    }
}

/// Answer a connection over its uid's share with an error, at once, and
/// close it (after reading what it sent within [`REFUSAL_DRAIN`]).
async fn refuse(stream: UnixStream, uid: u32, limits: Limits) {
    let response = Response::Error(format!(
        "uid {uid} already has {} connections open to the daemon, the most one user may \
         hold; try again once they are closed",
        limits.per_uid
    ));
    let Ok(text) = serde_json::to_string(&response) else {
        return;
    };
    let (read, mut write) = stream.into_split();
    let sent = tokio::time::timeout(
        REFUSAL_DRAIN,
        write.write_all(format!("{text}\n").as_bytes()),
    )
    .await;
    if !matches!(sent, Ok(Ok(()))) {
        return;
    }
    let mut line = Vec::new();
    let mut reader = BufReader::new(read).take(limits.request_bytes as u64 + 1);
    let _ = tokio::time::timeout(REFUSAL_DRAIN, reader.read_until(b'\n', &mut line)).await;
}

async fn answer(
    stream: UnixStream,
    peer: Peer,
    limits: Limits,
    submit: impl Fn(Call),
) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = Vec::new();
    let mut reader = BufReader::new(read).take(limits.request_bytes as u64 + 1);
    let got = tokio::time::timeout(limits.read_timeout, reader.read_until(b'\n', &mut line)).await;
    let response = match got {
        Err(_) => Response::Error(format!(
            "no request within {}s",
            limits.read_timeout.as_secs_f64()
        )),
        Ok(Err(e)) => return Err(e.into()),
        Ok(Ok(_)) if line.len() > limits.request_bytes => Response::Error(format!(
            "request longer than {} bytes",
            limits.request_bytes
        )),
        Ok(Ok(_)) => match serde_json::from_slice::<Request>(&line) {
            Ok(request) => {
                let (tx, rx) = oneshot::channel();
                submit(Call {
                    request,
                    peer,
                    reply: tx,
                });
                match tokio::time::timeout(limits.answer_timeout, rx).await {
                    Ok(Ok(r)) => r,
                    _ => Response::Error("the daemon did not answer in time".into()),
                }
            }
            Err(e) => Response::Error(format!("malformed request: {e}")),
        },
    };
    write
        .write_all(format!("{}\n", serde_json::to_string(&response)?).as_bytes())
        .await?;
    Ok(())
}

/// The systemd unit's control socket (`RuntimeDirectory=mezod`).
pub const SYSTEM_SOCKET: &str = "/run/mezod/mezod.sock";

/// Where clients look for the daemon: `$MEZOD_SOCKET` if set, else the
/// systemd unit's [`SYSTEM_SOCKET`].  Never a socket that happens to sit in
/// the current folder: root running `mezod status` in a folder another user
/// prepared would talk to that user's fake daemon, and `submit` would write
/// wherever its answer pointed.  A daemon started by hand is named with
/// `--socket` or `MEZOD_SOCKET`.
pub fn default_socket() -> PathBuf {
    match std::env::var_os("MEZOD_SOCKET") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(SYSTEM_SOCKET),
    }
}

/// How a user names another socket, for errors.
const POINT_ELSEWHERE: &str = "name the daemon's socket with --socket PATH or MEZOD_SOCKET=PATH";

/// Whether `uid` may serve this client: root, or the caller itself.
pub(crate) fn trusted(uid: u32) -> bool {
    uid == 0 || uid == rustix::process::geteuid().as_raw()
}

/// `uid` with its user name, for errors.
pub(crate) fn who(uid: u32) -> String {
    match crate::identity::name_of(uid) {
        Some(name) => format!("uid {uid} ({name})"),
        None => format!("uid {uid}"),
    }
}

/// Connect to the daemon at `socket`, if it can be trusted: the socket file
/// (never a link) and the folder holding it belong to root or to the caller,
/// that folder is not writable by others (unless sticky), and the process
/// that listens runs as root or the caller (`SO_PEERCRED`).  Anyone else's
/// socket could be a fake daemon, whose answers the client would print and
/// `submit` would act on.  The folder is held open while the socket is
/// checked and reached through it, so nothing is swapped in between.
pub fn connect(socket: &Path) -> Result<std::os::unix::net::UnixStream> {
    use rustix::fs::{FileType, Mode, OFlags};
    let unreachable = |e: &dyn std::fmt::Display| {
        anyhow::anyhow!(
            "cannot reach the daemon at {} ({e}). Is it running? `systemctl start mezod` or \
             `mezod daemon` starts it. Without --socket or MEZOD_SOCKET clients look at \
             {SYSTEM_SOCKET} (the systemd unit's); a daemon started by hand listens at \
             <its runtime folder>/mezod.sock (var/run/mezod.sock under the folder it started in): \
             {POINT_ELSEWHERE}",
            socket.display()
        )
    };
    let Some(name) = socket.file_name() else {
        bail!("{} does not name a socket", socket.display());
    };
    let folder = match socket.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = rustix::fs::open(
        folder,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| unreachable(&e))?;
    let st = rustix::fs::fstat(&dir)?;
    if !trusted(st.st_uid) {
        bail!(
            "refusing the socket {}: its folder {} belongs to {}, neither root nor you, \
             so whatever listens there may not be the daemon; {POINT_ELSEWHERE}",
            socket.display(),
            folder.display(),
            who(st.st_uid)
        );
    }
    if st.st_mode & 0o022 != 0 && st.st_mode & 0o1000 == 0 {
        bail!(
            "refusing the socket {}: its folder {} may be written by others (mode {:o}), \
             who could put their own socket there",
            socket.display(),
            folder.display(),
            st.st_mode & 0o7777
        );
    }
    let st = rustix::fs::statat(&dir, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
        .map_err(|e| unreachable(&e))?;
    if FileType::from_raw_mode(st.st_mode) != FileType::Socket {
        bail!(
            "{} is not a socket (a link or a file is never followed to one)",
            socket.display()
        );
    }
    if !trusted(st.st_uid) {
        bail!(
            "refusing the socket {}: it belongs to {}, neither root nor you, \
             so whatever listens there may not be the daemon; {POINT_ELSEWHERE}",
            socket.display(),
            who(st.st_uid)
        );
    }
    // Through the folder held open (/proc/self/fd), so the checked folder is
    // the one reached; the path itself where /proc is missing or the
    // name too long for a socket address.
    use std::os::fd::AsRawFd;
    let held = Path::new("/proc/self/fd")
        .join(dir.as_raw_fd().to_string())
        .join(name);
    let via = if held.as_os_str().len() < 100 && Path::new("/proc/self/fd").is_dir() {
        held
    } else {
        socket.to_path_buf()
    };
    let stream = std::os::unix::net::UnixStream::connect(&via).map_err(|e| unreachable(&e))?;
    let peer = peer_uid(&stream)?;
    if !trusted(peer) {
        bail!(
            "refusing the socket {}: the process listening there runs as {}, neither root nor you",
            socket.display(),
            who(peer)
        );
    }
    Ok(stream)
}

/// The uid of the process on the other end (for a client: the one that
/// listened), as the kernel says.
fn peer_uid(stream: &std::os::unix::net::UnixStream) -> Result<u32> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of a ucred, as SO_PEERCRED needs.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("asking who serves the socket");
    }
    Ok(cred.uid)
}

/// Send one request and wait for the answer.
pub fn request(socket: &Path, req: &Request) -> Result<Response> {
    let stream = connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut w = &stream;
    w.write_all(serde_json::to_string(req)?.as_bytes())?;
    w.write_all(b"\n")?;
    let mut line = String::new();
    std::io::BufReader::new(&stream).read_line(&mut line)?;
    if line.is_empty() {
        bail!("the daemon closed the connection without answering");
    }
    Ok(serde_json::from_str(&line)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_names_the_peer_and_requests_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        serve(listener, Limits::default(), |call: Call| {
            let Request::Status { id, .. } = call.request else {
                return;
            };
            let _ = call.reply.send(Response::Error(format!(
                "uid {} pid {} id {id:?}",
                call.peer.uid, call.peer.pid
            )));
        })
        .unwrap();
        let r = request(
            &path,
            &Request::Status {
                id: Some(3),
                finished: None,
                states: vec![],
                owner: None,
            },
        )
        .unwrap();
        let me = unsafe { libc::getuid() };
        match r {
            Response::Error(s) => {
                assert_eq!(s, format!("uid {me} pid {} id Some(3)", std::process::id()))
            }
            other => panic!("{other:?}"),
        }
        assert!(Peer {
            uid: 0,
            gid: 0,
            pid: 1
        }
        .may_manage(1000));
        assert!(Peer {
            uid: 1000,
            gid: 0,
            pid: 1
        }
        .may_manage(1000));
        assert!(!Peer {
            uid: 1001,
            gid: 0,
            pid: 1
        }
        .may_manage(1000));
    }

    /// Threads of this process whose name starts with `prefix`.
    fn threads_named(prefix: &str) -> usize {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter(|t| {
                let comm = t.as_ref().unwrap().path().join("comm");
                std::fs::read_to_string(comm).is_ok_and(|n| n.starts_with(prefix))
            })
            .count()
    }

    #[test]
    fn hostile_clients_are_bounded_in_time_size_and_threads() {
        use std::io::Read;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let limits = Limits {
            connections: 4,
            per_uid: 4,
            request_bytes: 1024,
            read_timeout: Duration::from_millis(300),
            answer_timeout: Duration::from_secs(5),
        };
        let before = threads_named("control");
        serve(UnixListener::bind(&path).unwrap(), limits, |call: Call| {
            let _ = call.reply.send(Response::Error("answered".into()));
        })
        .unwrap();
        // 40 idle connections: no thread per connection (this server's one
        // thread, and one for each server other tests start meanwhile), and
        // they time out.
        let idle: Vec<_> = (0..40)
            .map(|_| std::os::unix::net::UnixStream::connect(&path).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        assert!(threads_named("control") <= before + 8);
        // With every connection slot held by an idle client, a real request
        // is still answered once the idle ones time out.
        assert!(matches!(
            request(&path, &Request::Hello).unwrap(),
            Response::Error(s) if s == "answered"
        ));
        let mut first = String::new();
        let mut c = &idle[0];
        c.read_to_string(&mut first).unwrap();
        assert!(first.contains("no request within"), "{first}");
        // A megabyte with no newline is refused after the limit, not buffered.
        let mut big = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let sent = std::thread::spawn(move || {
            let _ = big.write_all(&vec![b'x'; 1 << 20]);
            big
        });
        let big = sent.join().unwrap();
        // The daemon closes with the rest of the megabyte unread, so after
        // its answer the client may read a reset rather than an end.
        let mut bytes = Vec::new();
        let _ = (&big).read_to_end(&mut bytes);
        let answer = String::from_utf8_lossy(&bytes);
        assert!(
            answer.contains("request longer than 1024 bytes"),
            "{answer}"
        );
    }

    /// In a forked child, as `uid`: connect `n` times to `addr`, send a Hello
    /// on connection `ask` (if any) and report its answer on `report`, then
    /// hold every connection until killed.  Only async-signal-safe calls.
    ///
    /// # Safety
    /// Call only in a freshly forked child.
    unsafe fn connect_as(
        uid: u32,
        addr: &libc::sockaddr_un,
        n: usize,
        ask: Option<usize>,
        report: libc::c_int,
        hold: bool,
    ) -> ! {
        if libc::setgroups(0, std::ptr::null()) != 0
            || libc::setgid(uid) != 0
            || libc::setuid(uid) != 0
        {
            libc::_exit(10);
        }
        let mut fds = [0; 64];
        for (i, slot) in fds.iter_mut().enumerate().take(n) {
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            if fd < 0 || libc::connect(fd, (addr as *const libc::sockaddr_un).cast(), len) != 0 {
                libc::_exit(11);
            }
            *slot = fd;
            if ask == Some(i) {
                // An answer that does not come fails the test, not hangs it.
                let wait = libc::timeval {
                    tv_sec: 5,
                    tv_usec: 0,
                };
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&wait as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                );
                let hello = b"\"hello\"\n";
                libc::write(fd, hello.as_ptr().cast(), hello.len());
                let mut buf = [0u8; 1024];
                let got = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
                if got > 0 {
                    libc::write(report, buf.as_ptr().cast(), got as usize);
                }
            }
        }
        libc::write(report, b"|".as_ptr().cast(), 1);
        if hold {
            loop {
                libc::pause();
            }
        }
        libc::_exit(0)
    }

    /// A forked client, killed and reaped when dropped (a failed test
    /// leaves no process of another uid behind).
    struct Client(libc::pid_t);

    impl Drop for Client {
        fn drop(&mut self) {
            let mut status = 0;
            unsafe {
                libc::kill(self.0, libc::SIGKILL);
                libc::waitpid(self.0, &mut status, 0);
            }
        }
    }

    /// Fork a child running [`connect_as`]; the child and what it reports.
    fn fork_client(
        uid: u32,
        addr: &libc::sockaddr_un,
        n: usize,
        ask: Option<usize>,
        hold: bool,
    ) -> (Client, std::fs::File) {
        use std::os::fd::FromRawFd;
        let mut pipe = [0; 2];
        assert_eq!(
            unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) },
            0
        );
        // SAFETY: the child calls connect_as only, which never returns.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            unsafe {
                libc::close(pipe[0]);
                connect_as(uid, addr, n, ask, pipe[1], hold)
            }
        }
        unsafe { libc::close(pipe[1]) };
        (Client(pid), unsafe { std::fs::File::from_raw_fd(pipe[0]) })
    }

    /// Read what a child reports, up to its "|".
    fn report(from: &mut std::fs::File) -> String {
        use std::io::Read;
        let mut got = Vec::new();
        let mut byte = [0u8];
        while from.read(&mut byte).unwrap() == 1 && byte[0] != b'|' {
            got.push(byte[0]);
        }
        String::from_utf8_lossy(&got).into_owned()
    }

    /// One user (uid 65534) holds 40 idle connections, more than the server
    /// serves at once: it gets its share (4 of 8), its other connections are
    /// answered at once with an error, and another user (uid 65533) is
    /// answered at once while the hog's connections stay open.
    #[test]
    fn one_users_idle_connections_leave_the_others_room() {
        use std::os::unix::fs::PermissionsExt;
        if unsafe { libc::geteuid() } != 0 {
            println!("SKIPPED: needs root to connect as two other uids");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.path().join("s.sock");
        let limits = Limits {
            connections: 8,
            per_uid: 4,
            request_bytes: 1024,
            read_timeout: Duration::from_secs(60),
            answer_timeout: Duration::from_secs(5),
        };
        let listener = UnixListener::bind(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        serve(listener, limits, |call: Call| {
            let _ = call
                .reply
                .send(Response::Error(format!("answered uid {}", call.peer.uid)));
        })
        .unwrap();
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in addr
            .sun_path
            .iter_mut()
            .zip(path.as_os_str().as_encoded_bytes())
        {
            *d = *s as libc::c_char;
        }
        // The hog asks on its fifth connection, the first over its share.
        let (_hog, mut hog_report) = fork_client(65534, &addr, 40, Some(4), true);
        let refused = report(&mut hog_report);
        assert!(
            refused.contains("uid 65534 already has 4 connections open"),
            "{refused:?}"
        );
        // Every connection of the hog is made (and its first four idle in
        // their slots) before the victim asks.
        let started = std::time::Instant::now();
        let (victim, mut victim_report) = fork_client(65533, &addr, 1, Some(0), false);
        let answer = report(&mut victim_report);
        let took = started.elapsed();
        drop(victim);
        assert!(answer.contains("answered uid 65533"), "{answer:?}");
        assert!(took < Duration::from_secs(1), "the victim waited {took:?}");
        // Root is not capped.
        let roots: Vec<_> = (0..6)
            .map(|_| std::os::unix::net::UnixStream::connect(&path).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        for c in &roots {
            c.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let mut buf = [0u8; 16];
            assert!(
                std::io::Read::read(&mut &*c, &mut buf).is_err(),
                "a root connection was refused"
            );
        }
    }

    #[test]
    fn a_client_talks_only_to_a_socket_of_roots_or_its_own() {
        use std::os::unix::fs::PermissionsExt;
        if std::env::var_os("MEZOD_SOCKET").is_none() {
            assert_eq!(default_socket(), PathBuf::from(SYSTEM_SOCKET));
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        // Listening is enough to connect (no server thread: other tests count them).
        let _listener = UnixListener::bind(&path).unwrap();
        assert!(connect(&path).is_ok());
        // A link to the right socket is still a link: never followed.
        let link = dir.path().join("link.sock");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let e = connect(&link).unwrap_err().to_string();
        assert!(e.contains("not a socket"), "{e}");
        // Nothing there: where it looked, and how to look elsewhere.
        let e = connect(&dir.path().join("none.sock"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("none.sock") && e.contains("--socket") && e.contains(SYSTEM_SOCKET),
            "{e}"
        );
        // A folder others may write into (and swap the socket in).
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = connect(&path).unwrap_err().to_string();
        assert!(e.contains("may be written by others"), "{e}");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(
            connect(&path).is_ok(),
            "a sticky folder keeps others off the socket"
        );
        if rustix::process::geteuid().is_root() {
            // Another user's socket, or one in another user's folder.
            std::os::unix::fs::lchown(&path, Some(65534), None).unwrap();
            let e = connect(&path).unwrap_err().to_string();
            assert!(e.contains("it belongs to uid 65534"), "{e}");
            std::os::unix::fs::lchown(&path, Some(0), None).unwrap();
            std::os::unix::fs::chown(dir.path(), Some(65534), None).unwrap();
            let e = connect(&path).unwrap_err().to_string();
            assert!(
                e.contains("its folder") && e.contains("belongs to uid 65534"),
                "{e}"
            );
        }
    }
}
