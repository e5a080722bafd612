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
pub fn is_ignored(name: &str) -> bool {
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
    pub fn tmp_dir(&self) -> PathBuf {
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
    pub fn is_fresh(&self, name: &str, secs: f64) -> bool {
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

    /// Move an accepted file out of `new/`, keeping it for reference.
    pub fn archive(&self, name: &str, id: u64) -> Result<()> {
        let from = self.new_dir().join(name);
        if from.symlink_metadata().is_ok() {
            let to = durable::fit_file_name(&format!("{id}-"), name, "");
            durable::rename(&from, &self.root.join("cur").join(to))?;
        }
        Ok(())
    }
}

/// Write `text` into the spool atomically under a fresh name: `tmp/` then
/// `rename()` into `new/`.  Returns the name.
pub fn drop_job(spool_root: &Path, stem: &str, text: &str) -> Result<String> {
    let unique = format!(
        "{stem}-{}-{}.yaml",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
        std::process::id()
    );
    let tmp = spool_root.join("tmp").join(&unique);
    {
        use std::io::Write;
        let mut f = File::create(&tmp).with_context(|| {
            format!(
                "writing into the spool {} (is this the daemon's spool, and may you write to it?)",
                tmp.display()
            )
        })?;
        let written = f.write_all(text.as_bytes()).and_then(|_| f.sync_all());
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e).with_context(|| format!("writing {}", tmp.display()));
        }
    }
    durable::rename(&tmp, &spool_root.join("new").join(&unique))?;
    Ok(unique)
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
}
