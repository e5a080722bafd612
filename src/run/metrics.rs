//! `metrics.jsonl`: one JSON object per step and one per evaluation, appended
//! as they happen.  On resume its step lines are rewritten from the seed log,
//! so it holds every durable step exactly once.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::seedlog::StepRecord;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvalLine {
    pub step: u64,
    pub metric: String,
    pub value: f64,
    pub loss: f64,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Line {
    Step {
        #[serde(flatten)]
        rec: StepRecordLine,
    },
    Eval {
        #[serde(flatten)]
        eval: EvalLine,
    },
}

/// The step records of a metrics.jsonl file, in order (a daemon job's run
/// folder has no seed log of its own; its metrics file is rebuilt from the
/// daemon's and holds every step's seed and scalars exactly).
pub fn read_steps(path: &std::path::Path) -> Result<Vec<StepRecord>> {
    let text = std::fs::read_to_string(path)?;
    let mut steps = Vec::new();
    for line in text.lines() {
        if let Ok(Line::Step { rec }) = serde_json::from_str::<Line>(line) {
            steps.push(rec.rec);
        }
    }
    Ok(steps)
}

/// A step as written to metrics.jsonl (the seed-log record plus its batch).
#[derive(Serialize, Deserialize, Clone)]
struct StepRecordLine {
    #[serde(flatten)]
    rec: StepRecord,
    batch: Vec<usize>,
}

impl StepRecordLine {
    fn new(rec: &StepRecord, batch: Vec<usize>) -> Self {
        Self {
            rec: rec.clone(),
            batch,
        }
    }
}

pub struct MetricsFile {
    path: PathBuf,
    file: File,
    steps: Vec<StepRecord>,
    evals: Vec<EvalLine>,
}

impl MetricsFile {
    /// Open for a run resuming after `records` (the durable seed log): the
    /// step lines are rewritten from the log itself (a line lost to a kill
    /// between the log and this file comes back; a line beyond the log goes),
    /// and the evaluations up to the resume point are kept.
    pub fn open(
        path: &Path,
        records: &[StepRecord],
        batch_of: impl Fn(u64) -> Vec<usize>,
    ) -> Result<Self> {
        let resume_step = records.len() as u64;
        let mut evals: Vec<EvalLine> = Vec::new();
        if let Ok(f) = File::open(path) {
            for line in BufReader::new(f).lines() {
                if let Ok(Line::Eval { eval }) = serde_json::from_str::<Line>(&line?) {
                    if eval.step <= resume_step && !evals.iter().any(|e| e.step == eval.step) {
                        evals.push(eval);
                    }
                }
            }
        }
        evals.sort_by_key(|e| e.step);
        let mut text = String::new();
        let mut push = |line: &Line| -> Result<()> {
            text.push_str(&serde_json::to_string(line)?);
            text.push('\n');
            Ok(())
        };
        for e in evals.iter().filter(|e| e.step == 0) {
            push(&Line::Eval { eval: e.clone() })?;
        }
        for rec in records {
            push(&Line::Step {
                rec: StepRecordLine::new(rec, batch_of(rec.step)),
            })?;
            for e in evals.iter().filter(|e| e.step == rec.step + 1) {
                push(&Line::Eval { eval: e.clone() })?;
            }
        }
        mezod_core::durable::write(path, text)?;
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            steps: records.to_vec(),
            evals,
        })
    }

    fn write(&mut self, line: &Line) -> Result<()> {
        writeln!(self.file, "{}", serde_json::to_string(line)?)
            .with_context(|| format!("writing {}", self.path.display()))
    }

    pub fn step(&mut self, rec: &StepRecord, batch: &[usize]) -> Result<()> {
        let line = StepRecordLine::new(rec, batch.to_vec());
        self.write(&Line::Step { rec: line })?;
        self.steps.push(rec.clone());
        Ok(())
    }

    pub fn eval(&mut self, e: &EvalLine) -> Result<()> {
        self.write(&Line::Eval { eval: e.clone() })?;
        self.evals.push(e.clone());
        Ok(())
    }

    pub fn has_eval(&self, step: u64) -> bool {
        self.evals.iter().any(|e| e.step == step)
    }

    pub fn evals(&self) -> Vec<EvalLine> {
        self.evals.clone()
    }

    pub fn steps(&self) -> &[StepRecord] {
        &self.steps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(step: u64) -> StepRecord {
        StepRecord {
            step,
            seed: step + 100,
            projected_grad: 0.5 * step as f64,
            loss_plus: 1.0,
            loss_minus: 2.0,
            lr: 1e-3,
            more: vec![],
            spread: None,
            basis: None,
        }
    }

    fn eval(step: u64) -> EvalLine {
        EvalLine {
            step,
            metric: "loss".into(),
            value: step as f64,
            loss: step as f64,
        }
    }

    #[test]
    fn resume_rewrites_steps_from_the_log_and_keeps_evaluations() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        {
            let mut m = MetricsFile::open(&path, &[], |_| vec![]).unwrap();
            m.eval(&eval(0)).unwrap();
            // Step 2's line was lost to a kill; step 5 ran past the durable log.
            for s in [0, 1, 3, 4, 5] {
                m.step(&rec(s), &[9]).unwrap();
                if s == 3 {
                    m.eval(&eval(4)).unwrap();
                }
            }
            m.eval(&eval(6)).unwrap();
        }
        let log: Vec<StepRecord> = (0..5).map(rec).collect();
        let m = MetricsFile::open(&path, &log, |s| vec![s as usize]).unwrap();
        assert_eq!(m.steps(), &log[..]);
        assert_eq!(m.evals(), vec![eval(0), eval(4)]);
        let kinds: Vec<String> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                format!("{}{}", &v["kind"].as_str().unwrap()[..1], v["step"])
            })
            .collect();
        assert_eq!(kinds, ["e0", "s0", "s1", "s2", "s3", "e4", "s4"]);
    }
}
