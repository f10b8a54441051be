//! Panels: `PR` weight rows decoded once into integer blocks (see
//! [`Blk`](super::scalar::Blk)) so that a tile kernel reuses them for many
//! tokens.

use super::act::QActs;
use super::scalar::{blk_isum, decode_blk, kind, max_weight, Blk, Kind};
use super::{Isa, QMatrix};

/// Rows per panel (the lanes of one AVX2 register of i32 or f32).
pub(crate) const PR: usize = 8;
/// Tokens per tile of the row-major kernel ([`Kind::Signed`]).
#[cfg(target_arch = "x86_64")]
const PT: usize = 2;
/// Tokens per interleaved tile (the unsigned kinds).
const IT: usize = 4;
/// Rows per register tile (divides `PR`).
#[cfg(target_arch = "x86_64")]
const RT: usize = 4;

pub(crate) struct Panel {
    pub kind: Kind,
    pub nb: usize,
    /// `[nb][PR][32]` weight bytes.
    pub q: Vec<u8>,
    /// `[nb][PR]` block scales.
    pub d: Vec<f32>,
    /// `[nb][PR]` integer scales of each 16 ([`Kind::Unsigned16`]).
    pub sc: Vec<[i16; 2]>,
    /// Offsets per row: `nb` ([`Kind::Unsigned`]), `2 nb` ([`Kind::Unsigned16`]) or 0.
    pub nm: usize,
    /// `[PR][nm]` offsets.
    pub m: Vec<f32>,
    /// The weight bytes row-interleaved for the unsigned tile kernels: block
    /// `b`, step `s` (bytes `4s..4s+4` of the block) holds those 4 bytes of the
    /// `PR` rows side by side, `[nb][8][PR][4]`, so that one `vpmaddubsw`
    /// against 4 broadcast activation bytes gives every row's partial sums.
    /// Empty for [`Kind::Signed`] (its tile multiplies row-major blocks).
    pub qi: Vec<u8>,
    /// `[nb][2][PR * 2]`: each row's integer scale of the first and second 16
    /// of a block, twice (the `vpmaddwd` operand for interleaved products of
    /// [`Kind::Unsigned16`]; else empty).
    pub sv: Vec<[i16; 2 * PR]>,
    /// `[nm][PR]`: `m` transposed, the rows' offsets of one block (or 16) side
    /// by side (unsigned kinds; else empty).
    pub mi: Vec<f32>,
}

impl Panel {
    pub fn new(kind: Kind, nb: usize) -> Panel {
        let nm = match kind {
            Kind::Unsigned => nb,
            Kind::Unsigned16 => 2 * nb,
            Kind::Signed => 0,
        };
        Panel {
            kind,
            nb,
            q: vec![0; nb * PR * 32],
            d: vec![0.0; nb * PR],
            sc: vec![[1, 1]; nb * PR],
            nm,
            m: vec![0.0; PR * nm],
            qi: if kind == Kind::Signed {
                Vec::new()
            } else {
                vec![0; nb * PR * 32]
            },
            sv: if kind == Kind::Unsigned16 {
                vec![[0; 2 * PR]; 2 * nb]
            } else {
                Vec::new()
            },
            mi: vec![0.0; nm * PR],
        }
    }

    /// Fills `qi`, `sv` and `mi` from `q`, `sc` and `m` (see their docs).
    fn interleave(&mut self) {
        if self.kind == Kind::Signed {
            return;
        }
        let nm = self.nm;
        for r in 0..PR {
            for j in 0..nm {
                self.mi[j * PR + r] = self.m[r * nm + j];
            }
        }
        for b in 0..self.nb {
            for r in 0..PR {
                let src = &self.q[(b * PR + r) * 32..][..32];
                for s in 0..8 {
                    let o = ((b * 8 + s) * PR + r) * 4;
                    self.qi[o..o + 4].copy_from_slice(&src[4 * s..4 * s + 4]);
                }
                if self.kind == Kind::Unsigned16 {
                    let [s0, s1] = self.sc[b * PR + r];
                    self.sv[2 * b][2 * r..2 * r + 2].fill(s0);
                    self.sv[2 * b + 1][2 * r..2 * r + 2].fill(s1);
                }
            }
        }
    }

    /// Decodes rows `r0..r0+rr` (`rr <= PR`); missing rows get zero scales.
    pub fn decode(&mut self, isa: Isa, w: &QMatrix, r0: usize, rr: usize) {
        let (nb, nm) = (self.nb, self.nm);
        for r in 0..PR {
            if r >= rr {
                for b in 0..nb {
                    self.d[b * PR + r] = 0.0;
                }
                self.m[r * nm..(r + 1) * nm].fill(0.0);
                continue;
            }
            let row = w.row_raw(r0 + r);
            #[cfg(target_arch = "x86_64")]
            if isa == Isa::Avx2 {
                // SAFETY: Isa::Avx2 means the CPU has the features; the panel
                // buffers have room for nb blocks of PR rows.
                let done = unsafe {
                    super::avx2::decode_row(
                        w.dtype,
                        row,
                        nb,
                        self.q.as_mut_ptr().add(r * 32),
                        self.d.as_mut_ptr().add(r),
                        self.sc.as_mut_ptr().add(r),
                        self.m.as_mut_ptr().add(r * nm),
                    )
                };
                if done {
                    continue;
                }
            }
            let _ = isa;
            for b in 0..nb {
                let k = decode_blk(w.dtype, row, b);
                self.q[(b * PR + r) * 32..][..32].copy_from_slice(&k.q);
                self.d[b * PR + r] = k.d;
                self.sc[b * PR + r] = k.sc;
                match self.kind {
                    Kind::Unsigned => self.m[r * nm + b] = k.m,
                    Kind::Unsigned16 => {
                        self.m[r * nm + 2 * b] = k.m16[0];
                        self.m[r * nm + 2 * b + 1] = k.m16[1];
                    }
                    Kind::Signed => {}
                }
            }
        }
        if isa != Isa::Scalar {
            self.interleave();
        }
    }

    fn blk(&self, r: usize, b: usize) -> Blk {
        let nm = self.nm;
        let (m, m16) = match self.kind {
            Kind::Unsigned => (self.m[r * nm + b], [0.0; 2]),
            Kind::Unsigned16 => (0.0, [self.m[r * nm + 2 * b], self.m[r * nm + 2 * b + 1]]),
            Kind::Signed => (0.0, [0.0; 2]),
        };
        Blk {
            q: self.q[(b * PR + r) * 32..][..32].try_into().unwrap(),
            d: self.d[b * PR + r],
            m,
            m16,
            sc: self.sc[b * PR + r],
        }
    }
}

/// Activation bytes per token block: small enough to stay in L2 while a
/// row chunk's panels sweep over them.
const TOKEN_BLOCK_BYTES: usize = 256 << 10;

/// Weight bytes of the panels decoded at once (kept, like the activations'
/// token block, in L2 while every token block goes over them).
const PANEL_GROUP_BYTES: usize = 256 << 10;

/// Rows `r0..r1` of `out[t*ld + r]` for all tokens of `a`, through panels:
/// a group of panels is decoded once, then every token block goes over it.
pub(crate) fn panel_rows(
    isa: Isa,
    w: &QMatrix,
    a: &QActs,
    r0: usize,
    r1: usize,
    out: *mut f32,
    ld: usize,
) {
    let kd = kind(w.dtype);
    #[cfg(target_arch = "x86_64")]
    let steps = super::avx2::steps_for(max_weight(w.dtype));
    let group = (PANEL_GROUP_BYTES / (PR * a.cols)).clamp(1, (r1 - r0).div_ceil(PR).max(1));
    let mut pans: Vec<Panel> = (0..group).map(|_| Panel::new(kd, a.nb)).collect();
    #[cfg(target_arch = "x86_64")]
    let mut sbuf = Vec::new();
    let tb = (TOKEN_BLOCK_BYTES / a.cols / IT * IT).max(16 * IT);
    let mut g0 = r0;
    while g0 < r1 {
        let mut g1 = g0;
        let mut np = 0;
        while np < group && g1 < r1 {
            let rr = (r1 - g1).min(PR);
            pans[np].decode(isa, w, g1, rr);
            np += 1;
            g1 += rr;
        }
        let mut t0 = 0;
        while t0 < a.n {
            let t1 = (t0 + tb).min(a.n);
            // With VNNI, unsigned panels go two at a time (16 rows a tile).
            #[cfg(target_arch = "x86_64")]
            let pairs = isa == Isa::Avx2 && kd == Kind::Unsigned && super::vnni();
            let mut i = 0;
            while i < np {
                let pan = &pans[i];
                let r = g0 + i * PR;
                let rr = (g1 - r).min(PR);
                // SAFETY: the caller owns out[t*ld + r0..r1] for every t.
                let o = unsafe { out.add(r) };
                #[cfg(target_arch = "x86_64")]
                if pairs && i + 1 < np {
                    let rr2 = (g1 - r - PR).min(PR);
                    // SAFETY: as above; VNNI checked by `super::vnni`.
                    unsafe {
                        let o2 = out.add(r + PR);
                        let mut t = t0;
                        while t < t1 {
                            let tt = (t1 - t).min(IT);
                            avx2_vnni_pair(tt, [pan, &pans[i + 1]], a, t, [rr, rr2], [o, o2], ld);
                            t += tt;
                        }
                    }
                    i += 2;
                    continue;
                }
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 => unsafe {
                        let mut t = t0;
                        while t < t1 {
                            t += if kd == Kind::Signed {
                                let tt = (t1 - t).min(PT);
                                avx2_signed(tt, pan, a, t, rr, &mut sbuf, o, ld);
                                tt
                            } else {
                                let tt = (t1 - t).min(IT);
                                avx2_interleaved(kd, steps, tt, pan, a, t, rr, o, ld);
                                tt
                            };
                        }
                    },
                    _ => scalar_panel(pan, a, t0, t1, rr, o, ld),
                }
                i += 1;
            }
            t0 = t1;
        }
        g0 = g1;
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn avx2_signed(
    tt: usize,
    pan: &Panel,
    a: &QActs,
    t: usize,
    rr: usize,
    sbuf: &mut Vec<f32>,
    o: *mut f32,
    ld: usize,
) {
    use super::avx2::tile_signed;
    match tt {
        1 => tile_signed::<RT, 1>(pan, a, t, rr, sbuf, o, ld),
        _ => tile_signed::<RT, PT>(pan, a, t, rr, sbuf, o, ld),
    }
}

/// Dispatches [`super::avx2::tile_interleaved`] on the kind, the steps that
/// add up in 16 bits, and the token count (`1..=IT`); unsigned panels go to
/// the VNNI version where [`super::vnni`] allows.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn avx2_interleaved(
    kd: Kind,
    steps: usize,
    tt: usize,
    pan: &Panel,
    a: &QActs,
    t: usize,
    rr: usize,
    o: *mut f32,
    ld: usize,
) {
    use super::avx2::{tile_interleaved, K_U, K_U16};
    macro_rules! by_tokens {
        ($k:expr, $s:expr) => {
            match tt {
                1 => tile_interleaved::<$k, 1, $s>(pan, a, t, rr, o, ld),
                2 => tile_interleaved::<$k, 2, $s>(pan, a, t, rr, o, ld),
                3 => tile_interleaved::<$k, 3, $s>(pan, a, t, rr, o, ld),
                _ => tile_interleaved::<$k, IT, $s>(pan, a, t, rr, o, ld),
            }
        };
    }
    if kd == Kind::Unsigned && super::vnni() {
        return avx2_vnni_pair(tt, [pan], a, t, [rr], [o], ld);
    }
    match (kd, steps) {
        (Kind::Unsigned, 8) => by_tokens!(K_U, 8),
        (Kind::Unsigned, 4) => by_tokens!(K_U, 4),
        (Kind::Unsigned, 2) => by_tokens!(K_U, 2),
        (Kind::Unsigned, _) => by_tokens!(K_U, 1),
        (Kind::Unsigned16, 4 | 8) => by_tokens!(K_U16, 4),
        (Kind::Unsigned16, 2) => by_tokens!(K_U16, 2),
        _ => by_tokens!(K_U16, 1),
    }
}

/// Dispatches [`super::avx2::tile_interleaved_vnni`] on the token count
/// (`1..=IT`), for `NP` unsigned panels side by side.
#[cfg(target_arch = "x86_64")]
unsafe fn avx2_vnni_pair<const NP: usize>(
    tt: usize,
    pans: [&Panel; NP],
    a: &QActs,
    t: usize,
    rr: [usize; NP],
    o: [*mut f32; NP],
    ld: usize,
) {
    use super::avx2::tile_interleaved_vnni;
    match tt {
        1 => tile_interleaved_vnni::<1, NP>(pans, a, t, rr, o, ld),
        2 => tile_interleaved_vnni::<2, NP>(pans, a, t, rr, o, ld),
        3 => tile_interleaved_vnni::<3, NP>(pans, a, t, rr, o, ld),
        _ => tile_interleaved_vnni::<IT, NP>(pans, a, t, rr, o, ld),
    }
}

#[allow(clippy::too_many_arguments)]
fn scalar_panel(pan: &Panel, a: &QActs, t0: usize, t1: usize, rr: usize, out: *mut f32, ld: usize) {
    for t in t0..t1 {
        let x = a.row(t);
        for r in 0..rr {
            let mut acc = 0f32;
            let mut accm = 0f32;
            for b in 0..pan.nb {
                let k = pan.blk(r, b);
                acc += k.d * x.d[b] * blk_isum(pan.kind, &k, &x.qs[32 * b..32 * b + 32]) as f32;
                accm += k.m * x.ds[b] + k.m16[0] * x.ds16[2 * b] + k.m16[1] * x.ds16[2 * b + 1];
            }
            // SAFETY: the caller owns these output cells.
            unsafe { *out.add(t * ld + r) = acc + accm };
        }
    }
}
