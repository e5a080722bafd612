//! A few bytes per step between a job's replica processes, over PyTorch's own
//! c10d: a TCPStore for the rendezvous and a ProcessGroupGloo for the
//! collectives, both from the libtorch_cpu.so the engine links, reached
//! through csrc/c10d_shim.cpp.
//!
//! Invariants:
//! - Every rank issues the same collectives in the same order, with frames of
//!   the same length (see [`Group::all_gather`]).
//! - A failed collective breaks the group for good: later calls fail at once,
//!   and the process should stop at its step boundary and drop (or
//!   [`Group::abandon`]) the group. A replica that has *died* is noticed at
//!   once, by its sockets closing; one that *hangs* only after the timeout.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use mezod::replicas::{c10d::Group, launch_env::LaunchEnv};
//! use std::time::Duration;
//! if let Some(env) = LaunchEnv::from_env()? {
//!     let group = Group::join(&env, Duration::from_secs(60))?;
//!     let all = group.all_gather(&1.5f64.to_le_bytes())?; // one Vec per rank
//! }
//! # Ok(())
//! # }
//! ```

use std::cell::Cell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::ptr::NonNull;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::launch_env::LaunchEnv;

extern "C" {
    fn mezod_c10d_group_new(
        master_addr: *const c_char,
        master_port: u16,
        rank: c_int,
        world_size: c_int,
        timeout_ms: i64,
        host_store: c_int,
        key_prefix: *const c_char,
        err: *mut c_char,
        errlen: usize,
    ) -> *mut c_void;
    fn mezod_c10d_all_gather(
        handle: *mut c_void,
        input: *const u8,
        len: usize,
        out: *mut u8,
        err: *mut c_char,
        errlen: usize,
    ) -> c_int;
    fn mezod_c10d_barrier(handle: *mut c_void, err: *mut c_char, errlen: usize) -> c_int;
    fn mezod_c10d_group_free(handle: *mut c_void);
}

/// The shim's return codes (csrc/c10d_shim.cpp).
const OK: c_int = 0;
const ERR_TIMEOUT: c_int = 2;

/// Room for the shim's error message.
const ERRLEN: usize = 2048;

/// One Gloo process group over all of a launch's ranks. `Send`, not `Sync`:
/// one thread at a time issues its collectives.
pub struct Group {
    handle: NonNull<c_void>,
    rank: usize,
    world: usize,
    timeout: Duration,
    /// Set by the first failed collective: Gloo's pairs are then closed or
    /// desynchronised, so no later collective may be tried.
    broken: Cell<bool>,
}

// The C++ group may be used from any thread, one call at a time (`!Sync`).
unsafe impl Send for Group {}

/// What a failed shim call says, without Gloo's source-location prefix
/// ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:547] ").
fn shim_message(buf: &[u8]) -> String {
    let text = CStr::from_bytes_until_nul(buf)
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_else(|_| String::from_utf8_lossy(buf).into_owned());
    let text = text.trim();
    if let Some(rest) = text.strip_prefix('[') {
        if let Some((location, message)) = rest.split_once("] ") {
            if location.contains(".cc:") || location.contains(".cpp:") || location.contains(".h:") {
                return message.trim().to_string();
            }
        }
    }
    text.to_string()
}

/// "10s", "2.5s".
fn seconds(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0}s")
    } else {
        format!("{s:.1}s")
    }
}

/// c10d and Gloo say "timed out" only in words ("Operation timed out!",
/// "Timed out after 2 seconds waiting for clients").
fn is_timeout_message(message: &str) -> bool {
    message.contains("imed out") || message.contains("timeout")
}

/// Why `join` failed, in words: nobody came in time, or the store or a peer
/// could not be reached (an address in use, a refused connection).
fn join_error(env: &LaunchEnv, timeout: Duration, message: &str) -> anyhow::Error {
    let (r, w) = (env.rank, env.world);
    let store = format!("{}:{}", env.master_addr, env.master_port);
    transport(if is_timeout_message(message) {
        format!(
            "no answer from the other replicas within {} (rank {r} of {w}, store at {store}): \
             {message} (c10d/Gloo)",
            seconds(timeout)
        )
    } else {
        format!(
            "rank {r} of {w} could not join the other replicas at {store}: {message} (c10d/Gloo)"
        )
    })
}

/// A failure of the replicas' connections, as an I/O error: not the job's
/// own (a replica died, was stopped, or the network failed), so a daemon
/// runs the job again instead of failing it (see `is_transient`).
fn transport(message: String) -> anyhow::Error {
    std::io::Error::new(std::io::ErrorKind::ConnectionAborted, message).into()
}

/// Gloo's words for a peer whose sockets closed: the process died or exited.
fn peer_gone(message: &str) -> bool {
    [
        "closed by peer",
        "reset by peer",
        "Broken pipe",
        "Connection refused",
        "Socket closed",
    ]
    .iter()
    .any(|w| message.contains(w))
}

impl Group {
    /// Joins the other replicas of `env`'s launch: hosts or reaches the
    /// store at `MASTER_ADDR:MASTER_PORT`, then connects to every rank.
    /// Blocks until all `env.world` ranks have joined, or about `timeout`
    /// (the store rounds its wait up to whole seconds, a client retries its
    /// connect once: up to about twice `timeout`). `timeout` also bounds
    /// every later collective: pick a few step times.
    pub fn join(env: &LaunchEnv, timeout: Duration) -> Result<Group> {
        let addr = CString::new(env.master_addr.as_str())
            .with_context(|| format!("MASTER_ADDR={:?} contains a NUL byte", env.master_addr))?;
        let prefix =
            CString::new(env.store_prefix()).context("the store key prefix contains a NUL byte")?;
        let rank = c_int::try_from(env.rank).context("rank beyond a C int")?;
        let world = c_int::try_from(env.world).context("world size beyond a C int")?;
        let timeout_ms = i64::try_from(timeout.as_millis())
            .unwrap_or(i64::MAX)
            .max(1);
        let mut err = [0u8; ERRLEN];
        // SAFETY: the strings are NUL-terminated and outlive the call; err is
        // writable for ERRLEN bytes; the shim catches every C++ exception.
        let handle = unsafe {
            mezod_c10d_group_new(
                addr.as_ptr(),
                env.master_port,
                rank,
                world,
                timeout_ms,
                env.hosts_store() as c_int,
                prefix.as_ptr(),
                err.as_mut_ptr().cast(),
                err.len(),
            )
        };
        let Some(handle) = NonNull::new(handle) else {
            return Err(join_error(env, timeout, &shim_message(&err)));
        };
        Ok(Group {
            handle,
            rank: env.rank,
            world: env.world,
            timeout,
            broken: Cell::new(false),
        })
    }

    /// This process's rank, `0..world()`.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// How many ranks the group has.
    pub fn world(&self) -> usize {
        self.world
    }

    /// Every rank's `frame`, one `Vec` per rank in rank order (this rank's
    /// own frame included).
    ///
    /// Every rank MUST pass a frame of the same length. Gloo does not report
    /// a mismatch: it throws on its own I/O thread, which aborts the process
    /// (`std::terminate`) on the receiving rank, and a rank expecting more
    /// bytes may get short data and no error. Use one fixed-size frame per
    /// step. Debug builds gather the lengths first and return an error
    /// instead (one more round trip per call); release builds do not check.
    pub fn all_gather(&self, frame: &[u8]) -> Result<Vec<Vec<u8>>> {
        if cfg!(debug_assertions) {
            let lengths = self.gather_raw(&(frame.len() as u64).to_le_bytes(), "all_gather")?;
            let lengths: Vec<u64> = lengths
                .iter()
                .map(|b| u64::from_le_bytes(b[..].try_into().expect("8 bytes")))
                .collect();
            if lengths.iter().any(|&n| n != frame.len() as u64) {
                self.broken.set(true);
                bail!(
                    "the replicas passed frames of different lengths to all_gather (bytes by rank: \
                     {lengths:?}); every replica must pass the same length"
                );
            }
        }
        self.gather_raw(frame, "all_gather")
    }

    /// Blocks until every rank has called `barrier`, or the timeout.
    pub fn barrier(&self) -> Result<()> {
        self.check_usable("barrier")?;
        let mut err = [0u8; ERRLEN];
        // SAFETY: the handle is live (freed only by Drop); err is writable
        // for ERRLEN bytes.
        let rc =
            unsafe { mezod_c10d_barrier(self.handle.as_ptr(), err.as_mut_ptr().cast(), ERRLEN) };
        self.outcome(rc, &err, "barrier")
    }

    /// Gives the group up without tearing it down (Gloo's threads are not
    /// joined, the sockets close when the process exits): for a process
    /// about to exit after a failure, where an orderly teardown could wait
    /// on a hung peer up to the timeout.
    pub fn abandon(self) {
        std::mem::forget(self);
    }

    fn gather_raw(&self, frame: &[u8], what: &str) -> Result<Vec<Vec<u8>>> {
        self.check_usable(what)?;
        let len = frame.len();
        let mut out = vec![0u8; len * self.world];
        let mut err = [0u8; ERRLEN];
        // SAFETY: the handle is live; frame is readable for len bytes, out
        // writable for len * world bytes (the shim copies into and out of
        // tensors it owns, so nothing keeps these pointers after the call);
        // err is writable for ERRLEN bytes.
        let rc = unsafe {
            mezod_c10d_all_gather(
                self.handle.as_ptr(),
                frame.as_ptr(),
                len,
                out.as_mut_ptr(),
                err.as_mut_ptr().cast(),
                ERRLEN,
            )
        };
        self.outcome(rc, &err, what)?;
        Ok(if len == 0 {
            vec![Vec::new(); self.world]
        } else {
            out.chunks(len).map(<[u8]>::to_vec).collect()
        })
    }

    fn check_usable(&self, what: &str) -> Result<()> {
        if self.broken.get() {
            bail!("{what} on a replica group that an earlier failure broke: stop and drop it");
        }
        Ok(())
    }

    /// The error for a shim return code, in words: which replica has gone,
    /// or that none answered in time.
    fn outcome(&self, rc: c_int, err: &[u8], what: &str) -> Result<()> {
        if rc == OK {
            return Ok(());
        }
        self.broken.set(true);
        let message = shim_message(err);
        let (r, w) = (self.rank, self.world);
        Err(transport(
            if rc == ERR_TIMEOUT || is_timeout_message(&message) {
                format!(
                "no answer from the other replicas within {} (rank {r} of {w}, {what}): {message} \
                 (c10d/Gloo)",
                seconds(self.timeout)
            )
            } else if peer_gone(&message) && w == 2 {
                format!("replica {} of {w} has gone: {message} (c10d/Gloo)", 1 - r)
            } else if peer_gone(&message) {
                // Gloo names the peer's address, not its rank.
                format!("a replica of {w} has gone (seen by rank {r}): {message} (c10d/Gloo)")
            } else {
                format!("{what} failed on rank {r} of {w}: {message} (c10d/Gloo)")
            },
        ))
    }
}

impl Drop for Group {
    /// Tears the group down: joins Gloo's threads, closes its sockets
    /// (milliseconds after a peer died; up to the timeout for a hung one).
    fn drop(&mut self) {
        // SAFETY: the handle came from mezod_c10d_group_new and is freed once.
        unsafe { mezod_c10d_group_free(self.handle.as_ptr()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buf(s: &str) -> Vec<u8> {
        let mut b = s.as_bytes().to_vec();
        b.push(0);
        b.resize(64.max(b.len()), 0);
        b
    }

    #[test]
    fn gloo_messages_lose_their_source_location() {
        let m = shim_message(&buf(concat!(
            "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:547] ",
            "Connection closed by peer [127.0.0.1]:4242"
        )));
        assert_eq!(m, "Connection closed by peer [127.0.0.1]:4242");
        assert!(peer_gone(&m));
        let m = shim_message(&buf("[127.0.0.1]:80 is not a path"));
        assert_eq!(m, "[127.0.0.1]:80 is not a path");
        assert!(is_timeout_message("Operation timed out!"));
        assert!(is_timeout_message(
            "Timed out after 6 seconds waiting for clients. 1/2 clients joined."
        ));
        assert!(!is_timeout_message("Connection closed by peer"));
    }

    #[test]
    fn timeouts_read_in_seconds() {
        assert_eq!(seconds(Duration::from_secs(10)), "10s");
        assert_eq!(seconds(Duration::from_millis(2500)), "2.5s");
    }
}
