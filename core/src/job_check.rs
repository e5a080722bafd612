//! What can be known about a job before a worker starts: that its model is
//! of a type the engine runs, that its config agrees with its weights, that
//! its tokenizer loads, and that its data can be read and its first rows
//! have the fields its task needs.  `mezod submit` and `mezod estimate` run
//! these checks as the user; the daemon's intake runs them as the file's
//! owner (`daemon/checker.rs`).  A job that fails one is refused with the
//! reason instead of failing in a worker.
//!
//! The engine runs the same functions where `mezod run` and `mezod inspect`
//! meet the same question ([`model_files`], [`tokenizer_file`],
//! [`load_tokenizer`], [`check_rows`], [`no_field`]), so a mistake reads the
//! same in every command, down to the data line it names.
//!
//! The tokenizer is loaded with the `tokenizers` crate, the engine's own
//! (same version and features), so "loads here" means "loads in the worker".
//! It costs the `mezod` binary a few megabytes and nothing at run time
//! unless a check runs: `status`, `logs` and `cancel` never load it.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

use crate::data_file::{header_row, read_rows, Example, Origin};
use crate::gguf_header::{is_gguf, read_header};
use crate::model_ref::{ModelSource, MODEL_TYPES};
use crate::prompts::{template_fields, ClassificationPreset, COPA, DEFAULT_CLASSIFICATION};
use crate::safe_fs::{read_user_text, MAX_JSON_BYTES};
use crate::spec::{DataSpec, JobSpec, TaskKind};
use crate::weight_files::{safetensors_files, safetensors_shapes};

/// Data rows read by a check: enough to catch a file of the wrong shape,
/// bounded so a check stays quick on any data size.  A bad row further down
/// is the worker's to find (and it names the file and line).
pub const ROWS_CHECKED: usize = 100;

/// Every problem the checks find, in the order a user would fix them.  A
/// model whose files are not there is one problem, not also a missing
/// tokenizer: the path is what to fix.
pub fn problems(spec: &JobSpec) -> Vec<anyhow::Error> {
    let mut found = Vec::new();
    let source = spec.model.source();
    match model_files(&source) {
        Err(e) => found.push(e),
        Ok(()) => {
            if let Err(e) = check_model(spec) {
                found.push(e.context(format!("model {}", spec.model.describe())));
            }
            if let Err(e) = check_tokenizer(&source) {
                found.push(e);
            }
        }
    }
    for path in [
        Some(&spec.data.train),
        spec.data.dev.as_ref(),
        spec.data.test.as_ref(),
    ]
    .into_iter()
    .flatten()
    {
        if let Err(e) = check_data(spec, path) {
            found.push(e);
        }
    }
    found
}

/// All of [`problems`] as one error (each on its own line), or Ok.
pub fn check(spec: &JobSpec) -> Result<()> {
    let found = problems(spec);
    if found.is_empty() {
        return Ok(());
    }
    let lines: Vec<String> = found.iter().map(|e| format!("{e:#}")).collect();
    Err(anyhow!("{}", lines.join("\n")))
}

/// What `model.path` may name, said wherever a model is not found.
const MODEL_PATH_HELP: &str = "model.path must name a Hugging Face model folder with \
     config.json, model.safetensors and tokenizer.json, a .gguf file, or a Hugging Face id \
     (org/name) in the local cache";

/// That the files `model:` names are there, before anything reads them: the
/// folder (or GGUF file, or random-weight config), its `config.json` and
/// its weights.  Only metadata is asked for, so a path the user may not see
/// is said to be unreadable, never to be absent.
pub fn model_files(source: &ModelSource) -> Result<()> {
    match source {
        ModelSource::Pretrained(path) if is_gguf(path) => {
            if !found(path, "model file")?.is_file() {
                bail!("model file {} is not a regular file", path.display());
            }
        }
        ModelSource::Pretrained(dir) => {
            if !found(dir, "model folder")?.is_dir() {
                bail!(
                    "model.path {} is a file, not a model folder ({MODEL_PATH_HELP}; a \
                     one-file model must end in .gguf)",
                    dir.display()
                );
            }
            let config = dir.join("config.json");
            if is_absent(&config) {
                bail!(
                    "{} has no config.json: a Hugging Face model folder holds config.json, \
                     model.safetensors and tokenizer.json (transformers' save_pretrained writes \
                     them)",
                    dir.display()
                );
            }
            safetensors_files(dir)?;
        }
        ModelSource::Random { config, .. } | ModelSource::Shapes { config } => {
            if is_absent(config) {
                bail!(
                    "model.config {} does not exist (it names the config.json of the \
                     random-weight model)",
                    config.display()
                );
            }
        }
    }
    Ok(())
}

/// The metadata of the model's own path, or why there is none.
fn found(path: &Path, what: &str) -> Result<std::fs::Metadata> {
    std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            anyhow!(
                "{what} {} does not exist ({MODEL_PATH_HELP})",
                path.display()
            )
        }
        _ => anyhow!("cannot read {what} {}: {e}", path.display()),
    })
}

/// Whether `path` is certainly not there (not merely unreadable).
fn is_absent(path: &Path) -> bool {
    matches!(std::fs::metadata(path), Err(e) if e.kind() == std::io::ErrorKind::NotFound)
}

/// The config as JSON and the stored tensors' shapes (None for a config
/// alone, whose shapes follow from it).
fn config_and_shapes(
    source: &ModelSource,
) -> Result<(serde_json::Value, Option<crate::estimate::Shapes>)> {
    let read_json = |path: &Path| -> Result<serde_json::Value> {
        serde_json::from_str(&read_user_text(path, MAX_JSON_BYTES)?)
            .with_context(|| format!("{} is not valid JSON", path.display()))
    };
    Ok(match source {
        ModelSource::Pretrained(path) if is_gguf(path) => {
            let header = read_header(path)?;
            (header.config, Some(header.shapes))
        }
        ModelSource::Pretrained(dir) => (
            read_json(&dir.join("config.json"))?,
            Some(safetensors_shapes(dir)?),
        ),
        ModelSource::Random { config, .. } | ModelSource::Shapes { config } => {
            (read_json(config)?, None)
        }
    })
}

/// A supported `model_type`, and a config whose sizes match its weights.
fn check_model(spec: &JobSpec) -> Result<()> {
    let (config, shapes) = config_and_shapes(&spec.model.source())?;
    let model_type = config["model_type"]
        .as_str()
        .context("its config.json has no model_type")?;
    if !MODEL_TYPES.contains(&model_type) {
        bail!(
            "model_type {model_type:?} is not supported (supported: {})",
            MODEL_TYPES.join(", ")
        );
    }
    let size = |keys: &[&str]| keys.iter().find_map(|k| config[*k].as_u64());
    let hidden = size(&["hidden_size", "n_embd", "d_model"])
        .context("its config.json gives no hidden_size")?;
    if let Some(heads) = size(&["num_attention_heads", "n_head"]) {
        if heads == 0 || hidden % heads != 0 {
            bail!("its config.json's hidden_size {hidden} is not a multiple of num_attention_heads {heads}");
        }
    }
    // OPT may embed tokens in a smaller width and project them.
    let embed_width = size(&["word_embed_proj_dim"]).unwrap_or(hidden);
    let embedding = shapes.iter().flatten().find(|(name, _)| {
        [
            "embed_tokens.weight",
            "wte.weight",
            "word_embeddings.weight",
        ]
        .iter()
        .any(|suffix| name.ends_with(suffix))
    });
    if let Some((name, shape)) = embedding {
        if shape.len() != 2 || shape[1] as u64 != embed_width {
            bail!(
                "its config.json says hidden_size {embed_width}, but its weights' {name} has \
                 shape {} (config.json and the weights are of different models)",
                show_shape(shape)
            );
        }
    }
    Ok(())
}

fn show_shape(shape: &[usize]) -> String {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    format!("[{}]", dims.join(", "))
}

/// The `tokenizer.json` the engine will load: in the model's folder (beside
/// the config of a random-weight model).  None for a GGUF file, which
/// carries its own (built by the engine from the file's metadata).
pub fn tokenizer_file(source: &ModelSource) -> Result<Option<PathBuf>> {
    let dir = match source {
        ModelSource::Pretrained(path) if is_gguf(path) => return Ok(None),
        ModelSource::Pretrained(dir) => dir.clone(),
        ModelSource::Random { config, .. } | ModelSource::Shapes { config } => {
            config.parent().unwrap_or(Path::new(".")).to_path_buf()
        }
    };
    let path = dir.join("tokenizer.json");
    if is_absent(&path) {
        bail!(
            "no tokenizer: {} is missing (put the model's tokenizer.json beside its \
             config.json; transformers' tokenizer.save_pretrained(folder) writes it)",
            path.display()
        );
    }
    Ok(Some(path))
}

/// The tokenizer at `path`, read through the job-file rules (regular file,
/// bounded) and parsed as the engine uses it.
pub fn load_tokenizer(path: &Path) -> Result<tokenizers::Tokenizer> {
    let text = read_user_text(path, 256 << 20)?;
    tokenizers::Tokenizer::from_bytes(text.as_bytes())
        .map_err(|e| anyhow!("the tokenizer {} does not load: {e}", path.display()))
}

/// That the tokenizer the worker will load is there and loads.
fn check_tokenizer(source: &ModelSource) -> Result<()> {
    if let Some(path) = tokenizer_file(source)? {
        load_tokenizer(&path)?;
    }
    Ok(())
}

/// The fields of the data the job's task reads, each with what needs it.
pub(crate) fn fields_needed(spec: &JobSpec) -> Vec<(String, String)> {
    let t = &spec.task;
    let mut fields: Vec<(String, String)> = Vec::new();
    let mut need = |field: &str, why: &str| {
        if !fields.iter().any(|(f, _)| f == field) {
            fields.push((field.to_string(), why.to_string()));
        }
    };
    let template = t.template.as_deref();
    match t.kind {
        TaskKind::CausalLm => need(&spec.data.text_field, "data.text_field"),
        TaskKind::Classification => {
            let name = template.unwrap_or(DEFAULT_CLASSIFICATION);
            let prompt_fields = match ClassificationPreset::named(name) {
                Some(preset) => preset.fields(&spec.data.text_field),
                None => template_fields(name),
            };
            for f in prompt_fields {
                need(&f, "the task's template");
            }
            need(&t.label_field, "task.label_field");
        }
        TaskKind::MultipleChoice => {
            match template {
                Some(name) if name == COPA.name => {
                    need(COPA.premise, "the copa template");
                    need(COPA.question, "the copa template");
                }
                Some(custom) => {
                    for f in template_fields(custom) {
                        need(&f, "the task's template");
                    }
                }
                None => {}
            }
            let default_choices = COPA.choices.map(String::from);
            let choices = if t.choices.is_empty() && template == Some(COPA.name) {
                &default_choices[..]
            } else {
                &t.choices[..]
            };
            for c in choices {
                need(c, "task.choices");
            }
            need(&t.label_field, "task.label_field");
        }
        TaskKind::Generation => {
            for f in template.map(template_fields).unwrap_or_default() {
                need(&f, "the task's template");
            }
            need(
                t.answer_field.as_deref().unwrap_or("answer"),
                "task.answer_field",
            );
        }
    }
    fields
}

/// The data file reads, and its first rows have the fields the job reads.
fn check_data(spec: &JobSpec, path: &Path) -> Result<()> {
    let rows = read_rows(path, Some(ROWS_CHECKED))?;
    check_rows(spec, &rows, path == spec.data.train)
}

/// Rows of one data file (`train`: the training file) against the fields
/// the job reads from them, in file order: the first row has every
/// `data.filter` field (later rows without one are simply filtered out, as
/// the engine filters), and each row the filter keeps has every field the
/// task and `data.per_class` need.  The engine runs it on all rows before
/// it shuffles them, a check on the first [`ROWS_CHECKED`]: both name the
/// same first bad row when the check reads that far.  A field missing from
/// a CSV file is missing from its header, so the header's line is named.
pub fn check_rows(spec: &JobSpec, rows: &[(Origin, Example)], train: bool) -> Result<()> {
    check_filter_fields(&spec.data, rows)?;
    let mut needed = fields_needed(spec);
    if let (true, Some(per_class)) = (train, &spec.data.per_class) {
        let field = per_class.field.as_ref().unwrap_or(&spec.task.label_field);
        if !needed.iter().any(|(f, _)| f == field) {
            needed.push((field.clone(), "data.per_class".into()));
        }
    }
    for (at, row) in rows.iter().filter(|(_, r)| kept(&spec.data, r)) {
        if let Some((field, why)) = needed.iter().find(|(f, _)| !row.contains_key(f)) {
            return Err(field_missing(at, field, why, row));
        }
    }
    Ok(())
}

/// The first row has every field `data.filter` names.
pub fn check_filter_fields(data: &DataSpec, rows: &[(Origin, Example)]) -> Result<()> {
    let Some((at, first)) = rows.first() else {
        return Ok(());
    };
    match data.filter.keys().find(|f| !first.contains_key(*f)) {
        Some(field) => Err(field_missing(at, field, "data.filter", first)),
        None => Ok(()),
    }
}

/// Whether a row passes every `data.filter` (`field: [allowed values]`).
pub fn kept(data: &DataSpec, row: &Example) -> bool {
    data.filter
        .iter()
        .all(|(f, allowed)| row.get(f).is_some_and(|v| allowed.contains(v)))
}

/// The error for `row` (at `at`) without `field`: blamed on the header row
/// where the file has one, since there the field is missing from every row.
pub fn field_missing(at: &Origin, field: &str, needed_by: &str, row: &Example) -> anyhow::Error {
    match header_row(&at.file) {
        Some(header) => anyhow!("{header}: {}", no_field(field, needed_by, row, true)),
        None => anyhow!("{at}: {}", no_field(field, needed_by, row, false)),
    }
}

/// The one wording for a field the data lacks: which field, what needs it,
/// and the fields there are (so a misspelling shows beside the right name).
/// `in_header`: the fields are a CSV header's, not one row's.
pub fn no_field(field: &str, needed_by: &str, fields: &Example, in_header: bool) -> String {
    const SHOWN: usize = 20;
    let mut have: Vec<&str> = fields.keys().map(String::as_str).take(SHOWN).collect();
    if fields.len() > SHOWN {
        have.push("…");
    }
    let place = if in_header { "the header" } else { "the row" };
    format!(
        "no field {field:?} ({needed_by} needs it; {place} has: {})",
        have.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    /// A copy of the llama fixture in `dir`, with `edit` applied to its config.
    fn model(dir: &Path, edit: impl Fn(&mut serde_json::Value)) -> std::path::PathBuf {
        let to = dir.join("model");
        std::fs::create_dir_all(&to).unwrap();
        for f in ["config.json", "model.safetensors", "tokenizer.json"] {
            std::fs::copy(repo().join("tests/fixtures/llama").join(f), to.join(f)).unwrap();
        }
        let mut config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(to.join("config.json")).unwrap()).unwrap();
        edit(&mut config);
        std::fs::write(to.join("config.json"), config.to_string()).unwrap();
        to
    }

    fn spec(model: &Path, data: &Path, task: &str) -> JobSpec {
        JobSpec::parse_with_base(
            &format!(
                "model: {{path: {}}}\ntask: {task}\ndata: {{train: {}}}\nmezo: {{steps: 1, lr: 1.0e-3}}\n",
                model.display(),
                data.display()
            ),
            None,
        )
        .unwrap()
    }

    fn problem(spec: &JobSpec) -> String {
        check(spec).map_or_else(|e| e.to_string(), |_| "no problem".into())
    }

    #[test]
    fn a_filter_field_is_asked_of_the_first_row_as_the_engine_asks_it() {
        let tmp = tempfile::tempdir().unwrap();
        let model = model(tmp.path(), |_| {});
        let data = tmp.path().join("rows.jsonl");
        let with_filter = |first: &str| {
            std::fs::write(&data, format!("{first}\n{{\"text\": \"no kind here\"}}\n")).unwrap();
            let mut s = spec(&model, &data, "{kind: causal_lm}");
            s.data.filter.insert("kind".into(), vec!["a".into()]);
            problem(&s)
        };
        // Later rows without the field are filtered out by the engine: fine.
        assert_eq!(
            with_filter("{\"text\": \"x\", \"kind\": \"a\"}"),
            "no problem"
        );
        let e = with_filter("{\"text\": \"x\"}");
        assert!(
            e.contains("line 1: no field \"kind\" (data.filter needs it; the row has: text)"),
            "{e}"
        );
    }

    #[test]
    fn a_field_missing_from_a_csv_file_is_blamed_on_its_header() {
        let tmp = tempfile::tempdir().unwrap();
        let model = model(tmp.path(), |_| {});
        let data = tmp.path().join("rows.csv");
        std::fs::write(&data, "label,text\n1,good\n0,bad\n").unwrap();
        let e = problem(&spec(
            &model,
            &data,
            "{kind: classification, template: rte}",
        ));
        assert_eq!(
            e,
            format!(
                "{} line 1: no field \"premise\" (the task's template needs it; the header \
                 has: label, text)",
                data.display()
            )
        );
        // The engine checks all rows with the same function: the same words.
        let rows = read_rows(&data, None).unwrap();
        let s = spec(&model, &data, "{kind: classification, template: rte}");
        assert_eq!(check_rows(&s, &rows, true).unwrap_err().to_string(), e);
    }

    #[test]
    fn a_model_that_is_not_there_is_said_so_once() {
        let tmp = tempfile::tempdir().unwrap();
        let reviews = repo().join("examples/data/reviews.jsonl");
        let gone = tmp.path().join("gone");
        let why = problem(&spec(&gone, &reviews, "{kind: causal_lm}"));
        assert_eq!(why.lines().count(), 1, "{why}");
        assert!(
            why.starts_with(&format!("model folder {} does not exist (", gone.display())),
            "{why}"
        );
        let empty = tmp.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        let why = problem(&spec(&empty, &reviews, "{kind: causal_lm}"));
        assert!(why.contains("has no config.json"), "{why}");
        let file = tmp.path().join("weights.bin");
        std::fs::write(&file, "").unwrap();
        let why = problem(&spec(&file, &reviews, "{kind: causal_lm}"));
        assert!(why.contains("is a file, not a model folder"), "{why}");
        let gguf = tmp.path().join("model.gguf");
        let why = problem(&spec(&gguf, &reviews, "{kind: causal_lm}"));
        assert!(
            why.starts_with(&format!("model file {} does not exist", gguf.display())),
            "{why}"
        );
    }

    #[test]
    fn what_a_worker_would_fail_on_is_found_before_it_starts() {
        let tmp = tempfile::tempdir().unwrap();
        let reviews = repo().join("examples/data/reviews.jsonl");
        let good = model(tmp.path(), |_| {});
        assert_eq!(
            problem(&spec(&good, &reviews, "{kind: causal_lm}")),
            "no problem"
        );

        let falcon = model(&tmp.path().join("falcon"), |c| {
            c["model_type"] = "falcon".into()
        });
        let why = problem(&spec(&falcon, &reviews, "{kind: causal_lm}"));
        assert!(
            why.contains("model_type \"falcon\" is not supported"),
            "{why}"
        );

        let wide = model(&tmp.path().join("wide"), |c| {
            let h = c["hidden_size"].as_u64().unwrap();
            c["hidden_size"] = (2 * h).into();
        });
        let why = problem(&spec(&wide, &reviews, "{kind: causal_lm}"));
        assert!(
            why.contains("hidden_size") && why.contains("embed_tokens"),
            "{why}"
        );

        let bare = model(&tmp.path().join("bare"), |_| {});
        std::fs::remove_file(bare.join("tokenizer.json")).unwrap();
        let why = problem(&spec(&bare, &reviews, "{kind: causal_lm}"));
        assert!(
            why.contains("no tokenizer") && why.contains("tokenizer.json"),
            "{why}"
        );
        std::fs::write(bare.join("tokenizer.json"), "{\"model\": 3}").unwrap();
        let why = problem(&spec(&bare, &reviews, "{kind: causal_lm}"));
        assert!(why.contains("does not load"), "{why}");

        // Data: the file and line of the first row that lacks a field.
        let data = tmp.path().join("rows.jsonl");
        std::fs::write(
            &data,
            "{\"text\": \"a\"}\n{\"text\": \"b\"}\n{\"body\": \"c\"}\n",
        )
        .unwrap();
        let why = problem(&spec(&good, &data, "{kind: causal_lm}"));
        assert!(
            why.contains(&format!("{} line 3: no field \"text\"", data.display())),
            "{why}"
        );
        let why = problem(&spec(&good, &data, "{kind: classification, template: rte}"));
        assert!(why.contains("line 1: no field \"premise\""), "{why}");
        std::fs::write(&data, "not json\n").unwrap();
        let why = problem(&spec(&good, &data, "{kind: causal_lm}"));
        assert!(why.contains("line 1: not valid JSON"), "{why}");
        // Every problem at once, each on its line.
        let why = problem(&spec(&falcon, &data, "{kind: causal_lm}"));
        assert_eq!(why.lines().count(), 2, "{why}");
    }

    #[test]
    fn tasks_need_the_fields_their_templates_and_labels_name() {
        let tmp = tempfile::tempdir().unwrap();
        let m = model(tmp.path(), |_| {});
        let d = repo().join("examples/data/reviews.jsonl");
        let fields = |task: &str| -> Vec<String> {
            fields_needed(&spec(&m, &d, task))
                .into_iter()
                .map(|(f, _)| f)
                .collect()
        };
        assert_eq!(fields("{kind: classification}"), ["text", "label"]);
        assert_eq!(
            fields("{kind: multiple_choice, template: copa}"),
            ["premise", "question", "choice1", "choice2", "label"]
        );
        assert_eq!(
            fields("{kind: generation, template: \"{context} Q: {question} A:\", answer_field: answers}"),
            ["context", "question", "answers"]
        );
        assert_eq!(
            fields(
                "{kind: classification, template: \"{a} is {mask}\", label_words: {x: y, z: w}}"
            ),
            ["a", "label"]
        );
    }
}
