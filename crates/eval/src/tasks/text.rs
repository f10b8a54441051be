//! Long texts for perplexity.
//!
//! - [`austen`]: Jane Austen's six novels from the `janeaustenr` R package's lazy-load
//!   data base (`Rdata.rdx` + `Rdata.rdb`), read with a small reader of R's
//!   serialization format (no R needed). Each novel is a character vector of lines;
//!   the text is the lines joined with `\n`.
//! - [`read_text_file`]: any UTF-8 text file.

use std::path::Path;

use super::rdata::{self, RData};
use super::Error;

/// The package's variable names and the titles it gives them, in publication order.
const AUSTEN_TITLES: &[(&str, &str)] = &[
    ("sensesensibility", "Sense & Sensibility"),
    ("prideprejudice", "Pride & Prejudice"),
    ("mansfieldpark", "Mansfield Park"),
    ("emma", "Emma"),
    ("northangerabbey", "Northanger Abbey"),
    ("persuasion", "Persuasion"),
];

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    super::read_user_file(path)
}

/// `(title, text)` of every character vector in the R lazy-load data base in `dir`
/// (`Rdata.rdx`, `Rdata.rdb`): for the `austen` data, the six novels in publication
/// order with their usual titles ("Sense & Sensibility", "Pride & Prejudice", ...);
/// any other variable follows under its own name.
pub fn austen(dir: &Path) -> Result<Vec<(String, String)>, Error> {
    let rdx_path = dir.join("Rdata.rdx");
    let rdb_path = dir.join("Rdata.rdb");
    let bad = |path: &Path, message: String| Error::Data {
        path: path.to_path_buf(),
        message,
    };
    let index = rdata::inflate_any(&read(&rdx_path)?)
        .and_then(|b| rdata::unserialize(&b))
        .map_err(|m| bad(&rdx_path, m))?;
    if let Some(c) = index.get("compressed") {
        match &c.data {
            RData::Int(v) if v.first().is_some_and(|&x| x == 1) => {}
            RData::Real(v) if v.first().is_some_and(|&x| x == 1.0) => {}
            other => {
                return Err(bad(
                    &rdx_path,
                    format!(
                        "only zlib-compressed data bases are supported (compressed = {other:?})"
                    ),
                ))
            }
        }
    }
    let vars = index
        .get("variables")
        .ok_or_else(|| bad(&rdx_path, "no `variables` in the index".into()))?;
    let RData::List(entries) = &vars.data else {
        return Err(bad(&rdx_path, "`variables` is not a list".into()));
    };
    let names = vars.names();
    if names.len() != entries.len() {
        return Err(bad(&rdx_path, "`variables` has no names".into()));
    }
    let rdb = read(&rdb_path)?;
    let mut texts = Vec::new();
    for (name, entry) in names.iter().zip(entries) {
        let (offset, length) = match &entry.data {
            RData::Int(v) if v.len() == 2 && v[0] >= 0 && v[1] >= 0 => {
                (v[0] as usize, v[1] as usize)
            }
            RData::Real(v) if v.len() == 2 && v[0] >= 0.0 && v[1] >= 0.0 => {
                (v[0] as usize, v[1] as usize)
            }
            other => {
                return Err(bad(
                    &rdx_path,
                    format!("variable `{name}` has no (offset, length): {other:?}"),
                ))
            }
        };
        let value = rdata::lazy_chunk(&rdb, offset, length)
            .map_err(|m| bad(&rdb_path, format!("variable `{name}`: {m}")))?;
        let RData::Str(lines) = value.data else {
            return Err(bad(
                &rdb_path,
                format!("variable `{name}` is not a character vector"),
            ));
        };
        let text = lines
            .into_iter()
            .map(Option::unwrap_or_default)
            .collect::<Vec<_>>()
            .join("\n");
        texts.push((name.clone(), text));
    }
    let rank = |n: &str| {
        AUSTEN_TITLES
            .iter()
            .position(|(v, _)| *v == n)
            .unwrap_or(usize::MAX)
    };
    texts.sort_by_key(|(n, _)| rank(n));
    Ok(texts
        .into_iter()
        .map(|(n, t)| {
            let title = AUSTEN_TITLES
                .iter()
                .find(|(v, _)| *v == n)
                .map_or(n, |(_, title)| title.to_string());
            (title, t)
        })
        .collect())
}

/// The whole of a UTF-8 text file: an error names the file when it is missing or
/// unreadable, and gives the byte offset of the first invalid byte when it is not
/// UTF-8.
pub fn read_text_file(path: &Path) -> Result<String, Error> {
    let bytes = read(path)?;
    String::from_utf8(bytes).map_err(|e| Error::Data {
        path: path.to_path_buf(),
        message: format!(
            "not UTF-8 text: invalid byte at offset {}",
            e.utf8_error().valid_up_to()
        ),
    })
}
