//! The control socket: `mezod status | cancel | logs | submit` talk to the
//! daemon over a Unix socket in its runtime directory, one JSON request and
//! one JSON response per connection.  The daemon learns who is asking from
//! the kernel (`SO_PEERCRED`), never from the request.

use std::io::{BufRead, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
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
    pub fn may_manage(&self, owner_uid: u32) -> bool {
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
                    let submit = submit.clone();
                    tokio::spawn(async move {
                        if let Err(e) = answer(stream, limits, submit).await {
                            tracing::debug!("control connection: {e:#}");
                        }
                        drop(permit);
                    });
                }
            })
        })
        .context("spawning the control thread")?;
    Ok(())
}

async fn answer(stream: UnixStream, limits: Limits, submit: impl Fn(Call)) -> Result<()> {
    let cred = stream.peer_cred().context("SO_PEERCRED")?;
    let peer = Peer {
        uid: cred.uid(),
        gid: cred.gid(),
        pid: cred.pid().unwrap_or(0),
    };
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

/// Where clients look for the daemon: `$MEZOD_SOCKET`, `./var/run/mezod.sock`
/// (a daemon started here without systemd), then `/run/mezod/mezod.sock`.
pub fn default_socket() -> PathBuf {
    if let Some(p) = std::env::var_os("MEZOD_SOCKET") {
        return PathBuf::from(p);
    }
    let local = PathBuf::from("var/run/mezod.sock");
    if local.exists() {
        return local;
    }
    PathBuf::from("/run/mezod/mezod.sock")
}

/// Send one request and wait for the answer.
pub fn request(socket: &Path, req: &Request) -> Result<Response> {
    let stream = std::os::unix::net::UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach the daemon at {} (is it running? start it with `mezod daemon` or \
             `systemctl start mezod`; --socket or MEZOD_SOCKET point elsewhere)",
            socket.display()
        )
    })?;
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
        // thread, and at most one of another test's server), and they time out.
        let idle: Vec<_> = (0..40)
            .map(|_| std::os::unix::net::UnixStream::connect(&path).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        assert!(threads_named("control") <= before + 2);
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
        let mut answer = String::new();
        (&big).read_to_string(&mut answer).unwrap();
        assert!(
            answer.contains("request longer than 1024 bytes"),
            "{answer}"
        );
    }
}
