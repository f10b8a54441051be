//! KVzap's learned scorer: per layer, a linear map from a token's hidden state (the
//! attention block's normalized input) to the log of the score KVzip's reconstruction
//! pass would give the token in each KV head. The forward pass applies it when a
//! method asks for `learned` statistics ([`kvmerger_compression::StatsNeeds`]), so
//! scoring costs one `hidden × kv_heads` product per token and layer.
//!
//! Training ([`Normal`]) accumulates the normal equations of a ridge regression from
//! (hidden state, KVzip score) pairs and solves them per layer; `kvmerger train-scorer`
//! gathers the pairs from text.
//!
//! The file (`.kvzap`) holds: the magic `KVZAP\0v1`, a little-endian u32 length and
//! that many bytes of JSON header (the model fingerprint it was trained for, the
//! shapes, how it was trained), the weights as little-endian f32 (`[layer][kv_head]
//! [hidden]`), the biases (`[layer][kv_head]`), and the SHA-256 of everything before it.

use crate::Error;
use rayon::prelude::*;
use sha2::{Digest, Sha256};
use std::path::Path;

const MAGIC: &[u8; 8] = b"KVZAP\0v1";
/// The largest scorer file read (a 128-layer model with hidden 16384 and 16 KV heads
/// needs 128 MiB; anything larger is not a scorer).
const MAX_FILE: u64 = 256 << 20;

/// A trained scorer for one model.
#[derive(Clone, Debug, PartialEq)]
pub struct LearnedScorer {
    pub n_layers: usize,
    pub n_kv_heads: usize,
    pub hidden: usize,
    /// 0 for a linear map; else the hidden units of a one-layer MLP (GELU) per layer.
    pub units: usize,
    /// Linear: `[layer][kv_head][hidden]`. MLP: `[layer][unit][hidden]` (the first
    /// layer) then `[layer][kv_head][unit]` (the second).
    pub weights: Vec<f32>,
    /// Linear: `[layer][kv_head]`. MLP: `[layer][unit]` then `[layer][kv_head]`.
    pub bias: Vec<f32>,
    /// The fingerprint of the model it was trained for (hex).
    pub fingerprint: String,
    /// How it was trained (data, sizes, regularization, held-out fit), as JSON.
    pub training: serde_json::Value,
}

impl LearnedScorer {
    /// The predictions of layer `layer` for `n_rows` rows of `hidden` values each, into
    /// `out` (`n_rows * n_kv_heads`, row-major).
    pub fn predict(&self, layer: usize, rows: &[f32], out: &mut [f32]) {
        let (d, k, u, l) = (self.hidden, self.n_kv_heads, self.units, self.n_layers);
        if u == 0 {
            let w = &self.weights[layer * k * d..(layer + 1) * k * d];
            let b = &self.bias[layer * k..(layer + 1) * k];
            for (x, o) in rows.chunks_exact(d).zip(out.chunks_exact_mut(k)) {
                for (h, o) in o.iter_mut().enumerate() {
                    *o = b[h] + kvmerger_tensors::kernels::dot_f32(&w[h * d..(h + 1) * d], x);
                }
            }
            return;
        }
        let w1 = &self.weights[layer * u * d..(layer + 1) * u * d];
        let w2 = &self.weights[l * u * d + layer * k * u..l * u * d + (layer + 1) * k * u];
        let b1 = &self.bias[layer * u..(layer + 1) * u];
        let b2 = &self.bias[l * u + layer * k..l * u + (layer + 1) * k];
        let mut a = vec![0.0f32; u];
        for (x, o) in rows.chunks_exact(d).zip(out.chunks_exact_mut(k)) {
            for (j, a) in a.iter_mut().enumerate() {
                *a = gelu(b1[j] + kvmerger_tensors::kernels::dot_f32(&w1[j * d..(j + 1) * d], x));
            }
            for (h, o) in o.iter_mut().enumerate() {
                *o = b2[h] + kvmerger_tensors::kernels::dot_f32(&w2[h * u..(h + 1) * u], &a);
            }
        }
    }

    /// Whether this scorer fits a model of these shapes.
    pub fn fits(&self, n_layers: usize, n_kv_heads: usize, hidden: usize) -> bool {
        (self.n_layers, self.n_kv_heads, self.hidden) == (n_layers, n_kv_heads, hidden)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let header = serde_json::json!({
            "kind": if self.units == 0 { "linear" } else { "mlp" },
            "units": self.units,
            "fingerprint": self.fingerprint,
            "n_layers": self.n_layers,
            "n_kv_heads": self.n_kv_heads,
            "hidden": self.hidden,
            "training": self.training,
        })
        .to_string();
        let mut out =
            Vec::with_capacity(16 + header.len() + 4 * (self.weights.len() + self.bias.len()) + 32);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        for v in self.weights.iter().chain(&self.bias) {
            out.extend_from_slice(&v.to_le_bytes());
        }
        let sum = Sha256::digest(&out);
        out.extend_from_slice(&sum);
        out
    }

    /// Parses and checks a scorer file's bytes (`what` names it in errors).
    pub fn from_bytes(bytes: &[u8], what: &Path) -> Result<LearnedScorer, Error> {
        let bad = |msg: String| Error::Format {
            path: what.to_path_buf(),
            msg,
        };
        if bytes.len() < MAGIC.len() + 4 + 32 || &bytes[..MAGIC.len()] != MAGIC {
            return Err(bad(
                "not a kvzap scorer file (wrong magic or truncated)".into()
            ));
        }
        let (body, sum) = bytes.split_at(bytes.len() - 32);
        if Sha256::digest(body).as_slice() != sum {
            return Err(bad(
                "checksum mismatch: the file is corrupt or truncated".into()
            ));
        }
        let hlen = u32::from_le_bytes(body[8..12].try_into().unwrap()) as usize;
        let header = body
            .get(12..12 + hlen)
            .ok_or_else(|| bad(format!("header of {hlen} bytes runs past the file")))?;
        let h: serde_json::Value =
            serde_json::from_slice(header).map_err(|e| bad(format!("header is not JSON: {e}")))?;
        let field = |k: &str| {
            h.get(k)
                .and_then(|v| v.as_u64())
                .filter(|&v| v > 0 && v <= 1 << 20)
                .map(|v| v as usize)
                .ok_or_else(|| bad(format!("header field '{k}' is missing or out of range")))
        };
        let (n_layers, n_kv_heads, hidden) =
            (field("n_layers")?, field("n_kv_heads")?, field("hidden")?);
        let units = match h.get("kind").and_then(|v| v.as_str()) {
            Some("linear") => 0,
            Some("mlp") => field("units")?,
            _ => return Err(bad("the header's 'kind' is neither linear nor mlp".into())),
        };
        let fingerprint = h
            .get("fingerprint")
            .and_then(|v| v.as_str())
            .ok_or_else(|| bad("header field 'fingerprint' is missing".into()))?
            .to_string();
        let (n_w, n_b) = shapes(n_layers, n_kv_heads, hidden, units)
            .ok_or_else(|| bad("shapes overflow".into()))?;
        let data = &body[12 + hlen..];
        if data.len() != 4 * (n_w + n_b) {
            return Err(bad(format!(
                "{} bytes of weights for {n_layers} layers x {n_kv_heads} KV heads x {hidden}",
                data.len()
            )));
        }
        let floats: Vec<f32> = data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        if floats.iter().any(|v| !v.is_finite()) {
            return Err(bad("a weight is not finite".into()));
        }
        Ok(LearnedScorer {
            n_layers,
            n_kv_heads,
            hidden,
            units,
            weights: floats[..n_w].to_vec(),
            bias: floats[n_w..].to_vec(),
            fingerprint,
            training: h.get("training").cloned().unwrap_or_default(),
        })
    }

    pub fn read(path: &Path) -> Result<LearnedScorer, Error> {
        let bytes = kvmerger_tensors::files::read_file(path, MAX_FILE)?;
        Self::from_bytes(&bytes, path)
    }

    /// Writes the file atomically (a temporary file beside it, then a rename).
    pub fn write(&self, path: &Path) -> Result<(), Error> {
        kvmerger_tensors::files::write_atomic(path, &self.to_bytes())
    }
}

/// The number of weights and biases of a scorer of these shapes.
pub fn shapes(
    n_layers: usize,
    n_kv_heads: usize,
    hidden: usize,
    units: usize,
) -> Option<(usize, usize)> {
    if units == 0 {
        let w = n_layers.checked_mul(n_kv_heads)?.checked_mul(hidden)?;
        return Some((w, n_layers * n_kv_heads));
    }
    let w1 = n_layers.checked_mul(units)?.checked_mul(hidden)?;
    let w2 = n_layers.checked_mul(n_kv_heads)?.checked_mul(units)?;
    Some((w1.checked_add(w2)?, n_layers * (units + n_kv_heads)))
}

/// GELU (the tanh form).
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + (0.797_884_6 * (x + 0.044_715 * x * x * x)).tanh())
}

/// The scorers this project trained and ships, one per fetchable model (see
/// `docs/learned-scorer.md` for how each was made).
const SHIPPED: &[(&str, &[u8])] = &[
    (
        "qwen2.5-0.5b.kvzap",
        include_bytes!("../scorers/qwen2.5-0.5b.kvzap"),
    ),
    (
        "smollm2-135m.kvzap",
        include_bytes!("../scorers/smollm2-135m.kvzap"),
    ),
    (
        "gemma3-270m.kvzap",
        include_bytes!("../scorers/gemma3-270m.kvzap"),
    ),
];

/// The shipped scorer trained for the model with this fingerprint, if any.
pub fn shipped(fingerprint: &str) -> Option<LearnedScorer> {
    SHIPPED.iter().find_map(|(name, bytes)| {
        let s = LearnedScorer::from_bytes(bytes, Path::new(name)).ok()?;
        (s.fingerprint == fingerprint).then_some(s)
    })
}

/// The normal equations of one layer's ridge regression, accumulated in f64:
/// `A = [X 1]^T [X 1]` and `B = [X 1]^T Y` for hidden states `X` and targets `Y`.
#[derive(Clone, Debug)]
pub struct Normal {
    pub hidden: usize,
    pub targets: usize,
    /// `(hidden + 1)^2`, lower triangle filled.
    a: Vec<f64>,
    /// `(hidden + 1) * targets`.
    b: Vec<f64>,
    pub rows: usize,
}

impl Normal {
    pub fn new(hidden: usize, targets: usize) -> Normal {
        let d = hidden + 1;
        Normal {
            hidden,
            targets,
            a: vec![0.0; d * d],
            b: vec![0.0; d * targets],
            rows: 0,
        }
    }

    /// Adds `n` rows: `x` is `n * hidden` values, `y` is `n * targets`.
    pub fn add(&mut self, x: &[f32], y: &[f32]) {
        let (h, t) = (self.hidden, self.targets);
        let n = x.len() / h;
        assert_eq!(y.len(), n * t, "one target row per hidden row");
        let d = h + 1;
        // Columns of [X 1], so every product below is a contiguous dot product.
        let mut cols = vec![0.0f32; d * n];
        for (r, row) in x.chunks_exact(h).enumerate() {
            for (i, &v) in row.iter().enumerate() {
                cols[i * n + r] = v;
            }
            cols[h * n + r] = 1.0;
        }
        let col = |i: usize| &cols[i * n..(i + 1) * n];
        self.a.par_chunks_mut(d).enumerate().for_each(|(i, row)| {
            for (j, a) in row.iter_mut().enumerate().take(i + 1) {
                *a += kvmerger_tensors::kernels::dot_f32(col(i), col(j)) as f64;
            }
        });
        let ycols: Vec<Vec<f32>> = (0..t)
            .map(|k| y.iter().skip(k).step_by(t).copied().collect())
            .collect();
        self.b.par_chunks_mut(t).enumerate().for_each(|(i, row)| {
            for (k, b) in row.iter_mut().enumerate() {
                *b += kvmerger_tensors::kernels::dot_f32(col(i), &ycols[k]) as f64;
            }
        });
        self.rows += n;
    }

    /// The ridge solution with penalty `lambda` times the mean diagonal of `X^T X` on
    /// every weight (not the bias): `(weights [targets][hidden], bias [targets])`.
    pub fn solve(&self, lambda: f64) -> Result<(Vec<f32>, Vec<f32>), Error> {
        let (h, t) = (self.hidden, self.targets);
        let d = h + 1;
        let mut a = self.a.clone();
        let mean_diag = (0..h).map(|i| a[i * d + i]).sum::<f64>() / h.max(1) as f64;
        for i in 0..h {
            a[i * d + i] += lambda * mean_diag.max(1e-12);
        }
        cholesky(&mut a, d).ok_or_else(|| {
            Error::Invalid(format!(
                "the scorer's normal equations are singular ({} rows for {h} features): train on more text or raise the penalty",
                self.rows
            ))
        })?;
        let mut weights = vec![0.0f32; t * h];
        let mut bias = vec![0.0f32; t];
        for k in 0..t {
            let mut z: Vec<f64> = (0..d).map(|i| self.b[i * t + k]).collect();
            cholesky_solve(&a, d, &mut z);
            for i in 0..h {
                weights[k * h + i] = z[i] as f32;
            }
            bias[k] = z[h] as f32;
        }
        Ok((weights, bias))
    }
}

/// In-place Cholesky factorization of the symmetric positive definite `n × n` matrix
/// whose lower triangle `a` holds (row-major): `L` in the lower triangle. None if it
/// is not positive definite.
fn cholesky(a: &mut [f64], n: usize) -> Option<()> {
    for j in 0..n {
        let mut s = a[j * n + j];
        for k in 0..j {
            s -= a[j * n + k] * a[j * n + k];
        }
        if s <= 0.0 || !s.is_finite() {
            return None;
        }
        let l = s.sqrt();
        a[j * n + j] = l;
        let (done, rest) = a.split_at_mut((j + 1) * n);
        let lj = &done[j * n..j * n + j];
        rest.par_chunks_mut(n).for_each(|row| {
            let mut s = row[j];
            for k in 0..j {
                s -= row[k] * lj[k];
            }
            row[j] = s / l;
        });
    }
    Some(())
}

/// Solves `L L^T z = b` in place, `L` from [`cholesky`].
fn cholesky_solve(l: &[f64], n: usize, z: &mut [f64]) {
    for i in 0..n {
        let mut s = z[i];
        for k in 0..i {
            s -= l[i * n + k] * z[k];
        }
        z[i] = s / l[i * n + i];
    }
    for i in (0..n).rev() {
        let mut s = z[i];
        for k in i + 1..n {
            s -= l[k * n + i] * z[k];
        }
        z[i] = s / l[i * n + i];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ridge_recovers_a_linear_map_and_its_bias() {
        let (h, t, n) = (6, 2, 400);
        let w_true = [
            [0.5f32, -1.0, 2.0, 0.0, 0.25, -0.75],
            [1.0, 1.0, -1.0, 3.0, 0.0, 0.5],
        ];
        let b_true = [-3.0f32, 0.7];
        let mut x = Vec::new();
        let mut y = Vec::new();
        for r in 0..n {
            let row: Vec<f32> = (0..h)
                .map(|i| ((r * 31 + i * 17) % 23) as f32 / 7.0 - 1.5)
                .collect();
            for k in 0..t {
                let dot: f32 = row.iter().zip(&w_true[k]).map(|(a, b)| a * b).sum();
                y.push(dot + b_true[k]);
            }
            x.extend(row);
        }
        let mut ne = Normal::new(h, t);
        // In two batches: accumulation is additive.
        ne.add(&x[..200 * h], &y[..200 * t]);
        ne.add(&x[200 * h..], &y[200 * t..]);
        let (w, b) = ne.solve(1e-9).unwrap();
        for k in 0..t {
            for i in 0..h {
                assert!((w[k * h + i] - w_true[k][i]).abs() < 1e-3, "{k} {i}: {w:?}");
            }
            assert!((b[k] - b_true[k]).abs() < 1e-3, "{b:?}");
        }
        // A large penalty shrinks the weights, never the bias's job of the mean.
        let (w, _) = ne.solve(1e3).unwrap();
        assert!(w.iter().all(|v| v.abs() < 0.1), "{w:?}");
    }

    #[test]
    fn the_file_round_trips_and_a_flipped_byte_is_refused() {
        let s = LearnedScorer {
            n_layers: 2,
            n_kv_heads: 3,
            hidden: 4,
            units: 0,
            weights: (0..24).map(|i| i as f32 * 0.5 - 3.0).collect(),
            bias: vec![0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
            fingerprint: "ab".repeat(32),
            training: serde_json::json!({"tokens": 10}),
        };
        let bytes = s.to_bytes();
        let p = Path::new("t.kvzap");
        assert_eq!(LearnedScorer::from_bytes(&bytes, p).unwrap(), s);
        for at in [0, 9, 20, bytes.len() / 2, bytes.len() - 1] {
            let mut b = bytes.clone();
            b[at] ^= 0x40;
            assert!(LearnedScorer::from_bytes(&b, p).is_err(), "flip at {at}");
        }
        assert!(LearnedScorer::from_bytes(&bytes[..bytes.len() - 5], p).is_err());
        let mut out = vec![0.0; 6];
        s.predict(1, &[1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0], &mut out);
        // Layer 1, head 0: weights 12..16 = [3.0, 3.5, 4.0, 4.5]; x = [1, 0, 0, 1].
        assert_eq!(out[0], 0.4 + 3.0 + 4.5);
    }
}
