//! The decode loop: sample, append, stream text, stop.

use crate::cache::KvCache;
use crate::compress::DecodeCompression;
use crate::model::{Logits, Model};
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::{Detokenizer, Tokenizer};
use crate::Error;
use kvmerger_compression::StatsNeeds;
use std::time::Instant;

#[derive(Clone, Debug, PartialEq)]
pub struct GenerateParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops when the text ends with one of these; it is not included in the output.
    pub stop: Vec<String>,
    /// Keep going past end-of-sequence tokens (for benchmarks and tests of long decodes).
    pub ignore_eos: bool,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            max_tokens: 128,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            ignore_eos: false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The model emitted an end-of-sequence or end-of-turn token.
    Eos,
    StopString,
    MaxTokens,
    /// The context window is full.
    Context,
    /// The callback asked to stop.
    Cancelled,
}

#[derive(Clone, Debug)]
pub struct Generation {
    pub text: String,
    pub tokens: Vec<u32>,
    pub stop: StopReason,
    pub decode_secs: f64,
}

/// Generate from `logits` (the prompt's last-position logits, after prefill and any
/// compression) until a stop condition. `on_text` receives text as it becomes final and
/// returns false to cancel.
pub fn decode(
    model: &Model,
    tok: &Tokenizer,
    cache: &mut KvCache,
    logits: Vec<f32>,
    prompt: &[u32],
    params: &GenerateParams,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<Generation, Error> {
    decode_with(model, tok, cache, logits, prompt, params, None, on_text)
}

/// [`decode`], re-compressing the cache whenever it passes its budget by a margin.
#[allow(clippy::too_many_arguments)]
pub fn decode_with(
    model: &Model,
    tok: &Tokenizer,
    cache: &mut KvCache,
    mut logits: Vec<f32>,
    prompt: &[u32],
    params: &GenerateParams,
    mut compression: Option<&mut DecodeCompression<'_>>,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<Generation, Error> {
    let mut sampler = Sampler::new(params.sampling.clone())?;
    let stops = tok.stop_ids();
    let mut history = prompt.to_vec();
    let mut detok = Detokenizer::new(tok);
    let mut text = String::new();
    // Text not yet passed to `on_text` because it could be the start of a stop string.
    let mut emitted = 0usize;
    let hold = params.stop.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut tokens = Vec::new();
    let t0 = Instant::now();
    let mut reason = StopReason::MaxTokens;
    let mut cancelled = false;
    while tokens.len() < params.max_tokens {
        let next = sampler.sample(&mut logits, &history);
        if !params.ignore_eos && stops.contains(&next) {
            reason = StopReason::Eos;
            break;
        }
        tokens.push(next);
        history.push(next);
        if let Some(piece) = detok.push(next) {
            text.push_str(&piece);
        }
        if let Some(cut) = find_stop(&text, &params.stop, emitted) {
            text.truncate(cut);
            reason = StopReason::StopString;
            break;
        }
        let safe = safe_boundary(
            &text,
            text.len()
                .saturating_sub(hold.saturating_sub(1))
                .max(emitted),
        );
        if safe > emitted {
            if !on_text(&text[emitted..safe]) {
                cancelled = true;
            }
            emitted = safe;
        }
        if cancelled {
            reason = StopReason::Cancelled;
            break;
        }
        if tokens.len() == params.max_tokens {
            break;
        }
        if cache.n_seen + 1 > model.cfg.ctx_len {
            reason = StopReason::Context;
            break;
        }
        match compression.as_deref_mut() {
            Some(dc) => {
                let needs = dc.needs();
                logits = model.forward(&[next], cache, needs, Some(&mut dc.stats), Logits::Last)?;
                dc.after_step(cache)?;
            }
            None => {
                logits = model.forward(&[next], cache, StatsNeeds::default(), None, Logits::Last)?
            }
        }
    }
    if reason != StopReason::StopString {
        if let Some(rest) = detok.flush() {
            text.push_str(&rest);
        }
    }
    if !cancelled && text.len() > emitted {
        on_text(&text[emitted..]);
    }
    Ok(Generation {
        text,
        tokens,
        stop: reason,
        decode_secs: t0.elapsed().as_secs_f64(),
    })
}

/// Byte offset where the earliest stop string starts, searching text that may overlap `from`.
fn find_stop(text: &str, stops: &[String], from: usize) -> Option<usize> {
    stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| {
            let start = from.saturating_sub(s.len());
            let start = safe_boundary(text, start);
            text[start..].find(s.as_str()).map(|i| start + i)
        })
        .min()
}

/// The largest char boundary at or below `i`.
fn safe_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_are_found_across_emitted_text() {
        let stops = vec!["\n\n".to_string(), "END".to_string()];
        assert_eq!(find_stop("abc\n\nx", &stops, 4), Some(3));
        assert_eq!(find_stop("abcEN", &stops, 3), None);
        assert_eq!(find_stop("abcEND", &stops, 5), Some(3));
    }

    #[test]
    fn boundaries_never_split_a_character() {
        let s = "aé";
        assert_eq!(safe_boundary(s, 2), 1);
        assert_eq!(safe_boundary(s, 3), 3);
    }
}
