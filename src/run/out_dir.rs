//! Output folders: which folders a run (`mezod run --out DIR`) and a rebuilt
//! model (`mezod apply -o DIR`) may write into, and starting a run afresh in
//! its own folder (`--restart`).
//!
//! A run writes a dozen names into its folder and, with `--restart`, removes
//! them again; a folder that holds other things is somebody else's (a model
//! directory, a home folder typed by mistake) and is refused unless the user
//! says `--force`.  Only the names listed here are ever removed: a file the
//! user put beside a run stays.

use std::path::Path;

use anyhow::{bail, Context, Result};

use super::seedlog::SeedLog;
use super::tune_file::INITIAL_SHA256;

/// Every name a run writes into its folder.
pub const RUN_FILES: &[&str] = &[
    "spec.yaml",
    "fingerprint.json",
    super::layer_split::FILE,
    "seedlog",
    "snapshots",
    "metrics.jsonl",
    "zero_shot_test.json",
    "baselines.json",
    "result.json",
    "model",
    "adapter",
    "loss.svg",
    INITIAL_SHA256,
    // Following replicas' own working folders (`parallel:`).
    super::replica::FOLLOWERS,
];

/// What a run writes before its `spec.yaml`: a folder holding only these
/// (or their temporaries) is a run that died at its start.
const START_FILES: &[&str] = &[
    "seedlog",
    "fingerprint.json",
    "spec.yaml",
    // Following replicas may start before their leader.
    super::replica::FOLLOWERS,
];

/// `name` without the marks of a durable write's temporary (`.NAME.partial`).
fn durable_target(name: &str) -> &str {
    name.strip_prefix('.')
        .and_then(|n| n.strip_suffix(".partial"))
        .unwrap_or(name)
}

/// Whether `name` is written by a run: one of [`RUN_FILES`] or its temporary.
fn is_run_file(name: &str) -> bool {
    RUN_FILES.contains(&durable_target(name))
}

/// Whether `out` holds a run: a `spec.yaml` that reads as a job.
fn holds_a_run(out: &Path) -> bool {
    std::fs::read_to_string(out.join("spec.yaml"))
        .is_ok_and(|text| crate::spec::JobSpec::parse(&text, out).is_ok())
}

/// The entries of `out` a run does not write before it starts (none when
/// it does not exist).
fn foreign_entries(out: &Path) -> Result<Vec<String>> {
    let entries = match std::fs::read_dir(out) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", out.display())),
    };
    let mut foreign = Vec::new();
    for entry in entries {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if !START_FILES.contains(&durable_target(&name)) {
            foreign.push(name);
        }
    }
    foreign.sort();
    Ok(foreign)
}

/// Refuse a folder another mezod run is using: its seed log's database is
/// locked (sled holds an exclusive `flock` on it for as long as the run
/// lives), so a second run there would fail deep in sled, and a `--restart`
/// would delete the files under a live run.  Asked before anything is
/// touched; the holder's pid comes from `/proc/locks`.
pub fn check_not_in_use(out: &Path) -> Result<()> {
    let db = out.join("seedlog").join("db");
    let Ok(file) = std::fs::File::open(&db) else {
        return Ok(());
    };
    // std's file locks are flock(2) on Linux: the same lock sled takes.
    match file.try_lock() {
        Ok(()) => Ok(()),
        Err(std::fs::TryLockError::WouldBlock) => Err(in_use(out)),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(anyhow::Error::new(e)
                .context(format!("checking whether {} is in use", db.display())))
        }
    }
}

/// "runs/x is in use by another mezod run (pid N)": the error for a run
/// folder whose seed log another process holds.
pub fn in_use(out: &Path) -> anyhow::Error {
    let holder = lock_holder(&out.join("seedlog").join("db"))
        .map_or_else(String::new, |pid| format!(" (pid {pid})"));
    anyhow::anyhow!(
        "{} is in use by another mezod run{holder}; nothing was changed. Wait for it to end, \
         or stop it (Ctrl-C in its terminal, or kill -INT with its pid) and run this again",
        out.display()
    )
}

/// The pid holding a `flock` on `path`, from `/proc/locks` (lines like
/// `1: FLOCK  ADVISORY  WRITE 4242 fd:01:131075 0 EOF`: pid, then the
/// device as hex major:minor and the inode).
fn lock_holder(path: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    // Linux's dev_t: major in bits 8..20 and 32..44, minor in 0..8 and 20..32.
    let dev = meta.dev();
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & 0xffff_f000);
    let minor = (dev & 0xff) | ((dev >> 12) & 0xffff_ff00);
    let want = format!("{major:02x}:{minor:02x}:{}", meta.ino());
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // id, class, kind, mode, pid, device:inode, start, end (a blocked
        // waiter's line has "->" after the id, shifting the fields).
        let fields = if fields.get(1) == Some(&"->") {
            &fields[1..]
        } else {
            &fields[..]
        };
        (fields.get(1) == Some(&"FLOCK") && fields.get(5) == Some(&want.as_str()))
            .then(|| fields.get(4)?.parse().ok())
            .flatten()
    })
}

/// Refuse to run in a folder that holds something and no run of ours, unless `force`.
pub fn check_is_a_run_folder(out: &Path, force: bool) -> Result<()> {
    if holds_a_run(out) {
        return Ok(());
    }
    let foreign = foreign_entries(out)?;
    if foreign.is_empty() {
        return Ok(());
    }
    if force {
        tracing::warn!(
            "{} is not empty and holds no run; writing into it as --force says",
            out.display()
        );
        return Ok(());
    }
    bail!(
        "{} is not empty and holds no mezod run (it has {}); choose another --out, or pass \
         --force to write the run beside what is there",
        out.display(),
        listing(&foreign)
    )
}

/// `--restart`: remove everything a run wrote into `out` (its steps,
/// snapshots, metrics, results and weights), so the next start begins at
/// step 0.  Returns what was discarded, for the user to read.
pub fn discard_run(out: &Path) -> Result<String> {
    if !holds_a_run(out) {
        return Ok(format!(
            "{} holds no run: nothing to discard",
            out.display()
        ));
    }
    let steps = if out.join("seedlog").is_dir() {
        // Counted before removal, and closed again (sled holds a lock).
        SeedLog::open(&out.join("seedlog"))?.contiguous()?.len()
    } else {
        0
    };
    let mut names = Vec::new();
    for entry in std::fs::read_dir(out).with_context(|| format!("reading {}", out.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if is_run_file(&name) {
            names.push(name);
        }
    }
    // spec.yaml last: until it goes the folder is still a run, so a removal
    // cut short leaves a run to restart again, never a bare seed log that
    // the next job would take for its own.
    names.sort_by_key(|n| (n == "spec.yaml", n.clone()));
    for name in &names {
        let path = out.join(name);
        if path.symlink_metadata()?.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        }
        .with_context(|| format!("removing {}", path.display()))?;
    }
    let mut removed = names;
    removed.sort();
    Ok(format!(
        "--restart: discarded {steps} recorded step{} of {} ({})",
        if steps == 1 { "" } else { "s" },
        out.display(),
        listing(&removed)
    ))
}

/// What `mezod apply` leaves in its output folder besides the model: where
/// the weights came from, and the mark that the folder is apply's to rewrite.
pub const APPLY_RECORD: &str = "mezod-apply.json";

/// Refuse to write a rebuilt model into a folder that holds something and
/// was not written by `mezod apply` (a base model folder given as `-o` by
/// mistake would get a second set of weights), unless `force`.
pub fn check_apply_output(out: &Path, force: bool) -> Result<()> {
    if out.join(APPLY_RECORD).is_file() || force {
        return Ok(());
    }
    let entries = match std::fs::read_dir(out) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", out.display())),
    };
    let mut names = entries
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<Vec<_>>>()?;
    if names.is_empty() {
        return Ok(());
    }
    names.sort();
    bail!(
        "{} is not empty and was not written by mezod apply (it has {}); choose another -o, \
         or pass --force to write the model into it",
        out.display(),
        listing(&names)
    )
}

/// `a, b, c` — at most 8 names, then how many more.
fn listing(names: &[String]) -> String {
    let mut shown: Vec<String> = names.iter().take(8).cloned().collect();
    if names.len() > 8 {
        shown.push(format!("and {} more", names.len() - 8));
    }
    shown.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &str = "model: {path: /m}\ntask: {kind: causal_lm}\n\
        data: {train: /t.jsonl}\nmezo: {steps: 1, lr: 1.0e-3}\n";

    #[test]
    fn a_run_folder_is_one_that_holds_a_run_or_only_what_a_run_writes() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("runs/x");
        check_is_a_run_folder(&out, false).unwrap(); // not there yet
        std::fs::create_dir_all(out.join("seedlog")).unwrap();
        std::fs::write(out.join(".spec.yaml.partial"), "").unwrap();
        check_is_a_run_folder(&out, false).unwrap(); // a run that died at its start
                                                     // A model folder is not a run's, nor does a stray spec.yaml make one.
        std::fs::create_dir(out.join("model")).unwrap();
        std::fs::write(out.join("spec.yaml"), "not a job").unwrap();
        let e = check_is_a_run_folder(&out, false).unwrap_err().to_string();
        assert!(e.contains("holds no mezod run (it has model)"), "{e}");
        check_is_a_run_folder(&out, true).unwrap();
        std::fs::write(out.join("spec.yaml"), SPEC).unwrap();
        check_is_a_run_folder(&out, false).unwrap();
    }

    #[test]
    fn apply_writes_only_into_an_empty_folder_or_its_own() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("model");
        check_apply_output(&out, false).unwrap();
        std::fs::create_dir(&out).unwrap();
        check_apply_output(&out, false).unwrap();
        std::fs::write(out.join("model.safetensors"), "").unwrap();
        let e = check_apply_output(&out, false).unwrap_err().to_string();
        assert!(
            e.contains("not written by mezod apply (it has model.safetensors)"),
            "{e}"
        );
        check_apply_output(&out, true).unwrap();
        std::fs::write(out.join(APPLY_RECORD), "{}").unwrap();
        check_apply_output(&out, false).unwrap();
    }

    #[test]
    fn a_restart_removes_what_the_run_wrote_and_nothing_else() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path();
        for dir in ["snapshots", "model"] {
            std::fs::create_dir_all(out.join(dir)).unwrap();
            std::fs::write(out.join(dir).join("f"), "x").unwrap();
        }
        for file in ["metrics.jsonl", "result.json", "notes.txt"] {
            std::fs::write(out.join(file), "x").unwrap();
        }
        // No run: nothing goes.
        std::fs::write(out.join("spec.yaml"), "not a job").unwrap();
        assert!(discard_run(out).unwrap().contains("nothing to discard"));
        assert!(out.join("model/f").is_file());
        std::fs::write(out.join("spec.yaml"), SPEC).unwrap();
        let said = discard_run(out).unwrap();
        assert!(said.contains("discarded 0 recorded steps"), "{said}");
        let left: Vec<String> = std::fs::read_dir(out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, ["notes.txt"]);
    }
}
