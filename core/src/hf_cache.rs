//! Models named by their Hugging Face id: `model: {path: org/name}` is the
//! model's snapshot in the local Hugging Face cache, found as
//! `from_pretrained("org/name", local_files_only=True)` finds it.  Nothing
//! here uses the network: a model that is not in the cache is an error that
//! names every place looked in and how to fill one, never a download (a job
//! on a GPU server must not depend on the hub being up, nor fetch gigabytes
//! behind the user's back).
//!
//! The cache is huggingface_hub's layout: `<root>/models--org--name/` holds
//! `refs/<branch or tag>` (a file holding a commit hash), `snapshots/<commit>/`
//! (the repository's files at that commit, usually links into `blobs/`).  A
//! revision is a branch or tag, read in `refs/`, or a full commit hash, used
//! as it is.  The roots, in huggingface_hub's order of precedence:
//! `$HF_HUB_CACHE`, `$HUGGINGFACE_HUB_CACHE` (its older name), `$HF_HOME/hub`,
//! `$XDG_CACHE_HOME/huggingface/hub`, `~/.cache/huggingface/hub`.  The first
//! one set is the one huggingface_hub reads and writes; the others are looked
//! in after it, so that a model fetched before `HF_HOME` was set is still found.
//!
//! A snapshot folder's path names its repository and commit, so the path is
//! the pin: a run's frozen spec and a `.mezo` file record it, and
//! [`Snapshot::from_folder`] reads the id and commit back without opening
//! anything.

use std::ffi::OsString;
use std::fmt;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Result};

/// The revision taken when a job names none: the repository's default branch.
pub const DEFAULT_REVISION: &str = "main";

/// The longest repository id the hub accepts.
const MAX_ID_CHARS: usize = 96;

/// The longest revision read (a branch or tag name, or a commit hash).
const MAX_REVISION_CHARS: usize = 256;

/// The longest `refs/` file read: it holds one commit hash.
const MAX_REF_BYTES: u64 = 1024;

/// Whether `s` is a model id as the hub writes it: `org/name`, exactly one
/// slash, each part of letters, digits, `-`, `_` and `.`, neither starting
/// nor ending with `-` or `.`, without `--` or `..` (huggingface_hub's
/// `validate_repo_id`; `--` is reserved for the cache's folder names).  An id
/// without its organization (`gpt2`) is not one here: a bare name is a folder.
pub fn is_repo_id(s: &str) -> bool {
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !p.starts_with(['-', '.'])
            && !p.ends_with(['-', '.'])
            && !p.contains("--")
            && !p.contains("..")
    };
    s.len() <= MAX_ID_CHARS
        && matches!(s.split_once('/'), Some((org, name)) if part_ok(org) && part_ok(name))
}

/// Whether `s` may name a revision: a branch or tag (which may hold `/`, as
/// `refs/pr/1` does) or a commit hash; never a path that leaves `refs/`.
pub(crate) fn is_revision(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_REVISION_CHARS
        && !s.chars().any(char::is_control)
        && s.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

/// Whether `s` is a full commit hash (40 lowercase hex digits, as the cache
/// names its snapshots).
pub(crate) fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The cache's folder of a repository: `models--org--name`.
pub(crate) fn repo_folder_name(id: &str) -> String {
    format!("models--{}", id.replace('/', "--"))
}

/// A folder the cache may be in, and what named it (for messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheRoot {
    pub path: PathBuf,
    pub from: &'static str,
}

/// The cache roots of this process's environment, in precedence order.
pub(crate) fn cache_roots() -> Vec<CacheRoot> {
    roots_from(|key| std::env::var_os(key))
}

/// The cache roots `env` names, in huggingface_hub's order, each once.  An
/// empty variable counts as unset; a leading `~` is the home folder, as
/// huggingface_hub expands it; a relative one is taken from the working folder.
fn roots_from(env: impl Fn(&str) -> Option<OsString>) -> Vec<CacheRoot> {
    let var = |key: &str| env(key).filter(|v| !v.is_empty()).map(PathBuf::from);
    let home = var("HOME");
    let expand = |p: PathBuf| -> PathBuf {
        let tilde = match p.strip_prefix("~") {
            Ok(rest) => home.as_ref().map(|h| h.join(rest)),
            Err(_) => None,
        };
        let p = tilde.unwrap_or(p);
        std::path::absolute(&p).unwrap_or(p)
    };
    let mut roots = Vec::new();
    let mut add = |path: Option<PathBuf>, from: &'static str| {
        if let Some(path) = path.map(&expand) {
            if !roots.iter().any(|r: &CacheRoot| r.path == path) {
                roots.push(CacheRoot { path, from });
            }
        }
    };
    add(var("HF_HUB_CACHE"), "HF_HUB_CACHE");
    add(var("HUGGINGFACE_HUB_CACHE"), "HUGGINGFACE_HUB_CACHE");
    add(var("HF_HOME").map(|h| h.join("hub")), "HF_HOME");
    add(
        var("XDG_CACHE_HOME").map(|x| x.join("huggingface/hub")),
        "XDG_CACHE_HOME",
    );
    add(
        home.as_ref().map(|h| h.join(".cache/huggingface/hub")),
        "the default",
    );
    roots
}

/// A model's files at one commit, in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// `org/name`.
    pub id: String,
    /// The full commit hash (the snapshot folder's name).
    pub commit: String,
    /// `<root>/models--org--name/snapshots/<commit>`.
    pub folder: PathBuf,
}

impl Snapshot {
    /// The id and commit a snapshot folder's path names
    /// (`…/models--org--name/snapshots/<commit>`), or `None` if it is not
    /// shaped so.  Reads the path alone.
    pub fn from_folder(folder: &Path) -> Option<Snapshot> {
        let mut parts = folder.components().rev().map(|c| match c {
            Component::Normal(s) => s.to_str(),
            _ => None,
        });
        let commit = parts.next()??;
        let (Some(Some("snapshots")), Some(Some(repo))) = (parts.next(), parts.next()) else {
            return None;
        };
        let (org, name) = repo.strip_prefix("models--")?.split_once("--")?;
        let id = format!("{org}/{name}");
        (is_commit(commit) && is_repo_id(&id)).then(|| Snapshot {
            id,
            commit: commit.to_string(),
            folder: folder.to_path_buf(),
        })
    }

    /// The commit as messages show it: its first 12 digits.
    pub(crate) fn short_commit(&self) -> &str {
        &self.commit[..12]
    }
}

/// `id` at `revision` (default `main`) in this process's cache roots.
pub fn find(id: &str, revision: Option<&str>) -> Result<Snapshot> {
    find_in(&cache_roots(), id, revision)
}

/// `id` at `revision` (default `main`) in the first of `roots` that has it.
pub(crate) fn find_in(roots: &[CacheRoot], id: &str, revision: Option<&str>) -> Result<Snapshot> {
    if !is_repo_id(id) {
        bail!("{id:?} is not a Hugging Face model id (org/name)");
    }
    let revision = revision.unwrap_or(DEFAULT_REVISION);
    if !is_revision(revision) {
        bail!("{revision:?} is not a revision (a branch, a tag or a full commit hash)");
    }
    let mut looked = Vec::new();
    for root in roots {
        match look_in(root, id, revision) {
            Ok(snapshot) => return Ok(snapshot),
            Err(place) => looked.push(place),
        }
    }
    Err(Miss {
        id: id.to_string(),
        revision: revision.to_string(),
        looked,
        fill: roots.first().map(|r| r.path.clone()),
    }
    .into())
}

/// `id` at `revision` under one root, or what was missing there.
fn look_in(root: &CacheRoot, id: &str, revision: &str) -> std::result::Result<Snapshot, String> {
    let repo = root.path.join(repo_folder_name(id));
    let from = root.from;
    if !repo.is_dir() {
        return Err(format!("{} ({from}): no such folder", repo.display()));
    }
    let commit = if is_commit(revision) {
        revision.to_string()
    } else {
        let ref_file = repo.join("refs").join(revision);
        let text = match crate::safe_fs::read_user_text(&ref_file, MAX_REF_BYTES) {
            Ok(text) => text,
            Err(_) => {
                let known = refs_in(&repo.join("refs"));
                let known = if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                };
                return Err(format!(
                    "{} ({from}): no such file (branches and tags there: {known})",
                    ref_file.display()
                ));
            }
        };
        let commit = text.trim();
        if !is_commit(commit) {
            return Err(format!(
                "{} ({from}) holds {commit:?}, not a commit hash",
                ref_file.display()
            ));
        }
        commit.to_string()
    };
    let folder = repo.join("snapshots").join(&commit);
    if !folder.is_dir() {
        let pointed = if is_commit(revision) {
            String::new()
        } else {
            format!(" (refs/{revision} points to it)")
        };
        return Err(format!(
            "{} ({from}): no such folder{pointed}",
            folder.display()
        ));
    }
    Ok(Snapshot {
        id: id.to_string(),
        commit,
        folder,
    })
}

/// The branch and tag names under a `refs/` folder (nested ones as `a/b`), sorted.
fn refs_in(dir: &Path) -> Vec<String> {
    fn walk(dir: &Path, prefix: &str, out: &mut Vec<String>, depth: usize) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten().take(64) {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if path.is_dir() && depth < 4 {
                walk(&path, &format!("{prefix}{name}/"), out, depth + 1);
            } else if path.is_file() {
                out.push(format!("{prefix}{name}"));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, "", &mut out, 0);
    out.sort();
    out
}

/// A model that is in none of the cache roots: every place looked in, and
/// how to fill the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Miss {
    pub id: String,
    pub revision: String,
    /// Per root, the first thing missing there.
    pub looked: Vec<String>,
    /// The root huggingface_hub would fill (the first).
    pub fill: Option<PathBuf>,
}

impl fmt::Display for Miss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Miss {
            id,
            revision,
            looked,
            fill,
        } = self;
        if looked.is_empty() {
            write!(
                f,
                "{id} at {revision} cannot be looked up: no Hugging Face cache is named \
                 (neither HF_HUB_CACHE, HF_HOME nor HOME is set)"
            )?;
        } else {
            write!(
                f,
                "{id} at {revision} is not in the Hugging Face cache; looked in {}",
                looked.join("; ")
            )?;
        }
        let folder = repo_folder_name(id);
        let into = fill
            .as_ref()
            .map_or("a cache".to_string(), |r| r.display().to_string());
        let revision_arg = if revision == DEFAULT_REVISION {
            String::new()
        } else {
            format!(" --revision {revision}")
        };
        write!(
            f,
            ". mezod never downloads: on a machine with network, `hf download {id}{revision_arg}` \
             fills that machine's cache; copy its {folder} folder into {into} (or point \
             HF_HUB_CACHE at a cache that has it), or give model.path as the model's own folder"
        )
    }
}

impl std::error::Error for Miss {}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "0123456789abcdef0123456789abcdef01234567";
    const B: &str = "89abcdef0123456789abcdef0123456789abcdef";

    /// A cache under `root` holding `models--org--tiny`: snapshots A and B
    /// (each a `config.json` linking into `blobs/`), `refs/main` → A and
    /// `refs/v1` → B.
    fn cache(root: &Path) {
        let repo = root.join("models--org--tiny");
        std::fs::create_dir_all(repo.join("blobs")).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        for (commit, text) in [(A, "{\"a\": 1}"), (B, "{\"b\": 2}")] {
            let blob = format!("blob-{}", &commit[..8]);
            std::fs::write(repo.join("blobs").join(&blob), text).unwrap();
            let snap = repo.join("snapshots").join(commit);
            std::fs::create_dir_all(&snap).unwrap();
            std::os::unix::fs::symlink(format!("../../blobs/{blob}"), snap.join("config.json"))
                .unwrap();
        }
        std::fs::write(repo.join("refs/main"), A).unwrap();
        std::fs::write(repo.join("refs/v1"), format!("{B}\n")).unwrap();
    }

    fn root(path: &Path, from: &'static str) -> CacheRoot {
        CacheRoot {
            path: path.to_path_buf(),
            from,
        }
    }

    #[test]
    fn hf_repo_ids_are_org_slash_name() {
        for good in [
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "facebook/opt-125m",
            "a/b",
            "org_1/model.v2",
        ] {
            assert!(is_repo_id(good), "{good}");
        }
        for bad in [
            "gpt2", "a/b/c", "/a/b", "./a", "../a", "a/", "/a", ".a/b", "a/b.", "a/-b", "a--b/c",
            "a/b..c", "a b/c", "a/b\n", "",
        ] {
            assert!(!is_repo_id(bad), "{bad:?}");
        }
        assert!(!is_repo_id(&format!("org/{}", "x".repeat(96))));
        assert_eq!(repo_folder_name("org/tiny"), "models--org--tiny");
    }

    #[test]
    fn hf_revisions_stay_inside_refs() {
        for good in ["main", "v1.0", "refs/pr/1", A] {
            assert!(is_revision(good), "{good}");
        }
        for bad in [
            "",
            "../x",
            "a/../../b",
            "/main",
            "a//b",
            ".",
            "a\0b",
            "main\n",
        ] {
            assert!(!is_revision(bad), "{bad:?}");
        }
        assert!(is_commit(A) && !is_commit(&A.to_uppercase()) && !is_commit(&A[..39]));
    }

    #[test]
    fn hf_cache_roots_follow_huggingface_hubs_precedence() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(name, _)| *name == k)
                    .map(|(_, v)| OsString::from(v))
            }
        };
        let paths = |roots: Vec<CacheRoot>| -> Vec<(String, &'static str)> {
            roots
                .into_iter()
                .map(|r| (r.path.display().to_string(), r.from))
                .collect()
        };
        assert_eq!(
            paths(roots_from(env(&[
                ("HOME", "/home/u"),
                ("HF_HOME", "/hf"),
                ("HF_HUB_CACHE", "/hub"),
                ("HUGGINGFACE_HUB_CACHE", "/legacy"),
                ("XDG_CACHE_HOME", "/xdg"),
            ]))),
            [
                ("/hub".into(), "HF_HUB_CACHE"),
                ("/legacy".into(), "HUGGINGFACE_HUB_CACHE"),
                ("/hf/hub".into(), "HF_HOME"),
                ("/xdg/huggingface/hub".into(), "XDG_CACHE_HOME"),
                ("/home/u/.cache/huggingface/hub".into(), "the default"),
            ]
        );
        // `~` is the home folder; an empty variable is unset; a root named twice is looked in once.
        assert_eq!(
            paths(roots_from(env(&[
                ("HOME", "/home/u"),
                ("HF_HOME", "~/hf"),
                ("HF_HUB_CACHE", ""),
                ("XDG_CACHE_HOME", "/home/u/.cache"),
            ]))),
            [
                ("/home/u/hf/hub".into(), "HF_HOME"),
                ("/home/u/.cache/huggingface/hub".into(), "XDG_CACHE_HOME"),
            ]
        );
        assert!(roots_from(env(&[])).is_empty());
    }

    #[test]
    fn hf_revisions_resolve_through_refs_or_as_commits() {
        let tmp = tempfile::tempdir().unwrap();
        cache(tmp.path());
        let roots = [root(tmp.path(), "HF_HUB_CACHE")];
        let snaps = tmp.path().join("models--org--tiny/snapshots");
        for (revision, commit) in [(None, A), (Some("main"), A), (Some("v1"), B), (Some(B), B)] {
            let s = find_in(&roots, "org/tiny", revision).unwrap();
            assert_eq!(s.commit, commit, "{revision:?}");
            assert_eq!(s.folder, snaps.join(commit));
            assert_eq!(s.id, "org/tiny");
            assert!(s.folder.join("config.json").is_file(), "links into blobs/");
            assert_eq!(Snapshot::from_folder(&s.folder), Some(s));
        }
    }

    #[test]
    fn hf_later_roots_are_looked_in_when_earlier_ones_miss() {
        let (empty, full) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        cache(full.path());
        let roots = [
            root(empty.path(), "HF_HUB_CACHE"),
            root(full.path(), "the default"),
        ];
        let s = find_in(&roots, "org/tiny", None).unwrap();
        assert!(s.folder.starts_with(full.path()), "{s:?}");
    }

    #[test]
    fn hf_a_miss_names_every_place_looked_in_and_how_to_fill_the_cache() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        cache(b.path());
        let repo = b.path().join("models--org--tiny");
        let roots = [root(a.path(), "HF_HUB_CACHE"), root(b.path(), "HF_HOME")];
        // A branch nobody fetched: the refs file, and the branches there are.
        let e = find_in(&roots, "org/tiny", Some("v2"))
            .unwrap_err()
            .to_string();
        for says in [
            format!("org/tiny at v2 is not in the Hugging Face cache"),
            format!(
                "{}/models--org--tiny (HF_HUB_CACHE): no such folder",
                a.path().display()
            ),
            format!(
                "{} (HF_HOME): no such file (branches and tags there: main, v1)",
                repo.join("refs/v2").display()
            ),
            "`hf download org/tiny --revision v2`".into(),
            format!(
                "copy its models--org--tiny folder into {}",
                a.path().display()
            ),
        ] {
            assert!(e.contains(&says), "{says}\n  not in: {e}");
        }
        // A ref whose snapshot is gone; a ref that holds no hash; a commit not there.
        std::fs::remove_dir_all(repo.join("snapshots").join(A)).unwrap();
        let e = find_in(&roots[1..], "org/tiny", None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!(
                "{} (HF_HOME): no such folder (refs/main points to it)",
                repo.join("snapshots").join(A).display()
            )) && e.contains("`hf download org/tiny` fills"),
            "{e}"
        );
        std::fs::write(repo.join("refs/main"), "not a hash").unwrap();
        let e = find_in(&roots[1..], "org/tiny", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("holds \"not a hash\", not a commit hash"), "{e}");
        let e = find_in(&roots[1..], "org/tiny", Some(A))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("snapshots/{A} (HF_HOME): no such folder. ")),
            "{e}"
        );
        // Nothing to look in; not an id; not a revision.
        let e = find_in(&[], "org/tiny", None).unwrap_err().to_string();
        assert!(e.contains("no Hugging Face cache is named"), "{e}");
        assert!(find_in(&roots, "tiny", None).is_err());
        let e = find_in(&roots, "org/tiny", Some("../../x"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not a revision"), "{e}");
    }

    #[test]
    fn hf_a_snapshot_folder_names_its_id_and_commit() {
        let s = Snapshot::from_folder(Path::new(&format!(
            "/c/hub/models--HuggingFaceTB--SmolLM2-135M-Instruct/snapshots/{A}"
        )))
        .unwrap();
        assert_eq!(s.id, "HuggingFaceTB/SmolLM2-135M-Instruct");
        assert_eq!(s.commit, A);
        assert_eq!(s.short_commit(), "0123456789ab");
        for not in [
            format!("/c/models--org--tiny/snapshots/{}", &A[..12]),
            format!("/c/models--org--tiny/blobs/{A}"),
            format!("/c/datasets--org--tiny/snapshots/{A}"),
            format!("/c/models--tiny/snapshots/{A}"),
            "/c/models--org--tiny".into(),
            A.into(),
        ] {
            assert_eq!(Snapshot::from_folder(Path::new(&not)), None, "{not}");
        }
    }
}
