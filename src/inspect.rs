//! `mezod inspect job.yaml`: what a careful user checks before spending GPU
//! hours on a job — split sizes and labels, prompts and candidate answers as
//! the model reads them (text, token ids, vocabulary pieces), how long the
//! sequences are against `max_length`, the memory estimate, and what looks
//! wrong.  A prompt mistake (a stray space before every answer, a template
//! that cuts the label off) costs points silently; here it is visible.
//!
//! Nothing heavy is loaded unless it is cheap: the tokenizer and the config
//! come from placeholders that take no memory, and the base model's
//! predictions on the first dev batch are computed only for models up to
//! [`CHEAP_PARAMETERS`] (or with `--predict`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::data::task::{Rendering, Task};
use crate::data::{load_job_splits, Example};
use crate::model::{gguf, Dtype, LanguageModel, ModelSource};
use crate::spec::{JobSpec, TaskKind};

/// Models up to this many parameters load in seconds on a CPU: their
/// predictions on the first dev batch come without asking.
pub const CHEAP_PARAMETERS: i64 = 1_000_000_000;

/// Examples shown per split.
const SHOWN: usize = 3;

#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    /// The job file (YAML), as `mezod run` or `mezod submit` would take it.
    pub job: PathBuf,
    /// One JSON object instead of the report.
    #[arg(long)]
    pub json: bool,
    /// Score the first dev batch with the base model even when it is large
    /// (by default only models up to 1 B parameters are loaded).
    #[arg(long, conflicts_with = "no_predict")]
    pub predict: bool,
    /// Do not load the model's weights (no predictions).
    #[arg(long)]
    pub no_predict: bool,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub job: String,
    pub model: String,
    pub model_type: String,
    pub parameters: i64,
    pub task: String,
    /// The longest sequence fed: `task.max_length`, or the model's positions when fewer.
    pub max_length: usize,
    /// The job's `task.max_length`.
    pub job_max_length: usize,
    /// Each classification answer word as read after a prompt, with its tokens.
    pub answer_words: Vec<Answer>,
    pub splits: Vec<SplitReport>,
    pub memory: Memory,
    pub predictions: Predictions,
    pub warnings: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Answer {
    pub text: String,
    pub ids: Vec<i64>,
    /// The vocabulary entry of each id.
    pub pieces: Vec<String>,
    /// The label values that map to it (classification).
    pub labels: Vec<String>,
    /// Whether it is the example's right answer (shown examples).
    pub gold: bool,
}

#[derive(Debug, Serialize)]
pub struct SplitReport {
    pub name: &'static str,
    pub examples: usize,
    /// Examples per label value (choice tasks).
    pub labels: BTreeMap<String, usize>,
    pub tokens: Lengths,
    /// Examples longer than `max_length` (they lose their beginning).
    pub cut: usize,
    pub shown: Vec<Shown>,
}

#[derive(Debug, Serialize)]
pub struct Lengths {
    pub p50: usize,
    pub p99: usize,
    pub max: usize,
}

#[derive(Debug, Serialize)]
pub struct Shown {
    pub prompt: String,
    pub answers: Vec<Answer>,
    pub tokens: usize,
}

#[derive(Debug, Serialize)]
pub struct Memory {
    pub bytes: u64,
    pub on: &'static str,
}

#[derive(Debug, Serialize)]
pub struct Predictions {
    /// Why there are none (not a classification task, no dev split, too large…).
    pub skipped: Option<String>,
    pub examples: usize,
    /// How often the base model picks each answer word.
    pub picked: BTreeMap<String, usize>,
    pub accuracy: Option<f64>,
}

/// The report for the job file at `args.job`.
pub fn inspect(args: &InspectArgs) -> Result<Report> {
    let spec = JobSpec::load(&args.job)?;
    let (model, whole) = open_cheaply(&spec)?;
    let mut task = Task::from_spec(&spec)?;
    if let Some(limit) = model.max_positions() {
        task.limit_length(limit);
    }
    let splits = load_job_splits(&spec)?;
    let mut warnings = Vec::new();

    let answer_words = describe_answer_words(&task, &model)?;
    let mut reports = Vec::new();
    for (name, split, examples) in [
        ("train", "training", &splits.train),
        ("dev", "dev", &splits.dev),
        ("test", "test", &splits.test),
    ] {
        let report = split_report(name, examples, &task, &model, |i| splits.origin(split, i))?;
        if report.cut > 0 {
            warnings.push(format!(
                "{} of {} {name} examples are longer than max_length {} and lose their beginning",
                report.cut,
                report.examples,
                task.max_length()
            ));
        }
        if let Some((words, class_of)) = task.classes_by_label() {
            if !examples.is_empty() {
                for (class, word) in words.iter().enumerate() {
                    let n: usize = class_of
                        .iter()
                        .filter(|(_, &c)| c == class)
                        .map(|(label, _)| report.labels.get(label).copied().unwrap_or(0))
                        .sum();
                    if n == 0 {
                        warnings.push(format!(
                            "no {name} example has the answer {}",
                            quoted(&format!(" {word}"))
                        ));
                    }
                }
            }
        }
        reports.push(report);
    }
    if let Err(why) = splits.check_batch_size(spec.mezo.batch_size) {
        warnings.push(why);
    }
    let gpu = spec.model.device.is_gpu();
    let memory = Memory {
        bytes: crate::estimate::estimate(&spec, gpu)?.total(),
        on: if gpu { "gpu" } else { "cpu" },
    };
    let predictions = predict(args, &spec, &task, (&model, whole), &splits.dev)?;
    if let Some((words, _)) = task.classes_by_label() {
        if predictions.skipped.is_none() {
            for word in words {
                let text = format!(" {word}");
                if predictions.picked.get(&text).copied().unwrap_or(0) == 0 {
                    warnings.push(format!(
                        "the base model never picks {} on the first {} dev examples",
                        quoted(&text),
                        predictions.examples
                    ));
                }
            }
        }
    }
    Ok(Report {
        job: args.job.display().to_string(),
        model: spec.model.describe(),
        model_type: model.model_type.clone(),
        parameters: model.params.numel(),
        task: serde_json::to_value(spec.task.kind)?
            .as_str()
            .unwrap_or_default()
            .to_string(),
        max_length: task.max_length(),
        job_max_length: spec.task.max_length,
        answer_words,
        splits: reports,
        memory,
        predictions,
        warnings,
    })
}

/// The model with placeholder weights (no memory) where its source allows:
/// its tokenizer, config and parameter count, which is all the report needs
/// but the predictions.  A GGUF file carries its tokenizer among its tensors,
/// so it is loaded whole (then `true`: its weights are real).  Its files are
/// checked as `mezod run` checks them (the weights must be there, even if
/// they are not read here; the tokenizer of a model folder too), so a
/// mistake reads as it will in the run.
fn open_cheaply(spec: &JobSpec) -> Result<(LanguageModel, bool)> {
    let opened = || -> Result<(LanguageModel, bool)> {
        let source = spec.model.source();
        mezod_core::job_check::model_files(&source)?;
        let cheap = match &source {
            ModelSource::Pretrained(p) if !gguf::is_gguf(p) => {
                mezod_core::job_check::tokenizer_file(&source)?;
                ModelSource::Shapes {
                    config: p.join("config.json"),
                }
            }
            ModelSource::Random { config, .. } => ModelSource::Shapes {
                config: config.clone(),
            },
            other => other.clone(),
        };
        let whole = cheap == source;
        let dtype = if whole { spec.model.dtype } else { Dtype::F32 };
        Ok((LanguageModel::open(&cheap, dtype, tch::Device::Cpu)?, whole))
    };
    opened().with_context(|| format!("loading model {}", spec.model.describe()))
}

fn describe_answer_words(task: &Task, model: &LanguageModel) -> Result<Vec<Answer>> {
    let Some((words, class_of)) = task.classes_by_label() else {
        return Ok(Vec::new());
    };
    Ok(task
        .answer_word_ids(model)?
        .into_iter()
        .enumerate()
        .map(|(class, (text, ids))| {
            let labels = class_of
                .iter()
                .filter(|(_, &c)| c == class)
                .map(|(l, _)| l.clone())
                .collect();
            debug_assert_eq!(text.trim(), words[class]);
            answer(model, text, ids, labels, false)
        })
        .collect())
}

fn answer(
    model: &LanguageModel,
    text: String,
    ids: Vec<i64>,
    labels: Vec<String>,
    gold: bool,
) -> Answer {
    let pieces = ids
        .iter()
        .map(|&id| model.tokenizer.decode_token(id).unwrap_or_default())
        .collect();
    Answer {
        text,
        ids,
        pieces,
        labels,
        gold,
    }
}

fn split_report(
    name: &'static str,
    examples: &[Example],
    task: &Task,
    model: &LanguageModel,
    origin: impl Fn(usize) -> String,
) -> Result<SplitReport> {
    let mut labels = BTreeMap::new();
    if let Some(field) = task.label_field() {
        for ex in examples {
            let value = ex
                .get(field)
                .map(|v| v.trim().to_string())
                .unwrap_or_default();
            *labels.entry(value).or_insert(0) += 1;
        }
    }
    let mut lengths = Vec::with_capacity(examples.len());
    let mut shown = Vec::new();
    for (i, ex) in examples.iter().enumerate() {
        let r: Rendering = task.render(model, ex).with_context(|| origin(i))?;
        lengths.push(r.tokens);
        if shown.len() < SHOWN {
            shown.push(Shown {
                answers: r
                    .answers
                    .into_iter()
                    .enumerate()
                    .map(|(k, (text, ids))| answer(model, text, ids, Vec::new(), r.gold == Some(k)))
                    .collect(),
                prompt: r.prompt,
                tokens: r.tokens,
            });
        }
    }
    let cut = lengths.iter().filter(|&&n| n > task.max_length()).count();
    lengths.sort_unstable();
    Ok(SplitReport {
        name,
        examples: examples.len(),
        labels,
        tokens: Lengths {
            p50: percentile(&lengths, 50),
            p99: percentile(&lengths, 99),
            max: lengths.last().copied().unwrap_or(0),
        },
        cut,
        shown,
    })
}

/// The nearest-rank percentile of sorted values (0 for none).
fn percentile(sorted: &[usize], p: usize) -> usize {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    sorted[rank - 1]
}

/// The base model's picks on the first dev batch (classification only).
fn predict(
    args: &InspectArgs,
    spec: &JobSpec,
    task: &Task,
    (opened, whole): (&LanguageModel, bool),
    dev: &[Example],
) -> Result<Predictions> {
    let skipped = |why: String| Predictions {
        skipped: Some(why),
        examples: 0,
        picked: BTreeMap::new(),
        accuracy: None,
    };
    if spec.task.kind != TaskKind::Classification {
        return Ok(skipped("only classification jobs are scored here".into()));
    }
    if dev.is_empty() {
        return Ok(skipped("the job has no dev split".into()));
    }
    if args.no_predict {
        return Ok(skipped("--no-predict".into()));
    }
    let n = opened.params.numel();
    if n > CHEAP_PARAMETERS && !args.predict {
        return Ok(skipped(format!(
            "{:.1} B parameters: loading them takes a while (--predict to do it)",
            n as f64 / 1e9
        )));
    }
    let loaded;
    let model = if whole {
        opened
    } else {
        loaded = LanguageModel::open(&spec.model.source(), spec.model.dtype, tch::Device::Cpu)
            .with_context(|| format!("loading model {}", spec.model.describe()))?;
        &loaded
    };
    let started = std::time::Instant::now();
    let batch: Vec<&Example> = dev.iter().take(spec.mezo.batch_size.max(1)).collect();
    let scores = task.class_scores(model, &batch)?;
    let picks: Vec<i64> = scores.argmax(1, false).try_into()?;
    tracing::debug!(
        "first dev batch scored in {:.2}s",
        started.elapsed().as_secs_f64()
    );
    let (words, class_of) = task.classes_by_label().expect("classification");
    let mut picked: BTreeMap<String, usize> = words.iter().map(|w| (format!(" {w}"), 0)).collect();
    let mut right = 0;
    for (ex, &pick) in batch.iter().zip(&picks) {
        *picked
            .entry(format!(" {}", words[pick as usize]))
            .or_default() += 1;
        let gold = ex
            .get(&spec.task.label_field)
            .and_then(|l| class_of.get(l.trim()));
        right += usize::from(gold == Some(&(pick as usize)));
    }
    Ok(Predictions {
        skipped: None,
        examples: batch.len(),
        picked,
        accuracy: Some(right as f64 / batch.len() as f64),
    })
}

/// A text in JSON quotes, so spaces and line breaks show.
fn quoted(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_default()
}

/// The report as a person reads it.
pub fn print(report: &Report) {
    let mib = report.memory.bytes as f64 / (1u64 << 20) as f64;
    println!("job           {}", report.job);
    println!(
        "model         {} ({}, {} parameters)",
        report.model,
        report.model_type,
        count(report.parameters)
    );
    if report.max_length < report.job_max_length {
        println!(
            "task          {}, max_length {} (the model's positions; the job asks {})",
            report.task, report.max_length, report.job_max_length
        );
    } else {
        println!(
            "task          {}, max_length {}",
            report.task, report.max_length
        );
    }
    println!(
        "memory        {mib:.0} MiB estimated peak on {} (what the daemon admits by)",
        report.memory.on
    );
    if !report.answer_words.is_empty() {
        println!(
            "\nanswer words (label values → answer as read after the prompt: token ids, pieces)"
        );
        if report.answer_words.iter().any(|a| a.ids.len() > 1) {
            println!("  (an answer of several tokens is scored by their mean log-probability)");
        }
        for a in &report.answer_words {
            println!(
                "  {:<16} → {}: {} {}",
                a.labels.join(", "),
                quoted(&a.text),
                ids_list(&a.ids),
                quoted_list(&a.pieces)
            );
        }
    }
    println!("\nsplit   examples  tokens p50/p99/max  cut  labels");
    for s in &report.splits {
        let labels = s
            .labels
            .iter()
            .map(|(l, n)| format!("{l}: {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        println!(
            "{:<7} {:>8}  {:>18}  {:>3}  {labels}",
            s.name,
            s.examples,
            format!("{}/{}/{}", s.tokens.p50, s.tokens.p99, s.tokens.max),
            s.cut
        );
    }
    for s in &report.splits {
        if s.shown.is_empty() {
            continue;
        }
        println!("\n{} examples", s.name);
        for (i, ex) in s.shown.iter().enumerate() {
            println!("  {}. {} ({} tokens)", i + 1, quoted(&ex.prompt), ex.tokens);
            for a in &ex.answers {
                println!(
                    "     {} {}: {} {}",
                    if a.gold { "✓" } else { " " },
                    quoted(&a.text),
                    ids_list(&a.ids),
                    quoted_list(&a.pieces)
                );
            }
        }
    }
    let p = &report.predictions;
    match &p.skipped {
        Some(why) => println!("\nbase model predictions: skipped ({why})"),
        None => println!(
            "\nbase model on the first {} dev examples: {} picks; accuracy {:.1} %",
            p.examples,
            p.picked
                .iter()
                .map(|(w, n)| format!("{} {n}", quoted(w)))
                .collect::<Vec<_>>()
                .join(", "),
            100.0 * p.accuracy.unwrap_or(0.0)
        ),
    }
    if report.warnings.is_empty() {
        println!("\nno warnings");
    } else {
        println!("\nwarnings");
        for w in &report.warnings {
            println!("  - {w}");
        }
    }
}

fn quoted_list(items: &[String]) -> String {
    format!(
        "[{}]",
        items
            .iter()
            .map(|s| quoted(s))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

fn ids_list(ids: &[i64]) -> String {
    serde_json::to_string(ids).unwrap_or_default()
}

/// A parameter count as people say it: 95,232 · 134.5 M · 6.7 B.
fn count(n: i64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.1} B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1} M", n as f64 / 1e6),
        n => {
            let digits = n.to_string();
            let mut out = String::new();
            for (i, c) in digits.chars().enumerate() {
                if i > 0 && (digits.len() - i) % 3 == 0 {
                    out.push(',');
                }
                out.push(c);
            }
            out
        }
    }
}
