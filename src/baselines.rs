//! The paper's baselines in the same runner, so one job reports them beside
//! MeZO: in-context learning (k demonstrations from the training split in the
//! prompt) and linear probing (logistic regression on the model's features).
//! Both work for masked LMs too: demonstrations carry their label word in the
//! mask's place, and the probe reads the hidden state at the mask token (the
//! encoder's feature where the answer is predicted).

use anyhow::{bail, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::data::task::Task;
use crate::data::Example;
use crate::model::LanguageModel;

/// The baselines a job measured (`baselines.json` in the run folder, then result.json).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Baselines {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icl: Option<BaselineScore>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icl_k: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub linear_probe: Option<BaselineScore>,
    /// The probe's accuracy on its own training features (a fit check).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub linear_probe_train: Option<f64>,
}

/// A baseline's accuracy on dev and test (None where the split is empty).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BaselineScore {
    pub dev: Option<f64>,
    pub test: Option<f64>,
}

/// A score as a person reads it: four decimals, or "-" where there is none.
pub fn show_score(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.4}"))
}

impl std::fmt::Display for BaselineScore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "dev {}, test {}",
            show_score(self.dev),
            show_score(self.test)
        )
    }
}

#[cfg(test)]
mod score_tests {
    #[test]
    fn scores_read_as_numbers_or_a_dash() {
        let s = super::BaselineScore {
            dev: Some(0.5833333134651184),
            test: None,
        };
        assert_eq!(s.to_string(), "dev 0.5833, test -");
    }
}

/// The task with `k` demonstrations drawn (seeded) from `train`.
pub fn icl_task(task: &Task, train: &[Example], k: usize, seed: u64) -> Result<Task> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let picked: Vec<&Example> = train
        .choose_multiple(&mut rng, k.min(train.len()))
        .collect();
    task.with_demonstrations(&picked)
}

/// In-context learning: the task's metric with demonstrations in every prompt.
pub fn icl(
    task: &Task,
    model: &LanguageModel,
    splits: (&[Example], &[Example], &[Example]),
    k: usize,
    seed: u64,
    batch_size: usize,
) -> Result<BaselineScore> {
    let (train, dev, test) = splits;
    let with_demos = icl_task(task, train, k, seed)?;
    let score = |set: &[Example]| -> Result<Option<f64>> {
        if set.is_empty() {
            return Ok(None);
        }
        Ok(Some(with_demos.evaluate(model, set, batch_size)?.metric))
    };
    Ok(BaselineScore {
        dev: score(dev)?,
        test: score(test)?,
    })
}

/// Features and right classes of `examples`, in batches; a run's stop ends
/// it between batches.
fn features(
    task: &Task,
    model: &LanguageModel,
    examples: &[Example],
    batch_size: usize,
) -> Result<(Tensor, Tensor)> {
    let mut xs = Vec::new();
    let mut ys = Vec::new();
    for chunk in examples.chunks(batch_size.max(1)) {
        crate::run::interrupt::check()?;
        let batch: Vec<&Example> = chunk.iter().collect();
        let (x, y) = task.features(model, &batch)?;
        xs.push(x);
        ys.extend(y);
    }
    Ok((Tensor::cat(&xs, 0), Tensor::from_slice(&ys)))
}

/// A multinomial logistic regression, fitted by full-batch gradient descent on
/// standardized features with a little L2 (deterministic on the CPU).
pub struct LogisticRegression {
    mean: Tensor,
    std: Tensor,
    weight: Tensor,
    bias: Tensor,
}

impl LogisticRegression {
    pub fn fit(x: &Tensor, y: &Tensor, classes: i64) -> LogisticRegression {
        let mean = x.mean_dim(0, true, Kind::Float);
        let std = x.std_dim(0, false, true) + 1e-6;
        let xs = (x - &mean) / &std;
        let d = x.size()[1];
        let mut weight =
            Tensor::zeros([d, classes], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let mut bias =
            Tensor::zeros([classes], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        for _ in 0..500 {
            let loss = tch::with_grad(|| {
                let logits = xs.matmul(&weight) + &bias;
                logits.cross_entropy_for_logits(y) + weight.square().sum(Kind::Float) * 1e-3
            });
            weight.zero_grad();
            bias.zero_grad();
            loss.backward();
            tch::no_grad(|| {
                let _ = weight.g_sub_(&(weight.grad() * 0.5));
                let _ = bias.g_sub_(&(bias.grad() * 0.5));
            });
        }
        LogisticRegression {
            mean,
            std,
            weight: weight.detach(),
            bias: bias.detach(),
        }
    }

    /// Accuracy on features `x` with right classes `y`.
    pub fn accuracy(&self, x: &Tensor, y: &Tensor) -> f64 {
        let logits = ((x - &self.mean) / &self.std).matmul(&self.weight) + &self.bias;
        logits
            .argmax(1, false)
            .eq_tensor(y)
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[])
    }
}

/// Linear probing: logistic regression on the final hidden state at the last
/// prompt token (a masked LM's: at its mask token), fitted on the training split.
pub fn linear_probe(
    task: &Task,
    model: &LanguageModel,
    splits: (&[Example], &[Example], &[Example]),
    batch_size: usize,
) -> Result<(BaselineScore, f64)> {
    let (train, dev, test) = splits;
    if train.is_empty() {
        bail!("linear probing needs training examples");
    }
    let classes = task.classes(&train[0])? as i64;
    let (x, y) = features(task, model, train, batch_size)?;
    let probe = LogisticRegression::fit(&x, &y, classes);
    let train_accuracy = probe.accuracy(&x, &y);
    let score = |set: &[Example]| -> Result<Option<f64>> {
        if set.is_empty() {
            return Ok(None);
        }
        let (x, y) = features(task, model, set, batch_size)?;
        Ok(Some(probe.accuracy(&x, &y)))
    };
    Ok((
        BaselineScore {
            dev: score(dev)?,
            test: score(test)?,
        },
        train_accuracy,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logistic_regression_separates_separable_classes() {
        let _rng = crate::torch_rng_lock();
        // Three classes around three centres in 5 dimensions, one feature constant.
        tch::manual_seed(3);
        let centres = Tensor::from_slice(&[
            4.0f32, 0.0, 0.0, 1.0, 7.0, 0.0, 4.0, 0.0, 1.0, 7.0, 0.0, 0.0, 4.0, 1.0, 7.0,
        ])
        .view([3, 5]);
        let y = Tensor::arange(90, (Kind::Int64, tch::Device::Cpu)).remainder(3);
        let noise = Tensor::randn([90, 5], (Kind::Float, tch::Device::Cpu)) * 0.5;
        let x = centres.index_select(0, &y) + noise;
        let _ = x.narrow(1, 4, 1).fill_(7.0);
        let probe = LogisticRegression::fit(&x, &y, 3);
        assert_eq!(probe.accuracy(&x, &y), 1.0);
        // Labels the features cannot explain are not learned (no leak of y).
        let shuffled = y.index_select(0, &Tensor::randperm(90, (Kind::Int64, tch::Device::Cpu)));
        let blind = LogisticRegression::fit(
            &(Tensor::zeros([90, 5], (Kind::Float, tch::Device::Cpu))),
            &shuffled,
            3,
        );
        assert!(blind.accuracy(&x, &shuffled) < 0.5);
    }
}
