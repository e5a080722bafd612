//! One mistake, one message: a wrong model path, a model folder without its
//! tokenizer, a misspelled field and a bad row read the same in `mezod run`,
//! `inspect`, `estimate`, `submit` and the daemon's intake check, down to the
//! data line they name.  Each broken job is written in a fresh folder and
//! every command is typed there as a user types it, with relative paths.

mod common;
use common::daemon::*;
use common::*;

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

const CONFIG: &str = "cpu_slots: 1\nrescan_interval_s: 1\nmemory_margin_mib: 64\n";

/// A job that cannot run, and what its one message must say.
struct Case {
    name: &'static str,
    model: &'static str,
    data: &'static str,
    field: &'static str,
    /// Pieces of the message (the path or the file and line, the reason).
    says: Vec<String>,
}

/// A classification job on `model` over `data`, reading `field` (relative paths).
fn job_text(case: &Case) -> String {
    format!(
        "model: {{path: {}}}\n\
         task: {{kind: classification, template: sst2, label_field: label, \
         label_words: {{\"0\": terrible, \"1\": great}}}}\n\
         data: {{train: {}, text_field: {}, dev_fraction: 0.2, split_seed: 1}}\n\
         mezo: {{steps: 2, batch_size: 2, lr: 1.0e-3, eps: 1.0e-3, seed: 1}}\n",
        case.model, case.data, case.field
    )
}

/// The example reviews as CSV rows `text,label` (lines 2 to 241).
fn review_rows() -> Vec<String> {
    std::fs::read_to_string(root().join("examples/data/reviews.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let text = v["text"].as_str().unwrap().replace('"', "\"\"");
            format!("\"{text}\",{}", v["label"])
        })
        .collect()
}

/// The folder's files: a copy of the OPT fixture, the same without its
/// tokenizer, the reviews as CSV (good, and with a row of three fields at
/// line 10) and as JSONL with line 30 lacking its text.
fn write_files(dir: &Path) {
    for (to, skip) in [("opt", ""), ("opt-without-tokenizer", "tokenizer.json")] {
        std::fs::create_dir(dir.join(to)).unwrap();
        for entry in std::fs::read_dir(fixture("opt")).unwrap() {
            let entry = entry.unwrap();
            if entry.file_name() != skip {
                std::fs::copy(entry.path(), dir.join(to).join(entry.file_name())).unwrap();
            }
        }
    }
    let rows = review_rows();
    let csv = |rows: &[String]| format!("text,label\n{}\n", rows.join("\n"));
    std::fs::write(dir.join("reviews.csv"), csv(&rows)).unwrap();
    let mut bad = rows.clone();
    bad[8] = "\"a fine film\",1,extra".into(); // line 10: the header is line 1
    std::fs::write(dir.join("bad-row.csv"), csv(&bad)).unwrap();
    let jsonl: Vec<String> = std::fs::read_to_string(root().join("examples/data/reviews.jsonl"))
        .unwrap()
        .lines()
        .enumerate()
        .map(|(i, l)| {
            if i + 1 == 30 {
                "{\"label\": 1}".into()
            } else {
                l.to_string()
            }
        })
        .collect();
    std::fs::write(dir.join("no-text-at-30.jsonl"), jsonl.join("\n") + "\n").unwrap();
}

fn cases(dir: &Path) -> Vec<Case> {
    let at = |name: &str| dir.join(name).display().to_string();
    vec![
        Case {
            name: "wrong-model-path",
            model: "no-such-model",
            data: "reviews.csv",
            field: "text",
            says: vec![format!(
                "model folder {} does not exist",
                at("no-such-model")
            )],
        },
        Case {
            name: "missing-tokenizer",
            model: "opt-without-tokenizer",
            data: "reviews.csv",
            field: "text",
            says: vec![format!(
                "no tokenizer: {}/tokenizer.json is missing",
                at("opt-without-tokenizer")
            )],
        },
        Case {
            name: "misspelled-field",
            model: "opt",
            data: "reviews.csv",
            field: "txt",
            says: vec![
                format!("{} line 1: no field \"txt\"", at("reviews.csv")),
                "the header has: label, text".into(),
            ],
        },
        Case {
            name: "row-without-text",
            model: "opt",
            data: "no-text-at-30.jsonl",
            field: "text",
            says: vec![format!(
                "{} line 30: no field \"text\"",
                at("no-text-at-30.jsonl")
            )],
        },
        Case {
            name: "row-of-three-fields",
            model: "opt",
            data: "bad-row.csv",
            field: "text",
            says: vec![format!(
                "{} line 10: the row has 3 fields but the header has 2",
                at("bad-row.csv")
            )],
        },
    ]
}

/// `mezod ARGS` in `dir`.
fn mezod_in(dir: &Path, args: &[&str]) -> Output {
    mezod().current_dir(dir).args(args).output().unwrap()
}

/// What a command said after `error: `, having failed.
fn error_line(what: &str, out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{what} succeeded: {stderr}");
    stderr
        .lines()
        .find_map(|l| l.strip_prefix("error: "))
        .unwrap_or_else(|| panic!("{what} said no error: {stderr}"))
        .to_string()
}

/// The job's text as `mezod submit` spools it: its folder pinned by a
/// `workdir:` line.
fn spooled(dir: &Path, case: &Case) -> String {
    format!("workdir: {}\n{}", dir.display(), job_text(case))
}

/// The intake check's verdict on a spooled job file: why it is rejected.
fn intake_check(spooled: &str) -> String {
    let mut child = mezod()
        .arg("check")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(spooled.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let verdict: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    verdict["rejected"]["why"]
        .as_str()
        .unwrap_or_else(|| panic!("accepted: {verdict}\n{spooled}"))
        .to_string()
}

/// The daemon's verdict on a file dropped into its spool, as its owner asks
/// for it (`mezod why`), once it has one.
fn rejection(d: &Daemon, dir: &Path, name: &str) -> String {
    let socket = d.socket().display().to_string();
    let deadline = Instant::now() + Duration::from_secs(50);
    loop {
        let out = mezod_in(dir, &["why", name, "--socket", &socket]);
        if out.status.code() != Some(2) {
            assert_eq!(out.status.code(), Some(1), "{name} was not rejected");
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let prefix = format!("{name} was rejected: ");
            return text
                .strip_prefix(&prefix)
                .unwrap_or_else(|| panic!("{text}"))
                .trim_end()
                .to_string();
        }
        assert!(Instant::now() < deadline, "no verdict on {name}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn each_mistake_reads_the_same_in_every_command() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("jobs");
    std::fs::create_dir(&dir).unwrap();
    write_files(&dir);
    let d = Daemon::start(tmp.path(), CONFIG);
    let socket = d.socket().display().to_string();
    let cases = cases(&dir);
    for case in &cases {
        let text = job_text(case);
        std::fs::write(dir.join(format!("{}.yaml", case.name)), &text).unwrap();
        // Dropped by hand, as a spooled file: its folder pinned.
        let name = format!("{}.yaml", case.name);
        let staged = d.spool().join("tmp").join(&name);
        std::fs::write(&staged, spooled(&dir, case)).unwrap();
        std::fs::rename(&staged, d.spool().join("new").join(&name)).unwrap();
    }
    // Every disagreement, so that one failure shows them all.
    let mut differ = Vec::new();
    for case in &cases {
        let job = format!("{}.yaml", case.name);
        let out = format!("runs/{}", case.name);
        let why = intake_check(&spooled(&dir, case));
        assert_eq!(why.lines().count(), 1, "{}: one problem: {why}", case.name);
        for piece in &case.says {
            assert!(
                why.contains(piece.as_str()),
                "{}: {piece:?} in {why}",
                case.name
            );
        }
        let said = [
            ("run", mezod_in(&dir, &["run", &job, "--out", &out])),
            ("inspect", mezod_in(&dir, &["inspect", &job])),
            ("estimate", mezod_in(&dir, &["estimate", &job])),
            (
                "submit",
                mezod_in(&dir, &["submit", &job, "--socket", &socket]),
            ),
        ];
        // The same sentence everywhere; run and inspect may say first that
        // they were loading the model, submit which file cannot run.
        let loading = format!("loading model {}: ", dir.join(case.model).display());
        let cannot_run = format!("{job} cannot run: ");
        for (command, output) in &said {
            let line = error_line(command, output);
            let before = line.strip_suffix(why.as_str());
            if !before.is_some_and(|b| ["", &loading, &cannot_run].contains(&b)) {
                differ.push(format!(
                    "{}: `mezod {command}` said\n  {line}\nwhere intake says\n  {why}",
                    case.name
                ));
            }
        }
    }
    for case in &cases {
        let verdict = rejection(&d, &dir, &format!("{}.yaml", case.name));
        let why = intake_check(&spooled(&dir, case));
        if verdict != why {
            differ.push(format!(
                "{}: the daemon rejected it with\n  {verdict}\nwhere `mezod check` says\n  {why}",
                case.name
            ));
        }
    }
    assert!(differ.is_empty(), "{}", differ.join("\n"));
    assert!(d.jobs().is_empty(), "nothing was queued: {:#?}", d.jobs());
}
