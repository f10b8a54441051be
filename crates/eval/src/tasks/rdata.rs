//! Just enough of R's serialization format (XDR, versions 2 and 3) to read a lazy-load
//! data base of character vectors: the header; `NULL`; symbols and references to
//! them; pairlists (attributes) with tags; character, integer, logical and double
//! vectors; generic vectors (lists). Anything else is reported as unsupported.
//!
//! A lazy-load data base is an index (`.rdx`: a serialized, gzip- or zlib-compressed
//! list whose `variables` element gives each variable's `(offset, length)`) and a
//! data file (`.rdb`), in which each variable is a 4-byte big-endian uncompressed
//! length followed by a zlib stream holding the serialized object.

use std::io::Read;

/// A deserialized R object.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum RData {
    Null,
    Symbol(String),
    /// Character vector; `None` is `NA`.
    Str(Vec<Option<String>>),
    /// Integer or logical vector (`NA` is `i32::MIN`).
    Int(Vec<i32>),
    Real(Vec<f64>),
    /// Generic vector (list) or expression vector.
    List(Vec<RValue>),
    /// Pairlist, with each element's tag.
    Pairlist(Vec<(Option<String>, RValue)>),
}

/// An R object and its attributes.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct RValue {
    pub data: RData,
    pub attributes: Vec<(String, RValue)>,
}

impl RValue {
    fn plain(data: RData) -> Self {
        RValue {
            data,
            attributes: Vec::new(),
        }
    }

    pub fn attribute(&self, name: &str) -> Option<&RValue> {
        self.attributes
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
    }

    /// The `names` attribute as strings (`NA` as empty).
    pub fn names(&self) -> Vec<String> {
        match self.attribute("names").map(|v| &v.data) {
            Some(RData::Str(s)) => s.iter().map(|x| x.clone().unwrap_or_default()).collect(),
            _ => Vec::new(),
        }
    }

    /// Element `name` of a named list.
    pub fn get(&self, name: &str) -> Option<&RValue> {
        let RData::List(items) = &self.data else {
            return None;
        };
        let at = self.names().iter().position(|n| n == name)?;
        items.get(at)
    }
}

const NILSXP: u32 = 0;
const SYMSXP: u32 = 1;
const LISTSXP: u32 = 2;
const CHARSXP: u32 = 9;
const LGLSXP: u32 = 10;
const INTSXP: u32 = 13;
const REALSXP: u32 = 14;
const STRSXP: u32 = 16;
const VECSXP: u32 = 19;
const EXPRSXP: u32 = 20;
const NILVALUE_SXP: u32 = 254;
const REFSXP: u32 = 255;

const IS_OBJECT: u32 = 1 << 8;
const HAS_ATTR: u32 = 1 << 9;
const HAS_TAG: u32 = 1 << 10;

const BYTES_MASK: u32 = 1 << 1;
const LATIN1_MASK: u32 = 1 << 2;
const UTF8_MASK: u32 = 1 << 3;
const ASCII_MASK: u32 = 1 << 6;

fn type_name(t: u32) -> &'static str {
    match t {
        3 => "closure",
        4 => "environment",
        5 => "promise",
        6 => "language object",
        7 => "special function",
        8 => "builtin function",
        15 => "complex vector",
        17 => "dot-dot-dot",
        18 => "any",
        21 => "byte code",
        22 => "external pointer",
        23 => "weak reference",
        24 => "raw vector",
        25 => "S4 object",
        238 => "ALTREP object",
        239 => "attributed language object",
        240 => "attributed pairlist",
        241 => "base environment",
        242 => "empty environment",
        243 => "byte-code reference",
        244 => "byte-code definition",
        245 => "generic reference",
        246 => "class reference",
        247 => "base namespace",
        248 => "namespace",
        249 => "package environment",
        250 => "persistent reference",
        251 => "missing argument",
        252 => "unbound value",
        253 => "global environment",
        _ => "unknown type",
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    symbols: Vec<String>,
    native_latin1: bool,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        if self.buf.len() - self.pos < n {
            return Err(format!(
                "truncated: {n} bytes wanted at byte {} of {}",
                self.pos,
                self.buf.len()
            ));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn int(&mut self) -> Result<i32, String> {
        let b = self.take(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn length(&mut self, width: usize) -> Result<usize, String> {
        let n = self.int()?;
        let n = if n == -1 {
            let hi = self.int()? as u32 as u64;
            let lo = self.int()? as u32 as u64;
            (hi << 32) | lo
        } else if n < 0 {
            return Err(format!("negative length {n} at byte {}", self.pos - 4));
        } else {
            n as u64
        };
        // Every element takes at least `width` bytes: a length beyond what is left is
        // corrupt (and must not be allocated).
        let left = (self.buf.len() - self.pos) as u64;
        if n.saturating_mul(width as u64) > left {
            return Err(format!(
                "length {n} at byte {} exceeds the data left",
                self.pos
            ));
        }
        Ok(n as usize)
    }

    fn header(&mut self) -> Result<(), String> {
        match self.take(2)? {
            b"X\n" => {}
            b"A\n" => return Err("ASCII serialization is not supported (only XDR)".into()),
            b"B\n" => return Err("native binary serialization is not supported (only XDR)".into()),
            other => return Err(format!("not R serialization data (starts with {other:?})")),
        }
        let version = self.int()?;
        let _writer = self.int()?;
        let _min_reader = self.int()?;
        match version {
            2 => {}
            3 => {
                let n = self.length(1)?;
                let enc = String::from_utf8_lossy(self.take(n)?).to_ascii_lowercase();
                self.native_latin1 = enc.contains("latin1") || enc.contains("8859-1");
            }
            v => {
                return Err(format!(
                    "serialization version {v} is not supported (only 2 and 3)"
                ))
            }
        }
        Ok(())
    }

    fn chars(&mut self, flags: u32) -> Result<Option<String>, String> {
        let n = self.int()?;
        if n == -1 {
            return Ok(None);
        }
        if n < 0 {
            return Err(format!("negative string length {n}"));
        }
        let at = self.pos;
        let native_latin1 = self.native_latin1;
        let bytes = self.take(n as usize)?;
        let levels = flags >> 12;
        let latin1 = levels & LATIN1_MASK != 0
            || (native_latin1 && levels & (UTF8_MASK | ASCII_MASK | BYTES_MASK) == 0);
        if latin1 {
            return Ok(Some(bytes.iter().map(|&b| b as char).collect()));
        }
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(Some(s.to_string())),
            Err(e) => Err(format!(
                "string at byte {at} is not valid UTF-8 ({e}){}",
                if levels & BYTES_MASK != 0 {
                    " and is marked as raw bytes"
                } else {
                    ""
                }
            )),
        }
    }

    fn charsxp(&mut self) -> Result<Option<String>, String> {
        let flags = self.int()? as u32;
        if flags & 0xff != CHARSXP {
            return Err(format!(
                "expected a string (CHARSXP) at byte {}, found type {}",
                self.pos - 4,
                flags & 0xff
            ));
        }
        self.chars(flags)
    }

    fn item(&mut self, depth: usize) -> Result<RValue, String> {
        if depth > 10_000 {
            return Err("objects nested too deeply".into());
        }
        let at = self.pos;
        let flags = self.int()? as u32;
        let ty = flags & 0xff;
        let has_attr = flags & HAS_ATTR != 0;
        let _ = flags & IS_OBJECT;
        let data = match ty {
            NILVALUE_SXP | NILSXP => return Ok(RValue::plain(RData::Null)),
            REFSXP => {
                let mut i = (flags >> 8) as usize;
                if i == 0 {
                    i = self.int()? as usize;
                }
                let s = self
                    .symbols
                    .get(i.wrapping_sub(1))
                    .ok_or_else(|| format!("reference {i} at byte {at} to nothing read before"))?;
                return Ok(RValue::plain(RData::Symbol(s.clone())));
            }
            SYMSXP => {
                let name = self.charsxp()?.unwrap_or_default();
                self.symbols.push(name.clone());
                return Ok(RValue::plain(RData::Symbol(name)));
            }
            LISTSXP => return self.pairlist(flags, depth),
            CHARSXP => RData::Str(vec![self.chars(flags)?]),
            STRSXP => {
                let n = self.length(8)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.charsxp()?);
                }
                RData::Str(v)
            }
            INTSXP | LGLSXP => {
                let n = self.length(4)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.int()?);
                }
                RData::Int(v)
            }
            REALSXP => {
                let n = self.length(8)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    let b = self.take(8)?;
                    v.push(f64::from_be_bytes(b.try_into().expect("8 bytes")));
                }
                RData::Real(v)
            }
            VECSXP | EXPRSXP => {
                let n = self.length(4)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.item(depth + 1)?);
                }
                RData::List(v)
            }
            t => {
                return Err(format!(
                    "unsupported R object at byte {at}: type {t} ({})",
                    type_name(t)
                ))
            }
        };
        let attributes = if has_attr {
            self.attributes(depth)?
        } else {
            Vec::new()
        };
        Ok(RValue { data, attributes })
    }

    fn attributes(&mut self, depth: usize) -> Result<Vec<(String, RValue)>, String> {
        let at = self.pos;
        let list = self.item(depth + 1)?;
        match list.data {
            RData::Pairlist(items) => Ok(items
                .into_iter()
                .map(|(t, v)| (t.unwrap_or_default(), v))
                .collect()),
            RData::Null => Ok(Vec::new()),
            _ => Err(format!("attributes at byte {at} are not a pairlist")),
        }
    }

    /// A pairlist whose first cell's flags were just read; later cells are read in a
    /// loop rather than by recursion.
    fn pairlist(&mut self, mut flags: u32, depth: usize) -> Result<RValue, String> {
        let mut items = Vec::new();
        let mut attributes = Vec::new();
        loop {
            if flags & HAS_ATTR != 0 {
                let a = self.attributes(depth)?;
                if items.is_empty() {
                    attributes = a;
                }
            }
            let tag = if flags & HAS_TAG != 0 {
                match self.item(depth + 1)?.data {
                    RData::Symbol(s) => Some(s),
                    RData::Null => None,
                    _ => return Err(format!("pairlist tag at byte {} is not a symbol", self.pos)),
                }
            } else {
                None
            };
            let car = self.item(depth + 1)?;
            items.push((tag, car));
            let next = self.int()? as u32;
            match next & 0xff {
                NILVALUE_SXP | NILSXP => break,
                LISTSXP => flags = next,
                t => {
                    return Err(format!(
                        "pairlist continues with type {t} ({}) at byte {}",
                        type_name(t),
                        self.pos - 4
                    ))
                }
            }
        }
        Ok(RValue {
            data: RData::Pairlist(items),
            attributes,
        })
    }
}

/// Deserializes one R object from XDR serialization bytes (with its header).
pub(crate) fn unserialize(bytes: &[u8]) -> Result<RValue, String> {
    let mut r = Reader {
        buf: bytes,
        pos: 0,
        symbols: Vec::new(),
        native_latin1: false,
    };
    r.header()?;
    r.item(0)
}

/// Decompresses gzip, zlib, or passes serialization data through as is.
pub(crate) fn inflate_any(bytes: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    if bytes.starts_with(&[0x1f, 0x8b]) {
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut out)
            .map_err(|e| format!("bad gzip data: {e}"))?;
    } else if bytes.starts_with(b"X\n") || bytes.starts_with(b"A\n") || bytes.starts_with(b"B\n") {
        out.extend_from_slice(bytes);
    } else {
        flate2::read::ZlibDecoder::new(bytes)
            .read_to_end(&mut out)
            .map_err(|e| format!("neither gzip, zlib nor R serialization data: {e}"))?;
    }
    Ok(out)
}

/// One variable of a lazy-load data file: `length` bytes at `offset`, a 4-byte
/// big-endian uncompressed size and a zlib stream.
pub(crate) fn lazy_chunk(rdb: &[u8], offset: usize, length: usize) -> Result<RValue, String> {
    let chunk = offset
        .checked_add(length)
        .and_then(|end| rdb.get(offset..end))
        .ok_or_else(|| {
            format!(
                "chunk ({offset}, {length}) lies outside the {}-byte file",
                rdb.len()
            )
        })?;
    if chunk.len() < 5 {
        return Err(format!("chunk at {offset} is only {} bytes", chunk.len()));
    }
    let size = u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]) as usize;
    let mut out = Vec::with_capacity(size.min(1 << 30));
    flate2::read::ZlibDecoder::new(&chunk[4..])
        .read_to_end(&mut out)
        .map_err(|e| {
            format!(
                "chunk at {offset} is not a zlib stream ({e}); only zlib-compressed data bases are supported"
            )
        })?;
    if out.len() != size {
        return Err(format!(
            "chunk at {offset} inflates to {} bytes, not the {size} its header says",
            out.len()
        ));
    }
    unserialize(&out).map_err(|e| format!("chunk at {offset}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn be(x: i32) -> [u8; 4] {
        x.to_be_bytes()
    }

    fn header(v: &mut Vec<u8>) {
        v.extend_from_slice(b"X\n");
        for x in [3, 0x040201, 0x030500, 5] {
            v.extend_from_slice(&be(x));
        }
        v.extend_from_slice(b"UTF-8");
    }

    fn charsxp(v: &mut Vec<u8>, levels: u32, s: &[u8]) {
        v.extend_from_slice(&be((CHARSXP | (levels << 12)) as i32));
        v.extend_from_slice(&be(s.len() as i32));
        v.extend_from_slice(s);
    }

    #[test]
    fn reads_a_named_list_of_strings_with_encodings_and_na() {
        let mut v = Vec::new();
        header(&mut v);
        // list(a = c("x", NA, "é" latin1), b = 7L) with names attribute
        v.extend_from_slice(&be((VECSXP | HAS_ATTR) as i32));
        v.extend_from_slice(&be(2));
        v.extend_from_slice(&be(STRSXP as i32));
        v.extend_from_slice(&be(3));
        charsxp(&mut v, ASCII_MASK, b"x");
        v.extend_from_slice(&be(CHARSXP as i32));
        v.extend_from_slice(&be(-1));
        charsxp(&mut v, LATIN1_MASK, &[0xe9]);
        v.extend_from_slice(&be(INTSXP as i32));
        v.extend_from_slice(&be(1));
        v.extend_from_slice(&be(7));
        // attributes: pairlist(names = c("a", "b"))
        v.extend_from_slice(&be((LISTSXP | HAS_TAG) as i32));
        v.extend_from_slice(&be(SYMSXP as i32));
        charsxp(&mut v, ASCII_MASK, b"names");
        v.extend_from_slice(&be(STRSXP as i32));
        v.extend_from_slice(&be(2));
        charsxp(&mut v, UTF8_MASK, b"a");
        charsxp(&mut v, UTF8_MASK, b"b");
        v.extend_from_slice(&be(NILVALUE_SXP as i32));
        let r = unserialize(&v).unwrap();
        assert_eq!(r.names(), vec!["a", "b"]);
        assert_eq!(
            r.get("a").unwrap().data,
            RData::Str(vec![Some("x".into()), None, Some("é".into())])
        );
        assert_eq!(r.get("b").unwrap().data, RData::Int(vec![7]));
    }

    #[test]
    fn refers_back_to_symbols() {
        let mut v = Vec::new();
        header(&mut v);
        // pairlist(k = NULL, k = NULL), the second tag a reference to the first symbol
        v.extend_from_slice(&be((LISTSXP | HAS_TAG) as i32));
        v.extend_from_slice(&be(SYMSXP as i32));
        charsxp(&mut v, ASCII_MASK, b"k");
        v.extend_from_slice(&be(NILVALUE_SXP as i32));
        v.extend_from_slice(&be((LISTSXP | HAS_TAG) as i32));
        v.extend_from_slice(&be((REFSXP | (1 << 8)) as i32));
        v.extend_from_slice(&be(NILVALUE_SXP as i32));
        v.extend_from_slice(&be(NILVALUE_SXP as i32));
        let r = unserialize(&v).unwrap();
        let RData::Pairlist(items) = r.data else {
            panic!("not a pairlist")
        };
        assert_eq!(items.len(), 2);
        assert_eq!(items[1].0.as_deref(), Some("k"));
    }

    #[test]
    fn rejects_what_it_does_not_read() {
        let mut v = Vec::new();
        header(&mut v);
        v.extend_from_slice(&be(4)); // an environment
        let e = unserialize(&v).unwrap_err();
        assert!(e.contains("environment"), "{e}");
        assert!(unserialize(b"A\n1\n").unwrap_err().contains("ASCII"));
        assert!(unserialize(b"RDX3")
            .unwrap_err()
            .contains("not R serialization"));
        let mut v = Vec::new();
        header(&mut v);
        v.extend_from_slice(&be(STRSXP as i32));
        v.extend_from_slice(&be(1_000_000));
        assert!(unserialize(&v).unwrap_err().contains("exceeds"));
        let mut v = Vec::new();
        header(&mut v);
        v.extend_from_slice(&be(STRSXP as i32));
        v.extend_from_slice(&be(1));
        charsxp(&mut v, UTF8_MASK, &[0xff, 0xfe]);
        assert!(unserialize(&v).unwrap_err().contains("UTF-8"));
    }
}
