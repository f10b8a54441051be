//! The forward pass of llama, qwen2, qwen3, gemma3 and phi3 models, over the engine's KV cache.

use crate::cache::{HeadAccum, KvCache, LayerRope, PrefillStats, QueryAccum};
use crate::config::{Activation, Arch, Config, RopeStyle};
use crate::Error;
use kvmerger_compression::{KvDtype, SlotMeta, StatsNeeds};
use kvmerger_tensors::attention::{attend, HeadRows, LayerAttn, StatsRequest};
use kvmerger_tensors::gguf::GgufFile;
use kvmerger_tensors::kernels::{gelu_tanh, rms_norm, rms_norm_inplace, silu_mul};
use kvmerger_tensors::precision::{
    matmul_balanced, matmul_balanced_multi, matmul_exact, matmul_exact_multi, Precision,
};
use kvmerger_tensors::quant::QMatrix;
use rayon::prelude::*;
use std::ops::Range;

/// Where weights come from, by their GGUF names (`blk.N.attn_q.weight`, ...).
pub trait WeightSource {
    fn matrix(&self, name: &str) -> Result<QMatrix, Error>;
    fn vector(&self, name: &str) -> Result<Vec<f32>, Error>;
    fn has(&self, name: &str) -> bool;
}

impl WeightSource for GgufFile {
    fn matrix(&self, name: &str) -> Result<QMatrix, Error> {
        QMatrix::from_gguf(self, name)
    }
    fn vector(&self, name: &str) -> Result<Vec<f32>, Error> {
        Ok(QMatrix::from_gguf(self, name)?.to_f32())
    }
    fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

pub struct Layer {
    attn_norm: Vec<f32>,
    wq: QMatrix,
    wk: QMatrix,
    wv: QMatrix,
    wo: QMatrix,
    bq: Option<Vec<f32>>,
    bk: Option<Vec<f32>>,
    bv: Option<Vec<f32>>,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    post_attn_norm: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    w_gate: QMatrix,
    w_up: QMatrix,
    w_down: QMatrix,
    post_ffn_norm: Option<Vec<f32>>,
}

pub struct Model {
    pub cfg: Config,
    embed: QMatrix,
    layers: Vec<Layer>,
    out_norm: Vec<f32>,
    /// None when the output head is tied to the embedding.
    output: Option<QMatrix>,
    /// How matrix products treat activations.
    pub precision: Precision,
    /// Each layer's RoPE frequencies and scale, computed once from `cfg`.
    rope: Vec<LayerRope>,
    /// KVzap's trained scorer for this model, if one is attached: the forward pass
    /// applies it for methods that need `learned` statistics.
    pub learned: Option<std::sync::Arc<crate::learned::LearnedScorer>>,
}

/// Which logits a forward call returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position's (vocab values).
    Last,
    /// Every position's (n × vocab values).
    All,
    /// None: the pass is run for its cache or its statistics (the last layer's
    /// output projection and feed-forward are skipped, as nothing reads them).
    None,
}

fn check_shape(name: &str, m: &QMatrix, rows: usize, cols: usize) -> Result<(), Error> {
    if m.rows() != rows || m.cols() != cols {
        return Err(Error::Invalid(format!(
            "tensor '{name}' has shape [{}, {}], expected [{rows}, {cols}]",
            m.rows(),
            m.cols()
        )));
    }
    Ok(())
}

fn check_len(name: &str, v: &[f32], len: usize) -> Result<(), Error> {
    if v.len() != len {
        return Err(Error::Invalid(format!(
            "tensor '{name}' has {} values, expected {len}",
            v.len()
        )));
    }
    // Norm weights and biases are read whole: one that is not finite makes every
    // output NaN.
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(Error::Invalid(format!(
            "tensor '{name}' has a value that is not finite ({} at index {i})",
            v[i]
        )));
    }
    Ok(())
}

/// Reads a matrix and checks that it has `rows` × `cols` elements.
fn load_matrix(
    w: &dyn WeightSource,
    name: &str,
    rows: usize,
    cols: usize,
) -> Result<QMatrix, Error> {
    let m = w.matrix(name)?;
    check_shape(name, &m, rows, cols)?;
    Ok(m)
}

/// Reads a vector and checks that it has `len` elements.
fn load_vector(w: &dyn WeightSource, name: &str, len: usize) -> Result<Vec<f32>, Error> {
    let v = w.vector(name)?;
    check_len(name, &v, len)?;
    Ok(v)
}

/// Reads a vector of `len` elements if the weights have it.
fn load_opt_vector(
    w: &dyn WeightSource,
    name: &str,
    len: usize,
) -> Result<Option<Vec<f32>>, Error> {
    if w.has(name) {
        load_vector(w, name, len).map(Some)
    } else {
        Ok(None)
    }
}

/// Reads and checks the weights of layer `l`.
fn load_layer(c: &Config, w: &dyn WeightSource, l: usize) -> Result<Layer, Error> {
    let qd = c.n_heads * c.head_dim;
    let kd = c.n_kv_heads * c.head_dim;
    let n = |s: &str| format!("blk.{l}.{s}");
    let gemma = c.arch == Arch::Gemma3;
    let head_norms = gemma || c.arch == Arch::Qwen3;
    // Phi-3 fuses Q, K and V into `attn_qkv`, and gate and up into `ffn_up`
    // (gate first); they are cut apart here.
    let qkv = n("attn_qkv.weight");
    let (wq, wk, wv) = if c.arch == Arch::Phi3 && w.has(&qkv) {
        let [q, k, v]: [QMatrix; 3] = load_matrix(w, &qkv, qd + 2 * kd, c.hidden)?
            .split_rows(&[qd, kd, kd])?
            .try_into()
            .expect("three blocks");
        (q, k, v)
    } else {
        (
            load_matrix(w, &n("attn_q.weight"), qd, c.hidden)?,
            load_matrix(w, &n("attn_k.weight"), kd, c.hidden)?,
            load_matrix(w, &n("attn_v.weight"), kd, c.hidden)?,
        )
    };
    let (w_gate, w_up) = if c.arch == Arch::Phi3 {
        let [g, u]: [QMatrix; 2] = load_matrix(w, &n("ffn_up.weight"), 2 * c.ffn, c.hidden)?
            .split_rows(&[c.ffn, c.ffn])?
            .try_into()
            .expect("two blocks");
        (g, u)
    } else {
        (
            load_matrix(w, &n("ffn_gate.weight"), c.ffn, c.hidden)?,
            load_matrix(w, &n("ffn_up.weight"), c.ffn, c.hidden)?,
        )
    };
    Ok(Layer {
        attn_norm: load_vector(w, &n("attn_norm.weight"), c.hidden)?,
        wq,
        wk,
        wv,
        wo: load_matrix(w, &n("attn_output.weight"), c.hidden, qd)?,
        bq: load_opt_vector(w, &n("attn_q.bias"), qd)?,
        bk: load_opt_vector(w, &n("attn_k.bias"), kd)?,
        bv: load_opt_vector(w, &n("attn_v.bias"), kd)?,
        q_norm: if head_norms {
            Some(load_vector(w, &n("attn_q_norm.weight"), c.head_dim)?)
        } else {
            None
        },
        k_norm: if head_norms {
            Some(load_vector(w, &n("attn_k_norm.weight"), c.head_dim)?)
        } else {
            None
        },
        post_attn_norm: if gemma {
            Some(load_vector(w, &n("post_attention_norm.weight"), c.hidden)?)
        } else {
            None
        },
        ffn_norm: load_vector(w, &n("ffn_norm.weight"), c.hidden)?,
        w_gate,
        w_up,
        w_down: load_matrix(w, &n("ffn_down.weight"), c.hidden, c.ffn)?,
        post_ffn_norm: if gemma {
            Some(load_vector(w, &n("post_ffw_norm.weight"), c.hidden)?)
        } else {
            None
        },
    })
}

impl Model {
    pub fn load(cfg: Config, w: &dyn WeightSource) -> Result<Model, Error> {
        let c = &cfg;
        let embed = load_matrix(w, "token_embd.weight", c.vocab, c.hidden)?;
        let mut layers = Vec::with_capacity(c.n_layers);
        for l in 0..c.n_layers {
            layers.push(load_layer(c, w, l)?);
        }
        let out_norm = load_vector(w, "output_norm.weight", c.hidden)?;
        let output = if w.has("output.weight") {
            Some(load_matrix(w, "output.weight", c.vocab, c.hidden)?)
        } else {
            None
        };
        let rope = (0..c.n_layers)
            .map(|l| {
                let (inv_freq, mscale) = c.layer_rope(l);
                LayerRope {
                    inv_freq,
                    mscale: mscale as f64,
                    style: c.rope_style,
                }
            })
            .collect();
        Ok(Model {
            rope,
            cfg,
            embed,
            layers,
            out_norm,
            output,
            precision: Precision::default(),
            learned: None,
        })
    }

    pub fn from_gguf(f: &GgufFile) -> Result<Model, Error> {
        let cfg = Config::from_gguf(f)?;
        Model::load(cfg, f)
    }

    /// Bytes of weights held (mapped or owned).
    /// Feeds what identifies these weights to `h`: the configuration, every norm's
    /// weights, and each matrix's type, shape and raw first and last rows. Cheap (a
    /// few MiB), and any fine-tune or requantization changes it.
    pub fn fingerprint_into(&self, h: &mut dyn FnMut(&[u8])) {
        h(format!("{:?}", self.cfg).as_bytes());
        let floats = |h: &mut dyn FnMut(&[u8]), v: &[f32]| {
            for x in v {
                h(&x.to_le_bytes());
            }
        };
        let matrix = |h: &mut dyn FnMut(&[u8]), m: &QMatrix| {
            h(format!("{:?} {} {}", m.dtype(), m.rows(), m.cols()).as_bytes());
            if m.rows() > 0 {
                h(m.row_raw(0));
                h(m.row_raw(m.rows() - 1));
            }
        };
        matrix(h, &self.embed);
        for l in &self.layers {
            floats(h, &l.attn_norm);
            floats(h, &l.ffn_norm);
            for m in [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down] {
                matrix(h, m);
            }
            for v in [
                &l.bq,
                &l.bk,
                &l.bv,
                &l.q_norm,
                &l.k_norm,
                &l.post_attn_norm,
                &l.post_ffn_norm,
            ]
            .into_iter()
            .flatten()
            {
                floats(h, v);
            }
        }
        floats(h, &self.out_norm);
        if let Some(o) = &self.output {
            matrix(h, o);
        }
    }

    pub fn weight_bytes(&self) -> usize {
        let l: usize = self
            .layers
            .iter()
            .map(|l| {
                [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down]
                    .iter()
                    .map(|m| m.bytes())
                    .sum::<usize>()
            })
            .sum();
        l + self.embed.bytes() + self.output_bytes()
    }

    /// Weight bytes one decode step reads: every layer's matrices, the output head
    /// (the embedding matrix when tied) and one embedding row. Norms and biases are
    /// left out (well under 0.1% of any model's weights).
    pub fn weight_bytes_per_token(&self) -> usize {
        let layers = self.weight_bytes() - self.embed.bytes() - self.output_bytes();
        let head = match &self.output {
            Some(o) => o.bytes(),
            None => self.embed.bytes(),
        };
        layers + head + self.embed.bytes() / self.embed.rows().max(1)
    }

    fn output_bytes(&self) -> usize {
        self.output.as_ref().map_or(0, |o| o.bytes())
    }

    pub fn new_cache(&self, dtype: KvDtype) -> KvCache {
        KvCache::new(
            self.cfg.n_layers,
            self.cfg.n_kv_heads,
            self.cfg.head_dim,
            dtype,
        )
    }

    fn mm(&self, w: &QMatrix, x: &[f32], n: usize, out: &mut [f32]) {
        match self.precision {
            Precision::Fast => w.matmul(x, n, out),
            Precision::Balanced => matmul_balanced(w, x, n, out),
            Precision::Exact => matmul_exact(w, x, n, out),
        }
    }

    /// Several products of the same activations (quantized once in fast and balanced
    /// precision).
    fn mm3(&self, ws: &[&QMatrix], x: &[f32], n: usize, outs: &mut [&mut [f32]]) {
        match self.precision {
            Precision::Fast => QMatrix::matmul_multi(ws, x, n, outs),
            Precision::Balanced => matmul_balanced_multi(ws, x, n, outs),
            Precision::Exact => matmul_exact_multi(ws, x, n, outs),
        }
    }

    fn output(&self) -> &QMatrix {
        self.output.as_ref().unwrap_or(&self.embed)
    }

    /// Run `tokens` through the model, appending their keys and values to `cache`.
    ///
    /// When `needs` asks for attention statistics, they are gathered into `stats`
    /// (window and last-row statistics refer to the end of `tokens`, the prompt) and
    /// accumulated attention is added to each slot's score. KVzip's reconstruction
    /// scores are not a statistic of a forward pass: they come from
    /// the engine crate's `reconstruct` module (a `Sequence` runs it), so
    /// `needs.reconstruction` is ignored here and a method that needs them reports
    /// them missing rather than reading something else.
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        needs: StatsNeeds,
        stats: Option<&mut PrefillStats>,
        logits: Logits,
    ) -> Result<Vec<f32>, Error> {
        let needs = StatsNeeds {
            reconstruction: false,
            ..needs
        };
        self.forward_peak(tokens, cache, needs, stats, logits)
    }

    /// [`Model::forward`] where `needs.reconstruction` asks for the largest attention
    /// each slot receives from the fed tokens' queries (over the query heads of its
    /// group): what KVzip's reconstruction pass (the engine's `reconstruct`) measures.
    pub fn forward_peak(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        needs: StatsNeeds,
        stats: Option<&mut PrefillStats>,
        logits: Logits,
    ) -> Result<Vec<f32>, Error> {
        self.forward_within(tokens, cache, needs, stats, logits, None)
    }

    /// [`Model::forward_peak`], asking `cancel` before each chunk of
    /// [`PREFILL_CHUNK`] tokens (a long prompt stops within one chunk of being told).
    pub fn forward_within(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        needs: StatsNeeds,
        mut stats: Option<&mut PrefillStats>,
        logits: Logits,
        cancel: Option<&kvmerger_tensors::Cancel>,
    ) -> Result<Vec<f32>, Error> {
        if tokens.is_empty() {
            return Err(Error::Invalid("no tokens to process".into()));
        }
        self.check_segment(tokens, cache, cache.n_seen + tokens.len())?;
        self.check_learned(needs)?;
        cache.reserve(tokens.len());
        let total = tokens.len();
        let mut out = Vec::new();
        for (ci, chunk) in tokens.chunks(PREFILL_CHUNK).enumerate() {
            kvmerger_tensors::check_cancel(cancel)?;
            let start = ci * PREFILL_CHUNK;
            let last_chunk = start + chunk.len() == total;
            let want = match logits {
                Logits::All => Some(Logits::All),
                Logits::Last if last_chunk => Some(Logits::Last),
                Logits::Last | Logits::None => None,
            };
            let mut seg = [Segment {
                tokens: chunk,
                cache: &mut *cache,
                needs,
                stats: stats.as_deref_mut(),
                start,
                total,
                logits: want,
            }];
            let mut l = self.forward_segments(&mut seg);
            out.append(&mut l[0]);
        }
        Ok(out)
    }

    /// One forward pass over several sequences at once, each with its own cache: the
    /// matrix products run once over all their tokens (the weights are read once per
    /// step instead of once per sequence), attention runs per sequence over its own
    /// cache. Returns each segment's logits as its `logits` field asks (empty for None).
    ///
    /// Typical use is one decode token per running sequence, plus a prefill chunk of a
    /// sequence being admitted. The caller bounds the total number of tokens: buffers
    /// of that many rows are allocated for the pass.
    pub fn forward_batch(&self, segments: &mut [Segment<'_>]) -> Result<Vec<Vec<f32>>, Error> {
        if segments.is_empty() {
            return Ok(Vec::new());
        }
        for s in segments.iter() {
            if s.tokens.is_empty() {
                return Err(Error::Invalid("no tokens to process".into()));
            }
            if s.start + s.tokens.len() > s.total {
                return Err(Error::Invalid(format!(
                    "segment of {} tokens at {} lies outside its input of {}",
                    s.tokens.len(),
                    s.start,
                    s.total
                )));
            }
            self.check_segment(s.tokens, s.cache, s.cache.n_seen + s.tokens.len())?;
            self.check_learned(s.needs)?;
        }
        for s in segments.iter_mut() {
            s.cache.reserve(s.tokens.len());
            // As in `forward`: reconstruction scores come from their own pass.
            s.needs.reconstruction = false;
        }
        Ok(self.forward_segments(segments))
    }

    /// Refuses a request for a learned scorer's predictions when none is attached.
    pub fn check_learned(&self, needs: StatsNeeds) -> Result<(), Error> {
        match &self.learned {
            None if needs.learned => Err(Error::Invalid(
                "kvzap needs a scorer trained for this model, and none is attached: train one \
                 with `kvmerger train-scorer -m MODEL` (it is written to the data directory and \
                 found there)"
                    .into(),
            )),
            Some(s) if needs.learned && !s.fits(self.cfg.n_layers, self.cfg.n_kv_heads, self.cfg.hidden) => {
                Err(Error::Invalid(format!(
                    "the attached kvzap scorer is for {} layers x {} KV heads x {} hidden, not this model's {} x {} x {}",
                    s.n_layers, s.n_kv_heads, s.hidden, self.cfg.n_layers, self.cfg.n_kv_heads, self.cfg.hidden
                )))
            }
            _ => Ok(()),
        }
    }

    fn check_segment(&self, tokens: &[u32], cache: &KvCache, end: usize) -> Result<(), Error> {
        let c = &self.cfg;
        if end > c.ctx_len {
            return Err(Error::ContextOverflow {
                prompt: end,
                ctx: c.ctx_len,
            });
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= c.vocab) {
            return Err(Error::Invalid(format!(
                "token id {bad} is outside the vocabulary of {}",
                c.vocab
            )));
        }
        if cache.layers.len() != c.n_layers
            || cache
                .layers
                .iter()
                .any(|l| l.len() != c.n_kv_heads || l.iter().any(|h| h.dim() != c.head_dim))
        {
            return Err(Error::Invalid("cache does not belong to this model".into()));
        }
        Ok(())
    }

    /// Size `stats` for this model and what `needs` asks (once; later calls keep what
    /// was collected).
    fn prepare_stats(&self, st: &mut PrefillStats, needs: StatsNeeds) {
        let c = &self.cfg;
        if st.heads.is_empty() {
            st.heads = vec![vec![HeadAccum::default(); c.n_kv_heads]; c.n_layers];
        }
        if needs.queries.is_some() && st.queries.is_empty() {
            let d = c.head_dim;
            let empty = QueryAccum {
                count: 0.0,
                sum: vec![0.0; d],
                outer: vec![0.0; d * d],
            };
            st.queries = vec![vec![empty; c.n_heads]; c.n_layers];
        }
        st.window_rows = st.window_rows.max(needs.window.unwrap_or(0));
        if needs.queries.is_some() && st.query_bias.is_empty() {
            st.query_bias = self.layers.iter().map(|l| l.bq.clone()).collect();
        }
        st.rope = self.rope.clone();
        st.scale = c.attn_scale;
    }

    /// The forward pass proper, over already validated segments.
    fn forward_segments(&self, segs: &mut [Segment<'_>]) -> Vec<Vec<f32>> {
        let pass = PassRows::new(segs);
        for seg in segs.iter_mut() {
            let needs = seg.needs;
            if let Some(stats) = seg.stats.as_deref_mut() {
                self.prepare_stats(stats, needs);
            }
        }
        let mut act = Activations::new(&self.cfg, pass.n_rows());
        self.embed_rows(segs, &mut act.residual);
        let no_logits = segs
            .iter()
            .all(|s| matches!(s.logits, None | Some(Logits::None)));
        let no_stats = !pass.requests.iter().any(|r| r.any());

        for (li, layer) in self.layers.iter().enumerate() {
            let last_layer = li + 1 == self.layers.len();
            // Attention: queries, keys and values (the queries' moments taken before
            // RoPE), the keys and values into each cache, each segment's queries over
            // its own cache, the output projection into the residual stream.
            self.project_qkv(layer, &mut act);
            self.add_query_stats(li, segs, &pass, &act.queries);
            let learned = self.learned_predictions(li, segs, &pass, &act.normed);
            self.rotate_queries_keys(li, &pass.positions, &mut act);
            self.store_keys_values(li, segs, &pass, &act, learned.as_deref());
            if last_layer && no_logits && no_stats {
                // Neither logits nor statistics: the keys and values are all.
                break;
            }
            let head_rows = self.attend_segments(li, segs, &pass, &act.queries, &mut act.attended);
            self.fold_segment_stats(li, segs, &pass, &head_rows);
            if last_layer && no_logits {
                // Nothing reads the last layer's output: its keys, values and
                // statistics are all this pass needs.
                break;
            }
            self.attention_output(layer, &mut act);
            // Feed-forward, into the residual stream.
            self.feed_forward_block(layer, &mut act);
        }
        for seg in segs.iter_mut() {
            seg.cache.n_seen += seg.tokens.len();
        }
        self.logits_rows(segs, &pass, &act.residual)
    }

    /// Each token's embedding, one row per token in segment order (scaled where the
    /// model scales its embeddings).
    fn embed_rows(&self, segs: &[Segment<'_>], residual: &mut [f32]) {
        let c = &self.cfg;
        let tokens = segs.iter().flat_map(|s| s.tokens.iter());
        for (row, &token) in residual.chunks_mut(c.hidden).zip(tokens) {
            self.embed.dequantize_row(token as usize, row);
            if c.embed_scale != 1.0 {
                row.iter_mut().for_each(|v| *v *= c.embed_scale);
            }
        }
    }

    /// RMS-normalizes each row of `input` (the hidden width) with `weight` into `output`.
    fn norm_rows(&self, input: &[f32], weight: &[f32], output: &mut [f32]) {
        let hidden = self.cfg.hidden;
        for (row, out) in input.chunks(hidden).zip(output.chunks_mut(hidden)) {
            rms_norm(row, weight, self.cfg.rms_eps, out);
        }
    }

    /// The attention block's inputs: the normalized residual stream projected to
    /// queries, keys and values, with their biases and per-head norms where the model
    /// has them.
    fn project_qkv(&self, layer: &Layer, act: &mut Activations) {
        let c = &self.cfg;
        self.norm_rows(&act.residual, &layer.attn_norm, &mut act.normed);
        self.mm3(
            &[&layer.wq, &layer.wk, &layer.wv],
            &act.normed,
            act.n_rows,
            &mut [&mut act.queries, &mut act.keys, &mut act.values],
        );
        add_bias(&mut act.queries, layer.bq.as_deref());
        add_bias(&mut act.keys, layer.bk.as_deref());
        add_bias(&mut act.values, layer.bv.as_deref());
        if let Some(weight) = &layer.q_norm {
            act.queries
                .chunks_mut(c.head_dim)
                .for_each(|head| rms_norm_inplace(head, weight, c.rms_eps));
        }
        if let Some(weight) = &layer.k_norm {
            act.keys
                .chunks_mut(c.head_dim)
                .for_each(|head| rms_norm_inplace(head, weight, c.rms_eps));
        }
    }

    /// Adds the queries (before RoPE) to the query moments of layer `li`, for each
    /// segment that asks for them, leaving out the attention-sink positions.
    fn add_query_stats(
        &self,
        li: usize,
        segs: &mut [Segment<'_>],
        pass: &PassRows,
        queries: &[f32],
    ) {
        let head_dim = self.cfg.head_dim;
        let q_width = self.cfg.n_heads * head_dim;
        for (s, seg) in segs.iter_mut().enumerate() {
            if let (Some(query_needs), Some(stats)) = (seg.needs.queries, seg.stats.as_deref_mut())
            {
                let rows = pass.rows_of(s);
                let from = rows.start
                    + pass.positions[rows.clone()]
                        .partition_point(|&p| (p as usize) < query_needs.sinks);
                add_query_moments(
                    &mut stats.queries[li],
                    &queries[from * q_width..rows.end * q_width],
                    head_dim,
                );
            }
        }
    }

    /// KVzap's predictions for layer `li` (`n_rows * n_kv_heads`) from the attention
    /// block's normalized input, for the segments that ask for them (zeros for the
    /// others); None when no segment does. Segments whose statistics keep hidden
    /// states (a scorer's training) get their rows copied out.
    fn learned_predictions(
        &self,
        li: usize,
        segs: &mut [Segment<'_>],
        pass: &PassRows,
        normed: &[f32],
    ) -> Option<Vec<f32>> {
        let hidden = self.cfg.hidden;
        for (s, seg) in segs.iter_mut().enumerate() {
            if let Some(keep) = seg.stats.as_deref_mut().and_then(|st| st.hidden.as_mut()) {
                let rows = pass.rows_of(s);
                keep.resize(self.cfg.n_layers, Vec::new());
                keep[li].extend_from_slice(&normed[rows.start * hidden..rows.end * hidden]);
            }
        }
        let scorer = self.learned.as_ref()?;
        if !segs.iter().any(|s| s.needs.learned) {
            return None;
        }
        let k = self.cfg.n_kv_heads;
        let mut out = vec![0.0f32; pass.n_rows() * k];
        for (s, seg) in segs.iter().enumerate() {
            if seg.needs.learned {
                let rows = pass.rows_of(s);
                scorer.predict(
                    li,
                    &normed[rows.start * hidden..rows.end * hidden],
                    &mut out[rows.start * k..rows.end * k],
                );
            }
        }
        Some(out)
    }

    /// Rotates the queries and keys by their positions (RoPE), with layer `li`'s base.
    fn rotate_queries_keys(&self, li: usize, positions: &[u32], act: &mut Activations) {
        let c = &self.cfg;
        let r = &self.rope[li];
        rope(&mut act.queries, positions, c.head_dim, r);
        rope(&mut act.keys, positions, c.head_dim, r);
    }

    /// Appends each segment's keys and values to layer `li` of its cache: one slot per
    /// token and KV head, with KVzap's prediction where one was made.
    fn store_keys_values(
        &self,
        li: usize,
        segs: &mut [Segment<'_>],
        pass: &PassRows,
        act: &Activations,
        learned: Option<&[f32]>,
    ) {
        let head_dim = self.cfg.head_dim;
        let kv_width = self.cfg.n_kv_heads * head_dim;
        for (s, seg) in segs.iter_mut().enumerate() {
            let stores = &mut seg.cache.layers[li];
            let stores_len = stores.len();
            let rows = pass.rows_of(s);
            for (row, &pos) in rows.clone().zip(&pass.positions[rows]) {
                for (h, store) in stores.iter_mut().enumerate() {
                    let at = row * kv_width + h * head_dim;
                    let mut meta = SlotMeta::token(pos);
                    if let Some(p) = learned {
                        meta.learned = p[row * stores_len + h];
                    }
                    store.push(
                        &act.keys[at..at + head_dim],
                        &act.values[at..at + head_dim],
                        meta,
                    );
                }
            }
        }
    }

    /// Each segment's queries attend over layer `li` of its own cache, into `attended`
    /// (segments in parallel: they are independent). Returns each segment's
    /// statistics rows, one per query head.
    fn attend_segments(
        &self,
        li: usize,
        segs: &[Segment<'_>],
        pass: &PassRows,
        queries: &[f32],
        attended: &mut [f32],
    ) -> Vec<Vec<HeadRows>> {
        let c = &self.cfg;
        let q_width = c.n_heads * c.head_dim;
        let params = LayerAttn {
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
            scale: c.attn_scale,
            window: if c.is_local(li) {
                c.sliding_window
            } else {
                None
            },
        };
        if segs.len() == 1 {
            return vec![attend(
                params,
                &segs[0].cache.layers[li],
                queries,
                pass.n_rows(),
                &pass.positions,
                pass.requests[0],
                attended,
            )];
        }
        let mut outs = Vec::with_capacity(segs.len());
        let mut rest = attended;
        for s in 0..segs.len() {
            let (own, others) = rest.split_at_mut(pass.rows_of(s).len() * q_width);
            outs.push(own);
            rest = others;
        }
        segs.par_iter()
            .zip(outs.into_par_iter())
            .enumerate()
            .map(|(s, (seg, out))| {
                let rows = pass.rows_of(s);
                attend(
                    params,
                    &seg.cache.layers[li],
                    &queries[rows.start * q_width..rows.end * q_width],
                    rows.len(),
                    &pass.positions[rows],
                    pass.requests[s],
                    out,
                )
            })
            .collect()
    }

    /// Folds each segment's attention statistics of layer `li` into its cache's scores
    /// and its `stats`, for the segments that ask for any.
    fn fold_segment_stats(
        &self,
        li: usize,
        segs: &mut [Segment<'_>],
        pass: &PassRows,
        head_rows: &[Vec<HeadRows>],
    ) {
        for ((seg, rows), request) in segs.iter_mut().zip(head_rows).zip(&pass.requests) {
            if request.any() {
                fold_stats(
                    &self.cfg,
                    li,
                    rows,
                    &mut seg.cache.layers[li],
                    seg.stats.as_deref_mut(),
                );
            }
        }
    }

    /// The attention block's output: the attended heads projected back to the hidden
    /// width, added to the residual stream.
    fn attention_output(&self, layer: &Layer, act: &mut Activations) {
        self.mm(&layer.wo, &act.attended, act.n_rows, &mut act.out);
        self.add_to_residual(layer.post_attn_norm.as_deref(), act);
    }

    /// The feed-forward block: the normalized residual stream through the gated
    /// activation and down projection, added to the residual stream.
    fn feed_forward_block(&self, layer: &Layer, act: &mut Activations) {
        self.norm_rows(&act.residual, &layer.ffn_norm, &mut act.normed);
        self.mm3(
            &[&layer.w_gate, &layer.w_up],
            &act.normed,
            act.n_rows,
            &mut [&mut act.gate, &mut act.up],
        );
        let gate_rows = |gate: &mut [f32], up: &[f32]| match self.cfg.activation {
            Activation::Silu => silu_mul(gate, up),
            Activation::GeluTanh => gate
                .iter_mut()
                .zip(up)
                .for_each(|(g, u)| *g = gelu_tanh(*g) * u),
        };
        if act.n_rows > 1 {
            let ffn = self.cfg.ffn;
            act.gate
                .par_chunks_mut(ffn)
                .zip(act.up.par_chunks(ffn))
                .for_each(|(g, u)| gate_rows(g, u));
        } else {
            gate_rows(&mut act.gate, &act.up);
        }
        self.mm(&layer.w_down, &act.gate, act.n_rows, &mut act.out);
        self.add_to_residual(layer.post_ffn_norm.as_deref(), act);
    }

    /// Adds a block's output (`act.out`) to the residual stream, each row normalized
    /// first where the model has a post-block norm.
    fn add_to_residual(&self, post_norm: Option<&[f32]>, act: &mut Activations) {
        if let Some(weight) = post_norm {
            act.out
                .chunks_mut(self.cfg.hidden)
                .for_each(|row| rms_norm_inplace(row, weight, self.cfg.rms_eps));
        }
        act.residual
            .iter_mut()
            .zip(&act.out)
            .for_each(|(r, o)| *r += o);
    }

    /// Each segment's logits, as its `logits` field asks (empty for none): the rows
    /// wanted are normalized and projected by the output head in one product.
    fn logits_rows(
        &self,
        segs: &[Segment<'_>],
        pass: &PassRows,
        residual: &[f32],
    ) -> Vec<Vec<f32>> {
        let c = &self.cfg;
        let hidden = c.hidden;
        // (segment, row) for each row whose logits are wanted.
        let mut wanted: Vec<(usize, usize)> = Vec::new();
        for (s, seg) in segs.iter().enumerate() {
            match seg.logits {
                None => {}
                Some(Logits::All) => wanted.extend(pass.rows_of(s).map(|r| (s, r))),
                Some(Logits::Last) => wanted.push((s, pass.rows_of(s).end - 1)),
                Some(Logits::None) => {}
            }
        }
        let mut out = vec![Vec::new(); segs.len()];
        if wanted.is_empty() {
            return out;
        }
        let n_wanted = wanted.len();
        let mut normed = vec![0.0f32; n_wanted * hidden];
        for (i, &(_, r)) in wanted.iter().enumerate() {
            rms_norm(
                &residual[r * hidden..(r + 1) * hidden],
                &self.out_norm,
                c.rms_eps,
                &mut normed[i * hidden..(i + 1) * hidden],
            );
        }
        let mut logits = vec![0.0f32; n_wanted * c.vocab];
        self.mm(self.output(), &normed, n_wanted, &mut logits);
        for (i, &(s, _)) in wanted.iter().enumerate() {
            out[s].extend_from_slice(&logits[i * c.vocab..(i + 1) * c.vocab]);
        }
        out
    }
}

/// The rows of one forward pass: where each segment's lie, their positions, and the
/// attention statistics each segment asks for.
struct PassRows {
    /// Segment s owns rows `bounds[s]..bounds[s + 1]`.
    bounds: Vec<usize>,
    /// Each row's position in its sequence.
    positions: Vec<u32>,
    /// Each segment's statistics request.
    requests: Vec<StatsRequest>,
}

impl PassRows {
    fn new(segs: &[Segment<'_>]) -> PassRows {
        let mut bounds = vec![0usize];
        for s in segs {
            bounds.push(bounds.last().unwrap() + s.tokens.len());
        }
        let positions = segs
            .iter()
            .flat_map(|s| (0..s.tokens.len()).map(|i| (s.cache.n_seen + i) as u32))
            .collect();
        let requests = segs.iter().map(|s| s.stats_request()).collect();
        PassRows {
            bounds,
            positions,
            requests,
        }
    }

    /// The number of rows of the pass (all segments' tokens).
    fn n_rows(&self) -> usize {
        *self.bounds.last().unwrap()
    }

    /// Segment `s`'s rows.
    fn rows_of(&self, s: usize) -> Range<usize> {
        self.bounds[s]..self.bounds[s + 1]
    }
}

/// The activation buffers of a forward pass, one row per token: allocated once and
/// reused by every layer.
struct Activations {
    n_rows: usize,
    /// The residual stream (hidden width).
    residual: Vec<f32>,
    /// The residual stream normalized, a block's input (hidden width).
    normed: Vec<f32>,
    /// Queries (all query heads), keys and values (all KV heads).
    queries: Vec<f32>,
    keys: Vec<f32>,
    values: Vec<f32>,
    /// Attention's output per query head, before the output projection.
    attended: Vec<f32>,
    /// A block's output, before it is added to the residual stream (hidden width).
    out: Vec<f32>,
    /// The feed-forward gate and up projections (feed-forward width).
    gate: Vec<f32>,
    up: Vec<f32>,
}

impl Activations {
    fn new(c: &Config, n_rows: usize) -> Activations {
        let q_width = c.n_heads * c.head_dim;
        let kv_width = c.n_kv_heads * c.head_dim;
        let rows_of = |width: usize| vec![0.0f32; n_rows * width];
        Activations {
            n_rows,
            residual: rows_of(c.hidden),
            normed: rows_of(c.hidden),
            queries: rows_of(q_width),
            keys: rows_of(kv_width),
            values: rows_of(kv_width),
            attended: rows_of(q_width),
            out: rows_of(c.hidden),
            gate: rows_of(c.ffn),
            up: rows_of(c.ffn),
        }
    }
}

/// Prefill runs in chunks of this many tokens, so no n×n attention is held and the
/// activation buffers stay small.
pub const PREFILL_CHUNK: usize = 256;

/// One sequence's share of a [`Model::forward_batch`] pass.
pub struct Segment<'a> {
    /// Tokens to append to this sequence (one for a decode step, a chunk for prefill).
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    /// Attention statistics to collect, into `stats`.
    pub needs: StatsNeeds,
    pub stats: Option<&'a mut PrefillStats>,
    /// `tokens` start at `start` within an input of `total` tokens (a whole prompt
    /// prefilled in chunks): window and last-row statistics refer to that input's end.
    /// A decode step is `start: 0, total: 1`.
    pub start: usize,
    pub total: usize,
    pub logits: Option<Logits>,
}

impl<'a> Segment<'a> {
    /// One decode step: `token` appended, the last position's logits returned.
    pub fn decode(
        token: &'a [u32],
        cache: &'a mut KvCache,
        needs: StatsNeeds,
        stats: Option<&'a mut PrefillStats>,
    ) -> Segment<'a> {
        Segment {
            tokens: token,
            cache,
            needs,
            stats,
            start: 0,
            total: token.len(),
            logits: Some(Logits::Last),
        }
    }

    fn stats_request(&self) -> StatsRequest {
        let (start, len, total) = (self.start, self.tokens.len(), self.total);
        // Statistics other than the accumulated score go into `stats`: without it
        // there is nowhere to put them.
        let keep = self.stats.is_some();
        StatsRequest {
            accumulated: self.needs.accumulated,
            window_from: self.needs.window.filter(|_| keep).and_then(|w| {
                let from = total.saturating_sub(w);
                (from < start + len).then(|| from.saturating_sub(start))
            }),
            last_at: (keep && self.needs.last && start + len == total).then(|| len - 1),
            peak: keep && self.needs.reconstruction,
        }
    }
}

fn add_bias(x: &mut [f32], b: Option<&[f32]>) {
    if let Some(b) = b {
        for row in x.chunks_mut(b.len()) {
            row.iter_mut().zip(b).for_each(|(a, b)| *a += b);
        }
    }
}

/// Rotary position embedding, in place, on rows of heads of size `d`.
/// `r.inv_freq[i]` is pair i's angle per position and `r.mscale` the factor on the
/// rotated vectors (YaRN's; 1 otherwise): [`Config::layer_rope`].
fn rope(x: &mut [f32], positions: &[u32], d: usize, r: &LayerRope) {
    let (inv, style) = (&r.inv_freq, r.style);
    let mscale = r.mscale as f32;
    let half = d / 2;
    let per_tok = x.len() / positions.len();
    let mut cs = vec![(0.0f32, 0.0f32); half];
    for (row, &pos) in x.chunks_mut(per_tok).zip(positions) {
        for (i, c) in cs.iter_mut().enumerate() {
            let a = pos as f64 * inv[i];
            *c = (a.cos() as f32 * mscale, a.sin() as f32 * mscale);
        }
        for h in row.chunks_mut(d) {
            for (i, &(cos, sin)) in cs.iter().enumerate() {
                let (a, b) = match style {
                    RopeStyle::Adjacent => (2 * i, 2 * i + 1),
                    RopeStyle::Neox => (i, i + half),
                };
                let (x0, x1) = (h[a], h[b]);
                h[a] = x0 * cos - x1 * sin;
                h[b] = x0 * sin + x1 * cos;
            }
        }
    }
}

/// Sum each group's query-head rows into its KV head's statistics.
fn fold_stats(
    c: &Config,
    layer: usize,
    rows: &[HeadRows],
    stores: &mut [kvmerger_compression::HeadStore],
    stats: Option<&mut PrefillStats>,
) {
    let group = c.group();
    let mut stats = stats;
    for (g, store) in stores.iter_mut().enumerate() {
        let n = store.len();
        let heads = &rows[g * group..(g + 1) * group];
        let sum_rows = |pick: &dyn Fn(&HeadRows) -> &[f32]| {
            let mut sum = vec![0.0f32; n];
            for r in heads {
                sum.iter_mut().zip(pick(r)).for_each(|(a, b)| *a += b);
            }
            sum
        };
        if !heads[0].accumulated.is_empty() {
            store.add_scores(&sum_rows(&|r| &r.accumulated));
        }
        let Some(s) = stats.as_deref_mut() else {
            continue;
        };
        let cap = s.window_rows;
        let hs = &mut s.heads[layer][g];
        for q in 0..heads[0].window.len() {
            hs.window.push_back(sum_rows(&|r| &r.window[q]));
            while hs.window.len() > cap {
                hs.window.pop_front();
            }
        }
        if !heads[0].last.is_empty() {
            hs.last = Some(sum_rows(&|r| &r.last));
        }
        if !heads[0].peak.is_empty() {
            let peak = hs.reconstruction.get_or_insert_with(Vec::new);
            peak.resize(n, 0.0);
            for r in heads {
                peak.iter_mut()
                    .zip(&r.peak)
                    .for_each(|(a, &b)| *a = a.max(b));
            }
        }
    }
}

/// Adds the rows of `q` (each `n_heads * d` values, before RoPE) to each query head's
/// running moments. Sums over the chunk are taken in f32 (a few hundred rows) and
/// added to the f64 totals.
fn add_query_moments(acc: &mut [QueryAccum], q: &[f32], d: usize) {
    let n_heads = acc.len();
    let rows = q.len() / (n_heads * d);
    if rows == 0 {
        return;
    }
    acc.par_iter_mut().enumerate().for_each(|(h, a)| {
        let mut sum = vec![0.0f32; d];
        let mut outer = vec![0.0f32; d * d];
        for r in 0..rows {
            let x = &q[(r * n_heads + h) * d..(r * n_heads + h + 1) * d];
            sum.iter_mut().zip(x).for_each(|(s, v)| *s += v);
            for (i, &xi) in x.iter().enumerate() {
                // Upper triangle only; mirrored below.
                for (o, &xj) in outer[i * d + i..(i + 1) * d].iter_mut().zip(&x[i..]) {
                    *o += xi * xj;
                }
            }
        }
        a.count += rows as f64;
        a.sum
            .iter_mut()
            .zip(&sum)
            .for_each(|(t, &s)| *t += s as f64);
        for i in 0..d {
            for j in i..d {
                let v = outer[i * d + j] as f64;
                a.outer[i * d + j] += v;
                if i != j {
                    a.outer[j * d + i] += v;
                }
            }
        }
    });
}

/// The (a, b) index pairs RoPE rotates together, with frequency index `i` = position
/// in the list, for heads of size `d`.
pub fn rope_pairs(d: usize, style: RopeStyle) -> Vec<(usize, usize)> {
    let half = d / 2;
    (0..half)
        .map(|i| match style {
            RopeStyle::Adjacent => (2 * i, 2 * i + 1),
            RopeStyle::Neox => (i, i + half),
        })
        .collect()
}
