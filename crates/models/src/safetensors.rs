//! Hugging Face-style model directories: config.json and one or more *.safetensors
//! files in f32, f16 or bf16.

use crate::config::{
    llama3_frequency_factors, Activation, Arch, Config, RopeScaling, RopeStyle, Yarn,
};
use crate::model::WeightSource;
use crate::Error;
use kvmerger_tensors::quant::QMatrix;
use memmap2::Mmap;
use serde_json::Value as Json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

struct Entry {
    file: usize,
    dtype: String,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// The tensors of every *.safetensors file in a directory, memory-mapped.
pub struct SafetensorsDir {
    dir: PathBuf,
    maps: Vec<Mmap>,
    entries: BTreeMap<String, Entry>,
    arch: Arch,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::Io {
        path: path.to_path_buf(),
        error: e,
    }
}

fn format(path: &Path, msg: impl Into<String>) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

fn parse_header(path: &Path, buf: &[u8]) -> Result<(usize, Json), Error> {
    if buf.len() < 8 {
        return Err(format(path, "file is truncated: no safetensors header"));
    }
    let n = u64::from_le_bytes(buf[..8].try_into().unwrap());
    if n > (buf.len() - 8) as u64 {
        return Err(format(
            path,
            format!("header length {n} exceeds the file size {}", buf.len()),
        ));
    }
    let n = n as usize;
    let json: Json = serde_json::from_slice(&buf[8..8 + n])
        .map_err(|e| format(path, format!("header is not valid JSON: {e}")))?;
    Ok((8 + n, json))
}

/// Reads one tensor's header entry of file number `fi`, checking its type and extent.
fn parse_entry(
    path: &Path,
    fi: usize,
    data_start: usize,
    file_len: usize,
    name: &String,
    info: &Json,
) -> Result<Entry, Error> {
    let bad = || {
        format(
            path,
            format!("tensor '{name}' has a malformed header entry"),
        )
    };
    let dtype = info
        .get("dtype")
        .and_then(|d| d.as_str())
        .ok_or_else(bad)?
        .to_string();
    let shape: Vec<usize> = info
        .get("shape")
        .and_then(|s| s.as_array())
        .ok_or_else(bad)?
        .iter()
        .map(|x| x.as_u64().map(|x| x as usize).ok_or_else(bad))
        .collect::<Result<_, _>>()?;
    let offs = info
        .get("data_offsets")
        .and_then(|s| s.as_array())
        .ok_or_else(bad)?;
    if offs.len() != 2 {
        return Err(bad());
    }
    let s = offs[0].as_u64().ok_or_else(bad)? as usize;
    let e = offs[1].as_u64().ok_or_else(bad)? as usize;
    let elem = match dtype.as_str() {
        "F32" => 4,
        "F16" | "BF16" => 2,
        other => {
            return Err(Error::UnsupportedTensorType {
                tensor: name.clone(),
                ty: other.to_string(),
            });
        }
    };
    let bytes = shape.iter().try_fold(elem, |a: usize, &d| a.checked_mul(d));
    let end = data_start.checked_add(e);
    if e < s || Some(e - s) != bytes || end.is_none_or(|end| end > file_len) {
        return Err(format(
            path,
            format!(
                "tensor '{name}' lies past the end of the file or has the wrong size (truncated?)"
            ),
        ));
    }
    Ok(Entry {
        file: fi,
        dtype,
        shape,
        start: data_start + s,
        end: data_start + e,
    })
}

impl SafetensorsDir {
    pub fn open(dir: &Path, arch: Arch) -> Result<SafetensorsDir, Error> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io(dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(format(dir, "no *.safetensors files in the directory"));
        }
        let mut maps = Vec::new();
        let mut entries = BTreeMap::new();
        for (fi, path) in files.iter().enumerate() {
            kvmerger_tensors::files::check_regular_file(path, u64::MAX)?;
            let f = std::fs::File::open(path).map_err(io(path))?;
            // SAFETY: read-only mapping of a file treated as immutable bytes.
            let map = unsafe { Mmap::map(&f) }.map_err(io(path))?;
            let (data_start, header) = parse_header(path, &map)?;
            let obj = header
                .as_object()
                .ok_or_else(|| format(path, "header is not a JSON object"))?;
            for (name, info) in obj {
                if name == "__metadata__" {
                    continue;
                }
                let entry = parse_entry(path, fi, data_start, map.len(), name, info)?;
                if entries.insert(name.clone(), entry).is_some() {
                    return Err(format(
                        path,
                        format!("tensor '{name}' appears in more than one file"),
                    ));
                }
            }
            let extents = entries
                .iter()
                .filter(|(_, en)| en.file == fi)
                .map(|(name, en)| (en.start, en.end, name.as_str()))
                .collect();
            if let Some((a, b)) = kvmerger_tensors::files::first_overlap(extents) {
                return Err(format(
                    path,
                    format!("tensors '{a}' and '{b}' overlap in the file"),
                ));
            }
            maps.push(map);
        }
        Ok(SafetensorsDir {
            dir: dir.to_path_buf(),
            maps,
            entries,
            arch,
        })
    }

    /// The Hugging Face name of a tensor given its GGUF name.
    fn hf_name(&self, gguf: &str) -> String {
        let gemma = self.arch == Arch::Gemma3;
        match gguf {
            "token_embd.weight" => return "model.embed_tokens.weight".into(),
            "output_norm.weight" => return "model.norm.weight".into(),
            "output.weight" => return "lm_head.weight".into(),
            _ => {}
        }
        let Some(rest) = gguf.strip_prefix("blk.") else {
            return gguf.to_string();
        };
        let (layer, tail) = rest.split_once('.').unwrap_or((rest, ""));
        let (stem, kind) = tail.rsplit_once('.').unwrap_or((tail, "weight"));
        let hf = match stem {
            "attn_norm" => "input_layernorm",
            "attn_q" => "self_attn.q_proj",
            "attn_k" => "self_attn.k_proj",
            "attn_v" => "self_attn.v_proj",
            "attn_output" => "self_attn.o_proj",
            "attn_q_norm" => "self_attn.q_norm",
            "attn_k_norm" => "self_attn.k_norm",
            "ffn_norm" if gemma => "pre_feedforward_layernorm",
            "ffn_norm" => "post_attention_layernorm",
            "post_attention_norm" => "post_attention_layernorm",
            "post_ffw_norm" => "post_feedforward_layernorm",
            "ffn_gate" => "mlp.gate_proj",
            "attn_qkv" => "self_attn.qkv_proj",
            "ffn_up" if self.arch == Arch::Phi3 => "mlp.gate_up_proj",
            "ffn_up" => "mlp.up_proj",
            "ffn_down" => "mlp.down_proj",
            other => other,
        };
        format!("model.layers.{layer}.{hf}.{kind}")
    }

    fn entry(&self, gguf: &str) -> Result<(&Entry, &[u8]), Error> {
        let name = self.hf_name(gguf);
        let e = self
            .entries
            .get(&name)
            .ok_or_else(|| Error::MissingTensor {
                path: self.dir.clone(),
                name: name.clone(),
            })?;
        Ok((e, &self.maps[e.file][e.start..e.end]))
    }
}

impl WeightSource for SafetensorsDir {
    fn matrix(&self, name: &str) -> Result<QMatrix, Error> {
        let (e, bytes) = self.entry(name)?;
        let (rows, cols) = match e.shape.as_slice() {
            [r, c] => (*r, *c),
            [c] => (1, *c),
            s => {
                return Err(Error::Invalid(format!(
                    "tensor '{name}' has shape {s:?}, expected 2-D"
                )))
            }
        };
        Ok(match e.dtype.as_str() {
            "F32" => QMatrix::from_f32(
                rows,
                cols,
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
            ),
            "F16" => QMatrix::from_f16_bytes(rows, cols, bytes.to_vec()),
            _ => QMatrix::from_bf16_bytes(rows, cols, bytes.to_vec()),
        })
    }

    fn vector(&self, name: &str) -> Result<Vec<f32>, Error> {
        let mut v = self.matrix(name)?.to_f32();
        // Gemma stores its norm weights as (w - 1); GGUF files have the +1 folded in.
        if self.arch == Arch::Gemma3 && name.contains("norm") {
            v.iter_mut().for_each(|x| *x += 1.0);
        }
        Ok(v)
    }

    fn has(&self, name: &str) -> bool {
        self.entries.contains_key(&self.hf_name(name))
    }
}

/// Hyperparameters from a Hugging Face config.json.
pub fn config_from_json(path: &Path) -> Result<Config, Error> {
    let text = kvmerger_tensors::files::read_text_file(path, 64 << 20)?;
    let root: Json =
        serde_json::from_str(&text).map_err(|e| format(path, format!("not valid JSON: {e}")))?;
    // Multimodal gemma3 configs nest the language model's settings.
    let j = root.get("text_config").unwrap_or(&root);
    let model_type = j
        .get("model_type")
        .or_else(|| root.get("model_type"))
        .and_then(|v| v.as_str())
        .ok_or_else(|| format(path, "config.json has no model_type"))?;
    let arch = match model_type {
        "llama" | "mistral" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
        "qwen3" => Arch::Qwen3,
        "gemma3" | "gemma3_text" => Arch::Gemma3,
        "phi3" => Arch::Phi3,
        other => return Err(Error::UnsupportedArchitecture(other.to_string())),
    };
    let u = |k: &str| -> Result<usize, Error> {
        j.get(k)
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .ok_or_else(|| {
                format(
                    path,
                    format!("config.json: '{k}' is missing or not an integer"),
                )
            })
    };
    let f = |k: &str, d: f64| j.get(k).and_then(|v| v.as_f64()).unwrap_or(d);
    let hidden = u("hidden_size")?;
    let n_heads = u("num_attention_heads")?;
    let head_dim = j
        .get("head_dim")
        .and_then(|v| v.as_u64())
        .map(|v| v as usize)
        .unwrap_or(hidden / n_heads.max(1));
    let gemma = arch == Arch::Gemma3;
    let ctx_len = j
        .get("max_position_embeddings")
        .and_then(|v| v.as_u64())
        .unwrap_or(4096) as usize;
    let rotary = f("partial_rotary_factor", 1.0);
    if rotary != 1.0 {
        return Err(format(
            path,
            format!(
                "config.json: partial_rotary_factor {rotary} (RoPE over part of each head, as in \
                 Phi-4-mini) is not supported"
            ),
        ));
    }
    let rope_scaling = hf_rope_scaling(j, head_dim, f("rope_theta", 10000.0), ctx_len)
        .map_err(|m| format(path, m))?;
    let cfg = Config {
        arch,
        n_layers: u("num_hidden_layers")?,
        hidden,
        n_heads,
        n_kv_heads: j
            .get("num_key_value_heads")
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .unwrap_or(n_heads),
        head_dim,
        ffn: u("intermediate_size")?,
        vocab: u("vocab_size")?,
        ctx_len,
        rope_base: f("rope_theta", 10000.0) as f32,
        rope_base_local: f("rope_local_base_freq", 10000.0) as f32,
        rope_style: RopeStyle::Neox,
        rope_scaling,
        rms_eps: f("rms_norm_eps", 1e-6) as f32,
        sliding_window: if gemma {
            Some(
                j.get("sliding_window")
                    .and_then(|v| v.as_u64())
                    .unwrap_or(512) as usize,
            )
        } else {
            None
        },
        global_every: j
            .get("sliding_window_pattern")
            .and_then(|v| v.as_u64())
            .unwrap_or(6) as usize,
        activation: if gemma {
            Activation::GeluTanh
        } else {
            Activation::Silu
        },
        embed_scale: if gemma { (hidden as f32).sqrt() } else { 1.0 },
        attn_scale: 1.0 / (f("query_pre_attn_scalar", head_dim as f64) as f32).sqrt(),
    };
    cfg.validate().map_err(|m| format(path, m))?;
    Ok(cfg)
}

/// config.json's `rope_scaling`: absent, null or `default` for none; `linear`
/// (`factor`); `llama3` (`factor`, `low_freq_factor`, `high_freq_factor`,
/// `original_max_position_embeddings`); `yarn` (`factor`,
/// `original_max_position_embeddings`, optional `beta_fast`, `beta_slow`,
/// `attention_factor`); `longrope` or `su` (`long_factor`, `short_factor`,
/// `original_max_position_embeddings` beside it or in the config, optional
/// `attention_factor`). Any other kind is refused by name rather than run with the
/// wrong positions.
fn hf_rope_scaling(
    j: &serde_json::Value,
    head_dim: usize,
    base: f64,
    ctx_len: usize,
) -> Result<RopeScaling, String> {
    let Some(r) = j.get("rope_scaling").filter(|v| !v.is_null()) else {
        return Ok(RopeScaling::None);
    };
    let kind = r
        .get("rope_type")
        .or_else(|| r.get("type"))
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    let num = |k: &str| -> Result<f64, String> {
        r.get(k)
            .and_then(|v| v.as_f64())
            .ok_or_else(|| format!("config.json: rope_scaling '{kind}' needs a number '{k}'"))
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: num("factor")? as f32,
        }),
        "llama3" => {
            let (factor, low, high) = (
                num("factor")?,
                num("low_freq_factor")?,
                num("high_freq_factor")?,
            );
            let original = num("original_max_position_embeddings")?;
            if !(high > low && low > 0.0 && original >= 1.0 && factor > 0.0) {
                return Err(format!(
                    "config.json: rope_scaling llama3 needs high_freq_factor > low_freq_factor > 0, a positive factor and original_max_position_embeddings >= 1 (got {high}, {low}, {factor}, {original})"
                ));
            }
            Ok(RopeScaling::Frequencies(llama3_frequency_factors(
                head_dim, base, factor, low, high, original,
            )))
        }
        "yarn" => {
            if r.get("mscale").is_some() || r.get("mscale_all_dim").is_some() {
                return Err(
                    "config.json: rope_scaling yarn with mscale/mscale_all_dim (DeepSeek's variant) is not supported".into(),
                );
            }
            let factor = num("factor")?;
            let original = r
                .get("original_max_position_embeddings")
                .or_else(|| j.get("original_max_position_embeddings"))
                .and_then(|v| v.as_f64())
                .ok_or("config.json: rope_scaling 'yarn' needs original_max_position_embeddings")?;
            let opt = |k: &str, d: f64| r.get(k).and_then(|v| v.as_f64()).unwrap_or(d);
            Ok(RopeScaling::Yarn(Yarn {
                factor: factor as f32,
                original: original.max(0.0) as usize,
                beta_fast: opt("beta_fast", 32.0) as f32,
                beta_slow: opt("beta_slow", 1.0) as f32,
                mscale: opt("attention_factor", 0.1 * factor.ln() + 1.0) as f32,
            }))
        }
        "longrope" | "su" => {
            let original = r
                .get("original_max_position_embeddings")
                .or_else(|| j.get("original_max_position_embeddings"))
                .and_then(|v| v.as_f64())
                .filter(|o| *o >= 1.0)
                .ok_or(
                    "config.json: rope_scaling 'longrope' needs original_max_position_embeddings",
                )?;
            let key = if ctx_len as f64 > original {
                "long_factor"
            } else {
                "short_factor"
            };
            let factors = r
                .get(key)
                .and_then(|v| v.as_array())
                .and_then(|a| a.iter().map(|x| x.as_f64().map(|x| x as f32)).collect())
                .ok_or_else(|| {
                    format!(
                        "config.json: rope_scaling 'longrope' needs '{key}', an array of numbers"
                    )
                })?;
            let mscale = match r.get("attention_factor").and_then(|v| v.as_f64()) {
                Some(a) => a as f32,
                None => crate::config::longrope_mscale(ctx_len as f64, original),
            };
            Ok(RopeScaling::LongRope { factors, mscale })
        }
        other => Err(format!(
            "config.json: RoPE scaling '{other}' is not supported (supported: linear, llama3, \
             yarn, longrope)"
        )),
    }
}
