//! Scores, losses and metrics: what MeZO minimizes for a batch (the
//! `objective`) and what an evaluation reports.
//!
//! A choice task's class scores come by the cheapest way that gives the
//! same numbers: a masked LM reads its label words at the mask; a causal LM
//! whose answers are each one token reads them all at the prompt's last
//! position (one sequence per example); otherwise one sequence per
//! candidate, scored by the mean log-probability of its answer tokens.

use anyhow::{bail, Result};
use tch::{Kind, Tensor};

use super::encoding::ChoiceItem;
use super::{get, Candidates, CausalLm, Choice, Generation, Task};
use crate::data::Example;
use crate::model::LanguageModel;
use crate::spec::Objective;
use crate::tokenize::pad_left;

/// An evaluation on a set of examples.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Evaluation {
    /// Accuracy for choice tasks, mean loss for causal LM.
    pub metric: f64,
    pub loss: f64,
    /// Which examples were answered right, in order, where the metric is
    /// accuracy (choice tasks): two models compared on the same examples are
    /// paired through it (`run::paired`).
    pub correct: Option<Vec<bool>>,
}

impl Task {
    /// Loss of a batch — a plain f64.
    pub fn loss(&self, model: &LanguageModel, batch: &[&Example]) -> Result<f64> {
        self.objective(model, batch, Objective::Loss)
    }

    /// The MeZO objective of a batch: its loss, or minus its accuracy or F1.
    pub fn objective(
        &self,
        model: &LanguageModel,
        batch: &[&Example],
        objective: Objective,
    ) -> Result<f64> {
        let _guard = tch::no_grad_guard();
        let n = batch.len().max(1) as f64;
        Ok(match objective {
            Objective::F1 => -self.f1_sum(model, batch)? / n,
            Objective::Loss => self.batch_loss_and_correct(model, batch)?.0,
            Objective::Accuracy => {
                let (_, correct) = self.batch_loss_and_correct(model, batch)?;
                -(correct.iter().filter(|&&c| c).count() as f64) / n
            }
        })
    }

    /// (mean loss, which examples were right) of one batch; no examples are
    /// right or wrong outside choice tasks.
    fn batch_loss_and_correct(
        &self,
        model: &LanguageModel,
        batch: &[&Example],
    ) -> Result<(f64, Vec<bool>)> {
        match self {
            Task::CausalLm(t) => Ok((t.loss(model, batch)?, Vec::new())),
            Task::Generation(t) => Ok((t.loss(model, batch)?, Vec::new())),
            Task::Choice(t) => t.loss_and_correct(model, batch),
        }
    }

    /// Metric and loss over `examples`, in batches of `batch_size`.
    pub fn evaluate(
        &self,
        model: &LanguageModel,
        examples: &[Example],
        batch_size: usize,
    ) -> Result<Evaluation> {
        self.evaluate_with(model, examples, batch_size, |_| {})
    }

    /// [`Task::evaluate`], telling `done` how many examples are evaluated
    /// after each batch (a long evaluation shows its progress).  A run's stop
    /// ends it between batches with [`Stopped`](crate::run::interrupt::Stopped):
    /// a test split can take minutes.
    pub fn evaluate_with(
        &self,
        model: &LanguageModel,
        examples: &[Example],
        batch_size: usize,
        mut done: impl FnMut(usize),
    ) -> Result<Evaluation> {
        let _guard = tch::no_grad_guard();
        let (mut loss_sum, mut score, mut n) = (0.0, 0f64, 0usize);
        let mut correct = Vec::new();
        for chunk in examples.chunks(batch_size.max(1)) {
            crate::run::interrupt::check()?;
            let batch: Vec<&Example> = chunk.iter().collect();
            let (loss, c) = self.batch_loss_and_correct(model, &batch)?;
            loss_sum += loss * chunk.len() as f64;
            score += match self {
                Task::Generation(t) => t.f1_sum(model, &batch)?,
                _ => c.iter().filter(|&&c| c).count() as f64,
            };
            correct.extend(c);
            n += chunk.len();
            done(n);
        }
        let loss = loss_sum / n.max(1) as f64;
        let metric = if self.higher_is_better() {
            score / n.max(1) as f64
        } else {
            loss
        };
        let correct = matches!(self, Task::Choice(_)).then_some(correct);
        Ok(Evaluation {
            metric,
            loss,
            correct,
        })
    }

    /// The scores of a choice task's classes `[batch, classes]`: the mean
    /// log-probability of each answer's tokens (causal LM), or the
    /// log-probability of each label word at the mask (masked LM).
    pub fn class_scores(&self, model: &LanguageModel, batch: &[&Example]) -> Result<Tensor> {
        let Task::Choice(t) = self else {
            bail!("only classification and multiple_choice tasks score classes");
        };
        let _guard = tch::no_grad_guard();
        Ok(t.scores_and_gold(model, batch)?.0)
    }
}

impl CausalLm {
    /// Mean next-token cross-entropy of the batch's texts.
    fn loss(&self, model: &LanguageModel, batch: &[&Example]) -> Result<f64> {
        let seqs = batch
            .iter()
            .map(|ex| {
                let mut ids = model.tokenizer.encode(get(ex, &self.field)?, true)?;
                ids.truncate(self.max_length);
                Ok(ids)
            })
            .collect::<Result<Vec<_>>>()?;
        causal_lm_loss(model, &seqs)
    }
}

impl Generation {
    /// Teacher forcing on the first gold answer: mean NLL of its tokens.
    fn loss(&self, model: &LanguageModel, batch: &[&Example]) -> Result<f64> {
        let items = batch
            .iter()
            .map(|ex| {
                let mut item = self.encode_golds(model, ex)?;
                item.seqs.truncate(1);
                Ok(item)
            })
            .collect::<Result<Vec<_>>>()?;
        let scores = choice_scores(model, &items);
        Ok(scores.mean(Kind::Float).neg().double_value(&[]))
    }
}

impl Choice {
    /// Cross-entropy over the class scores, and which examples the argmax got right.
    fn loss_and_correct(
        &self,
        model: &LanguageModel,
        batch: &[&Example],
    ) -> Result<(f64, Vec<bool>)> {
        let (scores, gold) = self.scores_and_gold(model, batch)?;
        let gold = Tensor::from_slice(&gold).to_device(scores.device());
        let loss = scores
            .log_softmax(-1, Kind::Float)
            .gather(1, &gold.unsqueeze(1), false)
            .mean(Kind::Float)
            .neg();
        let correct = scores
            .argmax(1, false)
            .eq_tensor(&gold)
            .to_device(tch::Device::Cpu);
        Ok((loss.double_value(&[]), Vec::<bool>::try_from(&correct)?))
    }

    /// Class scores `[batch, classes]` (what loss and accuracy read) and each
    /// example's right class.
    fn scores_and_gold(
        &self,
        model: &LanguageModel,
        batch: &[&Example],
    ) -> Result<(Tensor, Vec<i64>)> {
        if let Some(masked) = self.masked_lm(model)? {
            let (seqs, gold) = self.encode_masked_batch(model, batch, &masked)?;
            let labels = Tensor::from_slice(&masked.label_ids(model)?);
            let h = masked.hidden_at_mask(model, &seqs);
            let lp = model.net.head(&h).log_softmax(-1, Kind::Float);
            return Ok((lp.index_select(1, &labels.to_device(lp.device())), gold));
        }
        if let Some(answer_ids) = self.one_token_answers(model)? {
            if let Some(scores) = self.shared_prompt_scores(model, batch, &answer_ids)? {
                return Ok(scores);
            }
        }
        self.per_candidate_scores(model, batch)
    }

    /// Scores with one sequence per candidate: the prompt and the answer,
    /// whose tokens' mean log-probability is the score.
    fn per_candidate_scores(
        &self,
        model: &LanguageModel,
        batch: &[&Example],
    ) -> Result<(Tensor, Vec<i64>)> {
        let items = batch
            .iter()
            .map(|ex| self.encode_choice(model, ex))
            .collect::<Result<Vec<_>>>()?;
        let gold = items.iter().map(|i| i.gold as i64).collect();
        Ok((choice_scores(model, &items), gold))
    }

    /// The token of each classification answer when every answer is one
    /// token (` great`/` terrible`, the common case); None otherwise.
    fn one_token_answers(&self, model: &LanguageModel) -> Result<Option<Vec<i64>>> {
        if !matches!(self.candidates, Candidates::Words(_)) || self.per_candidate {
            return Ok(None);
        }
        let mut ids = Vec::new();
        for (_, word_ids) in self.answer_word_ids(model)? {
            match word_ids.as_slice() {
                [id] => ids.push(*id),
                _ => return Ok(None),
            }
        }
        Ok(Some(ids))
    }

    /// Scores when every answer is one token after the same prompt: one
    /// sequence per example, and each class's score is the log-probability
    /// of its token at the prompt's last position — what one sequence per
    /// candidate computes (the same context, cut to leave room for the
    /// answer), for 1/classes of the forward passes.
    fn shared_prompt_scores(
        &self,
        model: &LanguageModel,
        batch: &[&Example],
        answer_ids: &[i64],
    ) -> Result<Option<(Tensor, Vec<i64>)>> {
        let keep = self.max_length.saturating_sub(1).max(1);
        let mut seqs = Vec::with_capacity(batch.len());
        let mut gold = Vec::with_capacity(batch.len());
        for ex in batch {
            let ids = model
                .tokenizer
                .encode(&self.context_text(ex, None)?, true)?;
            if ids.is_empty() {
                // An empty prompt (no BOS token either) has no position to
                // read the answer from: one sequence per candidate instead.
                return Ok(None);
            }
            seqs.push(ids[ids.len().saturating_sub(keep)..].to_vec());
            gold.push(self.answers(ex)?.1 as i64);
        }
        let (ids, mask) = pad_left(&seqs, model.tokenizer.pad_id);
        let t = ids.size()[1];
        let lp = model
            .logits_at(&ids, &mask, t - 1, 1)
            .squeeze_dim(1)
            .log_softmax(-1, Kind::Float);
        let answers = Tensor::from_slice(answer_ids).to_device(lp.device());
        Ok(Some((lp.index_select(1, &answers), gold)))
    }
}

/// Candidate scores `[items, candidates]`: mean log-prob of each answer's tokens.
fn choice_scores(model: &LanguageModel, items: &[ChoiceItem]) -> Tensor {
    let n_cand = items[0].seqs.len() as i64;
    let seqs: Vec<Vec<i64>> = items
        .iter()
        .flat_map(|it| it.seqs.iter().map(|s| s.0.clone()))
        .collect();
    let ans_len: Vec<i64> = items
        .iter()
        .flat_map(|it| it.seqs.iter().map(|s| s.1 as i64))
        .collect();
    let longest_answer = *ans_len.iter().max().unwrap();
    let (ids, mask) = pad_left(&seqs, model.tokenizer.pad_id);
    let t = ids.size()[1];
    // Only the positions that predict answer tokens (the last ones, padding
    // is on the left), and only those go through the output projection.
    let lp = model
        .logits_at(&ids, &mask, t - 1 - longest_answer, longest_answer)
        .log_softmax(-1, Kind::Float);
    let targets = ids
        .narrow(1, t - longest_answer, longest_answer)
        .to_device(lp.device());
    let tok_lp = lp.gather(-1, &targets.unsqueeze(-1), false).squeeze_dim(-1);
    let lens = Tensor::from_slice(&ans_len).to_device(lp.device());
    let pos = Tensor::arange(longest_answer, (Kind::Int64, lp.device())).unsqueeze(0);
    let in_answer = pos
        .ge_tensor(&(longest_answer - lens.unsqueeze(1)))
        .to_kind(Kind::Float);
    let scores =
        (tok_lp * &in_answer).sum_dim_intlist(1, false, Kind::Float) / lens.to_kind(Kind::Float);
    scores.view([items.len() as i64, n_cand])
}

/// Mean next-token cross-entropy over the real tokens of left-padded sequences.
pub fn causal_lm_loss(model: &LanguageModel, seqs: &[Vec<i64>]) -> Result<f64> {
    if seqs.iter().all(|s| s.len() < 2) {
        bail!("every text in the batch is shorter than two tokens: nothing to predict");
    }
    let (ids, mask) = pad_left(seqs, model.tokenizer.pad_id);
    let logits = model.logits(&ids, &mask);
    let t = ids.size()[1];
    let dev = logits.device();
    let targets = ids.narrow(1, 1, t - 1).to_device(dev);
    let m = (mask.narrow(1, 1, t - 1) * mask.narrow(1, 0, t - 1)).to_device(dev);
    let targets = targets.masked_fill(&m.eq(0), -100);
    let v = logits.size()[2];
    let loss = logits
        .narrow(1, 0, t - 1)
        .reshape([-1, v])
        .cross_entropy_loss::<Tensor>(
            &targets.reshape([-1]),
            None,
            tch::Reduction::Mean,
            -100,
            0.0,
        );
    Ok(loss.double_value(&[]))
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{byte_level_model, choice, example, task};
    use super::*;

    #[test]
    fn one_token_answers_are_scored_from_one_sequence_as_from_one_per_candidate() {
        let model = byte_level_model();
        // Words that are one token of the fixture's small vocabulary.
        let one_token: Vec<String> = ["t", "g", "a", "s", "c", "b", "m", "re", "o"]
            .iter()
            .filter(|w| {
                model
                    .tokenizer
                    .encode(&format!(" {w}"), false)
                    .unwrap()
                    .len()
                    == 1
            })
            .take(3)
            .map(|w| w.to_string())
            .collect();
        assert_eq!(one_token.len(), 3, "the fixture has one-token words");
        let rows: Vec<Example> = [
            ("A short one.", "0"),
            (
                "This review is a good deal longer than the others in the batch.",
                "1",
            ),
            ("Meh.", "2"),
            (
                "Long enough to be cut by the limit below: "
                    .repeat(4)
                    .as_str(),
                "1",
            ),
        ]
        .iter()
        .map(|(t, l)| example(t, l))
        .collect();
        let batch: Vec<&Example> = rows.iter().collect();
        let words = format!(
            "{{\"0\": {}, \"1\": {}, \"2\": {}}}",
            one_token[0], one_token[1], one_token[2]
        );
        let mut t = task(&format!(
            "{{kind: classification, template: sst2, label_words: {words}}}"
        ));
        t.limit_length(48);
        let t = choice(&t);
        let answer_ids = t
            .one_token_answers(&model)
            .unwrap()
            .expect("one token each");
        let _guard = tch::no_grad_guard();
        let (shared, gold_a) = t
            .shared_prompt_scores(&model, &batch, &answer_ids)
            .unwrap()
            .expect("no empty prompt");
        let (each, gold_b) = t.per_candidate_scores(&model, &batch).unwrap();
        assert_eq!(gold_a, gold_b);
        assert_eq!(shared.size(), [4, 3]);
        let diff = (&shared - &each).abs().max().double_value(&[]);
        assert!(diff <= 1e-5, "scores differ by {diff}");
        // The task's own scoring takes the one-sequence path.
        let (scores, _) = t.scores_and_gold(&model, &batch).unwrap();
        assert_eq!((scores - &shared).abs().max().double_value(&[]), 0.0);
        // A word of two tokens keeps one sequence per candidate.
        let two = task(
            "{kind: classification, template: sst2, label_words: {\"0\": terrible, \"1\": great}}",
        );
        let two = choice(&two);
        assert!(two.one_token_answers(&model).unwrap().is_none());
    }
}
