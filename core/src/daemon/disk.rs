//! A full disk.  The daemon's filesystems (state and spool) are measured every
//! turn; below the reserve, intake and new starts pause (status says why),
//! and once there is room again everything resumes by itself.
//!
//! Two views of free space.  The daemon's own writes (spool moves, its
//! database, the logs it writes) are root's when it runs as root, and may use
//! the blocks a filesystem reserves for root: a user who fills the disk up to
//! that reserve does not pause intake for everyone ([`DiskGuard::low`]).  A
//! worker writes its outputs (`run/`, on the state disk) as its owner, with
//! the users' share only: [`DiskGuard::low_for_jobs`] says when that is gone,
//! so that new starts wait and a worker that failed on it is not blamed.
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

/// The free space of one filesystem, in both views.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Free {
    /// Every free block (`f_bfree`): what root may write, the blocks the
    /// filesystem reserves for root (ext4's 5 % by default) included.
    pub all: u64,
    /// What an ordinary user may write (`f_bavail`).
    pub unprivileged: u64,
}

impl Free {
    /// Measure the filesystem holding `path`.
    pub fn of(path: &Path) -> Result<Self> {
        let st = rustix::fs::statvfs(path)?;
        Ok(Self {
            all: st.f_bfree.saturating_mul(st.f_frsize),
            unprivileged: st.f_bavail.saturating_mul(st.f_frsize),
        })
    }

    /// What a process may write: all of it as root, else the users' share.
    pub(crate) fn for_writer(&self, root: bool) -> u64 {
        if root {
            self.all
        } else {
            self.unprivileged
        }
    }
}

/// Free bytes on the filesystem holding `path` for the daemon's own writes:
/// as root, every free block, so that a user who fills the disk up to the
/// root reserve does not pause intake for everyone; otherwise what an
/// ordinary user sees.
pub fn free_bytes(path: &Path) -> Result<u64> {
    Ok(Free::of(path)?.for_writer(rustix::process::geteuid().is_root()))
}

/// Before opening the database in `db_dir`: remove sled's incomplete
/// snapshots (`snap.*.generating`, empty when a full disk stopped them; sled
/// refuses to open beside one) and, if the disk is full, free the reserve.
pub(crate) fn prepare_db(db_dir: &Path, reserve: &Path, reserve_bytes: u64) -> Result<()> {
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
    /// The state disk as its users (the workers) see it, if that is full.
    jobs_low: Option<String>,
    /// Whether the daemon writes as root (its view of free space: [`Free`]).
    root: bool,
    /// How a folder is measured (tests replace it).
    measure: fn(&Path) -> Result<Free>,
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
            jobs_low: None,
            root: rustix::process::geteuid().is_root(),
            measure: Free::of,
            reserve_failed: false,
        }
    }

    /// Why the disk is too full for the daemon's own writes, if it is:
    /// intake pauses, and so does everything else.  As root this is measured
    /// with the root reserve counted as free ([`Free::all`]).
    pub fn low(&self) -> Option<&str> {
        self.low.as_deref()
    }

    /// Why a worker, writing as its owner, would find the state disk full,
    /// if it would: [`low`](Self::low), or the users' share of the state
    /// disk ([`Free::unprivileged`]) under the reserve.  New starts wait on
    /// it, and a worker that failed meanwhile failed on the disk, not on its
    /// own.  (The same as `low` for a daemon that does not run as root.)
    pub(crate) fn low_for_jobs(&self) -> Option<&str> {
        self.low.as_deref().or(self.jobs_low.as_deref())
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
    /// when either verdict ([`low`](Self::low), [`low_for_jobs`](Self::low_for_jobs))
    /// changed.
    pub fn check(&mut self) -> bool {
        let mut low = None;
        let mut jobs_low = None;
        for (i, dir) in self.watched.iter().enumerate() {
            let Ok(measured) = (self.measure)(dir) else {
                continue;
            };
            if i == 0 && self.root {
                // The workers' outputs live on the state disk, written as
                // their owners: the users' share, with the same hysteresis.
                let limit = if self.jobs_low.is_some() {
                    2 * self.reserve_bytes
                } else {
                    self.reserve_bytes
                };
                if measured.unprivileged < limit {
                    jobs_low = Some(format!(
                        "the disk of {} has {} free for its users (jobs need {}; {} with \
                         root's reserve)",
                        dir.display(),
                        human_bytes(measured.unprivileged),
                        human_bytes(limit),
                        human_bytes(measured.all)
                    ));
                }
            }
            let free = measured.for_writer(self.root);
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
        let jobs_changed = jobs_low.is_some() != self.jobs_low.is_some();
        match (&jobs_low, jobs_changed) {
            (Some(why), true) => {
                tracing::warn!("disk full for users: {why}; new starts pause, intake goes on")
            }
            (None, true) => tracing::info!("the users' disk space is back: starts resume"),
            _ => {}
        }
        self.low = low;
        self.jobs_low = jobs_low;
        changed || jobs_changed
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
pub(crate) fn reserve_path(state: &Path) -> PathBuf {
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

    #[test]
    fn as_root_the_root_reserve_counts_as_free_for_the_daemon_not_for_jobs() {
        let f = Free {
            all: 10 << 20,
            unprivileged: 1 << 20,
        };
        assert_eq!(f.for_writer(true), 10 << 20);
        assert_eq!(f.for_writer(false), 1 << 20);
        // A user filled the disk up to root's reserve.
        fn filled_to_the_reserve(_: &Path) -> Result<Free> {
            Ok(Free {
                all: 1 << 30,
                unprivileged: 0,
            })
        }
        fn plenty(_: &Path) -> Result<Free> {
            Ok(Free {
                all: 1 << 30,
                unprivileged: 1 << 30,
            })
        }
        let dir = tempfile::tempdir().unwrap();
        let mut guard = DiskGuard::new(dir.path(), dir.path(), 1 << 20);
        guard.measure = filled_to_the_reserve;
        guard.reserve_failed = true; // no reserve file in this test
        guard.root = true;
        assert!(guard.check(), "the jobs' verdict changed");
        assert!(guard.low().is_none(), "intake goes on");
        let why = guard.low_for_jobs().unwrap();
        assert!(why.contains("free for its users"), "{why}");
        guard.measure = plenty;
        assert!(guard.check());
        assert!(guard.low_for_jobs().is_none());
        // A daemon that is not root sees what its users see.
        guard.root = false;
        guard.measure = filled_to_the_reserve;
        assert!(guard.check());
        assert!(guard.low().is_some());
        assert_eq!(guard.low_for_jobs(), guard.low());
    }

    /// A real ext4 with a 25 % root reserve, filled by uid 65534 to the
    /// last block it may write: the root daemon still has room for its own
    /// writes (intake goes on), while jobs, written as their owners, wait.
    #[test]
    fn a_user_filling_ext4_to_the_root_reserve_does_not_pause_a_root_daemons_intake() {
        use std::os::unix::process::CommandExt;
        use std::process::Command;
        if !rustix::process::geteuid().is_root() {
            println!("SKIPPED: needs root (a loop mount and a second uid)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("fs.img");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        std::fs::File::create(&image)
            .unwrap()
            .set_len(16 << 20)
            .unwrap();
        let made = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "25"])
            .arg(&image)
            .output();
        if !made.as_ref().is_ok_and(|o| o.status.success()) {
            println!("SKIPPED: mkfs.ext4 is not usable here: {made:?}");
            return;
        }
        let mounted = Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&mnt)
            .output()
            .unwrap();
        if !mounted.status.success() {
            println!(
                "SKIPPED: cannot loop-mount here: {}",
                String::from_utf8_lossy(&mounted.stderr)
            );
            return;
        }
        struct Unmount<'a>(&'a Path);
        impl Drop for Unmount<'_> {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(self.0).output();
            }
        }
        let _unmount = Unmount(&mnt);
        let users = mnt.join("users");
        std::fs::create_dir(&users).unwrap();
        rustix::fs::chown(
            &users,
            Some(rustix::fs::Uid::from_raw(65534)),
            Some(rustix::fs::Gid::from_raw(65534)),
        )
        .unwrap();
        let filled = Command::new("dd")
            .args(["if=/dev/zero", "bs=64k", "status=none"])
            .arg(format!("of={}", users.join("fill").display()))
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&filled.stderr).contains("No space left"),
            "{filled:?}"
        );
        let free = Free::of(&mnt).unwrap();
        assert!(
            free.unprivileged < 1 << 20 && free.all > 3 << 20,
            "{free:?}"
        );
        assert_eq!(free_bytes(&mnt).unwrap(), free.all, "root's view");
        let mut guard = DiskGuard::new(&mnt, &mnt, 1 << 20);
        guard.check();
        assert!(guard.low().is_none(), "{:?}", guard.low());
        assert!(reserve_path(&mnt).exists(), "root set its reserve aside");
        let why = guard.low_for_jobs().unwrap();
        assert!(why.contains("free for its users"), "{why}");
        std::fs::remove_file(users.join("fill")).unwrap();
        guard.check();
        assert!(guard.low_for_jobs().is_none());
    }
}
