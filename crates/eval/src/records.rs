//! Per-sample results as JSON lines, written so that an interrupted grid loses at most
//! the sample it was working on.
//!
//! All the records of one work item are appended in one write and flushed; on restart
//! a torn last line (the process died mid-write) is cut off, and the items whose
//! records are all present are skipped.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

/// One (work item, configuration) result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Model name, KV dtype and precision: results of different runs never mix.
    pub run: String,
    pub task: String,
    pub length: usize,
    pub index: usize,
    /// `full` or `method@budget`.
    pub config: String,
    pub method: String,
    /// The budget as written (`1` for the full cache).
    pub budget: String,
    /// `agnostic` (the context compressed before the question) or `aware` (the
    /// question compressed with it). Records written before protocols existed were
    /// query-aware.
    #[serde(default = "aware")]
    pub protocol: String,
    /// Tokens prefilled: for the query-agnostic protocol, the context's.
    pub prompt_tokens: usize,
    /// KV bytes of the full prompt cache and of this configuration's cache after compression.
    pub kv_bytes_full: usize,
    pub kv_bytes: usize,
    /// Slots over all heads, of the full cache and after compression (0: not recorded).
    #[serde(default)]
    pub kv_slots_full: usize,
    #[serde(default)]
    pub kv_slots: usize,
    /// Task score in [0, 1] (answer tasks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prediction: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub references: Vec<String>,
    /// Text tasks: perplexity of the scored tokens, mean KL(full || this) per step and
    /// top-1 agreement with the full cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ppl: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kl: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top1: Option<f64>,
    #[serde(default)]
    pub meta: serde_json::Map<String, serde_json::Value>,
    /// Seconds; not part of a result's identity.
    #[serde(default)]
    pub timing: Timing,
}

fn aware() -> String {
    "aware".into()
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Timing {
    pub prefill_s: f64,
    pub compress_s: f64,
    pub decode_s: f64,
    /// KVzip's reconstruction pass, once per sample (shared by its configurations).
    #[serde(default)]
    pub reconstruct_s: f64,
    /// Appending the question (query-agnostic) or prefilling it (query-aware).
    #[serde(default)]
    pub question_s: f64,
}

impl Record {
    /// What identifies a result: the same key means the same experiment.
    pub fn key(&self) -> RecordKey {
        (
            self.run.clone(),
            self.task.clone(),
            self.length,
            self.index,
            self.config.clone(),
            self.protocol.clone(),
        )
    }
    pub fn kv_ratio(&self) -> f64 {
        if self.kv_bytes_full == 0 {
            1.0
        } else {
            self.kv_bytes as f64 / self.kv_bytes_full as f64
        }
    }
    /// The record without its timings, for comparing two runs of the same grid.
    pub fn without_timing(&self) -> Record {
        Record {
            timing: Timing::default(),
            ..self.clone()
        }
    }
}

/// Run, task, length, sample index, configuration label and protocol.
pub type RecordKey = (String, String, usize, usize, String, String);

/// A problem with one line of a records file.
#[derive(Clone, Debug, PartialEq)]
pub struct BadLine {
    pub path: PathBuf,
    pub line: usize,
    pub message: String,
}

/// Read every record of a JSONL file. Lines that do not parse are returned, with their
/// 1-based numbers, next to the records that did.
pub fn read_records(path: &Path) -> std::io::Result<(Vec<Record>, Vec<BadLine>)> {
    let f = File::open(path)?;
    let mut records = Vec::new();
    let mut bad = Vec::new();
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let line = match line {
            Ok(l) => l,
            Err(e) => {
                bad.push(BadLine {
                    path: path.to_path_buf(),
                    line: i + 1,
                    message: e.to_string(),
                });
                continue;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Record>(&line) {
            Ok(r) => records.push(r),
            Err(e) => bad.push(BadLine {
                path: path.to_path_buf(),
                line: i + 1,
                message: e.to_string(),
            }),
        }
    }
    Ok((records, bad))
}

/// An append-only records file, opened for resuming.
pub struct RecordFile {
    path: PathBuf,
    file: File,
    done: BTreeSet<RecordKey>,
}

/// The largest records file read (a grid of a few thousand samples is a few MiB).
pub const MAX_RECORDS_BYTES: u64 = 4 << 30;

impl RecordFile {
    /// Open (creating) `path`. A torn last line is cut off; any other line that does
    /// not parse is an error, since the file would then not be one this harness wrote.
    pub fn open(path: &Path) -> std::io::Result<RecordFile> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut done = BTreeSet::new();
        if path.exists() {
            let bytes = kvmerger_compression::files::read_bounded(path, MAX_RECORDS_BYTES)
                .map_err(|e| {
                    std::io::Error::new(
                        e.kind.unwrap_or(std::io::ErrorKind::InvalidData),
                        e.to_string(),
                    )
                })?;
            let complete = match bytes.iter().rposition(|&b| b == b'\n') {
                Some(p) => p + 1,
                None => 0,
            };
            if complete < bytes.len() {
                let f = OpenOptions::new().write(true).open(path)?;
                f.set_len(complete as u64)?;
                f.sync_all()?;
            }
            let (records, bad) = read_records(path)?;
            if let Some(b) = bad.first() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "{}:{}: not a result record ({}); move the file away or choose another output directory",
                        b.path.display(),
                        b.line,
                        b.message
                    ),
                ));
            }
            done.extend(records.iter().map(Record::key));
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(RecordFile {
            path: path.to_path_buf(),
            file,
            done,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn has(&self, key: &RecordKey) -> bool {
        self.done.contains(key)
    }

    /// Append the records of one work item in one write.
    pub fn append(&mut self, records: &[Record]) -> std::io::Result<()> {
        let mut buf = Vec::new();
        for r in records {
            serde_json::to_writer(&mut buf, r).map_err(std::io::Error::other)?;
            buf.push(b'\n');
        }
        self.file.write_all(&buf)?;
        self.file.flush()?;
        self.file.sync_data()?;
        self.done.extend(records.iter().map(Record::key));
        Ok(())
    }
}

/// Every record in the `samples*.jsonl` files of `dirs`, one per key (the first seen;
/// two different results for one key are reported as conflicts).
pub fn collect(dirs: &[PathBuf]) -> std::io::Result<Collected> {
    let mut by_key: BTreeMap<RecordKey, Record> = BTreeMap::new();
    let mut out = Collected::default();
    for dir in dirs {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("samples") && n.ends_with(".jsonl"))
            })
            .collect();
        files.sort();
        for f in files {
            let (records, bad) = read_records(&f)?;
            out.bad.extend(bad);
            out.files.push(f.clone());
            for r in records {
                match by_key.get(&r.key()) {
                    Some(old) if old.without_timing() != r.without_timing() => {
                        out.conflicts.push(r.key())
                    }
                    Some(_) => {}
                    None => {
                        by_key.insert(r.key(), r);
                    }
                }
            }
        }
    }
    out.records = by_key.into_values().collect();
    Ok(out)
}

#[derive(Debug, Default)]
pub struct Collected {
    pub records: Vec<Record>,
    pub files: Vec<PathBuf>,
    pub bad: Vec<BadLine>,
    pub conflicts: Vec<RecordKey>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(i: usize) -> Record {
        Record {
            run: "m".into(),
            task: "t".into(),
            length: 100,
            index: i,
            config: "full".into(),
            method: "full".into(),
            budget: "1".into(),
            protocol: "agnostic".into(),
            prompt_tokens: 100,
            kv_bytes_full: 10,
            kv_bytes: 10,
            kv_slots_full: 0,
            kv_slots: 0,
            score: Some(1.0),
            prediction: Some("x".into()),
            references: vec!["x".into()],
            ppl: None,
            kl: None,
            top1: None,
            meta: Default::default(),
            timing: Timing::default(),
        }
    }

    #[test]
    fn a_torn_last_line_is_cut_and_finished_items_are_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("samples.jsonl");
        let mut f = RecordFile::open(&p).unwrap();
        f.append(&[rec(0), rec(1)]).unwrap();
        drop(f);
        let mut text = std::fs::read_to_string(&p).unwrap();
        text.push_str("{\"run\":\"m\",\"ta");
        std::fs::write(&p, &text).unwrap();
        let mut f = RecordFile::open(&p).unwrap();
        assert!(f.has(&rec(0).key()) && f.has(&rec(1).key()) && !f.has(&rec(2).key()));
        f.append(&[rec(2)]).unwrap();
        let (records, bad) = read_records(&p).unwrap();
        assert!(bad.is_empty());
        assert_eq!(records, vec![rec(0), rec(1), rec(2)]);
    }

    #[test]
    fn a_file_that_is_not_ours_is_refused_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("samples.jsonl");
        std::fs::write(&p, "hello\nworld\n").unwrap();
        let err = RecordFile::open(&p).err().unwrap();
        assert!(err.to_string().contains(":1:"), "{err}");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "hello\nworld\n");
    }
}
