//! KVzip's context reconstruction pass (arXiv 2505.23416): after the context is
//! prefilled, the model is asked to repeat it and fed it again, teacher-forced, chunk
//! by chunk; every context slot scores the largest attention any query of that pass
//! gave it (over the query heads of its group). The pass's tokens are appended to the
//! cache only while a chunk runs and are cut off after it: nothing of it is kept.
//!
//! Each chunk's pass attends over the whole context, as the paper's code does. A
//! popular reimplementation (kvpress's `KVzipPress`) restricts each chunk's softmax to
//! the chunk, the first slots and the pass's own tokens, which makes the pass cost
//! about one prefill instead of growing with the context; measured on qwen2.5-0.5b at
//! 4k (docs/results.md, dev split), that restriction lost 6 of 10 paired NIAH samples
//! against whole-context attention and won 1, so the whole context it is (the pass
//! then costs about 1.5 prefills at 4k). The pass runs on a copy of the cache, so the
//! context's cache is never touched. Each slot is scored by the pass over its own
//! chunk. The template's opening (system prompt, user header) is not repeated; its
//! slots score infinity (always kept).

use crate::cache::{KvCache, PrefillStats};
use crate::model::{Logits, Model};
use crate::prompt::RepeatPrompts;
pub use crate::prompt::CHUNK;
use crate::Error;
use kvmerger_compression::StatsNeeds;

/// Fills `stats`' reconstruction scores for `cache`, which must hold exactly `tokens`
/// uncompressed; the first `protect` tokens are kept whatever they score.
pub fn reconstruction_scores(
    model: &Model,
    cache: &KvCache,
    tokens: &[u32],
    protect: usize,
    prompts: &RepeatPrompts,
    stats: &mut PrefillStats,
    cancel: Option<&crate::Cancel>,
) -> Result<(), Error> {
    let n0 = cache.n_seen;
    if tokens.len() != n0 || cache.layers.iter().flatten().any(|h| h.len() != n0) {
        return Err(Error::Invalid(
            "KVzip scores a cache before any compression, holding exactly the prompt's tokens"
                .into(),
        ));
    }
    let longest_prompt = prompts
        .first
        .len()
        .max(prompts.later.len() + prompts.overlap)
        + prompts.suffix.len();
    let room = model.cfg.ctx_len.saturating_sub(n0 + longest_prompt);
    let chunk = prompts.chunk.max(1).min(room);
    let body = &tokens[protect.min(n0)..];
    if chunk < prompts.chunk.min(16) && !body.is_empty() {
        return Err(Error::ContextOverflow {
            prompt: n0 + longest_prompt + body.len().min(prompts.chunk),
            ctx: model.cfg.ctx_len,
        });
    }
    let (n_layers, n_kv) = (cache.layers.len(), cache.layers[0].len());
    let mut scores = vec![vec![vec![f32::INFINITY; n0]; n_kv]; n_layers];
    let first = protect.min(n0);
    let mut s = first;
    while s < n0 {
        let e = (s + chunk).min(n0);
        let mut input = if s == first {
            prompts.first.clone()
        } else {
            let mut v = prompts.later.clone();
            v.extend_from_slice(&tokens[s.saturating_sub(prompts.overlap).max(first)..s]);
            v
        };
        input.extend_from_slice(&prompts.suffix);
        input.extend_from_slice(&tokens[s..e]);
        let mut pass_cache = cache.clone();
        let mut pass = PrefillStats::default();
        let needs = StatsNeeds {
            reconstruction: true,
            ..Default::default()
        };
        model.forward_within(
            &input,
            &mut pass_cache,
            needs,
            Some(&mut pass),
            Logits::None,
            cancel,
        )?;
        drop(pass_cache);
        for (l, layer) in pass.heads.iter().enumerate() {
            for (g, head) in layer.iter().enumerate() {
                let peak = head.reconstruction.as_deref().unwrap_or(&[]);
                for (j, out) in scores[l][g][s..e].iter_mut().enumerate() {
                    *out = peak.get(s + j).copied().unwrap_or(0.0);
                }
            }
        }
        s = e;
    }
    if stats.heads.len() != n_layers {
        stats.heads = vec![vec![Default::default(); n_kv]; n_layers];
    }
    for (l, layer) in scores.into_iter().enumerate() {
        for (g, v) in layer.into_iter().enumerate() {
            stats.heads[l][g].reconstruction = Some(v);
        }
    }
    Ok(())
}
