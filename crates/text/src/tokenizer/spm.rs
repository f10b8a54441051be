//! SentencePiece-style BPE: spaces become `▁`, the text starts as one symbol
//! per character, and adjacent symbols merge while their concatenation is a
//! token, highest token score first. Characters left without a token are
//! spelled with `<0xNN>` byte tokens (or the unknown token).

use super::hash::FastMap;
use super::merge::Merger;
use crate::Error;

pub(crate) const SPACE: char = '\u{2581}';

pub(crate) struct Spm {
    /// Normal tokens by text.
    pieces: FastMap<String, u32>,
    scores: Vec<f32>,
    byte_tokens: [Option<u32>; 256],
    unk: Option<u32>,
    pub add_space_prefix: bool,
}

impl Spm {
    pub fn new(
        pieces: FastMap<String, u32>,
        scores: Vec<f32>,
        byte_tokens: [Option<u32>; 256],
        unk: Option<u32>,
        add_space_prefix: bool,
    ) -> Spm {
        Spm {
            pieces,
            scores,
            byte_tokens,
            unk,
            add_space_prefix,
        }
    }

    /// Appends the tokens of a piece of plain text (the input, or a part of
    /// it between special tokens); with `add_space_prefix` each such part gets
    /// a `▁` in front, as in llama.cpp and the legacy Hugging Face Llama
    /// tokenizer.
    pub fn encode(&self, text: &str, out: &mut Vec<u32>, merger: &mut Merger) -> Result<(), Error> {
        let mut norm = String::with_capacity(text.len() * 3 / 2 + 3);
        if self.add_space_prefix {
            norm.push(SPACE);
        }
        for c in text.chars() {
            norm.push(if c == ' ' { SPACE } else { c });
        }
        let norm = norm.as_str();
        let initial = norm.char_indices().map(|(i, c)| {
            let end = i + c.len_utf8();
            (i, end, self.pieces.get(&norm[i..end]).copied())
        });
        let (pieces, scores) = (&self.pieces, &self.scores);
        let syms = merger.run(initial, |l, r| {
            let id = *pieces.get(&norm[l.start..r.end])?;
            let score = scores.get(id as usize).copied().unwrap_or(0.0);
            Some((score as f64, id))
        });
        for s in syms {
            if let Some(id) = s.id {
                out.push(id);
                continue;
            }
            let piece = &norm[s.start..s.end];
            let bytes: Option<Vec<u32>> = piece
                .bytes()
                .map(|b| self.byte_tokens[b as usize])
                .collect();
            match (bytes, self.unk) {
                (Some(ids), _) => out.extend(ids),
                (None, Some(unk)) => out.push(unk),
                (None, None) => {
                    return Err(Error::Tokenizer(format!(
                        "'{piece}' has no token, and the vocabulary has neither byte tokens nor an unknown token"
                    )))
                }
            }
        }
        Ok(())
    }
}
