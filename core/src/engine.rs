//! The engine binary, `mezod-engine`: everything that needs libtorch (run,
//! forward, bench, export, apply, the daemon's workers) lives there, so that
//! `mezod` itself — the daemon and the queue commands — starts in milliseconds
//! and stays small.  `mezod run …` hands over to it as `git` hands `git foo`
//! to `git-foo`.

use std::path::PathBuf;

/// The engine's file name.
pub const ENGINE: &str = "mezod-engine";

/// Where the engine is: `MEZOD_ENGINE` if set, else beside the running binary
/// (installs put both in one folder; a test binary's `deps/` folder looks one up).
pub fn exe() -> PathBuf {
    if let Some(path) = std::env::var_os("MEZOD_ENGINE") {
        return PathBuf::from(path);
    }
    let me = std::env::current_exe().unwrap_or_default();
    let dir = me.parent().map(PathBuf::from).unwrap_or_default();
    let beside = dir.join(ENGINE);
    if !beside.exists() && dir.file_name().is_some_and(|n| n == "deps") {
        if let Some(up) = dir.parent() {
            return up.join(ENGINE);
        }
    }
    beside
}
