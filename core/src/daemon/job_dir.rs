//! A job's folder, `state/jobs/<id>/`, and the only ways the daemon touches it.
//!
//! ```text
//! state/               0711 daemon   (users pass through to their run folders)
//!   db/                0700 daemon   the job database
//!   jobs/              0711 daemon
//!     <id>/            0711 daemon   the owner may pass, not list or write
//!       job.yaml       0600 daemon   the job file as accepted; the worker gets its text
//!       worker.log     0600 daemon   the worker's stderr (read with `mezod logs`)
//!       error          0600 daemon   why the job failed
//!       run/           0700 owner    what the worker writes, as the job's owner
//! ```
//!
//! Everything the daemon writes lives where only the daemon can write, so an
//! owner cannot swap a file the daemon later opens as root.  The one file it
//! reads from the owner's `run/` (result.json) is opened without following
//! links and bounded in size.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::identity::Identity;
use crate::safe_fs::Dir;

pub const SPEC: &str = "job.yaml";
pub const LOG: &str = "worker.log";
pub const ERROR: &str = "error";
pub const RUN: &str = "run";
/// A result.json larger than this is not the worker's.
const MAX_RESULT_BYTES: u64 = 1 << 20;
/// Files the daemon writes here are for it (and root) alone.
const PRIVATE: u32 = 0o600;

pub struct JobDir {
    dir: Dir,
    path: PathBuf,
}

/// Make `path` a folder of the daemon's with `mode`, taking it back from
/// whoever owned it (state folders of older versions gave job folders to
/// their owners).
fn secure(dir: &Dir, mode: u32) -> Result<()> {
    // SAFETY: geteuid/getegid have no preconditions.
    let me = unsafe { (libc::geteuid(), libc::getegid()) };
    let owner = (me.0 == 0).then_some(me);
    dir.set_owner_and_mode(owner, mode)
}

/// Open (creating) `state/` and `state/jobs/` with their modes.
pub(crate) fn prepare_state(state: &Path) -> Result<Dir> {
    std::fs::create_dir_all(state)?;
    let state = Dir::open(state)?;
    secure(&state, 0o711)?;
    let jobs = state.sub("jobs", 0o711)?;
    secure(&jobs, 0o711)?;
    Ok(jobs)
}

impl JobDir {
    /// The folder of job `id` in `jobs`, created or re-secured, with a run
    /// folder for `owner` (None: the daemon's own user).
    pub(crate) fn prepare(
        jobs: &Dir,
        jobs_path: &Path,
        id: u64,
        owner: Option<&Identity>,
    ) -> Result<Self> {
        let name = id.to_string();
        let dir = jobs.sub(&name, 0o711)?;
        secure(&dir, 0o711)?;
        let run = dir.sub(RUN, 0o700)?;
        run.set_owner_and_mode(owner.map(|o| (o.uid, o.gid)), 0o700)?;
        // Left by older versions; the worker now gets its records on stdin.
        dir.remove("replay.bin")?;
        Ok(Self {
            dir,
            path: jobs_path.join(name),
        })
    }

    /// An existing job folder, for reading.
    pub fn open(jobs: &Dir, jobs_path: &Path, id: u64) -> Result<Self> {
        let name = id.to_string();
        Ok(Self {
            dir: jobs.sub(&name, 0o711)?,
            path: jobs_path.join(name),
        })
    }

    pub(crate) fn run_path(&self) -> PathBuf {
        self.path.join(RUN)
    }

    pub(crate) fn write_spec(&self, text: &str) -> Result<()> {
        self.dir.write(SPEC, text.as_bytes(), PRIVATE)
    }

    pub(crate) fn read_spec(&self) -> Result<String> {
        let bytes = self
            .dir
            .read(SPEC, super::spool::MAX_JOB_FILE_BYTES)?
            .ok_or_else(|| anyhow::anyhow!("{SPEC} is missing"))?;
        Ok(String::from_utf8(bytes)?)
    }

    pub(crate) fn write_error(&self, text: &str) -> Result<()> {
        self.dir.write(ERROR, text.as_bytes(), PRIVATE)
    }

    /// The error file's last `lines` lines (none when the job has not failed).
    pub fn error_tail(&self, lines: usize) -> Vec<String> {
        self.tail(ERROR, lines)
    }

    /// A restarted job has no error (until it fails again).
    pub(crate) fn remove_error(&self) -> Result<()> {
        self.dir.remove(ERROR)
    }

    /// The log's length in bytes (0 when there is none).
    pub(crate) fn log_len(&self) -> u64 {
        match self.dir.open_regular(LOG) {
            Ok(Some(f)) => f.metadata().map_or(0, |m| m.len()),
            _ => 0,
        }
    }

    /// The log, for appending (the worker's stderr).
    pub(crate) fn log_for_append(&self) -> Result<File> {
        self.dir.append(LOG, PRIVATE)
    }

    /// Up to `max` bytes of the log from `offset` (empty when there is no log).
    pub(crate) fn read_log(&self, offset: u64, max: u64) -> Result<Vec<u8>> {
        let mut data = Vec::new();
        if let Some(mut f) = self.dir.open_regular(LOG)? {
            f.seek(SeekFrom::Start(offset))?;
            f.take(max).read_to_end(&mut data)?;
        }
        Ok(data)
    }

    /// The last `lines` lines of the log (of its last 64 KiB).
    pub(crate) fn log_tail(&self, lines: usize) -> Vec<String> {
        self.tail(LOG, lines)
    }

    /// The last `lines` lines of the daemon's file `name`, read from its end.
    fn tail(&self, name: &str, lines: usize) -> Vec<String> {
        let Ok(Some(mut f)) = self.dir.open_regular(name) else {
            return vec![];
        };
        // The tail only: a log may be gigabytes.
        let len = f.metadata().map_or(0, |m| m.len());
        let from = len.saturating_sub(64 << 10);
        let mut text = Vec::new();
        if f.seek(SeekFrom::Start(from)).is_err() || f.read_to_end(&mut text).is_err() {
            return vec![];
        }
        let text = String::from_utf8_lossy(&text);
        let all: Vec<&str> = text.lines().skip(usize::from(from > 0)).collect();
        all[all.len().saturating_sub(lines)..]
            .iter()
            .map(|l| l.to_string())
            .collect()
    }

    /// run/result.json as the worker wrote it (None if missing or not a
    /// plain, small file).
    pub fn read_result(&self) -> Option<Vec<u8>> {
        self.dir
            .sub(RUN, 0o700)
            .ok()?
            .read("result.json", MAX_RESULT_BYTES)
            .ok()?
    }
}
