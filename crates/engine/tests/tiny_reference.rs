//! Tiny random-weight models against the independent numpy reference
//! (scripts/reference_forward.py), for what no downloadable test model covers: RoPE
//! scaling and the qwen3 and phi3 architectures. 2 layers, heads of 16 dimensions (so that eight
//! frequencies span short and long wavelengths), 160 positions, well past the scaling's
//! original context of 32 tokens:
//! - Llama 3's per-frequency factors (`rope_freqs.weight`), YaRN and linear scaling,
//!   from GGUF;
//! - config.json's `rope_scaling` gives the logits of the GGUF of the same weights;
//! - qwen3 (an RMS norm on every query and key head), from GGUF and from config.json;
//! - phi3 (fused Q/K/V and gate/up projections) with LongRoPE, from GGUF and from
//!   config.json.

mod common;

use common::{gguf_f32_tensor, numpy_reference_logits, write_gguf, Meta, Rng};
use kvmerger_compression::{KvDtype, StatsNeeds};
use kvmerger_engine::load::LoadedModel;
use kvmerger_engine::model::Logits;
use std::path::Path;

const HIDDEN: usize = 32;
const HEADS: usize = 2;
const KV_HEADS: usize = 1;
const HEAD_DIM: usize = 16;
const FFN: usize = 48;
const VOCAB: usize = 8;
const LAYERS: usize = 2;
const BASE: f64 = 10000.0;
/// Llama 3's settings, scaled down: the original context, the factor and the
/// wavelength thresholds (original / 1 and original / 4).
const ORIGINAL: f64 = 32.0;
const FACTOR: f64 = 8.0;
const LOW: f64 = 1.0;
const HIGH: f64 = 4.0;
const TOKENS: usize = 160;

/// Llama 3's divisors, written out here from the published formula (Meta's reference
/// code), apart from the engine's: 1 for wavelengths under original/high, `factor`
/// over original/low, and in between 1 / ((1 - s) / factor + s) with
/// s = (original / wavelength - low) / (high - low).
fn llama3_factors() -> Vec<f32> {
    (0..HEAD_DIM / 2)
        .map(|i| {
            let wavelength =
                2.0 * std::f64::consts::PI * BASE.powf(2.0 * i as f64 / HEAD_DIM as f64);
            if wavelength < ORIGINAL / HIGH {
                1.0
            } else if wavelength > ORIGINAL / LOW {
                FACTOR as f32
            } else {
                let s = (ORIGINAL / wavelength - LOW) / (HIGH - LOW);
                (1.0 / ((1.0 - s) / FACTOR + s)) as f32
            }
        })
        .collect()
}

/// (GGUF name, HF name, rows, cols, values), rows = 1 for vectors; Q and K rows in HF
/// order (rotated as (i, i + d/2) pairs).
fn weights(arch: &str) -> Vec<(String, String, usize, usize, Vec<f32>)> {
    let mut r = Rng(7);
    let mut vec = |n: usize| r.vec(n);
    let ones = |n: usize| vec![1.0f32; n];
    let mut w = vec![(
        "token_embd.weight".to_string(),
        "model.embed_tokens.weight".to_string(),
        VOCAB,
        HIDDEN,
        vec(VOCAB * HIDDEN),
    )];
    for l in 0..LAYERS {
        let g = |s: &str| format!("blk.{l}.{s}");
        let h = |s: &str| format!("model.layers.{l}.{s}");
        w.push((
            g("attn_norm.weight"),
            h("input_layernorm.weight"),
            1,
            HIDDEN,
            ones(HIDDEN),
        ));
        if arch == "phi3" {
            // Q, K and V in one matrix, in that order.
            let rows = (HEADS + 2 * KV_HEADS) * HEAD_DIM;
            w.push((
                g("attn_qkv.weight"),
                h("self_attn.qkv_proj.weight"),
                rows,
                HIDDEN,
                vec(rows * HIDDEN),
            ));
        } else {
            w.push((
                g("attn_q.weight"),
                h("self_attn.q_proj.weight"),
                HEADS * HEAD_DIM,
                HIDDEN,
                vec(HEADS * HEAD_DIM * HIDDEN),
            ));
            w.push((
                g("attn_k.weight"),
                h("self_attn.k_proj.weight"),
                KV_HEADS * HEAD_DIM,
                HIDDEN,
                vec(KV_HEADS * HEAD_DIM * HIDDEN),
            ));
            w.push((
                g("attn_v.weight"),
                h("self_attn.v_proj.weight"),
                KV_HEADS * HEAD_DIM,
                HIDDEN,
                vec(KV_HEADS * HEAD_DIM * HIDDEN),
            ));
        }
        w.push((
            g("attn_output.weight"),
            h("self_attn.o_proj.weight"),
            HIDDEN,
            HEADS * HEAD_DIM,
            vec(HIDDEN * HEADS * HEAD_DIM),
        ));
        if arch == "qwen3" {
            for (gg, hf) in [("attn_q_norm", "q_norm"), ("attn_k_norm", "k_norm")] {
                let w1: Vec<f32> = vec(HEAD_DIM).into_iter().map(|x| 1.0 + x).collect();
                w.push((
                    g(&format!("{gg}.weight")),
                    h(&format!("self_attn.{hf}.weight")),
                    1,
                    HEAD_DIM,
                    w1,
                ));
            }
        }
        w.push((
            g("ffn_norm.weight"),
            h("post_attention_layernorm.weight"),
            1,
            HIDDEN,
            ones(HIDDEN),
        ));
        if arch == "phi3" {
            // The gate's rows, then the up projection's.
            w.push((
                g("ffn_up.weight"),
                h("mlp.gate_up_proj.weight"),
                2 * FFN,
                HIDDEN,
                vec(2 * FFN * HIDDEN),
            ));
        } else {
            w.push((
                g("ffn_gate.weight"),
                h("mlp.gate_proj.weight"),
                FFN,
                HIDDEN,
                vec(FFN * HIDDEN),
            ));
            w.push((
                g("ffn_up.weight"),
                h("mlp.up_proj.weight"),
                FFN,
                HIDDEN,
                vec(FFN * HIDDEN),
            ));
        }
        w.push((
            g("ffn_down.weight"),
            h("mlp.down_proj.weight"),
            HIDDEN,
            FFN,
            vec(HIDDEN * FFN),
        ));
    }
    w.push((
        "output_norm.weight".into(),
        "model.norm.weight".into(),
        1,
        HIDDEN,
        ones(HIDDEN),
    ));
    w
}

enum Scaling {
    None,
    Llama3,
    Linear(f32),
    /// `rope.scaling.type` set to this, factor 4.
    Kind(&'static str),
    /// YaRN with factor 4 over the original context.
    Yarn,
    /// Phi-3's LongRoPE: [`long_factors`] and [`short_factors`] over the original
    /// context, the attention factor as Phi-3's converter writes it.
    LongRope,
}

/// LongRoPE's factors for a model whose context (256) is longer than the original
/// one (32): the long ones apply.
fn long_factors() -> Vec<f32> {
    (0..HEAD_DIM / 2).map(|i| 1.0 + i as f32).collect()
}
fn short_factors() -> Vec<f32> {
    (0..HEAD_DIM / 2).map(|i| 1.0 + 0.1 * i as f32).collect()
}
/// sqrt(1 + ln(256 / 32) / ln(32)), written out.
const LONGROPE_ATTN_FACTOR: f32 = 1.264_911;

fn write_gguf_model(path: &Path, arch: &str, scaling: &Scaling) {
    let k = |s: &str| -> &'static str { Box::leak(format!("{arch}.{s}").into_boxed_str()) };
    let tokens: Vec<String> = (0..VOCAB).map(|i| format!("t{i}")).collect();
    let mut meta = vec![
        ("general.architecture", Meta::Str(arch.into())),
        (k("block_count"), Meta::U32(LAYERS as u32)),
        (k("embedding_length"), Meta::U32(HIDDEN as u32)),
        (k("feed_forward_length"), Meta::U32(FFN as u32)),
        (k("attention.head_count"), Meta::U32(HEADS as u32)),
        (k("attention.head_count_kv"), Meta::U32(KV_HEADS as u32)),
        (k("attention.key_length"), Meta::U32(HEAD_DIM as u32)),
        (k("context_length"), Meta::U32(256)),
        (k("rope.freq_base"), Meta::F32(BASE as f32)),
        (k("attention.layer_norm_rms_epsilon"), Meta::F32(1e-5)),
        ("tokenizer.ggml.model", Meta::Str("gpt2".into())),
        ("tokenizer.ggml.tokens", Meta::StrArr(tokens)),
        ("tokenizer.ggml.merges", Meta::StrArr(vec![])),
    ];
    let (kind, factor) = match scaling {
        Scaling::Linear(f) => ("linear", *f),
        Scaling::Kind(k) => (*k, 4.0),
        Scaling::Yarn => ("yarn", 4.0),
        _ => ("none", 1.0),
    };
    if kind != "none" {
        meta.push((k("rope.scaling.type"), Meta::Str(kind.into())));
        meta.push((k("rope.scaling.factor"), Meta::F32(factor)));
    }
    if let Scaling::Yarn = scaling {
        meta.push((
            k("rope.scaling.original_context_length"),
            Meta::U32(ORIGINAL as u32),
        ));
    }
    let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    // Llama GGUFs rotate adjacent pairs, with Q and K rows permuted to match; qwen
    // GGUFs keep Hugging Face's order.
    let llama = arch == "llama";
    let mut tensors: Vec<(&str, Vec<u64>, u32, Vec<u8>)> = weights(arch)
        .into_iter()
        .map(|(gg, _, rows, cols, data)| {
            gguf_f32_tensor(gg, rows, cols, data, (HEADS, KV_HEADS, HEAD_DIM), llama)
        })
        .collect();
    if let Scaling::LongRope = scaling {
        meta.push((
            k("rope.scaling.original_context_length"),
            Meta::U32(ORIGINAL as u32),
        ));
        meta.push((
            k("rope.scaling.attn_factor"),
            Meta::F32(LONGROPE_ATTN_FACTOR),
        ));
        for (name, v) in [
            ("rope_factors_long.weight", long_factors()),
            ("rope_factors_short.weight", short_factors()),
        ] {
            tensors.push((name, vec![(HEAD_DIM / 2) as u64], 0, bytes(&v)));
        }
    }
    if let Scaling::Llama3 = scaling {
        tensors.push((
            "rope_freqs.weight",
            vec![(HEAD_DIM / 2) as u64],
            0,
            bytes(&llama3_factors()),
        ));
    }
    write_gguf(path, &meta, &tensors);
}

/// The same weights as a Hugging Face directory, `rope_scaling` set as for Llama 3.1.
fn write_hf_dir(dir: &Path, arch: &str, rope_scaling: &str) {
    std::fs::write(
        dir.join("config.json"),
        format!(
            r#"{{"model_type": "{arch}", "hidden_size": {HIDDEN}, "num_hidden_layers": {LAYERS}, "head_dim": {HEAD_DIM},
               "num_attention_heads": {HEADS}, "num_key_value_heads": {KV_HEADS}, "intermediate_size": {FFN},
               "vocab_size": {VOCAB}, "max_position_embeddings": 256, "rope_theta": {BASE},
               "rms_norm_eps": 1e-5, "tie_word_embeddings": true, "rope_scaling": {rope_scaling}}}"#
        ),
    )
    .unwrap();
    let vocab: serde_json::Map<String, serde_json::Value> = (0..VOCAB)
        .map(|i| (format!("t{i}"), serde_json::json!(i)))
        .collect();
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "vocab": vocab, "merges": []}});
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (_, hf, rows, cols, w) in weights(arch) {
        let start = data.len();
        w.iter()
            .for_each(|x| data.extend_from_slice(&x.to_le_bytes()));
        let shape = if rows == 1 {
            vec![cols]
        } else {
            vec![rows, cols]
        };
        header.insert(
            hf,
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let h = serde_json::to_vec(&header).unwrap();
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&h);
    bytes.extend_from_slice(&data);
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
}

fn ids() -> Vec<u32> {
    (0..TOKENS)
        .map(|i| ((i * 5 + i / 7) % VOCAB) as u32)
        .collect()
}

fn engine_logits(path: &Path) -> Vec<f32> {
    let lm = LoadedModel::open(path).unwrap();
    let mut cache = lm.model.new_cache(KvDtype::F32);
    lm.model
        .forward(&ids(), &mut cache, StatsNeeds::default(), None, Logits::All)
        .unwrap()
}

fn numpy_logits(path: &Path) -> Vec<f32> {
    numpy_reference_logits(path, &ids(), path.parent().unwrap())
}

/// The largest difference between two logit sets, relative to the largest logit.
fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
        / scale
}

#[test]
fn llama3_yarn_and_linear_scaling_match_the_numpy_reference_past_the_original_context() {
    let dir = tempfile::tempdir().unwrap();
    let mut all = Vec::new();
    for (name, scaling) in [
        ("none", Scaling::None),
        ("llama3", Scaling::Llama3),
        ("linear", Scaling::Linear(4.0)),
        ("yarn", Scaling::Yarn),
    ] {
        let path = dir.path().join(format!("{name}.gguf"));
        write_gguf_model(&path, "llama", &scaling);
        let got = engine_logits(&path);
        let want = numpy_logits(&path);
        assert_eq!(got.len(), TOKENS * VOCAB);
        let d = max_rel_diff(&got, &want);
        eprintln!("{name}: largest logit difference {d:.2e} of the largest logit");
        assert!(d < 1e-4, "{name}: {d}");
        all.push(got);
    }
    // Each scaling changes the logits past the original context (and the test would
    // catch a scaling that is read but not applied).
    let late = (ORIGINAL as usize + 8) * VOCAB;
    for (i, name) in [(1, "llama3"), (2, "linear"), (3, "yarn")] {
        assert!(
            max_rel_diff(&all[i][late..], &all[0][late..]) > 1e-2,
            "{name} changed nothing"
        );
    }
}

#[test]
fn config_json_rope_scaling_gives_the_logits_of_the_gguf_of_the_same_weights() {
    let dir = tempfile::tempdir().unwrap();
    for (scaling, json) in [
        (
            Scaling::Llama3,
            format!(
                r#"{{"rope_type": "llama3", "factor": {FACTOR}, "low_freq_factor": {LOW},
                   "high_freq_factor": {HIGH}, "original_max_position_embeddings": {ORIGINAL}}}"#
            ),
        ),
        (
            Scaling::Linear(4.0),
            r#"{"type": "linear", "factor": 4.0}"#.to_string(),
        ),
        (
            Scaling::Yarn,
            format!(
                r#"{{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": {ORIGINAL}}}"#
            ),
        ),
        (Scaling::None, "null".to_string()),
    ] {
        let gguf = dir.path().join("model.gguf");
        write_gguf_model(&gguf, "llama", &scaling);
        let hf = dir.path().join("hf");
        std::fs::create_dir_all(&hf).unwrap();
        write_hf_dir(&hf, "llama", &json);
        let d = max_rel_diff(&engine_logits(&hf), &engine_logits(&gguf));
        assert!(d < 1e-5, "{json}: {d}");
    }
}

#[test]
fn unsupported_rope_scaling_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    for (json, needle) in [
        (
            r#"{"rope_type": "longrope", "factor": 4.0}"#,
            "'longrope' needs original_max_position_embeddings",
        ),
        (
            r#"{"rope_type": "longrope", "original_max_position_embeddings": 32}"#,
            "'longrope' needs 'long_factor'",
        ),
        (
            r#"{"rope_type": "yarn", "factor": 4.0}"#,
            "original_max_position_embeddings",
        ),
        (
            r#"{"rope_type": "dynamic", "factor": 4.0}"#,
            "'dynamic' is not supported",
        ),
        (
            r#"{"rope_type": "llama3", "factor": 8.0}"#,
            "low_freq_factor",
        ),
        (
            r#"{"rope_type": "linear", "factor": -2.0}"#,
            "linear RoPE scaling factor",
        ),
    ] {
        write_hf_dir(dir.path(), "llama", json);
        let e = LoadedModel::open(dir.path())
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains(needle), "{json}: {e}");
    }
    // A GGUF naming a scaling the engine does not implement, or LongRoPE without
    // its factors.
    let path = dir.path().join("dynamic.gguf");
    write_gguf_model(&path, "llama", &Scaling::Kind("dynamic"));
    let e = LoadedModel::open(&path).err().expect("refused").to_string();
    assert!(e.contains("'dynamic' is not supported"), "{e}");
    write_gguf_model(&path, "llama", &Scaling::Kind("longrope"));
    let e = LoadedModel::open(&path).err().expect("refused").to_string();
    assert!(e.contains("rope_factors_long.weight"), "{e}");
    // YaRN without its original context length.
    write_gguf_model(&path, "llama", &Scaling::Kind("yarn"));
    let e = LoadedModel::open(&path).err().expect("refused").to_string();
    assert!(e.contains("original_context_length"), "{e}");
}

#[test]
fn qwen3_with_its_per_head_query_and_key_norms_matches_the_numpy_reference() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("qwen3.gguf");
    write_gguf_model(&gguf, "qwen3", &Scaling::None);
    assert_eq!(
        LoadedModel::open(&gguf).unwrap().model.cfg.arch.name(),
        "qwen3"
    );
    let got = engine_logits(&gguf);
    let d = max_rel_diff(&got, &numpy_logits(&gguf));
    eprintln!("qwen3: largest logit difference {d:.2e} of the largest logit");
    assert!(d < 1e-4, "{d}");
    let hf = dir.path().join("hf");
    std::fs::create_dir_all(&hf).unwrap();
    write_hf_dir(&hf, "qwen3", "null");
    let d = max_rel_diff(&engine_logits(&hf), &got);
    assert!(d < 1e-5, "config.json against GGUF: {d}");
}

#[test]
fn phi3_fused_projections_and_longrope_match_the_numpy_reference() {
    let dir = tempfile::tempdir().unwrap();
    let mut logits = Vec::new();
    for scaling in [Scaling::None, Scaling::LongRope] {
        let gguf = dir.path().join("phi3.gguf");
        write_gguf_model(&gguf, "phi3", &scaling);
        assert_eq!(
            LoadedModel::open(&gguf).unwrap().model.cfg.arch.name(),
            "phi3"
        );
        let got = engine_logits(&gguf);
        let d = max_rel_diff(&got, &numpy_logits(&gguf));
        eprintln!("phi3: largest logit difference {d:.2e} of the largest logit");
        assert!(d < 1e-4, "{d}");
        logits.push(got);
    }
    let late = (ORIGINAL as usize + 8) * VOCAB;
    assert!(
        max_rel_diff(&logits[1][late..], &logits[0][late..]) > 1e-2,
        "LongRoPE changed nothing"
    );
    // config.json: the factors, the original context beside them, the attention
    // factor computed from the two context lengths.
    let hf = dir.path().join("hf");
    std::fs::create_dir_all(&hf).unwrap();
    let json = format!(
        r#"{{"type": "longrope", "long_factor": {:?}, "short_factor": {:?}}},
           "original_max_position_embeddings": {ORIGINAL}"#,
        long_factors(),
        short_factors()
    );
    write_hf_dir(&hf, "phi3", &json);
    let d = max_rel_diff(&engine_logits(&hf), &logits[1]);
    assert!(d < 1e-5, "config.json against GGUF: {d}");
}
