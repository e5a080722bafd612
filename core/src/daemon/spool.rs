//! The spool folder, Maildir-style: submitters write into `tmp/` and
//! `rename()` into `new/`; the daemon takes each file in `new/` and moves it to
//! exactly one place: `cur/<id>-<name>` once its job record is durable, or
//! `rejected/<name>` with a `<name>.error` sidecar that says why.
//!
//! A crash between recording a job and moving its file must not start the
//! job twice: the record is written together with a *claim* (file name →
//! job id, plus the file's inode) and the claim is removed only after the
//! move, so a file found in `new/` with a claim is only moved on.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::durable;
use anyhow::{bail, Context, Result};

/// Largest job file the daemon reads.
pub const MAX_JOB_FILE_BYTES: u64 = 1 << 20;

#[derive(Debug)]
pub struct Spool {
    root: PathBuf,
}

/// A job file read from `new/`.
#[derive(Debug)]
pub struct Dropped {
    pub name: String,
    pub text: String,
    pub uid: u32,
    pub gid: u32,
    pub inode: u64,
}

/// Dotfiles and editor leftovers are not jobs (yet): they stay where they are.
pub(crate) fn is_ignored(name: &str) -> bool {
    name.starts_with('.')
        || name.starts_with('#')
        || name.ends_with('~')
        || name.ends_with(".swp")
        || name.ends_with(".swx")
        || name.ends_with(".tmp")
        || name.ends_with(".part")
}

impl Spool {
    /// Create the folders; refuse a spool that other users could write into
    /// unless this daemon runs as root (then every job runs as its file's owner).
    pub fn open(root: &Path, as_root: bool) -> Result<Self> {
        let spool = Self {
            root: root.to_path_buf(),
        };
        for dir in ["new", "tmp", "cur", "rejected"] {
            let d = root.join(dir);
            std::fs::create_dir_all(&d)
                .with_context(|| format!("creating spool folder {}", d.display()))?;
            let mode = match dir {
                // Anyone may drop a job; the sticky bit keeps users off each other's files.
                "new" | "tmp" if as_root => Some(0o1733),
                // Accepted and rejected files (and why) are the daemon's:
                // owners learn their verdict over the socket.
                "cur" | "rejected" => Some(0o700),
                _ => None,
            };
            if let Some(mode) = mode {
                std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode))?;
            }
        }
        if !as_root {
            for dir in [root.to_path_buf(), spool.new_dir(), spool.tmp_dir()] {
                let mode = std::fs::metadata(&dir)?.permissions().mode();
                if mode & 0o022 != 0 {
                    bail!(
                        "spool folder {} is writable by other users (mode {:o}); a daemon that is not \
                         root would run their jobs as itself. Run `chmod go-w {}` or run the daemon as root.",
                        dir.display(),
                        mode & 0o7777,
                        dir.display()
                    );
                }
            }
        }
        Ok(spool)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn new_dir(&self) -> PathBuf {
        self.root.join("new")
    }
    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Names in `new/` that may be jobs, in name order.  A name that is not
    /// UTF-8 or holds control characters (a newline would split a status
    /// line) is first renamed, in `new/`, to a safe one.
    pub fn list(&self) -> Result<Vec<String>> {
        let mut names = Vec::new();
        for e in std::fs::read_dir(self.new_dir())? {
            let raw = e?.file_name();
            let lossy = raw.to_string_lossy().to_string();
            if is_ignored(&lossy) {
                continue;
            }
            if raw
                .to_str()
                .is_some_and(|n| !n.chars().any(char::is_control))
            {
                names.push(lossy);
                continue;
            }
            match self.rename_to_safe(&raw, &lossy) {
                Ok(safe) => names.push(safe),
                Err(e) => tracing::error!("could not rename {lossy:?} in new/: {e:#}"),
            }
        }
        names.sort();
        Ok(names)
    }

    /// Rename `new/<raw>` to a free name made of `lossy` with each control
    /// or undecodable character as `_`.
    fn rename_to_safe(&self, raw: &std::ffi::OsStr, lossy: &str) -> Result<String> {
        let stem: String = lossy
            .chars()
            .map(|c| {
                if c.is_control() || c == '\u{fffd}' {
                    '_'
                } else {
                    c
                }
            })
            .collect();
        let new = std::fs::File::open(self.new_dir())?;
        for n in 0..1000 {
            let number = if n == 0 {
                String::new()
            } else {
                format!(".{n}")
            };
            let safe = durable::fit_file_name("", &stem, &number);
            match rustix::fs::renameat_with(
                &new,
                raw,
                &new,
                safe.as_str(),
                rustix::fs::RenameFlags::NOREPLACE,
            ) {
                Ok(()) => {
                    tracing::info!("renamed a spool file with an unprintable name to {safe:?}");
                    return Ok(safe);
                }
                Err(rustix::io::Errno::EXIST) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        bail!("no free name for {lossy:?}")
    }

    /// Was `new/<name>` changed in the last `secs` seconds?  A file copied in
    /// without `rename()` may be caught half-written; it gets time to finish
    /// before a failed check rejects it.
    pub(crate) fn is_fresh(&self, name: &str, secs: f64) -> bool {
        std::fs::symlink_metadata(self.new_dir().join(name))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age.as_secs_f64() < secs)
    }

    /// Inode of `new/<name>` without following links (None when gone).
    pub fn inode(&self, name: &str) -> Option<u64> {
        std::fs::symlink_metadata(self.new_dir().join(name))
            .ok()
            .map(|m| m.ino())
    }

    /// Owner of the entry `new/<name>` (not following a link).
    pub fn owner(&self, name: &str) -> Option<u32> {
        std::fs::symlink_metadata(self.new_dir().join(name))
            .ok()
            .map(|m| m.uid())
    }

    /// Read `new/<name>`: a regular file (never through a symlink) of at most
    /// 1 MiB, opened by its one name in `new/` held open.  `Err` holds the
    /// plain reason to reject it.
    pub fn read(&self, name: &str) -> std::result::Result<Dropped, String> {
        let new = crate::safe_fs::Dir::open(&self.new_dir()).map_err(|e| format!("{e:#}"))?;
        let file = match new.open_regular(name) {
            Ok(Some(f)) => f,
            Ok(None) => return Err("it is gone".into()),
            Err(_) => {
                return Err(
                    "it is not a regular file (symlinks, folders and devices are refused)".into(),
                )
            }
        };
        let meta = file.metadata().map_err(|e| e.to_string())?;
        if meta.nlink() != 1 {
            // A second name elsewhere means someone else may change it (or
            // it is another user's file linked in): a job file is one's own.
            return Err(format!(
                "it has {} hard links; drop a file of your own with one name (copy it, do not link it)",
                meta.nlink()
            ));
        }
        if meta.len() > MAX_JOB_FILE_BYTES {
            return Err(format!(
                "it is {} bytes; job files are at most {} bytes (data belongs in data.train, not in the job file)",
                meta.len(),
                MAX_JOB_FILE_BYTES
            ));
        }
        let mut bytes = Vec::new();
        file.take(MAX_JOB_FILE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("cannot read it: {e}"))?;
        let text = String::from_utf8(bytes).map_err(|_| "it is not UTF-8 text".to_string())?;
        Ok(Dropped {
            name: name.to_string(),
            text,
            uid: meta.uid(),
            gid: meta.gid(),
            inode: meta.ino(),
        })
    }

    /// Move `new/<name>` to `rejected/` with a sidecar saying why; returns
    /// the sidecar and its text.  The sidecar comes first: a crash in between only
    /// rejects the file again.  Neither ever lands on an existing name (a
    /// rejected `x.error` and a rejected `x` would otherwise share one), so
    /// nothing is overwritten.
    pub fn reject(&self, name: &str, why: &str) -> Result<(PathBuf, String)> {
        let dir = self.root.join("rejected");
        let taken = |p: &Path| p.symlink_metadata().is_ok();
        // `name`, then `.N` on a collision, cut to leave room for `.error`.
        let slot = |n: usize| {
            let number = if n == 0 {
                String::new()
            } else {
                format!(".{n}")
            };
            let full = durable::fit_file_name("", name, &format!("{number}.error"));
            full[..full.len() - ".error".len()].to_string()
        };
        let sidecar = |p: &Path| PathBuf::from(format!("{}.error", p.display()));
        let mut n = 0;
        let mut target = dir.join(slot(n));
        while taken(&target) || taken(&sidecar(&target)) {
            n += 1;
            target = dir.join(slot(n));
        }
        let text = format!("{name} was rejected: {why}\n");
        let error = sidecar(&target);
        durable::write(&error, &text)?;
        durable::rename(&self.new_dir().join(name), &target)?;
        Ok((error, text))
    }

    /// Clear what users leave behind in the daemon's folders: entries of
    /// `tmp/`, and ignored names (dotfiles, editor leftovers) in `new/`, not
    /// changed for `stale`; and in `rejected/`, each user's rejected files
    /// past the newest `keep_per_owner` (with their `.error` sidecars).
    /// Links are removed, never followed; a folder is removed only when
    /// empty.  Returns how many entries went, and the names of the rejected
    /// files that went (for the daemon to forget their reasons too).
    pub fn sweep(
        &self,
        stale: std::time::Duration,
        keep_per_owner: usize,
    ) -> Result<(usize, Vec<String>)> {
        let old = |m: &std::fs::Metadata| {
            m.modified()
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age >= stale)
        };
        let remove = |p: &Path, m: &std::fs::Metadata| {
            if m.is_dir() {
                std::fs::remove_dir(p)
            } else {
                std::fs::remove_file(p)
            }
        };
        let mut removed = 0;
        for (dir, all) in [(self.tmp_dir(), true), (self.new_dir(), false)] {
            for e in std::fs::read_dir(&dir)?.flatten() {
                let name = e.file_name();
                if !all && !is_ignored(&name.to_string_lossy()) {
                    continue;
                }
                let Ok(m) = e.path().symlink_metadata() else {
                    continue;
                };
                if old(&m) && remove(&e.path(), &m).is_ok() {
                    removed += 1;
                }
            }
        }
        let rejected = self.root.join("rejected");
        let mut by_owner: std::collections::HashMap<u32, Vec<(std::time::SystemTime, PathBuf)>> =
            Default::default();
        for e in std::fs::read_dir(&rejected)?.flatten() {
            if e.file_name().to_string_lossy().ends_with(".error") {
                continue;
            }
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            let when = m.modified().unwrap_or(std::time::UNIX_EPOCH);
            by_owner.entry(m.uid()).or_default().push((when, e.path()));
        }
        let mut forgotten = Vec::new();
        for files in by_owner.values_mut() {
            files.sort_by(|a, b| b.0.cmp(&a.0));
            for (_, p) in files.iter().skip(keep_per_owner) {
                if std::fs::remove_file(p).is_ok() {
                    removed += 1;
                    if let Some(name) = p.file_name() {
                        forgotten.push(name.to_string_lossy().into_owned());
                    }
                }
                let _ = std::fs::remove_file(format!("{}.error", p.display()));
            }
        }
        Ok((removed, forgotten))
    }

    /// Move an accepted file out of `new/`, keeping it for reference.
    pub(crate) fn archive(&self, name: &str, id: u64) -> Result<()> {
        let from = self.new_dir().join(name);
        if from.symlink_metadata().is_ok() {
            let to = durable::fit_file_name(&format!("{id}-"), name, "");
            durable::rename(&from, &self.root.join("cur").join(to))?;
        }
        Ok(())
    }
}

/// Write `text` into the spool under a fresh name: created in `tmp/`,
/// fsynced, renamed into `new/`.  Returns the name.
///
/// The spool's path comes from the daemon's answer (trusted because the
/// socket was, see `control::connect`) or from `--spool`, and the caller may
/// be root, so this writes the way a root process must where users can
/// write: the spool and its `tmp/` and `new/` are held open as folders, none
/// of them a link, each root's or the caller's (and sticky if others may
/// write it); the file is created afresh relative to `tmp/`
/// (`O_CREAT|O_EXCL|O_NOFOLLOW`: never an existing file, never through a
/// link) and renamed between the held folders without replacing anything.
///
/// Once the rename is done the job is dropped, and the name is returned
/// whatever follows: a user cannot read `new/` (mode 1733) to fsync it, and
/// the daemon makes its own move out of `new/` durable.  A caller never sees
/// an error for a file that was dropped, so it never drops one twice.
pub fn drop_job(spool_root: &Path, stem: &str, text: &str) -> Result<String> {
    use rustix::fs::{AtFlags, Mode, OFlags, RenameFlags};
    use rustix::io::Errno;
    use std::io::Write;
    let root = spool_folder(None, spool_root, spool_root)?;
    let tmp = spool_folder(Some(&root), Path::new("tmp"), spool_root)?;
    let new = spool_folder(Some(&root), Path::new("new"), spool_root)?;
    let stem = drop_stem(stem);
    let stamp = format!(
        "{}-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
        std::process::id()
    );
    let in_tmp = |name: &str| spool_root.join("tmp").join(name).display().to_string();
    // A name someone planted first (in `tmp/` or `new/`) is skipped, never used.
    for attempt in 0..16 {
        let name = match attempt {
            0 => format!("{stem}-{stamp}.yaml"),
            n => format!("{stem}-{stamp}-{n}.yaml"),
        };
        let fd = match rustix::fs::openat(
            &tmp,
            name.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        ) {
            Ok(fd) => fd,
            Err(Errno::EXIST) => continue,
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "writing into the spool {} (is this the daemon's spool, and may you write to it?)",
                        in_tmp(&name)
                    )
                })
            }
        };
        let forget = || {
            let _ = rustix::fs::unlinkat(&tmp, name.as_str(), AtFlags::empty());
        };
        let mut file = File::from(fd);
        if let Err(e) = file
            .write_all(text.as_bytes())
            .and_then(|_| file.sync_all())
        {
            forget();
            return Err(e).with_context(|| format!("writing {}", in_tmp(&name)));
        }
        drop(file);
        let moved = match rustix::fs::renameat_with(
            &tmp,
            name.as_str(),
            &new,
            name.as_str(),
            RenameFlags::NOREPLACE,
        ) {
            // A filesystem without RENAME_NOREPLACE: look first.  Only the
            // caller's own files or a sticky folder's are at stake there.
            Err(Errno::INVAL) => {
                match rustix::fs::statat(&new, name.as_str(), AtFlags::SYMLINK_NOFOLLOW) {
                    Err(Errno::NOENT) => {
                        rustix::fs::renameat(&tmp, name.as_str(), &new, name.as_str())
                    }
                    Ok(_) => Err(Errno::EXIST),
                    Err(e) => Err(e),
                }
            }
            other => other,
        };
        match moved {
            Ok(()) => {}
            Err(Errno::EXIST) => {
                forget();
                continue;
            }
            Err(e) => {
                forget();
                return Err(e).with_context(|| {
                    format!(
                        "moving {} into {}",
                        in_tmp(&name),
                        spool_root.join("new").display()
                    )
                });
            }
        }
        sync_dropped(&new, spool_root);
        return Ok(name);
    }
    bail!(
        "every name tried for {stem} in the spool {} was taken; nothing was dropped",
        spool_root.display()
    )
}

/// The start of a dropped file's name: the job file's stem, cut to leave
/// room for the stamp within 255 bytes, without what the daemon leaves alone
/// (a leading `.` or `#` would make it a file intake never takes).
fn drop_stem(stem: &str) -> String {
    let stem = stem.trim_start_matches(['.', '#']);
    let mut cut = stem.len().min(180);
    while !stem.is_char_boundary(cut) {
        cut -= 1;
    }
    match &stem[..cut] {
        "" => "job".to_string(),
        s => s.to_string(),
    }
}

/// A spool folder held open for [`drop_job`]: `name` below `at` (or the path
/// itself), not through a link in its last component, a folder that belongs
/// to root or the caller and is sticky if others may write it.  Opened with
/// `O_PATH`, since a user may pass through `tmp/` and `new/` but not read them.
fn spool_folder(
    at: Option<&std::os::fd::OwnedFd>,
    name: &Path,
    root: &Path,
) -> Result<std::os::fd::OwnedFd> {
    use rustix::fs::{FileType, Mode, OFlags};
    let shown = match at {
        Some(_) => root.join(name),
        None => root.to_path_buf(),
    };
    let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = match at {
        Some(dir) => rustix::fs::openat(dir, name, flags, Mode::empty()),
        None => rustix::fs::open(name, flags, Mode::empty()),
    }
    .with_context(|| {
        format!(
            "opening the spool folder {} (is this the daemon's spool? a link is not followed)",
            shown.display()
        )
    })?;
    let st = rustix::fs::fstat(&fd)?;
    if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
        bail!(
            "the spool folder {} is not a folder (a link is not followed)",
            shown.display()
        );
    }
    if !super::control::trusted(st.st_uid) {
        bail!(
            "refusing the spool folder {}: it belongs to {}, neither root nor you, so it is \
             not a daemon's spool you may trust; nothing was written",
            shown.display(),
            super::control::who(st.st_uid)
        );
    }
    if st.st_mode & 0o022 != 0 && st.st_mode & 0o1000 == 0 {
        bail!(
            "refusing the spool folder {}: others may write it and it is not sticky (mode {:o}), \
             so they could swap what is written there; nothing was written",
            shown.display(),
            st.st_mode & 0o7777
        );
    }
    Ok(fd)
}

/// fsync `new/` after a drop, where the caller may: a user may not read the
/// spool's `new/` (mode 1733), and then the daemon's own durable move out of
/// it is what keeps the job.  The job is dropped either way.
fn sync_dropped(new: &std::os::fd::OwnedFd, root: &Path) {
    use rustix::fs::{Mode, OFlags};
    let synced = rustix::fs::openat(
        new,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .and_then(|dir| rustix::fs::fsync(&dir));
    match synced {
        Ok(()) | Err(rustix::io::Errno::ACCESS) => {}
        Err(e) => tracing::warn!(
            "syncing the folder {} after the drop: {e} (the job file is in it; the daemon's move makes it durable)",
            root.join("new").display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_end_in_exactly_one_place() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), false).unwrap();
        let name = drop_job(dir.path(), "a", "model: {}\n").unwrap();
        std::fs::write(spool.new_dir().join(".hidden"), "x").unwrap();
        std::fs::write(spool.new_dir().join("big.yaml"), vec![b'#'; 2 << 20]).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", spool.new_dir().join("link.yaml")).unwrap();
        assert_eq!(
            spool.list().unwrap(),
            vec![name.clone(), "big.yaml".into(), "link.yaml".into()]
        );
        assert!(spool.read("big.yaml").unwrap_err().contains("at most"));
        assert!(spool.read("link.yaml").unwrap_err().contains("regular"));
        let d = spool.read(&name).unwrap();
        assert_eq!(d.text, "model: {}\n");
        spool.reject("link.yaml", "not a file").unwrap();
        // A second rejection of the same name gets its own slot.
        std::fs::write(spool.new_dir().join("link.yaml"), "x").unwrap();
        spool.reject("link.yaml", "again").unwrap();
        let sidecar = |n: &str| {
            std::fs::read_to_string(dir.path().join("rejected").join(format!("{n}.error"))).unwrap()
        };
        assert!(sidecar("link.yaml").contains("not a file"));
        assert!(sidecar("link.yaml.1").contains("again"));
        spool.archive(&name, 7).unwrap();
        assert!(dir.path().join("cur").join(format!("7-{name}")).is_file());
        assert_eq!(spool.list().unwrap(), vec!["big.yaml".to_string()]);
    }

    #[test]
    fn rejected_files_never_overwrite_one_another() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), false).unwrap();
        // A rejected `coll.error`, then a rejected `coll`: the second's sidecar
        // would be the first file's name.
        std::fs::write(spool.new_dir().join("coll.error"), "first file").unwrap();
        spool.reject("coll.error", "bad").unwrap();
        std::fs::write(spool.new_dir().join("coll"), "second file").unwrap();
        let (sidecar, _) = spool.reject("coll", "bad too").unwrap();
        let rejected = dir.path().join("rejected");
        assert_eq!(
            std::fs::read_to_string(rejected.join("coll.error")).unwrap(),
            "first file"
        );
        assert!(std::fs::read_to_string(rejected.join("coll.error.error"))
            .unwrap()
            .contains("coll.error was rejected: bad"));
        assert_eq!(sidecar, rejected.join("coll.1.error"));
        assert_eq!(
            std::fs::read_to_string(rejected.join("coll.1")).unwrap(),
            "second file"
        );
    }

    #[test]
    fn names_too_long_once_an_id_or_sidecar_is_added_still_fit() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), false).unwrap();
        // 254 bytes in new/ (the last character two bytes wide): fine there,
        // too long as `cur/<id>-<name>` or `rejected/<name>.error`.
        let long = format!("{}é", "j".repeat(252));
        assert_eq!(long.len(), 254);
        std::fs::write(spool.new_dir().join(&long), "job").unwrap();
        spool.archive(&long, 12345).unwrap();
        let cur: Vec<String> = std::fs::read_dir(dir.path().join("cur"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(cur.len(), 1);
        assert!(
            cur[0].starts_with("12345-jjj") && cur[0].len() <= 255,
            "{}",
            cur[0]
        );
        for _ in 0..2 {
            std::fs::write(spool.new_dir().join(&long), "bad").unwrap();
            let (sidecar, text) = spool.reject(&long, "bad").unwrap();
            assert_eq!(text, format!("{long} was rejected: bad\n"));
            let name = sidecar.file_name().unwrap().to_str().unwrap().to_string();
            assert!(name.len() <= 255 && name.ends_with(".error"), "{name}");
            assert!(sidecar.is_file());
        }
        assert_eq!(spool.list().unwrap(), Vec::<String>::new());
        assert_eq!(
            std::fs::read_dir(dir.path().join("rejected"))
                .unwrap()
                .count(),
            4
        );
    }

    #[test]
    fn unprintable_names_are_renamed_to_safe_free_ones() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), false).unwrap();
        let new = spool.new_dir();
        std::fs::write(new.join("bad_.yaml"), "taken").unwrap();
        std::fs::write(new.join(std::ffi::OsStr::from_bytes(b"bad\xff.yaml")), "a").unwrap();
        std::fs::write(new.join("two\nlines\u{1b}[31m.yaml"), "b").unwrap();
        std::fs::write(new.join(std::ffi::OsStr::from_bytes(b".hidden\xff")), "c").unwrap();
        assert_eq!(
            spool.list().unwrap(),
            vec![
                "bad_.yaml".to_string(),
                "bad_.yaml.1".to_string(),
                "two_lines_[31m.yaml".to_string()
            ]
        );
        assert_eq!(
            std::fs::read_to_string(new.join("bad_.yaml")).unwrap(),
            "taken"
        );
        assert_eq!(
            std::fs::read_to_string(new.join("bad_.yaml.1")).unwrap(),
            "a"
        );
        assert_eq!(spool.read("two_lines_[31m.yaml").unwrap().text, "b");
        assert_eq!(
            std::fs::read_dir(&new).unwrap().count(),
            4,
            "the dotfile stays as it is"
        );
    }

    #[test]
    fn a_spool_others_can_write_is_refused_without_root() {
        let dir = tempfile::tempdir().unwrap();
        Spool::open(dir.path(), false).unwrap();
        std::fs::set_permissions(
            dir.path().join("new"),
            std::fs::Permissions::from_mode(0o777),
        )
        .unwrap();
        let e = Spool::open(dir.path(), false).unwrap_err().to_string();
        assert!(e.contains("writable by other users"), "{e}");
        assert!(Spool::open(dir.path(), true).is_ok());
    }

    #[test]
    fn a_drop_never_goes_through_a_link_or_into_anothers_folder() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), false).unwrap();
        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        // tmp/ or new/ replaced by a link: refused, nothing written anywhere.
        for sub in ["tmp", "new"] {
            let real = dir.path().join(format!("{sub}.real"));
            std::fs::rename(dir.path().join(sub), &real).unwrap();
            std::os::unix::fs::symlink(&elsewhere, dir.path().join(sub)).unwrap();
            let e = format!("{:#}", drop_job(dir.path(), "a", "x: 1\n").unwrap_err());
            assert!(e.contains("link is not followed"), "{e}");
            assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
            std::fs::remove_file(dir.path().join(sub)).unwrap();
            std::fs::rename(&real, dir.path().join(sub)).unwrap();
        }
        // A folder others may write without the sticky bit: refused.
        std::fs::set_permissions(spool.tmp_dir(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = format!("{:#}", drop_job(dir.path(), "a", "x: 1\n").unwrap_err());
        assert!(e.contains("not sticky"), "{e}");
        std::fs::set_permissions(spool.tmp_dir(), std::fs::Permissions::from_mode(0o1733)).unwrap();
        // Names intake would leave alone, or too long, are made takeable.
        let name = drop_job(dir.path(), ".#hidden", "x: 1\n").unwrap();
        assert!(name.starts_with("hidden-") && !is_ignored(&name), "{name}");
        let long = drop_job(dir.path(), &"é".repeat(200), "x: 1\n").unwrap();
        assert!(long.len() <= 255, "{}", long.len());
        assert_eq!(spool.list().unwrap().len(), 2);
        let mode = std::fs::metadata(spool.new_dir().join(&name))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // Another user's spool (only root can make one here).
        if rustix::process::geteuid().is_root() {
            std::os::unix::fs::chown(spool.new_dir(), Some(65534), Some(65534)).unwrap();
            let e = format!("{:#}", drop_job(dir.path(), "a", "x: 1\n").unwrap_err());
            assert!(e.contains("belongs to uid 65534"), "{e}");
            assert_eq!(std::fs::read_dir(spool.tmp_dir()).unwrap().count(), 0);
        }
    }

    #[test]
    fn what_users_leave_behind_is_swept() {
        use std::time::{Duration, SystemTime};
        let tmp = tempfile::tempdir().unwrap();
        let spool = Spool::open(tmp.path(), false).unwrap();
        let age = |p: &Path, secs: u64| {
            std::fs::File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(SystemTime::now() - Duration::from_secs(secs))
                .unwrap();
        };
        let root = tmp.path();
        for (f, secs) in [
            ("tmp/old", 90_000),
            ("tmp/fresh", 0),
            ("new/.old-dot", 90_000),
            ("new/.fresh-dot", 0),
            ("new/old-job.yaml", 90_000),
        ] {
            std::fs::write(root.join(f), "x").unwrap();
            age(&root.join(f), secs);
        }
        std::os::unix::fs::symlink("/etc/passwd", root.join("tmp/link")).unwrap();
        for i in 0..5 {
            let f = root.join(format!("rejected/r{i}.yaml"));
            std::fs::write(&f, "x").unwrap();
            std::fs::write(format!("{}.error", f.display()), "why").unwrap();
            age(&f, 1000 - i * 10);
        }
        // The link's own time is now: it stays; everything stale goes.
        let (removed, forgotten) = spool.sweep(Duration::from_secs(86_400), 2).unwrap();
        assert_eq!(forgotten.len(), 3, "{forgotten:?}");
        let exists = |f: &str| root.join(f).symlink_metadata().is_ok();
        assert!(!exists("tmp/old") && exists("tmp/fresh") && exists("tmp/link"));
        assert!(!exists("new/.old-dot") && exists("new/.fresh-dot"));
        assert!(
            exists("new/old-job.yaml"),
            "a job file is intake's, not the sweep's"
        );
        assert!(exists("rejected/r4.yaml") && exists("rejected/r3.yaml.error"));
        assert!(!exists("rejected/r0.yaml") && !exists("rejected/r2.yaml.error"));
        assert_eq!(removed, 2 + 3);
        assert!(Path::new("/etc/passwd").exists());
    }
}
