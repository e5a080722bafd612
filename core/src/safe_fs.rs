//! Files opened the way a root daemon must open them in folders other users
//! can touch: relative to a folder it holds open, one name at a time, never
//! through a symlink, only regular files, and never more than a bounded
//! number of bytes.  A user who swaps a file for a symlink to /etc/shadow, a
//! FIFO or /dev/zero gets an error, not root's reach.
//!
//! rustix gives the `*at` calls with typed flags; `std::fs` has no way to
//! open relative to a folder.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use anyhow::{bail, Context, Result};
use rustix::fs::{AtFlags, FileType, Mode, OFlags};

/// A folder held open; every name below is one path component inside it.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
}

/// Refuse anything but one plain name: a client's or user's string must never
/// climb out of (or below) the folder it is looked up in.
fn component(name: &str) -> Result<&str> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        bail!("{name:?} is not a plain file name");
    }
    Ok(name)
}

const NOFOLLOW: OFlags = OFlags::NOFOLLOW.union(OFlags::CLOEXEC);

impl Dir {
    /// Open the folder `path` (its last component must not be a symlink).
    pub fn open(path: &Path) -> Result<Self> {
        let fd = rustix::fs::open(
            path,
            OFlags::DIRECTORY | OFlags::RDONLY | NOFOLLOW,
            Mode::empty(),
        )
        .with_context(|| format!("opening the folder {}", path.display()))?;
        Ok(Self { fd })
    }

    /// The sub-folder `name`, created with `mode` when missing.
    pub fn sub(&self, name: &str, mode: u32) -> Result<Dir> {
        let name = component(name)?;
        match rustix::fs::mkdirat(&self.fd, name, Mode::from_raw_mode(mode)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(e).with_context(|| format!("creating the folder {name}")),
        }
        let fd = rustix::fs::openat(
            &self.fd,
            name,
            OFlags::DIRECTORY | OFlags::RDONLY | NOFOLLOW,
            Mode::empty(),
        )
        .with_context(|| format!("opening the folder {name} (a symlink is refused)"))?;
        Ok(Dir { fd })
    }

    /// Give this folder to `owner` (uid, gid) with `mode`; through the open
    /// folder, so a rename between the check and the change cannot redirect it.
    pub(crate) fn set_owner_and_mode(&self, owner: Option<(u32, u32)>, mode: u32) -> Result<()> {
        if let Some((uid, gid)) = owner {
            rustix::fs::fchown(
                &self.fd,
                Some(rustix::fs::Uid::from_raw(uid)),
                Some(rustix::fs::Gid::from_raw(gid)),
            )?;
        }
        rustix::fs::fchmod(&self.fd, Mode::from_raw_mode(mode))?;
        Ok(())
    }

    /// (uid, mode) of this folder.
    pub fn owner_and_mode(&self) -> Result<(u32, u32)> {
        let st = rustix::fs::fstat(&self.fd)?;
        Ok((st.st_uid, st.st_mode & 0o7777))
    }

    /// Open `name` for reading: a regular file, not a symlink, FIFO or device.
    /// `Ok(None)` when there is no such file.
    pub(crate) fn open_regular(&self, name: &str) -> Result<Option<File>> {
        let name = component(name)?;
        let fd = match rustix::fs::openat(
            &self.fd,
            name,
            OFlags::RDONLY | OFlags::NONBLOCK | NOFOLLOW,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => return Ok(None),
            Err(rustix::io::Errno::LOOP) => bail!("{name} is a symlink; it is not followed"),
            Err(e) => return Err(e).with_context(|| format!("opening {name}")),
        };
        let st = rustix::fs::fstat(&fd)?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            bail!("{name} is not a regular file");
        }
        Ok(Some(File::from(fd)))
    }

    /// Read all of `name`, refusing more than `max` bytes.  `Ok(None)` when missing.
    pub fn read(&self, name: &str, max: u64) -> Result<Option<Vec<u8>>> {
        let Some(file) = self.open_regular(name)? else {
            return Ok(None);
        };
        let mut bytes = Vec::new();
        file.take(max + 1).read_to_end(&mut bytes)?;
        if bytes.len() as u64 > max {
            bail!("{name} is larger than {max} bytes");
        }
        Ok(Some(bytes))
    }

    /// Open `name` for appending, creating it with `mode`.  Whatever else sits
    /// under that name (a symlink, a FIFO, another user's file) is removed
    /// first: this folder's files are the daemon's alone.
    pub fn append(&self, name: &str, mode: u32) -> Result<File> {
        let name = component(name)?;
        let open = || {
            rustix::fs::openat(
                &self.fd,
                name,
                OFlags::WRONLY | OFlags::APPEND | OFlags::CREATE | OFlags::NONBLOCK | NOFOLLOW,
                Mode::from_raw_mode(mode),
            )
        };
        let ours = |fd: &OwnedFd| {
            rustix::fs::fstat(fd).is_ok_and(|st| {
                FileType::from_raw_mode(st.st_mode) == FileType::RegularFile
                    && st.st_uid == rustix::process::geteuid().as_raw()
            })
        };
        if let Ok(fd) = open() {
            if ours(&fd) {
                return Ok(File::from(fd));
            }
        }
        self.remove(name)?;
        let fd = open().with_context(|| format!("creating {name}"))?;
        if !ours(&fd) {
            bail!("{name} was replaced while it was being created");
        }
        Ok(File::from(fd))
    }

    /// Write `name` durably: a fresh temporary (never an existing file or a
    /// link), fsync, rename over `name`, fsync the folder.
    pub fn write(&self, name: &str, bytes: &[u8], mode: u32) -> Result<()> {
        let name = component(name)?;
        let tmp = crate::durable::fit_file_name(".", name, ".partial");
        self.remove(&tmp)?;
        let fd = rustix::fs::openat(
            &self.fd,
            tmp.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | NOFOLLOW,
            Mode::from_raw_mode(mode),
        )
        .with_context(|| format!("creating {tmp}"))?;
        let mut file = File::from(fd);
        file.write_all(bytes)
            .and_then(|_| file.sync_all())
            .with_context(|| format!("writing {tmp}"))?;
        rustix::fs::renameat(&self.fd, tmp.as_str(), &self.fd, name)
            .with_context(|| format!("renaming {tmp} to {name}"))?;
        self.sync()
    }

    /// Remove `name` if it is there (a symlink itself, never its target).
    pub fn remove(&self, name: &str) -> Result<()> {
        let name = component(name)?;
        match rustix::fs::unlinkat(&self.fd, name, AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing {name}")),
        }
    }

    /// fsync the folder: its new, renamed or removed names survive a crash.
    pub fn sync(&self) -> Result<()> {
        rustix::fs::fsync(&self.fd).context("syncing a folder")?;
        Ok(())
    }
}

/// Open a file a job names (a config.json, weights, data) for reading:
/// without blocking on a FIFO, and only if it is a regular file.  Links are
/// followed: this runs as the job's owner, who may follow them anyway.
pub(crate) fn open_user_file(path: &Path) -> Result<File> {
    let fd = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .with_context(|| format!("opening {}", path.display()))?;
    let st = rustix::fs::fstat(&fd)?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        bail!("{} is not a regular file", path.display());
    }
    Ok(File::from(fd))
}

/// Largest JSON file (config.json, a shard index) read for a check.
pub const MAX_JSON_BYTES: u64 = 16 << 20;

/// The text of a small file a job names, at most `max` bytes.
pub(crate) fn read_user_text(path: &Path, max: u64) -> Result<String> {
    let mut text = String::new();
    open_user_file(path)?
        .take(max + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("reading {}", path.display()))?;
    if text.len() as u64 > max {
        bail!("{} is larger than {max} bytes", path.display());
    }
    Ok(text)
}

/// `bytes` in an anonymous memory file (memfd), positioned at its start: a
/// child's stdin that holds any amount without a writer thread, and has no
/// name on disk for anyone to swap.
pub(crate) fn memory_file(name: &str, bytes: &[u8]) -> Result<File> {
    use std::io::Seek;
    let fd = rustix::fs::memfd_create(name, rustix::fs::MemfdFlags::CLOEXEC)
        .context("creating a memory file (memfd)")?;
    let mut file = File::from(fd);
    file.write_all(bytes)?;
    file.rewind()?;
    Ok(file)
}

impl AsFd for Dir {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn links_fifos_devices_and_big_files_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let secret = tmp.path().join("secret");
        std::fs::write(&secret, "root only").unwrap();
        let d = Dir::open(tmp.path()).unwrap();
        let sub = d.sub("job", 0o711).unwrap();
        let job = tmp.path().join("job");
        std::os::unix::fs::symlink(&secret, job.join("link")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", job.join("zero")).unwrap();
        let fifo = std::ffi::CString::new(job.join("fifo").to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        std::fs::write(job.join("big"), vec![b'x'; 100]).unwrap();
        std::fs::write(job.join("small"), "ok").unwrap();

        let err = |name| format!("{:#}", sub.read(name, 64).unwrap_err());
        assert!(err("link").contains("symlink"), "{}", err("link"));
        assert!(err("zero").contains("symlink"));
        assert!(
            err("fifo").contains("not a regular file"),
            "{}",
            err("fifo")
        );
        assert!(err("big").contains("larger than 64"));
        assert!(err("../secret").contains("not a plain file name"));
        assert_eq!(sub.read("small", 64).unwrap().unwrap(), b"ok");
        assert!(sub.read("missing", 64).unwrap().is_none());

        // Appending to a planted link replaces the link; its target is untouched.
        let mut log = sub.append("link", 0o600).unwrap();
        log.write_all(b"log line\n").unwrap();
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "root only");
        assert!(job.join("link").symlink_metadata().unwrap().is_file());
        assert_eq!(
            std::fs::metadata(job.join("link")).unwrap().mode() & 0o777,
            0o600
        );
        // A write lands on a fresh file even where a link to the target sat.
        std::os::unix::fs::symlink(&secret, job.join(".error.partial")).unwrap();
        sub.write("error", b"failed", 0o600).unwrap();
        assert_eq!(
            std::fs::read_to_string(job.join("error")).unwrap(),
            "failed"
        );
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "root only");
        // A folder that is a symlink is not entered.
        std::os::unix::fs::symlink(tmp.path(), job.join("up")).unwrap();
        assert!(sub.sub("up", 0o700).is_err());
        sub.set_owner_and_mode(None, 0o700).unwrap();
        assert_eq!(
            std::fs::metadata(&job).unwrap().permissions().mode() & 0o777,
            0o700
        );
    }
}
