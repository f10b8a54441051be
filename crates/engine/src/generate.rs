//! The decode loop: sample, append, stream text, stop.

use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::{Detokenizer, Tokenizer};
use crate::Error;
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
    /// A [`TokenConstraint`] failed (its message is in [`Decoder::constraint_error`]).
    Constraint,
}

/// A constraint on which tokens may come next (structured outputs: a JSON schema, a
/// tool call's grammar). The decoder asks it for a mask before each sample and tells it
/// every token drawn. Implemented outside the engine (the server wraps llguidance).
pub trait TokenConstraint: Send {
    /// Sets the logits of tokens that may not come next to negative infinity.
    /// End-of-sequence tokens stay allowed exactly when the constrained text may end.
    fn mask(&mut self, logits: &mut [f32]) -> Result<(), String>;
    /// The token drawn (never an end-of-sequence token).
    fn accept(&mut self, token: u32) -> Result<(), String>;
    /// The constrained text is complete: nothing but end-of-sequence may follow.
    fn is_finished(&self) -> bool;
    /// An independent copy in the same state (for `n` > 1 choices).
    fn fork(&self) -> Box<dyn TokenConstraint>;
}

#[derive(Clone, Debug)]
pub struct Generation {
    pub text: String,
    pub tokens: Vec<u32>,
    pub stop: StopReason,
    pub decode_secs: f64,
}

/// The generation loop: sample from `logits`, stream text, and feed each token with
/// `step`, which returns the next logits, or None when the context is full.
pub(crate) fn generate_with(
    tok: &Tokenizer,
    prompt: &[u32],
    params: &GenerateParams,
    mut logits: Vec<f32>,
    on_text: &mut dyn FnMut(&str) -> bool,
    step: &mut dyn FnMut(u32) -> Result<Option<Vec<f32>>, Error>,
) -> Result<Generation, Error> {
    let mut dec = Decoder::new(tok, prompt, params)?;
    let t0 = Instant::now();
    let mut piece = String::new();
    let reason = loop {
        piece.clear();
        let decided = dec.step(&mut logits, &mut piece);
        if !piece.is_empty() && !on_text(&piece) {
            break StopReason::Cancelled;
        }
        let next = match decided {
            Step::Stop(reason) => break reason,
            Step::Token(next) => next,
        };
        match step(next)? {
            Some(l) => logits = l,
            None => break StopReason::Context,
        }
    };
    piece.clear();
    dec.finish(reason, &mut piece);
    if reason != StopReason::Cancelled && !piece.is_empty() {
        on_text(&piece);
    }
    Ok(dec.into_generation(reason, t0.elapsed().as_secs_f64()))
}

/// What [`Decoder::step`] decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// This token was generated: run it through the model and step again on its logits.
    Token(u32),
    /// The generation is over (call [`Decoder::finish`] for the text still held back).
    Stop(StopReason),
}

/// Sampling, stop conditions and incremental text of one generation, one token at a
/// time. [`crate::sequence::Sequence::generate`] drives it over one cache; a server drives many of them over a
/// batched forward pass.
pub struct Decoder<'t> {
    tok: &'t Tokenizer,
    params: GenerateParams,
    sampler: Sampler,
    stops: &'t [u32],
    history: Vec<u32>,
    detok: Detokenizer<'t>,
    text: String,
    /// Text passed on so far; the rest may be the start of a stop string.
    emitted: usize,
    hold: usize,
    tokens: Vec<u32>,
    max_tokens: usize,
    stop: Vec<String>,
    ignore_eos: bool,
    constraint: Option<Box<dyn TokenConstraint>>,
    constraint_error: Option<String>,
}

impl<'t> Decoder<'t> {
    pub fn new(tok: &'t Tokenizer, prompt: &[u32], params: &GenerateParams) -> Result<Self, Error> {
        Ok(Decoder {
            tok,
            params: params.clone(),
            sampler: Sampler::new(params.sampling.clone())?,
            stops: tok.stop_ids(),
            history: prompt.to_vec(),
            detok: Detokenizer::new(tok),
            text: String::new(),
            emitted: 0,
            hold: params.stop.iter().map(|s| s.len()).max().unwrap_or(0),
            tokens: Vec::new(),
            max_tokens: params.max_tokens,
            stop: params.stop.clone(),
            ignore_eos: params.ignore_eos,
            constraint: None,
            constraint_error: None,
        })
    }

    /// Only tokens `c` allows are drawn from now on.
    pub fn with_constraint(mut self, c: Box<dyn TokenConstraint>) -> Self {
        self.constraint = Some(c);
        self
    }

    /// A decoder for another choice over the same prompt (`n` > 1), before any token
    /// is drawn: the same settings and constraint, sampling with `seed`.
    pub fn fork(&self, prompt: &[u32], seed: u64) -> Result<Decoder<'t>, Error> {
        let mut params = self.params.clone();
        params.sampling.seed = seed;
        let d = Decoder::new(self.tok, prompt, &params)?;
        Ok(match &self.constraint {
            Some(c) => d.with_constraint(c.fork()),
            None => d,
        })
    }

    /// Why the generation stopped with [`StopReason::Constraint`].
    pub fn constraint_error(&self) -> Option<&str> {
        self.constraint_error.as_deref()
    }

    /// The constraint's mask on `logits`; Some(reason) when the generation must stop.
    fn constrain(&mut self, logits: &mut [f32]) -> Option<StopReason> {
        let c = self.constraint.as_mut()?;
        if c.is_finished() {
            return Some(StopReason::Eos);
        }
        if let Err(e) = c.mask(logits) {
            self.constraint_error = Some(e);
            return Some(StopReason::Constraint);
        }
        None
    }

    /// Sample the next token from `logits` (the last position's). Text that became
    /// final (it can no longer be part of a stop string) is appended to `out`.
    pub fn step(&mut self, logits: &mut [f32], out: &mut String) -> Step {
        if self.tokens.len() >= self.max_tokens {
            return Step::Stop(StopReason::MaxTokens);
        }
        if let Some(reason) = self.constrain(logits) {
            return Step::Stop(reason);
        }
        let next = self.sampler.sample(logits, &self.history);
        if (!self.ignore_eos || self.constraint.is_some()) && self.stops.contains(&next) {
            return Step::Stop(StopReason::Eos);
        }
        if let Some(c) = self.constraint.as_mut() {
            if let Err(e) = c.accept(next) {
                self.constraint_error = Some(e);
                return Step::Stop(StopReason::Constraint);
            }
        }
        self.tokens.push(next);
        self.history.push(next);
        if let Some(piece) = self.detok.push(next) {
            self.text.push_str(&piece);
        }
        if let Some(cut) = find_stop(&self.text, &self.stop, self.emitted) {
            self.text.truncate(cut);
            return Step::Stop(StopReason::StopString);
        }
        let safe = safe_boundary(
            &self.text,
            self.text
                .len()
                .saturating_sub(self.hold.saturating_sub(1))
                .max(self.emitted),
        );
        if safe > self.emitted {
            out.push_str(&self.text[self.emitted..safe]);
            self.emitted = safe;
        }
        if self.tokens.len() == self.max_tokens {
            return Step::Stop(StopReason::MaxTokens);
        }
        Step::Token(next)
    }

    /// The generation ended for `reason`: the text still held back is appended to `out`.
    pub fn finish(&mut self, reason: StopReason, out: &mut String) {
        if reason != StopReason::StopString {
            if let Some(rest) = self.detok.flush() {
                self.text.push_str(&rest);
            }
        }
        if self.text.len() > self.emitted {
            out.push_str(&self.text[self.emitted..]);
            self.emitted = self.text.len();
        }
    }

    /// Tokens generated so far (those sampled, not end-of-sequence tokens).
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn into_generation(self, stop: StopReason, decode_secs: f64) -> Generation {
        Generation {
            text: self.text,
            tokens: self.tokens,
            stop,
            decode_secs,
        }
    }
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
