//! Ctrl-C answered within a second, wherever a real `mezod run` is: in the
//! middle of a long dev evaluation, in the zero-shot measurement before the
//! first step, and a second Ctrl-C while the first is still being answered.
//! Each run starts from a project folder with relative paths, as a user
//! types it, and goes on with the command mezod printed.  (A stop once waited
//! for the evaluation in progress to end: minutes for a real test split.)

mod common;
use common::*;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Dev examples that make one evaluation of the llama fixture last seconds
/// (about 2 ms each), in batches of 8 lasting milliseconds.
const LONG_DEV: usize = 2000;

/// The most a stop may take: a batch, the snapshot of the tiny fixture, and
/// the process's end, with room for a busy machine.
const STOPS_WITHIN: Duration = Duration::from_secs(3);

/// How long after an evaluation starts the signal is sent.
const INTO_THE_EVALUATION: Duration = Duration::from_millis(300);

/// A project folder: `job.yaml` (the llama fixture, causal LM, `mezo` as
/// given) reading `data/reviews.jsonl` and `data/dev.jsonl` of `dev`
/// generated reviews of 60 words each.
fn project(dev: usize, mezo: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let project = tmp.path().join("project");
    std::fs::create_dir_all(project.join("data")).unwrap();
    std::fs::copy(
        root().join("examples/data/reviews.jsonl"),
        project.join("data/reviews.jsonl"),
    )
    .unwrap();
    std::fs::write(project.join("data/dev.jsonl"), dev_reviews(dev)).unwrap();
    std::fs::write(
        project.join("job.yaml"),
        format!(
            "model: {{path: {}, dtype: f32, threads: 1}}\n\
             task: {{kind: causal_lm}}\n\
             data: {{train: data/reviews.jsonl, dev: data/dev.jsonl, text_field: text}}\n\
             mezo: {{{mezo}}}\n",
            fixture("llama").display()
        ),
    )
    .unwrap();
    (tmp, project)
}

/// `n` JSON lines of 60 words from the reviews' vocabulary.
fn dev_reviews(n: usize) -> String {
    let words = [
        "the",
        "movie",
        "cast",
        "music",
        "director",
        "scene",
        "felt",
        "was",
        "charming",
        "boring",
        "clever",
        "funny",
        "sad",
        "moving",
        "tedious",
        "beautiful",
        "and",
        "every",
    ];
    (0..n)
        .map(|i| {
            let text: Vec<&str> = (0..60)
                .map(|j| words[(i * 7 + j * 13 + i * j) % words.len()])
                .collect();
            format!("{{\"text\": \"{}\"}}\n", text.join(" "))
        })
        .collect()
}

/// `mezod run job.yaml --out OUT` in `project`, with its info lines read
/// as they come (each with the moment it arrived).
struct Watched {
    child: Child,
    lines: mpsc::Receiver<(Instant, String)>,
    seen: String,
}

impl Watched {
    fn start(project: &Path, out: &str, env: &[(&str, &str)]) -> Watched {
        let mut cmd = mezod();
        cmd.current_dir(project)
            .env("MEZOD_LOG", "info")
            .args(["run", "job.yaml", "--out", out])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (send, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if send.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        Watched {
            child,
            lines,
            seen: String::new(),
        }
    }

    /// When a line holding `text` came; panics with what the run said if
    /// it ends first.
    fn wait_for(&mut self, text: &str) -> Instant {
        loop {
            match self.lines.recv_timeout(Duration::from_secs(120)) {
                Ok((at, line)) => {
                    self.seen.push_str(&line);
                    self.seen.push('\n');
                    if line.contains(text) {
                        return at;
                    }
                }
                Err(_) => panic!("no line with {text:?}; the run said:\n{}", self.seen),
            }
        }
    }

    /// Send `signal` to the run, as Ctrl-C (SIGINT) does; when it was sent.
    fn signal(&self, signal: i32) -> Instant {
        // SAFETY: kill on the child this test started and has not reaped.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, signal) }, 0);
        Instant::now()
    }

    /// The run's end: its status, when it ended, everything it said.
    fn end(mut self) -> (ExitStatus, Instant, String) {
        let status = self.child.wait().unwrap();
        let ended = Instant::now();
        for (_, line) in self.lines.iter() {
            self.seen.push_str(&line);
            self.seen.push('\n');
        }
        (status, ended, self.seen)
    }
}

/// The command after "Resume with: " in what a run said.
fn printed_command(said: &str) -> String {
    said.lines()
        .find_map(|l| l.split("Resume with: ").nth(1))
        .unwrap_or_else(|| panic!("no resume command in:\n{said}"))
        .trim()
        .to_string()
}

/// Run a printed `mezod run …` command in `project` to its end.
fn run_printed(project: &Path, command: &str) {
    let args: Vec<&str> = command.split_whitespace().collect();
    assert_eq!(args[..2], ["mezod", "run"], "{command}");
    let mut c = mezod();
    c.current_dir(project).args(&args[1..]);
    check(c.output().unwrap(), "the printed resume command");
}

/// The steps of a run's dev evaluations, in metrics.jsonl's order.
fn evaluated_at(run: &Path) -> Vec<u64> {
    let Ok(text) = std::fs::read_to_string(run.join("metrics.jsonl")) else {
        return Vec::new();
    };
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|l| l["kind"] == "eval")
        .map(|l| l["step"].as_u64().unwrap())
        .collect()
}

/// The SHA-256 of the weights the project's job ends with when nothing stops it.
fn uninterrupted_weights(project: &Path) -> String {
    check(
        mezod()
            .current_dir(project)
            .args(["run", "job.yaml", "--out", "runs/solo"])
            .output()
            .unwrap(),
        "the uninterrupted run",
    );
    sha256(&project.join("runs/solo/model/model.safetensors"))
}

/// Ctrl-C 0.3 s into the dev evaluation after step 20 ends the run at once
/// instead of seconds later, with the weights of step 20 saved; the printed
/// command evaluates step 20 again, replays nothing and ends with the
/// weights of an uninterrupted run, bit for bit.
#[test]
fn ctrl_c_during_a_dev_evaluation_stops_within_a_second_and_resumes_bit_identically() {
    let (_tmp, project) = project(
        LONG_DEV,
        "steps: 40, batch_size: 4, lr: 1.0e-3, eps: 1.0e-3, seed: 7, eval_every: 20, eval_batch_size: 8",
    );
    let want = uninterrupted_weights(&project);

    let mut run = Watched::start(&project, "runs/intr", &[]);
    let zero_shot_from = run.wait_for("step 0: evaluating");
    let evaluation = run
        .wait_for("step 0: dev loss")
        .duration_since(zero_shot_from);
    run.wait_for("step 20: evaluating");
    std::thread::sleep(INTO_THE_EVALUATION);
    let sent = run.signal(libc::SIGINT);
    let (status, ended, said) = run.end();
    let stopped_in = ended.duration_since(sent);
    println!("a dev evaluation takes {evaluation:?}; Ctrl-C in one was answered in {stopped_in:?}");
    assert_eq!(status.code(), Some(130), "{said}");
    assert!(
        stopped_in < STOPS_WITHIN,
        "took {stopped_in:?} to stop:\n{said}"
    );
    assert!(
        stopped_in * 2 < evaluation.saturating_sub(INTO_THE_EVALUATION),
        "the stop ({stopped_in:?}) waited for the evaluation ({evaluation:?}) to end"
    );
    let intr = project.join("runs/intr");
    assert_eq!(step_lines(&intr), 20, "stopped at step 20's boundary");
    assert_eq!(
        evaluated_at(&intr),
        [0],
        "the partial evaluation is discarded"
    );
    assert!(
        intr.join("snapshots/step-00000020.safetensors").is_file(),
        "the weights of step 20 are saved"
    );

    let command = printed_command(&said);
    assert_eq!(command, "mezod run job.yaml --out runs/intr");
    run_printed(&project, &command);
    let result = read_result(&intr);
    assert_eq!(result["resumed_from"], 20, "{result}");
    assert_eq!(result["replayed_steps"], 0, "{result}");
    assert_eq!(evaluated_at(&intr), [0, 20, 40], "step 20 evaluated again");
    assert_eq!(
        sha256(&intr.join("model/model.safetensors")),
        want,
        "weights after Ctrl-C in an evaluation and the printed command differ"
    );
}

/// Ctrl-C during the zero-shot evaluation, before any step, is answered as
/// fast; nothing of the evaluation is kept, and the resume measures it again.
#[test]
fn ctrl_c_during_the_zero_shot_evaluation_stops_within_a_second() {
    let (_tmp, project) = project(
        LONG_DEV,
        "steps: 4, batch_size: 4, lr: 1.0e-3, eps: 1.0e-3, seed: 7, eval_batch_size: 8",
    );
    let mut run = Watched::start(&project, "runs/early", &[]);
    run.wait_for("step 0: evaluating");
    std::thread::sleep(INTO_THE_EVALUATION);
    let sent = run.signal(libc::SIGINT);
    let (status, ended, said) = run.end();
    let stopped_in = ended.duration_since(sent);
    println!("Ctrl-C in the zero-shot evaluation was answered in {stopped_in:?}");
    assert_eq!(status.code(), Some(130), "{said}");
    assert!(
        stopped_in < STOPS_WITHIN,
        "took {stopped_in:?} to stop:\n{said}"
    );
    assert!(said.contains("after 0 steps"), "{said}");
    let early = project.join("runs/early");
    assert_eq!(evaluated_at(&early), Vec::<u64>::new());

    run_printed(&project, &printed_command(&said));
    assert_eq!(
        evaluated_at(&early),
        [0, 4],
        "the zero-shot evaluation done once"
    );
    assert_eq!(read_result(&early)["steps"], 4);
}

/// A second Ctrl-C while the first is being answered (here: a snapshot
/// written slowly, as a large model's is) ends the process at once with
/// 130, saying how far the seed log goes and how to resume; the printed
/// command finishes the run with the weights of an uninterrupted one.
#[test]
fn a_second_ctrl_c_ends_at_once_and_still_prints_the_resume_command() {
    let mezo = "steps: 30, batch_size: 4, lr: 1.0e-3, eps: 1.0e-3, seed: 7, snapshot_every: 10";
    let (_tmp, project) = project(16, mezo);
    let want = uninterrupted_weights(&project);

    // Each snapshot takes 3 s more to write.
    let slow = [("FAILPOINTS", "snapshot-before-hash=sleep(3000)")];
    let mut run = Watched::start(&project, "runs/twice", &slow);
    run.wait_for("crash points armed");
    let twice = project.join("runs/twice");
    let deadline = Instant::now() + Duration::from_secs(120);
    while step_lines(&twice) < 10 {
        assert!(Instant::now() < deadline, "no step 10:\n{}", run.seen);
        std::thread::sleep(Duration::from_millis(2));
    }
    // Writing the snapshot of step 10 now.
    std::thread::sleep(INTO_THE_EVALUATION);
    run.signal(libc::SIGINT);
    std::thread::sleep(Duration::from_millis(300));
    let second = run.signal(libc::SIGINT);
    let (status, ended, said) = run.end();
    let stopped_in = ended.duration_since(second);
    println!("a second Ctrl-C was answered in {stopped_in:?}");
    assert_eq!(status.code(), Some(130), "{said}");
    assert!(
        stopped_in < Duration::from_secs(1),
        "took {stopped_in:?}:\n{said}"
    );
    assert!(
        said.contains(
            "stopped by a second signal; everything up to step 10 is in the seed log. \
             Resume with: mezod run job.yaml --out runs/twice"
        ),
        "{said}"
    );
    assert_eq!(step_lines(&twice), 10, "{said}");

    run_printed(&project, &printed_command(&said));
    assert_eq!(
        sha256(&twice.join("model/model.safetensors")),
        want,
        "weights after a second Ctrl-C and the printed command differ"
    );
}
