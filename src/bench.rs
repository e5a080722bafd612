//! `mezod bench`: time one kind of work on a fixed batch, in a process of its
//! own (so its peak memory is its own), for `make bench` to compare.
//!
//! The batch is `batch × tokens` token ids from a fixed formula that the
//! Python reference (`bench/reference_step.py`) reproduces, with the mean
//! next-token cross-entropy as the loss: the same work on both sides.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use serde::Serialize;
use tch::Device;

use crate::data::task::causal_lm_loss;
use crate::mezo::{mezo_step, step_seed, Gradient, Rng, StepConfig, ZSweep};
use crate::model::{Dtype, LanguageModel};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchMode {
    /// One loss evaluation (a forward pass) per iteration.
    Forward,
    /// One live MeZO step (two forward passes, three z passes) per iteration.
    Step,
    /// One replayed MeZO step (three z passes, no forward) per iteration.
    Replay,
}

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Hugging Face model directory or GGUF file.
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, value_enum)]
    pub mode: BenchMode,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long, default_value_t = 64)]
    pub tokens: usize,
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    #[arg(long, default_value_t = 2)]
    pub threads: i32,
    #[arg(long, default_value = "f32")]
    pub dtype: Dtype,
    /// Generator of z: fast (counter-based, parallel) or torch (PyTorch's).
    #[arg(long, value_enum, default_value = "fast")]
    pub rng: Rng,
}

#[derive(Debug, Serialize)]
pub struct BenchResult {
    pub mode: BenchMode,
    pub rng: Rng,
    pub seconds_per_iter: f64,
    pub peak_rss_bytes: u64,
    pub parameters: i64,
    pub last_loss: Option<f64>,
}

/// Token ids `(i * 7919 + j * 104729 + 13) mod (vocab − 1) + 1` for sequence i, position j.
pub fn batch_ids(batch: usize, tokens: usize, vocab: i64) -> Vec<Vec<i64>> {
    (0..batch as i64)
        .map(|i| {
            (0..tokens as i64)
                .map(|j| (i * 7919 + j * 104_729 + 13) % (vocab - 1) + 1)
                .collect()
        })
        .collect()
}

pub fn run_bench(args: &BenchArgs) -> Result<BenchResult> {
    tch::set_num_threads(args.threads);
    let model = LanguageModel::load(&args.model, args.dtype, Device::Cpu)?;
    let config: serde_json::Value = serde_json::from_str(&model.config_text)?;
    let vocab = config["vocab_size"].as_i64().unwrap_or(1000);
    let seqs = batch_ids(args.batch, args.tokens, vocab);
    let cfg = StepConfig {
        eps: 1e-3,
        lr: 1e-7,
        weight_decay: 0.0,
    };
    let z = ZSweep::new(args.rng, args.threads.max(1) as usize);
    let mut last_loss = None;
    // One untimed iteration: allocator and thread-pool warm-up.
    let mut once = |i: usize| -> Result<()> {
        match args.mode {
            BenchMode::Forward => {
                let _guard = tch::no_grad_guard();
                last_loss = Some(causal_lm_loss(&model, &seqs)?);
            }
            BenchMode::Step => {
                let mut loss = || causal_lm_loss(&model, &seqs);
                let out = mezo_step(
                    &model.params,
                    &z,
                    step_seed(0, i as u64),
                    &cfg,
                    Gradient::Measure(&mut loss),
                )?;
                last_loss = Some(out.loss_plus);
            }
            BenchMode::Replay => {
                mezo_step(
                    &model.params,
                    &z,
                    step_seed(0, i as u64),
                    &cfg,
                    Gradient::Logged(0.1),
                )?;
            }
        }
        Ok(())
    };
    once(0)?;
    // Peak memory of the timed loop only (Linux: "5" resets VmHWM to the
    // current RSS), so that loading the model does not mask it.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let start = Instant::now();
    for i in 1..=args.iters {
        once(i)?;
    }
    let secs = start.elapsed().as_secs_f64() / args.iters as f64;
    Ok(BenchResult {
        mode: args.mode,
        rng: args.rng,
        seconds_per_iter: secs,
        peak_rss_bytes: crate::run::peak_rss_bytes(),
        parameters: model.params.numel(),
        last_loss,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_batch_formula_stays_inside_the_vocabulary() {
        let ids = batch_ids(3, 5, 320);
        assert_eq!(ids.len(), 3);
        assert!(ids.iter().flatten().all(|&i| (1..320).contains(&i)));
        assert_ne!(ids[0], ids[1]);
        assert_eq!(ids[1][2], (7919 + 2 * 104_729 + 13) % 319 + 1);
    }
}
