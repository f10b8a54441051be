//! Dequantization of real tensors, bit for bit against the `gguf` Python package
//! (`gguf.quants.dequantize`), for every tensor type in the three models.

mod common;

use common::model_path;
use kvmerger_engine::gguf::GgufFile;
use kvmerger_engine::quant::QMatrix;

const DUMP: &str = r#"
import sys, numpy as np, gguf
r = gguf.GGUFReader(sys.argv[1])
out = sys.argv[2]
seen = {}
for t in r.tensors:
    if len(t.shape) != 2 or t.tensor_type.name in seen:
        continue
    rows = np.asarray(t.data)[:3]
    d = np.asarray(gguf.quants.dequantize(rows, t.tensor_type), dtype=np.float32).reshape(3, -1)
    name = t.tensor_type.name
    seen[name] = t.name
    d.tofile(f"{out}/{t.name}.f32")
with open(f"{out}/index.txt", "w") as f:
    for ty, name in seen.items():
        f.write(f"{ty} {name}\n")
"#;

fn check(id: &str) -> Vec<String> {
    let path = model_path(id);
    let dir = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("python3")
        .args(["-c", DUMP])
        .arg(&path)
        .arg(dir.path())
        .status()
        .expect("python3 must be installed");
    assert!(
        status.success(),
        "the gguf package failed (pip install -r scripts/requirements-reference.txt)"
    );
    let f = GgufFile::open(&path).unwrap();
    let index = std::fs::read_to_string(dir.path().join("index.txt")).unwrap();
    let mut types = Vec::new();
    for line in index.lines() {
        let (ty, name) = line.split_once(' ').unwrap();
        let want: Vec<f32> = std::fs::read(dir.path().join(format!("{name}.f32")))
            .unwrap()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let m = QMatrix::from_gguf(&f, name).unwrap();
        let mut row = vec![0.0f32; m.cols()];
        for r in 0..3 {
            m.dequantize_row(r, &mut row);
            let w = &want[r * m.cols()..(r + 1) * m.cols()];
            for (c, (a, b)) in row.iter().zip(w).enumerate() {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "{id} {name} ({ty}) row {r} col {c}: {a} vs {b}"
                );
            }
        }
        types.push(ty.to_string());
    }
    types
}

#[test]
fn every_tensor_type_of_the_three_models_dequantizes_like_the_gguf_package() {
    let mut all: Vec<String> = ["smollm2-135m", "qwen2.5-0.5b", "gemma3-270m"]
        .iter()
        .flat_map(|m| check(m))
        .collect();
    all.sort();
    all.dedup();
    for ty in ["Q4_1", "Q8_0", "Q5_0", "Q4_K", "Q6_K"] {
        assert!(all.iter().any(|t| t == ty), "{ty} was not covered: {all:?}");
    }
}
