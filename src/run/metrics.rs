//! `metrics.jsonl`: one JSON object per step and one per evaluation, appended
//! as they happen.  On resume the file is cut back to what precedes the
//! resume point, so it never holds a step twice.

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

/// A step as written to metrics.jsonl (the seed-log record plus its batch).
#[derive(Serialize, Deserialize, Clone)]
struct StepRecordLine {
    step: u64,
    seed: u64,
    projected_grad: f64,
    loss_plus: f64,
    loss_minus: f64,
    lr: f64,
    batch: Vec<usize>,
}

pub struct MetricsFile {
    path: PathBuf,
    file: File,
    steps: Vec<StepRecord>,
    evals: Vec<EvalLine>,
}

impl MetricsFile {
    /// Open, keeping only steps before `resume_step` and evaluations up to it.
    pub fn open(path: &Path, resume_step: u64) -> Result<Self> {
        let mut kept = Vec::new();
        let (mut steps, mut evals) = (Vec::new(), Vec::new());
        if let Ok(f) = File::open(path) {
            for line in BufReader::new(f).lines() {
                let line = line?;
                match serde_json::from_str::<Line>(&line) {
                    Ok(Line::Step { rec }) if rec.step < resume_step => {
                        steps.push(StepRecord {
                            step: rec.step,
                            seed: rec.seed,
                            projected_grad: rec.projected_grad,
                            loss_plus: rec.loss_plus,
                            loss_minus: rec.loss_minus,
                            lr: rec.lr,
                        });
                        kept.push(line);
                    }
                    Ok(Line::Eval { eval })
                        if eval.step <= resume_step
                            && !evals.iter().any(|e: &EvalLine| e.step == eval.step) =>
                    {
                        evals.push(eval);
                        kept.push(line);
                    }
                    _ => {}
                }
            }
        }
        let tmp = path.with_extension("jsonl.partial");
        std::fs::write(
            &tmp,
            kept.iter().map(|l| format!("{l}\n")).collect::<String>(),
        )?;
        std::fs::rename(&tmp, path)?;
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            steps,
            evals,
        })
    }

    fn write(&mut self, line: &Line) -> Result<()> {
        writeln!(self.file, "{}", serde_json::to_string(line)?)
            .with_context(|| format!("writing {}", self.path.display()))
    }

    pub fn step(&mut self, rec: &StepRecord, batch: &[usize]) -> Result<()> {
        let line = StepRecordLine {
            step: rec.step,
            seed: rec.seed,
            projected_grad: rec.projected_grad,
            loss_plus: rec.loss_plus,
            loss_minus: rec.loss_minus,
            lr: rec.lr,
            batch: batch.to_vec(),
        };
        self.write(&Line::Step { rec: line })?;
        self.steps.push(*rec);
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
