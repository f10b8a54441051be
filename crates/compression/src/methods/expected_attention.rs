//! `expected_attention`: Expected Attention (Devoto et al. 2025, arXiv 2510.00636).
//! Scores each slot by the attention a *future* query is expected to give it, so the
//! context can be compressed before any question is seen.
//!
//! The engine models each query head's future queries as a Gaussian `N(mu, Sigma)`: the
//! mean and covariance of the context's queries before RoPE (the first `sinks`
//! positions left out), rotated by the RoPE rotation averaged over the next `future`
//! positions ([`QueryMoments`]). For such a query and a stored key `k`,
//! `E[exp(s q.k)] = exp(s mu.k + s^2 k^T Sigma k / 2)` (`s` the logit scale, `1/sqrt(d)`
//! for most models; a merged slot's logit bias is added). The exponents are turned
//! into a softmax over the head's slots, averaged over the query heads of the group,
//! multiplied by `|v| ` (plus `epsilon`), and the highest scores are kept; the first
//! `sinks` slots are always kept.
//!
//! Options: `future` (512), `sinks` (4), `cov` (true: the covariance term; false: the
//! mean alone), `vnorm` (true), `epsilon` (0), `qbias` (true: the mean of the real
//! queries; false: without the model's query bias, as the reference implementation
//! computes it from `q_proj.weight` alone). The other defaults are the reference
//! implementation's.

use super::OptionDoc;
use crate::method::{HeadInput, Options, QueryMoments, QueryNeeds, StatsNeeds};
use crate::scorer::Scorer;
use crate::store::HeadData;
use crate::Error;

pub const SUMMARY: &str =
    "Expected Attention: the attention future queries (a Gaussian fitted to the context's) will pay";
pub const OPTIONS: &[OptionDoc] = &[
    OptionDoc {
        key: "future",
        default: "512",
        help: "future positions the query rotation is averaged over",
    },
    OptionDoc {
        key: "sinks",
        default: "4",
        help: "initial slots always kept, and left out of the query statistics",
    },
    OptionDoc {
        key: "cov",
        default: "true",
        help: "include the query covariance term (false: the mean query alone)",
    },
    OptionDoc {
        key: "vnorm",
        default: "true",
        help: "multiply the expected attention by the value norm",
    },
    OptionDoc {
        key: "epsilon",
        default: "0",
        help: "added to the expected attention before the value norm",
    },
    OptionDoc {
        key: "qbias",
        default: "true",
        help: "the mean query includes the model's query bias (false: W_q h alone, as kvpress computes it)",
    },
];

/// The longest horizon `future` may name: longer than any model's context.
pub const MAX_FUTURE: usize = 1 << 24;

#[derive(Clone, Debug)]
pub struct ExpectedAttention {
    pub future: usize,
    pub sinks: usize,
    pub cov: bool,
    pub vnorm: bool,
    pub epsilon: f32,
    pub qbias: bool,
}

impl ExpectedAttention {
    pub fn from_options(opts: &Options) -> Result<Self, Error> {
        super::check_options("expected_attention", opts, OPTIONS)?;
        let future = opts.usize_or("future", 512)?;
        if future == 0 || future > MAX_FUTURE {
            return Err(Error::InvalidOption(format!(
                "option future={future} must be from 1 to {MAX_FUTURE} positions (no model has a longer context)"
            )));
        }
        let epsilon = opts.f32_or("epsilon", 0.0)?;
        if !(epsilon.is_finite() && epsilon >= 0.0) {
            return Err(Error::InvalidOption(format!(
                "option epsilon={epsilon} must be a finite number >= 0"
            )));
        }
        Ok(ExpectedAttention {
            future,
            sinks: opts.usize_or("sinks", 4)?,
            cov: opts.bool_or("cov", true)?,
            vnorm: opts.bool_or("vnorm", true)?,
            epsilon,
            qbias: opts.bool_or("qbias", true)?,
        })
    }

    /// Every slot's score: expected attention (× value norm), sinks at infinity.
    pub fn expected_scores(&self, input: &HeadInput<'_>) -> Result<Vec<f32>, Error> {
        let data = input.data;
        let heads = input
            .stats
            .queries
            .as_deref()
            .ok_or_else(|| Error::MissingStats {
                method: "expected_attention".into(),
                stat: "queries",
            })?;
        let (n, d) = (data.len(), data.dim);
        for m in heads {
            if m.mean.len() != d || (self.cov && m.cov.len() != d * d) {
                return Err(Error::Invalid(format!(
                    "expected_attention: query statistics of dimension {} for keys of dimension {d}",
                    m.mean.len()
                )));
            }
        }
        let sinks = self.sinks.min(n);
        let mut score = vec![0.0f32; n];
        let mut logits = vec![0.0f32; n - sinks];
        for m in heads {
            expected_logits(data, m, sinks, self.cov, &mut logits);
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            if !max.is_finite() {
                continue;
            }
            let mut sum = 0.0f64;
            for x in logits.iter_mut() {
                *x = (*x - max).exp();
                sum += *x as f64;
            }
            let inv = (1.0 / (sum * heads.len() as f64)) as f32;
            for (s, &x) in score[sinks..].iter_mut().zip(&logits) {
                *s += x * inv;
            }
        }
        if self.vnorm {
            for (i, s) in score.iter_mut().enumerate().skip(sinks) {
                let v = data.value(i);
                *s = (*s + self.epsilon) * super::dot(v, v).sqrt();
            }
        }
        score[..sinks].iter_mut().for_each(|s| *s = f32::INFINITY);
        Ok(score)
    }
}

/// `s mu.k + s^2 k^T Sigma k / 2 + bias` for the slots from `from` on, into `out`.
fn expected_logits(data: &HeadData, m: &QueryMoments, from: usize, cov: bool, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::avx2() {
        // SAFETY: the CPU supports the features the function is compiled for
        // (checked by `simd::avx2`).
        return unsafe { expected_logits_avx2(data, m, from, cov, out) };
    }
    expected_logits_plain(data, m, from, cov, out)
}

/// The same loops compiled for AVX2 and FMA (the quadratic form is most of the cost
/// of scoring: `dim^2` multiply-adds per slot and query head).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn expected_logits_avx2(
    data: &HeadData,
    m: &QueryMoments,
    from: usize,
    cov: bool,
    out: &mut [f32],
) {
    expected_logits_plain(data, m, from, cov, out)
}

#[inline(always)]
fn expected_logits_plain(
    data: &HeadData,
    m: &QueryMoments,
    from: usize,
    cov: bool,
    out: &mut [f32],
) {
    let d = data.dim;
    let s = m.scale;
    let half_s2 = 0.5 * s * s;
    let mut t = vec![0.0f32; d];
    for (o, i) in out.iter_mut().zip(from..) {
        let k = data.key(i);
        let mut x = s * super::dot(&m.mean, k) + data.meta[i].bias;
        if cov {
            // t = Sigma k, row by row as axpy (vectorises without reassociation).
            t.iter_mut().for_each(|v| *v = 0.0);
            for (a, &ka) in k.iter().enumerate() {
                let row = &m.cov[a * d..(a + 1) * d];
                for (tv, &c) in t.iter_mut().zip(row) {
                    *tv += ka * c;
                }
            }
            x += half_s2 * super::dot(&t, k);
        }
        *o = x;
    }
}

impl Scorer for ExpectedAttention {
    fn name(&self) -> &str {
        "expected_attention"
    }
    fn needs(&self) -> StatsNeeds {
        StatsNeeds {
            queries: Some(QueryNeeds {
                future: self.future,
                sinks: self.sinks,
                bias: self.qbias,
            }),
            ..Default::default()
        }
    }
    fn always_kept(&self) -> Option<(&'static str, usize)> {
        Some(("sinks", self.sinks))
    }
    fn scores(&self, input: &HeadInput<'_>) -> Result<Vec<f32>, Error> {
        self.expected_scores(input)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::method::HeadStats;
    use crate::store::SlotMeta;
    use crate::HeadPos;
    use crate::{Method, Selection};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// A standard normal draw (Box-Muller).
    fn normal(rng: &mut ChaCha8Rng) -> f64 {
        let u: f64 = rng.gen_range(1e-12..1.0);
        let v: f64 = rng.gen();
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }

    #[test]
    fn the_closed_form_matches_monte_carlo_over_gaussian_queries() {
        let d = 8;
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        // A random covariance L L^T and mean.
        let l: Vec<f64> = (0..d * d)
            .map(|i| {
                if i % d <= i / d {
                    0.4 * normal(&mut rng)
                } else {
                    0.0
                }
            })
            .collect();
        let mut cov = vec![0.0f64; d * d];
        for a in 0..d {
            for b in 0..d {
                cov[a * d + b] = (0..d).map(|c| l[a * d + c] * l[b * d + c]).sum();
            }
        }
        let mean: Vec<f64> = (0..d).map(|_| 0.5 * normal(&mut rng)).collect();
        let mut data = HeadData::new(d);
        let n = 12;
        for i in 0..n {
            let k: Vec<f32> = (0..d).map(|_| normal(&mut rng) as f32).collect();
            let v: Vec<f32> = (0..d).map(|_| normal(&mut rng) as f32).collect();
            let mut meta = SlotMeta::token(i as u32);
            if i == 5 {
                meta.bias = 0.7;
            }
            data.push(&k, &v, meta);
        }
        let scale = 1.0 / (d as f32).sqrt();
        let moments = QueryMoments {
            mean: mean.iter().map(|&x| x as f32).collect(),
            cov: cov.iter().map(|&x| x as f32).collect(),
            scale,
        };
        // Monte-Carlo: E[exp(s q.k + bias)] for q = mean + L z.
        let samples = 200_000;
        let mut mc = vec![0.0f64; n];
        for _ in 0..samples {
            let z: Vec<f64> = (0..d).map(|_| normal(&mut rng)).collect();
            let q: Vec<f64> = (0..d)
                .map(|a| mean[a] + (0..d).map(|c| l[a * d + c] * z[c]).sum::<f64>())
                .collect();
            for (i, m) in mc.iter_mut().enumerate() {
                let qk: f64 = data
                    .key(i)
                    .iter()
                    .zip(&q)
                    .map(|(&k, &q)| k as f64 * q)
                    .sum();
                *m += (scale as f64 * qk + data.meta[i].bias as f64).exp();
            }
        }
        let mut logits = vec![0.0f32; n];
        expected_logits(&data, &moments, 0, true, &mut logits);
        for i in 0..n {
            let want = (mc[i] / samples as f64).ln();
            assert!(
                (logits[i] as f64 - want).abs() < 0.02,
                "slot {i}: closed form {} vs Monte-Carlo {want}",
                logits[i]
            );
        }
        // The method's scores: softmax of those exponents (no sinks, no value norm).
        let m = ExpectedAttention {
            future: 1,
            sinks: 0,
            cov: true,
            vnorm: false,
            epsilon: 0.0,
            qbias: true,
        };
        let stats = HeadStats {
            queries: Some(vec![moments]),
            ..Default::default()
        };
        let input = HeadInput {
            data: &data,
            stats: &stats,
            pos: HeadPos::SINGLE,
            budget: 4,
        };
        let scores = m.expected_scores(&input).unwrap();
        let total: f64 = mc.iter().sum();
        for i in 0..n {
            assert!((scores[i] as f64 - mc[i] / total).abs() < 0.01, "slot {i}");
        }
        assert_eq!(Selection(Box::new(m)).compress(input).unwrap().len(), 4);
    }

    #[test]
    fn missing_query_statistics_are_an_error_not_a_guess() {
        let mut data = HeadData::new(2);
        for i in 0..8 {
            data.push(&[1.0, 0.0], &[1.0, 0.0], SlotMeta::token(i));
        }
        let m = Selection(Box::new(
            ExpectedAttention::from_options(&Options::new()).unwrap(),
        ));
        let e = m
            .compress(HeadInput {
                data: &data,
                stats: &HeadStats::default(),
                pos: HeadPos::SINGLE,
                budget: 6,
            })
            .unwrap_err();
        assert!(e.to_string().contains("queries"), "{e}");
    }
}
