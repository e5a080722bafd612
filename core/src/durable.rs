//! Durable file writes, one way everywhere: a temporary file in the target's
//! own folder, written, `fsync`ed, renamed over the target, then the folder
//! `fsync`ed so that the rename itself survives a power cut.  A reader sees the
//! old file or the new one, never a half-written one; after a crash at any
//! point the target is whole (a stray `.NAME.partial` may remain and is
//! overwritten by the next write).
//!
//! The temporary is a dotfile so that folder scans (the spool's `new/`,
//! snapshot listings) never take it for a real file.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Longest file name Linux filesystems take, in bytes.
const NAME_MAX: usize = 255;

/// `prefix + name + suffix`, with `name` cut (at a character boundary) so
/// that the whole fits in one file name: a name that was fine as it came
/// must not become too long once an id, `.error` or `.partial` is added.
pub(crate) fn fit_file_name(prefix: &str, name: &str, suffix: &str) -> String {
    let room = NAME_MAX.saturating_sub(prefix.len() + suffix.len());
    let mut end = name.len().min(room);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    format!("{prefix}{}{suffix}", &name[..end])
}

/// The temporary a write of `path` goes through: `.NAME.partial`, NAME cut
/// to fit.
pub(crate) fn partial_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(fit_file_name(".", &name, ".partial"))
}

/// Write `bytes` to `path` durably.
pub fn write(path: &Path, bytes: impl AsRef<[u8]>) -> Result<()> {
    write_with(path, |tmp| {
        let mut f = File::create(tmp)?;
        f.write_all(bytes.as_ref())?;
        Ok(())
    })
}

/// Write `path` durably through `fill`, which writes the file it is given
/// (for writers that want a path, like safetensors' `serialize_to_file`).
pub fn write_with(path: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = partial_path(path);
    fill(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    File::open(&tmp)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", tmp.display()))?;
    rename(&tmp, path)
}

/// Rename `from` to `to` and sync the folder(s) involved, so the move survives a crash.
pub fn rename(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to)
        .with_context(|| format!("renaming {} to {}", from.display(), to.display()))?;
    sync_parent(to)?;
    match (from.parent(), to.parent()) {
        (Some(a), Some(b)) if a != b => sync_parent(from),
        _ => Ok(()),
    }
}

/// `fsync` the folder holding `path` (its entries: a new, renamed or removed name).
pub(crate) fn sync_parent(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing the folder {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_files_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("result.json");
        write(&path, "first").unwrap();
        write(&path, "second, longer").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "second, longer");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("result.json")]);
    }

    #[test]
    fn a_failed_fill_leaves_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weights");
        write(&path, "old").unwrap();
        let err = write_with(&path, |tmp| {
            std::fs::write(tmp, "half")?;
            anyhow::bail!("disk full")
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("disk full"));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "old");
        assert_eq!(partial_path(&path), dir.path().join(".weights.partial"));
        // A name at the limit still has a temporary that fits.
        let long = dir.path().join("x".repeat(255));
        write(&long, "fits").unwrap();
        assert_eq!(std::fs::read_to_string(&long).unwrap(), "fits");
    }
}
