//! GGUF in and out: the model files of llama.cpp, QVAC Fabric and bitnet.cpp, read into
//! bitlora's model, and LoRA adapters written for them.
//!
//! File layout (GGUF v2/v3, little endian; <https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>):
//! ```text
//! "GGUF" u32:version u64:n_tensors u64:n_kv
//! n_kv x      (string key, u32 value type, value)         string = u64 length + UTF-8 bytes
//! n_tensors x (string name, u32 n_dims, u64 ne[n_dims], u32 ggml type, u64 offset)
//! padding to general.alignment (default 32), then the tensor data; each offset is relative
//! to the data's start and a multiple of the alignment
//! ```
//! `ne[0]` is the fastest-moving dimension: a PyTorch (O, I) weight has `ne = [I, O]`.
//!
//! The reader is bounds-checked throughout: every length and count is checked against the
//! bytes that remain before anything is allocated for it, so a hostile header cannot make it
//! allocate more than the file's own size; every problem is a typed [`Error`], never a panic.
//! It works on a byte slice ([`Gguf::parse`]) or on a file's first bytes and its length
//! ([`Gguf::parse_header`], for callers that stream tensors, as the page does).
//!
//! Ternary block formats (llama.cpp `ggml-common.h` / `ggml-quants.c`, bitnet.cpp
//! `ggml-bitnet-mad.cpp`):
//! - TQ2_0: blocks of 256 values, 66 bytes: `qs[64]` then f16 `d`. Value `32*n + m` of each
//!   128-value half `j` sits in bits `2n..2n+2` of `qs[32*j + m]` as code `value + 1`.
//! - TQ1_0: blocks of 256 values, 54 bytes: `qs[48]` (5 trits a byte), `qh[4]` (4 trits a
//!   byte), f16 `d`. Trit `n` of byte `q` is `((q * 3^n mod 256) * 3) >> 8`; the first 32
//!   bytes of `qs` give values 0..160 (trit-major), the next 16 give 160..240, `qh` the last 16.
//! - I2_S (bitnet.cpp, type id 36): the whole tensor's codes, then one f32 scale, padded to
//!   `n/4 + 32` bytes. Blocks of 128 values in 32 bytes: value `j` of a block is at byte
//!   `j % 32`, bits `6 - 2*(j/32)`, code `value + 1`. The scale is max|W|. This is the
//!   layout bitnet.cpp's x86 build writes (QK_I2_S = 128); its ARM build packs blocks of 64
//!   (QK_I2_S = 64), which the file does not record: such a file decodes to permuted weights
//!   here (its logits are wrong, not an error). Convert on x86 or re-convert from safetensors.
//!
//! Each decodes to values in {-1, 0, 1} times a scale. bitlora's weights are ternary with one
//! scale per tensor (`W = T / w_scale`), so a TQ tensor maps exactly when all its blocks that
//! hold a nonzero value share one `d` (true of every BitNet conversion: llama.cpp's
//! `convert_hf_to_gguf.py` writes `T * mean|W|`, so each block's max is that mean); the
//! tensor's `w_scale` is then `1 / d` (times an optional `blk.N.<proj>.scale`, which llama.cpp's
//! BitNet graph multiplies into the output). A tensor whose blocks disagree is refused with the
//! two scales named rather than re-quantized behind the user's back.

use std::collections::HashMap;

use crate::config::{Activation, Config, Layout, WeightFormat};
use crate::error::{Error, Result};
use crate::model::{Model, TensorSource};
use crate::quant::{pack_ternary, quantize_weights};

pub const MAGIC: &[u8; 4] = b"GGUF";
/// `general.alignment` when the file does not set it.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most four dimensions (GGML_MAX_DIMS).
const MAX_DIMS: u32 = 4;
/// Arrays of arrays are legal; deeper nesting than this is refused (no real file has it, and
/// unbounded recursion on hostile input would overflow the stack).
const MAX_ARRAY_DEPTH: usize = 3;

/// The ggml tensor types bitlora knows the size of. Only some can be decoded
/// ([`decode_f32`], [`decode_ternary`]); the others are read past and refused by name if a
/// tensor the model needs has one.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    I8,
    I16,
    I32,
    I64,
    F64,
    BF16,
    TQ1_0,
    TQ2_0,
    /// bitnet.cpp's ternary type (its fork's id 36; upstream llama.cpp does not define 36).
    I2_S,
}

/// (type, id, values per block, bytes per block). I2_S's size is special ([`GgmlType::data_size`]).
const TYPES: [(GgmlType, u32, u64, u64); 23] = [
    (GgmlType::F32, 0, 1, 4),
    (GgmlType::F16, 1, 1, 2),
    (GgmlType::Q4_0, 2, 32, 18),
    (GgmlType::Q4_1, 3, 32, 20),
    (GgmlType::Q5_0, 6, 32, 22),
    (GgmlType::Q5_1, 7, 32, 24),
    (GgmlType::Q8_0, 8, 32, 34),
    (GgmlType::Q8_1, 9, 32, 36),
    (GgmlType::Q2_K, 10, 256, 84),
    (GgmlType::Q3_K, 11, 256, 110),
    (GgmlType::Q4_K, 12, 256, 144),
    (GgmlType::Q5_K, 13, 256, 176),
    (GgmlType::Q6_K, 14, 256, 210),
    (GgmlType::Q8_K, 15, 256, 292),
    (GgmlType::I8, 24, 1, 1),
    (GgmlType::I16, 25, 1, 2),
    (GgmlType::I32, 26, 1, 4),
    (GgmlType::I64, 27, 1, 8),
    (GgmlType::F64, 28, 1, 8),
    (GgmlType::BF16, 30, 1, 2),
    (GgmlType::TQ1_0, 34, 256, 54),
    (GgmlType::TQ2_0, 35, 256, 66),
    (GgmlType::I2_S, 36, 1, 1),
];

/// I2_S values per packed block (bitnet.cpp's QK_I2_S on x86).
const QK_I2_S: u64 = 128;

impl GgmlType {
    pub fn from_id(id: u32) -> Option<GgmlType> {
        TYPES.iter().find(|t| t.1 == id).map(|t| t.0)
    }

    pub fn id(self) -> u32 {
        TYPES.iter().find(|t| t.0 == self).map_or(u32::MAX, |t| t.1)
    }

    fn block(self) -> (u64, u64) {
        TYPES
            .iter()
            .find(|t| t.0 == self)
            .map_or((1, 1), |t| (t.2, t.3))
    }

    /// Bytes of a tensor of `n` values whose rows hold `ne0`; None when the rows are not whole
    /// blocks (or I2_S's `n` is not whole 128-value blocks) or the size overflows.
    pub fn data_size(self, ne0: u64, n: u64) -> Option<u64> {
        if self == GgmlType::I2_S {
            // bitnet.cpp: n/4 bytes of codes, then the f32 scale in 32 bytes kept for alignment.
            return n.is_multiple_of(QK_I2_S).then(|| (n / 4).checked_add(32))?;
        }
        let (values, bytes) = self.block();
        if !ne0.is_multiple_of(values) {
            return None;
        }
        (n / values).checked_mul(bytes)
    }
}

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
    Str(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    /// GGUF's value type id.
    pub fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::Str(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    /// A non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any number as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// One tensor's header entry.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the fastest-moving (a PyTorch (O, I) weight is `[I, O]`).
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    /// Bytes of data.
    pub size: u64,
}

impl TensorInfo {
    /// The shape in row-major (PyTorch) order: `dims` reversed.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A parsed GGUF header: metadata and tensor infos, with every tensor's bytes known to lie
/// inside the file.
#[derive(Clone, Debug)]
pub struct Gguf {
    pub file: String,
    pub version: u32,
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Absolute offset of the tensor data section.
    pub data_start: u64,
    /// The file's length in bytes.
    pub file_len: u64,
    by_name: HashMap<String, usize>,
}

/// A cursor over the header bytes; every read checks what remains.
struct Cursor<'a> {
    file: &'a str,
    bytes: &'a [u8],
    pos: usize,
    /// The whole file's length (`bytes` may be only its start).
    file_len: u64,
}

impl<'a> Cursor<'a> {
    fn truncated(&self, what: &str, needed: u64) -> Error {
        let partial = (self.bytes.len() as u64) < self.file_len;
        Error::GgufTruncated {
            file: self.file.to_string(),
            what: if partial {
                format!(
                    "{what} (the header runs past the {} bytes given; pass more of the file's start)",
                    self.bytes.len()
                )
            } else {
                what.to_string()
            },
            offset: self.pos as u64,
            needed,
            len: self.bytes.len() as u64,
        }
    }

    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.truncated(what, n));
        }
        let s = &self.bytes[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        let at = self.pos as u64;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| Error::GgufFormat {
            file: self.file.to_string(),
            offset: at,
            msg: format!("{what} is not valid UTF-8"),
        })
    }

    /// A count of items that each take at least `min_size` bytes, checked against what remains.
    fn count(&mut self, what: &'static str, min_size: u64) -> Result<u64> {
        let n = self.u64(what)?;
        // Against the whole file's remaining bytes, not only the prefix held: a header
        // prefix may end before the items do (then reading them reports it).
        let left = self.file_len.saturating_sub(self.pos as u64);
        let max = left / min_size.max(1);
        if n > max {
            return Err(Error::GgufCount {
                file: self.file.to_string(),
                what,
                count: n,
                max,
            });
        }
        Ok(n)
    }

    fn value(&mut self, key: &str, type_id: u32, depth: usize) -> Result<Value> {
        Ok(match type_id {
            0 => Value::U8(self.array::<1>(key)?[0]),
            1 => Value::I8(self.array::<1>(key)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            7 => match self.array::<1>(key)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => {
                    return Err(Error::GgufFormat {
                        file: self.file.to_string(),
                        offset: self.pos as u64 - 1,
                        msg: format!("`{key}`: a bool holds {b}, not 0 or 1"),
                    });
                }
            },
            8 => Value::Str(self.string(key)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(Error::GgufFormat {
                        file: self.file.to_string(),
                        offset: self.pos as u64,
                        msg: format!("`{key}`: arrays nested deeper than {MAX_ARRAY_DEPTH} levels"),
                    });
                }
                let elem = self.u32(key)?;
                let min = match elem {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    _ => return Err(self.bad_value_type(key, elem)),
                };
                let n = self.count("array length", min)?;
                // Capacity from the bytes actually held, so a prefix cannot over-reserve.
                let mut items = Vec::with_capacity((n.min(self.remaining() / min)) as usize);
                for _ in 0..n {
                    items.push(self.value(key, elem, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            other => return Err(self.bad_value_type(key, other)),
        })
    }

    fn bad_value_type(&self, key: &str, type_id: u32) -> Error {
        Error::GgufValueType {
            file: self.file.to_string(),
            key: key.to_string(),
            type_id,
            offset: self.pos as u64 - 4,
        }
    }
}

impl Gguf {
    /// Parses a whole GGUF file held in memory.
    pub fn parse(file: &str, bytes: &[u8]) -> Result<Gguf> {
        Gguf::parse_header(file, bytes, bytes.len() as u64)
    }

    /// Parses the header from the file's first bytes (`prefix`, which must hold the whole
    /// header; the whole file will do) and checks every tensor against `file_len`.
    pub fn parse_header(file: &str, prefix: &[u8], file_len: u64) -> Result<Gguf> {
        let mut c = Cursor {
            file,
            bytes: prefix,
            pos: 0,
            file_len,
        };
        let magic: [u8; 4] = c.array("the magic number")?;
        if &magic != MAGIC {
            return Err(Error::NotGguf {
                file: file.to_string(),
                magic,
            });
        }
        let version = c.u32("the version")?;
        if !(2..=3).contains(&version) {
            return Err(Error::GgufVersion {
                file: file.to_string(),
                version,
            });
        }
        // A tensor info takes at least 24 bytes (8 name length, 4 n_dims, 4 type, 8 offset);
        // a key-value pair at least 13 (8 key length, 4 type, 1 value).
        let n_tensors = c.count("tensor count", 24)?;
        let n_kv = c.count("metadata key-value count", 13)?;
        // Capacity from the bytes held (a header prefix may be far shorter than the file).
        let mut metadata = Vec::with_capacity(n_kv.min(c.remaining() / 13) as usize);
        for _ in 0..n_kv {
            let key = c.string("a metadata key")?;
            let type_id = c.u32(&key)?;
            let value = c.value(&key, type_id, 0)?;
            metadata.push((key, value));
        }
        let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some((_, Value::U32(a))) if *a > 0 && a.is_power_of_two() => u64::from(*a),
            Some((_, v)) => {
                return Err(Error::GgufMetadata {
                    file: file.to_string(),
                    key: "general.alignment".into(),
                    problem: format!("is {v:?}; it must be a u32 power of two"),
                });
            }
        };
        let mut raw = Vec::with_capacity(n_tensors.min(c.remaining() / 24) as usize);
        for _ in 0..n_tensors {
            let name = c.string("a tensor name")?;
            let n_dims = c.u32(&name)?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(Error::GgufFormat {
                    file: file.to_string(),
                    offset: c.pos as u64 - 4,
                    msg: format!("tensor `{name}` has {n_dims} dimensions (1 to {MAX_DIMS})"),
                });
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64(&name)?);
            }
            let type_id = c.u32(&name)?;
            let Some(ggml_type) = GgmlType::from_id(type_id) else {
                return Err(Error::GgufTensorType {
                    file: file.to_string(),
                    tensor: name,
                    type_id,
                });
            };
            let offset = c.u64(&name)?;
            raw.push((name, dims, ggml_type, offset));
        }
        let data_start = (c.pos as u64).next_multiple_of(alignment);
        let mut tensors = Vec::with_capacity(raw.len());
        let mut by_name = HashMap::with_capacity(raw.len());
        for (name, dims, ggml_type, offset) in raw {
            let bad = |msg: String| Error::GgufFormat {
                file: file.to_string(),
                offset: 0,
                msg: format!("tensor `{name}`: {msg}"),
            };
            let n = dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .ok_or_else(|| bad(format!("dimensions {dims:?} overflow")))?;
            let size = ggml_type.data_size(dims[0], n).ok_or_else(|| {
                bad(format!(
                    "dimensions {dims:?} are not whole {ggml_type:?} blocks"
                ))
            })?;
            if !offset.is_multiple_of(alignment) {
                return Err(Error::GgufAlignment {
                    file: file.to_string(),
                    tensor: name,
                    offset,
                    alignment,
                });
            }
            let end = data_start
                .checked_add(offset)
                .and_then(|s| s.checked_add(size));
            match end {
                Some(end) if end <= file_len => {}
                _ => {
                    return Err(Error::GgufTruncated {
                        file: file.to_string(),
                        what: format!("the data of tensor `{name}` ({size} bytes)"),
                        offset: data_start.saturating_add(offset),
                        needed: size,
                        len: file_len,
                    });
                }
            }
            if by_name.insert(name.clone(), tensors.len()).is_some() {
                return Err(bad("declared twice".into()));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset: data_start + offset,
                size,
            });
        }
        Ok(Gguf {
            file: file.to_string(),
            version,
            metadata,
            tensors,
            alignment,
            data_start,
            file_len,
            by_name,
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The bytes of tensor `t` inside the whole file `bytes`.
    pub fn data<'a>(&self, bytes: &'a [u8], t: &TensorInfo) -> Result<&'a [u8]> {
        let (start, end) = (t.offset, t.offset + t.size);
        if end > bytes.len() as u64 {
            return Err(Error::GgufTruncated {
                file: self.file.clone(),
                what: format!("the data of tensor `{}`", t.name),
                offset: start,
                needed: t.size,
                len: bytes.len() as u64,
            });
        }
        Ok(&bytes[start as usize..end as usize])
    }

    fn meta_err(&self, key: &str, problem: impl Into<String>) -> Error {
        Error::GgufMetadata {
            file: self.file.clone(),
            key: key.to_string(),
            problem: problem.into(),
        }
    }

    /// A positive integer no larger than u32::MAX (what Config holds).
    fn meta_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .filter(|&x| x > 0 && x <= u64::from(u32::MAX))
                .map(|x| Some(x as usize))
                .ok_or_else(|| {
                    self.meta_err(key, format!("is {v:?}; expected a positive integer"))
                }),
        }
    }

    fn meta_required(&self, key: &str) -> Result<usize> {
        self.meta_usize(key)?
            .ok_or_else(|| self.meta_err(key, "is missing"))
    }

    fn meta_f32(&self, key: &str) -> Result<Option<f32>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite() && *x > 0.0)
                .map(|x| Some(x as f32))
                .ok_or_else(|| self.meta_err(key, format!("is {v:?}; expected a positive number"))),
        }
    }

    /// The architecture name (`general.architecture`), one of BitNet's.
    pub fn architecture(&self) -> Result<&str> {
        let key = "general.architecture";
        let arch = self
            .get(key)
            .ok_or_else(|| self.meta_err(key, "is missing"))?
            .as_str()
            .ok_or_else(|| self.meta_err(key, "is not a string"))?;
        if !ARCHITECTURES.contains(&arch) {
            return Err(self.meta_err(
                key,
                format!(
                    "is \"{arch}\"; bitlora runs BitNet b1.58 models ({})",
                    ARCHITECTURES.join(", ")
                ),
            ));
        }
        Ok(arch)
    }

    /// The model's [`Config`] from the `{arch}.*` keys (llama.cpp's names) and the tensors.
    ///
    /// GGUF has no key for the FFN activation. bitlora writes `bitlora.hidden_act`; otherwise
    /// it is relu² for `bitnet-b1.58` / `bitnet-25` (microsoft/bitnet-b1.58-2B-4T and its
    /// bitnet.cpp conversion) and for `bitnet` models with grouped-query attention (2B-4T
    /// converted by llama.cpp or QVAC, whose graph wrongly runs SiLU), and SiLU for `bitnet`
    /// models with full multi-head attention (1bitLLM's, which are SiLU-gated).
    pub fn config(&self) -> Result<Config> {
        let arch = self.architecture()?.to_string();
        let k = |s: &str| format!("{arch}.{s}");
        let hidden_size = self.meta_required(&k("embedding_length"))?;
        let num_attention_heads = self.meta_required(&k("attention.head_count"))?;
        let num_key_value_heads = self
            .meta_usize(&k("attention.head_count_kv"))?
            .unwrap_or(num_attention_heads);
        if !num_attention_heads.is_multiple_of(num_key_value_heads) {
            return Err(self.meta_err(
                &k("attention.head_count_kv"),
                format!(
                    "({num_key_value_heads}) must divide the head count ({num_attention_heads})"
                ),
            ));
        }
        let head_dim = match self.meta_usize(&k("attention.key_length"))? {
            Some(h) => h,
            None if hidden_size.is_multiple_of(num_attention_heads) => {
                hidden_size / num_attention_heads
            }
            None => {
                return Err(self.meta_err(
                    &k("attention.head_count"),
                    format!("({num_attention_heads}) must divide embedding_length ({hidden_size}) when attention.key_length is absent"),
                ));
            }
        };
        if !head_dim.is_multiple_of(2) {
            return Err(self.meta_err(
                &k("attention.key_length"),
                format!("({head_dim}) must be even for RoPE"),
            ));
        }
        let embd = self
            .tensor("token_embd.weight")
            .ok_or_else(|| Error::MissingTensor {
                name: "token_embd.weight".into(),
                files: self.file.clone(),
            })?;
        let vocab_size = match self.meta_usize(&k("vocab_size"))? {
            Some(v) => v,
            None => embd
                .dims
                .get(1)
                .copied()
                .filter(|&v| v > 0 && v <= u64::from(u32::MAX))
                .map(|v| v as usize)
                .ok_or_else(|| {
                    self.meta_err(
                        &k("vocab_size"),
                        "is missing and token_embd.weight is not (V, C)",
                    )
                })?,
        };
        let hidden_act = match self.get("bitlora.hidden_act").and_then(Value::as_str) {
            Some("relu2") => Activation::Relu2,
            Some("silu") => Activation::Silu,
            Some(other) => {
                return Err(self.meta_err(
                    "bitlora.hidden_act",
                    format!("is \"{other}\"; supported: \"relu2\", \"silu\""),
                ));
            }
            None if arch == "bitnet" && num_key_value_heads == num_attention_heads => {
                Activation::Silu
            }
            None => Activation::Relu2,
        };
        let u32_key = |key: &str| -> Result<Option<u32>> {
            match self.get(key) {
                None => Ok(None),
                Some(v) => v
                    .as_u64()
                    .and_then(|x| u32::try_from(x).ok())
                    .map(Some)
                    .ok_or_else(|| self.meta_err(key, format!("is {v:?}; expected a token id"))),
            }
        };
        Ok(Config {
            vocab_size,
            hidden_size,
            intermediate_size: self.meta_required(&k("feed_forward_length"))?,
            num_hidden_layers: self.meta_required(&k("block_count"))?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings: self.meta_required(&k("context_length"))?,
            rms_norm_eps: self
                .meta_f32(&k("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-5),
            rope_theta: self.meta_f32(&k("rope.freq_base"))?.unwrap_or(10_000.0),
            hidden_act,
            tie_word_embeddings: self.tensor("output.weight").is_none(),
            // The GGUF source hands the loader packed ternary bytes and `weight_scale = w_scale`
            // (W = T / weight_scale), whatever the file's own encoding.
            weight_format: WeightFormat::PackedBitLinear,
            layout: Layout::BitNet,
            bos_token_id: u32_key("tokenizer.ggml.bos_token_id")?,
            eos_token_ids: u32_key("tokenizer.ggml.eos_token_id")?
                .into_iter()
                .collect(),
        })
    }
}

/// `general.architecture` values of BitNet b1.58 models: llama.cpp / QVAC (`bitnet`),
/// bitnet.cpp (`bitnet-b1.58` for 2B-4T, `bitnet-25` for its earlier conversion).
pub const ARCHITECTURES: [&str; 3] = ["bitnet", "bitnet-b1.58", "bitnet-25"];

/// LLaMA-3's pre-tokenizer split (llama.cpp's `llama-bpe`), as in its tokenizer.json.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl Gguf {
    /// A Hugging Face `tokenizer.json` rebuilt from the `tokenizer.ggml.*` keys, as llama.cpp's
    /// converter wrote them from one: byte-level BPE (`tokenizer.ggml.model = gpt2`: `tokens`,
    /// `merges`, `token_type` with 3 = control and 4 = user-defined as added tokens) with the
    /// pre-tokenizer `tokenizer.ggml.pre` names (`llama-bpe` / `llama3`: LLaMA-3's split and
    /// whole-word vocabulary hits, as llama.cpp's `ignore_merges`; `gpt-2` / `default` or none:
    /// GPT-2's byte-level regex; `starcoder`: single digits, then GPT-2's regex, as bitlora's
    /// own tokenizers split), and the BOS prepended when `tokenizer.ggml.add_bos_token`.
    /// Other models (SentencePiece `llama`, ...) and pre-tokenizers are refused by name: pass
    /// the model's tokenizer.json instead.
    pub fn tokenizer_json(&self) -> Result<String> {
        use serde_json::json;
        let unsupported = |key: &str, what: String| {
            self.meta_err(
                key,
                format!("{what}; put the model's tokenizer.json beside the .gguf instead"),
            )
        };
        let strings = |key: &str| -> Result<Vec<&str>> {
            match self.get(key) {
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|v| {
                        v.as_str()
                            .ok_or_else(|| self.meta_err(key, "holds a non-string"))
                    })
                    .collect(),
                Some(_) => Err(self.meta_err(key, "is not an array of strings")),
                None => Err(unsupported(key, "is missing".into())),
            }
        };
        let model = match self.get("tokenizer.ggml.model") {
            Some(Value::Str(m)) => m.as_str(),
            _ => {
                return Err(unsupported(
                    "tokenizer.ggml.model",
                    "is missing: the file has no tokenizer".into(),
                ));
            }
        };
        if model != "gpt2" {
            return Err(unsupported(
                "tokenizer.ggml.model",
                format!(
                    "is \"{model}\": bitlora rebuilds only byte-level BPE (\"gpt2\") tokenizers"
                ),
            ));
        }
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        let types: Vec<i64> = match self.get("tokenizer.ggml.token_type") {
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::I32(t) => i64::from(*t),
                    other => other.as_u64().map_or(1, |t| t as i64),
                })
                .collect(),
            _ => vec![1; tokens.len()],
        };
        let pre = self.get("tokenizer.ggml.pre").and_then(Value::as_str);
        let (pre_tokenizer, ignore_merges) = match pre {
            Some("llama-bpe" | "llama3") => (
                json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": false},
                    {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]}),
                true,
            ),
            Some("starcoder") => (
                json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Digits", "individual_digits": true},
                    {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]}),
                false,
            ),
            None | Some("gpt-2" | "default") => (
                json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}),
                false,
            ),
            Some(other) => {
                return Err(unsupported(
                    "tokenizer.ggml.pre",
                    format!(
                        "is \"{other}\", a pre-tokenizer bitlora does not rebuild (it does llama-bpe, gpt-2, starcoder)"
                    ),
                ));
            }
        };
        let mut vocab = serde_json::Map::with_capacity(tokens.len());
        let mut added = Vec::new();
        for (id, &t) in tokens.iter().enumerate() {
            vocab.insert(t.to_string(), json!(id));
            let ty = types.get(id).copied().unwrap_or(1);
            if ty == 3 || ty == 4 {
                added.push(
                    json!({"id": id, "content": t, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": ty == 3}),
                );
            }
        }
        let bos = self
            .get("tokenizer.ggml.bos_token_id")
            .and_then(Value::as_u64)
            .and_then(|b| tokens.get(b as usize).map(|t| (b, *t)));
        let add_bos = matches!(
            self.get("tokenizer.ggml.add_bos_token"),
            Some(Value::Bool(true))
        );
        let post = match bos {
            Some((id, t)) if add_bos => json!({"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": t, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": t, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {t: {"id": t, "ids": [id], "tokens": [t]}}}),
            _ => {
                json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true})
            }
        };
        let tj = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": post,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
                "byte_fallback": false, "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges},
        });
        Ok(tj.to_string())
    }

    /// The tokenizer rebuilt from `tokenizer.ggml.*` ([`Gguf::tokenizer_json`]).
    pub fn tokenizer(&self) -> Result<crate::tokenizer::Tokenizer> {
        let json = self.tokenizer_json()?;
        crate::tokenizer::Tokenizer::from_bytes(
            &format!("{} (tokenizer.ggml.*)", self.file),
            json.as_bytes(),
        )
    }

    /// The chat template `tokenizer.chat_template` (what llama.cpp's converter copies from
    /// tokenizer_config.json's `chat_template`), `Ok(None)` when the file has none. Its
    /// `bos_token` / `eos_token` are the vocabulary's texts of `tokenizer.ggml.bos_token_id`
    /// and `eos_token_id`, as llama.cpp renders it; empty where the file names no such token.
    /// The template is parsed now: one that does not is an [`Error::ChatTemplate`] naming the
    /// key; one that is not a string, an [`Error::GgufMetadata`].
    pub fn chat_template(&self) -> Result<Option<crate::tokenizer::ChatTemplate>> {
        const KEY: &str = "tokenizer.chat_template";
        let source = match self.get(KEY) {
            None => return Ok(None),
            Some(Value::Str(s)) => s.clone(),
            Some(v) => {
                return Err(self.meta_err(
                    KEY,
                    format!("is a value of GGUF type {}, not a string", v.type_id()),
                ));
            }
        };
        let text = |key: &str| -> String {
            let id = self.get(key).and_then(Value::as_u64);
            match (id, self.get("tokenizer.ggml.tokens")) {
                (Some(id), Some(Value::Array(tokens))) => usize::try_from(id)
                    .ok()
                    .and_then(|i| tokens.get(i))
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                _ => String::new(),
            }
        };
        crate::tokenizer::ChatTemplate::new(
            &format!("{} ({KEY})", self.file),
            source,
            text("tokenizer.ggml.bos_token_id"),
            text("tokenizer.ggml.eos_token_id"),
        )
        .map(Some)
    }
}

/// The header of a `.gguf` file (metadata and tensor infos, no tensor data), reading only the
/// file's start: its first MiB, doubled until the header fits.
pub fn read_header(path: &std::path::Path) -> Result<Gguf> {
    use std::io::Read;
    let name = path.display().to_string();
    let io = |source| Error::Io {
        path: name.clone(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    let mut prefix = Vec::new();
    let mut want = 1u64 << 20;
    loop {
        let take = want.min(len) - prefix.len() as u64;
        (&mut f).take(take).read_to_end(&mut prefix).map_err(io)?;
        match Gguf::parse_header(&name, &prefix, len) {
            Err(Error::GgufTruncated { .. }) if (prefix.len() as u64) < len => want *= 2,
            header => return header,
        }
    }
}

/// The tokenizer of a `.gguf` file ([`Gguf::tokenizer`]), reading only the file's header
/// ([`read_header`]).
pub fn read_tokenizer(path: &std::path::Path) -> Result<crate::tokenizer::Tokenizer> {
    read_header(path)?.tokenizer()
}

/// The chat template of a `.gguf` file ([`Gguf::chat_template`]), reading only the file's
/// header ([`read_header`]).
pub fn read_chat_template(
    path: &std::path::Path,
) -> Result<Option<crate::tokenizer::ChatTemplate>> {
    read_header(path)?.chat_template()
}

/// The GGUF name (llama.cpp's) of a tensor bitlora reads by its Hugging Face name.
pub fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (l, rest) = rest.split_once('.')?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let short = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.attn_sub_norm" | "self_attn.inner_attn_ln" => "attn_sub_norm",
        "mlp.ffn_sub_norm" | "mlp.ffn_layernorm" => "ffn_sub_norm",
        other => proj_gguf_name(other)?,
    };
    Some(format!("blk.{l}.{short}.{suffix}"))
}

/// llama.cpp's short name of a projection given by its HF module path (`self_attn.q_proj`).
pub fn proj_gguf_name(hf_module: &str) -> Option<&'static str> {
    Some(match hf_module {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    })
}

/// `data` must be exactly tensor `t`'s bytes.
fn check_len(file: &str, t: &TensorInfo, data: &[u8]) -> Result<()> {
    if data.len() as u64 != t.size {
        return Err(Error::GgufTruncated {
            file: file.to_string(),
            what: format!("the data of tensor `{}`", t.name),
            offset: t.offset,
            needed: t.size,
            len: data.len() as u64,
        });
    }
    Ok(())
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Decodes a float tensor (F32, F16, BF16, Q8_0, Q6_K) to f32, in ggml order.
pub fn decode_f32(file: &str, t: &TensorInfo, data: &[u8]) -> Result<Vec<f32>> {
    let n = t.n_elements() as usize;
    check_len(file, t, data)?;
    let mut out = Vec::with_capacity(n);
    match t.ggml_type {
        GgmlType::F32 => out.extend(
            data.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        GgmlType::F16 => out.extend(data.chunks_exact(2).map(|c| f16_at(c, 0))),
        GgmlType::BF16 => out.extend(
            data.chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        // block_q8_0: f16 d, i8 qs[32]; x = d * q.
        GgmlType::Q8_0 => {
            for b in data.chunks_exact(34) {
                let d = f16_at(b, 0);
                out.extend(b[2..].iter().map(|&q| d * f32::from(q as i8)));
            }
        }
        // block_q6_K: ql[128], qh[64], i8 scales[16], f16 d; two halves of 128 values, each
        // value a 6-bit code (4 low bits from ql, 2 high from qh) minus 32, times d * scale.
        GgmlType::Q6_K => {
            for b in data.chunks_exact(210) {
                let d = f16_at(b, 208);
                let mut y = [0f32; 256];
                for half in 0..2 {
                    let ql = &b[64 * half..64 * half + 64];
                    let qh = &b[128 + 32 * half..128 + 32 * half + 32];
                    let sc = &b[192 + 8 * half..192 + 8 * half + 8];
                    let y = &mut y[128 * half..128 * half + 128];
                    for l in 0..32 {
                        let is = l / 16;
                        let q = |low: u8, shift: u32| -> f32 {
                            f32::from((low | (((qh[l] >> shift) & 3) << 4)) as i8 - 32)
                        };
                        let s = |k: usize| d * f32::from(sc[is + k] as i8);
                        y[l] = s(0) * q(ql[l] & 0xF, 0);
                        y[l + 32] = s(2) * q(ql[l + 32] & 0xF, 2);
                        y[l + 64] = s(4) * q(ql[l] >> 4, 4);
                        y[l + 96] = s(6) * q(ql[l + 32] >> 4, 6);
                    }
                }
                out.extend_from_slice(&y);
            }
        }
        other => {
            return Err(Error::TensorDtype {
                file: file.to_string(),
                name: t.name.clone(),
                dtype: format!("{other:?}"),
                expected: "F32, F16, BF16, Q8_0 or Q6_K",
            });
        }
    }
    Ok(out)
}

/// A ternary tensor: `values` in {-1, 0, 1} (ggml order, row after row) with `W = values * scale`.
#[derive(Clone, Debug, PartialEq)]
pub struct Ternary {
    pub values: Vec<i8>,
    pub scale: f32,
}

/// Decodes a TQ1_0, TQ2_0 or I2_S tensor (module doc) to one scale and ternary values.
pub fn decode_ternary(file: &str, t: &TensorInfo, data: &[u8]) -> Result<Ternary> {
    let n = t.n_elements() as usize;
    let bad = |what: String| Error::BadValue {
        file: file.to_string(),
        name: t.name.clone(),
        what,
    };
    check_len(file, t, data)?;
    let mut values = Vec::with_capacity(n);
    // The one scale of the blocks holding a nonzero value: (block index, d).
    let mut scale: Option<(usize, f32)> = None;
    let mut block_scale = |k: usize, d: f32, vals: &[i8]| -> Result<()> {
        if vals.iter().all(|&v| v == 0) {
            return Ok(());
        }
        match scale {
            None => scale = Some((k, d)),
            Some((k0, d0)) if d0.to_bits() != d.to_bits() => {
                return Err(bad(format!(
                    "has block scales {d0} (block {k0}) and {d} (block {k}); bitlora's ternary weights have one scale per tensor, as BitNet's do"
                )));
            }
            _ => {}
        }
        Ok(())
    };
    match t.ggml_type {
        GgmlType::TQ2_0 => {
            for (k, b) in data.chunks_exact(66).enumerate() {
                let start = values.len();
                for j in 0..2 {
                    for shift in 0..4 {
                        for m in 0..32 {
                            let code = (b[32 * j + m] >> (2 * shift)) & 3;
                            if code == 3 {
                                return Err(bad(format!(
                                    "block {k} holds the 2-bit code 3 (TQ2_0 codes are 0, 1, 2)"
                                )));
                            }
                            values.push(code as i8 - 1);
                        }
                    }
                }
                block_scale(k, f16_at(b, 64), &values[start..])?;
            }
        }
        GgmlType::TQ1_0 => {
            const POW3: [u8; 5] = [1, 3, 9, 27, 81];
            let trit = |q: u8, n: usize| (((q.wrapping_mul(POW3[n]) as u16) * 3) >> 8) as i8 - 1;
            for (k, b) in data.chunks_exact(54).enumerate() {
                let start = values.len();
                let (qs, qh) = (&b[..48], &b[48..52]);
                for n in 0..5 {
                    values.extend(qs[..32].iter().map(|&q| trit(q, n)));
                }
                for n in 0..5 {
                    values.extend(qs[32..48].iter().map(|&q| trit(q, n)));
                }
                for n in 0..4 {
                    values.extend(qh.iter().map(|&q| trit(q, n)));
                }
                block_scale(k, f16_at(b, 52), &values[start..])?;
            }
        }
        GgmlType::I2_S => {
            let codes = &data[..n / 4];
            for (k, b) in codes.chunks_exact(32).enumerate() {
                for j in 0..QK_I2_S as usize {
                    let code = (b[j % 32] >> (6 - 2 * (j / 32))) & 3;
                    if code == 3 {
                        return Err(bad(format!(
                            "block {k} holds the 2-bit code 3 (I2_S codes are 0, 1, 2)"
                        )));
                    }
                    values.push(code as i8 - 1);
                }
            }
            let s = &data[n / 4..n / 4 + 4];
            let d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            block_scale(0, d, &values)?;
        }
        other => {
            return Err(Error::TensorDtype {
                file: file.to_string(),
                name: t.name.clone(),
                dtype: format!("{other:?}"),
                expected: "TQ1_0, TQ2_0 or I2_S",
            });
        }
    }
    let scale = match scale {
        None => 1.0, // all zeros: any scale gives the same weight
        Some((_, d)) if d.is_finite() && d > 0.0 => d,
        Some((k, d)) => {
            return Err(bad(format!(
                "block {k} has the scale {d}, expected a positive number"
            )));
        }
    };
    Ok(Ternary { values, scale })
}

/// Encodes ternary values (ggml order, a multiple of 256) as TQ2_0 blocks with scale `d`
/// (`W = values * d`): llama.cpp's `quantize_row_tq2_0_ref` on `values * d`, whose blocks' max
/// is `d` (an all-zero block gets `d` too; it decodes to zeros all the same).
pub fn encode_tq2_0(values: &[i8], d: f32) -> Vec<u8> {
    let d = half::f16::from_f32(d).to_le_bytes();
    let mut out = Vec::with_capacity(values.len() / 256 * 66);
    for block in values.chunks_exact(256) {
        for half in block.chunks_exact(128) {
            for m in 0..32 {
                let code = |n: usize| ((half[32 * n + m] + 1) as u8) << (2 * n);
                out.push(code(0) | code(1) | code(2) | code(3));
            }
        }
        out.extend(d);
    }
    out
}

/// Encodes ternary values (a multiple of 128) as bitnet.cpp's I2_S with `W = values * scale`.
pub fn encode_i2_s(values: &[i8], scale: f32) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() / 4 + 32);
    for block in values.chunks_exact(QK_I2_S as usize) {
        for m in 0..32 {
            let code = |g: usize| ((block[32 * g + m] + 1) as u8) << (6 - 2 * g);
            out.push(code(0) | code(1) | code(2) | code(3));
        }
    }
    out.extend(scale.to_le_bytes());
    out.resize(values.len() / 4 + 32, 0);
    out
}

/// Encodes ternary values (ggml order, a multiple of 256) as TQ1_0 blocks with scale `d`:
/// llama.cpp's `quantize_row_tq1_0_ref` on `values * d`. A 256-value block is 48 bytes of five
/// trits (the first 160 values as 32 columns of 5, the next 80 as 16 columns of 5), 4 bytes of
/// four trits (the last 16 values, 4 columns of 4), then `d` as f16: 54 bytes. A byte holding
/// trits t_1..t_k (most significant first, padded to five) stores
/// `ceil(256 * sum t_j 3^(5-j) / 243)`, so that `(q * 3^n) mod 256 * 3 >> 8` reads trit n back.
pub fn encode_tq1_0(values: &[i8], d: f32) -> Vec<u8> {
    let d = half::f16::from_f32(d).to_le_bytes();
    fn pack(trits: impl Iterator<Item = i8>, n: usize) -> u8 {
        let mut q: u16 = 0;
        for t in trits {
            q = q * 3 + (t + 1) as u16;
        }
        // n < 5 trits: shift them to the most significant positions.
        for _ in n..5 {
            q *= 3;
        }
        (q * 256).div_ceil(243) as u8
    }
    let mut out = Vec::with_capacity(values.len() / 256 * 54);
    for block in values.chunks_exact(256) {
        let (a, rest) = block.split_at(160);
        let (b, c) = rest.split_at(80);
        for m in 0..32 {
            out.push(pack((0..5).map(|n| a[m + 32 * n]), 5));
        }
        for m in 0..16 {
            out.push(pack((0..5).map(|n| b[m + 16 * n]), 5));
        }
        for j in 0..4 {
            out.push(pack((0..4).map(|n| c[j + 4 * n]), 4));
        }
        out.extend(d);
    }
    out
}

/// The runtime a model's GGUF is written for, named by its `general.architecture`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgufArch {
    /// `bitnet`: the one BitNet architecture upstream llama.cpp and QVAC Fabric know (their
    /// `src/models/bitnet.cpp`). Their graph reads the head from `token_embd` (an untied head
    /// is refused), gates the FFN with SiLU, and knows TQ1_0/TQ2_0 but not I2_S.
    Bitnet,
    /// `bitnet-b1.58`: bitnet.cpp (microsoft/BitNet), which also reads I2_S.
    BitnetB158,
}

impl GgufArch {
    pub fn name(self) -> &'static str {
        match self {
            GgufArch::Bitnet => "bitnet",
            GgufArch::BitnetB158 => "bitnet-b1.58",
        }
    }
}

/// A model as a GGUF file with llama.cpp's names and `bitnet-b1.58` metadata, no vocabulary
/// (see [`write_model_as`]).
pub fn write_model(model: &Model, ternary: GgmlType) -> Result<Vec<u8>> {
    write_model_as(model, GgufArch::BitnetB158, ternary, None, None)
}

/// A model as a TQ2_0 GGUF that upstream llama.cpp loads, with no vocabulary (`bitlora bench
/// gguf`, for decoding the bench's random model there); see [`write_model_as`].
pub fn write_model_for_llama_cpp(model: &Model) -> Result<Vec<u8>> {
    write_model_as(model, GgufArch::Bitnet, GgmlType::TQ2_0, None, None)
}

/// A model as a GGUF file for `arch`, with llama.cpp's names: projections as `ternary` (TQ2_0,
/// TQ1_0 or I2_S; `d` or the I2_S scale is `1 / w_scale`, rounded to f16 for the TQ types),
/// everything else F32. TQ types need every projection's rows to be whole 256-value blocks,
/// I2_S every projection to be whole 128-value blocks; otherwise an error names the tensor.
///
/// `tokenizer` (a label and tokenizer.json's bytes) is written as `tokenizer.ggml.*`
/// ([`tokenizer_kv`]); without one, `tokenizer.ggml.model = no_vocab`, with which llama.cpp
/// makes `{arch}.vocab_size` dummy tokens instead of refusing the file. `chat_template` (the
/// Jinja source of tokenizer_config.json's, see
/// [`crate::tokenizer::ChatTemplate::source_in_tokenizer_config`]) is written as
/// `tokenizer.chat_template`, as `convert_hf_to_gguf.py` writes it: unparsed, for the runtime
/// that reads the file to judge. The model's
/// `hidden_act` is kept in `bitlora.hidden_act`, so bitlora reads the file back as written;
/// llama.cpp's `bitnet` graph gates the FFN with SiLU whatever it says (relu² models compute
/// another function there). For [`GgufArch::Bitnet`], what that graph cannot load is refused
/// here: an untied head, I2_S, `heads * head_dim != hidden_size`.
pub fn write_model_as(
    model: &Model,
    arch: GgufArch,
    ternary: GgmlType,
    tokenizer: Option<(&str, &[u8])>,
    chat_template: Option<&str>,
) -> Result<Vec<u8>> {
    let refuse = |key: &str, problem: String| Error::GgufMetadata {
        file: "(gguf export)".into(),
        key: key.into(),
        problem,
    };
    if arch == GgufArch::Bitnet {
        let c = &model.config;
        if model.params.lm_head.is_some() {
            return Err(refuse(
                "output.weight",
                "llama.cpp's bitnet graph has no separate head: export a model with tie_word_embeddings, or use --gguf-arch bitnet-b1.58 (bitnet.cpp)".into(),
            ));
        }
        if ternary == GgmlType::I2_S {
            return Err(refuse(
                "general.architecture",
                "llama.cpp and QVAC have no I2_S (type 36): use TQ2_0 or TQ1_0, or --gguf-arch bitnet-b1.58 for bitnet.cpp".into(),
            ));
        }
        if c.num_attention_heads * c.head_dim != c.hidden_size {
            return Err(refuse(
                "bitnet.attention.key_length",
                format!(
                    "llama.cpp's bitnet graph needs heads * head_dim = hidden_size, got {} * {} != {}",
                    c.num_attention_heads, c.head_dim, c.hidden_size
                ),
            ));
        }
    }
    let mut w = model_writer(model, ternary, arch.name())?;
    match tokenizer {
        Some((file, json)) => tokenizer_kv(&mut w, file, json, model.config.vocab_size)?,
        None => {
            w.kv("tokenizer.ggml.model", Value::Str("no_vocab".into()));
        }
    }
    if let Some(source) = chat_template {
        w.kv("tokenizer.chat_template", Value::Str(source.to_string()));
    }
    Ok(w.to_bytes())
}

/// A byte-level BPE tokenizer.json as the `tokenizer.ggml.*` keys llama.cpp's converter writes
/// (`convert_hf_to_gguf.py` `get_vocab_base`): `model = gpt2`, `tokens` by id padded to the
/// model's vocabulary with `[PAD{id}]` (type 5, unused), `token_type` (1 normal, 3 control =
/// special added token, 4 user-defined = other added token), `merges` as "a b", `add_bos_token`
/// when the post-processor prepends a special token, and `pre`, the llama.cpp pre-tokenizer
/// that splits as the tokenizer.json does: `gpt-2` (ByteLevel's own regex), `starcoder`
/// (individual Digits, then ByteLevel), `llama-bpe` (LLaMA-3's Split, then ByteLevel). Other
/// models, normalizers and pre-tokenizers are refused by name rather than written as one
/// llama.cpp would split differently. BOS/EOS ids come from the config ([`model_writer`]).
pub fn tokenizer_kv(w: &mut GgufWriter, file: &str, json: &[u8], vocab_size: usize) -> Result<()> {
    use serde_json::Value as J;
    let refuse = |key: &str, problem: String| Error::GgufMetadata {
        file: file.to_string(),
        key: key.into(),
        problem: format!(
            "{problem}; llama.cpp would tokenize differently (merge from a copy of the model without tokenizer.json for a file with no vocabulary, or convert with llama.cpp's convert_hf_to_gguf.py)"
        ),
    };
    let t: J = serde_json::from_slice(json).map_err(|e| Error::Data {
        file: file.to_string(),
        msg: e.to_string(),
    })?;
    let model = &t["model"];
    if model["type"].as_str() != Some("BPE") {
        return Err(refuse(
            "model.type",
            format!("is {}, not byte-level BPE", model["type"]),
        ));
    }
    if !t["normalizer"].is_null() {
        return Err(refuse(
            "normalizer",
            "is set; llama.cpp's gpt2 tokenizer has none".into(),
        ));
    }
    let kind = |p: &J| p["type"].as_str().map(str::to_string);
    let byte_level = |p: &J, regex: bool| {
        kind(p).as_deref() == Some("ByteLevel") && p["use_regex"].as_bool() == Some(regex)
    };
    let pre = &t["pre_tokenizer"];
    let seq: &[J] = match pre["pretokenizers"].as_array() {
        Some(v) if kind(pre).as_deref() == Some("Sequence") => v,
        _ => std::slice::from_ref(pre),
    };
    let pre_name = match seq {
        [b] if byte_level(b, true) => "gpt-2",
        [d, b]
            if kind(d).as_deref() == Some("Digits")
                && d["individual_digits"].as_bool() == Some(true)
                && byte_level(b, true) =>
        {
            "starcoder"
        }
        [s, b]
            if kind(s).as_deref() == Some("Split")
                && s["pattern"]["Regex"].as_str() == Some(LLAMA3_SPLIT)
                && byte_level(b, false) =>
        {
            "llama-bpe"
        }
        _ => {
            return Err(refuse(
                "pre_tokenizer",
                format!(
                    "is {pre}, which no llama.cpp pre-tokenizer bitlora writes matches (gpt-2, starcoder, llama-bpe)"
                ),
            ));
        }
    };
    let mut tokens: Vec<Option<(String, i32)>> = vec![None; vocab_size];
    let mut put = |id: Option<u64>, text: &str, ty: i32| -> Result<()> {
        match id.map(|i| i as usize) {
            Some(i) if i < vocab_size => {
                tokens[i] = Some((text.to_string(), ty));
                Ok(())
            }
            _ => Err(refuse(
                "model.vocab",
                format!(
                    "token {text:?} has the id {id:?}, outside the model's vocab_size {vocab_size}"
                ),
            )),
        }
    };
    for (text, id) in model["vocab"].as_object().into_iter().flatten() {
        put(id.as_u64(), text, 1)?;
    }
    for a in t["added_tokens"].as_array().into_iter().flatten() {
        let ty = if a["special"].as_bool() == Some(true) {
            3
        } else {
            4
        };
        put(
            a["id"].as_u64(),
            a["content"].as_str().unwrap_or_default(),
            ty,
        )?;
    }
    let (texts, types): (Vec<Value>, Vec<Value>) = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            let (text, ty) = t.unwrap_or_else(|| (format!("[PAD{i}]"), 5));
            (Value::Str(text), Value::I32(ty))
        })
        .unzip();
    let merges = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| match m {
            J::String(s) => Ok(s.clone()),
            J::Array(p) => match &p[..] {
                [J::String(a), J::String(b)] => Ok(format!("{a} {b}")),
                _ => Err(refuse(
                    "model.merges",
                    format!("holds {m}, not a pair of strings"),
                )),
            },
            _ => Err(refuse("model.merges", format!("holds {m}, not a merge"))),
        })
        .collect::<Result<Vec<_>>>()?;
    let post = &t["post_processor"];
    let add_bos = kind(post).as_deref() == Some("TemplateProcessing")
        && post["single"][0].get("SpecialToken").is_some();
    w.kv("tokenizer.ggml.model", Value::Str("gpt2".into()))
        .kv("tokenizer.ggml.pre", Value::Str(pre_name.into()))
        .kv("tokenizer.ggml.tokens", Value::Array(texts))
        .kv("tokenizer.ggml.token_type", Value::Array(types))
        .kv_strings("tokenizer.ggml.merges", merges)
        .kv("tokenizer.ggml.add_bos_token", Value::Bool(add_bos));
    Ok(())
}

fn model_writer(model: &Model, ternary: GgmlType, arch: &str) -> Result<GgufWriter> {
    let c = &model.config;
    let mut w = GgufWriter::new();
    let u = |x: usize| Value::U32(x as u32);
    w.kv("general.architecture", Value::Str(arch.into()))
        .kv("general.name", Value::Str("bitlora export".into()))
        .kv(
            &format!("{arch}.context_length"),
            u(c.max_position_embeddings),
        )
        .kv(&format!("{arch}.embedding_length"), u(c.hidden_size))
        .kv(&format!("{arch}.block_count"), u(c.num_hidden_layers))
        .kv(
            &format!("{arch}.feed_forward_length"),
            u(c.intermediate_size),
        )
        .kv(
            &format!("{arch}.attention.head_count"),
            u(c.num_attention_heads),
        )
        .kv(
            &format!("{arch}.attention.head_count_kv"),
            u(c.num_key_value_heads),
        )
        .kv(&format!("{arch}.attention.key_length"), u(c.head_dim))
        .kv(&format!("{arch}.attention.value_length"), u(c.head_dim))
        .kv(&format!("{arch}.rope.dimension_count"), u(c.head_dim))
        .kv(
            &format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::F32(c.rms_norm_eps),
        )
        .kv(&format!("{arch}.rope.freq_base"), Value::F32(c.rope_theta))
        .kv(&format!("{arch}.vocab_size"), u(c.vocab_size))
        .kv(
            "bitlora.hidden_act",
            Value::Str(match c.hidden_act {
                Activation::Relu2 => "relu2".into(),
                Activation::Silu => "silu".into(),
            }),
        );
    if let Some(b) = c.bos_token_id {
        w.kv("tokenizer.ggml.bos_token_id", Value::U32(b));
    }
    if let Some(&e) = c.eos_token_ids.first() {
        w.kv("tokenizer.ggml.eos_token_id", Value::U32(e));
    }
    let p = &model.params;
    let (v, h) = (c.vocab_size, c.hidden_size);
    w.tensor_f32("token_embd.weight", &[v, h], &p.embed_tokens.to_f32());
    if let Some(head) = &p.lm_head {
        w.tensor_f32("output.weight", &[v, h], &head.to_f32());
    }
    w.tensor_f32("output_norm.weight", &[h], &p.norm);
    for (l, layer) in p.layers.iter().enumerate() {
        for (name, x) in [
            ("attn_norm", &layer.input_layernorm),
            ("attn_sub_norm", &layer.attn_sub_norm),
            ("ffn_norm", &layer.post_attention_layernorm),
            ("ffn_sub_norm", &layer.ffn_sub_norm),
        ] {
            w.tensor_f32(&format!("blk.{l}.{name}.weight"), &[x.len()], x);
        }
        for proj in crate::model::Proj::ALL {
            let lin = layer.proj(proj);
            let (o, i) = (lin.out_features, lin.in_features);
            let name = format!(
                "blk.{l}.{}.weight",
                proj_gguf_name(proj.hf_name()).unwrap_or("?")
            );
            let values = lin.unpack();
            let bytes = match ternary {
                GgmlType::TQ2_0 if i.is_multiple_of(256) => {
                    encode_tq2_0(&values, 1.0 / lin.w_scale)
                }
                GgmlType::TQ1_0 if i.is_multiple_of(256) => {
                    encode_tq1_0(&values, 1.0 / lin.w_scale)
                }
                GgmlType::I2_S if (o * i).is_multiple_of(QK_I2_S as usize) => {
                    encode_i2_s(&values, 1.0 / lin.w_scale)
                }
                _ => {
                    return Err(Error::TensorShape {
                        file: "(gguf export)".into(),
                        name,
                        expected: vec![o, i.next_multiple_of(256)],
                        actual: vec![o, i],
                    });
                }
            };
            w.raw_tensor(&name, &[o, i], ternary, bytes);
        }
    }
    Ok(w)
}

/// The model's tensors, out of a parsed GGUF file, under the names and in the forms the model
/// loader asks for (HF names; packed ternary bytes plus `weight_scale` for projections).
struct GgufSource<'a> {
    gguf: &'a Gguf,
    bytes: &'a [u8],
    /// `weight_scale` of each projection decoded so far, by its HF name (`...q_proj`).
    scales: HashMap<String, f32>,
}

impl GgufSource<'_> {
    /// The GGUF tensor for HF name `hf`, its shape checked against `shape`.
    fn tensor(&self, hf: &str, shape: &[usize]) -> Result<(&TensorInfo, &[u8])> {
        let name = gguf_name(hf).unwrap_or_else(|| hf.to_string());
        let t = self
            .gguf
            .tensor(&name)
            .ok_or_else(|| Error::MissingTensor {
                name: name.clone(),
                files: self.gguf.file.clone(),
            })?;
        if t.shape() != shape {
            return Err(Error::TensorShape {
                file: self.gguf.file.clone(),
                name,
                expected: shape.to_vec(),
                actual: t.shape(),
            });
        }
        Ok((t, self.gguf.data(self.bytes, t)?))
    }
}

/// A projection's `.weight_scale` as the loader asks for it: the scale `u8` kept when it
/// decoded the projection (the loader asks for the codes first); None for other names.
fn decoded_scale(
    scales: &HashMap<String, f32>,
    file: &str,
    name: &str,
) -> Option<Result<Vec<f32>>> {
    let prefix = name.strip_suffix(".weight_scale")?;
    Some(
        scales
            .get(prefix)
            .map(|&s| vec![s])
            .ok_or_else(|| Error::MissingTensor {
                name: name.to_string(),
                files: file.to_string(),
            }),
    )
}

impl TensorSource for GgufSource<'_> {
    fn f32(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        if let Some(scale) = decoded_scale(&self.scales, &self.gguf.file, name) {
            return scale;
        }
        let (t, data) = self.tensor(name, shape)?;
        decode_f32(&self.gguf.file, t, data)
    }

    /// A projection `prefix.weight` (O, I) asked for as packed (O/4, I): decoded from its
    /// ternary type (or, for a float tensor, absmean-quantized as a master weight), packed,
    /// and its `weight_scale` kept for the loader's next question.
    fn u8(&mut self, name: &str, shape: &[usize]) -> Result<Vec<u8>> {
        let (o, i) = (shape[0] * 4, shape[1]);
        let prefix = name.strip_suffix(".weight").unwrap_or(name).to_string();
        let (t, data) = self.tensor(name, &[o, i])?;
        let file = &self.gguf.file;
        let (packed, mut w_scale) = decode_projection(file, t, data)?;
        let extra = t.name.replace(".weight", ".scale");
        if let Some(st) = self.gguf.tensor(&extra) {
            let s = decode_f32(file, st, self.gguf.data(self.bytes, st)?)?;
            w_scale = apply_output_scale(file, &extra, &s, w_scale)?;
        }
        self.scales.insert(prefix, w_scale);
        Ok(packed)
    }

    fn file_of(&self, _name: &str) -> String {
        self.gguf.file.clone()
    }
}

/// A projection's tensor `t` (O, I) as packed ternary bytes and its `w_scale` (W = T / w_scale):
/// decoded from its ternary type, or, for a float tensor, absmean-quantized as a master weight.
fn decode_projection(file: &str, t: &TensorInfo, data: &[u8]) -> Result<(Vec<u8>, f32)> {
    let [o, i] = t.shape()[..] else {
        return Err(Error::GgufFormat {
            file: file.to_string(),
            offset: t.offset,
            msg: format!(
                "projection `{}` has dimensions {:?}, expected two",
                t.name, t.dims
            ),
        });
    };
    let (values, w_scale) = match t.ggml_type {
        GgmlType::TQ1_0 | GgmlType::TQ2_0 | GgmlType::I2_S => {
            let tern = decode_ternary(file, t, data)?;
            (tern.values, 1.0 / tern.scale)
        }
        _ => {
            let w = decode_f32(file, t, data)?;
            if let Some(k) = w.iter().position(|x| !x.is_finite()) {
                return Err(Error::BadValue {
                    file: file.to_string(),
                    name: t.name.clone(),
                    what: crate::model::non_finite(k, w[k]),
                });
            }
            quantize_weights(&w)
        }
    };
    Ok((pack_ternary(&values, o, i), w_scale))
}

/// llama.cpp's BitNet graph multiplies a projection's output by `blk.N.<proj>.scale` when the
/// file has one (`s`, tensor `name`): `w_scale` divided by it.
fn apply_output_scale(file: &str, name: &str, s: &[f32], w_scale: f32) -> Result<f32> {
    match s[..] {
        [s] if s.is_finite() && s > 0.0 => Ok(w_scale / s),
        _ => Err(Error::BadValue {
            file: file.to_string(),
            name: name.to_string(),
            what: format!("is {s:?}, expected one positive number"),
        }),
    }
}

/// Loads a model from a whole GGUF file in memory.
pub fn load_model(file: &str, bytes: &[u8]) -> Result<Model> {
    let gguf = Gguf::parse(file, bytes)?;
    let config = gguf.config()?;
    let mut source = GgufSource {
        gguf: &gguf,
        bytes,
        scales: HashMap::new(),
    };
    crate::model::assemble(config, &mut source)
}

/// What a tensor the model reads from a GGUF file is, by its GGUF name.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Embeddings, head, norms, and a projection's optional `.scale`: decoded to f32.
    Float,
    /// `blk.N.<proj>.weight` (O, I): packed ternary bytes and `w_scale`.
    Projection(usize, usize),
}

/// A tensor received by a [`GgufBuilder`], decoded.
enum Decoded {
    Float(Vec<f32>),
    Projection { packed: Vec<u8>, w_scale: f32 },
}

/// Building a [`Model`] from a GGUF file's tensors handed over one at a time, as
/// [`crate::ModelBuilder`] does for safetensors, so that no whole file need be in memory
/// (the page streams each tensor out of a picked file or its IndexedDB chunks):
///
/// ```text
/// let (mut b, tensors) = GgufBuilder::new(name, first_bytes, file_len)?;  // the header
/// for t in tensors { b.add_tensor(&t.name, bytes of t.offset..t.offset + t.size)? }
/// let model = b.finish()?;
/// ```
/// Each tensor is decoded when it arrives (floats 64 Ki values at a time, a projection to
/// packed bytes), so memory holds the model being built plus one tensor's raw bytes at most.
/// The decoding and checks are [`load_model`]'s.
pub struct GgufBuilder {
    gguf: Gguf,
    config: Config,
    /// The tensors the model reads, by GGUF name.
    wanted: HashMap<String, Role>,
    got: HashMap<String, Decoded>,
    /// `weight_scale` of each projection handed to the loader, by its HF name (`...q_proj`).
    scales: HashMap<String, f32>,
}

impl GgufBuilder {
    /// Parses the header (`prefix`: the file's first bytes, enough to hold the whole header;
    /// [`Error::GgufTruncated`] with `len` below `file_len` says more are needed) and the
    /// config. Returns the builder and the tensors to hand over, in file order.
    pub fn new(file: &str, prefix: &[u8], file_len: u64) -> Result<(GgufBuilder, Vec<TensorInfo>)> {
        let gguf = Gguf::parse_header(file, prefix, file_len)?;
        let config = gguf.config()?;
        // Every projection's GGUF short name with its (O, I).
        let projs: HashMap<&str, (usize, usize)> = crate::model::projections(&config)
            .iter()
            .filter_map(|&(hf, o, i)| Some((proj_gguf_name(hf)?, (o, i))))
            .collect();
        let layers = config.num_hidden_layers;
        // Judged by the file's tensor names, not by listing the config's: a header claiming
        // 1e9 layers costs nothing before its tensors disagree.
        let role = |name: &str| -> Option<Role> {
            if matches!(
                name,
                "token_embd.weight" | "output.weight" | "output_norm.weight"
            ) {
                return Some(Role::Float);
            }
            let (l, rest) = name.strip_prefix("blk.")?.split_once('.')?;
            let l: usize = l.parse().ok().filter(|n: &usize| n.to_string() == l)?;
            if l >= layers {
                return None;
            }
            let (short, suffix) = rest.split_once('.')?;
            match (projs.get(short), suffix) {
                (Some(&(o, i)), "weight") => Some(Role::Projection(o, i)),
                (Some(_), "scale") => Some(Role::Float),
                (None, "weight")
                    if matches!(
                        short,
                        "attn_norm" | "ffn_norm" | "attn_sub_norm" | "ffn_sub_norm"
                    ) =>
                {
                    Some(Role::Float)
                }
                _ => None,
            }
        };
        let mut wanted = HashMap::new();
        let mut tensors = Vec::new();
        for t in &gguf.tensors {
            if let Some(r) = role(&t.name) {
                wanted.insert(t.name.clone(), r);
                tensors.push(t.clone());
            }
        }
        tensors.sort_by_key(|t| t.offset);
        Ok((
            GgufBuilder {
                gguf,
                config,
                wanted,
                got: HashMap::new(),
                scales: HashMap::new(),
            },
            tensors,
        ))
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The parsed header (metadata for the tokenizer, `general.architecture`).
    pub fn header(&self) -> &Gguf {
        &self.gguf
    }

    /// Hands over tensor `name`'s bytes (exactly its `size` bytes at its `offset`).
    pub fn add_tensor(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        self.add_tensor_from(name, bytes.len() as u64, |at, out| {
            out.copy_from_slice(&bytes[at..at + out.len()]);
        })
    }

    /// [`GgufBuilder::add_tensor`] for bytes that live elsewhere (the browser's JS heap):
    /// `read(offset, out)` fills `out` with the tensor's bytes from `offset`.
    pub fn add_tensor_from(
        &mut self,
        name: &str,
        len: u64,
        mut read: impl FnMut(usize, &mut [u8]),
    ) -> Result<()> {
        let file = self.gguf.file.clone();
        let (Some(&role), Some(t)) = (self.wanted.get(name), self.gguf.tensor(name)) else {
            return Err(Error::Shape {
                op: "load tensor",
                msg: format!("{file}: tensor `{name}` is not one the model reads from this file"),
            });
        };
        if len != t.size {
            return Err(Error::GgufTruncated {
                file,
                what: format!("the data of tensor `{name}`"),
                offset: t.offset,
                needed: t.size,
                len,
            });
        }
        let decoded = match role {
            Role::Projection(o, i) => {
                if t.shape() != [o, i] {
                    return Err(Error::TensorShape {
                        file,
                        name: name.to_string(),
                        expected: vec![o, i],
                        actual: t.shape(),
                    });
                }
                let mut raw = vec![0u8; t.size as usize];
                read(0, &mut raw);
                let (packed, w_scale) = decode_projection(&file, t, &raw)?;
                Decoded::Projection { packed, w_scale }
            }
            Role::Float => {
                // Floats 64 Ki values a piece: whole blocks of each type (1, 32 or 256 values;
                // rows are whole blocks), so each piece decodes as a 1-D run of blocks.
                if !matches!(
                    t.ggml_type,
                    GgmlType::F32
                        | GgmlType::F16
                        | GgmlType::BF16
                        | GgmlType::Q8_0
                        | GgmlType::Q6_K
                ) {
                    return Err(Error::TensorDtype {
                        file,
                        name: name.to_string(),
                        dtype: format!("{:?}", t.ggml_type),
                        expected: "F32, F16, BF16, Q8_0 or Q6_K",
                    });
                }
                const VALUES: u64 = 64 * 1024;
                let n = t.n_elements();
                let mut out = Vec::with_capacity(n as usize);
                let (mut at, mut offset) = (0u64, 0u64); // values decoded, bytes read
                while at < n {
                    let values = VALUES.min(n - at);
                    let piece = TensorInfo {
                        name: t.name.clone(),
                        dims: vec![values],
                        ggml_type: t.ggml_type,
                        offset: t.offset + offset,
                        size: t.ggml_type.data_size(values, values).unwrap_or(u64::MAX),
                    };
                    if offset.saturating_add(piece.size) > t.size {
                        return Err(Error::GgufFormat {
                            file,
                            offset: piece.offset,
                            msg: format!("tensor `{name}` is not whole {:?} blocks", t.ggml_type),
                        });
                    }
                    let mut raw = vec![0u8; piece.size as usize];
                    read(offset as usize, &mut raw);
                    out.extend(decode_f32(&file, &piece, &raw)?);
                    at += values;
                    offset += piece.size;
                }
                Decoded::Float(out)
            }
        };
        self.got.insert(name.to_string(), decoded);
        Ok(())
    }

    /// Builds the model from the tensors received (the checks of [`load_model`]).
    pub fn finish(mut self) -> Result<Model> {
        let config = self.config.clone();
        crate::model::assemble(config, &mut self)
    }

    /// The received tensor for HF name `hf`, its GGUF shape checked against `shape`.
    fn take(&mut self, hf: &str, shape: &[usize]) -> Result<Decoded> {
        let name = gguf_name(hf).unwrap_or_else(|| hf.to_string());
        let file = &self.gguf.file;
        let Some(t) = self.gguf.tensor(&name) else {
            return Err(Error::MissingTensor {
                name,
                files: file.clone(),
            });
        };
        if t.shape() != shape {
            return Err(Error::TensorShape {
                file: file.clone(),
                name,
                expected: shape.to_vec(),
                actual: t.shape(),
            });
        }
        self.got.remove(&name).ok_or_else(|| Error::Shape {
            op: "load tensor",
            msg: format!("{file}: tensor `{name}` was declared but its bytes were never added"),
        })
    }

    fn wrong_kind(&self, hf: &str, expected: &'static str) -> Error {
        let name = gguf_name(hf).unwrap_or_else(|| hf.to_string());
        Error::TensorDtype {
            file: self.gguf.file.clone(),
            dtype: self
                .gguf
                .tensor(&name)
                .map_or("?".into(), |t| format!("{:?}", t.ggml_type)),
            name,
            expected,
        }
    }
}

impl TensorSource for GgufBuilder {
    fn f32(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        if let Some(scale) = decoded_scale(&self.scales, &self.gguf.file, name) {
            return scale;
        }
        match self.take(name, shape)? {
            Decoded::Float(v) => Ok(v),
            Decoded::Projection { .. } => Err(self.wrong_kind(name, "a float type")),
        }
    }

    fn u8(&mut self, name: &str, shape: &[usize]) -> Result<Vec<u8>> {
        let prefix = name.strip_suffix(".weight").unwrap_or(name).to_string();
        let Decoded::Projection {
            packed,
            mut w_scale,
        } = self.take(name, &[shape[0] * 4, shape[1]])?
        else {
            return Err(self.wrong_kind(name, "TQ1_0, TQ2_0, I2_S or a float type"));
        };
        let gname = gguf_name(name).unwrap_or_else(|| name.to_string());
        let extra = gname.replace(".weight", ".scale");
        if self.gguf.tensor(&extra).is_some() {
            let s = match self.got.remove(&extra) {
                Some(Decoded::Float(s)) => s,
                _ => {
                    return Err(Error::Shape {
                        op: "load tensor",
                        msg: format!(
                            "{}: tensor `{extra}` was declared but its bytes were never added",
                            self.gguf.file
                        ),
                    });
                }
            };
            w_scale = apply_output_scale(&self.gguf.file, &extra, &s, w_scale)?;
        }
        self.scales.insert(prefix, w_scale);
        Ok(packed)
    }

    fn file_of(&self, _name: &str) -> String {
        self.gguf.file.clone()
    }
}

/// A GGUF file being written: metadata, then F32 tensors, aligned to [`DEFAULT_ALIGNMENT`].
#[derive(Default)]
pub struct GgufWriter {
    /// Keys whose arrays hold strings even when empty (an empty [`Value::Array`] has no item
    /// to take the type from; llama.cpp refuses `tokenizer.ggml.merges` of u8).
    string_arrays: Vec<String>,
    metadata: Vec<(String, Value)>,
    /// (name, ggml dims, type, bytes)
    tensors: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>,
}

impl GgufWriter {
    pub fn new() -> GgufWriter {
        GgufWriter::default()
    }

    pub fn kv(&mut self, key: &str, value: Value) -> &mut Self {
        self.metadata.push((key.to_string(), value));
        self
    }

    /// An array of strings, typed as strings when empty too.
    pub fn kv_strings(&mut self, key: &str, items: Vec<String>) -> &mut Self {
        self.string_arrays.push(key.to_string());
        self.kv(
            key,
            Value::Array(items.into_iter().map(Value::Str).collect()),
        )
    }

    /// An f32 tensor of row-major `shape` (stored with ggml's reversed dims).
    pub fn tensor_f32(&mut self, name: &str, shape: &[usize], values: &[f32]) -> &mut Self {
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.raw_tensor(name, shape, GgmlType::F32, bytes)
    }

    /// A tensor of any type whose bytes are already encoded.
    pub fn raw_tensor(
        &mut self,
        name: &str,
        shape: &[usize],
        ggml_type: GgmlType,
        bytes: Vec<u8>,
    ) -> &mut Self {
        let dims = shape.iter().rev().map(|&d| d as u64).collect();
        self.tensors
            .push((name.to_string(), dims, ggml_type, bytes));
        self
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        fn string(out: &mut Vec<u8>, s: &str) {
            out.extend((s.len() as u64).to_le_bytes());
            out.extend(s.as_bytes());
        }
        fn value(out: &mut Vec<u8>, v: &Value) {
            match v {
                Value::U8(x) => out.push(*x),
                Value::I8(x) => out.push(*x as u8),
                Value::U16(x) => out.extend(x.to_le_bytes()),
                Value::I16(x) => out.extend(x.to_le_bytes()),
                Value::U32(x) => out.extend(x.to_le_bytes()),
                Value::I32(x) => out.extend(x.to_le_bytes()),
                Value::F32(x) => out.extend(x.to_le_bytes()),
                Value::Bool(x) => out.push(u8::from(*x)),
                Value::Str(s) => string(out, s),
                Value::Array(items) => {
                    // An empty array is written as u8 items.
                    let elem = items.first().map_or(0, Value::type_id);
                    out.extend(elem.to_le_bytes());
                    out.extend((items.len() as u64).to_le_bytes());
                    for it in items {
                        value(out, it);
                    }
                }
                Value::U64(x) => out.extend(x.to_le_bytes()),
                Value::I64(x) => out.extend(x.to_le_bytes()),
                Value::F64(x) => out.extend(x.to_le_bytes()),
            }
        }
        let align = |n: u64| n.next_multiple_of(DEFAULT_ALIGNMENT);
        let mut out = Vec::new();
        out.extend(MAGIC);
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            string(&mut out, k);
            out.extend(v.type_id().to_le_bytes());
            match v {
                Value::Array(items) if items.is_empty() && self.string_arrays.contains(k) => {
                    out.extend(Value::Str(String::new()).type_id().to_le_bytes());
                    out.extend(0u64.to_le_bytes());
                }
                _ => value(&mut out, v),
            }
        }
        let mut offset = 0u64;
        for (name, dims, ty, bytes) in &self.tensors {
            string(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(ty.id().to_le_bytes());
            out.extend(offset.to_le_bytes());
            offset = align(offset + bytes.len() as u64);
        }
        out.resize(align(out.len() as u64) as usize, 0);
        for (_, _, _, bytes) in &self.tensors {
            out.extend(bytes);
            out.resize(align(out.len() as u64) as usize, 0);
        }
        out
    }
}

/// The graph an exported LoRA adapter will run in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdapterTarget {
    /// llama.cpp's semantics (`llama-cli --lora`, `llama-export-lora`):
    /// `y = W x + (alpha / r) * B (A x)`, the same update as PEFT's.
    Llama,
    /// QVAC Fabric's BitNet graph, which adds the LoRA term inside the matmul and multiplies
    /// the sum by the tensor's per-tensor weight scale afterwards:
    /// `y = ((T x) + (alpha / r) * B' (A x)) * (1 / s_w)`. For that to be PEFT's update,
    /// `B' = B * s_w` (B divided by the weight scale `1 / s_w`); see [`write_adapter`].
    Qvac,
}

/// A PEFT adapter as a GGUF LoRA adapter, named and shaped as llama.cpp's
/// `convert_lora_to_gguf.py` writes them: `general.type = adapter`, `adapter.type = lora`,
/// `adapter.lora.alpha`, and per adapted projection `blk.N.<proj>.weight.lora_a` (PyTorch
/// (R, I), ggml `[I, R]`) and `.lora_b` ((O, R), ggml `[R, O]`), F32.
///
/// llama.cpp scales the product by `alpha / r` (r read from lora_a's shape), so `alpha` is
/// written as `scale * r` with PEFT's scale: the same value for plain LoRA, and what keeps an
/// rsLoRA adapter's `alpha / sqrt(r)` right. For [`AdapterTarget::Qvac`] each B is multiplied
/// by its projection's `w_scale` (s_w, `W = T / s_w`), which `model` supplies; `arch` must be
/// the base model's `general.architecture` (llama.cpp refuses an adapter of another).
pub fn write_adapter(
    lora: &crate::lora::Lora,
    model: &Model,
    target: AdapterTarget,
    arch: &str,
) -> Vec<u8> {
    let r = lora.config.r;
    let mut w = GgufWriter::new();
    w.kv("general.architecture", Value::Str(arch.into()))
        .kv("general.type", Value::Str("adapter".into()))
        .kv("general.name", Value::Str("bitlora LoRA adapter".into()))
        .kv("adapter.type", Value::Str("lora".into()))
        .kv(
            "adapter.lora.alpha",
            Value::F32(lora.config.scale() * r as f32),
        )
        .kv(
            "bitlora.lora.target",
            Value::Str(match target {
                AdapterTarget::Llama => "llama".into(),
                AdapterTarget::Qvac => "qvac".into(),
            }),
        );
    for (l, layer) in lora.layers.iter().enumerate() {
        for proj in crate::model::Proj::ALL {
            let Some(pair) = &layer[proj] else { continue };
            let (o, i) = proj.shape(&model.config);
            let base = format!(
                "blk.{l}.{}.weight",
                proj_gguf_name(proj.hf_name()).unwrap_or("?")
            );
            w.tensor_f32(&format!("{base}.lora_a"), &[r, i], &pair.a);
            match target {
                AdapterTarget::Llama => w.tensor_f32(&format!("{base}.lora_b"), &[o, r], &pair.b),
                AdapterTarget::Qvac => {
                    let s_w = model.params.layers[l].proj(proj).w_scale;
                    let b: Vec<f32> = pair.b.iter().map(|x| x * s_w).collect();
                    w.tensor_f32(&format!("{base}.lora_b"), &[o, r], &b)
                }
            };
        }
    }
    w.to_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_llama_cpp() {
        for (hf, gg) in [
            ("model.embed_tokens.weight", "token_embd.weight"),
            ("lm_head.weight", "output.weight"),
            ("model.norm.weight", "output_norm.weight"),
            (
                "model.layers.3.input_layernorm.weight",
                "blk.3.attn_norm.weight",
            ),
            (
                "model.layers.0.post_attention_layernorm.weight",
                "blk.0.ffn_norm.weight",
            ),
            (
                "model.layers.1.self_attn.attn_sub_norm.weight",
                "blk.1.attn_sub_norm.weight",
            ),
            (
                "model.layers.1.mlp.ffn_sub_norm.weight",
                "blk.1.ffn_sub_norm.weight",
            ),
            (
                "model.layers.12.self_attn.o_proj.weight",
                "blk.12.attn_output.weight",
            ),
            (
                "model.layers.2.mlp.down_proj.weight",
                "blk.2.ffn_down.weight",
            ),
        ] {
            assert_eq!(gguf_name(hf).as_deref(), Some(gg), "{hf}");
        }
    }

    /// The page's path (header, then one tensor at a time, read through a callback) builds
    /// the model `load_model` builds from the whole file, for each ternary type; a header
    /// prefix too short says so with `len` below the file's length.
    #[test]
    fn builder_matches_whole_file_load() {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/gguf/t256"
        );
        for ty in ["tq2_0", "tq1_0", "i2_s"] {
            let path = format!("{dir}/{ty}.gguf");
            let bytes = std::fs::read(&path).unwrap();
            let whole = load_model(&path, &bytes).unwrap();
            let len = bytes.len() as u64;
            match GgufBuilder::new(&path, &bytes[..64], len) {
                Err(Error::GgufTruncated { len: got, .. }) => assert!(got < len, "{ty}"),
                other => panic!("{ty}: a 64-byte prefix gave {:?}", other.err()),
            }
            let (mut b, tensors) = GgufBuilder::new(&path, &bytes, len).unwrap();
            assert!(tensors.windows(2).all(|w| w[0].offset < w[1].offset));
            for t in &tensors {
                let data = &bytes[t.offset as usize..(t.offset + t.size) as usize];
                b.add_tensor_from(&t.name, t.size, |at, out| {
                    out.copy_from_slice(&data[at..at + out.len()])
                })
                .unwrap();
            }
            let built = b.finish().unwrap();
            assert_eq!(
                format!("{:?}", built.params),
                format!("{:?}", whole.params),
                "{ty}"
            );
            assert_eq!(
                format!("{:?}", built.config),
                format!("{:?}", whole.config),
                "{ty}"
            );
            // A tensor never handed over is named.
            let (b, _) = GgufBuilder::new(&path, &bytes, len).unwrap();
            let err = b.finish().unwrap_err().to_string();
            assert!(err.contains("token_embd.weight"), "{err}");
        }
    }

    #[test]
    fn writer_output_parses_back() {
        let mut w = GgufWriter::new();
        w.kv("general.architecture", Value::Str("bitnet".into()))
            .kv("a.list", Value::Array(vec![Value::I32(-1), Value::I32(7)]))
            .tensor_f32("x", &[2, 3], &[1., 2., 3., 4., 5., 6.])
            .tensor_f32("y", &[1], &[9.]);
        let bytes = w.to_bytes();
        let g = Gguf::parse("w.gguf", &bytes).unwrap();
        assert_eq!(
            g.get("a.list"),
            Some(&Value::Array(vec![Value::I32(-1), Value::I32(7)]))
        );
        let x = g.tensor("x").unwrap();
        assert_eq!((x.dims.clone(), x.shape()), (vec![3, 2], vec![2, 3]));
        assert_eq!(
            decode_f32("w", x, g.data(&bytes, x).unwrap()).unwrap(),
            [1., 2., 3., 4., 5., 6.]
        );
        let y = g.tensor("y").unwrap();
        assert_eq!(y.offset % 32, 0);
    }
}
