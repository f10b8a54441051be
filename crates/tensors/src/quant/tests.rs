use super::*;
use crate::gguf::GgufFile;

/// Deterministic pseudo-random values in [-1, 1) (xorshift).
pub(crate) fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Worst-case round-trip error bound for `ty` relative to the block's max magnitude.
fn rel_tolerance(ty: GgmlType) -> f32 {
    match ty {
        GgmlType::F32 => 0.0,
        GgmlType::F16 => 1e-3,
        GgmlType::BF16 => 1e-2,
        GgmlType::Q8_0 | GgmlType::Q8_K => 1.0 / 127.0,
        GgmlType::Q6_K => 2.5 / 32.0,
        GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q5_K => 2.5 / 16.0,
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q4_K => 2.5 / 8.0,
    }
}

#[test]
fn ids_round_trip() {
    for ty in GgmlType::ALL {
        assert_eq!(GgmlType::from_u32(ty.id()), Some(ty));
        assert_eq!(ty.row_bytes(ty.block_size()), ty.type_size());
    }
    assert_eq!(GgmlType::from_u32(9), None);
}

#[test]
fn quantize_dequantize_round_trip() {
    for ty in GgmlType::ALL {
        let n = 512;
        let x: Vec<f32> = rand_vec(n, 7)
            .iter()
            .enumerate()
            .map(|(i, v)| v * (1.0 + (i % 97) as f32 / 10.0))
            .collect();
        let q = quantize_row(ty, &x);
        assert_eq!(q.len(), ty.row_bytes(n), "{ty}");
        let mut y = vec![0f32; n];
        dequantize_row(ty, &q, &mut y);
        let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        let tol = rel_tolerance(ty) * amax + 1e-6;
        for i in 0..n {
            assert!(
                (x[i] - y[i]).abs() <= tol,
                "{ty}: elem {i}: {} vs {} (tol {tol})",
                x[i],
                y[i]
            );
        }
    }
}

/// Hand-built blocks with known values, independent of the quantizers.
#[test]
fn known_blocks() {
    let one = half::f16::from_f32(0.5).to_bits().to_le_bytes();
    // Q4_0: d=0.5, elem j = nibble j&15 -> (q-8)*0.5.
    let mut b = one.to_vec();
    for j in 0..16u8 {
        b.push(j | ((15 - j) << 4));
    }
    let mut y = [0f32; 32];
    dequantize_row(GgmlType::Q4_0, &b, &mut y);
    for j in 0..16 {
        assert_eq!(y[j], (j as f32 - 8.0) * 0.5);
        assert_eq!(y[j + 16], (7.0 - j as f32) * 0.5);
    }
    // Q5_0: same nibbles, qh = bit i set for odd i.
    let mut b = one.to_vec();
    b.extend_from_slice(&0xAAAA_AAAAu32.to_le_bytes());
    for j in 0..16u8 {
        b.push(j | ((15 - j) << 4));
    }
    dequantize_row(GgmlType::Q5_0, &b, &mut y);
    for j in 0..16 {
        let h = if j % 2 == 1 { 16.0 } else { 0.0 };
        assert_eq!(y[j], (j as f32 + h - 16.0) * 0.5);
        assert_eq!(y[j + 16], (15.0 - j as f32 + h - 16.0) * 0.5);
    }
}

#[test]
fn qmatrix_basics() {
    let (rows, cols) = (3, 64);
    let data = rand_vec(rows * cols, 1);
    let m = QMatrix::from_f32(rows, cols, data.clone());
    assert_eq!(m.to_f32(), data);
    let mut row = vec![0f32; cols];
    m.dequantize_row(2, &mut row);
    assert_eq!(row, data[2 * cols..]);
    let bytes: Vec<u8> = data
        .iter()
        .flat_map(|v| half::f16::from_f32(*v).to_bits().to_le_bytes())
        .collect();
    let h = QMatrix::from_f16_bytes(rows, cols, bytes);
    assert_eq!(h.bytes(), rows * cols * 2);
    for (a, b) in h.to_f32().iter().zip(&data) {
        assert!((a - b).abs() < 1e-3);
    }
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<QMatrix>();
}

fn isas() -> Vec<Isa> {
    let mut v = vec![Isa::Scalar];
    if Isa::detect() != Isa::Scalar {
        v.push(Isa::detect());
    }
    v
}

/// matmul equals dequantize-then-dot in f64, for every type, every kernel
/// set and several shapes (token tails, row tails, parallel splits).
#[test]
fn matmul_matches_dequantized_dot() {
    for isa in isas() {
        for ty in GgmlType::ALL {
            check_matmul(isa, ty);
        }
    }
}

fn check_matmul(isa: Isa, ty: GgmlType) {
    {
        let bs = ty.block_size().max(32);
        for &(rows, cols, n) in &[
            (1, bs, 1),
            (5, 2 * bs, 1),
            (7, 3 * bs, 3),
            (13, bs * 2, 9),
            (33, bs * 3, 17),
        ] {
            if ty.block_size() == 256 && cols % 256 != 0 {
                continue;
            }
            let w = rand_vec(rows * cols, rows as u64 * 31 + cols as u64);
            let m = QMatrix::quantize(ty, rows, cols, &w);
            let wd = m.to_f32();
            let x: Vec<f32> = rand_vec(n * cols, 99 + n as u64)
                .iter()
                .map(|v| v * 3.0 + 0.7)
                .collect();
            let mut out = vec![f32::NAN; n * rows];
            m.matmul_isa(isa, &x, n, &mut out);
            for t in 0..n {
                let xt = &x[t * cols..(t + 1) * cols];
                // Per-element bound of the 8-bit activation rounding: amax(block)/254.
                let xerr: Vec<f64> = xt
                    .chunks(32)
                    .flat_map(|b| {
                        let a = b.iter().fold(0f32, |a, v| a.max(v.abs())) as f64 / 254.0;
                        let e = if ty.block_size() == 1 { 0.0 } else { a };
                        b.iter().map(move |_| e)
                    })
                    .collect();
                for r in 0..rows {
                    let exact: f64 = (0..cols)
                        .map(|c| wd[r * cols + c] as f64 * xt[c] as f64)
                        .sum();
                    let bound: f64 = (0..cols)
                        .map(|c| wd[r * cols + c].abs() as f64 * xerr[c])
                        .sum();
                    let mag: f64 = (0..cols)
                        .map(|c| (wd[r * cols + c] as f64 * xt[c] as f64).abs())
                        .sum();
                    let tol = bound * 1.01 + mag * 1e-5 + 1e-6;
                    let got = out[t * rows + r] as f64;
                    assert!(
                        (got - exact).abs() <= tol,
                        "{isa:?} {ty} {rows}x{cols} n={n}: out[{t}][{r}] = {got}, expected {exact} (tol {tol})"
                    );
                }
            }
        }
    }
}

/// The scalar and SIMD kernels agree closely (same integer sums, different
/// f32 summation order), and quantize activations to the same bytes.
#[test]
fn isas_agree() {
    let isa = Isa::detect();
    if isa == Isa::Scalar {
        return;
    }
    let cols = 768;
    let x: Vec<f32> = rand_vec(11 * cols, 4)
        .iter()
        .map(|v| v * v * v * 10.0)
        .collect();
    let a = act::QActs::quantize(Isa::Scalar, &x, 11, cols);
    let b = act::QActs::quantize(isa, &x, 11, cols);
    assert_eq!(a.qs, b.qs);
    assert_eq!(a.d, b.d);
    assert_eq!(a.ds, b.ds);
    assert_eq!(a.ds16, b.ds16);
    for ty in GgmlType::ALL {
        let rows = 37;
        let w: Vec<f32> = rand_vec(rows * cols, 8)
            .iter()
            .map(|v| v * (1.0 + v * v * 4.0))
            .collect();
        let m = QMatrix::quantize(ty, rows, cols, &w);
        for n in [1, 2, 4, 5, 11] {
            assert_isa_matches_scalar(isa, &m, &x[..n * cols], n, &format!("{ty} n={n}"));
        }
    }
}

/// `m`'s product with `n` tokens of `x` under `isa` is the scalar kernel's, up to
/// the order of f32 additions (2e-5 of the largest output).
fn assert_isa_matches_scalar(isa: Isa, m: &QMatrix, x: &[f32], n: usize, what: &str) {
    let mut o1 = vec![0f32; n * m.rows()];
    let mut o2 = vec![0f32; n * m.rows()];
    m.matmul_isa(Isa::Scalar, x, n, &mut o1);
    m.matmul_isa(isa, x, n, &mut o2);
    let scale = o1.iter().fold(1e-6f32, |s, v| s.max(v.abs()));
    for i in 0..o1.len() {
        assert!(
            (o1[i] - o2[i]).abs() <= 2e-5 * scale,
            "{what} [{i}]: {} vs {}",
            o1[i],
            o2[i]
        );
    }
}

/// Products big enough for several panel groups (rows) and token blocks
/// (tokens) agree between the scalar and SIMD kernels.
#[test]
fn panel_groups_and_token_blocks_agree() {
    let isa = Isa::detect();
    if isa == Isa::Scalar {
        return;
    }
    let (rows, cols, n) = (150, 4096, 70);
    let x: Vec<f32> = rand_vec(n * cols, 5)
        .iter()
        .map(|v| v * v * v * 10.0)
        .collect();
    for ty in [
        GgmlType::Q4_K,
        GgmlType::Q5_0,
        GgmlType::Q6_K,
        GgmlType::Q8_0,
    ] {
        let m = QMatrix::quantize(ty, rows, cols, &rand_vec(rows * cols, 9));
        assert_isa_matches_scalar(isa, &m, &x, n, &format!("{ty}"));
    }
}

/// The kernels' 16-bit partial sums do not saturate at the extremes: every
/// weight at its format's largest (or smallest) value and every activation at
/// +-127, where integer sums are largest. The scalar kernels add in i32.
#[test]
fn extreme_blocks_do_not_saturate() {
    let isa = Isa::detect();
    if isa == Isa::Scalar {
        return;
    }
    let (rows, cols, n) = (19, 512, 7);
    for ty in GgmlType::ALL {
        for sw in [1.0f32, -1.0] {
            // One opposite weight per block sets the range, the rest sit at an end.
            let w: Vec<f32> = (0..rows * cols)
                .map(|i| if i % 32 == 0 { -sw } else { sw })
                .collect();
            let m = QMatrix::quantize(ty, rows, cols, &w);
            for sx in [1.0f32, -1.0] {
                let x = vec![sx; n * cols];
                assert_isa_matches_scalar(isa, &m, &x, n, &format!("{ty} weights {sw} x {sx}"));
            }
        }
    }
}

/// matmul_multi gives what separate matmuls give.
#[test]
fn matmul_multi_matches_matmul() {
    for isa in isas() {
        for n in [1, 3, 8] {
            let cols = 512;
            let x = rand_vec(n * cols, 77);
            let types = [
                GgmlType::Q4_1,
                GgmlType::Q4_K,
                GgmlType::Q8_0,
                GgmlType::Q6_K,
                GgmlType::Q5_0,
            ];
            let mats: Vec<QMatrix> = types
                .iter()
                .enumerate()
                .map(|(i, &ty)| {
                    let rows = 40 + 37 * i;
                    QMatrix::quantize(ty, rows, cols, &rand_vec(rows * cols, i as u64))
                })
                .collect();
            let refs: Vec<&QMatrix> = mats.iter().collect();
            let mut outs: Vec<Vec<f32>> =
                mats.iter().map(|m| vec![f32::NAN; n * m.rows()]).collect();
            let mut views: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
            QMatrix::matmul_multi_isa(isa, &refs, &x, n, &mut views);
            for (m, o) in mats.iter().zip(&outs) {
                let mut want = vec![0f32; n * m.rows()];
                m.matmul_isa(isa, &x, n, &mut want);
                assert_eq!(o, &want, "{isa:?} {} n={n}", m.dtype());
            }
        }
    }
    // Mixed with a float matrix (falls back to separate calls).
    let a = QMatrix::quantize(GgmlType::F16, 3, 64, &rand_vec(192, 1));
    let b = QMatrix::quantize(GgmlType::Q8_0, 5, 64, &rand_vec(320, 2));
    let x = rand_vec(128, 3);
    let (mut oa, mut ob) = (vec![0f32; 6], vec![0f32; 10]);
    QMatrix::matmul_multi(&[&a, &b], &x, 2, &mut [&mut oa, &mut ob]);
    let (mut wa, mut wb) = (vec![0f32; 6], vec![0f32; 10]);
    a.matmul(&x, 2, &mut wa);
    b.matmul(&x, 2, &mut wb);
    assert_eq!((oa, ob), (wa, wb));
}

/// Real weights of the three models: matmul (every kernel set, one token and
/// several) against dequantize-then-dot in f64, with an outlier activation channel.
#[test]
fn real_weights_matmul_accuracy() {
    let dir = kvmerger_assets::data_dir(None).join("models");
    for (model, names) in [
        (
            "smollm2-135m",
            &[
                "blk.0.ffn_down.weight",
                "blk.3.attn_k.weight",
                "token_embd.weight",
            ][..],
        ),
        (
            "qwen2.5-0.5b",
            &[
                "blk.0.ffn_up.weight",
                "blk.0.ffn_down.weight",
                "blk.11.ffn_down.weight",
                "blk.0.attn_v.weight",
            ][..],
        ),
        (
            "gemma3-270m",
            &[
                "blk.0.attn_output.weight",
                "blk.0.ffn_down.weight",
                "blk.0.attn_q.weight",
            ][..],
        ),
    ] {
        let f = GgufFile::open(&dir.join(format!("{model}.gguf"))).unwrap();
        for name in names {
            let m = QMatrix::from_gguf(&f, name).unwrap();
            let rows = m.rows().min(256);
            let cols = m.cols();
            let mut wd = vec![0f32; rows * cols];
            for r in 0..rows {
                m.dequantize_row(r, &mut wd[r * cols..(r + 1) * cols]);
            }
            // Activations with an outlier channel, as hidden states have.
            let n = 5;
            let mut x = rand_vec(n * cols, 11);
            for t in 0..n {
                x[t * cols + 7] = 40.0;
            }
            for isa in isas() {
                for nn in [1, n] {
                    let mut out = vec![0f32; nn * m.rows()];
                    m.matmul_isa(isa, &x[..nn * cols], nn, &mut out);
                    let (mut err, mut norm) = (0f64, 0f64);
                    for t in 0..nn {
                        for r in 0..rows {
                            let exact: f64 = (0..cols)
                                .map(|c| wd[r * cols + c] as f64 * x[t * cols + c] as f64)
                                .sum();
                            err += (out[t * m.rows() + r] as f64 - exact).powi(2);
                            norm += exact * exact;
                        }
                    }
                    let rel = (err / norm).sqrt();
                    eprintln!(
                        "{model} {name} {} {isa:?} n={nn}: relative error {rel:.2e}",
                        m.dtype()
                    );
                    assert!(rel < 2e-2, "{model} {name}: relative error {rel}");
                }
            }
        }
    }
}

/// The SIMD dequantizer gives the scalar one's bits, on random block bytes
/// (finite scales) of every type.
#[test]
fn dequantize_kernels_agree_bitwise() {
    let mut s = 0x1234_5678_9abc_def0u64;
    let mut byte = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 24) as u8
    };
    for ty in GgmlType::ALL {
        let n = 4 * ty.block_size().max(64);
        let mut src: Vec<u8> = (0..ty.row_bytes(n)).map(|_| byte()).collect();
        // Keep half-float fields finite: clear the top exponent bit of every
        // odd byte (a harmless change to other fields).
        if !matches!(ty, GgmlType::F32 | GgmlType::BF16 | GgmlType::Q8_K) {
            for (i, b) in src.iter_mut().enumerate() {
                if i % 2 == 1 {
                    *b &= !0x40;
                }
            }
        }
        let mut a = vec![0f32; n];
        let mut b = vec![0f32; n];
        formats::dequantize_row_scalar(ty, &src, &mut a);
        dequantize_row(ty, &src, &mut b);
        for i in 0..n {
            assert!(
                a[i].to_bits() == b[i].to_bits() || (a[i].is_nan() && b[i].is_nan()),
                "{ty} [{i}]: {} vs {}",
                a[i],
                b[i]
            );
        }
    }
}
