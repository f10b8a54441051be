//! Text inputs: files and standard input read with bounds, stop strings with their
//! escapes, and the filler documents of `demo` and `bench`.

use anyhow::{bail, Context, Result};

/// The most bytes a text input (prompt, document, config, schedule) may have.
pub const MAX_TEXT_BYTES: u64 = 64 << 20;

/// A UTF-8 text file's contents (`-`: standard input), or a clear error: only a
/// regular file is opened (a FIFO or device would block or never end), and at most
/// [`MAX_TEXT_BYTES`] are read.
pub fn read_text(f: &std::path::Path, what: &str) -> Result<String> {
    use std::io::Read;
    let limit = MAX_TEXT_BYTES;
    let mut bytes = Vec::new();
    if f.as_os_str() == "-" {
        std::io::stdin()
            .lock()
            .take(limit + 1)
            .read_to_end(&mut bytes)
            .with_context(|| format!("reading {what} from standard input"))?;
    } else {
        bytes = kvmerger_compression::files::read_bounded(f, limit)
            .map_err(|e| anyhow::anyhow!("{what} {e}"))?;
    }
    if bytes.len() as u64 > limit {
        bail!(
            "{what} {} is longer than the {} MiB a text input may have",
            f.display(),
            limit >> 20
        );
    }
    String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{what} {} is not valid UTF-8 (invalid byte at offset {})",
            f.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

/// A stop string as the shell passes it with its escapes understood, so that
/// `--stop "\n\n"` stops at a blank line: `\n`, `\t`, `\r`, `\\`, `\"`, `\0`.
pub fn unescape(s: &str) -> Result<String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some('0') => out.push('\0'),
            Some('\\') => out.push('\\'),
            Some('"') => out.push('"'),
            Some('\'') => out.push('\''),
            Some(other) => bail!(
                "--stop {s:?}: unknown escape \\{other} (known: \\n \\t \\r \\0 \\\\ \\\" \\')"
            ),
            None => bail!("--stop {s:?} ends with a lone backslash (write \\\\ for one)"),
        }
    }
    if out.is_empty() {
        bail!("--stop must not be empty");
    }
    Ok(out)
}

const FILLER: &str =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";
/// A filler text of about `tokens` tokens with one fact at `depth`, and the question
/// about it (for `bench --fidelity`'s prompt).
pub fn haystack(tokens: usize, depth: f64, city: &str) -> String {
    let (text, _) = document(tokens, &[(depth, format!("The secret city is {city}."))]);
    format!("{text}\n\nQuestion: What is the secret city?")
}

/// About `tokens` tokens of filler with each fact at its depth (0 = start, 1 = end).
pub fn document(tokens: usize, facts: &[(f64, String)]) -> (String, usize) {
    // One filler group is about 25 tokens in BPE vocabularies.
    let reps = (tokens / 25).max(2);
    let mut s = String::new();
    for i in 0..reps {
        for (depth, fact) in facts {
            if ((reps as f64) * depth.clamp(0.0, 1.0)).round() as usize == i {
                s.push_str(fact);
                s.push(' ');
            }
        }
        s.push_str(FILLER);
    }
    (s, reps)
}
