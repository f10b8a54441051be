//! A Hugging Face-style directory (config.json, tokenizer.json, *.safetensors) gives the
//! same logits as the GGUF file of the same weights, whose Q and K rows are permuted for
//! RoPE on adjacent pairs (the llama convention of GGUF files).

mod common;

use common::{gguf_f32_tensor, write_gguf, Meta, Rng};
use kvmerger_compression::{KvDtype, StatsNeeds};
use kvmerger_engine::load::LoadedModel;
use kvmerger_engine::model::Logits;
use std::path::Path;

const HIDDEN: usize = 16;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 4;
const FFN: usize = 24;
const VOCAB: usize = 6;
const LAYERS: usize = 2;

/// (HF name, GGUF name, rows, cols, data); rows = 1 for vectors.
fn weights() -> Vec<(String, String, usize, usize, Vec<f32>)> {
    let mut r = Rng(42);
    let mut w = vec![(
        "model.embed_tokens.weight".into(),
        "token_embd.weight".into(),
        VOCAB,
        HIDDEN,
        r.vec(VOCAB * HIDDEN),
    )];
    for l in 0..LAYERS {
        let hf = |s: &str| format!("model.layers.{l}.{s}");
        let gg = |s: &str| format!("blk.{l}.{s}");
        let norm = |r: &mut Rng| {
            (0..HIDDEN)
                .map(|_| 1.0 + r.next() * 0.2)
                .collect::<Vec<f32>>()
        };
        w.push((
            hf("input_layernorm.weight"),
            gg("attn_norm.weight"),
            1,
            HIDDEN,
            norm(&mut r),
        ));
        w.push((
            hf("self_attn.q_proj.weight"),
            gg("attn_q.weight"),
            HEADS * HEAD_DIM,
            HIDDEN,
            r.vec(HEADS * HEAD_DIM * HIDDEN),
        ));
        w.push((
            hf("self_attn.k_proj.weight"),
            gg("attn_k.weight"),
            KV_HEADS * HEAD_DIM,
            HIDDEN,
            r.vec(KV_HEADS * HEAD_DIM * HIDDEN),
        ));
        w.push((
            hf("self_attn.v_proj.weight"),
            gg("attn_v.weight"),
            KV_HEADS * HEAD_DIM,
            HIDDEN,
            r.vec(KV_HEADS * HEAD_DIM * HIDDEN),
        ));
        w.push((
            hf("self_attn.o_proj.weight"),
            gg("attn_output.weight"),
            HIDDEN,
            HEADS * HEAD_DIM,
            r.vec(HIDDEN * HEADS * HEAD_DIM),
        ));
        w.push((
            hf("post_attention_layernorm.weight"),
            gg("ffn_norm.weight"),
            1,
            HIDDEN,
            norm(&mut r),
        ));
        w.push((
            hf("mlp.gate_proj.weight"),
            gg("ffn_gate.weight"),
            FFN,
            HIDDEN,
            r.vec(FFN * HIDDEN),
        ));
        w.push((
            hf("mlp.up_proj.weight"),
            gg("ffn_up.weight"),
            FFN,
            HIDDEN,
            r.vec(FFN * HIDDEN),
        ));
        w.push((
            hf("mlp.down_proj.weight"),
            gg("ffn_down.weight"),
            HIDDEN,
            FFN,
            r.vec(HIDDEN * FFN),
        ));
    }
    w.push((
        "model.norm.weight".into(),
        "output_norm.weight".into(),
        1,
        HIDDEN,
        vec![1.0; HIDDEN],
    ));
    w
}

fn write_gguf_model(path: &Path) {
    let tokens: Vec<String> = ["a", "b", "ab", "c", "d", "e"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let meta = vec![
        ("general.architecture", Meta::Str("llama".into())),
        ("llama.block_count", Meta::U32(LAYERS as u32)),
        ("llama.embedding_length", Meta::U32(HIDDEN as u32)),
        ("llama.feed_forward_length", Meta::U32(FFN as u32)),
        ("llama.attention.head_count", Meta::U32(HEADS as u32)),
        ("llama.attention.head_count_kv", Meta::U32(KV_HEADS as u32)),
        ("llama.context_length", Meta::U32(64)),
        ("llama.rope.freq_base", Meta::F32(10000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Meta::F32(1e-5)),
        ("tokenizer.ggml.model", Meta::Str("gpt2".into())),
        ("tokenizer.ggml.tokens", Meta::StrArr(tokens)),
        ("tokenizer.ggml.merges", Meta::StrArr(vec!["a b".into()])),
    ];
    let tensors: Vec<(&str, Vec<u64>, u32, Vec<u8>)> = weights()
        .into_iter()
        .map(|(_, gg, rows, cols, data)| {
            gguf_f32_tensor(gg, rows, cols, data, (HEADS, KV_HEADS, HEAD_DIM), true)
        })
        .collect();
    write_gguf(path, &meta, &tensors);
}

/// dtype: "F32", "F16" or "BF16".
fn write_hf_dir(dir: &Path, dtype: &str) {
    std::fs::write(
        dir.join("config.json"),
        format!(
            r#"{{"model_type": "llama", "hidden_size": {HIDDEN}, "num_hidden_layers": {LAYERS},
               "num_attention_heads": {HEADS}, "num_key_value_heads": {KV_HEADS}, "intermediate_size": {FFN},
               "vocab_size": {VOCAB}, "max_position_embeddings": 64, "rope_theta": 10000.0,
               "rms_norm_eps": 1e-5, "tie_word_embeddings": true}}"#
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("tokenizer.json"),
        r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "vocab": {"a": 0, "b": 1, "ab": 2, "c": 3, "d": 4, "e": 5}, "merges": ["a b"]}}"#,
    )
    .unwrap();
    // Two shards, to exercise multi-file loading.
    let all = weights();
    let (first, second) = all.split_at(all.len() / 2);
    for (i, part) in [first, second].iter().enumerate() {
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for (hf, _, rows, cols, w) in part.iter() {
            let start = data.len();
            for &x in w {
                match dtype {
                    "F32" => data.extend_from_slice(&x.to_le_bytes()),
                    "F16" => data.extend_from_slice(&half::f16::from_f32(x).to_le_bytes()),
                    _ => data.extend_from_slice(&half::bf16::from_f32(x).to_le_bytes()),
                }
            }
            let shape = if *rows == 1 {
                vec![*cols]
            } else {
                vec![*rows, *cols]
            };
            header.insert(
                hf.clone(),
                serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [start, data.len()]}),
            );
        }
        let h = serde_json::to_vec(&header).unwrap();
        let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(&h);
        bytes.extend_from_slice(&data);
        std::fs::write(
            dir.join(format!("model-0000{}-of-00002.safetensors", i + 1)),
            bytes,
        )
        .unwrap();
    }
}

fn logits(path: &Path, ids: &[u32]) -> Vec<f32> {
    let lm = LoadedModel::open(path).unwrap();
    let mut cache = lm.model.new_cache(KvDtype::F32);
    lm.model
        .forward(ids, &mut cache, StatsNeeds::default(), None, Logits::All)
        .unwrap()
}

#[test]
fn an_hf_directory_matches_the_gguf_of_the_same_weights() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("tiny.gguf");
    write_gguf_model(&gguf);
    let ids: Vec<u32> = (0..20).map(|i| (i * 7 % VOCAB) as u32).collect();
    let want = logits(&gguf, &ids);
    for (dtype, tol) in [("F32", 1e-4), ("F16", 2e-2), ("BF16", 8e-2)] {
        let hf = dir.path().join(dtype);
        std::fs::create_dir(&hf).unwrap();
        write_hf_dir(&hf, dtype);
        let got = logits(&hf, &ids);
        assert_eq!(got.len(), want.len());
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < tol, "{dtype}: logits differ by up to {worst}");
    }
    let lm = LoadedModel::open(&dir.path().join("F32")).unwrap();
    assert_eq!(lm.tokenizer.encode("ab", false).unwrap(), vec![2]);
}
