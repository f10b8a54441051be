//! Small-sample statistics for comparing configurations on the same samples: a
//! percentile bootstrap interval of a mean, and the exact sign test.
//!
//! A grid scores every configuration on the same prompts, so the question "is A better
//! than B" is best asked of the per-sample differences: most of the variance between
//! samples (an easy needle, a hard one) is shared by both configurations and cancels.
//! The bootstrap makes no assumption about the shape of the scores (often 0/1), and
//! the sign test only counts which of the two did better on each sample.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Resamples drawn for each bootstrap interval.
pub const RESAMPLES: usize = 2000;

/// The bootstrap's seed, fixed so that a report written twice from the same records is
/// the same report.
pub const SEED: u64 = 0x6b76_6d65_7267_6572;

/// Coverage of the intervals.
pub const LEVEL: f64 = 0.95;

/// A two-sided interval, inclusive at both ends.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Interval {
    pub low: f64,
    pub high: f64,
}

impl Interval {
    pub fn contains(&self, x: f64) -> bool {
        self.low <= x && x <= self.high
    }
}

pub fn mean(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

/// The `q`-quantile of sorted values, interpolating linearly between the two nearest
/// order statistics (so that the result does not jump as the resample count changes).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let position = q * (sorted.len() - 1) as f64;
    let below = position.floor() as usize;
    let above = position.ceil() as usize;
    let weight = position - below as f64;
    sorted[below] + (sorted[above] - sorted[below]) * weight
}

/// The 95% percentile-bootstrap interval of the mean of `values`: draw `resamples`
/// samples of the same size with replacement, and take the 2.5% and 97.5% quantiles of
/// their means. Deterministic for a given seed. None when there are no values.
pub fn bootstrap_mean_interval(values: &[f64], resamples: usize, seed: u64) -> Option<Interval> {
    let n = values.len();
    if n == 0 {
        return None;
    }
    // With one value, or all values equal, every resample has the same mean; no need
    // to draw (and the interval is then exactly that value, not a rounding of it).
    let first = values[0];
    if values.iter().all(|&v| v == first) || resamples == 0 {
        let m = mean(values).expect("not empty");
        return Some(Interval { low: m, high: m });
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // A pooled grid resamples thousands of samples thousands of times per comparison,
    // so the draw is the cost: multiply-shift maps one 32-bit word onto 0..n, with a
    // bias below n / 2^32, far under the bootstrap's own noise.
    let draw = |rng: &mut ChaCha8Rng| ((u64::from(rng.next_u32()) * n as u64) >> 32) as usize;
    let mut means: Vec<f64> = (0..resamples)
        .map(|_| {
            let total: f64 = (0..n).map(|_| values[draw(&mut rng)]).sum();
            total / n as f64
        })
        .collect();
    means.sort_by(f64::total_cmp);
    let tail = (1.0 - LEVEL) / 2.0;
    Some(Interval {
        low: quantile(&means, tail),
        high: quantile(&means, 1.0 - tail),
    })
}

/// The two-sided exact sign test: the probability, if each non-tied sample were
/// equally likely to go either way, of a split at least as uneven as `wins` against
/// `losses`. Ties carry no information about the direction and are left out. 1 when
/// there are no untied samples.
pub fn sign_test(wins: usize, losses: usize) -> f64 {
    let n = wins + losses;
    let k = wins.min(losses);
    if n == 0 {
        return 1.0;
    }
    // Sum the binomial(n, 1/2) tail in logarithms: 0.5^n underflows past n ≈ 1074,
    // and pooled grids reach thousands of samples.
    let ln_half_n = n as f64 * 0.5f64.ln();
    let mut ln_choose = 0.0f64;
    let mut terms = Vec::with_capacity(k + 1);
    for i in 0..=k {
        if i > 0 {
            ln_choose += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        terms.push(ln_choose + ln_half_n);
    }
    let largest = terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let tail = largest.exp() * terms.iter().map(|t| (t - largest).exp()).sum::<f64>();
    (2.0 * tail).min(1.0)
}

/// How two configurations compare on the samples both were scored on.
#[derive(Clone, Debug, PartialEq)]
pub struct PairedDifference {
    /// Samples both have.
    pub n: usize,
    /// Mean of (this − other) over those samples.
    pub mean: f64,
    pub interval: Interval,
    /// Samples where this scored higher, lower, the same.
    pub wins: usize,
    pub losses: usize,
    pub ties: usize,
    /// Two-sided exact sign test of wins against losses.
    pub p_value: f64,
}

/// The verdict of a paired comparison: a difference whose interval covers zero is not
/// told apart from no difference.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Better,
    Worse,
    Tie,
}

impl Verdict {
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Better => "better",
            Verdict::Worse => "worse",
            Verdict::Tie => "tie",
        }
    }
}

impl PairedDifference {
    /// Compare paired scores `(this, other)`. None when there are no pairs.
    pub fn of(pairs: &[(f64, f64)], resamples: usize, seed: u64) -> Option<PairedDifference> {
        let differences: Vec<f64> = pairs.iter().map(|(a, b)| a - b).collect();
        let interval = bootstrap_mean_interval(&differences, resamples, seed)?;
        let wins = differences.iter().filter(|&&d| d > 0.0).count();
        let losses = differences.iter().filter(|&&d| d < 0.0).count();
        Some(PairedDifference {
            n: differences.len(),
            mean: mean(&differences).expect("not empty"),
            interval,
            wins,
            losses,
            ties: differences.len() - wins - losses,
            p_value: sign_test(wins, losses),
        })
    }

    pub fn verdict(&self) -> Verdict {
        if self.interval.contains(0.0) {
            Verdict::Tie
        } else if self.interval.low > 0.0 {
            Verdict::Better
        } else {
            Verdict::Worse
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sign_test_matches_the_binomial_by_hand() {
        // 18 wins and 2 losses out of 20: 2 · (C(20,0) + C(20,1) + C(20,2)) / 2^20.
        let by_hand = 2.0 * (1.0 + 20.0 + 190.0) / 1_048_576.0;
        assert!(
            (sign_test(18, 2) - by_hand).abs() < 1e-15,
            "{}",
            sign_test(18, 2)
        );
        assert!((sign_test(2, 18) - by_hand).abs() < 1e-15);
        // 3 against 1: 2 · (1 + 4) / 16.
        assert!((sign_test(3, 1) - 10.0 / 16.0).abs() < 1e-15);
        // An even split, or nothing to count, is no evidence at all.
        assert_eq!(sign_test(5, 5), 1.0);
        assert_eq!(sign_test(0, 0), 1.0);
        // One-sided 10 of 10: 2 / 1024.
        assert!((sign_test(10, 0) - 2.0 / 1024.0).abs() < 1e-15);
    }

    #[test]
    fn the_sign_test_survives_thousands_of_samples() {
        // 0.5^3000 underflows in f64; the log-space sum must not.
        let p = sign_test(1600, 1400);
        // A normal approximation: z = 100 / sqrt(3000 · 0.25) ≈ 3.65, two-sided p ≈ 2.6e-4.
        assert!(p > 1e-4 && p < 5e-4, "{p}");
        // 2 · 0.5^3000 is below the smallest f64: it may round to 0, never to garbage.
        let lopsided = sign_test(3000, 0);
        assert!((0.0..1e-300).contains(&lopsided), "{lopsided}");
    }

    #[test]
    fn bootstrap_intervals_are_deterministic_and_surround_the_mean() {
        let values: Vec<f64> = (0..40).map(|i| ((i * 7) % 11) as f64 / 10.0).collect();
        let m = mean(&values).unwrap();
        let a = bootstrap_mean_interval(&values, RESAMPLES, SEED).unwrap();
        let b = bootstrap_mean_interval(&values, RESAMPLES, SEED).unwrap();
        assert_eq!(a, b);
        assert!(a.low < m && m < a.high, "{a:?} around {m}");
        // Roughly ±1.96 standard errors: neither collapsed nor absurdly wide.
        let sd = (values.iter().map(|v| (v - m).powi(2)).sum::<f64>() / 39.0).sqrt();
        let se = sd / 40f64.sqrt();
        let width = a.high - a.low;
        assert!(
            width > 2.0 * se && width < 6.0 * se,
            "{width} against se {se}"
        );
        // Another seed draws other resamples, so it gives a (slightly) different interval.
        let c = bootstrap_mean_interval(&values, RESAMPLES, SEED + 1).unwrap();
        assert_ne!(a, c);
    }

    #[test]
    fn constant_and_empty_samples_have_degenerate_intervals() {
        assert_eq!(bootstrap_mean_interval(&[], RESAMPLES, SEED), None);
        let i = bootstrap_mean_interval(&[0.25; 7], RESAMPLES, SEED).unwrap();
        assert_eq!((i.low, i.high), (0.25, 0.25));
    }

    #[test]
    fn paired_differences_count_wins_losses_and_ties() {
        let pairs = [(1.0, 0.0), (1.0, 0.0), (0.5, 0.5), (0.0, 1.0), (1.0, 1.0)];
        let d = PairedDifference::of(&pairs, RESAMPLES, SEED).unwrap();
        assert_eq!((d.n, d.wins, d.losses, d.ties), (5, 2, 1, 2));
        assert!((d.mean - 0.2).abs() < 1e-12);
        assert!((d.p_value - 1.0).abs() < 1e-12);
        assert_eq!(d.verdict(), Verdict::Tie);
        assert_eq!(PairedDifference::of(&[], RESAMPLES, SEED), None);
    }

    #[test]
    fn verdicts_follow_the_side_of_zero() {
        let worse: Vec<(f64, f64)> = (0..30)
            .map(|i| (0.0, if i < 28 { 1.0 } else { 0.0 }))
            .collect();
        let d = PairedDifference::of(&worse, RESAMPLES, SEED).unwrap();
        assert!(d.interval.high < 0.0, "{:?}", d.interval);
        assert_eq!(d.verdict(), Verdict::Worse);
        let better: Vec<(f64, f64)> = worse.iter().map(|&(a, b)| (b, a)).collect();
        assert_eq!(
            PairedDifference::of(&better, RESAMPLES, SEED)
                .unwrap()
                .verdict(),
            Verdict::Better
        );
    }
}
