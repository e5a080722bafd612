//! Turning examples into a loss (for MeZO) and a metric (for evaluation).
//!
//! * `causal_lm`: mean next-token cross-entropy over the real tokens of the batch.
//! * `classification` / `multiple_choice`: one sequence per candidate answer;
//!   score = mean log-probability of the answer tokens; loss = cross-entropy
//!   over the candidates' scores; metric = accuracy of the argmax (as the MeZO paper).
//! * `classification` with a masked LM (BERT, RoBERTa; the paper's RoBERTa
//!   setting, after LM-BFF): one sequence per example, the template with the
//!   mask token where the answer goes (`{mask}`); score of a class = the
//!   log-probability of its label word's token at the mask; loss and metric as
//!   above.  Other task kinds need a causal LM.
//!
//! Sequences are left-padded with attention masks.
//!
//! **One spacing rule for answers** (classification, multiple choice, ICL
//! demonstrations, generation golds): an answer is the prompt with its
//! trailing spaces dropped, one space, and the word with its surrounding
//! whitespace trimmed.  So `" great"`, `"great"` and `"great "` are the same
//! answer with the same token ids: a word written with its own leading space
//! must not become a stray space token plus the word, which costs a byte-level
//! BPE model (GPT-2, LLaMA 3, SmolLM2) several points of accuracy.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use tch::{Kind, Tensor};

use super::squad;
use super::{fill_template, Example};
use crate::model::LanguageModel;
use crate::spec::{JobSpec, Objective, TaskKind};
use crate::tokenize::pad_left;

/// Where a prompt comes from.
#[derive(Debug, Clone)]
pub enum Prompt {
    Template(String),
    /// COPA: the premise joined to the candidates with "because" or "so".
    Copa,
}

#[derive(Debug, Clone)]
pub enum Candidates {
    /// Classification: one answer word per class; label values map to classes.
    Words {
        words: Vec<String>,
        class_of: BTreeMap<String, usize>,
    },
    /// Multiple choice: the answers are fields of the example; the label is an index.
    Fields(Vec<String>),
}

#[derive(Debug, Clone)]
pub enum Task {
    CausalLm {
        field: String,
        max_length: usize,
    },
    Choice {
        prompt: Prompt,
        candidates: Candidates,
        label_field: String,
        max_length: usize,
        /// In-context demonstrations put before every prompt (the `icl` baseline).
        demos: Vec<Example>,
        /// Classification's prompt for a masked LM: the template with a `{mask}`
        /// where the label word goes (None for multiple choice).
        mask_template: Option<String>,
        /// Score one sequence per candidate even where every answer is one
        /// token (`mezod bench --scoring per-candidate`: the path one
        /// sequence per example replaced, for comparison).
        per_candidate: bool,
    },
    Generation {
        template: String,
        answer_field: String,
        max_length: usize,
        max_new_tokens: usize,
    },
}

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

/// One choice example, tokenized: (context ⧺ answer ids, answer length) per candidate.
struct ChoiceItem {
    seqs: Vec<(Vec<i64>, usize)>,
    gold: usize,
}

/// One example as the model reads it (see [`Task::render`]).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Rendering {
    pub prompt: String,
    /// Each candidate answer: its text and its token ids.
    pub answers: Vec<(String, Vec<i64>)>,
    /// The right answer's index (choice and generation tasks).
    pub gold: Option<usize>,
    /// Tokens of the longest sequence before `max_length` cuts it.
    pub tokens: usize,
}

/// A masked LM's mask token: its text (what `{mask}` becomes) and its id.
struct MaskToken {
    text: String,
    id: i64,
}

/// Where the answer goes in a masked LM's template.
const MASK: &str = "{mask}";

/// Between demonstrations for a masked LM (LM-BFF joins them with spaces).
const MASKED_DEMO_SEPARATOR: &str = " ";

fn words(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl Task {
    pub fn from_spec(spec: &JobSpec) -> Result<Self> {
        let t = &spec.task;
        let max_length = t.max_length;
        let label_field = t.label_field.clone();
        Ok(match t.kind {
            TaskKind::Generation => Task::Generation {
                template: t
                    .template
                    .clone()
                    .context("task.template is required for generation")?,
                answer_field: t.answer_field.clone().unwrap_or_else(|| "answer".into()),
                max_length,
                max_new_tokens: t.max_new_tokens.unwrap_or(16),
            },
            TaskKind::CausalLm => Task::CausalLm {
                field: spec.data.text_field.clone(),
                max_length,
            },
            TaskKind::Classification => {
                // (causal LM prompt, masked LM prompt, default label words)
                let (template, mask_template, default_words) = match t.template.as_deref() {
                    Some("sst2") | None => (
                        format!("{{{}}} It was", spec.data.text_field),
                        // The MeZO paper's RoBERTa prompt for SST-2 (LM-BFF): "<S1> It was [MASK] ."
                        format!("{{{}}} It was {MASK}.", spec.data.text_field),
                        Some(words(&[
                            ("0", "terrible"),
                            ("1", "great"),
                            ("negative", "terrible"),
                            ("positive", "great"),
                        ])),
                    ),
                    Some("rte") => (
                        "{premise}\nDoes this mean that \"{hypothesis}\" is true? Yes or No?\n"
                            .to_string(),
                        // The paper's RoBERTa prompt for RTE: "<S1> ? [MASK] , <S2>".
                        format!("{{premise}}? {MASK}, {{hypothesis}}"),
                        Some(words(&[
                            ("0", "Yes"),
                            ("1", "No"),
                            ("entailment", "Yes"),
                            ("not_entailment", "No"),
                        ])),
                    ),
                    Some("boolq") => (
                        "{passage} {question}?".to_string(),
                        format!("{{passage}} {{question}}? {MASK}"),
                        Some(words(&[
                            ("1", "Yes"),
                            ("0", "No"),
                            ("true", "Yes"),
                            ("false", "No"),
                            ("True", "Yes"),
                            ("False", "No"),
                        ])),
                    ),
                    // A custom prompt without `{mask}`: the answer goes at its end
                    // for a masked LM too.
                    Some(custom) if custom.contains(MASK) => {
                        (custom.to_string(), custom.to_string(), None)
                    }
                    Some(custom) => (custom.to_string(), format!("{custom} {MASK}"), None),
                };
                if mask_template.matches(MASK).count() != 1 {
                    bail!("task.template may hold {MASK} once (where a masked LM's answer goes)");
                }
                let label_words = t.label_words.clone().or(default_words).context(
                    "task.label_words is required with a custom template (label value → answer word)",
                )?;
                let mut words: Vec<String> = Vec::new();
                let mut class_of = BTreeMap::new();
                for (label, word) in &label_words {
                    let word = word.trim();
                    if word.is_empty() {
                        bail!("task.label_words: the word for label {label:?} is empty");
                    }
                    let idx = words.iter().position(|w| w == word).unwrap_or_else(|| {
                        words.push(word.to_string());
                        words.len() - 1
                    });
                    class_of.insert(label.clone(), idx);
                }
                if words.len() < 2 {
                    bail!("task.label_words must give at least two different answer words");
                }
                Task::Choice {
                    prompt: Prompt::Template(template),
                    candidates: Candidates::Words { words, class_of },
                    label_field,
                    max_length,
                    demos: Vec::new(),
                    mask_template: Some(mask_template),
                    per_candidate: false,
                }
            }
            TaskKind::MultipleChoice => {
                let (prompt, fields) = match t.template.as_deref() {
                    Some("copa") => (
                        Prompt::Copa,
                        if t.choices.is_empty() {
                            vec!["choice1".into(), "choice2".into()]
                        } else {
                            t.choices.clone()
                        },
                    ),
                    Some(custom) => (Prompt::Template(custom.to_string()), t.choices.clone()),
                    None => bail!(
                        "task.template is required for multiple_choice (a prompt or \"copa\")"
                    ),
                };
                if fields.len() < 2 {
                    bail!("task.choices must name at least two fields");
                }
                Task::Choice {
                    prompt,
                    candidates: Candidates::Fields(fields),
                    label_field,
                    max_length,
                    demos: Vec::new(),
                    mask_template: None,
                    per_candidate: false,
                }
            }
        })
    }

    /// Metric name as reported in metrics and results.
    pub fn metric_name(&self) -> &'static str {
        match self {
            Task::CausalLm { .. } => "loss",
            Task::Choice { .. } => "accuracy",
            Task::Generation { .. } => "f1",
        }
    }

    pub fn higher_is_better(&self) -> bool {
        !matches!(self, Task::CausalLm { .. })
    }

    /// Check every example up front so a bad row fails the job before training, naming the row.
    /// A masked LM is checked here too: only classification, a mask token,
    /// single-token label words.
    /// `origin(i)` says where example `i` is (its file and line).
    pub fn check(
        &self,
        model: &LanguageModel,
        examples: &[Example],
        origin: impl Fn(usize) -> String,
    ) -> Result<()> {
        let mask = self.mask_token(model)?;
        if mask.is_some() {
            self.label_ids(model)?;
        }
        for (i, ex) in examples.iter().enumerate() {
            let res = match (self, &mask) {
                (Task::CausalLm { field, .. }, _) => ex
                    .get(field)
                    .map(|_| ())
                    .with_context(|| format!("no field {field:?} (fields: {})", keys(ex))),
                (_, Some(mask)) => self.encode_masked(model, ex, mask).map(|_| ()),
                (Task::Choice { .. } | Task::Generation { .. }, None) => {
                    self.encode_choice(model, ex).map(|_| ())
                }
            };
            res.with_context(|| origin(i))?;
        }
        Ok(())
    }

    /// The prompt of `ex` (for a masked LM: with its mask token), after the
    /// demonstrations if there are any.
    fn context_text(&self, ex: &Example, mask: Option<&MaskToken>) -> Result<String> {
        let Task::Choice { demos, .. } = self else {
            return self.prompt_text(ex, mask);
        };
        let mut text = String::new();
        for demo in demos {
            text.push_str(&self.demonstration(demo, mask.is_some())?);
        }
        text.push_str(&self.prompt_text(ex, mask)?);
        Ok(text)
    }

    /// One demonstration with its right answer: for a causal LM the prompt, the
    /// answer and a blank line; for a masked LM the prompt with the label word
    /// in place of the mask, then a space.
    fn demonstration(&self, ex: &Example, masked: bool) -> Result<String> {
        let (answers, gold) = self.answers(ex)?;
        if !masked {
            return Ok(format!(
                "{}{}\n\n",
                self.prompt_text(ex, None)?,
                answers[gold]
            ));
        }
        let Task::Choice {
            mask_template: Some(t),
            ..
        } = self
        else {
            unreachable!("masked LMs are refused for tasks without a mask template")
        };
        let (before, after) = t.split_once(MASK).expect("checked in from_spec");
        // The word brings its own leading space (as RoBERTa's `<mask>` takes the one before it).
        let filled = format!("{} {}{after}", before.trim_end(), answers[gold].trim());
        Ok(format!(
            "{}{MASKED_DEMO_SEPARATOR}",
            fill_template(&filled, ex)?.trim()
        ))
    }

    /// The same task with `examples` as in-context demonstrations before every
    /// prompt, each with its right answer (see [`Task::demonstration`]).
    pub fn with_demonstrations(&self, examples: &[&Example]) -> Result<Task> {
        let Task::Choice { .. } = self else {
            bail!("in-context demonstrations need a classification or multiple_choice task");
        };
        for ex in examples {
            self.answers(ex)?;
        }
        let mut task = self.clone();
        if let Task::Choice { demos, .. } = &mut task {
            *demos = examples.iter().map(|&ex| ex.clone()).collect();
        }
        Ok(task)
    }

    /// The filled template; a masked LM's has its mask token where `{mask}` was.
    fn prompt_text(&self, ex: &Example, mask: Option<&MaskToken>) -> Result<String> {
        if let (
            Some(mask),
            Task::Choice {
                mask_template: Some(t),
                ..
            },
        ) = (mask, self)
        {
            return fill_template(&t.replace(MASK, &mask.text), ex);
        }
        // The answer follows after one space (the module's spacing rule).
        let text = match self {
            Task::Generation { template: t, .. }
            | Task::Choice {
                prompt: Prompt::Template(t),
                ..
            } if t.contains(MASK) => bail!(
                "the template holds {MASK}, which marks a masked LM's answer; \
                 a causal LM reads the answer after the prompt: drop {MASK}"
            ),
            Task::Generation { template, .. } => fill_template(template, ex),
            Task::Choice {
                prompt: Prompt::Template(t),
                ..
            } => fill_template(t, ex),
            Task::Choice {
                prompt: Prompt::Copa,
                ..
            } => {
                let premise = get(ex, "premise")?.trim_end_matches(['.', ' ']);
                let joiner = if get(ex, "question")? == "cause" {
                    "because"
                } else {
                    "so"
                };
                Ok(format!("{premise} {joiner}"))
            }
            Task::CausalLm { .. } => unreachable!(),
        }?;
        Ok(text.trim_end_matches([' ', '\t']).to_string())
    }

    /// The candidate answers of `ex` — each its one leading space and the
    /// trimmed word (the module's spacing rule) — and the index of the right one.
    fn answers(&self, ex: &Example) -> Result<(Vec<String>, usize)> {
        if let Task::Generation { .. } = self {
            let golds = self.golds(ex)?;
            return Ok((golds.iter().map(|g| answer_text(g)).collect(), 0));
        }
        let Task::Choice {
            candidates,
            label_field,
            prompt,
            ..
        } = self
        else {
            unreachable!()
        };
        let label = get(ex, label_field)?;
        Ok(match candidates {
            Candidates::Words { words, class_of } => {
                let gold = *class_of.get(label.trim()).with_context(|| {
                    format!(
                        "label {label:?} has no answer word (known: {})",
                        class_of.keys().cloned().collect::<Vec<_>>().join(", ")
                    )
                })?;
                (words.iter().map(|w| answer_text(w)).collect(), gold)
            }
            Candidates::Fields(fields) => {
                let answers = fields
                    .iter()
                    .map(|f| {
                        let a = get(ex, f)?;
                        Ok(if matches!(prompt, Prompt::Copa) {
                            answer_text(&lower_first(a.trim()))
                        } else {
                            answer_text(a)
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                let gold: usize = label
                    .trim()
                    .parse()
                    .with_context(|| format!("label {label:?} is not a choice index"))?;
                if gold >= answers.len() {
                    bail!("label {gold} is out of range for {} choices", answers.len());
                }
                (answers, gold)
            }
        })
    }

    /// The prompt's token ids, cut to `max_length` from the left (the end is
    /// what the answer follows).
    fn context_ids(&self, model: &LanguageModel, ex: &Example) -> Result<Vec<i64>> {
        let ids = model
            .tokenizer
            .encode(&self.context_text(ex, None)?, true)?;
        let keep = ids.len().min(self.max_length());
        Ok(ids[ids.len() - keep..].to_vec())
    }

    /// Never feed more than `limit` tokens (a model's learned positions end
    /// there); longer sequences keep their end, where the answer is.
    pub fn limit_length(&mut self, limit: usize) {
        match self {
            Task::CausalLm { max_length, .. }
            | Task::Choice { max_length, .. }
            | Task::Generation { max_length, .. } => *max_length = (*max_length).min(limit),
        }
    }

    /// The longest sequence fed (after [`Task::limit_length`]).
    pub fn max_length(&self) -> usize {
        match self {
            Task::CausalLm { max_length, .. }
            | Task::Choice { max_length, .. }
            | Task::Generation { max_length, .. } => *max_length,
        }
    }

    /// The gold answers of a generation example: the answer field, or the
    /// strings of a JSON list in it.
    fn golds(&self, ex: &Example) -> Result<Vec<String>> {
        let Task::Generation { answer_field, .. } = self else {
            unreachable!()
        };
        let raw = get(ex, answer_field)?;
        let golds: Vec<String> = match serde_json::from_str::<Vec<String>>(raw) {
            Ok(list) => list,
            Err(_) => vec![raw.to_string()],
        };
        let golds: Vec<String> = golds
            .into_iter()
            .map(|g| g.trim().to_string())
            .filter(|g| !g.is_empty())
            .collect();
        if golds.is_empty() {
            bail!("the answer field {answer_field:?} is empty");
        }
        Ok(golds)
    }

    /// Greedy answers to `batch` (no sampling), cut at the first line break or
    /// end-of-sequence token.
    pub fn generate(&self, model: &LanguageModel, batch: &[&Example]) -> Result<Vec<String>> {
        let Task::Generation { max_new_tokens, .. } = self else {
            bail!("only generation tasks write answers");
        };
        self.mask_token(model)?;
        let _guard = tch::no_grad_guard();
        let eos = eos_ids(&model.config_text);
        let mut seqs = batch
            .iter()
            .map(|ex| self.context_ids(model, ex))
            .collect::<Result<Vec<_>>>()?;
        let mut written: Vec<Vec<i64>> = vec![Vec::new(); seqs.len()];
        let mut done = vec![false; seqs.len()];
        for _ in 0..*max_new_tokens {
            let (ids, mask) = pad_left(&seqs, model.tokenizer.pad_id);
            let t = ids.size()[1];
            let next: Vec<i64> = model
                .logits_at(&ids, &mask, t - 1, 1)
                .squeeze_dim(1)
                .argmax(-1, false)
                .to_device(tch::Device::Cpu)
                .try_into()?;
            for (i, &tok) in next.iter().enumerate() {
                if done[i] {
                    continue;
                }
                if eos.contains(&tok) {
                    done[i] = true;
                    continue;
                }
                written[i].push(tok);
                if model.tokenizer.decode(&written[i]).contains('\n') {
                    done[i] = true;
                }
                seqs[i].push(tok);
                let over = seqs[i].len().saturating_sub(self.max_length());
                seqs[i].drain(..over);
            }
            if done.iter().all(|&d| d) {
                break;
            }
        }
        Ok(written
            .iter()
            .map(|w| {
                let text = model.tokenizer.decode(w);
                text.split('\n').next().unwrap_or("").trim().to_string()
            })
            .collect())
    }

    /// Sum of the SQuAD F1 of greedy answers to `batch`.
    fn f1_sum(&self, model: &LanguageModel, batch: &[&Example]) -> Result<f64> {
        let answers = self.generate(model, batch)?;
        let mut f1 = 0.0;
        for (ex, a) in batch.iter().zip(&answers) {
            f1 += squad::best_of(squad::f1, a, &self.golds(ex)?);
        }
        Ok(f1)
    }

    fn encode_choice(&self, model: &LanguageModel, ex: &Example) -> Result<ChoiceItem> {
        let max_length = self.max_length();
        let context = model
            .tokenizer
            .encode(&self.context_text(ex, None)?, true)?;
        let (answers, gold) = self.answers(ex)?;
        let mut seqs = Vec::new();
        for a in answers {
            let ans = model.tokenizer.encode(&a, false)?;
            if ans.is_empty() || ans.len() >= max_length {
                bail!("answer {a:?} tokenizes to {} tokens", ans.len());
            }
            let mut ids = context.clone();
            ids.extend(&ans);
            let keep = ids.len().min(max_length);
            seqs.push((ids[ids.len() - keep..].to_vec(), ans.len()));
        }
        Ok(ChoiceItem { seqs, gold })
    }

    /// Score one sequence per candidate always (for benchmarks that compare
    /// it with one sequence per example).
    pub fn score_per_candidate(&mut self) {
        if let Task::Choice { per_candidate, .. } = self {
            *per_candidate = true;
        }
    }

    /// `ex` as the model reads it (for `mezod inspect`): the prompt, each
    /// candidate answer with its token ids, which one is right, and how many
    /// tokens its longest sequence takes before `max_length` cuts it.
    pub fn render(&self, model: &LanguageModel, ex: &Example) -> Result<Rendering> {
        let tokenizer = &model.tokenizer;
        if let Task::CausalLm { field, .. } = self {
            let text = get(ex, field)?;
            return Ok(Rendering {
                prompt: text.to_string(),
                answers: Vec::new(),
                gold: None,
                tokens: tokenizer.encode(text, true)?.len(),
            });
        }
        let mask = self.mask_token(model)?;
        let prompt = self.context_text(ex, mask.as_ref())?;
        let context = tokenizer.encode(&prompt, true)?.len();
        let (texts, gold) = self.answers(ex)?;
        let ids = match &mask {
            // A masked LM reads one token per label word, at its mask.
            Some(_) => self
                .label_ids(model)?
                .into_iter()
                .map(|id| vec![id])
                .collect(),
            None => texts
                .iter()
                .map(|a| tokenizer.encode(a, false))
                .collect::<Result<Vec<_>>>()?,
        };
        let longest = if mask.is_some() {
            0
        } else {
            ids.iter().map(Vec::len).max().unwrap_or(0)
        };
        Ok(Rendering {
            prompt,
            answers: texts.into_iter().zip(ids).collect(),
            gold: Some(gold),
            tokens: context + longest,
        })
    }

    /// The class index of each label value (classification), for counting
    /// labels per class; None for other tasks.
    pub fn classes_by_label(&self) -> Option<(&[String], &BTreeMap<String, usize>)> {
        match self {
            Task::Choice {
                candidates: Candidates::Words { words, class_of },
                ..
            } => Some((words, class_of)),
            _ => None,
        }
    }

    /// The field that holds each example's right answer (choice tasks).
    pub fn label_field(&self) -> Option<&str> {
        match self {
            Task::Choice { label_field, .. } => Some(label_field),
            _ => None,
        }
    }

    /// Each classification answer word as the model reads it after a prompt
    /// (a masked LM: at its mask), with its token ids.
    pub fn answer_word_ids(&self, model: &LanguageModel) -> Result<Vec<(String, Vec<i64>)>> {
        let Some((words, _)) = self.classes_by_label() else {
            return Ok(Vec::new());
        };
        if self.mask_token(model)?.is_some() {
            let ids = self.label_ids(model)?;
            return Ok(words
                .iter()
                .zip(ids)
                .map(|(w, id)| (answer_text(w), vec![id]))
                .collect());
        }
        words
            .iter()
            .map(|w| {
                let text = answer_text(w);
                let ids = model.tokenizer.encode(&text, false)?;
                Ok((text, ids))
            })
            .collect()
    }

    /// Linear-probe features of a batch: the final hidden state (f32) at the
    /// prompt's last token (a masked LM's: at its mask token), `[batch, hidden]`,
    /// and each example's right class.
    pub fn features(
        &self,
        model: &LanguageModel,
        batch: &[&Example],
    ) -> Result<(Tensor, Vec<i64>)> {
        let _guard = tch::no_grad_guard();
        if let Some(mask) = self.mask_token(model)? {
            let (seqs, gold) = self.encode_masked_batch(model, batch, &mask)?;
            let h = mask_hidden(model, &seqs, mask.id);
            return Ok((h.to_kind(Kind::Float).to_device(tch::Device::Cpu), gold));
        }
        let mut seqs = Vec::new();
        let mut gold = Vec::new();
        for ex in batch {
            seqs.push(self.context_ids(model, ex)?);
            gold.push(self.answers(ex)?.1 as i64);
        }
        let (ids, mask) = pad_left(&seqs, model.tokenizer.pad_id);
        let h = model
            .net
            .hidden(&ids.to_device(model.device), &mask.to_device(model.device));
        let last = h.size()[1] - 1;
        Ok((
            h.select(1, last)
                .to_kind(Kind::Float)
                .to_device(tch::Device::Cpu),
            gold,
        ))
    }

    /// How many classes a choice task has.
    pub fn classes(&self, ex: &Example) -> Result<usize> {
        Ok(self.answers(ex)?.0.len())
    }

    /// Candidate scores `[items, candidates]`: mean log-prob of each answer's tokens.
    fn choice_scores(&self, model: &LanguageModel, items: &[ChoiceItem]) -> Tensor {
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
        let scores = (tok_lp * &in_answer).sum_dim_intlist(1, false, Kind::Float)
            / lens.to_kind(Kind::Float);
        scores.view([items.len() as i64, n_cand])
    }

    /// Class scores `[batch, classes]` (what loss and accuracy read) and each
    /// example's right class.
    fn scores_and_gold(
        &self,
        model: &LanguageModel,
        batch: &[&Example],
    ) -> Result<(Tensor, Vec<i64>)> {
        if let Some(mask) = self.mask_token(model)? {
            let (seqs, gold) = self.encode_masked_batch(model, batch, &mask)?;
            let labels = Tensor::from_slice(&self.label_ids(model)?);
            let h = mask_hidden(model, &seqs, mask.id);
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
        Ok((self.choice_scores(model, &items), gold))
    }

    /// The token of each classification answer when every answer is one
    /// token (` great`/` terrible`, the common case); None otherwise.
    fn one_token_answers(&self, model: &LanguageModel) -> Result<Option<Vec<i64>>> {
        let Task::Choice {
            candidates: Candidates::Words { .. },
            per_candidate: false,
            ..
        } = self
        else {
            return Ok(None);
        };
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
        let keep = self.max_length().saturating_sub(1).max(1);
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

    /// The scores of a choice task's classes `[batch, classes]`: the mean
    /// log-probability of each answer's tokens (causal LM), or the
    /// log-probability of each label word at the mask (masked LM).
    pub fn class_scores(&self, model: &LanguageModel, batch: &[&Example]) -> Result<Tensor> {
        if !matches!(self, Task::Choice { .. }) {
            bail!("only classification and multiple_choice tasks score classes");
        }
        let _guard = tch::no_grad_guard();
        Ok(self.scores_and_gold(model, batch)?.0)
    }

    /// The mask token when `model` is a masked LM, which reads classification
    /// tasks only; None for a causal LM.
    fn mask_token(&self, model: &LanguageModel) -> Result<Option<MaskToken>> {
        if !model.is_masked_lm() {
            return Ok(None);
        }
        let kind = match self {
            Task::Choice {
                mask_template: Some(_),
                ..
            } => {
                let (text, id) = model.mask_token()?;
                return Ok(Some(MaskToken { text, id }));
            }
            Task::Choice { .. } => "multiple_choice",
            Task::CausalLm { .. } => "causal_lm",
            Task::Generation { .. } => "generation",
        };
        bail!(
            "{} is a masked LM ({}): it runs classification tasks only (label words \
             scored at its mask token); a {kind} task needs a causal LM",
            model.dir.display(),
            model.model_type
        )
    }

    /// The token of each class's label word at the mask (with its leading
    /// space, as RoBERTa's " great"); a word of several tokens is an error.
    fn label_ids(&self, model: &LanguageModel) -> Result<Vec<i64>> {
        let Task::Choice {
            candidates: Candidates::Words { words, .. },
            ..
        } = self
        else {
            unreachable!("masked LMs are refused for other tasks")
        };
        words
            .iter()
            .map(|w| {
                let word = answer_text(w);
                match model.tokenizer.encode(&word, false)?.as_slice() {
                    [id] => Ok(*id),
                    ids => bail!(
                        "label word {word:?} is {} tokens for this tokenizer; a masked LM fills \
                         one token at its mask: choose a one-token word",
                        ids.len()
                    ),
                }
            })
            .collect()
    }

    /// A masked LM's prompt for `ex` with exactly one mask token, within
    /// `max_length` (the first token, [CLS] or <s>, stays; the text after it
    /// loses its beginning), and the right class.
    fn encode_masked(
        &self,
        model: &LanguageModel,
        ex: &Example,
        mask: &MaskToken,
    ) -> Result<(Vec<i64>, usize)> {
        let gold = self.answers(ex)?.1;
        let mut ids = model
            .tokenizer
            .encode(&self.context_text(ex, Some(mask))?, true)?;
        let count = |ids: &[i64]| ids.iter().filter(|&&i| i == mask.id).count();
        if count(&ids) != 1 {
            bail!(
                "the prompt holds the mask token {} {} times, not once (does the text contain it?)",
                mask.text,
                count(&ids)
            );
        }
        let max_length = self.max_length().max(2);
        if ids.len() > max_length {
            ids.drain(1..1 + ids.len() - max_length);
            if count(&ids) != 1 {
                bail!(
                    "task.max_length {max_length} cuts off the mask token: put {MASK} nearer \
                     the end of the template or raise max_length"
                );
            }
        }
        Ok((ids, gold))
    }

    fn encode_masked_batch(
        &self,
        model: &LanguageModel,
        batch: &[&Example],
        mask: &MaskToken,
    ) -> Result<(Vec<Vec<i64>>, Vec<i64>)> {
        let mut seqs = Vec::new();
        let mut gold = Vec::new();
        for ex in batch {
            let (ids, g) = self.encode_masked(model, ex, mask)?;
            seqs.push(ids);
            gold.push(g as i64);
        }
        Ok((seqs, gold))
    }

    /// Loss of a batch — a plain f64.
    pub fn loss(&self, model: &LanguageModel, batch: &[&Example]) -> Result<f64> {
        self.objective(model, batch, Objective::Loss)
    }

    /// The MeZO objective of a batch: its loss, or minus its accuracy.
    pub fn objective(
        &self,
        model: &LanguageModel,
        batch: &[&Example],
        objective: Objective,
    ) -> Result<f64> {
        let _guard = tch::no_grad_guard();
        if objective == Objective::F1 {
            let f1 = self.f1_sum(model, batch)?;
            return Ok(-f1 / batch.len().max(1) as f64);
        }
        let (loss, correct) = self.batch_loss_and_correct(model, batch)?;
        let right = correct.iter().filter(|&&c| c).count();
        Ok(match objective {
            Objective::Loss => loss,
            Objective::Accuracy => -(right as f64) / batch.len().max(1) as f64,
            Objective::F1 => unreachable!(),
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
            Task::CausalLm { field, max_length } => {
                let seqs = batch
                    .iter()
                    .map(|ex| {
                        let mut ids = model.tokenizer.encode(get(ex, field)?, true)?;
                        ids.truncate(*max_length);
                        Ok(ids)
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok((causal_lm_loss(model, &seqs)?, Vec::new()))
            }
            Task::Generation { .. } => {
                // Teacher forcing on the first gold answer: mean NLL of its tokens.
                let items = batch
                    .iter()
                    .map(|ex| {
                        let mut item = self.encode_choice(model, ex)?;
                        item.seqs.truncate(1);
                        Ok(item)
                    })
                    .collect::<Result<Vec<_>>>()?;
                let scores = self.choice_scores(model, &items);
                Ok((scores.mean(Kind::Float).neg().double_value(&[]), Vec::new()))
            }
            Task::Choice { .. } => {
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
    /// after each batch (a long evaluation shows its progress).
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
            let batch: Vec<&Example> = chunk.iter().collect();
            let (loss, c) = self.batch_loss_and_correct(model, &batch)?;
            loss_sum += loss * chunk.len() as f64;
            score += match self {
                Task::Generation { .. } => self.f1_sum(model, &batch)?,
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
        let correct = matches!(self, Task::Choice { .. }).then_some(correct);
        Ok(Evaluation {
            metric,
            loss,
            correct,
        })
    }
}

/// The final hidden state at each sequence's (one) mask token, `[batch, hidden]`.
fn mask_hidden(model: &LanguageModel, seqs: &[Vec<i64>], mask_id: i64) -> Tensor {
    let (ids, mask) = pad_left(seqs, model.tokenizer.pad_id);
    let t = ids.size()[1];
    let rows: Vec<i64> = seqs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let at = s.iter().position(|&id| id == mask_id).expect("checked");
            i as i64 * t + t - s.len() as i64 + at as i64
        })
        .collect();
    let h = model
        .net
        .hidden(&ids.to_device(model.device), &mask.to_device(model.device));
    let d = h.size()[2];
    h.reshape([-1, d])
        .index_select(0, &Tensor::from_slice(&rows).to_device(h.device()))
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

fn get<'a>(ex: &'a Example, field: &str) -> Result<&'a str> {
    ex.get(field)
        .map(String::as_str)
        .with_context(|| format!("no field {field:?} (fields: {})", keys(ex)))
}

/// The end-of-sequence ids of a config (`eos_token_id`: a number or a list).
fn eos_ids(config_text: &str) -> Vec<i64> {
    let cfg: serde_json::Value = serde_json::from_str(config_text).unwrap_or_default();
    match &cfg["eos_token_id"] {
        serde_json::Value::Number(n) => n.as_i64().into_iter().collect(),
        serde_json::Value::Array(a) => a.iter().filter_map(|v| v.as_i64()).collect(),
        _ => Vec::new(),
    }
}

fn keys(ex: &Example) -> String {
    ex.keys().cloned().collect::<Vec<_>>().join(", ")
}

/// What follows a prompt as an answer: one space and the trimmed word.
fn answer_text(word: &str) -> String {
    format!(" {}", word.trim())
}

fn lower_first(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_lowercase().chain(c).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(text: &str, label: &str) -> Example {
        [("text", text), ("label", label)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn task(yaml_task: &str) -> Task {
        let spec = JobSpec::parse(
            &format!(
                "model: {{path: m}}\ntask: {yaml_task}\n\
                 data: {{train: t.jsonl}}\nmezo: {{steps: 1, lr: 0}}\n"
            ),
            std::path::Path::new("/"),
        )
        .unwrap();
        Task::from_spec(&spec).unwrap()
    }

    /// A byte-level BPE tokenizer (GPT-2's kind, as SmolLM2's and LLaMA 3's).
    fn byte_level_model() -> LanguageModel {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpt2");
        LanguageModel::load(&dir, crate::model::Dtype::F32, tch::Device::Cpu).unwrap()
    }

    /// The answer part of each candidate's token ids.
    fn answer_ids(task: &Task, model: &LanguageModel, ex: &Example) -> Vec<Vec<i64>> {
        let item = task.encode_choice(model, ex).unwrap();
        item.seqs
            .iter()
            .map(|(ids, n)| ids[ids.len() - n..].to_vec())
            .collect()
    }

    #[test]
    fn an_answer_is_one_space_and_the_trimmed_word_whatever_the_job_wrote() {
        let model = byte_level_model();
        let enc = |t: &str| model.tokenizer.encode(t, false).unwrap();
        // The fixture tells one space from two (else this test could not fail).
        assert_ne!(enc(" great"), enc("  great"));
        let want = vec![enc(" terrible"), enc(" great")];
        let ex = example("Fine.", "1");
        for words in [
            "{\"0\": terrible, \"1\": great}",
            "{\"0\": \" terrible\", \"1\": \" great\"}",
            "{\"0\": \"terrible \", \"1\": \" great \"}",
        ] {
            for template in ["\"{text} It was\"", "\"{text} It was \""] {
                let t = task(&format!(
                    "{{kind: classification, template: {template}, label_words: {words}}}"
                ));
                assert_eq!(
                    answer_ids(&t, &model, &ex),
                    want,
                    "{words} after {template}"
                );
                let item = t.encode_choice(&model, &ex).unwrap();
                assert_eq!(
                    item.seqs[1].0,
                    model.tokenizer.encode("Fine. It was great", true).unwrap(),
                    "the prompt and the answer read as one text ({words}, {template})"
                );
                // Demonstrations follow the same rule.
                let icl = t
                    .with_demonstrations(&[&example("Loved it.", "1")])
                    .unwrap();
                assert_eq!(
                    icl.context_text(&ex, None).unwrap(),
                    "Loved it. It was great\n\nFine. It was"
                );
            }
        }
        // Multiple choice: the answers are fields of the example, spaced alike.
        let mc = task("{kind: multiple_choice, template: \"{q}\", choices: [a, b]}");
        let row = |a: &str, b: &str| -> Example {
            [("q", "Pick one:"), ("a", a), ("b", b), ("label", "0")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let plain = answer_ids(&mc, &model, &row("red", "blue"));
        assert_eq!(plain, vec![enc(" red"), enc(" blue")]);
        assert_eq!(answer_ids(&mc, &model, &row(" red", "blue\n")), plain);
        // Generation: the gold answer a model is taught is spaced alike.
        let gen = task("{kind: generation, template: \"Q: {q} A:\", answer_field: a}");
        let gold = |a: &str| -> Vec<Vec<i64>> {
            let ex: Example = [("q", "Capital?"), ("a", a)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            answer_ids(&gen, &model, &ex)[..1].to_vec()
        };
        assert_eq!(gold("Paris"), vec![enc(" Paris")]);
        assert_eq!(gold("  Paris "), gold("Paris"));
    }

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
        assert!(two.one_token_answers(&model).unwrap().is_none());
    }

    #[test]
    fn demonstrations_come_before_the_prompt_with_their_right_answers() {
        let spec = JobSpec::parse(
            "model: {path: m}\ntask: {kind: classification, template: sst2}\n\
             data: {train: t.jsonl}\nmezo: {steps: 1, lr: 0}\n",
            std::path::Path::new("/"),
        )
        .unwrap();
        let task = Task::from_spec(&spec).unwrap();
        let (a, b, query) = (
            example("Loved it.", "1"),
            example("Dull.", "0"),
            example("Fine.", "1"),
        );
        assert_eq!(task.context_text(&query, None).unwrap(), "Fine. It was");
        let icl = task.with_demonstrations(&[&a, &b]).unwrap();
        assert_eq!(
            icl.context_text(&query, None).unwrap(),
            "Loved it. It was great\n\nDull. It was terrible\n\nFine. It was"
        );
        assert_eq!(icl.answers(&query).unwrap(), task.answers(&query).unwrap());
        // A masked LM: the paper's prompt with the mask token; demonstrations
        // with their label word in its place.
        let mask = MaskToken {
            text: "<mask>".into(),
            id: 0,
        };
        assert_eq!(
            task.context_text(&query, Some(&mask)).unwrap(),
            "Fine. It was <mask>."
        );
        assert_eq!(
            icl.context_text(&query, Some(&mask)).unwrap(),
            "Loved it. It was great. Dull. It was terrible. Fine. It was <mask>."
        );
    }
}
