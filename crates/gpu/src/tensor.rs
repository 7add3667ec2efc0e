//! [`GpuTensor`]: a storage buffer with a name (for errors), a logical shape and an element
//! type; uploads and async readbacks.
//!
//! Every buffer is checked against the device's limits before it is created, so a tensor too
//! large for one binding gives [`GpuError::TooLarge`] naming it instead of a device error.

use std::future::poll_fn;
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};

use bitlora_core::TernaryLinear;
use wgpu::util::DeviceExt;

use crate::{Gpu, GpuError};

/// How a tensor's elements are laid out in its buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    /// bfloat16 packed two per u32 word along the flattened tensor: element 2k in the low
    /// half, 2k + 1 in the high half (an odd count pads the last high half with 0). A value's
    /// f32 is `bits << 16`, exact. Used for the embedding and the head when lossless
    /// ([`SplitTensor::upload`]).
    Bf16,
    U32,
    /// int8 codes packed four per u32 (little-endian) along the last dimension: a (R, K) tensor
    /// is stored as (R, ceil(K/4)) words, padding codes 0. Written by act_quant.wgsl.
    I8x4,
    /// A ternary (O, I) matrix as transformers packs it (bitlora_core::quant: (O4, I) bytes,
    /// O4 = ceil(O/4), byte (p, i) holding the 2-bit codes of rows p + s*O4, s = 0..3), with
    /// its bytes regrouped for the GPU: the four bytes (p, 4k..4k+3) form word (k, p) of an
    /// (I4, O4) u32 array, I4 = ceil(I/4), the columns past I padded with code 0. The same
    /// codes, still 2 bits each, laid out so that the invocations owning consecutive packed rows
    /// p read consecutive words (coalesced), each word aligned whatever I is.
    Ternary,
}

impl DType {
    /// Bytes a tensor of this type and logical shape occupies (at least 4: WebGPU bindings
    /// must not be empty).
    pub fn bytes(self, shape: &[usize]) -> u64 {
        let n: u64 = shape.iter().map(|&d| d as u64).product();
        let (rows, last) = match shape.split_last() {
            Some((&last, rest)) => (rest.iter().map(|&d| d as u64).product::<u64>(), last as u64),
            None => (1, 1),
        };
        let bytes = match self {
            DType::F32 | DType::U32 => 4 * n,
            DType::Bf16 => 4 * n.div_ceil(2),
            DType::I8x4 => 4 * rows * last.div_ceil(4),
            DType::Ternary => {
                // shape (O, I): rows == O, last == I; (I4, O4) words
                4 * rows.div_ceil(4) * last.div_ceil(4)
            }
        };
        bytes.max(4)
    }
}

/// A tensor on the GPU.
#[derive(Clone, Debug)]
pub struct GpuTensor {
    /// Shown in errors: the model's tensor name or the activation's role.
    pub name: String,
    /// The logical shape, e.g. (T, C); see [`DType`] for how it is stored.
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub buffer: wgpu::Buffer,
}

/// `data` as bf16 pairs (element 2k in a word's low half), every value exactly a bf16 or an
/// error naming it (`first`: the index of data[0] in `name`).
fn bf16_words(name: &str, data: &[f32], first: usize) -> Result<Vec<u32>, GpuError> {
    let mut words = vec![0u32; data.len().div_ceil(2)];
    for (k, &v) in data.iter().enumerate() {
        let bits = v.to_bits();
        if bits & 0xffff != 0 {
            return Err(GpuError::Shape {
                op: "upload",
                msg: format!("`{name}` value {} ({v:e}) is not exactly a bf16", first + k),
            });
        }
        words[k / 2] |= (bits >> 16) << (16 * (k % 2));
    }
    Ok(words)
}

/// Most bytes [`SplitTensor::upload_streamed`] writes before freeing their staging memory.
pub const UPLOAD_PIECE_BYTES: u64 = 32 << 20;

/// Natively, submits what was written or created with contents so far and waits for it, so
/// that wgpu frees the staging memory of those uploads (which it otherwise keeps until the
/// next submission completes: a model's whole weights over again). Nothing on the web, where
/// the browser stages `writeBuffer` itself.
pub fn flush_uploads(device: &wgpu::Device, queue: &wgpu::Queue) -> Result<(), GpuError> {
    #[cfg(not(target_arch = "wasm32"))]
    {
        queue.submit([]);
        device
            .poll(wgpu::PollType::Wait {
                submission_index: None,
                timeout: None,
            })
            .map_err(|e| GpuError::Device(format!("waiting for the uploads: {e}")))?;
    }
    #[cfg(target_arch = "wasm32")]
    let _ = (device, queue);
    Ok(())
}

/// The largest buffer a kernel may bind: the smaller of the storage-binding and buffer limits.
pub fn binding_limit(device: &wgpu::Device) -> u64 {
    let l = device.limits();
    l.max_storage_buffer_binding_size.min(l.max_buffer_size)
}

const USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

fn check_size(device: &wgpu::Device, name: &str, bytes: u64) -> Result<(), GpuError> {
    let limit = binding_limit(device);
    if bytes > limit {
        return Err(GpuError::TooLarge {
            tensor: name.to_string(),
            bytes,
            limit,
        });
    }
    Ok(())
}

impl GpuTensor {
    /// A zero-filled tensor.
    pub fn zeros(
        device: &wgpu::Device,
        name: impl Into<String>,
        shape: &[usize],
        dtype: DType,
    ) -> Result<GpuTensor, GpuError> {
        let name = name.into();
        let bytes = dtype.bytes(shape);
        check_size(device, &name, bytes)?;
        let buffer = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(&name),
            size: bytes,
            usage: USAGE,
            mapped_at_creation: false,
        });
        Ok(GpuTensor {
            name,
            shape: shape.to_vec(),
            dtype,
            buffer,
        })
    }

    /// A tensor holding `bytes`, which must be exactly `dtype.bytes(shape)` long.
    pub fn from_bytes(
        device: &wgpu::Device,
        name: impl Into<String>,
        shape: &[usize],
        dtype: DType,
        bytes: &[u8],
    ) -> Result<GpuTensor, GpuError> {
        let name = name.into();
        let want = dtype.bytes(shape);
        if bytes.len() as u64 != want {
            return Err(GpuError::Shape {
                op: "upload",
                msg: format!(
                    "`{name}` {dtype:?} {shape:?} needs {want} bytes, got {}",
                    bytes.len()
                ),
            });
        }
        check_size(device, &name, want)?;
        let buffer = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(&name),
            contents: bytes,
            usage: USAGE,
        });
        Ok(GpuTensor {
            name,
            shape: shape.to_vec(),
            dtype,
            buffer,
        })
    }

    /// Writes row-major `data` (f32, or exactly-bf16 values for a [`DType::Bf16`] tensor) into
    /// this tensor through `queue`, [`UPLOAD_PIECE_BYTES`] of the buffer at a time, flushing
    /// after each piece ([`flush_uploads`]).
    fn write_streamed(
        &self,
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        data: &[f32],
    ) -> Result<(), GpuError> {
        check_len(&self.name, &self.shape, data.len())?;
        // Values a piece: an even number (bf16 pairs share a word), a multiple of 4 bytes.
        let per = (UPLOAD_PIECE_BYTES / 4) as usize & !1;
        for (k, piece) in data.chunks(per).enumerate() {
            let at = k * per;
            match self.dtype {
                DType::Bf16 => {
                    let words = bf16_words(&self.name, piece, at)?;
                    queue.write_buffer(&self.buffer, (2 * at) as u64, bytemuck::cast_slice(&words));
                }
                _ => queue.write_buffer(&self.buffer, (4 * at) as u64, bytemuck::cast_slice(piece)),
            }
            flush_uploads(device, queue)?;
        }
        Ok(())
    }

    /// An f32 tensor of `shape` from row-major data.
    pub fn f32(
        device: &wgpu::Device,
        name: impl Into<String>,
        shape: &[usize],
        data: &[f32],
    ) -> Result<GpuTensor, GpuError> {
        let name = name.into();
        check_len(&name, shape, data.len())?;
        let data = if data.is_empty() { &[0f32][..] } else { data };
        Self::from_bytes(device, name, shape, DType::F32, bytemuck::cast_slice(data))
    }

    /// A [`DType::Bf16`] tensor of `shape` from row-major f32 data, every value of which must be
    /// exactly a bf16 (the low 16 bits of its f32 bits zero; see [`bf16_exact`]): the upload is
    /// lossless or refused.
    pub fn bf16(
        device: &wgpu::Device,
        name: impl Into<String>,
        shape: &[usize],
        data: &[f32],
    ) -> Result<GpuTensor, GpuError> {
        let name = name.into();
        check_len(&name, shape, data.len())?;
        let mut words = bf16_words(&name, data, 0)?;
        if words.is_empty() {
            words.push(0);
        }
        Self::from_bytes(
            device,
            name,
            shape,
            DType::Bf16,
            bytemuck::cast_slice(&words),
        )
    }

    /// A u32 tensor of `shape` (token ids).
    pub fn u32(
        device: &wgpu::Device,
        name: impl Into<String>,
        shape: &[usize],
        data: &[u32],
    ) -> Result<GpuTensor, GpuError> {
        let name = name.into();
        check_len(&name, shape, data.len())?;
        let data = if data.is_empty() { &[0u32][..] } else { data };
        Self::from_bytes(device, name, shape, DType::U32, bytemuck::cast_slice(data))
    }

    /// int8 codes (R, K) row-major, packed four per word along K.
    pub fn i8x4(
        device: &wgpu::Device,
        name: impl Into<String>,
        shape: &[usize],
        codes: &[i8],
    ) -> Result<GpuTensor, GpuError> {
        let name = name.into();
        check_len(&name, shape, codes.len())?;
        let k = *shape.last().unwrap_or(&1);
        let k4 = k.div_ceil(4);
        let rows = codes.len().checked_div(k).unwrap_or(0);
        let mut bytes = vec![0u8; (rows * k4 * 4).max(4)];
        for r in 0..rows {
            for c in 0..k {
                bytes[r * k4 * 4 + c] = codes[r * k + c] as u8;
            }
        }
        Self::from_bytes(device, name, shape, DType::I8x4, &bytes)
    }

    /// A ternary BitLinear weight (O, I) from bitlora-core's packed bytes, regrouped into the
    /// GPU's word layout (see [`DType::Ternary`]).
    pub fn ternary(
        device: &wgpu::Device,
        name: impl Into<String>,
        lin: &TernaryLinear,
    ) -> Result<GpuTensor, GpuError> {
        let shape = [lin.out_features, lin.in_features];
        let (o4, i) = (lin.packed_rows(), lin.in_features);
        if lin.packed.len() != o4 * i {
            return Err(GpuError::Shape {
                op: "upload",
                msg: format!(
                    "packed weight has {} bytes, expected (ceil(O/4), I) = ({o4}, {i})",
                    lin.packed.len(),
                ),
            });
        }
        let mut bytes = vec![0u8; DType::Ternary.bytes(&shape) as usize];
        for p in 0..o4 {
            let row = &lin.packed[p * i..(p + 1) * i];
            for (col, &b) in row.iter().enumerate() {
                // word (k, p) = bytes (p, 4k..4k+3), little-endian
                let (k, j) = (col / 4, col % 4);
                bytes[(k * o4 + p) * 4 + j] = b;
            }
        }
        Self::from_bytes(device, name, &shape, DType::Ternary, &bytes)
    }

    /// The first `t` rows of this tensor as a tensor of shape (t, ...) on the same buffer:
    /// a pass over fewer tokens than a reused activation buffer holds. Kernels index by the
    /// shape they are given, so the rows beyond `t` are neither read nor written.
    pub fn rows_view(&self, t: usize) -> Result<GpuTensor, GpuError> {
        match self.shape.first() {
            Some(&r) if t <= r => {
                let mut v = self.clone();
                v.shape[0] = t;
                Ok(v)
            }
            _ => Err(GpuError::Shape {
                op: "rows_view",
                msg: format!("`{}` {:?} has fewer than {t} rows", self.name, self.shape),
            }),
        }
    }

    /// This tensor's buffer seen as `shape` (same element type): a prefix of a scratch buffer
    /// allocated once for the largest shape a step needs, e.g. (T, I) of a (T_max, I_max)
    /// buffer. Kernels index by the shape they are given, so nothing past it is touched.
    pub fn view(&self, shape: &[usize]) -> Result<GpuTensor, GpuError> {
        let bytes = self.dtype.bytes(shape);
        if bytes > self.buffer.size() {
            return Err(GpuError::Shape {
                op: "view",
                msg: format!(
                    "`{}` ({} bytes) cannot hold {:?} {shape:?} ({bytes} bytes)",
                    self.name,
                    self.buffer.size(),
                    self.dtype
                ),
            });
        }
        let mut v = self.clone();
        v.shape = shape.to_vec();
        Ok(v)
    }

    /// Number of logical elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes of the logical shape (a [`GpuTensor::rows_view`] covers part of its buffer).
    pub fn bytes(&self) -> u64 {
        self.dtype.bytes(&self.shape)
    }
}

/// A 2-D tensor (R, C) split along R into chunks of consecutive rows, each small enough for
/// one storage binding: the embedding and the head of large-vocabulary models (2B-4T: 128256 x
/// 2560 f32 = 1.3 GB, against 128 MiB on lavapipe and many phones). Kernels that read it take
/// one dispatch per chunk (embedding.wgsl, matmul.wgsl, matmul_backward.wgsl). A tensor that
/// fits is one chunk. Every chunk has the same element type, [`DType::F32`] or, when that
/// loses nothing, [`DType::Bf16`] ([`SplitTensor::upload`]).
#[derive(Clone, Debug)]
pub struct SplitTensor {
    pub name: String,
    pub rows: usize, // R
    pub cols: usize, // C
    /// The chunks' element type: F32 or Bf16.
    pub dtype: DType,
    /// (first row, the chunk (RC, C)), in order, covering 0..R.
    pub chunks: Vec<(usize, GpuTensor)>,
}

impl SplitTensor {
    /// Uploads `data` (R, C) row-major as f32 in chunks of at most `max_chunk_bytes` (at least
    /// one row per chunk; a single row larger than the device's binding limit is
    /// [`GpuError::TooLarge`]).
    pub fn f32(
        device: &wgpu::Device,
        name: impl Into<String>,
        rows: usize,
        cols: usize,
        data: &[f32],
        max_chunk_bytes: u64,
    ) -> Result<SplitTensor, GpuError> {
        Self::with_dtype(
            device,
            None,
            name,
            rows,
            cols,
            data,
            max_chunk_bytes,
            DType::F32,
        )
    }

    /// As [`SplitTensor::f32`], stored as bf16 (half the bytes) when that is lossless: C is
    /// even (rows start on a word) and every value is exactly a bf16 ([`bf16_exact`]), as in
    /// checkpoints stored in bf16. Kernels widen each value back to the same f32, so results
    /// do not depend on the choice.
    ///
    /// The chunks keep the rows f32 chunks would have (a bf16 chunk is half of
    /// `max_chunk_bytes`, not twice the rows): the head's backward (matmul_backward.wgsl) sums
    /// each chunk's rows, then adds the chunks, so the chunk boundaries group its sums, and the
    /// same boundaries give the same bits.
    pub fn upload(
        device: &wgpu::Device,
        name: impl Into<String>,
        rows: usize,
        cols: usize,
        data: &[f32],
        max_chunk_bytes: u64,
    ) -> Result<SplitTensor, GpuError> {
        let dtype = Self::lossless_dtype(cols, data);
        Self::with_dtype(device, None, name, rows, cols, data, max_chunk_bytes, dtype)
    }

    /// bf16 where [`SplitTensor::upload`] may store it without loss (C even, every value a
    /// bf16), else f32.
    fn lossless_dtype(cols: usize, data: &[f32]) -> DType {
        if cols.is_multiple_of(2) && bf16_exact(data) {
            DType::Bf16
        } else {
            DType::F32
        }
    }

    /// [`SplitTensor::upload`] (`lossless_bf16`) or [`SplitTensor::f32`] written through
    /// `queue` a piece of at most [`UPLOAD_PIECE_BYTES`] at a time, each piece's staging
    /// memory freed before the next is written ([`flush_uploads`]): the same contents, but
    /// natively the upload never holds more than one piece of staging memory beside the
    /// tables (uploading a 2B-4T embedding in one piece doubled its 626 MiB on the GPU).
    #[allow(clippy::too_many_arguments)]
    pub fn upload_streamed(
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        name: impl Into<String>,
        rows: usize,
        cols: usize,
        data: &[f32],
        max_chunk_bytes: u64,
        lossless_bf16: bool,
    ) -> Result<SplitTensor, GpuError> {
        let dtype = if lossless_bf16 {
            Self::lossless_dtype(cols, data)
        } else {
            DType::F32
        };
        let q = Some(queue);
        Self::with_dtype(device, q, name, rows, cols, data, max_chunk_bytes, dtype)
    }

    #[allow(clippy::too_many_arguments)]
    fn with_dtype(
        device: &wgpu::Device,
        queue: Option<&wgpu::Queue>,
        name: impl Into<String>,
        rows: usize,
        cols: usize,
        data: &[f32],
        max_chunk_bytes: u64,
        dtype: DType,
    ) -> Result<SplitTensor, GpuError> {
        let name = name.into();
        check_len(&name, &[rows, cols], data.len())?;
        // f32 rows whatever the dtype: the same chunk boundaries (see SplitTensor::upload).
        let row_bytes = 4 * cols.max(1) as u64;
        let per_chunk = ((max_chunk_bytes / row_bytes) as usize).clamp(1, rows.max(1));
        let mut chunks = Vec::with_capacity(rows.div_ceil(per_chunk));
        for row0 in (0..rows).step_by(per_chunk) {
            let n = per_chunk.min(rows - row0);
            let chunk_name = if n == rows {
                name.clone()
            } else {
                format!("{name}[{row0}..{}]", row0 + n)
            };
            let values = &data[row0 * cols..(row0 + n) * cols];
            let t = match (queue, dtype) {
                (Some(queue), _) => {
                    let t = GpuTensor::zeros(device, chunk_name, &[n, cols], dtype)?;
                    t.write_streamed(device, queue, values)?;
                    t
                }
                (None, DType::Bf16) => GpuTensor::bf16(device, chunk_name, &[n, cols], values)?,
                (None, _) => GpuTensor::f32(device, chunk_name, &[n, cols], values)?,
            };
            chunks.push((row0, t));
        }
        Ok(SplitTensor {
            name,
            rows,
            cols,
            dtype,
            chunks,
        })
    }

    /// Bytes of all chunks.
    pub fn bytes(&self) -> u64 {
        self.chunks.iter().map(|(_, t)| t.bytes()).sum()
    }
}

/// Whether every value is exactly a bfloat16: the low 16 bits of its f32 bits are zero (what a
/// bf16 checkpoint converted to f32 gives).
pub fn bf16_exact(data: &[f32]) -> bool {
    data.iter().all(|v| v.to_bits() & 0xffff == 0)
}

fn check_len(name: &str, shape: &[usize], len: usize) -> Result<(), GpuError> {
    let n: usize = shape.iter().product();
    if n != len {
        return Err(GpuError::Shape {
            op: "upload",
            msg: format!("`{name}` has shape {shape:?} ({n} elements) but {len} values were given"),
        });
    }
    Ok(())
}

/// Copies `tensor` to a mappable buffer and reads its bytes back. Natively this blocks in
/// `device.poll` until the copy is done; on the web it awaits the browser's map promise.
pub async fn read_bytes(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    tensor: &GpuTensor,
) -> Result<Vec<u8>, GpuError> {
    // Only the logical shape: a view reads the rows it covers, not the whole buffer.
    let size = tensor.bytes().min(tensor.buffer.size());
    let staging = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("readback"),
        size,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut encoder = device.create_command_encoder(&Default::default());
    encoder.copy_buffer_to_buffer(&tensor.buffer, 0, &staging, 0, size);
    queue.submit([encoder.finish()]);
    map_read(device, &staging, &tensor.name).await?;
    let bytes = staging
        .get_mapped_range(..)
        .map_err(|e| GpuError::Map {
            tensor: tensor.name.clone(),
            msg: e.to_string(),
        })?
        .to_vec();
    staging.unmap();
    Ok(bytes)
}

/// Maps `buffer` for reading and waits for it (natively by polling the device, on the web by
/// awaiting the browser).
pub(crate) async fn map_read(
    device: &wgpu::Device,
    buffer: &wgpu::Buffer,
    name: &str,
) -> Result<(), GpuError> {
    map_read_after(device, buffer, name, None).await
}

/// As [`map_read`], but natively waits only for the submission `after` (the one that wrote the
/// buffer), not for every submission since: later ones keep the GPU busy meanwhile.
pub(crate) async fn map_read_after(
    device: &wgpu::Device,
    buffer: &wgpu::Buffer,
    name: &str,
    after: Option<wgpu::SubmissionIndex>,
) -> Result<(), GpuError> {
    type Slot = Arc<Mutex<(Option<Result<(), wgpu::BufferAsyncError>>, Option<Waker>)>>;
    let slot: Slot = Arc::default();
    let done = slot.clone();
    buffer.map_async(wgpu::MapMode::Read, .., move |result| {
        let mut s = done.lock().unwrap_or_else(|p| p.into_inner());
        s.0 = Some(result);
        if let Some(w) = s.1.take() {
            w.wake();
        }
    });
    #[cfg(not(target_arch = "wasm32"))]
    device
        .poll(wgpu::PollType::Wait {
            submission_index: after,
            timeout: None,
        })
        .map_err(|e| GpuError::Map {
            tensor: name.to_string(),
            msg: e.to_string(),
        })?;
    #[cfg(target_arch = "wasm32")]
    let _ = (device, after);
    let result = poll_fn(|cx| {
        let mut s = slot.lock().unwrap_or_else(|p| p.into_inner());
        match s.0.take() {
            Some(r) => Poll::Ready(r),
            None => {
                s.1 = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    })
    .await;
    result.map_err(|e| GpuError::Map {
        tensor: name.to_string(),
        msg: e.to_string(),
    })
}

/// Reads an F32 tensor.
pub async fn read_f32(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    t: &GpuTensor,
) -> Result<Vec<f32>, GpuError> {
    expect_dtype("read_f32", t, DType::F32)?;
    let bytes = read_bytes(device, queue, t).await?;
    let mut v: Vec<f32> = bytemuck::pod_collect_to_vec(&bytes);
    v.truncate(t.numel());
    Ok(v)
}

/// Reads an I8x4 tensor back as int8 codes (R, K) row-major.
pub async fn read_i8(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    t: &GpuTensor,
) -> Result<Vec<i8>, GpuError> {
    expect_dtype("read_i8", t, DType::I8x4)?;
    let bytes = read_bytes(device, queue, t).await?;
    let k = *t.shape.last().unwrap_or(&1);
    let k4 = k.div_ceil(4);
    let rows = t.numel().checked_div(k).unwrap_or(0);
    let mut out = Vec::with_capacity(t.numel());
    for r in 0..rows {
        out.extend(bytes[r * k4 * 4..r * k4 * 4 + k].iter().map(|&b| b as i8));
    }
    Ok(out)
}

fn expect_dtype(op: &'static str, t: &GpuTensor, dtype: DType) -> Result<(), GpuError> {
    if t.dtype != dtype {
        return Err(GpuError::Shape {
            op,
            msg: format!("`{}` is {:?}, expected {dtype:?}", t.name, t.dtype),
        });
    }
    Ok(())
}

/// Conveniences on [`Gpu`] for tests and tools.
impl Gpu {
    pub fn upload_f32(
        &self,
        name: &str,
        shape: &[usize],
        data: &[f32],
    ) -> Result<GpuTensor, GpuError> {
        GpuTensor::f32(&self.device, name, shape, data)
    }

    pub fn zeros(&self, name: &str, shape: &[usize], dtype: DType) -> Result<GpuTensor, GpuError> {
        GpuTensor::zeros(&self.device, name, shape, dtype)
    }

    pub async fn read_f32(&self, t: &GpuTensor) -> Result<Vec<f32>, GpuError> {
        read_f32(&self.device, &self.queue, t).await
    }

    pub async fn read_i8(&self, t: &GpuTensor) -> Result<Vec<i8>, GpuError> {
        read_i8(&self.device, &self.queue, t).await
    }
}
