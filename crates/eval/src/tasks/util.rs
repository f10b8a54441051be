//! Deterministic randomness and the haystack-size search shared by the generators.

use std::collections::HashMap;

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::Error;

/// FNV-1a, a hash that is stable across builds and platforms.
pub(crate) fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The random stream `stream` of sample `index` of `task` under `seed`. Streams are
/// independent, so drawing more from one (say, more haystack) never changes another
/// (the needles). The target length is deliberately not part of the seed: sample `i`
/// has the same keys, values, depth and question at every length.
pub(crate) fn rng_for(seed: u64, task: &str, index: usize, stream: u64) -> ChaCha8Rng {
    let mut s = [0u8; 32];
    s[..8].copy_from_slice(&seed.to_le_bytes());
    s[8..16].copy_from_slice(&fnv1a(task).to_le_bytes());
    s[16..24].copy_from_slice(&(index as u64).to_le_bytes());
    s[24..].copy_from_slice(&stream.to_le_bytes());
    ChaCha8Rng::from_seed(s)
}

/// A random version-4 UUID in its usual lower-case text form.
pub(crate) fn uuid4(rng: &mut impl RngCore) -> String {
    let mut b = [0u8; 16];
    rng.fill_bytes(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// A lazily drawn random permutation of `0..n` (a sparse Fisher–Yates shuffle): the
/// first `k` items drawn do not depend on how many are drawn later, so "the first `k`
/// distractors" grows monotonically with `k`.
pub(crate) struct LazyPerm {
    n: usize,
    i: usize,
    moved: HashMap<usize, usize>,
    rng: ChaCha8Rng,
}

impl LazyPerm {
    pub(crate) fn new(n: usize, rng: ChaCha8Rng) -> Self {
        LazyPerm {
            n,
            i: 0,
            moved: HashMap::new(),
            rng,
        }
    }
}

impl Iterator for LazyPerm {
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        if self.i >= self.n {
            return None;
        }
        let j = self.rng.gen_range(self.i..self.n);
        let at_j = self.moved.get(&j).copied().unwrap_or(j);
        let at_i = self.moved.get(&self.i).copied().unwrap_or(self.i);
        self.moved.insert(j, at_i);
        self.i += 1;
        Some(at_j)
    }
}

/// Result of [`fit`]: the haystack size chosen, what `eval` built for it, and its
/// token count.
pub(crate) struct Fitted<T> {
    pub n: usize,
    pub out: T,
    pub tokens: usize,
}

/// Finds the largest haystack size `n` in `min..=max` whose input fits `budget`
/// tokens, where `eval(n)` builds the input and counts its tokens (tokens are
/// assumed to grow with `n`, roughly linearly). It starts at `guess` (a previous
/// answer for the same task and length), steps by secant estimates aimed just under
/// the budget and falls back to bisection; it stops as soon as a fitting input is
/// within 2% of the budget or no larger size is left to try. Typically one count
/// with a good guess, three or four without. `Err` if even `min` does not fit.
pub(crate) fn fit<T>(
    task: &str,
    length: usize,
    min: usize,
    max: usize,
    guess: Option<usize>,
    budget: usize,
    mut eval: impl FnMut(usize) -> Result<(T, usize), Error>,
) -> Result<Fitted<T>, Error> {
    let slack = (budget / 50).max(1);
    let target = budget.saturating_sub(slack / 2) as f64;
    let mut best: Option<Fitted<T>> = None;
    let mut hi = max + 1; // smallest size known not to fit
    let mut min_tokens = None;
    let mut prev: Option<(usize, usize)> = None;
    let mut n = guess.unwrap_or(min).clamp(min, max);
    for step in 0..64 {
        let (out, t) = eval(n)?;
        if n == min {
            min_tokens = Some(t);
        }
        if t <= budget {
            if best.as_ref().is_none_or(|b| n > b.n) {
                best = Some(Fitted { n, out, tokens: t });
            }
        } else {
            hi = hi.min(n);
        }
        let lo = best.as_ref().map(|b| b.n);
        if let Some(b) = &best {
            if budget - b.tokens <= slack || b.n + 1 >= hi {
                break;
            }
        } else if hi <= min {
            break;
        }
        // Next size: secant through the last two probes (or proportional from this
        // one), kept strictly inside the open bracket.
        let lower = lo.map_or(min, |l| l + 1);
        let upper = hi - 1;
        let est = match prev {
            Some((pn, pt)) if pn != n && pt != t && step < 8 => {
                let slope = (t as f64 - pt as f64) / (n as f64 - pn as f64);
                if slope > 0.0 {
                    n as f64 + (target - t as f64) / slope
                } else {
                    f64::NAN
                }
            }
            _ if t > 0 && step < 8 => n as f64 * target / t as f64,
            _ => f64::NAN,
        };
        let mut next = if est.is_finite() {
            (est.floor().max(0.0) as usize).clamp(lower, upper)
        } else {
            lower + (upper - lower) / 2
        };
        if next == n {
            next = lower + (upper - lower) / 2;
        }
        prev = Some((n, t));
        n = next;
    }
    best.ok_or_else(|| Error::TooShort {
        task: task.to_string(),
        length,
        needed: min_tokens.map(|t| t + length.saturating_sub(budget)),
    })
}
