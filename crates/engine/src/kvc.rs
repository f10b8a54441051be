//! The compressed-context file (`.kvc`): a sequence's compressed cache with what it
//! takes to continue it, so a document read and compressed once can be asked anything
//! later, by another process or another machine.
//!
//! Layout (integers little-endian):
//!
//! | bytes | what |
//! |---|---|
//! | 8 | magic `KVCTX\0v1` |
//! | 4 | header length `h` |
//! | h | header, JSON: format version, the model's fingerprint and name, the recipe (method, options, budget, schedule), the protocol, the cache's shape and storage type, token count, where compression ended, per-layer targets, and any caller's fields |
//! | 4 × tokens | the token ids the cache covers |
//! | per (layer, KV head), layer-major | [`HeadStore::write_bytes`]: slot count, per-slot metadata (position, merge count, scores, logit bias), keys and values in the storage type (f16, f32, q8_0) |
//! | 32 | SHA-256 of everything before it |
//!
//! Reading checks, in this order, and names what failed: the magic and the version,
//! the checksum (a truncated or corrupted file), the model's fingerprint (a cache is
//! never applied to another model), the shapes, then every head. Reading is one pass
//! over the bytes: the checksum, then a copy of each head's slots.

use crate::cache::KvCache;
use crate::compressor::Compressor;
use crate::load::LoadedModel;
use crate::sequence::Sequence;
use crate::Error;
use kvmerger_compression::recipe::Value as RecipeValue;
use kvmerger_compression::{HeadStore, KvDtype, Recipe, Schedule, ScheduleFiles};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::Arc;

pub const MAGIC: &[u8; 8] = b"KVCTX\0v1";
pub const VERSION: u64 = 1;
/// Largest header read (a header is a few hundred bytes; this bounds a hostile one).
const MAX_HEADER: usize = 1 << 20;

/// Why a compressed context could not be read.
#[derive(Debug, thiserror::Error)]
pub enum KvcError {
    #[error("not a compressed-context file (wrong magic bytes)")]
    Magic,
    #[error("format version {0} is not one this build reads (it reads version {VERSION})")]
    Version(u64),
    #[error("checksum mismatch: the file is truncated or corrupted")]
    Checksum,
    #[error("made for another model (fingerprint {found}, this model's is {want})")]
    Model { found: String, want: String },
    #[error("{0}")]
    Invalid(String),
}

impl From<KvcError> for Error {
    fn from(e: KvcError) -> Error {
        Error::Invalid(format!("compressed context: {e}"))
    }
}

/// What a compressed-context file says about itself (its header).
#[derive(Clone, Debug, PartialEq)]
pub struct KvcHeader {
    pub version: u64,
    pub fingerprint: String,
    pub model: String,
    pub recipe: Recipe,
    pub protocol: String,
    pub dtype: KvDtype,
    pub n_layers: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub tokens: usize,
    pub compressed_end: usize,
    pub protect: usize,
    pub targets: Vec<usize>,
    /// Bytes of the compressed cache, and of the same tokens uncompressed.
    pub kv_bytes: usize,
    pub kv_bytes_full: usize,
    pub slots: usize,
    /// Seconds since the epoch when it was written.
    pub created: u64,
    /// Fields a caller added (the server's messages for a context handle).
    pub extra: Value,
    /// The whole header as written.
    pub json: Value,
}

fn recipe_json(r: &Recipe) -> Value {
    let options: BTreeMap<&str, &str> = r
        .options
        .keys()
        .map(|k| (k, r.options.get(k).unwrap_or_default()))
        .collect();
    let schedule = match &r.schedule {
        Schedule::Uniform => json!("uniform"),
        Schedule::Pyramid { beta } => json!(format!("pyramid:{beta}")),
        Schedule::File(ratios) => json!(ratios),
    };
    json!({
        "text": r.to_string(),
        "method": r.method,
        "options": options,
        "budget": r.budget.map(|_| r.budget_text()),
        "schedule": schedule,
        "recompress_margin": r.recompress_margin,
        "prefill_chunk": r.prefill_chunk,
    })
}

fn recipe_from_json(v: &Value) -> Result<Recipe, KvcError> {
    let bad = |m: String| KvcError::Invalid(format!("header recipe: {m}"));
    let method = v
        .get("method")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("no method".into()))?;
    let mut r = Recipe::full();
    let mut map: BTreeMap<String, RecipeValue> = BTreeMap::new();
    map.insert("method".into(), RecipeValue::Str(method.into()));
    if let Some(b) = v.get("budget").and_then(Value::as_str) {
        map.insert("budget".into(), RecipeValue::Str(b.into()));
    }
    for key in ["recompress_margin", "prefill_chunk"] {
        if let Some(n) = v.get(key).and_then(Value::as_u64) {
            map.insert(key.into(), RecipeValue::Int(n as i64));
        }
    }
    if let Some(o) = v.get("options").and_then(Value::as_object) {
        let mut opts = BTreeMap::new();
        for (k, val) in o {
            let s = val
                .as_str()
                .ok_or_else(|| bad(format!("option {k} is not a string")))?;
            opts.insert(k.clone(), RecipeValue::Str(s.into()));
        }
        map.insert("options".into(), RecipeValue::Map(opts));
    }
    match v.get("schedule") {
        Some(Value::String(s)) => {
            map.insert("schedule".into(), RecipeValue::Str(s.clone()));
        }
        Some(Value::Array(a)) => {
            let ratios = a
                .iter()
                .map(|x| {
                    x.as_f64()
                        .ok_or_else(|| bad("a schedule ratio is not a number".into()))
                })
                .collect::<Result<Vec<f64>, _>>()?;
            r.schedule = Schedule::File(ratios);
        }
        _ => {}
    }
    r.apply(&map, ScheduleFiles::Refuse)
        .map_err(|e| bad(format!("{}: {}", e.field, e.message)))?;
    Ok(r)
}

fn dtype_name(d: KvDtype) -> &'static str {
    match d {
        KvDtype::F16 => "f16",
        KvDtype::F32 => "f32",
        KvDtype::Q8_0 => "q8_0",
    }
}

/// The file's bytes for `seq`, a sequence of the model `lm`, cut back to where its
/// compression ended (what a later question appends to). `extra` is kept in the
/// header as given.
pub fn encode(seq: &Sequence, lm: &LoadedModel, protocol: &str, extra: Value) -> Vec<u8> {
    let mut seq = seq.clone();
    let end = seq.compressed_end();
    if end > 0 && end < seq.tokens().len() {
        // Always possible: nothing before the compressed end is cut.
        let _ = seq.truncate(end);
    }
    let cache = &seq.cache;
    let (n_layers, n_kv) = (
        cache.layers.len(),
        cache.layers.first().map_or(0, |l| l.len()),
    );
    let head_dim = cache
        .layers
        .first()
        .and_then(|l| l.first())
        .map_or(0, |h| h.dim());
    let header = json!({
        "format": "kvmerger compressed context",
        "version": VERSION,
        "model": {"fingerprint": lm.fingerprint, "name": lm.name},
        "recipe": recipe_json(&seq.compressor().recipe()),
        "protocol": protocol,
        "kv": {
            "dtype": dtype_name(cache.dtype),
            "n_layers": n_layers,
            "n_kv_heads": n_kv,
            "head_dim": head_dim,
            "slots": cache.total_slots(),
            "bytes": cache.bytes(),
            "bytes_full": seq.tokens().len() * cache.token_bytes(),
        },
        "tokens": seq.tokens().len(),
        "compressed_end": seq.compressed_end(),
        "protect": seq.protected(),
        "targets": seq.targets(),
        "created": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        "extra": extra,
    })
    .to_string();
    let heads: usize = cache
        .layers
        .iter()
        .flatten()
        .map(|h| HeadStore::serialized_len(h.dim(), h.dtype(), h.len()))
        .sum();
    let mut out = Vec::with_capacity(12 + header.len() + 4 * seq.tokens().len() + heads + 32);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for t in seq.tokens() {
        out.extend_from_slice(&t.to_le_bytes());
    }
    for h in cache.layers.iter().flatten() {
        h.write_bytes(&mut out);
    }
    let sum = Sha256::digest(&out);
    out.extend_from_slice(&sum);
    out
}

/// The header, after the magic, version and checksum are checked; with the offset
/// where the token ids start.
pub fn read_header(bytes: &[u8]) -> Result<(KvcHeader, usize), KvcError> {
    parse_header(bytes, true)
}

/// The header from the first bytes of a file (the first [`HEADER_PEEK`] are enough),
/// without the checksum, which needs the whole file: for listing what a store holds.
/// Whatever is used must be read with [`decode`], which checks it.
pub fn peek_header(prefix: &[u8]) -> Result<KvcHeader, KvcError> {
    parse_header(prefix, false).map(|h| h.0)
}

/// Bytes enough for [`peek_header`] on any file this build writes.
pub const HEADER_PEEK: usize = MAX_HEADER + 12;

fn parse_header(bytes: &[u8], check: bool) -> Result<(KvcHeader, usize), KvcError> {
    if bytes.len() < MAGIC.len() + 4 || &bytes[..MAGIC.len()] != MAGIC {
        return Err(KvcError::Magic);
    }
    let hlen = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize;
    let need = if check { 12 + hlen + 32 } else { 12 + hlen };
    if hlen > MAX_HEADER || need > bytes.len() {
        return Err(KvcError::Checksum);
    }
    let json: Value =
        serde_json::from_slice(&bytes[12..12 + hlen]).map_err(|_| KvcError::Checksum)?;
    let version = json.get("version").and_then(Value::as_u64).unwrap_or(0);
    if version != VERSION {
        return Err(KvcError::Version(version));
    }
    if check {
        let (body, sum) = bytes.split_at(bytes.len() - 32);
        if Sha256::digest(body).as_slice() != sum {
            return Err(KvcError::Checksum);
        }
    }
    let bad = |m: &str| KvcError::Invalid(format!("header: {m}"));
    let num = |v: &Value, k: &str| -> Result<usize, KvcError> {
        v.get(k)
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .ok_or_else(|| bad(&format!("'{k}' is missing")))
    };
    let kv = json.get("kv").ok_or_else(|| bad("'kv' is missing"))?;
    let dtype: KvDtype = kv
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("'kv.dtype' is missing"))?
        .parse()
        .map_err(|e: String| bad(&e))?;
    let h = KvcHeader {
        version,
        fingerprint: json["model"]["fingerprint"]
            .as_str()
            .ok_or_else(|| bad("'model.fingerprint' is missing"))?
            .to_string(),
        model: json["model"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        recipe: recipe_from_json(
            json.get("recipe")
                .ok_or_else(|| bad("'recipe' is missing"))?,
        )?,
        protocol: json["protocol"].as_str().unwrap_or("agnostic").to_string(),
        dtype,
        n_layers: num(kv, "n_layers")?,
        n_kv_heads: num(kv, "n_kv_heads")?,
        head_dim: num(kv, "head_dim")?,
        kv_bytes: num(kv, "bytes")?,
        kv_bytes_full: num(kv, "bytes_full")?,
        slots: num(kv, "slots")?,
        tokens: num(&json, "tokens")?,
        compressed_end: num(&json, "compressed_end")?,
        protect: num(&json, "protect")?,
        targets: json["targets"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_u64().map(|x| x as usize))
                    .collect()
            })
            .unwrap_or_default(),
        created: json["created"].as_u64().unwrap_or(0),
        extra: json.get("extra").cloned().unwrap_or(Value::Null),
        json,
    };
    if h.compressed_end > h.tokens || h.protect > h.tokens {
        return Err(bad("compressed_end or protect past the tokens"));
    }
    Ok((h, 12 + hlen))
}

/// The sequence in `bytes`, for the model `lm`, with its recipe's compressor: ready to
/// be appended a question. Refuses a file of another model, version or shape, and any
/// corruption (see the module's page).
pub fn decode(bytes: &[u8], lm: &LoadedModel) -> Result<(Sequence, KvcHeader), KvcError> {
    let (h, mut at) = read_header(bytes)?;
    if h.fingerprint != lm.fingerprint {
        return Err(KvcError::Model {
            found: h.fingerprint.chars().take(12).collect(),
            want: lm.fingerprint.chars().take(12).collect(),
        });
    }
    let cfg = &lm.model.cfg;
    if (h.n_layers, h.n_kv_heads, h.head_dim) != (cfg.n_layers, cfg.n_kv_heads, cfg.head_dim) {
        return Err(KvcError::Invalid(format!(
            "a cache of {} layers x {} KV heads x {} does not fit this model",
            h.n_layers, h.n_kv_heads, h.head_dim
        )));
    }
    if h.tokens > cfg.ctx_len {
        return Err(KvcError::Invalid(format!(
            "{} tokens are more than the model's context of {}",
            h.tokens, cfg.ctx_len
        )));
    }
    let end = bytes.len() - 32;
    let ids_end = at
        .checked_add(4 * h.tokens)
        .filter(|&e| e <= end)
        .ok_or_else(|| KvcError::Invalid("the token ids run past the file".into()))?;
    let tokens: Vec<u32> = bytes[at..ids_end]
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    if let Some(&t) = tokens.iter().find(|&&t| t as usize >= cfg.vocab) {
        return Err(KvcError::Invalid(format!(
            "token id {t} is outside the vocabulary"
        )));
    }
    at = ids_end;
    let mut cache = KvCache::new(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, h.dtype);
    for layer in cache.layers.iter_mut() {
        for head in layer.iter_mut() {
            let (store, used) =
                HeadStore::read_bytes(cfg.head_dim, h.dtype, h.tokens, &bytes[at..end])
                    .map_err(|e| KvcError::Invalid(e.to_string()))?;
            *head = store;
            at += used;
        }
    }
    if at != end {
        return Err(KvcError::Invalid(format!(
            "{} bytes after the last head",
            end - at
        )));
    }
    cache.n_seen = h.tokens;
    let compressor = Compressor::from_recipe(&h.recipe)
        .map_err(|e| KvcError::Invalid(format!("header recipe: {e}")))?;
    let seq = Sequence::restore(
        Arc::new(compressor),
        cache,
        tokens,
        h.compressed_end,
        h.targets.clone(),
        h.protect,
    )
    .map_err(|e| KvcError::Invalid(e.to_string()))?;
    Ok((seq, h))
}

/// Reads a compressed-context file of at most `limit` bytes (regular files only).
pub fn read_file(path: &std::path::Path, limit: u64) -> Result<Vec<u8>, Error> {
    kvmerger_tensors::files::read_file(path, limit)
}
