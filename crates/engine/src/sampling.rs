//! Turning logits into the next token: greedy, temperature, top-k, min-p, top-p, and
//! the logit adjustments (repetition penalty, presence and frequency penalties, logit
//! bias).
//!
//! Order: the adjustments change the logits in place (what [`Sampler::sample`] leaves
//! in its `logits` argument), then greedy takes the largest; otherwise the logits are
//! divided by the temperature, cut to the top k, then to the tokens of probability at
//! least `min_p` times the largest, then to the top-p nucleus, and one is drawn.

use crate::Error;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    /// 1.0 disables top-p.
    pub top_p: f32,
    /// 1.0 disables the penalty.
    pub repetition_penalty: f32,
    /// How many recent tokens the repetition penalty looks at.
    pub repeat_last_n: usize,
    pub seed: u64,
    /// Tokens of probability below `min_p` times the most likely one's are dropped
    /// (after temperature and top-k); 0 disables it.
    pub min_p: f32,
    /// Subtracted from the logit of every token this sampler has already drawn
    /// (OpenAI's presence penalty; the generated tokens, not the prompt's). 0 disables it.
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time this sampler has drawn it
    /// (OpenAI's frequency penalty). 0 disables it.
    pub frequency_penalty: f32,
    /// Added to the logits of these token ids before anything else is decided, greedy
    /// included (ids outside the vocabulary are ignored).
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<(), Error> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(Error::Sampling(format!(
                "temperature must be a number >= 0, got {}",
                self.temperature
            )));
        }
        if !self.top_p.is_finite() || self.top_p <= 0.0 || self.top_p > 1.0 {
            return Err(Error::Sampling(format!(
                "top-p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return Err(Error::Sampling(format!(
                "repetition penalty must be a number > 0, got {}",
                self.repetition_penalty
            )));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(Error::Sampling(format!(
                "min-p must be in [0, 1], got {}",
                self.min_p
            )));
        }
        for (name, v) in [
            ("presence", self.presence_penalty),
            ("frequency", self.frequency_penalty),
        ] {
            if !v.is_finite() {
                return Err(Error::Sampling(format!(
                    "the {name} penalty must be a finite number, got {v}"
                )));
            }
        }
        if let Some((t, b)) = self.logit_bias.iter().find(|(_, b)| !b.is_finite()) {
            return Err(Error::Sampling(format!(
                "the logit bias of token {t} must be a finite number, got {b}"
            )));
        }
        Ok(())
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// How many times each token was drawn (for the presence and frequency penalties;
    /// kept only when one is set).
    drawn: std::collections::HashMap<u32, u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Sampler, Error> {
        params.validate()?;
        let rng = ChaCha8Rng::seed_from_u64(params.seed);
        Ok(Sampler {
            params,
            rng,
            drawn: Default::default(),
        })
    }

    /// The next token given the logits and the tokens so far (for the repetition
    /// penalty). `logits` is left adjusted (penalties and bias applied, before
    /// temperature): the distribution the token was drawn from is its softmax divided
    /// by the temperature, before the top-k, min-p and top-p cuts.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        self.adjust(logits, history);
        let t = self.pick(logits);
        let p = &self.params;
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            *self.drawn.entry(t).or_insert(0) += 1;
        }
        t
    }

    /// The repetition, presence and frequency penalties and the logit bias, in place.
    fn adjust(&self, logits: &mut [f32], history: &[u32]) {
        let p = &self.params;
        for (&t, &n) in &self.drawn {
            if let Some(l) = logits.get_mut(t as usize) {
                *l -= p.presence_penalty + p.frequency_penalty * n as f32;
            }
        }
        for &(t, b) in &p.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += b;
            }
        }
        if p.repetition_penalty != 1.0 {
            let from = history.len().saturating_sub(p.repeat_last_n);
            let mut seen = std::collections::HashSet::new();
            for &t in &history[from..] {
                if seen.insert(t) {
                    if let Some(l) = logits.get_mut(t as usize) {
                        *l = if *l > 0.0 {
                            *l / p.repetition_penalty
                        } else {
                            *l * p.repetition_penalty
                        };
                    }
                }
            }
        }
    }

    /// The token drawn from adjusted logits.
    fn pick(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temperature == 0.0 {
            return argmax(logits) as u32;
        }
        // Shifted by the largest logit before dividing, so that any temperature above
        // zero, however small, gives finite values: below about 1e-30 every token but
        // the most likely one gets probability 0 (greedy choice among the best).
        // Logits pushed to infinity (a tiny repetition penalty) count as f32::MAX.
        let clamp = |l: f32| {
            if l.is_nan() {
                f32::MIN
            } else {
                l.clamp(f32::MIN, f32::MAX)
            }
        };
        let top = logits.iter().map(|&l| clamp(l)).fold(f32::MIN, f32::max);
        let t = p.temperature as f64;
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| {
                let z = (clamp(l) as f64 - top as f64) / t;
                (i as u32, z.max(-1e30) as f32)
            })
            .collect();
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.select_nth_unstable_by(p.top_k - 1, |a, b| b.1.total_cmp(&a.1));
            cand.truncate(p.top_k);
        }
        cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        let max = cand[0].1;
        let mut probs: Vec<f32> = cand.iter().map(|c| (c.1 - max).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
        if p.min_p > 0.0 {
            // Sorted: the most likely comes first, and what falls below the line is a tail.
            let line = probs[0] * p.min_p;
            let keep = probs.iter().take_while(|&&q| q >= line).count().max(1);
            probs.truncate(keep);
            let s: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|x| *x /= s);
        }
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, &q) in probs.iter().enumerate() {
                acc += q;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            let s: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|x| *x /= s);
        }
        let r: f32 = self.rng.gen();
        let mut acc = 0.0;
        for (i, &q) in probs.iter().enumerate() {
            acc += q;
            if r < acc {
                return cand[i].0;
            }
        }
        cand[probs.len() - 1].0
    }
}

/// A drawn token's log-probability and the most likely tokens' at its step.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprobs {
    pub token: u32,
    pub logprob: f32,
    /// Up to the number asked for, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// The lowest log-probability reported (OpenAI's floor): what would be minus infinity
/// (a token a tiny temperature leaves no chance) has no JSON number.
pub const MIN_LOGPROB: f32 = -9999.0;

/// Log-probabilities of `token` and of the `top` most likely tokens under the
/// distribution a sampler draws from: the softmax of the adjusted logits (as
/// [`Sampler::sample`] leaves them: penalties and logit bias applied) divided by
/// `temperature` (pass 1 for greedy decoding), before the top-k, min-p and top-p cuts.
pub fn logprobs(logits: &[f32], temperature: f32, token: u32, top: usize) -> TokenLogprobs {
    let t = if temperature > 0.0 && temperature.is_finite() {
        temperature as f64
    } else {
        1.0
    };
    let clamp = |l: f32| {
        if l.is_nan() {
            f32::MIN as f64
        } else {
            l.clamp(f32::MIN, f32::MAX) as f64
        }
    };
    let max = logits.iter().map(|&l| clamp(l)).fold(f64::MIN, f64::max);
    let z = |l: f32| (clamp(l) - max) / t;
    let lse = logits.iter().map(|&l| z(l).exp()).sum::<f64>().ln();
    let lp = |i: usize| {
        logits
            .get(i)
            .map_or(MIN_LOGPROB, |&l| ((z(l) - lse) as f32).max(MIN_LOGPROB))
    };
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let top = top.min(idx.len());
    // On the clamped values: a NaN logit is the least likely, not the most.
    let by = |a: &u32, b: &u32| clamp(logits[*b as usize]).total_cmp(&clamp(logits[*a as usize]));
    if top > 0 && top < idx.len() {
        idx.select_nth_unstable_by(top - 1, by);
    }
    idx.truncate(top);
    idx.sort_unstable_by(by);
    TokenLogprobs {
        token,
        logprob: lp(token as usize),
        top: idx.into_iter().map(|i| (i, lp(i as usize))).collect(),
    }
}

pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A temperature as small as 1e-40 is a sharper distribution, not NaN: the most
    /// likely token is always chosen, and so is it under a repetition penalty that
    /// pushes logits to infinity.
    #[test]
    fn a_tiny_temperature_samples_the_most_likely_token() {
        for (temperature, penalty) in [(1e-40f32, 1.0f32), (f32::MIN_POSITIVE, 1.0), (1e-3, 1e-40)]
        {
            let mut s = Sampler::new(SamplingParams {
                temperature,
                repetition_penalty: penalty,
                ..SamplingParams::default()
            })
            .unwrap();
            for seed in 0..20 {
                let mut logits = [-30.0, 12.5, -1.0, 12.0, 3.0];
                s.rng = ChaCha8Rng::seed_from_u64(seed);
                let history = if penalty != 1.0 {
                    vec![1u32]
                } else {
                    Vec::new()
                };
                assert_eq!(s.sample(&mut logits, &history), 1, "T={temperature}");
            }
        }
    }

    #[test]
    fn greedy_picks_the_largest_logit() {
        let mut s = Sampler::new(SamplingParams::default()).unwrap();
        assert_eq!(s.sample(&mut [0.1, 3.0, -1.0, 2.9], &[]), 1);
    }

    #[test]
    fn same_seed_same_samples() {
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 3,
            top_p: 0.9,
            seed: 7,
            ..Default::default()
        };
        let run = || {
            let mut s = Sampler::new(params.clone()).unwrap();
            (0..20)
                .map(|_| s.sample(&mut [1.0, 1.1, 0.9, 0.2, -3.0], &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn top_k_one_is_greedy() {
        let params = SamplingParams {
            temperature: 5.0,
            top_k: 1,
            seed: 3,
            ..Default::default()
        };
        let mut s = Sampler::new(params).unwrap();
        for _ in 0..10 {
            assert_eq!(s.sample(&mut [0.0, 0.5, 0.2], &[]), 1);
        }
    }

    #[test]
    fn repetition_penalty_demotes_seen_tokens() {
        let params = SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        };
        let mut s = Sampler::new(params).unwrap();
        assert_eq!(s.sample(&mut [2.0, 1.5], &[0]), 1);
    }

    #[test]
    fn logit_bias_moves_greedy_and_sampled_choices() {
        let mut s = Sampler::new(SamplingParams {
            logit_bias: vec![(2, 100.0), (99, 5.0)],
            ..Default::default()
        })
        .unwrap();
        let mut logits = [3.0, 1.0, -2.0];
        assert_eq!(s.sample(&mut logits, &[]), 2);
        assert_eq!(logits, [3.0, 1.0, 98.0], "the adjusted logits are left");
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.5,
            logit_bias: vec![(0, -100.0)],
            seed: 1,
            ..Default::default()
        })
        .unwrap();
        for _ in 0..50 {
            assert_ne!(s.sample(&mut [5.0, 0.0, 0.0], &[]), 0);
        }
    }

    #[test]
    fn presence_and_frequency_penalties_count_drawn_tokens() {
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.3,
            ..Default::default()
        })
        .unwrap();
        // The prompt's tokens (history) are not penalised, only drawn ones.
        assert_eq!(s.sample(&mut [1.0, 0.5], &[0, 0, 0]), 0);
        // Token 0 now loses 0.8: 0.2 < 0.5.
        let mut l = [1.0, 0.5];
        assert_eq!(s.sample(&mut l, &[]), 1);
        assert!((l[0] - 0.2).abs() < 1e-6, "{l:?}");
        // Drawn again after: 0 has 1 draw (-0.8), 1 has 1 draw (-0.8).
        let mut l = [1.0, 0.5];
        assert_eq!(s.sample(&mut l, &[]), 0);
        let mut l = [1.0, 0.5];
        s.sample(&mut l, &[]);
        assert!((l[0] - (1.0 - 0.5 - 0.6)).abs() < 1e-6, "{l:?}");
    }

    #[test]
    fn min_p_drops_the_unlikely_tail() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            min_p: 0.5,
            seed: 5,
            ..Default::default()
        })
        .unwrap();
        // p(1) / p(0) = e^-0.5 > 0.5 stays; the others are far below.
        for _ in 0..100 {
            let t = s.sample(&mut [2.0, 1.5, -1.0, -3.0], &[]);
            assert!(t < 2, "{t}");
        }
    }

    #[test]
    fn logprobs_are_a_normalised_distribution_after_temperature() {
        let logits = [1.0f32, 3.0, 2.0, f32::NAN];
        let l = logprobs(&logits, 1.0, 2, 2);
        let total: f64 = (0..4)
            .map(|i| (logprobs(&logits, 1.0, i, 0).logprob as f64).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-5, "{total}");
        assert_eq!(l.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
        assert!((l.logprob - l.top[1].1).abs() < 1e-6);
        // A higher temperature flattens the distribution; a tiny one floors the rest.
        let hot = logprobs(&logits, 2.0, 1, 0).logprob;
        assert!(hot < l.top[0].1, "{hot}");
        let cold = logprobs(&logits, 1e-30, 0, 1);
        assert_eq!(cold.logprob, MIN_LOGPROB);
        assert_eq!(cold.top, vec![(1, 0.0)]);
        assert_eq!(logprobs(&logits, 1.0, 0, 50).top.len(), 4);
    }

    #[test]
    fn invalid_values_are_rejected() {
        for p in [
            SamplingParams {
                temperature: -1.0,
                ..Default::default()
            },
            SamplingParams {
                temperature: f32::NAN,
                ..Default::default()
            },
            SamplingParams {
                top_p: 0.0,
                ..Default::default()
            },
            SamplingParams {
                top_p: 1.5,
                ..Default::default()
            },
            SamplingParams {
                repetition_penalty: 0.0,
                ..Default::default()
            },
            SamplingParams {
                min_p: 1.5,
                ..Default::default()
            },
            SamplingParams {
                presence_penalty: f32::INFINITY,
                ..Default::default()
            },
            SamplingParams {
                logit_bias: vec![(1, f32::NAN)],
                ..Default::default()
            },
        ] {
            assert!(matches!(Sampler::new(p), Err(Error::Sampling(_))));
        }
    }
}
