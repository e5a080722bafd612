//! What can be known about a job before a worker starts: that its model is
//! of a type the engine runs, that its config agrees with its weights, that
//! its tokenizer loads, and that its data can be read and its first rows
//! have the fields its task needs.  `mezod submit` and `mezod estimate` run
//! these checks as the user; the daemon's intake runs them as the file's
//! owner (`daemon/checker.rs`).  A job that fails one is refused with the
//! reason instead of failing in a worker.
//!
//! The tokenizer is loaded with the `tokenizers` crate, the engine's own
//! (same version and features), so "loads here" means "loads in the worker".
//! It costs the `mezod` binary a few megabytes and nothing at run time
//! unless a check runs: `status`, `logs` and `cancel` never load it.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};

use crate::data_file::read_rows;
use crate::gguf_header::{is_gguf, read_header};
use crate::model_ref::{ModelSource, MODEL_TYPES};
use crate::prompts::{template_fields, ClassificationPreset, COPA, DEFAULT_CLASSIFICATION};
use crate::safe_fs::{read_user_text, MAX_JSON_BYTES};
use crate::spec::{JobSpec, TaskKind};
use crate::weight_files::safetensors_shapes;

/// Data rows read by a check: enough to catch a file of the wrong shape,
/// bounded so a check stays quick on any data size.  A bad row further down
/// is the worker's to find (and it names the file and line).
pub const ROWS_CHECKED: usize = 100;

/// Every problem the checks find, in the order a user would fix them.
pub fn problems(spec: &JobSpec) -> Vec<anyhow::Error> {
    let mut found = Vec::new();
    if let Err(e) = check_model(spec) {
        found.push(e.context(format!("model {}", spec.model.describe())));
    }
    if let Err(e) = check_tokenizer(spec) {
        found.push(e);
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

/// The tokenizer the worker will load: `tokenizer.json` in the model's
/// folder (beside the config of a random-weight model).  A GGUF file carries
/// its own, built by the engine from the file's metadata.
fn check_tokenizer(spec: &JobSpec) -> Result<()> {
    let dir = match spec.model.source() {
        ModelSource::Pretrained(path) if is_gguf(&path) => return Ok(()),
        ModelSource::Pretrained(dir) => dir,
        ModelSource::Random { config, .. } | ModelSource::Shapes { config } => {
            config.parent().unwrap_or(Path::new(".")).to_path_buf()
        }
    };
    let path = dir.join("tokenizer.json");
    if !path.exists() {
        bail!(
            "no tokenizer: {} is missing (the model's tokenizer.json must be beside its config.json)",
            path.display()
        );
    }
    // Read through the job-file rules (regular file, bounded), then parsed
    // as the engine parses it.
    let text = read_user_text(&path, 256 << 20)?;
    tokenizers::Tokenizer::from_bytes(text.as_bytes())
        .map_err(|e| anyhow!("the tokenizer {} does not load: {e}", path.display()))?;
    Ok(())
}

/// The fields of the data the job's task reads, each with what needs it.
pub fn fields_needed(spec: &JobSpec) -> Vec<(String, String)> {
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

/// The data file reads, and its first rows have every field the task needs.
/// Rows outside a `data.filter` are not the task's; as the engine does, the
/// first row must have each filter field, and later rows without one are
/// simply filtered out.
fn check_data(spec: &JobSpec, path: &Path) -> Result<()> {
    let rows = read_rows(path, Some(ROWS_CHECKED))?;
    if let Some((at, first)) = rows.first() {
        for field in spec.data.filter.keys() {
            if !first.contains_key(field) {
                bail!("{at}: no field {field:?} (data.filter names it)");
            }
        }
    }
    let kept = rows.iter().filter(|(_, r)| {
        spec.data
            .filter
            .iter()
            .all(|(f, allowed)| r.get(f).is_some_and(|v| allowed.contains(v)))
    });
    let needed = fields_needed(spec);
    for (at, row) in kept {
        if let Some((field, why)) = needed.iter().find(|(f, _)| !row.contains_key(f)) {
            let mut have: Vec<&str> = row.keys().map(String::as_str).collect();
            have.truncate(20);
            bail!(
                "{at}: no field {field:?} ({why} needs it; the row has: {})",
                have.join(", ")
            );
        }
    }
    Ok(())
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
            e.contains("no field \"kind\" (data.filter names it)"),
            "{e}"
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
