//! Model hyperparameters, read from GGUF metadata or a Hugging Face config.json.

use crate::gguf::GgufFile;
use crate::Error;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
    Gemma3,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Gemma3 => "gemma3",
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
    pub fn group(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }

    pub fn from_gguf(f: &GgufFile) -> Result<Config, Error> {
        let arch_name = f.str("general.architecture")?.to_string();
        let arch = match arch_name.as_str() {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "gemma3" => Arch::Gemma3,
            _ => return Err(Error::UnsupportedArchitecture(arch_name)),
        };
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
        let vocab = match f.get(&k("vocab_size")).and_then(|v| v.as_u64()) {
            Some(v) => v as usize,
            None => f.tensor("token_embd.weight")?.dims[1] as usize,
        };
        let (rope_style, activation, embed_scale, sliding_window) = match arch {
            Arch::Llama => (RopeStyle::Adjacent, Activation::Silu, 1.0, None),
            Arch::Qwen2 => (RopeStyle::Neox, Activation::Silu, 1.0, None),
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
        };
        let rope_base = f
            .get(&k("rope.freq_base"))
            .and_then(|v| v.as_f64())
            .unwrap_or(10000.0) as f32;
        let cfg = Config {
            arch,
            n_layers: f.u64(&k("block_count"))? as usize,
            hidden,
            n_heads,
            n_kv_heads,
            head_dim,
            ffn: f.u64(&k("feed_forward_length"))? as usize,
            vocab,
            ctx_len: f
                .get(&k("context_length"))
                .and_then(|v| v.as_u64())
                .unwrap_or(4096) as usize,
            rope_base,
            rope_base_local: 10000.0,
            rope_style,
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

    pub fn validate(&self) -> Result<(), String> {
        let c = self;
        if c.n_layers == 0
            || c.hidden == 0
            || c.n_heads == 0
            || c.n_kv_heads == 0
            || c.head_dim == 0
            || c.ffn == 0
            || c.vocab == 0
        {
            return Err(format!("implausible hyperparameters: {c:?}"));
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
        if c.n_layers > 1024 || c.hidden > 1 << 16 || c.head_dim > 1024 {
            return Err(format!("implausible hyperparameters: {c:?}"));
        }
        Ok(())
    }
}
