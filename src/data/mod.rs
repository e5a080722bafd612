//! Datasets: JSONL or CSV rows as string fields (optionally bzip2-compressed;
//! read by `mezod_core::data_file`, each row with its file and line), row
//! filters, and the seeded train/dev/test split.  A job's rows are checked
//! against the fields it reads by `mezod_core::job_check`, the check intake
//! runs, so a bad field or row reads the same in `run`, `inspect`,
//! `estimate` and `submit`.

pub mod squad;
pub mod task;

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

pub use mezod_core::data_file::{Example, Origin};

use mezod_core::job_check::{check_filter_fields, check_rows, field_missing, kept, no_field};

use crate::spec::{DataSpec, JobSpec};

/// Read every row of a data file: `.jsonl`/`.json`, `.csv`, `.tsv`, each optionally `.bz2`.
pub fn load_examples(path: &Path) -> Result<Vec<Example>> {
    Ok(load_rows(path)?.into_iter().map(|(_, ex)| ex).collect())
}

fn load_rows(path: &Path) -> Result<Vec<(Origin, Example)>> {
    mezod_core::data_file::read_rows(path, None)
}

/// Training, development and test examples.
pub struct Splits {
    pub train: Vec<Example>,
    pub dev: Vec<Example>,
    /// Empty unless the job names a test file or a test fraction.
    pub test: Vec<Example>,
    /// Where each example of train, dev and test came from (file and line),
    /// beside them so that the examples stay plain maps of fields.
    pub origins: [Vec<Origin>; 3],
}

impl Splits {
    /// Whether a step's batch of `batch_size` distinct examples fits the
    /// training split.  Steps take examples in epochs without replacement,
    /// so a batch larger than the split would repeat examples unevenly (and
    /// cost a step that many more forward passes for no new data).  `Err`
    /// is the one message `run` refuses with and `inspect` warns with.
    pub fn check_batch_size(&self, batch_size: usize) -> Result<(), String> {
        let n = self.train.len();
        if batch_size <= n {
            return Ok(());
        }
        Err(format!(
            "mezo.batch_size {batch_size} is larger than the training set ({n} examples): \
             each step takes distinct examples, so use a batch_size of at most {n} (or more \
             training data)"
        ))
    }

    /// Where example `i` of `split` ("training", "dev" or "test") is, for
    /// errors: its file and line, as the checks before a run name a row.
    pub fn origin(&self, split: &str, i: usize) -> String {
        let at = match split {
            "training" => 0,
            "dev" => 1,
            _ => 2,
        };
        match self.origins[at].get(i) {
            Some(origin) => origin.to_string(),
            None => format!("{split} example {}", i + 1),
        }
    }
}

/// Rows that pass every filter (`field: [allowed values]`).
fn filtered(rows: Vec<(Origin, Example)>, spec: &DataSpec) -> Vec<(Origin, Example)> {
    if spec.filter.is_empty() {
        return rows;
    }
    rows.into_iter().filter(|(_, r)| kept(spec, r)).collect()
}

/// The job's train, dev and test splits (see [`load_splits`]), each data
/// file's rows checked first, in file order, against every field the job
/// reads: the check `mezod submit` and intake run on the first rows, so a
/// bad field or row is named with the same words and line.
pub fn load_job_splits(job: &JobSpec) -> Result<Splits> {
    split(&job.data, &job.task.label_field, &|rows, train| {
        check_rows(job, rows, train)
    })
}

/// Load train, dev and test: files where given, otherwise seeded fractions
/// held out of train (test first, then dev, from one shuffle).
/// `label_field` names the classes for `per_class` sampling when it names no field.
/// Only the filter's and `per_class`'s fields are checked here; the task's
/// are left to the task ([`load_job_splits`] checks them all, first).
pub fn load_splits(spec: &DataSpec, label_field: &str) -> Result<Splits> {
    split(spec, label_field, &|rows, _| {
        check_filter_fields(spec, rows)
    })
}

/// The splits, with `check` run on each file's rows (told whether they are
/// the training file's) before they are filtered and shuffled.
fn split(
    spec: &DataSpec,
    label_field: &str,
    check: &dyn Fn(&[(Origin, Example)], bool) -> Result<()>,
) -> Result<Splits> {
    let load = |p: &Path, train: bool| -> Result<Vec<(Origin, Example)>> {
        let rows = load_rows(p)?;
        check(&rows, train)?;
        Ok(filtered(rows, spec))
    };
    let mut train = load(&spec.train, true)?;
    let per_class = spec.per_class.as_ref().map(|p| {
        (
            p.k,
            p.field.clone().unwrap_or_else(|| label_field.to_string()),
        )
    });
    if let Some((_, field)) = &per_class {
        if let Some((at, ex)) = train.iter().find(|(_, ex)| !ex.contains_key(field)) {
            return Err(field_missing(at, field, "data.per_class", ex));
        }
    }
    let hold_out_test = spec.test.is_none() && spec.test_fraction > 0.0;
    if spec.dev.is_none() || hold_out_test || spec.per_class.is_some() {
        // The permutation depends only on the length and the seed: rows
        // shuffle exactly as the bare examples did.
        let mut rng = ChaCha20Rng::seed_from_u64(spec.split_seed);
        train.shuffle(&mut rng);
    }
    let total = train.len() as f64;
    let mut test = match &spec.test {
        Some(p) => load(p, false)?,
        None if hold_out_test => {
            let n = (total * spec.test_fraction).floor() as usize;
            train.split_off(train.len() - n)
        }
        None => Vec::new(),
    };
    let mut dev = match (&spec.dev, &per_class) {
        (Some(p), _) => load(p, false)?,
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
    let [(train_at, train), (dev_at, dev), (test_at, test)] =
        [train, dev, test].map(|rows| rows.into_iter().unzip::<_, _, Vec<_>, Vec<_>>());
    Ok(Splits {
        train,
        dev,
        test,
        origins: [train_at, dev_at, test_at],
    })
}

/// Keep in `rows` the first `k` of each value of `field` (in their order);
/// return the others, in order.  A class with fewer than `k` is kept whole,
/// with a warning.
fn take_per_class(
    rows: &mut Vec<(Origin, Example)>,
    k: usize,
    field: &str,
) -> Vec<(Origin, Example)> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut kept = Vec::new();
    let mut rest = Vec::new();
    for row in std::mem::take(rows) {
        let value = row.1.get(field).cloned().unwrap_or_default();
        let n = seen.entry(value).or_default();
        if *n < k {
            *n += 1;
            kept.push(row);
        } else {
            rest.push(row);
        }
    }
    for (value, n) in seen.iter().filter(|(_, &n)| n < k) {
        tracing::warn!("data.per_class: class {field} = {value:?} has only {n} examples for {k}");
    }
    *rows = kept;
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
            None => bail!("{}", no_field(field, "the task's template", ex, false)),
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
        // Each example still knows its line after the shuffle ("row i" is on line i + 1).
        for (split, examples) in [("training", &a.train), ("dev", &a.dev)] {
            for (i, ex) in examples.iter().enumerate() {
                let line: usize = ex["text"]
                    .trim_start_matches("row ")
                    .parse::<usize>()
                    .unwrap()
                    + 1;
                assert_eq!(a.origin(split, i), format!("{} line {line}", j.display()));
            }
        }
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
        assert!(
            e.contains("\"label\"") && e.contains("a.jsonl line "),
            "{e}"
        );
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
