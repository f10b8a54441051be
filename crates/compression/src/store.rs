//! The per-(layer, KV head) slot store that the engine's cache is made of.
//!
//! Every store has its own length, so compression can leave heads at different
//! sizes; replacing a store (see [`HeadStore::from_data`]) really frees the
//! memory of the slots that were dropped.

use crate::Error;
use half::f16;

/// Element type of stored keys and values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum KvDtype {
    #[default]
    F16,
    F32,
    /// 8-bit integers with one f16 scale per block of [`Q8_BLOCK`] values of a row
    /// (ggml's q8_0): 34 bytes per 32 values.
    Q8_0,
}

/// Values per scale in [`KvDtype::Q8_0`] storage (a row's last block may be shorter).
pub const Q8_BLOCK: usize = 32;

impl KvDtype {
    /// Bytes per stored value, not counting q8_0's per-block scales (see [`KvDtype::row_bytes`]).
    pub fn size(self) -> usize {
        match self {
            KvDtype::F16 => 2,
            KvDtype::F32 => 4,
            KvDtype::Q8_0 => 1,
        }
    }

    /// Exact bytes of one stored key (or value) row of `dim` values.
    pub fn row_bytes(self, dim: usize) -> usize {
        match self {
            KvDtype::Q8_0 => dim + 2 * dim.div_ceil(Q8_BLOCK),
            _ => dim * self.size(),
        }
    }
}

impl std::str::FromStr for KvDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f16" => Ok(KvDtype::F16),
            "f32" => Ok(KvDtype::F32),
            "q8_0" | "q8" => Ok(KvDtype::Q8_0),
            other => Err(format!(
                "unknown KV dtype '{other}' (expected f16, f32 or q8_0)"
            )),
        }
    }
}

/// What compression needs to know of a slot besides its key and value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SlotMeta {
    /// Position of the token in the original sequence (for a merged slot, the pivot's).
    pub position: u32,
    /// Number of original tokens this slot stands for (1 for a plain token).
    pub count: u32,
    /// Accumulated attention the slot has received (H2O's score).
    pub score: f32,
    /// Additive bias on the attention logit of this slot (0 = none).
    pub bias: f32,
    /// A learned scorer's prediction for the token (KVzap's predicted log KVzip
    /// score), set by the forward pass when a method asks for it; travels with the slot
    /// through compression, as `score` does.
    pub learned: f32,
}

impl SlotMeta {
    pub fn token(position: u32) -> Self {
        SlotMeta {
            position,
            count: 1,
            score: 0.0,
            bias: 0.0,
            learned: 0.0,
        }
    }
}

/// Bytes of one slot's metadata in [`HeadStore::write_bytes`]'s layout.
pub const META_BYTES: usize = 20;

/// Borrowed view of stored keys or values in their storage type.
#[derive(Clone, Copy, Debug)]
pub enum KvSlice<'a> {
    F16(&'a [f16]),
    F32(&'a [f32]),
    /// q8_0 rows: `q` holds the values (row-major), `d` one scale per block of
    /// [`Q8_BLOCK`] values of each row (`dim.div_ceil(Q8_BLOCK)` scales per row);
    /// value = q * d.
    Q8_0 {
        q: &'a [i8],
        d: &'a [f16],
    },
}

/// Quantizes one row to q8_0: per block, the scale maps the largest magnitude to 127.
/// Re-quantizing a dequantized row gives the same bytes back.
pub fn quantize_q8_0(x: &[f32], q: &mut Vec<i8>, d: &mut Vec<f16>) {
    for b in x.chunks(Q8_BLOCK) {
        let amax = b.iter().fold(0f32, |a, v| a.max(v.abs()));
        let scale = f16::from_f32(amax / 127.0);
        let s = scale.to_f32();
        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
        d.push(scale);
        q.extend(
            b.iter()
                .map(|v| (v * inv).round().clamp(-127.0, 127.0) as i8),
        );
    }
}

/// Dequantizes q8_0 values `q` (whole rows of `dim`) with their scales `d`, into `out`.
pub fn dequantize_q8_0(q: &[i8], d: &[f16], dim: usize, out: &mut [f32]) {
    let nb = dim.div_ceil(Q8_BLOCK);
    for ((qr, dr), or) in q.chunks(dim).zip(d.chunks(nb)).zip(out.chunks_mut(dim)) {
        for ((qb, s), ob) in qr.chunks(Q8_BLOCK).zip(dr).zip(or.chunks_mut(Q8_BLOCK)) {
            let s = s.to_f32();
            for (o, &v) in ob.iter_mut().zip(qb) {
                *o = v as f32 * s;
            }
        }
    }
}

#[derive(Clone, Debug)]
enum Storage {
    F16(Vec<f16>),
    F32(Vec<f32>),
    Q8_0 { dim: usize, q: Vec<i8>, d: Vec<f16> },
}

impl Storage {
    fn new(dtype: KvDtype, dim: usize, slots: usize) -> Self {
        match dtype {
            KvDtype::F16 => Storage::F16(Vec::with_capacity(slots * dim)),
            KvDtype::F32 => Storage::F32(Vec::with_capacity(slots * dim)),
            KvDtype::Q8_0 => Storage::Q8_0 {
                dim,
                q: Vec::with_capacity(slots * dim),
                d: Vec::with_capacity(slots * dim.div_ceil(Q8_BLOCK)),
            },
        }
    }
    /// Appends whole rows.
    fn push(&mut self, x: &[f32]) {
        match self {
            Storage::F16(v) => v.extend(x.iter().map(|&a| f16::from_f32(a))),
            Storage::F32(v) => v.extend_from_slice(x),
            Storage::Q8_0 { dim, q, d } => {
                for row in x.chunks(*dim) {
                    quantize_q8_0(row, q, d);
                }
            }
        }
    }
    fn slice(&self) -> KvSlice<'_> {
        match self {
            Storage::F16(v) => KvSlice::F16(v),
            Storage::F32(v) => KvSlice::F32(v),
            Storage::Q8_0 { q, d, .. } => KvSlice::Q8_0 { q, d },
        }
    }
    fn to_f32(&self) -> Vec<f32> {
        match self {
            Storage::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Storage::F32(v) => v.clone(),
            Storage::Q8_0 { dim, q, d } => {
                let mut out = vec![0.0; q.len()];
                dequantize_q8_0(q, d, *dim, &mut out);
                out
            }
        }
    }
    /// Reads one whole row starting at value `start`.
    fn read(&self, start: usize, out: &mut [f32]) {
        match self {
            Storage::F16(v) => {
                let n = out.len();
                for (o, x) in out.iter_mut().zip(&v[start..start + n]) {
                    *o = x.to_f32();
                }
            }
            Storage::F32(v) => out.copy_from_slice(&v[start..start + out.len()]),
            Storage::Q8_0 { dim, q, d } => {
                let nb = dim.div_ceil(Q8_BLOCK);
                let row = start / *dim;
                dequantize_q8_0(
                    &q[start..start + dim],
                    &d[row * nb..(row + 1) * nb],
                    *dim,
                    out,
                );
            }
        }
    }
    /// Bytes allocated.
    fn capacity_bytes(&self) -> usize {
        match self {
            Storage::F16(v) => v.capacity() * 2,
            Storage::F32(v) => v.capacity() * 4,
            Storage::Q8_0 { q, d, .. } => q.capacity() + d.capacity() * 2,
        }
    }
    /// Keeps the first `slots` rows of `dim` values.
    fn truncate(&mut self, slots: usize, dim: usize) {
        match self {
            Storage::F16(v) => v.truncate(slots * dim),
            Storage::F32(v) => v.truncate(slots * dim),
            Storage::Q8_0 { q, d, .. } => {
                q.truncate(slots * dim);
                d.truncate(slots * dim.div_ceil(Q8_BLOCK));
            }
        }
    }
    fn shrink_to_fit(&mut self) {
        match self {
            Storage::F16(v) => v.shrink_to_fit(),
            Storage::F32(v) => v.shrink_to_fit(),
            Storage::Q8_0 { q, d, .. } => {
                q.shrink_to_fit();
                d.shrink_to_fit();
            }
        }
    }
    fn reserve(&mut self, slots: usize, dim: usize) {
        match self {
            Storage::F16(v) => v.reserve(slots * dim),
            Storage::F32(v) => v.reserve(slots * dim),
            Storage::Q8_0 { q, d, .. } => {
                q.reserve(slots * dim);
                d.reserve(slots * dim.div_ceil(Q8_BLOCK));
            }
        }
    }
}

/// Keys, values and slot metadata of one (layer, KV head), as f32, for compression to read and write.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HeadData {
    pub dim: usize,
    /// `len * dim` keys, row-major (one key per slot), after RoPE.
    pub keys: Vec<f32>,
    /// `len * dim` values, row-major.
    pub values: Vec<f32>,
    pub meta: Vec<SlotMeta>,
}

impl HeadData {
    pub fn new(dim: usize) -> Self {
        HeadData {
            dim,
            ..Default::default()
        }
    }
    pub fn len(&self) -> usize {
        self.meta.len()
    }
    pub fn is_empty(&self) -> bool {
        self.meta.is_empty()
    }
    pub fn key(&self, i: usize) -> &[f32] {
        &self.keys[i * self.dim..(i + 1) * self.dim]
    }
    pub fn value(&self, i: usize) -> &[f32] {
        &self.values[i * self.dim..(i + 1) * self.dim]
    }
    pub fn push(&mut self, key: &[f32], value: &[f32], meta: SlotMeta) {
        debug_assert_eq!(key.len(), self.dim);
        debug_assert_eq!(value.len(), self.dim);
        self.keys.extend_from_slice(key);
        self.values.extend_from_slice(value);
        self.meta.push(meta);
    }
    /// The slots at `indices`, in that order, unchanged.
    pub fn gather(&self, indices: &[usize]) -> HeadData {
        let mut out = HeadData::new(self.dim);
        out.keys.reserve(indices.len() * self.dim);
        out.values.reserve(indices.len() * self.dim);
        out.meta.reserve(indices.len());
        for &i in indices {
            out.push(self.key(i), self.value(i), self.meta[i]);
        }
        out
    }
}

/// Keys and values of one (layer, KV head) in their storage type, with per-slot metadata.
#[derive(Clone, Debug)]
pub struct HeadStore {
    dim: usize,
    dtype: KvDtype,
    keys: Storage,
    values: Storage,
    meta: Vec<SlotMeta>,
    biased: bool,
}

impl HeadStore {
    pub fn new(dim: usize, dtype: KvDtype) -> Self {
        Self::with_capacity(dim, dtype, 0)
    }

    /// A store with room for `slots` slots, so that appending up to that many never reallocates.
    pub fn with_capacity(dim: usize, dtype: KvDtype, slots: usize) -> Self {
        HeadStore {
            dim,
            dtype,
            keys: Storage::new(dtype, dim, slots),
            values: Storage::new(dtype, dim, slots),
            meta: Vec::with_capacity(slots),
            biased: false,
        }
    }

    /// A store holding exactly `data` (capacity = length: nothing more is allocated).
    pub fn from_data(data: &HeadData, dtype: KvDtype) -> Self {
        let mut s = Self::with_capacity(data.dim, dtype, data.len());
        s.keys.push(&data.keys);
        s.values.push(&data.values);
        s.meta.extend_from_slice(&data.meta);
        s.biased = s.meta.iter().any(|m| m.bias != 0.0);
        s
    }

    pub fn dim(&self) -> usize {
        self.dim
    }
    pub fn dtype(&self) -> KvDtype {
        self.dtype
    }
    pub fn len(&self) -> usize {
        self.meta.len()
    }
    pub fn is_empty(&self) -> bool {
        self.meta.is_empty()
    }
    pub fn meta(&self) -> &[SlotMeta] {
        &self.meta
    }
    /// Whether any slot carries a non-zero logit bias (attention can skip the bias otherwise).
    pub fn has_bias(&self) -> bool {
        self.biased
    }
    pub fn keys(&self) -> KvSlice<'_> {
        self.keys.slice()
    }
    pub fn values(&self) -> KvSlice<'_> {
        self.values.slice()
    }

    pub fn push(&mut self, key: &[f32], value: &[f32], meta: SlotMeta) {
        assert_eq!(
            key.len(),
            self.dim,
            "key length must equal the head dimension"
        );
        assert_eq!(
            value.len(),
            self.dim,
            "value length must equal the head dimension"
        );
        self.keys.push(key);
        self.values.push(value);
        self.biased |= meta.bias != 0.0;
        self.meta.push(meta);
    }

    /// Make room for `extra` more slots without reallocating later.
    pub fn reserve(&mut self, extra: usize) {
        self.keys.reserve(extra, self.dim);
        self.values.reserve(extra, self.dim);
        self.meta.reserve(extra);
    }

    /// Keeps the first `len` slots (a no-op when the store is not longer): undoes
    /// appends, e.g. of tokens fed only to measure attention. The memory stays
    /// allocated for the next appends.
    pub fn truncate(&mut self, len: usize) {
        if len >= self.len() {
            return;
        }
        self.keys.truncate(len, self.dim);
        self.values.truncate(len, self.dim);
        self.meta.truncate(len);
        self.biased = self.meta.iter().any(|m| m.bias != 0.0);
    }

    /// Give back the room reserved beyond the live slots (a cache kept for later).
    pub fn shrink_to_fit(&mut self) {
        self.keys.shrink_to_fit();
        self.values.shrink_to_fit();
        self.meta.shrink_to_fit();
    }

    /// Add `scores[i]` to the accumulated attention of slot `i`.
    pub fn add_scores(&mut self, scores: &[f32]) {
        for (m, s) in self.meta.iter_mut().zip(scores) {
            m.score += s;
        }
    }

    pub fn key_f32(&self, i: usize, out: &mut [f32]) {
        self.keys.read(i * self.dim, &mut out[..self.dim]);
    }
    pub fn value_f32(&self, i: usize, out: &mut [f32]) {
        self.values.read(i * self.dim, &mut out[..self.dim]);
    }

    /// Everything in the store as f32 (exact: f16 -> f32 -> f16, and q8_0 -> f32 -> q8_0,
    /// round-trip bit for bit).
    pub fn to_data(&self) -> HeadData {
        HeadData {
            dim: self.dim,
            keys: self.keys.to_f32(),
            values: self.values.to_f32(),
            meta: self.meta.clone(),
        }
    }

    /// Appends this store's slots to `out` in a fixed little-endian layout: the slot
    /// count (u32), each slot's metadata (position, count, score, bias, learned: 20
    /// bytes), then the keys and the values in their storage type (f16, f32, or q8_0's
    /// values followed by its scales). [`HeadStore::read_bytes`] reads it back.
    pub fn write_bytes(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.len() as u32).to_le_bytes());
        for m in &self.meta {
            out.extend_from_slice(&m.position.to_le_bytes());
            out.extend_from_slice(&m.count.to_le_bytes());
            out.extend_from_slice(&m.score.to_le_bytes());
            out.extend_from_slice(&m.bias.to_le_bytes());
            out.extend_from_slice(&m.learned.to_le_bytes());
        }
        for s in [&self.keys, &self.values] {
            match s {
                Storage::F16(v) => v
                    .iter()
                    .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
                Storage::F32(v) => v
                    .iter()
                    .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
                Storage::Q8_0 { q, d, .. } => {
                    out.extend(q.iter().map(|&x| x as u8));
                    d.iter()
                        .for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
                }
            }
        }
    }

    /// The bytes [`HeadStore::write_bytes`] writes for `slots` slots of this shape.
    pub fn serialized_len(dim: usize, dtype: KvDtype, slots: usize) -> usize {
        4 + slots * (META_BYTES + 2 * dtype.row_bytes(dim))
    }

    /// Reads a store written by [`HeadStore::write_bytes`] from the start of `bytes`;
    /// returns it and the bytes it took. Refuses, naming the fault, a count that runs
    /// past the data, slots out of position order or at or past `n_seen`, a count of
    /// zero, and values that are not finite.
    pub fn read_bytes(
        dim: usize,
        dtype: KvDtype,
        n_seen: usize,
        bytes: &[u8],
    ) -> Result<(HeadStore, usize), Error> {
        let bad = |m: String| Error::Invalid(format!("stored head: {m}"));
        let n = u32::from_le_bytes(
            bytes
                .get(..4)
                .ok_or_else(|| bad("truncated before its slot count".into()))?
                .try_into()
                .expect("4 bytes"),
        ) as usize;
        let need = (n as u128) * (META_BYTES as u128 + 2 * dtype.row_bytes(dim) as u128) + 4;
        if need > bytes.len() as u128 {
            return Err(bad(format!(
                "{n} slots need {need} bytes, {} are left",
                bytes.len()
            )));
        }
        let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        let float = |at: usize| f32::from_bits(word(at));
        let mut s = HeadStore::with_capacity(dim, dtype, n);
        let mut at = 4;
        let mut last = 0u32;
        for i in 0..n {
            let m = SlotMeta {
                position: word(at),
                count: word(at + 4),
                score: float(at + 8),
                bias: float(at + 12),
                learned: float(at + 16),
            };
            at += META_BYTES;
            if m.position as usize >= n_seen || (i > 0 && m.position < last) {
                return Err(bad(format!(
                    "slot {i} at position {} is out of order or past the {n_seen} tokens seen",
                    m.position
                )));
            }
            if m.count == 0 || !(m.score.is_finite() && m.bias.is_finite() && m.learned.is_finite())
            {
                return Err(bad(format!(
                    "slot {i} has a count of 0 or a value that is not finite"
                )));
            }
            last = m.position;
            s.biased |= m.bias != 0.0;
            s.meta.push(m);
        }
        let values = n * dim;
        for which in 0..2 {
            let store = if which == 0 {
                &mut s.keys
            } else {
                &mut s.values
            };
            match store {
                Storage::F16(v) => {
                    v.extend(
                        bytes[at..at + 2 * values]
                            .chunks_exact(2)
                            .map(|c| f16::from_le_bytes([c[0], c[1]])),
                    );
                    at += 2 * values;
                    if v.iter().any(|x| !x.is_finite()) {
                        return Err(bad("a key or value is not finite".into()));
                    }
                }
                Storage::F32(v) => {
                    v.extend(
                        bytes[at..at + 4 * values]
                            .chunks_exact(4)
                            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))),
                    );
                    at += 4 * values;
                    if v.iter().any(|x| !x.is_finite()) {
                        return Err(bad("a key or value is not finite".into()));
                    }
                }
                Storage::Q8_0 { q, d, .. } => {
                    q.extend(bytes[at..at + values].iter().map(|&b| b as i8));
                    at += values;
                    let scales = n * dim.div_ceil(Q8_BLOCK);
                    d.extend(
                        bytes[at..at + 2 * scales]
                            .chunks_exact(2)
                            .map(|c| f16::from_le_bytes([c[0], c[1]])),
                    );
                    at += 2 * scales;
                    if d.iter().any(|x| !x.is_finite()) {
                        return Err(bad("a q8_0 scale is not finite".into()));
                    }
                }
            }
        }
        Ok((s, at))
    }

    /// Bytes held by the live slots: keys, values and metadata.
    pub fn bytes(&self) -> usize {
        self.len() * (2 * self.dtype.row_bytes(self.dim) + std::mem::size_of::<SlotMeta>())
    }

    /// Bytes allocated, including reserved room not yet used.
    pub fn allocated_bytes(&self) -> usize {
        self.keys.capacity_bytes()
            + self.values.capacity_bytes()
            + self.meta.capacity() * std::mem::size_of::<SlotMeta>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_store_round_trips_through_head_data_bit_for_bit() {
        let mut s = HeadStore::new(4, KvDtype::F16);
        for i in 0..5u32 {
            let k: Vec<f32> = (0..4).map(|j| (i * 4 + j) as f32 * 0.37 - 3.1).collect();
            s.push(&k, &k, SlotMeta::token(i));
        }
        let d = s.to_data();
        let s2 = HeadStore::from_data(&d, KvDtype::F16);
        assert_eq!(s2.to_data(), d);
        assert_eq!(s2.allocated_bytes(), s2.bytes());
    }

    #[test]
    fn q8_0_store_round_trips_through_head_data_bit_for_bit_and_stays_close() {
        for dim in [64usize, 40] {
            let mut s = HeadStore::new(dim, KvDtype::Q8_0);
            let mut want = Vec::new();
            for i in 0..7u32 {
                let k: Vec<f32> = (0..dim)
                    .map(|j| ((i as usize * dim + j) as f32 * 0.37).sin() * 3.0)
                    .collect();
                s.push(&k, &k, SlotMeta::token(i));
                want.extend(k);
            }
            let d = s.to_data();
            for (a, b) in d.keys.iter().zip(&want) {
                assert!((a - b).abs() <= 3.0 / 127.0, "{a} vs {b}");
            }
            let s2 = HeadStore::from_data(&d, KvDtype::Q8_0);
            assert_eq!(s2.to_data(), d);
            let mut row = vec![0.0; dim];
            s2.key_f32(3, &mut row);
            assert_eq!(row, d.key(3));
            assert_eq!(s2.allocated_bytes(), s2.bytes());
            let meta = std::mem::size_of::<SlotMeta>();
            assert_eq!(s2.bytes(), 7 * (2 * (dim + 2 * dim.div_ceil(32)) + meta));
        }
    }

    #[test]
    fn truncating_undoes_appends_in_every_dtype() {
        for dtype in [KvDtype::F16, KvDtype::F32, KvDtype::Q8_0] {
            let mut s = HeadStore::new(40, dtype);
            for i in 0..5u32 {
                s.push(&[i as f32; 40], &[-(i as f32); 40], SlotMeta::token(i));
            }
            let before = s.to_data();
            for i in 5..9u32 {
                let mut m = SlotMeta::token(i);
                m.bias = 1.0;
                s.push(&[i as f32; 40], &[1.0; 40], m);
            }
            assert!(s.has_bias());
            s.truncate(5);
            assert_eq!(s.to_data(), before);
            assert!(!s.has_bias());
            assert_eq!(s.bytes(), HeadStore::from_data(&before, dtype).bytes());
        }
    }

    #[test]
    fn every_storage_type_round_trips_through_bytes_and_a_bad_count_is_refused() {
        for dtype in [KvDtype::F16, KvDtype::F32, KvDtype::Q8_0] {
            let mut s = HeadStore::new(40, dtype);
            for i in 0..6u32 {
                let k: Vec<f32> = (0..40)
                    .map(|j| ((i * 40 + j) as f32 * 0.37).sin())
                    .collect();
                let mut m = SlotMeta::token(i * 2);
                m.count = 1 + i;
                m.bias = i as f32 * 0.1;
                m.learned = -(i as f32);
                m.score = 0.5;
                s.push(&k, &k, m);
            }
            let mut b = vec![9u8];
            s.write_bytes(&mut b);
            assert_eq!(b.len(), 1 + HeadStore::serialized_len(40, dtype, 6));
            let (r, used) = HeadStore::read_bytes(40, dtype, 100, &b[1..]).unwrap();
            assert_eq!(used, b.len() - 1);
            assert_eq!(r.to_data(), s.to_data(), "{dtype:?}");
            assert_eq!(r.meta(), s.meta());
            assert!(r.has_bias());
            // Positions past the tokens seen, a truncated payload, a huge count.
            assert!(HeadStore::read_bytes(40, dtype, 10, &b[1..]).is_err());
            assert!(HeadStore::read_bytes(40, dtype, 100, &b[1..b.len() - 1]).is_err());
            let mut huge = b[1..].to_vec();
            huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
            assert!(HeadStore::read_bytes(40, dtype, 100, &huge).is_err());
        }
    }

    #[test]
    fn bytes_count_keys_values_and_metadata() {
        let mut s = HeadStore::new(64, KvDtype::F32);
        s.push(&[0.0; 64], &[1.0; 64], SlotMeta::token(0));
        assert_eq!(s.bytes(), 2 * 64 * 4 + std::mem::size_of::<SlotMeta>());
    }
}
