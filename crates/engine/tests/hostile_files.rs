//! Model files come from strangers: every size read from one is checked before it is
//! used, so a corrupt or hostile file is refused with an error naming the cause, never
//! a panic, an abort on a huge allocation, or a hang (docs/reliability.md).

mod common;

use common::{tiny_llama_parts, write_gguf, write_gguf_at, Meta};
use kvmerger_engine::load::LoadedModel;
use std::path::Path;
use std::time::{Duration, Instant};

fn open_err(path: &Path) -> String {
    match LoadedModel::open(path) {
        Ok(_) => panic!("{} loaded but should have been refused", path.display()),
        Err(e) => e.to_string(),
    }
}

/// The tiny model with one metadata key set (added if absent).
fn tiny_with(path: &Path, key: &'static str, value: Meta) {
    let (mut meta, tensors) = tiny_llama_parts("llama", true);
    meta.retain(|(k, _)| *k != key);
    meta.push((key, value));
    write_gguf(path, &meta, &tensors);
}

#[test]
fn a_metadata_array_too_large_to_hold_is_refused_before_it_is_parsed() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    // 9 MB of u8 in the file would be 9M parsed values (288 MiB).
    tiny_with(&p, "tokenizer.ggml.token_type", Meta::U8Arr(9 << 20));
    let t0 = Instant::now();
    let e = open_err(&p);
    assert!(e.contains("MiB of memory"), "{e}");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t0.elapsed()
    );
    // A real-sized array of the same kind still loads.
    tiny_with(&p, "tokenizer.ggml.token_type", Meta::U8Arr(4));
    LoadedModel::open(&p).unwrap();
}

#[test]
fn a_tensor_count_the_file_cannot_hold_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&(1u64 << 24).to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.resize(4096, 0);
    std::fs::write(&p, &b).unwrap();
    let e = open_err(&p);
    assert!(e.contains("tensors cannot fit"), "{e}");
}

#[test]
fn implausible_hyperparameters_are_refused_with_their_names() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    let cases: Vec<(&'static str, Meta, &str)> = vec![
        (
            "llama.attention.head_count",
            Meta::U64(1 << 63),
            "attention head count",
        ),
        (
            "llama.attention.head_count",
            Meta::U32(4096),
            "attention head count",
        ),
        (
            "llama.attention.head_count_kv",
            Meta::U64(u64::MAX),
            "KV head count",
        ),
        ("llama.block_count", Meta::U64(1 << 40), "layer count"),
        (
            "llama.feed_forward_length",
            Meta::U64(1 << 62),
            "feed-forward size",
        ),
        ("llama.context_length", Meta::U32(0), "context length"),
        ("llama.vocab_size", Meta::U64(1 << 50), "vocabulary size"),
        (
            "llama.attention.key_length",
            Meta::U64(1 << 33),
            "head dimension",
        ),
        ("llama.rope.freq_base", Meta::F32(f32::NAN), "RoPE base"),
        ("llama.rope.freq_base", Meta::F32(0.0), "RoPE base"),
        ("llama.rope.freq_base", Meta::F32(-10000.0), "RoPE base"),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Meta::F32(f32::NAN),
            "epsilon",
        ),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Meta::F32(0.0),
            "epsilon",
        ),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Meta::F32(-1e-5),
            "epsilon",
        ),
    ];
    for (key, value, want) in cases {
        tiny_with(&p, key, value);
        let e = open_err(&p);
        assert!(e.contains(want), "{key}: {e}");
    }
}

#[test]
fn misaligned_overlapping_or_repeated_tensors_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    let (meta, tensors) = tiny_llama_parts("llama", true);
    // The offsets write_gguf would use: each tensor padded to 32 bytes.
    let mut good = Vec::new();
    let mut at = 0u64;
    for t in &tensors {
        good.push(at);
        at += (t.3.len() as u64).div_ceil(32) * 32;
    }
    write_gguf_at(&p, &meta, &tensors, Some(&good));
    LoadedModel::open(&p).unwrap();

    let mut misaligned = good.clone();
    misaligned[1] += 4;
    write_gguf_at(&p, &meta, &tensors, Some(&misaligned));
    let e = open_err(&p);
    assert!(e.contains("not a multiple of the file's alignment"), "{e}");

    let mut overlapping = good.clone();
    overlapping[2] = good[0];
    write_gguf_at(&p, &meta, &tensors, Some(&overlapping));
    let e = open_err(&p);
    assert!(e.contains("overlap"), "{e}");

    let mut repeated = tensors.clone();
    repeated[3].0 = repeated[2].0;
    write_gguf_at(&p, &meta, &repeated, Some(&good));
    let e = open_err(&p);
    assert!(e.contains("listed twice"), "{e}");
}

/// A type id changed to a smaller type (F32 to F16 here): the tensor still fits the
/// file, but its bytes would be read as the other type. The gap it leaves before the
/// next tensor gives it away.
#[test]
fn a_tensor_whose_type_was_changed_to_a_smaller_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    let (meta, mut tensors) = tiny_llama_parts("llama", true);
    let q = tensors
        .iter()
        .position(|t| t.0 == "blk.0.attn_q.weight")
        .unwrap();
    tensors[q].2 = 1;
    write_gguf(&p, &meta, &tensors);
    let e = open_err(&p);
    assert!(
        e.contains("'blk.0.attn_q.weight' ends 128 bytes before"),
        "{e}"
    );
    assert!(e.contains("does not match the data"), "{e}");
}

#[test]
fn a_fifo_or_a_device_is_refused_as_a_model_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("model.gguf");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    assert!(made.is_ok_and(|s| s.success()), "mkfifo failed");
    let (tx, rx) = std::sync::mpsc::channel();
    let f = fifo.clone();
    std::thread::spawn(move || {
        let _ = tx.send(LoadedModel::open(&f).map(|_| ()).map_err(|e| e.to_string()));
    });
    let got = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("opening a FIFO as a model blocked");
    let e = got.expect_err("a FIFO loaded as a model");
    assert!(e.contains("not a regular file"), "{e}");
    let e = open_err(Path::new("/dev/zero"));
    assert!(e.contains("not a regular file"), "{e}");
}

#[test]
fn a_tokenizer_json_with_a_huge_token_id_is_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tokenizer.json");
    let json = |big: u64| {
        format!(
            r#"{{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
            "normalizer":null,"pre_tokenizer":null,"post_processor":null,"decoder":null,
            "model":{{"type":"WordLevel","vocab":{{"a":0,"b":1,"[UNK]":{big}}},"unk_token":"[UNK]"}}}}"#
        )
    };
    std::fs::write(&p, json(u32::MAX as u64)).unwrap();
    let t0 = Instant::now();
    let e = match kvmerger_engine::tokenizer::Tokenizer::from_tokenizer_json(&p) {
        Ok(_) => panic!("a tokenizer with id 4294967295 among 3 tokens loaded"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("far beyond"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(5));
    std::fs::write(&p, json(2)).unwrap();
    kvmerger_engine::tokenizer::Tokenizer::from_tokenizer_json(&p).unwrap();
}

#[test]
fn safetensors_shapes_and_offsets_that_overflow_or_overlap_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("config.json"),
        r#"{"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 16, "vocab_size": 4}"#,
    )
    .unwrap();
    std::fs::write(d.join("tokenizer.json"), "{}").unwrap();
    let write = |header: &str, data: usize| {
        let mut st = (header.len() as u64).to_le_bytes().to_vec();
        st.extend_from_slice(header.as_bytes());
        st.resize(st.len() + data, 0);
        std::fs::write(d.join("model.safetensors"), &st).unwrap();
    };
    // Shape product wraps to the stated size in release builds.
    write(
        r#"{"a":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,0]}}"#,
        64,
    );
    assert!(open_err(d).contains("wrong size"));
    // Offsets near u64::MAX: data_start + end would wrap.
    write(
        r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[18446744073709551612,18446744073709551616]}}"#,
        64,
    );
    let e = open_err(d);
    assert!(e.contains("malformed") || e.contains("wrong size"), "{e}");
    write(
        r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[18446744073709551608,18446744073709551612]}}"#,
        64,
    );
    assert!(open_err(d).contains("wrong size"));
    // Two tensors sharing bytes.
    write(
        r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#,
        64,
    );
    assert!(open_err(d).contains("overlap"));
}

/// Found by fuzzing (scripts/fuzz, target tokenizer_json): the `tokenizers` library
/// panicked on a truncated file and on a decoder with an unknown field. Both are
/// errors naming the file now.
#[test]
fn a_malformed_tokenizer_json_section_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tokenizer.json");
    let head = r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}, "post_processor": null, "#;
    let model = r#""model":{"type":"WordLevel","vocab":{"a":0,"[UNK]":1},"unk_token":"[UNK]"}}"#;
    let cases = [
        format!(
            r#"{head}"decoder": {{"type": "ByteLevel", "ad{{"version":d_pre "1.0", "truncation": null, ""#
        ),
        format!(r#"{head}"decoder": {{"type": "ByteLevel", "ad": 1}}, {model}"#),
        format!(r#"{head}"decoder": {{"type": 7}}, {model}"#),
    ];
    for text in cases {
        std::fs::write(&p, &text).unwrap();
        match kvmerger_engine::tokenizer::Tokenizer::from_tokenizer_json(&p) {
            Ok(_) => panic!("loaded: {text}"),
            Err(e) => assert!(e.to_string().contains("not a valid tokenizer.json"), "{e}"),
        }
    }
}

#[test]
fn rope_factors_out_of_range_metadata_of_the_wrong_type_and_nan_norms_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    let cases: Vec<(&'static str, Meta, &str)> = vec![
        (
            "llama.rope.scaling.type",
            Meta::U32(1),
            "rope.scaling.type is not a string",
        ),
        (
            "llama.rope.scaling.factor",
            Meta::Str("8".into()),
            "rope.scaling.factor is not a number",
        ),
        (
            "llama.rope.scaling.attn_factor",
            Meta::Str("1".into()),
            "attn_factor is not a number",
        ),
    ];
    for (key, value, want) in cases {
        tiny_with(&p, key, value);
        let e = open_err(&p);
        assert!(e.contains(want), "{key}: {e}");
    }
    // A linear factor of 1e-30 loaded and produced garbage.
    let (mut meta, tensors) = tiny_llama_parts("llama", true);
    meta.push(("llama.rope.scaling.type", Meta::Str("linear".into())));
    meta.push(("llama.rope.scaling.factor", Meta::F32(1e-30)));
    write_gguf(&p, &meta, &tensors);
    let e = open_err(&p);
    assert!(e.contains("linear RoPE scaling factor"), "{e}");
    // A NaN in a norm's weights made every output NaN.
    let (meta, mut tensors) = tiny_llama_parts("llama", true);
    let norm = tensors
        .iter_mut()
        .find(|t| t.0 == "blk.0.ffn_norm.weight")
        .unwrap();
    norm.3[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
    write_gguf(&p, &meta, &tensors);
    let e = open_err(&p);
    assert!(
        e.contains("blk.0.ffn_norm.weight") && e.contains("not finite"),
        "{e}"
    );
}
