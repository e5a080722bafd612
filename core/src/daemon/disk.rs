//! A full disk.  The daemon's filesystems (state and spool) are measured every
//! turn; below the reserve, intake and new starts pause (status says why),
//! and once there is room again everything resumes by itself.
//!
//! The daemon keeps a reserve file of that size in its state folder and gives
//! it back the moment the disk runs low, so that its own database can still
//! write: sled's write error is sticky (a database that failed one write fails
//! every later one until it is reopened), and a start on a full disk leaves an
//! empty snapshot file behind that stops every later start.  Both are handled
//! here too: [`prepare_db`] clears the incomplete snapshot and frees the
//! reserve before an open; the server reopens a database that failed.

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::estimate::human_bytes;

/// Free bytes for unprivileged writes on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> Result<u64> {
    let st = rustix::fs::statvfs(path)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Before opening the database in `db_dir`: remove sled's incomplete
/// snapshots (`snap.*.generating`, empty when a full disk stopped them; sled
/// refuses to open beside one) and, if the disk is full, free the reserve.
pub fn prepare_db(db_dir: &Path, reserve: &Path, reserve_bytes: u64) -> Result<()> {
    if let Ok(entries) = std::fs::read_dir(db_dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("snap.") && name.ends_with(".generating") {
                tracing::warn!(
                    "removing an incomplete database snapshot {name} (left by a full disk)"
                );
                std::fs::remove_file(e.path())?;
            }
        }
    }
    let state = reserve.parent().unwrap_or(Path::new("."));
    if free_bytes(state).is_ok_and(|f| f < reserve_bytes) && reserve.exists() {
        tracing::warn!(
            "the state folder's disk is full: giving back the reserve to open the database"
        );
        std::fs::remove_file(reserve)?;
    }
    Ok(())
}

/// The daemon's view of its disks.
pub struct DiskGuard {
    /// Folders whose filesystems must have room (state, spool).
    watched: Vec<PathBuf>,
    reserve: PathBuf,
    reserve_bytes: u64,
    low: Option<String>,
    /// The reserve could not be made (a filesystem without fallocate, or
    /// too little room): not tried again until the disk has been low.
    reserve_failed: bool,
}

impl DiskGuard {
    pub fn new(state: &Path, spool: &Path, reserve_bytes: u64) -> Self {
        Self {
            // The state folder first: `room_needed` knows it by its index.
            watched: vec![state.to_path_buf(), spool.to_path_buf()],
            reserve: reserve_path(state),
            reserve_bytes,
            low: None,
            reserve_failed: false,
        }
    }

    /// Why the disk is too full for new work, if it is.
    pub fn low(&self) -> Option<&str> {
        self.low.as_deref()
    }

    /// The free space below which the disk of watched folder `i` is low: the
    /// reserve; twice the reserve once low (so that re-creating the reserve
    /// does not make it low at once), and on the state folder's disk, where
    /// the reserve lives, while the daemon does not hold it (a start on a full
    /// disk gave it back to open the database: that space is not room, and
    /// taking it back at once would leave the database nothing).
    fn room_needed(&self, i: usize) -> u64 {
        let holds_reserve = self.reserve_failed || self.reserve.exists();
        let reserve_disk = i == 0;
        if self.low.is_some() || (reserve_disk && !holds_reserve) {
            2 * self.reserve_bytes
        } else {
            self.reserve_bytes
        }
    }

    /// Measure again (see [`room_needed`](Self::room_needed)).  Returns true
    /// when the verdict changed.
    pub fn check(&mut self) -> bool {
        let mut low = None;
        for (i, dir) in self.watched.iter().enumerate() {
            let Ok(free) = free_bytes(dir) else { continue };
            let limit = self.room_needed(i);
            if free < limit {
                low = Some(format!(
                    "the disk of {} has {} free (the daemon needs {})",
                    dir.display(),
                    human_bytes(free),
                    human_bytes(limit)
                ));
                break;
            }
        }
        if low.is_some() {
            if self.reserve.exists() {
                match std::fs::remove_file(&self.reserve) {
                    Ok(()) => tracing::warn!(
                        "disk full: gave back the reserve {}",
                        self.reserve.display()
                    ),
                    Err(e) => tracing::error!("could not remove {}: {e}", self.reserve.display()),
                }
            }
            self.reserve_failed = false;
        } else if !self.reserve_failed && !self.reserve.exists() {
            if let Err(e) = self.make_reserve() {
                tracing::warn!(
                    "could not set aside the disk reserve {}: {e:#}",
                    self.reserve.display()
                );
                self.reserve_failed = true;
            }
        }
        let changed = low.is_some() != self.low.is_some();
        match (&low, changed) {
            (Some(why), true) => tracing::error!("disk full: {why}; intake and new starts pause"),
            (None, true) => tracing::info!("disk space is back: intake and starts resume"),
            _ => {}
        }
        self.low = low;
        changed
    }

    /// Allocate the reserve (real blocks, not a sparse file).
    fn make_reserve(&self) -> Result<()> {
        if self.reserve_bytes == 0 {
            return Ok(());
        }
        let tmp = self.reserve.with_extension("partial");
        let file = std::fs::File::create(&tmp)?;
        let made = rustix::fs::fallocate(
            &file,
            rustix::fs::FallocateFlags::empty(),
            0,
            self.reserve_bytes,
        );
        if let Err(e) = made {
            drop(file);
            let _ = std::fs::remove_file(&tmp);
            return Err(e.into());
        }
        std::fs::rename(&tmp, &self.reserve)?;
        Ok(())
    }
}

/// Where the reserve lives: in the state folder, the database's filesystem.
pub fn reserve_path(state: &Path) -> PathBuf {
    state.join("reserve")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_its_reserve_the_daemon_needs_twice_the_reserve_free() {
        let dir = tempfile::tempdir().unwrap();
        let mut guard = DiskGuard::new(dir.path(), dir.path(), 1 << 20);
        let (state, spool) = (0, 1);
        // A first start, or a start on a full disk that gave the reserve back
        // to open the database: the reserve must be re-created and remain.
        assert_eq!(guard.room_needed(state), 2 << 20);
        assert_eq!(
            guard.room_needed(spool),
            1 << 20,
            "the reserve is not there"
        );
        std::fs::write(reserve_path(dir.path()), b"held").unwrap();
        assert_eq!(guard.room_needed(state), 1 << 20, "holding the reserve");
        guard.low = Some("full".into());
        assert_eq!(
            guard.room_needed(state),
            2 << 20,
            "once low, until twice is free"
        );
        assert_eq!(guard.room_needed(spool), 2 << 20);
        guard.low = None;
        std::fs::remove_file(reserve_path(dir.path())).unwrap();
        guard.reserve_failed = true;
        assert_eq!(
            guard.room_needed(state),
            1 << 20,
            "a filesystem that cannot hold one"
        );
        // Plenty of room here: the guard is not low (and sets its reserve
        // aside where the filesystem can allocate one).
        guard.reserve_failed = false;
        guard.check();
        assert!(guard.low().is_none());
    }
}
