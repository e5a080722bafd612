//! Datasets: JSONL or CSV rows as string fields, and the seeded train/dev split.

pub mod task;

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

use crate::spec::DataSpec;

/// One row, every value as text (numbers and booleans as written).
pub type Example = BTreeMap<String, String>;

pub fn load_examples(path: &Path) -> Result<Vec<Example>> {
    let name = path.to_string_lossy().to_lowercase();
    let rows = if name.ends_with(".csv") {
        read_csv(path, b',')
    } else if name.ends_with(".tsv") {
        read_csv(path, b'\t')
    } else if name.ends_with(".jsonl") || name.ends_with(".json") {
        read_jsonl(path)
    } else {
        bail!(
            "{}: unknown data format (use .jsonl, .csv or .tsv)",
            path.display()
        )
    }?;
    if rows.is_empty() {
        bail!("{} holds no examples", path.display());
    }
    Ok(rows)
}

fn read_jsonl(path: &Path) -> Result<Vec<Example>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
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

fn read_csv(path: &Path, delimiter: u8) -> Result<Vec<Example>> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .from_path(path)
        .with_context(|| format!("reading {}", path.display()))?;
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

/// Training and development examples.
pub struct Splits {
    pub train: Vec<Example>,
    pub dev: Vec<Example>,
}

/// Load train (and dev, or hold out a seeded fraction of train as dev).
pub fn load_splits(spec: &DataSpec) -> Result<Splits> {
    let mut train = load_examples(&spec.train)?;
    let mut dev = match &spec.dev {
        Some(p) => load_examples(p)?,
        None => {
            let mut rng = ChaCha20Rng::seed_from_u64(spec.split_seed);
            train.shuffle(&mut rng);
            let n_dev = (train.len() as f64 * spec.dev_fraction).floor() as usize;
            train.split_off(train.len() - n_dev)
        }
    };
    if let Some(n) = spec.max_train {
        train.truncate(n);
    }
    if let Some(n) = spec.max_dev {
        dev.truncate(n);
    }
    if train.is_empty() {
        bail!("no training examples left after the split");
    }
    Ok(Splits { train, dev })
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
        let a = load_splits(&spec).unwrap();
        let b = load_splits(&spec).unwrap();
        assert_eq!((a.train.len(), a.dev.len()), (45, 5));
        assert_eq!(a.dev, b.dev);
        assert!(a.dev.iter().all(|d| !a.train.contains(d)));
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
