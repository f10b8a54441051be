//! Panels: `PR` weight rows decoded once into integer blocks (see
//! [`Blk`](super::scalar::Blk)) so that a tile kernel reuses them for many
//! tokens.

use super::act::QActs;
use super::scalar::{blk_isum, decode_blk, kind, Blk, Kind};
use super::{Isa, QMatrix};

/// Rows per panel.
pub(crate) const PR: usize = 4;
/// Tokens per tile (the widest tile kernel).
pub(crate) const PT: usize = 2;
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
    /// `[nb][PR]` the same, spread over the 16 lanes of a `vpmaddwd`
    /// operand ([`Kind::Unsigned16`] only, else empty).
    pub scv: Vec<[i16; 16]>,
    /// Offsets per row: `nb` ([`Kind::Unsigned`]), `2 nb` ([`Kind::Unsigned16`]) or 0.
    pub nm: usize,
    /// `[PR][nm]` offsets.
    pub m: Vec<f32>,
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
            scv: if kind == Kind::Unsigned16 {
                vec![[0; 16]; nb * PR]
            } else {
                Vec::new()
            },
            nm,
            m: vec![0.0; PR * nm],
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
                    self.spread_scales(r);
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
            self.spread_scales(r);
        }
    }

    fn spread_scales(&mut self, r: usize) {
        if self.kind == Kind::Unsigned16 {
            for b in 0..self.nb {
                let [s0, s1] = self.sc[b * PR + r];
                let v = &mut self.scv[b * PR + r];
                v[..8].fill(s0);
                v[8..].fill(s1);
            }
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

/// Activation block sums laid out `[j][npad]` (token-contiguous, `npad` a
/// multiple of 8, zero padded), per 32 or per 16 elements.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct SumsT {
    pub npad: usize,
    pub v: Vec<f32>,
}

impl SumsT {
    pub fn new(a: &QActs, kind: Kind) -> SumsT {
        let npad = a.n.div_ceil(8) * 8;
        let (src, per) = match kind {
            Kind::Unsigned => (&a.ds, a.nb),
            Kind::Unsigned16 => (&a.ds16, 2 * a.nb),
            Kind::Signed => {
                return SumsT {
                    npad,
                    v: Vec::new(),
                }
            }
        };
        let mut v = vec![0f32; per * npad];
        for t in 0..a.n {
            for j in 0..per {
                v[j * npad + t] = src[t * per + j];
            }
        }
        SumsT { npad, v }
    }
}

/// Activation bytes per token block: small enough to stay in L2 while a
/// row chunk's panels sweep over them.
const TOKEN_BLOCK_BYTES: usize = 256 << 10;

/// Rows `r0..r1` of `out[t*ld + r]` for all tokens of `a`, through panels.
#[allow(clippy::too_many_arguments)]
pub(crate) fn panel_rows(
    isa: Isa,
    w: &QMatrix,
    a: &QActs,
    sums: &SumsT,
    r0: usize,
    r1: usize,
    out: *mut f32,
    ld: usize,
) {
    let kd = kind(w.dtype);
    let mut pan = Panel::new(kd, a.nb);
    #[cfg(target_arch = "x86_64")]
    let (mut mins, mut sbuf) = (vec![0f32; sums.npad * PR], Vec::new());
    #[cfg(not(target_arch = "x86_64"))]
    let _ = sums;
    let tb = (TOKEN_BLOCK_BYTES / a.cols / PT * PT).max(16 * PT);
    let mut t0 = 0;
    while t0 < a.n {
        let t1 = (t0 + tb).min(a.n);
        let mut r = r0;
        while r < r1 {
            let rr = (r1 - r).min(PR);
            pan.decode(isa, w, r, rr);
            // SAFETY: the caller owns out[t*ld + r0..r1] for every t.
            let o = unsafe { out.add(r) };
            match isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => unsafe {
                    if kd != Kind::Signed {
                        super::avx2::panel_mins(&pan, sums, t0, t1, &mut mins);
                    }
                    let mut t = t0;
                    while t < t1 {
                        let tt = (t1 - t).min(PT);
                        avx2_tile(kd, tt, &pan, a, t, rr, &mins, &mut sbuf, o, ld);
                        t += tt;
                    }
                },
                _ => scalar_panel(&pan, a, t0, t1, rr, o, ld),
            }
            r += rr;
        }
        t0 = t1;
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn avx2_tile(
    kd: Kind,
    tt: usize,
    pan: &Panel,
    a: &QActs,
    t: usize,
    rr: usize,
    mins: &[f32],
    sbuf: &mut Vec<f32>,
    o: *mut f32,
    ld: usize,
) {
    use super::avx2::{K_S, K_U, K_U16};
    match kd {
        Kind::Unsigned => avx2_tile_k::<K_U>(tt, pan, a, t, rr, mins, sbuf, o, ld),
        Kind::Unsigned16 => avx2_tile_k::<K_U16>(tt, pan, a, t, rr, mins, sbuf, o, ld),
        Kind::Signed => avx2_tile_k::<K_S>(tt, pan, a, t, rr, mins, sbuf, o, ld),
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn avx2_tile_k<const K: u8>(
    tt: usize,
    pan: &Panel,
    a: &QActs,
    t: usize,
    rr: usize,
    mins: &[f32],
    sbuf: &mut Vec<f32>,
    o: *mut f32,
    ld: usize,
) {
    use super::avx2::tile;
    match tt {
        1 => tile::<K, RT, 1>(pan, a, t, rr, mins, sbuf, o, ld),
        2 => tile::<K, RT, 2>(pan, a, t, rr, mins, sbuf, o, ld),
        3 if PT > 3 => tile::<K, RT, 3>(pan, a, t, rr, mins, sbuf, o, ld),
        4 if PT > 4 => tile::<K, RT, 4>(pan, a, t, rr, mins, sbuf, o, ld),
        5 if PT > 5 => tile::<K, RT, 5>(pan, a, t, rr, mins, sbuf, o, ld),
        _ => tile::<K, RT, PT>(pan, a, t, rr, mins, sbuf, o, ld),
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
