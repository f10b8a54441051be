//! GPT-2 style byte-level BPE: bytes are spelled as printable characters,
//! text is split into pre-tokens by a regex, and each pre-token is merged by
//! merge rank.

use super::hash::FastMap;
use super::merge::Merger;
use crate::Error;
use regex::Regex;
use std::collections::HashMap;
use std::sync::Mutex;

/// The printable character that byte-level BPE uses for each byte: printable
/// Latin-1 bytes stand for themselves, the others (controls, space, DEL, NBSP,
/// soft hyphen) are moved, in order, to U+0100 upwards.
pub(crate) fn byte_chars() -> [char; 256] {
    let printable = |b: u32| {
        (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b)
    };
    let mut out = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..256u32 {
        let c = if printable(b) {
            b
        } else {
            extra += 1;
            0xff + extra
        };
        out[b as usize] = char::from_u32(c).unwrap_or('\u{fffd}');
    }
    out
}

/// Inverse of [`byte_chars`]: the byte a character stands for, if any.
pub(crate) struct ByteDecoder {
    table: Vec<Option<u8>>,
}

impl ByteDecoder {
    pub fn new() -> ByteDecoder {
        let chars = byte_chars();
        let max = chars.iter().map(|&c| c as usize).max().unwrap_or(0);
        let mut table = vec![None; max + 1];
        for (b, &c) in chars.iter().enumerate() {
            table[c as usize] = Some(b as u8);
        }
        ByteDecoder { table }
    }

    /// The bytes a byte-level token spells; characters outside the mapping
    /// are kept as their UTF-8.
    pub fn decode(&self, token: &str, out: &mut Vec<u8>) {
        for c in token.chars() {
            match self.table.get(c as usize).copied().flatten() {
                Some(b) => out.push(b),
                None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
            }
        }
    }
}

// The reference patterns end in `\s+(?!\S)|\s+`: a run of whitespace that
// is followed by a non-space gives up its last character, which then starts
// the next pre-token (" hello" after "  "). The `regex` crate has no
// lookahead, so the patterns below end in `\s+` alone and `split` trims the
// run afterwards; `tests::fast_split_matches_lookahead_regex` checks this
// against the reference patterns run by `fancy-regex`.
pub(crate) const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+";
pub(crate) const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+";
pub(crate) const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+";
pub(crate) const DIGITS: &str = r"\p{N}";
/// Falcon's: runs of punctuation first, then the GPT-2 pattern, then runs of ASCII
/// digits cut into threes from the left.
pub(crate) const PUNCTUATION: &str = r"[\p{P}\$\+<=>\^~\|`]+";
pub(crate) const DIGIT_TRIPLES: &str = r"[0-9][0-9][0-9]";
/// DeepSeek LLM's stages (the `Split` pre-tokenizers of its tokenizer.json, with
/// every non-ASCII character written as an escape so that no editor's Unicode
/// normalisation can change a range): line
/// breaks alone, runs of letters of the listed scripts, runs of ASCII and
/// full-width punctuation, trailing whitespace, CJK and Hangul runs, number runs.
pub(crate) const DEEPSEEK_LLM: &[&str] = &[
    r"[\r\n]",
    r"\s?[A-Za-z\x{b5}\x{c0}-\x{d6}\x{d8}-\x{f6}\x{f8}-\x{1ba}\x{1bc}-\x{1bf}\x{1c4}-\x{293}\x{295}-\x{2af}\x{370}-\x{373}\x{376}\x{377}\x{37b}-\x{37d}\x{37f}\x{386}\x{388}-\x{38a}\x{38c}\x{38e}-\x{3a1}\x{3a3}-\x{3f5}\x{3f7}-\x{481}\x{48a}-\x{52f}\x{531}-\x{556}\x{10a0}-\x{10c5}\x{13a0}-\x{13f5}\x{13f8}-\x{13fd}\x{1c90}-\x{1cba}\x{1cbd}-\x{1cbf}\x{1d00}-\x{1d2b}\x{1d6b}-\x{1d77}\x{1d79}-\x{1d9a}\x{1e00}-\x{1f15}\x{1f18}-\x{1f1d}\x{1f20}-\x{1f45}\x{1f48}-\x{1f4d}\x{1f50}-\x{1f57}\x{1f59}\x{1f5b}\x{1f5d}\x{1f5f}-\x{1f7d}\x{1f80}-\x{1fb4}\x{1fb6}-\x{1fbc}\x{1fbe}\x{1fc2}-\x{1fc4}\x{1fc6}-\x{1fcc}\x{1fd0}-\x{1fd3}\x{1fd6}-\x{1fdb}\x{1fe0}-\x{1fec}\x{1ff2}-\x{1ff4}\x{1ff6}-\x{1ffc}\x{2102}\x{2107}\x{210a}-\x{2113}\x{2115}\x{2119}-\x{211d}\x{2124}\x{2126}\x{2128}\x{212a}-\x{212d}\x{212f}-\x{2134}\x{2139}\x{213c}-\x{213f}\x{2145}-\x{2149}\x{214e}\x{2183}\x{2184}\x{2c00}-\x{2c7b}\x{2c7e}-\x{2ce4}\x{2ceb}-\x{2cee}\x{2cf2}\x{2cf3}\x{a640}-\x{a66d}\x{a680}-\x{a69b}\x{a722}-\x{a76f}\x{a771}-\x{a787}\x{a78b}-\x{a78e}\x{ab70}-\x{abbf}\x{fb00}-\x{fb06}\x{fb13}-\x{fb17}\x{ff21}-\x{ff3a}\x{ff41}-\x{ff5a}\x{10400}-\x{1044f}\x{104b0}-\x{104d3}\x{104d8}-\x{104fb}\x{10c80}-\x{10cb2}\x{10cc0}-\x{10cf2}\x{118a0}-\x{118df}\x{1e900}-\x{1e943}]+",
    r"\s?[!-/:-~\x{ff01}-\x{ff0f}\x{ff1a}-\x{ff5e}\x{2018}-\x{201f}\x{3000}-\x{3002}]+",
    r"\s+$",
    r"[\x{4e00}-\x{9fa5}\x{800}-\x{4e00}\x{ac00}-\x{d7ff}]+",
    r"\p{N}+",
];
/// DeepSeek Coder's stages: line breaks alone, letter runs, punctuation runs,
/// CJK and Hangul runs, then every digit alone.
pub(crate) const DEEPSEEK_CODER: &[&str] = &[
    r"[\r\n]",
    r"\s?\p{L}+",
    r"\s?\p{P}+",
    r"[\x{4e00}-\x{9fa5}\x{800}-\x{4e00}\x{ac00}-\x{d7ff}]+",
    r"\p{N}",
];

/// How a stage's whitespace-only matches are trimmed (see above).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Trim {
    /// No `\s+` branch.
    Never,
    /// Every whitespace-only match comes from the final `\s+`.
    AllWhitespace,
    /// Whitespace-only matches with a line break come from `\s*[\r\n]+`
    /// and are kept; the others come from the final `\s+`.
    WithoutNewline,
}

struct Stage {
    re: Regex,
    trim: Trim,
}

/// Splits text into pre-tokens with one or more regexes applied in turn;
/// both the matches and the text between them become pieces.
pub(crate) struct PreTokenizer {
    stages: Vec<Stage>,
    /// What is used, e.g. `qwen2`, or `gpt2 (for unknown 'foo')`.
    pub description: String,
    /// A pre-token that is itself a token is emitted whole (Llama 3).
    pub ignore_merges: bool,
}

impl PreTokenizer {
    /// The splitting rules for a `tokenizer.ggml.pre` name.
    ///
    /// - `gpt2`, `default`, `mpt`, `olmo`, `jais`: the GPT-2 pattern;
    /// - `smollm`, `starcoder`, `refact`, `command-r`, `codeshell`, `exaone`,
    ///   `minerva-7b`: every digit alone, then the GPT-2 pattern;
    /// - `qwen2`, `qwen35`, `stablelm2`, `hunyuan`: the Qwen2 pattern (single digits,
    ///   case-insensitive contractions, newlines kept with punctuation);
    /// - `llama3`, `llama-bpe`, `dbrx`, `smaug-bpe`: the Llama 3 pattern (digits
    ///   in groups of up to three);
    /// - `falcon`: punctuation runs, then the GPT-2 pattern, then ASCII digits in
    ///   threes;
    /// - `deepseek-llm`, `deepseek-coder`: their own stages (see [`DEEPSEEK_LLM`],
    ///   [`DEEPSEEK_CODER`]).
    ///
    /// The Llama 3 family also ignores merges for pre-tokens that are tokens.
    ///
    /// Any other name gets the GPT-2 pattern: it is the common ancestor of the
    /// others, so unknown vocabularies still encode and decode losslessly, if
    /// not always into the ids their reference tokenizer would pick.
    pub fn for_name(pre: &str) -> Result<PreTokenizer, Error> {
        let gpt2 = (GPT2, Trim::AllWhitespace);
        let untrimmed = |ps: &[&'static str]| ps.iter().map(|&p| (p, Trim::Never)).collect();
        let (stages, description): (Vec<(&str, Trim)>, String) = match pre {
            "gpt2" | "gpt-2" | "default" | "mpt" | "olmo" | "jais" => (vec![gpt2], "gpt2".into()),
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone"
            | "minerva-7b" => (vec![(DIGITS, Trim::Never), gpt2], "digits+gpt2".into()),
            "qwen2" | "qwen35" | "stablelm2" | "hunyuan" => {
                (vec![(QWEN2, Trim::WithoutNewline)], "qwen2".into())
            }
            "llama3" | "llama-bpe" | "llama-v3" | "falcon3" | "falcon-h1" | "pixtral" | "dbrx"
            | "smaug-bpe" => (vec![(LLAMA3, Trim::WithoutNewline)], "llama3".into()),
            "falcon" => (
                vec![
                    (PUNCTUATION, Trim::Never),
                    gpt2,
                    (DIGIT_TRIPLES, Trim::Never),
                ],
                "falcon".into(),
            ),
            "deepseek-llm" => (untrimmed(DEEPSEEK_LLM), "deepseek-llm".into()),
            "deepseek-coder" => (untrimmed(DEEPSEEK_CODER), "deepseek-coder".into()),
            other => (vec![gpt2], format!("gpt2 (for unknown '{other}')")),
        };
        // Llama 3's tokenizer.json sets `ignore_merges`: a pre-token that is a
        // token of its own is that token, whatever the merges would build.
        let ignore_merges = matches!(
            pre,
            "llama3" | "llama-bpe" | "llama-v3" | "falcon3" | "falcon-h1" | "pixtral"
        );
        let stages = stages
            .iter()
            .map(|&(p, trim)| {
                let re = Regex::new(p)
                    .map_err(|e| Error::Tokenizer(format!("pre-tokenizer regex: {e}")))?;
                Ok(Stage { re, trim })
            })
            .collect::<Result<_, Error>>()?;
        Ok(PreTokenizer {
            stages,
            description,
            ignore_merges,
        })
    }

    /// Calls `f` on each pre-token of `text`, in order.
    pub fn split(
        &self,
        text: &str,
        f: &mut dyn FnMut(&str) -> Result<(), Error>,
    ) -> Result<(), Error> {
        self.split_stage(0, text, f)
    }

    fn split_stage(
        &self,
        stage: usize,
        text: &str,
        f: &mut dyn FnMut(&str) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let Some(Stage { re, trim }) = self.stages.get(stage) else {
            return f(text);
        };
        let mut last = 0;
        while let Some(m) = re.find_at(text, last) {
            let (start, mut end) = (m.start(), m.end());
            if *trim != Trim::Never && end < text.len() {
                let s = m.as_str();
                let whitespace = s.chars().all(char::is_whitespace);
                let from_tail = match trim {
                    Trim::AllWhitespace => whitespace,
                    _ => whitespace && !s.contains(['\r', '\n']),
                };
                if from_tail {
                    // The run is maximal, so a non-space follows it: give up
                    // the last character if something is left.
                    if let Some((i, _)) = s.char_indices().last().filter(|&(i, _)| i > 0) {
                        end = start + i;
                    }
                }
            }
            if start > last {
                self.split_stage(stage + 1, &text[last..start], f)?;
            }
            if end == start {
                // No branch matches the empty string; be safe anyway.
                break;
            }
            self.split_stage(stage + 1, &text[start..end], f)?;
            last = end;
        }
        if last < text.len() {
            self.split_stage(stage + 1, &text[last..], f)?;
        }
        Ok(())
    }
}

/// Pre-tokens at most this long are cached.
const CACHE_MAX_PIECE: usize = 48;
/// The cache is emptied when it reaches this many entries.
const CACHE_MAX_ENTRIES: usize = 1 << 16;

pub(crate) struct ByteBpe {
    /// Token of each byte's character, or a fallback token (`<0xNN>` or the
    /// unknown token) when the vocabulary lacks the character.
    byte_ids: [Option<u32>; 256],
    /// `(left, right) -> (rank, merged)`.
    merges: FastMap<(u32, u32), (u32, u32)>,
    pub pre: PreTokenizer,
    /// Every normal token by its byte-level text, kept when the pre-tokenizer
    /// ignores merges for pre-tokens that are tokens themselves.
    words: Option<FastMap<String, u32>>,
    cache: Mutex<HashMap<Box<str>, Box<[u32]>>>,
}

impl ByteBpe {
    /// `lookup` finds a normal token by its (byte-level spelled) text;
    /// `fallback(b)` gives a token for a byte the vocabulary cannot spell;
    /// `words` is every normal token by its text, needed when `pre` ignores
    /// merges (it is dropped otherwise).
    pub fn new(
        merges: &[String],
        lookup: &dyn Fn(&str) -> Option<u32>,
        fallback: &dyn Fn(u8) -> Option<u32>,
        pre: PreTokenizer,
        words: impl FnOnce() -> FastMap<String, u32>,
    ) -> Result<ByteBpe, Error> {
        let chars = byte_chars();
        let mut byte_ids = [None; 256];
        for (b, id) in byte_ids.iter_mut().enumerate() {
            *id = lookup(chars[b].encode_utf8(&mut [0; 4])).or_else(|| fallback(b as u8));
        }
        let mut map = FastMap::default();
        map.reserve(merges.len());
        let mut joined = String::new();
        for (rank, m) in merges.iter().enumerate() {
            let Some((a, b)) = m.split_once(' ') else {
                return Err(Error::Tokenizer(format!(
                    "merge {rank} '{m}' is not two tokens separated by a space"
                )));
            };
            joined.clear();
            joined.push_str(a);
            joined.push_str(b);
            // A merge whose parts or result are not tokens can never apply.
            if let (Some(l), Some(r), Some(id)) = (lookup(a), lookup(b), lookup(&joined)) {
                map.entry((l, r)).or_insert((rank as u32, id));
            }
        }
        let words = pre.ignore_merges.then(words);
        Ok(ByteBpe {
            byte_ids,
            merges: map,
            pre,
            words,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Appends the tokens of a piece of plain text (no special tokens).
    /// Appends `text`'s ids to `out`; stops with [`Error::ContextOverflow`] as soon as
    /// `out` holds more than `limit` ids.
    pub fn encode(
        &self,
        text: &str,
        out: &mut Vec<u32>,
        merger: &mut Merger,
        limit: usize,
    ) -> Result<(), Error> {
        self.pre.split(text, &mut |piece| {
            self.encode_piece(piece, out, merger)?;
            if out.len() > limit {
                return Err(Error::ContextOverflow {
                    prompt: out.len(),
                    ctx: limit,
                });
            }
            Ok(())
        })
    }

    fn encode_piece(
        &self,
        piece: &str,
        out: &mut Vec<u32>,
        merger: &mut Merger,
    ) -> Result<(), Error> {
        let cacheable = piece.len() <= CACHE_MAX_PIECE;
        if cacheable {
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(ids) = cache.get(piece) {
                out.extend_from_slice(ids);
                return Ok(());
            }
        }
        let start = out.len();
        let bytes = piece.as_bytes();
        if let Some(words) = &self.words {
            static CHARS: std::sync::OnceLock<[char; 256]> = std::sync::OnceLock::new();
            let chars = CHARS.get_or_init(byte_chars);
            let spelled: String = bytes.iter().map(|&b| chars[b as usize]).collect();
            if let Some(&id) = words.get(&spelled) {
                out.push(id);
                return Ok(());
            }
        }
        for (i, &b) in bytes.iter().enumerate() {
            if self.byte_ids[b as usize].is_none() {
                return Err(Error::Tokenizer(format!(
                    "byte 0x{b:02X} at offset {i} of '{piece}' has no token and the vocabulary has no fallback"
                )));
            }
        }
        let merges = &self.merges;
        let syms = merger.run(
            bytes
                .iter()
                .enumerate()
                .map(|(i, &b)| (i, i + 1, self.byte_ids[b as usize])),
            |l, r| {
                let (rank, id) = *merges.get(&(l.id?, r.id?))?;
                Some((-(rank as f64), id))
            },
        );
        out.extend(syms.filter_map(|s| s.id));
        if cacheable {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if cache.len() >= CACHE_MAX_ENTRIES {
                cache.clear();
            }
            cache.insert(piece.into(), out[start..].into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(pre: &str, text: &str) -> Vec<String> {
        let p = PreTokenizer::for_name(pre).unwrap();
        let mut v = Vec::new();
        p.split(text, &mut |s| {
            v.push(s.to_string());
            Ok(())
        })
        .unwrap();
        v
    }

    #[test]
    fn byte_chars_are_a_bijection_onto_printables() {
        let chars = byte_chars();
        assert_eq!(chars[b'a' as usize], 'a');
        assert_eq!(chars[b' ' as usize], 'Ġ');
        assert_eq!(chars[b'\n' as usize], 'Ċ');
        let set: std::collections::HashSet<char> = chars.iter().copied().collect();
        assert_eq!(set.len(), 256);
        let dec = ByteDecoder::new();
        let all: String = chars.iter().collect();
        let mut out = Vec::new();
        dec.decode(&all, &mut out);
        assert_eq!(out, (0..=255u8).collect::<Vec<_>>());
    }

    #[test]
    fn gpt2_pretokenizer_splits() {
        assert_eq!(
            pieces("gpt2", "Hello world's  end 123!"),
            ["Hello", " world", "'s", " ", " end", " 123", "!"]
        );
        assert_eq!(pieces("gpt2", "a\n\nb  "), ["a", "\n", "\n", "b", "  "]);
        assert_eq!(pieces("smollm", "x 2024"), ["x", " ", "2", "0", "2", "4"]);
        assert_eq!(
            pieces("qwen2", "I'M here 42.\n\n ok"),
            ["I", "'M", " here", " ", "4", "2", ".\n\n", " ok"]
        );
        assert_eq!(pieces("llama3", "12345 abc"), ["123", "45", " abc"]);
        // DeepSeek: numbers (including "½") apart from their spaces; letters
        // take one leading space; a line break stands alone.
        assert_eq!(
            pieces("deepseek-llm", "ied 4 ½ months"),
            ["ied", " ", "4", " ", "½", " months"]
        );
        assert_eq!(
            pieces("deepseek-llm", "a\n12, 中文 x  "),
            ["a", "\n", "12", ",", " ", "中文", " x", "  "]
        );
        assert_eq!(
            pieces("deepseek-coder", "x=12;\n"),
            ["x", "=", "1", "2", ";", "\n"]
        );
        assert!(PreTokenizer::for_name("mystery")
            .unwrap()
            .description
            .contains("mystery"));
    }

    /// The reference pattern of a stage: the fast one with the lookahead
    /// branch put back.
    fn reference(p: &str) -> String {
        if [DIGITS, PUNCTUATION, DIGIT_TRIPLES].contains(&p) {
            return p.to_string();
        }
        let head = p.strip_suffix(r"\s+").unwrap();
        format!(r"{head}\s+(?!\S)|\s+")
    }

    /// Splits like `PreTokenizer::split`, with the reference regexes.
    fn reference_pieces(stages: &[fancy_regex::Regex], text: &str) -> Vec<String> {
        let mut pieces = vec![text.to_string()];
        for re in stages {
            let mut next = Vec::new();
            for piece in &pieces {
                let mut last = 0;
                for m in re.find_iter(piece) {
                    let m = m.unwrap();
                    if m.start() > last {
                        next.push(piece[last..m.start()].to_string());
                    }
                    next.push(m.as_str().to_string());
                    last = m.end();
                }
                if last < piece.len() {
                    next.push(piece[last..].to_string());
                }
            }
            pieces = next;
        }
        pieces
    }

    #[test]
    fn fast_split_matches_lookahead_regex() {
        const ALPHABET: &[&str] = &[
            " ", " ", "  ", "\n", "\r\n", "\t", "\u{a0}", "\u{3000}", "a", "Bc", "é", "中", "1",
            "٣", "23", "'", "'s", "'LL", "'re", ".", "!?", "-", "🎉", "\u{0}", "_",
        ];
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut rand = move |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        let configs: [(&str, &[&str]); 5] = [
            ("gpt2", &[GPT2]),
            ("smollm", &[DIGITS, GPT2]),
            ("qwen2", &[QWEN2]),
            ("llama3", &[LLAMA3]),
            ("falcon", &[PUNCTUATION, GPT2, DIGIT_TRIPLES]),
        ];
        for (name, patterns) in configs {
            let fast = PreTokenizer::for_name(name).unwrap();
            let slow: Vec<_> = patterns
                .iter()
                .map(|p| fancy_regex::Regex::new(&reference(p)).unwrap())
                .collect();
            for _ in 0..3000 {
                let len = rand(14);
                let text: String = (0..len).map(|_| ALPHABET[rand(ALPHABET.len())]).collect();
                let mut got = Vec::new();
                fast.split(&text, &mut |s| {
                    got.push(s.to_string());
                    Ok(())
                })
                .unwrap();
                assert_eq!(got, reference_pieces(&slow, &text), "{name} on {text:?}");
            }
        }
    }
}
