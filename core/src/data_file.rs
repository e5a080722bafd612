//! Data files as rows of text fields, each row knowing the file and line it
//! came from: the one reader of JSONL and CSV/TSV (optionally bzip2), shared
//! by the engine (every row, for training) and the intake check (the first
//! rows, to refuse a job whose data cannot work before a worker starts).
//!
//! Why rows carry their origin: the engine shuffles and splits examples, so
//! "training example 206" names nothing a user can find; "reviews.jsonl line
//! 21" does.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};

/// One row, every value as text (numbers and booleans as written).
pub type Example = BTreeMap<String, String>;

/// Where a row is: its file and line (the line a CSV record starts on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub file: Arc<Path>,
    pub line: u64,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} line {}", self.file.display(), self.line)
    }
}

/// Rows of a data file with their origins, in file order.
pub type Rows = Vec<(Origin, Example)>;

/// The formats a data file may be in, from its name.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    Jsonl,
    /// Delimited text with a header row: comma or tab.
    Delimited(u8),
}

/// A data file's format and whether it is bzip2-compressed, from its name
/// (`.jsonl`/`.json`, `.csv`, `.tsv`, each optionally `.bz2`).
fn format_of(path: &Path) -> Result<(Format, bool)> {
    let lower = path.to_string_lossy().to_lowercase();
    let (name, compressed) = match lower.strip_suffix(".bz2") {
        Some(inner) => (inner, true),
        None => (lower.as_str(), false),
    };
    let format = if name.ends_with(".csv") {
        Format::Delimited(b',')
    } else if name.ends_with(".tsv") {
        Format::Delimited(b'\t')
    } else if name.ends_with(".jsonl") || name.ends_with(".json") {
        Format::Jsonl
    } else {
        bail!(
            "{}: unknown data format (use .jsonl, .csv or .tsv, optionally .bz2)",
            path.display()
        )
    };
    Ok((format, compressed))
}

/// Where a data file names its fields, if in one place: a CSV/TSV file's
/// header row (line 1), which is then what a field missing from every row
/// is blamed on.  A JSONL file has none: each row names its own.
pub(crate) fn header_row(path: &Path) -> Option<Origin> {
    match format_of(path) {
        Ok((Format::Delimited(_), _)) => Some(Origin {
            file: Arc::from(path),
            line: 1,
        }),
        _ => None,
    }
}

/// Read a data file: `.jsonl`/`.json`, `.csv`, `.tsv`, each optionally
/// `.bz2`; at most `limit` rows (None: all).  Opened as a file a job names
/// (regular files only, no blocking on a FIFO).
pub fn read_rows(path: &Path, limit: Option<usize>) -> Result<Rows> {
    let (format, compressed) = format_of(path)?;
    let file = crate::safe_fs::open_user_file(path)?;
    let reader: Box<dyn Read> = if compressed {
        Box::new(bzip2::read::BzDecoder::new(BufReader::new(file)))
    } else {
        Box::new(file)
    };
    let file: Arc<Path> = Arc::from(path);
    let limit = limit.unwrap_or(usize::MAX);
    let rows = match format {
        Format::Delimited(delimiter) => read_csv(file, reader, delimiter, limit),
        Format::Jsonl => read_jsonl(file, reader, limit),
    }?;
    if rows.is_empty() {
        bail!("{} holds no examples", path.display());
    }
    Ok(rows)
}

fn read_jsonl(file: Arc<Path>, reader: Box<dyn Read>, limit: usize) -> Result<Rows> {
    let mut rows = Vec::new();
    for (i, line) in BufReader::new(reader).lines().enumerate() {
        if rows.len() >= limit {
            break;
        }
        let origin = Origin {
            file: file.clone(),
            line: i as u64 + 1,
        };
        let line = line.with_context(|| format!("{origin}: not UTF-8 text (or unreadable)"))?;
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("{origin}: not valid JSON"))?;
        let obj = value
            .as_object()
            .with_context(|| format!("{origin}: expected a JSON object"))?;
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
        rows.push((origin, row));
    }
    Ok(rows)
}

fn read_csv(file: Arc<Path>, reader: Box<dyn Read>, delimiter: u8, limit: usize) -> Result<Rows> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .from_reader(reader);
    let headers = reader
        .headers()
        .with_context(|| format!("{} line 1: the header row", file.display()))?
        .clone();
    let mut rows = Vec::new();
    let mut rec = csv::StringRecord::new();
    while rows.len() < limit {
        let line = reader.position().line();
        let more = reader
            .read_record(&mut rec)
            .map_err(|e| bad_record(&file, line, &e))?;
        if !more {
            break;
        }
        let origin = Origin {
            file: file.clone(),
            line: rec.position().map_or(line, |p| p.line()),
        };
        rows.push((
            origin,
            headers
                .iter()
                .zip(rec.iter())
                .map(|(h, v)| (h.to_string(), v.to_string()))
                .collect(),
        ));
    }
    Ok(rows)
}

/// A record the CSV reader refused, named by the line it starts on (the
/// reader's own position has moved past it by then) and in the file's
/// terms: a row with more or fewer fields than the header is the usual
/// mistake (a field with the delimiter in it, unquoted).
fn bad_record(file: &Path, line_before: u64, e: &csv::Error) -> anyhow::Error {
    let line = e.position().map_or(line_before, |p| p.line());
    let at = Origin {
        file: Arc::from(file),
        line,
    };
    match e.kind() {
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => anyhow!(
            "{at}: the row has {len} fields but the header has {expected_len} \
             (a field that holds the delimiter must be quoted)"
        ),
        csv::ErrorKind::Utf8 { .. } => anyhow!("{at}: not UTF-8 text"),
        _ => anyhow!("{at}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_know_their_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let j = dir.path().join("a.jsonl");
        std::fs::write(
            &j,
            "{\"text\": \"fine\", \"label\": 1}\n\n{\"text\": \"bad\", \"label\": 0}\n",
        )
        .unwrap();
        let rows = read_rows(&j, None).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].1["label"], "1");
        assert_eq!(rows[1].0.to_string(), format!("{} line 3", j.display()));
        assert_eq!(read_rows(&j, Some(1)).unwrap().len(), 1);
        let c = dir.path().join("a.csv");
        std::fs::write(&c, "category,text\nfresh,\"good,\nwarm\"\nrotten,dull\n").unwrap();
        let rows = read_rows(&c, None).unwrap();
        assert_eq!(rows[0].1["text"], "good,\nwarm");
        assert_eq!(rows[1].1["category"], "rotten");
        assert_eq!((rows[0].0.line, rows[1].0.line), (2, 4));
        // A bad record is named by its own line, not the next one's.
        std::fs::write(
            &c,
            "category,text\nfresh,good\nrotten,dull,long\nfresh,fine\n",
        )
        .unwrap();
        let e = format!("{:#}", read_rows(&c, None).unwrap_err());
        assert_eq!(
            e,
            format!(
                "{} line 3: the row has 3 fields but the header has 2 (a field that holds \
                 the delimiter must be quoted)",
                c.display()
            )
        );
        assert_eq!(header_row(&c).map(|o| o.line), Some(1));
        assert_eq!(header_row(&j), None);
        std::fs::write(&j, "{\"text\": \"fine\"}\nnot json\n").unwrap();
        let e = format!("{:#}", read_rows(&j, None).unwrap_err());
        assert!(e.contains("a.jsonl line 2: not valid JSON"), "{e}");
        // A check reads the first rows only: a bad row further down is the run's to find.
        assert!(read_rows(&j, Some(1)).is_ok());
        let fifo = dir.path().join("f.jsonl");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let e = format!("{:#}", read_rows(&fifo, None).unwrap_err());
        assert!(e.contains("not a regular file"), "{e}");
    }
}
