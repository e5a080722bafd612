//! The control socket: `mezod status | cancel | logs | submit` talk to the
//! daemon over a Unix socket in its runtime directory, one JSON request and
//! one JSON response per connection.  The daemon learns who is asking from
//! the kernel (`SO_PEERCRED`), never from the request.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::jobs::JobRecord;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    /// The daemon's spool and version.
    Hello,
    /// One job, or every active job and the `finished` newest ended ones
    /// (default [`DEFAULT_FINISHED_SHOWN`]).
    Status {
        id: Option<u64>,
        #[serde(default)]
        finished: Option<usize>,
    },
    Cancel {
        id: u64,
    },
    /// Bytes of the job's log from `offset` on.
    Logs {
        id: u64,
        offset: u64,
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
    Cancelled {
        id: u64,
        state: String,
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

pub fn peer_of(stream: &UnixStream) -> Result<Peer> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred and len are valid for the kernel to write a ucred into.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("SO_PEERCRED");
    }
    Ok(Peer {
        uid: cred.uid,
        gid: cred.gid,
        pid: cred.pid,
    })
}

/// A request waiting for the daemon's main loop to answer it.
pub struct Call {
    pub request: Request,
    pub peer: Peer,
    pub reply: mpsc::Sender<Response>,
}

/// Accept connections forever, handing each request to `submit`.
pub fn serve(listener: UnixListener, submit: impl Fn(Call) + Send + Sync + Clone + 'static) {
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let submit = submit.clone();
                let _ = std::thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || {
                        if let Err(e) = answer(stream, submit) {
                            tracing::debug!("control connection: {e:#}");
                        }
                    });
            }
        })
        .expect("spawning the control thread");
}

fn answer(stream: UnixStream, submit: impl Fn(Call)) -> Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let peer = peer_of(&stream)?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    let response = match serde_json::from_str::<Request>(&line) {
        Ok(request) => {
            let (tx, rx) = mpsc::channel();
            submit(Call {
                request,
                peer,
                reply: tx,
            });
            rx.recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| Response::Error("the daemon did not answer in time".into()))
        }
        Err(e) => Response::Error(format!("malformed request: {e}")),
    };
    let mut w = &stream;
    w.write_all(serde_json::to_string(&response)?.as_bytes())?;
    w.write_all(b"\n")?;
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
    let stream = UnixStream::connect(socket).with_context(|| {
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
    BufReader::new(&stream).read_line(&mut line)?;
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
        serve(listener, |call: Call| {
            let Request::Status { id, .. } = call.request else {
                return;
            };
            let _ = call.reply.send(Response::Error(format!(
                "uid {} pid {} id {id:?}",
                call.peer.uid, call.peer.pid
            )));
        });
        let r = request(
            &path,
            &Request::Status {
                id: Some(3),
                finished: None,
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
}
