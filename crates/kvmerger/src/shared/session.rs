//! A model loaded (fetched on first use) and a sequence prefilled, compressed and
//! decoded as every command does it; a saved context loaded from its file.

use super::progress::Bar;
use super::recipe::{mib, report};
use crate::cli::{ModelArgs, SamplingArgs};
use anyhow::{bail, Context, Result};
use kvmerger_assets::{self as assets, ModelSource, Progress};
use kvmerger_compression::KvDtype;
use kvmerger_engine::compressor::Compressor;
use kvmerger_engine::generate::{GenerateParams, Generation};
use kvmerger_engine::kvc;
use kvmerger_engine::load::LoadedModel;
use kvmerger_engine::sampling::SamplingParams;
use kvmerger_engine::sequence::Sequence;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Resolve, fetching on first use, and load a model with a spinner.
pub fn load_model(m: &ModelArgs, dir: &std::path::Path) -> Result<(LoadedModel, KvDtype)> {
    let dtype: KvDtype = m.kv_dtype.parse().map_err(anyhow::Error::msg)?;
    let precision: kvmerger_engine::precision::Precision = m
        .precision_or(crate::cli::DEFAULT_PRECISION)
        .parse()
        .map_err(anyhow::Error::msg)?;
    let bar = Bar::new();
    let src = assets::resolve_model(&m.model, dir, &bar);
    let path: PathBuf = match src {
        Ok(ModelSource::Gguf(p)) | Ok(ModelSource::HfDir(p)) => p,
        Err(e) => {
            bar.finish();
            return Err(e.into());
        }
    };
    bar.stage(&format!("loading {}", path.display()));
    let loaded = LoadedModel::open(&path);
    bar.finish();
    let mut loaded = loaded.with_context(|| format!("loading model {}", path.display()))?;
    loaded.model.precision = precision;
    // A scorer the user trained for this model replaces the one shipped.
    let trained = scorer_path(dir, &loaded.fingerprint);
    if trained.is_file() {
        loaded.attach_scorer(&trained)?;
    }
    Ok((loaded, dtype))
}

/// Where a scorer trained for the model with fingerprint `fp` lives in the data directory.
pub fn scorer_path(dir: &Path, fp: &str) -> PathBuf {
    dir.join("scorers").join(format!("{fp}.kvzap"))
}

pub fn sampling(s: &SamplingArgs) -> Result<GenerateParams> {
    let sampling = SamplingParams {
        temperature: s.temperature,
        top_k: s.top_k,
        top_p: s.top_p,
        repetition_penalty: s.repeat_penalty,
        repeat_last_n: 64,
        seed: s.seed,
        ..SamplingParams::default()
    };
    sampling.validate()?;
    if s.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    Ok(GenerateParams {
        max_tokens: s.max_tokens,
        sampling,
        stop: s
            .stop
            .iter()
            .map(|x| super::text::unescape(x))
            .collect::<Result<_>>()?,
        ignore_eos: s.ignore_eos,
    })
}

/// Prefill `ids` and compress them with `comp` (the sequence runs whatever pass the
/// method needs), reporting what compression did. The first `protect` tokens are the
/// chat template's opening. Returns the sequence and the prefill time.
pub fn compressed_sequence(
    lm: &LoadedModel,
    comp: &Arc<Compressor>,
    dtype: KvDtype,
    ids: &[u32],
    protect: usize,
) -> Result<(Sequence, f64)> {
    let mut seq = Sequence::new(&lm.model, dtype, comp.clone());
    seq.protect(protect);
    let done = seq.feed_context(lm, ids)?;
    let r = &done.compress;
    if r.pass_secs > 0.0 {
        eprintln!(
            "[{}] reconstruction pass: {:.2}s ({:.2}x the prefill)",
            r.method,
            r.pass_secs,
            r.pass_secs / done.prefill_s.max(1e-9)
        );
    }
    if !r.method.is_empty() {
        report(r, done.prefill_s);
    }
    if seq.prefill_passes() > 0 {
        eprintln!(
            "[{}] compressed during prefill: {} passes, peak KV cache {:.2} MiB",
            r.method,
            seq.prefill_passes(),
            mib(seq.peak_kv_bytes())
        );
    }
    Ok((seq, done.prefill_s))
}

/// Decode from `seq`'s last logits, re-compressing past the budget when its recipe
/// has a margin.
pub fn decode_sequence(
    lm: &LoadedModel,
    seq: &mut Sequence,
    params: &GenerateParams,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<Generation> {
    let gen = seq.generate(&lm.model, &lm.tokenizer, params, on_text)?;
    if seq.decode_passes() > 0 {
        eprintln!(
            "[{}] re-compressed {} times while decoding",
            seq.compressor().name(),
            seq.decode_passes()
        );
    }
    Ok(gen)
}

/// The largest compressed-context file read (a whole 32k-token cache of a 7B model in
/// f32 is about 16 GiB).
pub const MAX_KVC_BYTES: u64 = 16 << 30;

/// The compressed context saved in `path`, for `lm` (refusing another model's), and
/// its header.
pub fn load_kvc(
    path: &Path,
    lm: &LoadedModel,
    dtype: KvDtype,
) -> Result<(Sequence, kvc::KvcHeader)> {
    let bytes = kvc::read_file(path, MAX_KVC_BYTES)?;
    let (seq, h) =
        kvc::decode(&bytes, lm).with_context(|| format!("reading {}", path.display()))?;
    if h.dtype != dtype {
        eprintln!(
            "note: {} stores its cache as {:?}; it is used as stored (--kv-dtype applies to new caches)",
            path.display(),
            h.dtype
        );
    }
    Ok((seq, h))
}
