//! Model hyperparameters, read from GGUF metadata or a Hugging Face config.json.

use crate::Error;
use kvmerger_tensors::gguf::GgufFile;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
    /// Qwen3 (dense): qwen2 with an RMS norm on each query and key head, no biases.
    Qwen3,
    Gemma3,
    /// Phi-3 and Phi-4 (`phi3`): llama's blocks with the Q, K and V projections fused
    /// into one matrix and the gate and up projections into another, split at load.
    Phi3,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma3 => "gemma3",
            Arch::Phi3 => "phi3",
        }
    }
}

/// How RoPE pairs the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs (2i, 2i+1): llama-architecture GGUFs, whose Q/K weights are permuted for it.
    Adjacent,
    /// Pairs (i, i + d/2): Hugging Face checkpoints, qwen2, gemma3.
    Neox,
}

/// How RoPE's frequencies are stretched so that a model reads past the context it was
/// first trained at. Layers with their own local base (gemma3's sliding-window layers)
/// are never scaled.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum RopeScaling {
    #[default]
    None,
    /// Positions divided by `factor` (`linear`: GGUF `rope.scaling.type`, HF
    /// `rope_scaling.rope_type`).
    Linear { factor: f32 },
    /// Each frequency divided by its own factor, one per rotated pair: Llama 3.1/3.2's
    /// `llama3` scaling (GGUF `rope_freqs.weight`, or computed from config.json).
    Frequencies(Vec<f32>),
    /// YaRN (Qwen2.5's long-context setting): frequencies that turn fewer than
    /// `beta_slow` times over the original context are interpolated (divided by
    /// `factor`), those that turn more than `beta_fast` times are kept, with a linear
    /// ramp between; rotated queries and keys are scaled by `mscale`
    /// (0.1 ln factor + 1 unless the model says otherwise).
    Yarn(Yarn),
    /// LongRoPE (Phi-3's `longrope`, formerly `su`): each frequency divided by its own
    /// factor, as [`RopeScaling::Frequencies`], and the rotated queries and keys
    /// scaled by `mscale` (sqrt(1 + ln(s) / ln(original)) for a context stretched
    /// s times, unless the model says otherwise). The model gives two sets of
    /// factors: the long ones when its context is longer than the original one
    /// (llama.cpp's choice, made once so that every cached key was rotated alike;
    /// Hugging Face switches to the short ones while a sequence is within the
    /// original context), the short ones otherwise.
    LongRope { factors: Vec<f32>, mscale: f32 },
}

/// YaRN's settings ([`RopeScaling::Yarn`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Yarn {
    pub factor: f32,
    /// The context the model was first trained at.
    pub original: usize,
    pub beta_fast: f32,
    pub beta_slow: f32,
    pub mscale: f32,
}

/// LongRoPE's default attention factor for a context of `ctx` tokens stretched from
/// `original`: sqrt(1 + ln(s) / ln(original)) with s = ctx / original, 1 when not
/// stretched.
pub fn longrope_mscale(ctx: f64, original: f64) -> f32 {
    let s = ctx / original;
    if s <= 1.0 || original <= 1.0 {
        1.0
    } else {
        (1.0 + s.ln() / original.ln()).sqrt() as f32
    }
}

/// YaRN's angle per position of each rotated pair (the formula of the YaRN paper,
/// arXiv 2309.00071, as Hugging Face and llama.cpp compute it).
pub fn yarn_inv_freq(
    head_dim: usize,
    base: f64,
    factor: f64,
    original: f64,
    beta_fast: f64,
    beta_slow: f64,
) -> Vec<f64> {
    let d = head_dim as f64;
    // The pair index at which a frequency turns `rotations` times over the original
    // context.
    let pair = |rotations: f64| {
        d * (original / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * base.ln())
    };
    let half = head_dim / 2;
    let low = pair(beta_fast).floor().max(0.0);
    let high = pair(beta_slow).ceil().min(head_dim as f64 - 1.0);
    let span = if high == low { 0.001 } else { high - low };
    (0..half)
        .map(|i| {
            let extrapolated = base.powf(-2.0 * i as f64 / d);
            let interpolated = extrapolated / factor;
            // 0 below `low` (keep the frequency), 1 above `high` (interpolate it).
            let ramp = ((i as f64 - low) / span).clamp(0.0, 1.0);
            extrapolated * (1.0 - ramp) + interpolated * ramp
        })
        .collect()
}

/// Llama 3's per-frequency divisors (`rope_type: llama3`): frequencies whose wavelength
/// is shorter than `original / high_freq_factor` stay, those longer than
/// `original / low_freq_factor` are divided by `factor`, and those between are
/// interpolated smoothly in between.
pub fn llama3_frequency_factors(
    head_dim: usize,
    base: f64,
    factor: f64,
    low_freq_factor: f64,
    high_freq_factor: f64,
    original: f64,
) -> Vec<f32> {
    let low_wavelen = original / low_freq_factor;
    let high_wavelen = original / high_freq_factor;
    (0..head_dim / 2)
        .map(|i| {
            let freq = base.powf(-2.0 * i as f64 / head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let divisor = if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth =
                    (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            divisor as f32
        })
        .collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Silu,
    GeluTanh,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub arch: Arch,
    pub n_layers: usize,
    pub hidden: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub ctx_len: usize,
    pub rope_base: f32,
    /// RoPE base of sliding-window layers (gemma3).
    pub rope_base_local: f32,
    pub rope_style: RopeStyle,
    pub rope_scaling: RopeScaling,
    pub rms_eps: f32,
    /// Window of sliding-window layers, if the model has any.
    pub sliding_window: Option<usize>,
    /// Every `global_every`-th layer is global when the model has sliding-window layers.
    pub global_every: usize,
    pub activation: Activation,
    /// Multiply embeddings by this (gemma3: sqrt(hidden)).
    pub embed_scale: f32,
    pub attn_scale: f32,
}

impl Config {
    /// Whether `layer` attends only within the sliding window.
    pub fn is_local(&self, layer: usize) -> bool {
        self.sliding_window.is_some() && !(layer + 1).is_multiple_of(self.global_every.max(1))
    }
    pub fn layer_rope_base(&self, layer: usize) -> f32 {
        if self.is_local(layer) {
            self.rope_base_local
        } else {
            self.rope_base
        }
    }
    /// The angle per position of each of `layer`'s rotated pairs, scaling included,
    /// and the factor on the rotated vectors' length (YaRN's mscale; 1 otherwise).
    /// Layers with their own local base are never scaled.
    pub fn layer_rope(&self, layer: usize) -> (Vec<f64>, f32) {
        let base = self.layer_rope_base(layer) as f64;
        let d = self.head_dim;
        let plain = |i: usize| base.powf(-2.0 * i as f64 / d as f64);
        let scaled =
            |divisor: &dyn Fn(usize) -> f64| (0..d / 2).map(|i| plain(i) / divisor(i)).collect();
        match &self.rope_scaling {
            _ if self.is_local(layer) => (scaled(&|_| 1.0), 1.0),
            RopeScaling::None => (scaled(&|_| 1.0), 1.0),
            RopeScaling::Linear { factor } => (scaled(&|_| *factor as f64), 1.0),
            RopeScaling::Frequencies(v) => (scaled(&|i| v[i] as f64), 1.0),
            RopeScaling::LongRope { factors, mscale } => (scaled(&|i| factors[i] as f64), *mscale),
            RopeScaling::Yarn(y) => (
                yarn_inv_freq(
                    d,
                    base,
                    y.factor as f64,
                    y.original as f64,
                    y.beta_fast as f64,
                    y.beta_slow as f64,
                ),
                y.mscale,
            ),
        }
    }

    pub fn group(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }

    pub fn from_gguf(f: &GgufFile) -> Result<Config, Error> {
        let arch = gguf_arch(f)?;
        let a = arch.name();
        let k = |s: &str| format!("{a}.{s}");
        let hidden = f.u64(&k("embedding_length"))? as usize;
        let n_heads = f.u64(&k("attention.head_count"))? as usize;
        let n_kv_heads = f
            .get(&k("attention.head_count_kv"))
            .and_then(|v| v.as_u64())
            .unwrap_or(n_heads as u64) as usize;
        let head_dim = match f.get(&k("attention.key_length")).and_then(|v| v.as_u64()) {
            Some(d) => d as usize,
            None if n_heads > 0 => hidden / n_heads,
            None => 0,
        };
        let vocab = gguf_vocab(f, &k)?;
        let (rope_style, activation, embed_scale, sliding_window) =
            gguf_arch_style(f, &k, arch, hidden);
        let rope_base = f
            .get(&k("rope.freq_base"))
            .and_then(|v| v.as_f64())
            .unwrap_or(10000.0) as f32;
        let ctx_len = f
            .get(&k("context_length"))
            .and_then(|v| v.as_u64())
            .unwrap_or(4096) as usize;
        gguf_check_full_rotary(f, &k, head_dim)?;
        let rope_scaling = gguf_rope_scaling(f, &k, ctx_len)?;
        let cfg = Config {
            arch,
            n_layers: f.u64(&k("block_count"))? as usize,
            hidden,
            n_heads,
            n_kv_heads,
            head_dim,
            ffn: f.u64(&k("feed_forward_length"))? as usize,
            vocab,
            ctx_len,
            rope_base,
            rope_base_local: 10000.0,
            rope_style,
            rope_scaling,
            rms_eps: f
                .get(&k("attention.layer_norm_rms_epsilon"))
                .and_then(|v| v.as_f64())
                .unwrap_or(1e-6) as f32,
            sliding_window,
            global_every: 6,
            activation,
            embed_scale,
            attn_scale: 1.0 / (head_dim as f32).sqrt(),
        };
        cfg.validate().map_err(|msg| Error::Format {
            path: f.path.clone(),
            msg,
        })?;
        Ok(cfg)
    }

    /// Sanity bounds on every size read from a file, checked before anything is
    /// allocated from them. They are generous for real models (a 405B Llama has 126
    /// layers, hidden 16384, 128 heads, feed-forward 53248; the largest vocabularies
    /// have about 262k tokens): anything beyond is a corrupt or hostile file.
    pub fn validate(&self) -> Result<(), String> {
        let c = self;
        let bounds: [(&str, usize, usize); 8] = [
            ("layer count", c.n_layers, 1024),
            ("hidden size", c.hidden, 1 << 16),
            ("attention head count", c.n_heads, 1024),
            ("KV head count", c.n_kv_heads, 1024),
            ("head dimension", c.head_dim, 1024),
            ("feed-forward size", c.ffn, 1 << 20),
            ("vocabulary size", c.vocab, 1 << 24),
            ("context length", c.ctx_len, 1 << 24),
        ];
        for (what, v, max) in bounds {
            if v == 0 || v > max {
                return Err(format!(
                    "implausible {what} {v} (expected 1 to {max}): corrupt or unsupported model file"
                ));
            }
        }
        if !c.n_heads.is_multiple_of(c.n_kv_heads) {
            return Err(format!(
                "{} query heads are not a multiple of {} KV heads",
                c.n_heads, c.n_kv_heads
            ));
        }
        if !c.head_dim.is_multiple_of(2) {
            return Err(format!("head dimension {} is odd", c.head_dim));
        }
        if c.n_heads * c.head_dim > 1 << 17 {
            return Err(format!(
                "implausible attention width: {} heads of {} dimensions",
                c.n_heads, c.head_dim
            ));
        }
        c.validate_rope_scaling()?;
        for (what, base) in [
            ("RoPE base", c.rope_base),
            ("local RoPE base", c.rope_base_local),
        ] {
            if !(base.is_finite() && base > 1.0) {
                return Err(format!(
                    "{what} {base} is not a finite number above 1 (real models use 10000 to a few million)"
                ));
            }
        }
        if !(c.rms_eps.is_finite() && c.rms_eps > 0.0 && c.rms_eps < 1.0) {
            return Err(format!(
                "RMS norm epsilon {} is not a small positive number (real models use 1e-6 or 1e-5)",
                c.rms_eps
            ));
        }
        if c.sliding_window == Some(0) || c.global_every == 0 {
            return Err(format!(
                "sliding window {:?} or global layer period {} is zero",
                c.sliding_window, c.global_every
            ));
        }
        if !(c.attn_scale.is_finite() && c.attn_scale > 0.0) {
            return Err(format!("attention scale {} is not positive", c.attn_scale));
        }
        Ok(())
    }

    /// Sanity bounds on the RoPE scaling settings (factors, YaRN parameters, frequency factors).
    fn validate_rope_scaling(&self) -> Result<(), String> {
        let c = self;
        match &c.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => {
                if !(factor.is_finite() && *factor >= 1e-2 && *factor <= 1e4) {
                    return Err(format!(
                    "implausible linear RoPE scaling factor {factor} (expected from 0.01 to 10000)"
                ));
                }
            }
            RopeScaling::Yarn(y) => {
                let ok = |x: f32, lo: f32, hi: f32| x.is_finite() && x >= lo && x <= hi;
                if !(ok(y.factor, 1e-2, 1e4)
                    && ok(y.beta_fast, 1e-3, 1e4)
                    && ok(y.beta_slow, 1e-3, 1e4)
                    && y.beta_fast > y.beta_slow
                    && ok(y.mscale, 1e-2, 100.0)
                    && (1..=1 << 24).contains(&y.original))
                {
                    return Err(format!(
                    "implausible YaRN settings: factor {}, original context {}, beta_fast {}, beta_slow {}, mscale {}",
                    y.factor, y.original, y.beta_fast, y.beta_slow, y.mscale
                ));
                }
            }
            RopeScaling::Frequencies(v) | RopeScaling::LongRope { factors: v, .. } => {
                if let RopeScaling::LongRope { mscale, .. } = &c.rope_scaling {
                    if !(mscale.is_finite() && *mscale >= 1e-2 && *mscale <= 100.0) {
                        return Err(format!(
                        "implausible LongRoPE attention factor {mscale} (rope.scaling.attn_factor; expected from 0.01 to 100)"
                    ));
                    }
                }
                if v.len() != c.head_dim / 2 {
                    return Err(format!(
                        "{} RoPE frequency factors for heads of {} dimensions (expected {})",
                        v.len(),
                        c.head_dim,
                        c.head_dim / 2
                    ));
                }
                if let Some(bad) = v
                    .iter()
                    .find(|x| !(x.is_finite() && **x >= 1e-2 && **x <= 1e4))
                {
                    return Err(format!(
                    "implausible RoPE frequency factor {bad} (rope_freqs / rope_factors_*; expected from 0.01 to 10000)"
                ));
                }
            }
        }
        Ok(())
    }
}

/// The architecture named by `general.architecture`, or an error if unsupported.
fn gguf_arch(f: &GgufFile) -> Result<Arch, Error> {
    let arch_name = f.str("general.architecture")?.to_string();
    Ok(match arch_name.as_str() {
        "llama" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
        "qwen3" => Arch::Qwen3,
        "gemma3" => Arch::Gemma3,
        "phi3" => Arch::Phi3,
        _ => return Err(Error::UnsupportedArchitecture(arch_name)),
    })
}

/// The vocabulary size: the `vocab_size` key, else the token embedding's second dimension.
fn gguf_vocab(f: &GgufFile, k: &dyn Fn(&str) -> String) -> Result<usize, Error> {
    Ok(match f.get(&k("vocab_size")).and_then(|v| v.as_u64()) {
        Some(v) => v as usize,
        None => f
            .tensor("token_embd.weight")?
            .dims
            .get(1)
            .copied()
            .unwrap_or(0) as usize,
    })
}

/// The architecture's RoPE style, activation, embedding scale and sliding window.
fn gguf_arch_style(
    f: &GgufFile,
    k: &dyn Fn(&str) -> String,
    arch: Arch,
    hidden: usize,
) -> (RopeStyle, Activation, f32, Option<usize>) {
    match arch {
        Arch::Llama => (RopeStyle::Adjacent, Activation::Silu, 1.0, None),
        // Phi-3's sliding window (2047 in the mini 4k model) is not applied, as
        // llama.cpp does not apply it either: attention is over the whole cache.
        Arch::Qwen2 | Arch::Qwen3 | Arch::Phi3 => (RopeStyle::Neox, Activation::Silu, 1.0, None),
        Arch::Gemma3 => (
            RopeStyle::Neox,
            Activation::GeluTanh,
            (hidden as f32).sqrt(),
            Some(
                f.get(&k("attention.sliding_window"))
                    .and_then(|v| v.as_u64())
                    .unwrap_or(512) as usize,
            ),
        ),
    }
}

/// Refuses a partial rotary embedding (RoPE over fewer dimensions than the head's).
fn gguf_check_full_rotary(
    f: &GgufFile,
    k: &dyn Fn(&str) -> String,
    head_dim: usize,
) -> Result<(), Error> {
    if let Some(rot) = f.get(&k("rope.dimension_count")).and_then(|v| v.as_u64()) {
        if rot != head_dim as u64 {
            return Err(Error::Format {
                path: f.path.clone(),
                msg: format!(
                    "RoPE over {rot} of each head's {head_dim} dimensions (partial rotary \
                     embedding, as in Phi-4-mini) is not supported"
                ),
            });
        }
    }
    Ok(())
}

/// RoPE scaling from GGUF metadata (`rope.scaling.type`, `rope.scaling.factor`),
/// Llama 3's per-frequency factors (`rope_freqs.weight`) and Phi-3's LongRoPE factors
/// (`rope_factors_long.weight`, `rope_factors_short.weight`, with
/// `rope.scaling.original_context_length` and `rope.scaling.attn_factor`).
fn gguf_rope_scaling(
    f: &GgufFile,
    k: &dyn Fn(&str) -> String,
    ctx_len: usize,
) -> Result<RopeScaling, Error> {
    // A known key of the wrong type is refused, not read as absent.
    let wrong = |key: &str, want: &str| Error::Format {
        path: f.path.clone(),
        msg: format!("metadata {} is not {want}", k(key)),
    };
    for key in [
        "rope.scaling.attn_factor",
        "rope.scaling.yarn_beta_fast",
        "rope.scaling.yarn_beta_slow",
    ] {
        if f.get(&k(key)).is_some_and(|v| v.as_f64().is_none()) {
            return Err(wrong(key, "a number"));
        }
    }
    if f.tensors.contains_key("rope_factors_long.weight") {
        return gguf_longrope(f, k, ctx_len);
    }
    let kind = match f.get(&k("rope.scaling.type")) {
        None => None,
        Some(v) => Some(
            v.as_str()
                .ok_or_else(|| wrong("rope.scaling.type", "a string"))?
                .to_string(),
        ),
    };
    let factor = match f.get(&k("rope.scaling.factor")) {
        None => 1.0,
        Some(v) => v
            .as_f64()
            .ok_or_else(|| wrong("rope.scaling.factor", "a number"))? as f32,
    };
    let linear = match kind.as_deref() {
        None | Some("none") => 1.0,
        Some("longrope" | "su") => {
            return Err(Error::Format {
                path: f.path.clone(),
                msg: "RoPE scaling 'longrope' needs the tensor rope_factors_long.weight".into(),
            })
        }
        Some("linear") => factor,
        Some("yarn") => return gguf_yarn(f, k, factor),
        Some(other) => {
            return Err(Error::Format {
                path: f.path.clone(),
                msg: format!(
                "RoPE scaling '{other}' is not supported (supported: linear, yarn, LongRoPE and \
                     Llama 3's frequency factors)"
            ),
            })
        }
    };
    if f.tensors.contains_key("rope_freqs.weight") {
        let v = kvmerger_tensors::quant::QMatrix::from_gguf(f, "rope_freqs.weight")?.to_f32();
        return Ok(RopeScaling::Frequencies(
            v.into_iter().map(|x| x * linear).collect(),
        ));
    }
    Ok(if linear == 1.0 {
        RopeScaling::None
    } else {
        RopeScaling::Linear { factor: linear }
    })
}

/// LongRoPE scaling from Phi-3's `rope_factors_long.weight` / `rope_factors_short.weight`
/// tensors and their metadata.
fn gguf_longrope(
    f: &GgufFile,
    k: &dyn Fn(&str) -> String,
    ctx_len: usize,
) -> Result<RopeScaling, Error> {
    let original = f
        .get(&k("rope.scaling.original_context_length"))
        .and_then(|v| v.as_u64())
        .ok_or_else(|| Error::Format {
            path: f.path.clone(),
            msg: "LongRoPE factors need rope.scaling.original_context_length".into(),
        })?;
    let long = (ctx_len as u64) > original;
    let name = if long || !f.tensors.contains_key("rope_factors_short.weight") {
        "rope_factors_long.weight"
    } else {
        "rope_factors_short.weight"
    };
    let factors = kvmerger_tensors::quant::QMatrix::from_gguf(f, name)?.to_f32();
    let mscale = match f
        .get(&k("rope.scaling.attn_factor"))
        .and_then(|v| v.as_f64())
    {
        Some(a) => a as f32,
        None => longrope_mscale(ctx_len as f64, original as f64),
    };
    Ok(RopeScaling::LongRope { factors, mscale })
}

/// YaRN scaling from GGUF metadata, given the already read `rope.scaling.factor`.
fn gguf_yarn(f: &GgufFile, k: &dyn Fn(&str) -> String, factor: f32) -> Result<RopeScaling, Error> {
    let num = |key: &str, default: f64| f.get(&k(key)).and_then(|v| v.as_f64()).unwrap_or(default);
    let original = f
        .get(&k("rope.scaling.original_context_length"))
        .and_then(|v| v.as_u64())
        .ok_or_else(|| Error::Format {
            path: f.path.clone(),
            msg: "YaRN RoPE scaling needs rope.scaling.original_context_length".into(),
        })?;
    // llama.cpp's convention: the model's own attention factor (1 unless
    // given) times YaRN's 0.1 ln(factor) + 1.
    let mscale = num("rope.scaling.attn_factor", 1.0) * (0.1 * (factor as f64).ln() + 1.0);
    Ok(RopeScaling::Yarn(Yarn {
        factor,
        original: original as usize,
        beta_fast: num("rope.scaling.yarn_beta_fast", 32.0) as f32,
        beta_slow: num("rope.scaling.yarn_beta_slow", 1.0) as f32,
        mscale: mscale as f32,
    }))
}
