//! Text to token ids and back.
//!
//! [`Tokenizer::from_gguf`] builds a tokenizer from a GGUF file's
//! `tokenizer.ggml.*` metadata; two models are implemented here:
//!
//! - `gpt2`: byte-level BPE. Every byte is spelled as a printable character,
//!   the text is split into pre-tokens by the regexes that
//!   `tokenizer.ggml.pre` names (see [`Tokenizer::pre_tokenizer`]), and each
//!   pre-token is merged in the order of `tokenizer.ggml.merges`.
//! - `llama`: SentencePiece-style BPE. Spaces become `▁`, adjacent symbols
//!   merge while their concatenation is a token, highest
//!   `tokenizer.ggml.scores` first, and characters left without a token are
//!   spelled with `<0xNN>` byte tokens. A `▁` is put in front of the text
//!   (and of each stretch of text after a special token, as llama.cpp does)
//!   only when `tokenizer.ggml.add_space_prefix` says so (absent: yes, as
//!   SentencePiece does by default; Gemma 3 files set it to false).
//!   [`Tokenizer::decode`] then drops the space of the first text token.
//!
//! In both, control tokens (type 3, e.g. `<|im_start|>`) and user-defined
//! tokens (type 4) that appear in the input are matched first, leftmost and
//! longest, and become single tokens; [`Tokenizer::encode_with`] can leave
//! control tokens as plain text, for text a user typed.
//!
//! [`Tokenizer::from_tokenizer_json`] wraps a Hugging Face `tokenizer.json`
//! through the `tokenizers` crate (cargo feature `hf-tokenizers`, on by
//! default).
//!
//! [`Detokenizer`] turns ids into text as they are generated, holding back
//! bytes until they form complete UTF-8.

mod bpe;
mod hash;
mod merge;
mod spm;
#[cfg(test)]
mod tests;

use crate::Error;
use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use kvmerger_tensors::gguf::{GgufFile, Value};
use merge::Merger;
use std::collections::BTreeMap;

type Result<T, E = Error> = std::result::Result<T, E>;

/// What a token is, as GGUF's `tokenizer.ggml.token_type` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TokenType {
    /// 0, or a value GGUF does not define.
    Undefined,
    /// 1: an ordinary piece of text.
    Normal,
    /// 2: the unknown token.
    Unknown,
    /// 3: a control token (`<bos>`, `<|im_start|>`); decoded as its text by
    /// [`Tokenizer::decode`], dropped by [`Tokenizer::decode_skip_special`].
    Control,
    /// 4: a user-defined token, matched in the input before the model runs.
    UserDefined,
    /// 5: an unused slot.
    Unused,
    /// 6: a byte token `<0xNN>`.
    Byte,
}

impl TokenType {
    fn from_gguf(v: i64) -> TokenType {
        match v {
            1 => TokenType::Normal,
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => TokenType::Undefined,
        }
    }

    fn is_textual(self) -> bool {
        matches!(self, TokenType::Normal | TokenType::Undefined)
    }
}

/// Names of control tokens that end a turn or a document in common chat
/// vocabularies; those present (as control tokens) join the stop ids.
const END_OF_TURN_NAMES: &[&str] = &[
    "<|im_end|>",
    "<|endoftext|>",
    "<end_of_turn>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<|end|>",
    "<|return|>",
    "<|END_OF_TURN_TOKEN|>",
    "<EOT>",
    "</s>",
    "<eos>",
];

/// End-of-turn names preferred for [`Tokenizer::eot`], in order.
const EOT_NAMES: &[&str] = &[
    "<|im_end|>",
    "<end_of_turn>",
    "<|eot_id|>",
    "<|end|>",
    "<|END_OF_TURN_TOKEN|>",
    "<EOT>",
];

enum Model {
    Bpe(bpe::ByteBpe),
    Spm(spm::Spm),
    #[cfg(feature = "hf-tokenizers")]
    Hf(Box<tokenizers::Tokenizer>),
}

/// Special tokens to find in input text, and the id behind each pattern.
#[derive(Default)]
struct SpecialMatcher {
    automaton: Option<AhoCorasick>,
    ids: Vec<u32>,
}

impl SpecialMatcher {
    fn new(tokens: &[String], mut keep: impl FnMut(usize) -> bool) -> Result<SpecialMatcher> {
        let mut patterns = Vec::new();
        let mut ids = Vec::new();
        for (id, t) in tokens.iter().enumerate() {
            if !t.is_empty() && keep(id) {
                patterns.push(t.as_str());
                ids.push(id as u32);
            }
        }
        if patterns.is_empty() {
            return Ok(SpecialMatcher::default());
        }
        let automaton = AhoCorasickBuilder::new()
            .match_kind(MatchKind::LeftmostLongest)
            .build(&patterns)
            .map_err(|e| Error::Tokenizer(format!("special tokens: {e}")))?;
        Ok(SpecialMatcher {
            automaton: Some(automaton),
            ids,
        })
    }
}

/// A tokenizer: text to ids and back. Cheap to share between threads.
pub struct Tokenizer {
    model: Model,
    model_name: String,
    pre_name: Option<String>,
    tokens: Vec<String>,
    types: Vec<TokenType>,
    /// What each token decodes to (GGUF models only).
    bytes: Vec<Box<[u8]>>,
    all_specials: SpecialMatcher,
    user_specials: SpecialMatcher,
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    stops: Vec<u32>,
    add_bos: bool,
    add_eos: bool,
    /// Drop the space of the first text token when decoding (SentencePiece
    /// models that add a space prefix when encoding).
    strip_space_prefix: bool,
    /// The most bytes of text one token stands for (0: unknown, as for
    /// tokenizer.json models, whose normalizers may change the text's length).
    longest_token_bytes: usize,
}

// ---- GGUF metadata helpers -------------------------------------------------

type Meta = BTreeMap<String, Value>;

fn meta<'a>(f: &'a Meta, key: &str) -> Option<&'a Value> {
    f.get(key)
}

fn missing(key: &str, what: &str) -> Error {
    Error::Tokenizer(format!(
        "GGUF metadata key '{key}' is missing or is not {what}"
    ))
}

/// `v` as an array of one entry per token (`n`), or an error naming `key`.
fn per_token<'a>(v: &'a Value, key: &str, n: usize, what: &str) -> Result<&'a [Value]> {
    let arr = v.as_array().ok_or_else(|| missing(key, what))?;
    if arr.len() != n {
        return Err(Error::Tokenizer(format!(
            "{key} has {} entries for {n} tokens",
            arr.len()
        )));
    }
    Ok(arr)
}

fn req_str<'a>(f: &'a Meta, key: &str) -> Result<&'a str> {
    meta(f, key)
        .and_then(|v| v.as_str())
        .ok_or_else(|| missing(key, "a string"))
}

fn req_str_array(f: &Meta, key: &str) -> Result<Vec<String>> {
    let arr = meta(f, key)
        .and_then(|v| v.as_array())
        .ok_or_else(|| missing(key, "an array of strings"))?;
    arr.iter()
        .map(|v| {
            v.as_str()
                .map(str::to_owned)
                .ok_or_else(|| missing(key, "an array of strings"))
        })
        .collect()
}

fn opt_bool(f: &Meta, key: &str) -> Option<bool> {
    meta(f, key).and_then(|v| v.as_bool().or_else(|| v.as_u64().map(|x| x != 0)))
}

/// An optional token id; present but out of range is an error.
fn opt_id(f: &Meta, key: &str, n_vocab: usize) -> Result<Option<u32>> {
    let Some(v) = meta(f, key) else {
        return Ok(None);
    };
    // Some converters write -1 for "none".
    if v.as_i64().is_some_and(|x| x < 0) {
        return Ok(None);
    }
    let id = v.as_u64().ok_or_else(|| missing(key, "an integer"))?;
    if id >= n_vocab as u64 {
        return Err(Error::Tokenizer(format!(
            "{key} = {id} is outside the vocabulary of {n_vocab} tokens"
        )));
    }
    Ok(Some(id as u32))
}

fn parse_byte_token(t: &str) -> Option<u8> {
    let hex = t.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// What a byte token decodes to: its byte, or its text where it is not `<0xNN>`.
fn byte_token_bytes(t: &str) -> Box<[u8]> {
    parse_byte_token(t).map_or_else(|| t.as_bytes().into(), |b| Box::from([b]))
}

/// Reads `tokenizer.ggml.token_type`, one per token; absent means all normal.
fn token_types(f: &Meta, n: usize) -> Result<Vec<TokenType>> {
    match meta(f, "tokenizer.ggml.token_type") {
        None => Ok(vec![TokenType::Normal; n]),
        Some(v) => {
            let key = "tokenizer.ggml.token_type";
            per_token(v, key, n, "an array of integers")?
                .iter()
                .map(|x| {
                    x.as_i64()
                        .map(TokenType::from_gguf)
                        .ok_or_else(|| missing(key, "an array of integers"))
                })
                .collect::<Result<_>>()
        }
    }
}

/// Maps the text of each normal token to its id; the first of duplicates wins.
fn normal_token_ids(tokens: &[String], types: &[TokenType]) -> hash::FastMap<String, u32> {
    let mut normal = hash::FastMap::default();
    normal.reserve(tokens.len());
    for (id, t) in tokens.iter().enumerate() {
        if types[id].is_textual() {
            normal.entry(t.clone()).or_insert(id as u32);
        }
    }
    normal
}

/// Finds the `<0xNN>` token of each byte value, preferring tokens typed as bytes.
fn byte_token_ids(tokens: &[String], types: &[TokenType]) -> [Option<u32>; 256] {
    let mut byte_tokens = [None; 256];
    for (id, t) in tokens.iter().enumerate() {
        if matches!(
            types[id],
            TokenType::Byte | TokenType::Normal | TokenType::Undefined
        ) {
            if let Some(b) = parse_byte_token(t) {
                let slot = &mut byte_tokens[b as usize];
                if slot.is_none() || types[id] == TokenType::Byte {
                    *slot = Some(id as u32);
                }
            }
        }
    }
    byte_tokens
}

/// Reads `tokenizer.ggml.scores`, one number per token (SentencePiece models need it).
fn token_scores(f: &Meta, n: usize) -> Result<Vec<f32>> {
    let key = "tokenizer.ggml.scores";
    match meta(f, key) {
        None => Err(missing(key, "an array of numbers")),
        Some(v) => per_token(v, key, n, "an array of numbers")?
            .iter()
            .map(|x| {
                x.as_f64()
                    .map(|s| s as f32)
                    .ok_or_else(|| missing(key, "an array of numbers"))
            })
            .collect::<Result<Vec<f32>>>(),
    }
}

/// The end-of-turn id and the sorted stop ids, from metadata ids and control token names.
fn eot_and_stops(
    tokens: &[String],
    types: &[TokenType],
    eos: Option<u32>,
    eot_key: Option<u32>,
    eom: Option<u32>,
) -> (Option<u32>, Vec<u32>) {
    let control_named = |name: &str| {
        tokens
            .iter()
            .position(|t| t == name)
            .filter(|&id| types[id] == TokenType::Control)
            .map(|id| id as u32)
    };
    let eot = eot_key
        .or_else(|| EOT_NAMES.iter().find_map(|n| control_named(n)))
        .or(eos);
    let mut stops: Vec<u32> = [eos, eot_key, eom].into_iter().flatten().collect();
    stops.extend(END_OF_TURN_NAMES.iter().filter_map(|n| control_named(n)));
    stops.extend(eot);
    stops.sort_unstable();
    stops.dedup();
    (eot, stops)
}

/// The encoding model a GGUF vocabulary names, with what each token decodes to.
struct VocabModel {
    model: Model,
    pre_name: Option<String>,
    bytes: Vec<Box<[u8]>>,
    strip_space_prefix: bool,
}

/// What an encoding model is built from: the metadata, each token's text and type, the
/// ids of the normal tokens and of the byte tokens, and the unknown token.
struct VocabParts<'a> {
    f: &'a Meta,
    tokens: &'a [String],
    types: &'a [TokenType],
    normal: hash::FastMap<String, u32>,
    byte_tokens: [Option<u32>; 256],
    unk: Option<u32>,
}

impl VocabModel {
    /// Builds the model that `tokenizer.ggml.model` names, or says why it cannot.
    fn build(model_name: &str, parts: VocabParts<'_>) -> Result<VocabModel> {
        match model_name {
            "gpt2" => VocabModel::gpt2(parts),
            "llama" => VocabModel::llama(parts),
            "none" | "no_vocab" => Err(Error::Tokenizer(
                "the model file has no vocabulary (tokenizer.ggml.model = none)".into(),
            )),
            other => Err(Error::Tokenizer(format!(
                "tokenizer.ggml.model '{other}' is not supported (supported: gpt2, llama)"
            ))),
        }
    }

    /// Builds a byte-level BPE model from `tokenizer.ggml.merges` and `.pre`.
    fn gpt2(p: VocabParts<'_>) -> Result<VocabModel> {
        let merges = req_str_array(p.f, "tokenizer.ggml.merges")?;
        let pre = meta(p.f, "tokenizer.ggml.pre")
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        let pre = bpe::PreTokenizer::for_name(pre)?;
        let pre_name = pre.description.clone();
        let bpe = bpe::ByteBpe::new(
            &merges,
            &|s| p.normal.get(s).copied(),
            &|b| p.byte_tokens[b as usize].or(p.unk),
            pre,
            || p.normal.clone(),
        )?;
        let dec = bpe::ByteDecoder::new();
        let bytes: Vec<Box<[u8]>> = p
            .tokens
            .iter()
            .zip(p.types)
            .map(|(t, ty)| {
                if ty.is_textual() {
                    let mut v = Vec::with_capacity(t.len());
                    dec.decode(t, &mut v);
                    v.into_boxed_slice()
                } else if *ty == TokenType::Byte {
                    byte_token_bytes(t)
                } else {
                    t.as_bytes().into()
                }
            })
            .collect();
        Ok(VocabModel {
            model: Model::Bpe(bpe),
            pre_name: Some(pre_name),
            bytes,
            strip_space_prefix: false,
        })
    }

    /// Builds a SentencePiece-style model from `tokenizer.ggml.scores`.
    fn llama(p: VocabParts<'_>) -> Result<VocabModel> {
        let scores = token_scores(p.f, p.tokens.len())?;
        let add_space_prefix = opt_bool(p.f, "tokenizer.ggml.add_space_prefix").unwrap_or(true);
        let bytes = p
            .tokens
            .iter()
            .zip(p.types)
            .map(|(t, ty)| match ty {
                TokenType::Byte => byte_token_bytes(t),
                TokenType::Normal | TokenType::Undefined => {
                    t.replace(spm::SPACE, " ").into_bytes().into_boxed_slice()
                }
                _ => t.as_bytes().into(),
            })
            .collect();
        let spm = spm::Spm::new(p.normal, scores, p.byte_tokens, p.unk, add_space_prefix);
        Ok(VocabModel {
            model: Model::Spm(spm),
            pre_name: None,
            bytes,
            strip_space_prefix: add_space_prefix,
        })
    }
}

impl Tokenizer {
    /// Builds the tokenizer a GGUF file describes (`tokenizer.ggml.*`).
    pub fn from_gguf(f: &GgufFile) -> Result<Tokenizer> {
        Tokenizer::from_metadata(&f.metadata)
    }

    /// Builds a tokenizer from GGUF-style metadata (`tokenizer.ggml.*` keys).
    pub fn from_metadata(f: &BTreeMap<String, Value>) -> Result<Tokenizer> {
        let model_name = req_str(f, "tokenizer.ggml.model")?.to_string();
        let tokens = req_str_array(f, "tokenizer.ggml.tokens")?;
        let n = tokens.len();
        if n == 0 {
            return Err(Error::Tokenizer("tokenizer.ggml.tokens is empty".into()));
        }
        if n > u32::MAX as usize {
            return Err(Error::Tokenizer(format!(
                "vocabulary of {n} tokens is too large"
            )));
        }
        let types = token_types(f, n)?;
        let bos = opt_id(f, "tokenizer.ggml.bos_token_id", n)?;
        let eos = opt_id(f, "tokenizer.ggml.eos_token_id", n)?;
        let unk = opt_id(f, "tokenizer.ggml.unknown_token_id", n)?;
        let eot_key = opt_id(f, "tokenizer.ggml.eot_token_id", n)?;
        let eom = opt_id(f, "tokenizer.ggml.eom_token_id", n)?;
        let is_spm = model_name == "llama";
        let add_bos = opt_bool(f, "tokenizer.ggml.add_bos_token").unwrap_or(is_spm);
        let add_eos = opt_bool(f, "tokenizer.ggml.add_eos_token").unwrap_or(false);

        let normal = normal_token_ids(&tokens, &types);
        let byte_tokens = byte_token_ids(&tokens, &types);
        let vocab = VocabModel::build(
            &model_name,
            VocabParts {
                f,
                tokens: &tokens,
                types: &types,
                normal,
                byte_tokens,
                unk,
            },
        )?;

        let all_specials = SpecialMatcher::new(&tokens, |id| {
            matches!(
                types[id],
                TokenType::Control | TokenType::UserDefined | TokenType::Unknown
            )
        })?;
        let user_specials = SpecialMatcher::new(&tokens, |id| types[id] == TokenType::UserDefined)?;
        let (eot, stops) = eot_and_stops(&tokens, &types, eos, eot_key, eom);

        let longest_token_bytes = vocab.bytes.iter().map(|b| b.len()).max().unwrap_or(0);
        Ok(Tokenizer {
            model: vocab.model,
            model_name,
            pre_name: vocab.pre_name,
            tokens,
            types,
            bytes: vocab.bytes,
            longest_token_bytes,
            all_specials,
            user_specials,
            bos,
            eos,
            eot,
            stops,
            add_bos,
            add_eos,
            strip_space_prefix: vocab.strip_space_prefix,
        })
    }

    /// Loads a Hugging Face `tokenizer.json`. When a `tokenizer_config.json`
    /// lies beside it, its `bos_token` and `eos_token` name BOS and EOS;
    /// otherwise they are guessed from the special tokens' names.
    ///
    /// Needs the cargo feature `hf-tokenizers` (on by default); without it
    /// this returns an error saying so.
    pub fn from_tokenizer_json(path: &std::path::Path) -> Result<Tokenizer> {
        #[cfg(feature = "hf-tokenizers")]
        return Tokenizer::from_tokenizer_json_impl(path);
        #[cfg(not(feature = "hf-tokenizers"))]
        return Err(Error::Tokenizer(format!(
            "{}: reading tokenizer.json needs kvmerger-text's `hf-tokenizers` feature",
            path.display()
        )));
    }

    #[cfg(feature = "hf-tokenizers")]
    fn from_tokenizer_json_impl(path: &std::path::Path) -> Result<Tokenizer> {
        let text = kvmerger_tensors::files::read_text_file(path, 256 << 20)?;
        let invalid = |e: &dyn std::fmt::Display| {
            Error::Tokenizer(format!(
                "{}: not a valid tokenizer.json: {e}",
                path.display()
            ))
        };
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| invalid(&e))?;
        let tk: tokenizers::Tokenizer = parse_quietly(json)
            .ok_or_else(|| invalid(&"a malformed section (the tokenizers library gave up on it)"))?
            .map_err(|e| invalid(&e))?;
        let vocab = tk.get_vocab(true);
        let n = vocab.values().map(|&id| id as usize + 1).max().unwrap_or(0);
        if n == 0 {
            return Err(Error::Tokenizer(format!(
                "{}: the vocabulary is empty",
                path.display()
            )));
        }
        // The table is indexed by id: ids far beyond the number of tokens (a few holes
        // are normal) would make it huge.
        let limit = (2 * vocab.len()).max(vocab.len() + 1024);
        if n > limit {
            return Err(Error::Tokenizer(format!(
                "{}: token id {} is far beyond the vocabulary's {} tokens (ids must stay below {limit})",
                path.display(),
                n - 1,
                vocab.len()
            )));
        }
        let mut tokens = vec![String::new(); n];
        for (t, &id) in &vocab {
            tokens[id as usize] = t.clone();
        }
        let mut types = vec![TokenType::Normal; n];
        for (&id, added) in tk.get_added_tokens_decoder().iter() {
            if let Some(ty) = types.get_mut(id as usize) {
                *ty = if added.special {
                    TokenType::Control
                } else {
                    TokenType::UserDefined
                };
            }
        }
        let config = path.parent().map(|d| d.join("tokenizer_config.json"));
        let config: Option<serde_json::Value> = config
            .and_then(|p| kvmerger_tensors::files::read_text_file(&p, 64 << 20).ok())
            .and_then(|s| serde_json::from_str(&s).ok());
        let config_token = |key: &str| -> Option<u32> {
            let v = config.as_ref()?.get(key)?;
            let name = v
                .as_str()
                .or_else(|| v.get("content").and_then(|c| c.as_str()))?;
            vocab.get(name).copied()
        };
        let special_named = |names: &[&str]| {
            names.iter().find_map(|n| {
                vocab
                    .get(*n)
                    .copied()
                    .filter(|&id| types[id as usize] == TokenType::Control)
            })
        };
        let bos = config_token("bos_token")
            .or_else(|| special_named(&["<|begin_of_text|>", "<bos>", "<s>"]));
        let eos = config_token("eos_token")
            .or_else(|| special_named(&["<|endoftext|>", "<|end_of_text|>", "<eos>", "</s>"]));
        let eot = special_named(EOT_NAMES).or(eos);
        let mut stops: Vec<u32> = eos.into_iter().chain(eot).collect();
        stops.extend(END_OF_TURN_NAMES.iter().filter_map(|n| special_named(&[n])));
        stops.sort_unstable();
        stops.dedup();
        let add_bos = match (bos, tk.encode("", true)) {
            (Some(b), Ok(enc)) => enc.get_ids().first() == Some(&b),
            _ => false,
        };
        Ok(Tokenizer {
            model: Model::Hf(Box::new(tk)),
            model_name: "tokenizer.json".into(),
            pre_name: None,
            tokens,
            types,
            bytes: Vec::new(),
            all_specials: SpecialMatcher::default(),
            user_specials: SpecialMatcher::default(),
            bos,
            eos,
            eot,
            stops,
            add_bos,
            add_eos: false,
            strip_space_prefix: false,
            longest_token_bytes: 0,
        })
    }

    /// Encodes text; control and user-defined tokens written in the text
    /// become single tokens. With `add_special`, BOS goes in front when the
    /// model asks for it (`tokenizer.ggml.add_bos_token`), unless the text
    /// already starts with it, and EOS at the end when the model asks for that.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        self.encode_with(text, add_special, true)
    }

    /// [`encode`](Self::encode), choosing whether control tokens written in
    /// the text are recognised (`parse_special`); with `false` a user's
    /// `<|im_end|>` is encoded as plain characters. User-defined tokens are
    /// always recognised. (A `tokenizer.json` tokenizer always recognises
    /// its added tokens.)
    pub fn encode_with(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>> {
        self.encode_capped(text, add_special, parse_special, usize::MAX, &[])
    }

    /// A user-defined token: matched in text wherever it is written, as llama.cpp does,
    /// unlike the other special tokens.
    fn is_user_defined(&self, id: u32) -> bool {
        self.token_type(id) == Some(TokenType::UserDefined)
    }

    /// Byte ranges of the control tokens (not the user-defined ones, which are always
    /// recognised) written in `text`, as [`encode`](Self::encode) would match them.
    /// Empty for `tokenizer.json` tokenizers, which match their added tokens
    /// themselves.
    pub fn control_token_ranges(&self, text: &str) -> Vec<std::ops::Range<usize>> {
        let Some(ac) = &self.all_specials.automaton else {
            return Vec::new();
        };
        ac.find_iter(text)
            .filter(|m| !self.is_user_defined(self.all_specials.ids[m.pattern().as_usize()]))
            .map(|m| m.range())
            .collect()
    }

    /// [`encode`](Self::encode) of a text that may be of any size (a request): when it
    /// has more than `limit` tokens, [`Error::ContextOverflow`] (whose `prompt` is a
    /// lower bound) as soon as that is known. Byte-level BPE stops within one
    /// pre-tokenized piece of the limit, so a huge text costs little; other models
    /// first refuse texts too long for any vocabulary (more bytes than `limit` times
    /// the longest token's), then encode and count.
    pub fn encode_within(&self, text: &str, add_special: bool, limit: usize) -> Result<Vec<u32>> {
        self.encode_within_plain(text, add_special, limit, &[])
    }

    /// [`encode_within`](Self::encode_within), except that control tokens starting
    /// inside the byte ranges `plain` are encoded as plain characters: text that a
    /// user wrote inside a rendered conversation
    /// (the engine's `LoadedModel::encode_conversation`).
    pub fn encode_within_plain(
        &self,
        text: &str,
        add_special: bool,
        limit: usize,
        plain: &[std::ops::Range<usize>],
    ) -> Result<Vec<u32>> {
        let longest = self.longest_token_bytes;
        if longest > 0 && text.len() / longest > limit.saturating_add(2) {
            return Err(Error::ContextOverflow {
                prompt: text.len() / longest,
                ctx: limit,
            });
        }
        let ids = self.encode_capped(text, add_special, true, limit, plain)?;
        if ids.len() > limit {
            return Err(Error::ContextOverflow {
                prompt: ids.len(),
                ctx: limit,
            });
        }
        Ok(ids)
    }

    fn encode_capped(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
        limit: usize,
        plain: &[std::ops::Range<usize>],
    ) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity((text.len() / 3 + 2).min(limit.saturating_add(2)));
        #[cfg(feature = "hf-tokenizers")]
        if let Model::Hf(tk) = &self.model {
            let enc = tk
                .encode(text, add_special)
                .map_err(|e| Error::Tokenizer(e.to_string()))?;
            out.extend_from_slice(enc.get_ids());
            self.dedupe_bos(&mut out, add_special);
            return Ok(out);
        }
        if add_special && self.add_bos {
            out.extend(self.bos);
        }
        let specials = if parse_special {
            &self.all_specials
        } else {
            &self.user_specials
        };
        let mut merger = Merger::default();
        let mut last = 0;
        if let Some(ac) = &specials.automaton {
            for m in ac.find_iter(text) {
                let id = specials.ids[m.pattern().as_usize()];
                if plain.iter().any(|r| r.contains(&m.start())) && !self.is_user_defined(id) {
                    // Left in the text: encoded with its neighbours as characters.
                    continue;
                }
                if m.start() > last {
                    self.encode_text(&text[last..m.start()], &mut out, &mut merger, limit)?;
                }
                out.push(id);
                last = m.end();
            }
        }
        if last < text.len() {
            self.encode_text(&text[last..], &mut out, &mut merger, limit)?;
        }
        self.dedupe_bos(&mut out, add_special);
        if add_special && self.add_eos {
            out.extend(self.eos);
        }
        Ok(out)
    }

    /// Drops an added BOS when the text itself started with one (a chat
    /// template that writes `bos_token`).
    fn dedupe_bos(&self, ids: &mut Vec<u32>, add_special: bool) {
        if add_special
            && self.add_bos
            && ids.len() >= 2
            && self.bos.is_some_and(|b| ids[0] == b && ids[1] == b)
        {
            ids.remove(0);
        }
    }

    fn encode_text(
        &self,
        text: &str,
        out: &mut Vec<u32>,
        merger: &mut Merger,
        limit: usize,
    ) -> Result<()> {
        match &self.model {
            Model::Bpe(b) => b.encode(text, out, merger, limit),
            Model::Spm(s) => s.encode(text, out, merger),
            #[cfg(feature = "hf-tokenizers")]
            Model::Hf(_) => Err(Error::Tokenizer(
                "internal: tokenizer.json models encode whole".into(),
            )),
        }
    }

    /// Decodes ids to text, control tokens included as their text. Ids
    /// outside the vocabulary are skipped; bytes that do not form UTF-8
    /// become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.decode_impl(ids, false)
    }

    /// [`decode`](Self::decode) without control tokens (BOS, `<|im_end|>`, …).
    pub fn decode_skip_special(&self, ids: &[u32]) -> String {
        self.decode_impl(ids, true)
    }

    fn decode_impl(&self, ids: &[u32], skip_special: bool) -> String {
        #[cfg(feature = "hf-tokenizers")]
        if let Model::Hf(tk) = &self.model {
            let ids: Vec<u32> = ids
                .iter()
                .copied()
                .filter(|&id| (id as usize) < self.tokens.len())
                .collect();
            return tk.decode(&ids, skip_special).unwrap_or_default();
        }
        let mut buf = Vec::with_capacity(ids.len() * 4);
        let mut first_text = true;
        for &id in ids {
            let Some(bytes) = self.bytes.get(id as usize) else {
                continue;
            };
            let ty = self.types[id as usize];
            if ty == TokenType::Control {
                if !skip_special {
                    buf.extend_from_slice(bytes);
                }
                continue;
            }
            let mut bytes = &bytes[..];
            if first_text && self.strip_space_prefix && ty.is_textual() {
                bytes = bytes.strip_prefix(b" ").unwrap_or(bytes);
            }
            first_text = false;
            buf.extend_from_slice(bytes);
        }
        match String::from_utf8(buf) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        }
    }

    /// The bytes one token decodes to (GGUF tokenizers), or `None` for an id
    /// outside the vocabulary or a `tokenizer.json` tokenizer.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.bytes.get(id as usize).map(|b| &b[..])
    }

    /// A streaming decoder over this tokenizer.
    pub fn detokenizer(&self) -> Detokenizer<'_> {
        Detokenizer::new(self)
    }

    /// The beginning-of-sequence token.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// The end-of-sequence token.
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// The token that ends a chat turn: `tokenizer.ggml.eot_token_id`, else
    /// the first of `<|im_end|>`, `<end_of_turn>`, `<|eot_id|>`, `<|end|>`
    /// that is a control token, else EOS.
    pub fn eot(&self) -> Option<u32> {
        self.eot
    }

    /// Every token that ends generation, sorted: EOS, EOT, EOM and the
    /// control tokens named like an end of turn or of text (`<|im_end|>`,
    /// `<|endoftext|>`, `<end_of_turn>`, `<|eot_id|>`, …).
    pub fn stop_ids(&self) -> &[u32] {
        &self.stops
    }

    /// Whether `id` ends generation (see [`stop_ids`](Self::stop_ids)).
    pub fn is_stop(&self, id: u32) -> bool {
        self.stops.binary_search(&id).is_ok()
    }

    /// Whether [`encode`](Self::encode) with `add_special` puts BOS in front.
    pub fn adds_bos(&self) -> bool {
        self.add_bos
    }

    /// The number of token ids.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// A token's text as the vocabulary stores it (byte-level BPE tokens in
    /// their printable spelling, SentencePiece tokens with `▁`).
    pub fn token_str(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// The id of the token stored as `text` (a linear search: for setup, not
    /// for loops).
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.tokens.iter().position(|t| t == text).map(|i| i as u32)
    }

    /// A token's type, `None` for an id outside the vocabulary.
    pub fn token_type(&self, id: u32) -> Option<TokenType> {
        self.types.get(id as usize).copied()
    }

    /// Whether `id` is a control token.
    pub fn is_control(&self, id: u32) -> bool {
        self.token_type(id) == Some(TokenType::Control)
    }

    /// `gpt2`, `llama` (from GGUF) or `tokenizer.json`.
    pub fn model_kind(&self) -> &str {
        &self.model_name
    }

    /// For byte-level BPE, the pre-tokenizer in use: `gpt2`, `digits+gpt2`,
    /// `qwen2`, `llama3`, or `gpt2 (for unknown 'NAME')`.
    pub fn pre_tokenizer(&self) -> Option<&str> {
        self.pre_name.as_deref()
    }

    fn is_hf(&self) -> bool {
        #[cfg(feature = "hf-tokenizers")]
        if let Model::Hf(_) = self.model {
            return true;
        }
        false
    }
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("model", &self.model_name)
            .field("pre", &self.pre_name)
            .field("vocab_size", &self.tokens.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("stops", &self.stops)
            .finish()
    }
}

/// Decodes generated ids one at a time, returning text as soon as it is
/// complete UTF-8 (a byte-level token can end inside a character).
///
/// Unlike [`Tokenizer::decode`], no leading space is stripped: the text
/// continues what came before.
pub struct Detokenizer<'a> {
    tok: &'a Tokenizer,
    skip_special: bool,
    pending: Vec<u8>,
    // tokenizer.json: ids since `prefix`, of which those before `read` have
    // been returned.
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl<'a> Detokenizer<'a> {
    pub fn new(tok: &'a Tokenizer) -> Detokenizer<'a> {
        Detokenizer {
            tok,
            skip_special: false,
            pending: Vec::new(),
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }

    /// Leave control tokens out of the text.
    pub fn skip_special(mut self, skip: bool) -> Self {
        self.skip_special = skip;
        self
    }

    /// Adds one id; returns the text that became complete, if any. Ids
    /// outside the vocabulary are ignored.
    pub fn push(&mut self, id: u32) -> Option<String> {
        if (id as usize) >= self.tok.vocab_size() || (self.skip_special && self.tok.is_control(id))
        {
            return None;
        }
        if self.tok.is_hf() {
            return self.push_hf(id);
        }
        self.pending.extend_from_slice(self.tok.token_bytes(id)?);
        let text = take_utf8(&mut self.pending);
        (!text.is_empty()).then_some(text)
    }

    /// Returns whatever is held back (an incomplete character becomes
    /// U+FFFD) and resets.
    pub fn flush(&mut self) -> Option<String> {
        let text = if self.tok.is_hf() {
            let (done, all) = self.hf_window();
            all.get(done.len()..).unwrap_or_default().to_string()
        } else {
            String::from_utf8_lossy(&self.pending).into_owned()
        };
        self.pending.clear();
        self.ids.clear();
        self.prefix = 0;
        self.read = 0;
        (!text.is_empty()).then_some(text)
    }

    /// tokenizer.json: the text of the ids since `prefix` already returned (those before
    /// `read`), and of all of them.
    fn hf_window(&self) -> (String, String) {
        let done = self
            .tok
            .decode_impl(&self.ids[self.prefix..self.read], self.skip_special);
        let all = self
            .tok
            .decode_impl(&self.ids[self.prefix..], self.skip_special);
        (done, all)
    }

    fn push_hf(&mut self, id: u32) -> Option<String> {
        self.ids.push(id);
        let (done, all) = self.hf_window();
        if all.len() <= done.len() || all.ends_with('\u{fffd}') {
            return None;
        }
        let new = all.get(done.len()..)?.to_string();
        self.prefix = self.read;
        self.read = self.ids.len();
        // Keep the window short: ids before `prefix` are no longer needed.
        if self.prefix > 0 {
            self.ids.drain(..self.prefix);
            self.read -= self.prefix;
            self.prefix = 0;
        }
        Some(new)
    }
}

/// Removes and returns the longest prefix of `buf` that is complete UTF-8;
/// invalid sequences become U+FFFD, an incomplete character at the end stays.
fn take_utf8(buf: &mut Vec<u8>) -> String {
    let mut out = String::new();
    let mut pos = 0;
    loop {
        match std::str::from_utf8(&buf[pos..]) {
            Ok(s) => {
                out.push_str(s);
                pos = buf.len();
                break;
            }
            Err(e) => {
                let valid = e.valid_up_to();
                out.push_str(&String::from_utf8_lossy(&buf[pos..pos + valid]));
                match e.error_len() {
                    Some(bad) => {
                        out.push('\u{fffd}');
                        pos += valid + bad;
                    }
                    None => {
                        pos += valid;
                        break;
                    }
                }
            }
        }
    }
    buf.drain(..pos);
    out
}

/// Deserializes a tokenizer.json value. The `tokenizers` library panics on some
/// malformed sections (a decoder with unknown fields, found by fuzzing); such a
/// panic is caught and silenced here and reported as `None`.
#[cfg(feature = "hf-tokenizers")]
fn parse_quietly(
    json: serde_json::Value,
) -> Option<std::result::Result<tokenizers::Tokenizer, serde_json::Error>> {
    static QUIET: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = QUIET.lock().unwrap_or_else(|e| e.into_inner());
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let got = std::panic::catch_unwind(move || serde_json::from_value(json));
    std::panic::set_hook(hook);
    got.ok()
}
