//! GGUF v2/v3 reader: metadata, tensor directory, and memory-mapped tensor data.
//!
//! Every length and offset read from the file is checked against the file size
//! before it is used, so a truncated or corrupt file gives an error, not a panic.

use crate::quant::{GgmlType, QMatrix};
use crate::Error;
use memmap2::Mmap;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const MAGIC: &[u8; 4] = b"GGUF";

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(x) => Some(x as u64),
            Value::U16(x) => Some(x as u64),
            Value::U32(x) => Some(x as u64),
            Value::U64(x) => Some(x),
            Value::I8(x) if x >= 0 => Some(x as u64),
            Value::I16(x) if x >= 0 => Some(x as u64),
            Value::I32(x) if x >= 0 => Some(x as u64),
            Value::I64(x) if x >= 0 => Some(x as u64),
            Value::Bool(b) => Some(b as u64),
            _ => None,
        }
    }
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(x) => Some(x as i64),
            Value::I16(x) => Some(x as i64),
            Value::I32(x) => Some(x as i64),
            Value::I64(x) => Some(x),
            _ => self.as_u64().and_then(|x| i64::try_from(x).ok()),
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(x) => Some(x as f64),
            Value::F64(x) => Some(x),
            _ => self.as_i64().map(|x| x as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where one tensor's data lies in the file.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` is the row length (contiguous).
    pub dims: Vec<u64>,
    pub dtype: GgmlType,
    /// Absolute byte offset in the file.
    pub offset: usize,
    pub size: usize,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// An open GGUF file.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: BTreeMap<String, TensorInfo>,
    mmap: Arc<Mmap>,
}

/// Most memory the parsed metadata may take (values and string bytes). The largest
/// real vocabularies (about 262k tokens, with scores, types and merges) take about
/// 30 MiB; a file asking for more is refused before it is parsed.
pub const METADATA_LIMIT: usize = 256 << 20;

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
    /// Bytes of parsed metadata still allowed (see [`METADATA_LIMIT`]).
    budget: usize,
}

impl<'a> Reader<'a> {
    fn err(&self, what: &str) -> Error {
        Error::Format {
            path: self.path.to_path_buf(),
            msg: format!("{what} (at byte {})", self.pos),
        }
    }
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], Error> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(self.err(&format!(
                "file is truncated: needed {n} more bytes for {what}, file has {}",
                self.buf.len()
            ))),
        }
    }
    fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.take(1, "a u8")?[0])
    }
    fn u16(&mut self) -> Result<u16, Error> {
        Ok(u16::from_le_bytes(
            self.take(2, "a u16")?.try_into().unwrap(),
        ))
    }
    fn u32(&mut self) -> Result<u32, Error> {
        Ok(u32::from_le_bytes(
            self.take(4, "a u32")?.try_into().unwrap(),
        ))
    }
    fn u64(&mut self) -> Result<u64, Error> {
        Ok(u64::from_le_bytes(
            self.take(8, "a u64")?.try_into().unwrap(),
        ))
    }
    fn len(&mut self, what: &str) -> Result<usize, Error> {
        let n = self.u64()?;
        // No element is smaller than a byte, so a count larger than what is left is corrupt.
        if n > (self.buf.len() - self.pos) as u64 {
            return Err(self.err(&format!(
                "file is truncated or corrupt: {what} length {n} exceeds the file size"
            )));
        }
        Ok(n as usize)
    }
    /// Counts `bytes` of parsed metadata against the limit.
    fn spend(&mut self, bytes: usize) -> Result<(), Error> {
        match self.budget.checked_sub(bytes) {
            Some(left) => {
                self.budget = left;
                Ok(())
            }
            None => Err(self.err(&format!(
                "metadata would take more than {} MiB of memory (a real model's takes a few tens): refusing a corrupt or hostile file",
                METADATA_LIMIT >> 20
            ))),
        }
    }
    fn string(&mut self) -> Result<String, Error> {
        let n = self.len("string")?;
        self.spend(n)?;
        let bytes = self.take(n, "a string")?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.err("a string is not valid UTF-8"))
    }
    fn value(&mut self, ty: u32, depth: usize) -> Result<Value, Error> {
        Ok(match ty {
            0 => Value::U8(self.u8()?),
            1 => Value::I8(self.u8()? as i8),
            2 => Value::U16(self.u16()?),
            3 => Value::I16(self.u16()? as i16),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(self.u32()? as i32),
            6 => Value::F32(f32::from_bits(self.u32()?)),
            7 => Value::Bool(self.u8()? != 0),
            8 => Value::String(self.string()?),
            9 => {
                if depth > 4 {
                    return Err(self.err("arrays nested too deeply"));
                }
                let elem = self.u32()?;
                let n = self.len("array")?;
                // Every element costs a parsed value, whatever its size in the file.
                self.spend(n.saturating_mul(std::mem::size_of::<Value>()))?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(elem, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(self.u64()? as i64),
            12 => Value::F64(f64::from_bits(self.u64()?)),
            t => return Err(self.err(&format!("unknown metadata value type {t}"))),
        })
    }
}

/// One entry of the tensor directory as written: name, dimensions, type, offset.
type DirEntry = (String, Vec<u64>, GgmlType, u64);

impl<'a> Reader<'a> {
    /// Reads the magic, the version and the tensor and metadata counts.
    fn header(&mut self) -> Result<(u32, u64, u64), Error> {
        let buf = self.buf;
        if buf.len() < 4 || &buf[..4] != MAGIC {
            return Err(self.err("not a GGUF file (missing 'GGUF' magic)"));
        }
        self.pos = 4;
        let version = self.u32()?;
        if !(2..=3).contains(&version) {
            return Err(self.err(&format!(
                "unsupported GGUF version {version} (expected 2 or 3)"
            )));
        }
        let n_tensors = self.u64()?;
        let n_kv = self.u64()?;
        if n_tensors > 1 << 24 || n_kv > 1 << 24 {
            return Err(self.err("implausible tensor or metadata count (corrupt header?)"));
        }
        Ok((version, n_tensors, n_kv))
    }

    /// Reads `n_kv` metadata key-value pairs; a repeated key keeps its last value.
    fn metadata(&mut self, n_kv: u64) -> Result<BTreeMap<String, Value>, Error> {
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = self.string()?;
            let ty = self.u32()?;
            let v = self.value(ty, 0)?;
            metadata.insert(key, v);
        }
        Ok(metadata)
    }

    /// The data alignment `general.alignment` names (32 when absent).
    fn alignment(&self, metadata: &BTreeMap<String, Value>) -> Result<usize, Error> {
        Ok(match metadata.get("general.alignment") {
            Some(v) => v
                .as_u64()
                .filter(|a| *a > 0 && a.is_power_of_two())
                .ok_or_else(|| self.err("general.alignment is not a power of two"))?
                as usize,
            None => 32,
        })
    }

    /// Reads the `n_tensors` entries of the tensor directory.
    fn tensor_directory(&mut self, n_tensors: u64) -> Result<Vec<DirEntry>, Error> {
        // A tensor's entry takes at least 32 bytes (name length, one dimension, type,
        // offset): a count the rest of the file cannot hold is corrupt.
        if n_tensors > ((self.buf.len() - self.pos) / 32) as u64 {
            return Err(self.err(&format!(
                "file is truncated or corrupt: {n_tensors} tensors cannot fit in its {} bytes",
                self.buf.len()
            )));
        }
        let mut infos = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = self.string()?;
            let n_dims = self.u32()?;
            if n_dims == 0 || n_dims > 4 {
                return Err(self.err(&format!("tensor '{name}' has {n_dims} dimensions")));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(self.u64()?);
            }
            let ty = self.u32()?;
            let dtype = GgmlType::from_u32(ty).ok_or_else(|| Error::UnsupportedTensorType {
                tensor: name.clone(),
                ty: ty.to_string(),
            })?;
            let offset = self.u64()?;
            infos.push((name, dims, dtype, offset));
        }
        Ok(infos)
    }

    /// Checks that a directory entry's data lies whole and aligned in the file, and places it.
    fn place_tensor(
        &self,
        (name, dims, dtype, offset): DirEntry,
        data_start: usize,
        alignment: usize,
    ) -> Result<TensorInfo, Error> {
        let buf = self.buf;
        let n: u64 = dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .unwrap_or(u64::MAX);
        let bs = dtype.block_size() as u64;
        if dims[0] % bs != 0 {
            return Err(self.err(&format!(
                "tensor '{name}': row length {} is not a multiple of the {dtype:?} block size {bs}",
                dims[0]
            )));
        }
        let size = (n / bs).checked_mul(dtype.type_size() as u64);
        let start = (data_start as u64).checked_add(offset);
        let end = match (start, size) {
            (Some(s), Some(z)) => s.checked_add(z),
            _ => None,
        };
        match end {
            Some(end) if end <= buf.len() as u64 => {}
            _ => {
                return Err(Error::Format {
                    path: self.path.to_path_buf(),
                    msg: format!(
                        "file is truncated or corrupt: tensor '{name}' ({dtype:?}, dims {dims:?}) lies past the end of the file ({} bytes)",
                        buf.len()
                    ),
                })
            }
        }
        if offset % alignment as u64 != 0 {
            return Err(self.err(&format!(
                "tensor '{name}': offset {offset} is not a multiple of the file's alignment {alignment}"
            )));
        }
        Ok(TensorInfo {
            name,
            dims,
            dtype,
            offset: start.unwrap() as usize,
            size: size.unwrap() as usize,
        })
    }

    /// Refuses tensors whose data overlap, or leave a gap wider than the alignment's padding.
    fn check_layout(
        &self,
        tensors: &BTreeMap<String, TensorInfo>,
        alignment: usize,
    ) -> Result<(), Error> {
        let extents = tensors
            .values()
            .map(|t| (t.offset, t.offset + t.size, t.name.as_str()))
            .collect();
        if let Some((a, b)) = crate::files::first_overlap(extents) {
            return Err(self.err(&format!(
                "tensors '{a}' and '{b}' overlap in the file (corrupt tensor directory)"
            )));
        }
        // Writers lay tensors out one after another, each padded to the alignment. A
        // gap wider than the padding means a type or shape in the directory does not
        // match the data written: typically a type id changed to a smaller type, whose
        // bytes would otherwise be read as that type without a word.
        let mut spans: Vec<(usize, usize, &str)> = tensors
            .values()
            .map(|t| (t.offset, t.offset + t.size, t.name.as_str()))
            .collect();
        spans.sort_unstable();
        for w in spans.windows(2) {
            let padded = w[0].1.div_ceil(alignment) * alignment;
            if w[1].0 > padded {
                return Err(self.err(&format!(
                    "tensor '{}' ends {} bytes before the next one, '{}', begins: its type or shape in the tensor directory does not match the data (corrupt or altered file)",
                    w[0].2,
                    w[1].0 - w[0].1,
                    w[1].2
                )));
            }
        }
        Ok(())
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile, Error> {
        crate::files::check_regular_file(path, u64::MAX)?;
        let file = std::fs::File::open(path).map_err(|e| Error::Io {
            path: path.to_path_buf(),
            error: e,
        })?;
        // SAFETY: the file is opened read-only and treated as immutable bytes.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::Io {
            path: path.to_path_buf(),
            error: e,
        })?;
        let mut r = Reader {
            buf: &mmap,
            pos: 0,
            path,
            budget: METADATA_LIMIT,
        };
        let (version, n_tensors, n_kv) = r.header()?;
        let metadata = r.metadata(n_kv)?;
        let alignment = r.alignment(&metadata)?;
        let entries = r.tensor_directory(n_tensors)?;
        let data_start = r.pos.div_ceil(alignment) * alignment;
        let mut tensors = BTreeMap::new();
        for entry in entries {
            let info = r.place_tensor(entry, data_start, alignment)?;
            let name = info.name.clone();
            if tensors.insert(name.clone(), info).is_some() {
                return Err(r.err(&format!("tensor '{name}' is listed twice")));
            }
        }
        r.check_layout(&tensors, alignment)?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            mmap: Arc::new(mmap),
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    fn missing(&self, key: &str, what: &str) -> Error {
        Error::Format {
            path: self.path.clone(),
            msg: format!("metadata key '{key}' is missing or is not {what}"),
        }
    }

    pub fn str(&self, key: &str) -> Result<&str, Error> {
        self.get(key)
            .and_then(|v| v.as_str())
            .ok_or_else(|| self.missing(key, "a string"))
    }
    pub fn u64(&self, key: &str) -> Result<u64, Error> {
        self.get(key)
            .and_then(|v| v.as_u64())
            .ok_or_else(|| self.missing(key, "an integer"))
    }
    pub fn f64(&self, key: &str) -> Result<f64, Error> {
        self.get(key)
            .and_then(|v| v.as_f64())
            .ok_or_else(|| self.missing(key, "a number"))
    }
    /// An array whose every element `elem` converts; `what` names the element kind.
    fn array<T>(
        &self,
        key: &str,
        what: &str,
        elem: impl Fn(&Value) -> Option<T>,
    ) -> Result<Vec<T>, Error> {
        let a = self
            .get(key)
            .and_then(|v| v.as_array())
            .ok_or_else(|| self.missing(key, "an array"))?;
        a.iter()
            .map(|v| elem(v).ok_or_else(|| self.missing(key, &format!("an array of {what}"))))
            .collect()
    }
    pub fn str_array(&self, key: &str) -> Result<Vec<String>, Error> {
        self.array(key, "strings", |v| v.as_str().map(str::to_string))
    }
    pub fn f32_array(&self, key: &str) -> Result<Vec<f32>, Error> {
        self.array(key, "numbers", |v| v.as_f64().map(|x| x as f32))
    }
    pub fn i64_array(&self, key: &str) -> Result<Vec<i64>, Error> {
        self.array(key, "integers", |v| v.as_i64())
    }

    pub fn tensor(&self, name: &str) -> Result<&TensorInfo, Error> {
        self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            name: name.to_string(),
        })
    }

    /// The raw bytes of a tensor.
    pub fn data(&self, t: &TensorInfo) -> &[u8] {
        &self.mmap[t.offset..t.offset + t.size]
    }

    /// The shared memory map, for weights that borrow from it.
    pub fn mmap(&self) -> &Arc<Mmap> {
        &self.mmap
    }
}

impl QMatrix {
    /// The tensor `name` of a GGUF file, borrowing its bytes from the memory map.
    /// A tensor with more than two dimensions is seen as `[prod(dims[1..])][dims[0]]`;
    /// a 1-D tensor as one row.
    pub fn from_gguf(file: &GgufFile, name: &str) -> Result<QMatrix, Error> {
        let info = file.tensor(name)?;
        let cols = info.dims[0] as usize;
        let rows = info.dims[1..].iter().product::<u64>() as usize;
        let ty = info.dtype;
        let row_bytes = ty.row_bytes(cols);
        let whole_blocks = cols / ty.block_size() * ty.block_size() == cols;
        if !whole_blocks || row_bytes * rows != info.size {
            return Err(Error::Format {
                path: file.path.clone(),
                msg: format!(
                    "tensor '{name}': {ty} data of {} bytes does not fit dims {:?}",
                    info.size, info.dims
                ),
            });
        }
        Ok(QMatrix::from_mmap(
            ty,
            rows,
            cols,
            Arc::clone(file.mmap()),
            info.offset,
            info.size,
        ))
    }
}
