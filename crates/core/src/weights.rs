//! Reading tensors out of one or more safetensors files held in memory (native: read from disk;
//! browser: bytes from IndexedDB or a file picker). Converts f32/bf16/f16 to f32, keeps u8 as is,
//! and turns every malformed input into an [`Error`] that names the file and tensor.

use std::collections::HashMap;

use safetensors::{Dtype, SafeTensorError, SafeTensors};

use crate::error::{Error, Result};

/// Tensors by name across a set of safetensors files (a sharded checkpoint or a single file).
pub struct WeightFiles<'a> {
    files: Vec<(String, SafeTensors<'a>)>,
    /// tensor name -> index into `files`
    index: HashMap<String, usize>,
    /// The first file's `__metadata__`.
    metadata: HashMap<String, String>,
}

impl<'a> WeightFiles<'a> {
    /// Parses the headers of every file; fails on the first malformed one.
    pub fn parse(files: &[(&str, &'a [u8])]) -> Result<WeightFiles<'a>> {
        if files.is_empty() {
            return Err(Error::NoWeights);
        }
        let mut parsed = Vec::with_capacity(files.len());
        let mut index = HashMap::new();
        let mut metadata = HashMap::new();
        for (i, (name, bytes)) in files.iter().enumerate() {
            let st = parse_one(name, bytes)?;
            if i == 0 {
                // parse_one validated the file, so reading its header again cannot fail.
                if let Ok((_, m)) = SafeTensors::read_metadata(bytes) {
                    metadata = m.metadata().clone().unwrap_or_default();
                }
            }
            for tensor in st.names() {
                index.insert(tensor.to_string(), i);
            }
            parsed.push((name.to_string(), st));
        }
        Ok(WeightFiles {
            files: parsed,
            index,
            metadata,
        })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut n: Vec<&str> = self.index.keys().map(String::as_str).collect();
        n.sort_unstable();
        n
    }

    /// A tensor's shape and whether it holds floats (f32, bf16, f16) rather than packed bytes.
    pub fn info(&self, name: &str) -> Result<(Vec<usize>, bool)> {
        use safetensors::Dtype;
        let (_, view) = self.view(name)?;
        let float = matches!(view.dtype(), Dtype::F32 | Dtype::BF16 | Dtype::F16);
        Ok((view.shape().to_vec(), float))
    }

    fn view(&self, name: &str) -> Result<(&str, safetensors::tensor::TensorView<'a>)> {
        let Some(&i) = self.index.get(name) else {
            return Err(Error::MissingTensor {
                name: name.to_string(),
                files: self
                    .files
                    .iter()
                    .map(|f| f.0.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        let (file, st) = &self.files[i];
        // The name came from this file's own header, so the lookup cannot fail.
        let view = st.tensor(name).map_err(|e| Error::NotSafetensors {
            file: file.clone(),
            msg: e.to_string(),
        })?;
        Ok((file, view))
    }

    /// Reads a float tensor (f32, bf16 or f16 on disk) as f32, checking its shape.
    pub fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let (file, view) = self.view(name)?;
        check_shape(file, name, view.shape(), shape)?;
        decode_f32(view.dtype(), view.data()).ok_or_else(|| Error::TensorDtype {
            file: file.to_string(),
            name: name.to_string(),
            dtype: format!("{:?}", view.dtype()),
            expected: "F32, BF16 or F16",
        })
    }

    /// Reads a u8 tensor (packed ternary weights), checking its shape.
    pub fn u8(&self, name: &str, shape: &[usize]) -> Result<&'a [u8]> {
        let (file, view) = self.view(name)?;
        check_shape(file, name, view.shape(), shape)?;
        if view.dtype() != Dtype::U8 {
            return Err(Error::TensorDtype {
                file: file.to_string(),
                name: name.to_string(),
                dtype: format!("{:?}", view.dtype()),
                expected: "U8",
            });
        }
        Ok(view.data())
    }

    /// The `__metadata__` of the first file (e.g. a training checkpoint's state).
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).map(String::as_str)
    }

    /// The file a tensor lives in (for error messages).
    pub fn file_of(&self, name: &str) -> &str {
        self.index
            .get(name)
            .map_or("?", |&i| self.files[i].0.as_str())
    }
}

pub(crate) fn check_shape(
    file: &str,
    name: &str,
    actual: &[usize],
    expected: &[usize],
) -> Result<()> {
    // A scalar stored as shape [] or [1] is the same thing (HF writes weight_scale as [1]).
    let numel = |s: &[usize]| s.iter().product::<usize>();
    let same = actual == expected
        || (numel(actual) == 1 && numel(expected) == 1 && actual.len() <= 1 && expected.len() <= 1);
    if same {
        Ok(())
    } else {
        Err(Error::TensorShape {
            file: file.to_string(),
            name: name.to_string(),
            expected: expected.to_vec(),
            actual: actual.to_vec(),
        })
    }
}

/// Parses one file, telling a truncated safetensors file apart from something that is not
/// safetensors at all, since the fix differs (download again vs pick the right file).
fn parse_one<'a>(file: &str, bytes: &'a [u8]) -> Result<SafeTensors<'a>> {
    let not_st = |msg: String| Error::NotSafetensors {
        file: file.to_string(),
        msg,
    };
    if bytes.len() < 8 {
        return Err(not_st(format!(
            "only {} bytes; a safetensors file starts with an 8-byte header length",
            bytes.len()
        )));
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    let looks_like_header = bytes.get(8) == Some(&b'{');
    if !looks_like_header || !(2..=100_000_000).contains(&n) {
        return Err(not_st(
            "the header is not a JSON object after an 8-byte length".into(),
        ));
    }
    let header_end = 8 + n;
    if header_end > bytes.len() as u64 {
        return Err(Error::Truncated {
            file: file.to_string(),
            expected: header_end,
            actual: bytes.len() as u64,
        });
    }
    match SafeTensors::deserialize(bytes) {
        Ok(st) => Ok(st),
        Err(SafeTensorError::MetadataIncompleteBuffer) => {
            // Work out how many bytes the header promises, to say how much is missing.
            let header: serde_json::Value = serde_json::from_slice(&bytes[8..header_end as usize])
                .map_err(|e| not_st(e.to_string()))?;
            let data_len = header
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(_, v)| v.get("data_offsets")?.get(1)?.as_u64())
                .max()
                .unwrap_or(0);
            let expected = header_end + data_len;
            if (bytes.len() as u64) < expected {
                Err(Error::Truncated {
                    file: file.to_string(),
                    expected,
                    actual: bytes.len() as u64,
                })
            } else {
                Err(not_st(format!(
                    "{} bytes after the last tensor",
                    bytes.len() as u64 - expected
                )))
            }
        }
        Err(e) => Err(not_st(e.to_string())),
    }
}

/// One tensor of a safetensors header: its dtype, shape and where its bytes lie in the file
/// (absolute offsets, the 8-byte length and the header included).
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpan {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub start: u64,
    pub end: u64,
}

/// Parses a safetensors file's header from its first bytes (`prefix`: at least the 8-byte
/// length and the JSON header when the file has them) and the file's full length, with the
/// checks and messages of [`WeightFiles::parse`]: truncation is told apart from a file that is
/// not safetensors. For loading tensor by tensor without the whole file in memory.
pub fn parse_header(file: &str, prefix: &[u8], file_len: u64) -> Result<Vec<TensorSpan>> {
    let not_st = |msg: String| Error::NotSafetensors {
        file: file.to_string(),
        msg,
    };
    if file_len < 8 {
        return Err(not_st(format!(
            "only {file_len} bytes; a safetensors file starts with an 8-byte header length"
        )));
    }
    if (prefix.len() as u64) < file_len.min(9) {
        return Err(not_st(format!(
            "only {} of its first {} bytes were given",
            prefix.len(),
            file_len.min(9)
        )));
    }
    let n = u64::from_le_bytes(prefix[..8].try_into().expect("8 bytes"));
    let looks_like_header = prefix.get(8) == Some(&b'{');
    if !looks_like_header || !(2..=100_000_000).contains(&n) {
        return Err(not_st(
            "the header is not a JSON object after an 8-byte length".into(),
        ));
    }
    let header_end = 8 + n;
    if header_end > file_len {
        return Err(Error::Truncated {
            file: file.to_string(),
            expected: header_end,
            actual: file_len,
        });
    }
    let Some(prefix) = prefix.get(..header_end as usize) else {
        return Err(not_st(format!(
            "only {} bytes of its {header_end}-byte header were given",
            prefix.len()
        )));
    };
    // read_metadata validates the header exactly as SafeTensors::deserialize does; with the
    // header alone it ends on MetadataIncompleteBuffer once everything else has passed.
    match SafeTensors::read_metadata(prefix) {
        Ok(_) | Err(SafeTensorError::MetadataIncompleteBuffer) => {}
        Err(e) => return Err(not_st(e.to_string())),
    }
    let meta: safetensors::tensor::Metadata =
        serde_json::from_slice(&prefix[8..]).map_err(|e| not_st(e.to_string()))?;
    let expected = header_end + meta.data_len() as u64;
    if file_len < expected {
        return Err(Error::Truncated {
            file: file.to_string(),
            expected,
            actual: file_len,
        });
    }
    if file_len > expected {
        return Err(not_st(format!(
            "{} bytes after the last tensor",
            file_len - expected
        )));
    }
    let mut spans: Vec<TensorSpan> = meta
        .tensors()
        .into_iter()
        .map(|(name, info)| TensorSpan {
            name,
            dtype: info.dtype,
            shape: info.shape.clone(),
            start: header_end + info.data_offsets.0 as u64,
            end: header_end + info.data_offsets.1 as u64,
        })
        .collect();
    spans.sort_by_key(|s| s.start);
    Ok(spans)
}

/// Converts a float tensor's little-endian bytes (f32, bf16 or f16) to f32; None for other
/// dtypes.
pub fn decode_f32(dtype: Dtype, data: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => return None,
    })
}

/// One tensor to write: name, dtype, shape, little-endian bytes.
pub struct OwnedTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl OwnedTensor {
    /// An f32 tensor stored as bf16 (round to nearest even, as torch's `.to(bfloat16)`).
    pub fn bf16(name: impl Into<String>, shape: &[usize], values: &[f32]) -> OwnedTensor {
        assert_eq!(
            shape.iter().product::<usize>(),
            values.len(),
            "bf16: shape does not match data"
        );
        OwnedTensor {
            name: name.into(),
            dtype: Dtype::BF16,
            shape: shape.to_vec(),
            data: values
                .iter()
                .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                .collect(),
        }
    }

    pub fn f32(name: impl Into<String>, shape: &[usize], values: &[f32]) -> OwnedTensor {
        assert_eq!(
            shape.iter().product::<usize>(),
            values.len(),
            "f32: shape does not match data"
        );
        OwnedTensor {
            name: name.into(),
            dtype: Dtype::F32,
            shape: shape.to_vec(),
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    pub fn u8(name: impl Into<String>, shape: &[usize], values: Vec<u8>) -> OwnedTensor {
        assert_eq!(
            shape.iter().product::<usize>(),
            values.len(),
            "u8: shape does not match data"
        );
        OwnedTensor {
            name: name.into(),
            dtype: Dtype::U8,
            shape: shape.to_vec(),
            data: values,
        }
    }
}

/// Serializes tensors into the bytes of one safetensors file.
pub fn serialize(tensors: &[OwnedTensor]) -> Vec<u8> {
    serialize_with_metadata(tensors, None)
}

/// [`serialize`] with the header's `__metadata__` string map.
pub fn serialize_with_metadata(
    tensors: &[OwnedTensor],
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Vec<u8> {
    let views: Vec<(&str, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|t| {
            let view = safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.data)
                .expect("OwnedTensor constructors check shape against data");
            (t.name.as_str(), view)
        })
        .collect();
    safetensors::serialize(views, metadata).expect("in-memory serialization of checked tensors")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        serialize(&[
            OwnedTensor::f32("a", &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
            OwnedTensor::bf16("b", &[2], &[0.5, -1.25]),
            OwnedTensor::u8("c", &[1, 2], vec![7, 9]),
        ])
    }

    #[test]
    fn reads_f32_bf16_u8() {
        let bytes = sample();
        let w = WeightFiles::parse(&[("m.safetensors", &bytes)]).unwrap();
        assert_eq!(
            w.f32("a", &[2, 3]).unwrap(),
            vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
        );
        assert_eq!(w.f32("b", &[2]).unwrap(), vec![0.5, -1.25]);
        assert_eq!(w.u8("c", &[1, 2]).unwrap(), &[7, 9]);
    }

    #[test]
    fn errors_name_file_tensor_and_shapes() {
        let bytes = sample();
        let w = WeightFiles::parse(&[("m.safetensors", &bytes)]).unwrap();
        let e = w.f32("a", &[3, 2]).unwrap_err().to_string();
        assert_eq!(
            e,
            "m.safetensors: tensor `a` has shape [2, 3], expected [3, 2]"
        );
        let e = w.f32("zz", &[1]).unwrap_err().to_string();
        assert_eq!(e, "tensor `zz` is missing from m.safetensors");
        let e = w.u8("a", &[2, 3]).unwrap_err().to_string();
        assert!(e.contains("dtype F32, expected U8"), "{e}");
    }

    #[test]
    fn truncated_and_foreign_files_are_told_apart() {
        let bytes = sample();
        for cut in [bytes.len() - 1, bytes.len() / 2, 12] {
            let e = WeightFiles::parse(&[("m.safetensors", &bytes[..cut])])
                .err()
                .unwrap();
            assert!(matches!(e, Error::Truncated { .. }), "cut at {cut}: {e}");
            assert!(e.to_string().starts_with("m.safetensors: truncated"), "{e}");
        }
        for junk in [
            &b"hello"[..],
            b"GGUF\x03\x00\x00\x00\x00\x00\x00\x00",
            b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!",
        ] {
            let e = WeightFiles::parse(&[("x.bin", junk)]).err().unwrap();
            assert!(matches!(e, Error::NotSafetensors { .. }), "{e}");
            assert!(
                e.to_string().starts_with("x.bin: not a safetensors file"),
                "{e}"
            );
        }
    }
}
