//! Datasets: JSONL or CSV rows as string fields (optionally bzip2-compressed),
//! row filters, and the seeded train/dev/test split.

pub mod squad;
pub mod task;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

use crate::spec::DataSpec;

/// One row, every value as text (numbers and booleans as written).
pub type Example = BTreeMap<String, String>;

/// Read a data file: `.jsonl`/`.json`, `.csv`, `.tsv`, each optionally `.bz2`.
pub fn load_examples(path: &Path) -> Result<Vec<Example>> {
    let lower = path.to_string_lossy().to_lowercase();
    let (name, compressed) = match lower.strip_suffix(".bz2") {
        Some(inner) => (inner.to_string(), true),
        None => (lower.clone(), false),
    };
    let mut bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if compressed {
        let mut out = Vec::new();
        bzip2::read::BzDecoder::new(&bytes[..])
            .read_to_end(&mut out)
            .with_context(|| format!("{}: not valid bzip2 data", path.display()))?;
        bytes = out;
    }
    let rows = if name.ends_with(".csv") {
        read_csv(path, &bytes, b',')
    } else if name.ends_with(".tsv") {
        read_csv(path, &bytes, b'\t')
    } else if name.ends_with(".jsonl") || name.ends_with(".json") {
        read_jsonl(path, &bytes)
    } else {
        bail!(
            "{}: unknown data format (use .jsonl, .csv or .tsv, optionally .bz2)",
            path.display()
        )
    }?;
    if rows.is_empty() {
        bail!("{} holds no examples", path.display());
    }
    Ok(rows)
}

fn read_jsonl(path: &Path, bytes: &[u8]) -> Result<Vec<Example>> {
    let text = std::str::from_utf8(bytes)
        .with_context(|| format!("{} is not UTF-8 text", path.display()))?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{} line {}: not valid JSON", path.display(), i + 1))?;
        let obj = value.as_object().with_context(|| {
            format!("{} line {}: expected a JSON object", path.display(), i + 1)
        })?;
        let row = obj
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| v.to_string()),
                )
            })
            .collect();
        rows.push(row);
    }
    Ok(rows)
}

fn read_csv(path: &Path, bytes: &[u8], delimiter: u8) -> Result<Vec<Example>> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .from_reader(bytes);
    let headers = reader.headers()?.clone();
    let mut rows = Vec::new();
    for (i, rec) in reader.records().enumerate() {
        let rec = rec.with_context(|| format!("{} row {}", path.display(), i + 2))?;
        rows.push(
            headers
                .iter()
                .zip(rec.iter())
                .map(|(h, v)| (h.to_string(), v.to_string()))
                .collect(),
        );
    }
    Ok(rows)
}

/// Training, development and test examples.
pub struct Splits {
    pub train: Vec<Example>,
    pub dev: Vec<Example>,
    /// Empty unless the job names a test file or a test fraction.
    pub test: Vec<Example>,
}

/// Rows whose fields pass every filter (`field: [allowed values]`).
fn filtered(rows: Vec<Example>, spec: &DataSpec, path: &Path) -> Result<Vec<Example>> {
    if spec.filter.is_empty() {
        return Ok(rows);
    }
    for field in spec.filter.keys() {
        if !rows[0].contains_key(field) {
            bail!(
                "data.filter names field {field:?}, which {} lacks",
                path.display()
            );
        }
    }
    Ok(rows
        .into_iter()
        .filter(|r| {
            spec.filter
                .iter()
                .all(|(f, allowed)| r.get(f).is_some_and(|v| allowed.contains(v)))
        })
        .collect())
}

/// Load train, dev and test: files where given, otherwise seeded fractions
/// held out of train (test first, then dev, from one shuffle).
/// `label_field` names the classes for `per_class` sampling when it names no field.
pub fn load_splits(spec: &DataSpec, label_field: &str) -> Result<Splits> {
    let mut train = filtered(load_examples(&spec.train)?, spec, &spec.train)?;
    let per_class = spec.per_class.as_ref().map(|p| {
        (
            p.k,
            p.field.clone().unwrap_or_else(|| label_field.to_string()),
        )
    });
    if let Some((_, field)) = &per_class {
        // Named before shuffling, so the row number is the file's (after `filter`).
        if let Some(i) = train.iter().position(|ex| !ex.contains_key(field)) {
            bail!(
                "data.per_class: training example {} of {} has no field {field:?}",
                i + 1,
                spec.train.display()
            );
        }
    }
    let load = |p: &Path| -> Result<Vec<Example>> { filtered(load_examples(p)?, spec, p) };
    let hold_out_test = spec.test.is_none() && spec.test_fraction > 0.0;
    if spec.dev.is_none() || hold_out_test || spec.per_class.is_some() {
        let mut rng = ChaCha20Rng::seed_from_u64(spec.split_seed);
        train.shuffle(&mut rng);
    }
    let total = train.len() as f64;
    let mut test = match &spec.test {
        Some(p) => load(p)?,
        None if hold_out_test => {
            let n = (total * spec.test_fraction).floor() as usize;
            train.split_off(train.len() - n)
        }
        None => Vec::new(),
    };
    let mut dev = match (&spec.dev, &per_class) {
        (Some(p), _) => load(p)?,
        (None, Some((k, field))) => {
            // Few-shot: train keeps k per class, dev is the next k per class.
            let mut dev = take_per_class(&mut train, *k, field);
            take_per_class(&mut dev, *k, field);
            dev
        }
        (None, None) => {
            let n = (total * spec.dev_fraction).floor() as usize;
            train.split_off(train.len() - n)
        }
    };
    if let (Some((k, field)), Some(_)) = (&per_class, &spec.dev) {
        take_per_class(&mut train, *k, field);
    }
    if let Some(n) = spec.max_train {
        train.truncate(n);
    }
    if let Some(n) = spec.max_dev {
        dev.truncate(n);
    }
    if let Some(n) = spec.max_test {
        test.truncate(n);
    }
    if train.is_empty() {
        bail!("no training examples left after the split");
    }
    Ok(Splits { train, dev, test })
}

/// Keep in `examples` the first `k` of each value of `field` (in their order);
/// return the others, in order.  A class with fewer than `k` is kept whole,
/// with a warning.
fn take_per_class(examples: &mut Vec<Example>, k: usize, field: &str) -> Vec<Example> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut kept = Vec::new();
    let mut rest = Vec::new();
    for ex in std::mem::take(examples) {
        let value = ex.get(field).cloned().unwrap_or_default();
        let n = seen.entry(value).or_default();
        if *n < k {
            *n += 1;
            kept.push(ex);
        } else {
            rest.push(ex);
        }
    }
    for (value, n) in seen.iter().filter(|(_, &n)| n < k) {
        tracing::warn!("data.per_class: class {field} = {value:?} has only {n} examples for {k}");
    }
    *examples = kept;
    rest
}

/// Fill `{field}` placeholders from an example; a missing field is an error.
pub fn fill_template(template: &str, ex: &Example) -> Result<String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        let Some(len) = rest[start..].find('}') else {
            break;
        };
        let field = &rest[start + 1..start + len];
        out.push_str(&rest[..start]);
        match ex.get(field) {
            Some(v) => out.push_str(v),
            None => bail!(
                "the template needs field {field:?}, which the example lacks (fields: {})",
                ex.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        }
        rest = &rest[start + len + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_and_csv_rows_become_string_fields() {
        let dir = tempfile::tempdir().unwrap();
        let j = dir.path().join("a.jsonl");
        std::fs::write(
            &j,
            "{\"text\": \"fine\", \"label\": 1}\n\n{\"text\": \"bad\", \"label\": 0}\n",
        )
        .unwrap();
        let rows = load_examples(&j).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0]["label"], "1");
        let c = dir.path().join("a.csv");
        std::fs::write(&c, "category,text\nfresh,\"good, warm\"\nrotten,dull\n").unwrap();
        let rows = load_examples(&c).unwrap();
        assert_eq!(rows[0]["text"], "good, warm");
        assert_eq!(rows[1]["category"], "rotten");
        std::fs::write(&j, "{\"text\": \"fine\"}\nnot json\n").unwrap();
        let e = load_examples(&j).unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn split_is_seeded_and_disjoint() {
        let dir = tempfile::tempdir().unwrap();
        let j = dir.path().join("a.jsonl");
        std::fs::write(
            &j,
            (0..50)
                .map(|i| format!("{{\"text\": \"row {i}\"}}\n"))
                .collect::<String>(),
        )
        .unwrap();
        let spec: crate::spec::DataSpec =
            serde_yaml::from_str(&format!("train: {}", j.display())).unwrap();
        let a = load_splits(&spec, "label").unwrap();
        let b = load_splits(&spec, "label").unwrap();
        assert_eq!((a.train.len(), a.dev.len()), (45, 5));
        assert_eq!(a.dev, b.dev);
        assert!(a.dev.iter().all(|d| !a.train.contains(d)));
    }

    #[test]
    fn per_class_sampling_takes_k_of_each_label_for_train_and_dev() {
        let dir = tempfile::tempdir().unwrap();
        let j = dir.path().join("a.jsonl");
        // 30 of label a, 10 of label b.
        let rows: String = (0..40)
            .map(|i| {
                format!(
                    "{{\"text\": \"row {i}\", \"y\": \"{}\"}}\n",
                    if i % 4 == 0 { "b" } else { "a" }
                )
            })
            .collect();
        std::fs::write(&j, rows).unwrap();
        let spec: crate::spec::DataSpec = serde_yaml::from_str(&format!(
            "{{train: {}, per_class: {{k: 4, field: y}}, split_seed: 3}}",
            j.display()
        ))
        .unwrap();
        let s = load_splits(&spec, "label").unwrap();
        let count = |v: &[Example], l: &str| v.iter().filter(|e| e["y"] == l).count();
        assert_eq!((count(&s.train, "a"), count(&s.train, "b")), (4, 4));
        assert_eq!((count(&s.dev, "a"), count(&s.dev, "b")), (4, 4));
        assert!(s.dev.iter().all(|d| !s.train.contains(d)));
        assert_eq!(s.train, load_splits(&spec, "label").unwrap().train);
        let other = crate::spec::DataSpec {
            split_seed: 4,
            ..spec.clone()
        };
        assert_ne!(s.train, load_splits(&other, "label").unwrap().train);
        // With a dev file, dev is the file and train still k per class.
        let with_dev = crate::spec::DataSpec {
            dev: Some(j.clone()),
            ..spec.clone()
        };
        let s = load_splits(&with_dev, "label").unwrap();
        assert_eq!((s.train.len(), s.dev.len()), (8, 40));
        let missing = crate::spec::DataSpec {
            // No field named: the task's label field, which these rows lack.
            per_class: Some(crate::spec::PerClass { k: 2, field: None }),
            ..spec
        };
        let e = load_splits(&missing, "label").err().unwrap().to_string();
        assert!(e.contains("\"label\"") && e.contains("example 1 of"), "{e}");
    }

    #[test]
    fn bzip2_csv_filters_and_a_seeded_test_split() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reviews.csv.bz2");
        let mut csv = String::from("category,text\n");
        for i in 0..60 {
            let cat = ["fresh", "rotten", "plot"][i % 3];
            csv.push_str(&format!("{cat},\"review {i}, with a comma\"\n"));
        }
        let mut enc =
            bzip2::write::BzEncoder::new(std::fs::File::create(&path).unwrap(), Default::default());
        enc.write_all(csv.as_bytes()).unwrap();
        enc.finish().unwrap();
        let rows = load_examples(&path).unwrap();
        assert_eq!(rows.len(), 60);
        assert_eq!(rows[4]["text"], "review 4, with a comma");
        let spec: crate::spec::DataSpec = serde_yaml::from_str(&format!(
            "{{train: {}, filter: {{category: [fresh, rotten]}}, dev_fraction: 0.1, test_fraction: 0.25}}",
            path.display()
        ))
        .unwrap();
        let a = load_splits(&spec, "label").unwrap();
        assert_eq!((a.train.len(), a.dev.len(), a.test.len()), (26, 4, 10));
        let all: Vec<&Example> = a.train.iter().chain(&a.dev).chain(&a.test).collect();
        assert!(all.iter().all(|r| r["category"] != "plot"));
        let mut texts: Vec<&String> = all.iter().map(|r| &r["text"]).collect();
        texts.sort();
        texts.dedup();
        assert_eq!(texts.len(), 40, "train, dev and test are disjoint");
        assert_eq!(load_splits(&spec, "label").unwrap().test, a.test, "seeded");
        let bad: crate::spec::DataSpec = serde_yaml::from_str(&format!(
            "{{train: {}, filter: {{genre: [drama]}}}}",
            path.display()
        ))
        .unwrap();
        let e = load_splits(&bad, "label").err().unwrap().to_string();
        assert!(e.contains("genre"), "{e}");
    }

    #[test]
    fn templates_fill_fields_and_name_missing_ones() {
        let ex: Example = [("premise".to_string(), "It rained".to_string())].into();
        assert_eq!(
            fill_template("{premise}, so", &ex).unwrap(),
            "It rained, so"
        );
        let e = fill_template("{hypothesis}", &ex).unwrap_err().to_string();
        assert!(e.contains("hypothesis") && e.contains("premise"), "{e}");
    }
}
