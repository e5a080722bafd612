//! Which weights a finished run hands back, and why, in words.
//!
//! A run hands back its final weights unless the job asks for `export: best`,
//! as Hugging Face's Trainer does unless asked for `load_best_model_at_end`:
//! choosing by dev accuracy on a small dev split (or a plateau) would
//! otherwise return the base model while the summary spoke of fine-tuning.
//! Whichever weights it is, `result.json` and the summary say which step they
//! are, why, and plainly when they are still the base model's.

use serde::{Deserialize, Serialize};

use super::metrics::EvalLine;
use crate::spec::Export;

/// The weights in `model/`, `adapter/` and `mezod export`'s default file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Exported {
    /// The steps those weights have taken.
    pub step: u64,
    /// The job's `export:` (`final` or `best`).
    pub export: Export,
    /// Why these weights, in words (and that they are the base model's, when they are).
    pub why: String,
    /// The weights are the base model's: no step was taken, or the adapters
    /// are still those the run started from.
    pub untrained: bool,
}

/// The best dev evaluation: the best metric, a tie going to the lower dev
/// loss, then to the later step (a plateau keeps what was trained longest).
/// Evaluations whose metric is not a number are never best.
pub fn best_evaluation(evals: &[EvalLine], higher_is_better: bool) -> Option<&EvalLine> {
    evals.iter().filter(|e| e.value.is_finite()).max_by(|a, b| {
        let metric = if higher_is_better {
            a.value.total_cmp(&b.value)
        } else {
            b.value.total_cmp(&a.value)
        };
        // A NaN loss sorts above every number: `b` against `a` makes it the worst.
        metric
            .then(b.loss.total_cmp(&a.loss))
            .then(a.step.cmp(&b.step))
    })
}

/// The step whose weights the run exports, and why in words (before knowing
/// whether they are still untrained; see [`Exported::untrained_because`]).
pub fn choose(export: Export, best: Option<&EvalLine>, total: u64) -> (u64, String) {
    match (export, best) {
        (Export::Final, _) => (
            total,
            format!("the final weights (step {total}; `export: final`, the default)"),
        ),
        (Export::Best, Some(b)) => {
            let loss = if b.metric == "loss" {
                String::new()
            } else {
                format!(", loss {:.4}", b.loss)
            };
            (
                b.step,
                format!(
                    "the best dev evaluation (step {}: {} {:.4}{loss}; `export: best`)",
                    b.step, b.metric, b.value
                ),
            )
        }
        (Export::Best, None) => (
            total,
            format!(
                "the final weights (step {total}): `export: best` asks for the best dev \
                 evaluation, but the job has no dev examples to choose by"
            ),
        ),
    }
}

impl Exported {
    /// `why` completed with why the weights are still the base model's, if
    /// they are: no step taken, or (`zero_lora`) LoRA adapters whose every
    /// `lora_B` is still zero, as it starts, which leave the base model as it
    /// was (MeZO's +εz, −2εz, +εz returns a zero exactly; an update with
    /// learning rate 0 adds nothing).
    pub fn new(export: Export, step: u64, why: String, zero_lora: bool) -> Exported {
        let (untrained, why) = if step == 0 {
            (
                true,
                format!(
                    "{why}: no step changed them, so these are the base model's weights{}",
                    match export {
                        Export::Best => " (`export: final` hands back the trained ones)",
                        Export::Final => "",
                    }
                ),
            )
        } else if zero_lora {
            (
                true,
                format!(
                    "{why}: every lora_B is still zero, as the run started, so the adapters \
                     leave the base model unchanged and these are its weights"
                ),
            )
        } else {
            (false, why)
        };
        Exported {
            step,
            export,
            why,
            untrained,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval(step: u64, value: f64, loss: f64) -> EvalLine {
        EvalLine {
            step,
            metric: "accuracy".into(),
            value,
            loss,
        }
    }

    #[test]
    fn the_best_evaluation_breaks_ties_by_loss_then_by_the_later_step() {
        let evals = [eval(0, 0.5, 0.70), eval(10, 0.5, 0.69), eval(20, 0.5, 0.69)];
        assert_eq!(best_evaluation(&evals, true).unwrap().step, 20);
        let evals = [eval(0, 0.5, 0.60), eval(10, 0.5, 0.69), eval(20, 0.5, 0.69)];
        assert_eq!(best_evaluation(&evals, true).unwrap().step, 0);
        let evals = [eval(0, 0.5, 0.6), eval(10, 0.75, 0.9), eval(20, 0.5, 0.1)];
        assert_eq!(best_evaluation(&evals, true).unwrap().step, 10);
        // A metric where lower is better (a causal LM's loss).
        let evals = [eval(0, 3.0, 3.0), eval(10, 2.0, 2.0), eval(20, 2.5, 2.5)];
        assert_eq!(best_evaluation(&evals, false).unwrap().step, 10);
        // A NaN metric is never best; a NaN loss loses a tie.
        let evals = [
            eval(0, 0.5, 0.7),
            eval(10, f64::NAN, 0.1),
            eval(20, 0.5, f64::NAN),
        ];
        assert_eq!(best_evaluation(&evals, true).unwrap().step, 0);
        assert_eq!(best_evaluation(&[], true), None);
    }

    #[test]
    fn the_words_say_which_weights_and_when_they_are_the_base_models() {
        let best = eval(0, 0.5, 0.7);
        let (step, why) = choose(Export::Final, Some(&best), 200);
        assert_eq!(step, 200);
        let e = Exported::new(Export::Final, step, why, false);
        assert!(!e.untrained);
        assert!(e.why.contains("final weights (step 200"), "{}", e.why);

        let (step, why) = choose(Export::Best, Some(&best), 200);
        let e = Exported::new(Export::Best, step, why, false);
        assert_eq!(e.step, 0);
        assert!(e.untrained);
        assert!(e.why.contains("base model's weights"), "{}", e.why);
        assert!(e.why.contains("export: final"), "{}", e.why);

        let (step, why) = choose(Export::Best, None, 50);
        assert_eq!(step, 50);
        assert!(why.contains("no dev examples"), "{why}");

        let e = Exported::new(Export::Final, 50, "w".into(), true);
        assert!(e.untrained && e.why.contains("leave the base model unchanged"));
    }
}
