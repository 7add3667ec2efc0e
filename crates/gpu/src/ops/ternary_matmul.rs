//! Launcher for `shaders/ternary_matmul.wgsl`.

use crate::GpuError;
use crate::record::{Kernel, Recorder, at_least, expect, rows};
use crate::tensor::{DType, GpuTensor};

pub const SOURCE: &str = include_str!("../../../../shaders/ternary_matmul.wgsl");

/// Tokens per invocation (the shader's `TT`).
const TT: usize = 4;

/// BitLinear on packed ternary weights: `y = (x_q . W^T) / (s_a * s_w)`, the product exact in
/// i32. With s_a = 1 and s_w = 1 the output is the integer accumulator itself (exact in f32
/// while |acc| < 2^24, i.e. I < 131072), which is how the tests check it bit for bit.
///
/// Shapes: x_q (T, I) int8 ([`DType::I8x4`]), s_a (T) f32, W (O, I) ([`DType::Ternary`],
/// transformers' packed layout), s_w (1) f32, y (T, O) f32; or, with
/// [`TernaryMatmul::encode_at`], y (R, O) written at rows `y_row0 .. y_row0 + T` (the k and v
/// projections write into the KV cache).
#[derive(Clone, Debug)]
pub struct TernaryMatmul {
    kernel: Kernel,
    i: usize,
    o: usize,
}

impl TernaryMatmul {
    /// `i` in features, `o` out features (any sizes; O need not be a multiple of 4).
    pub fn new(device: &wgpu::Device, i: usize, o: usize) -> TernaryMatmul {
        let kernel = Kernel::new(
            device,
            "ternary_matmul",
            SOURCE,
            &[
                ("I", super::c(i)),
                ("O", super::c(o)),
                ("WG", super::c(super::WG)),
            ],
        );
        TernaryMatmul { kernel, i, o }
    }

    pub fn encode(
        &self,
        rec: &mut Recorder,
        xq: &GpuTensor,
        sa: &GpuTensor,
        w: &GpuTensor,
        sw: &GpuTensor,
        y: &GpuTensor,
    ) -> Result<(), GpuError> {
        let t = rows("ternary_matmul", xq, DType::I8x4, self.i)?;
        expect("ternary_matmul", y, DType::F32, &[t, self.o])?;
        self.encode_at(rec, xq, sa, w, sw, y, 0)
    }

    /// As [`TernaryMatmul::encode`], writing rows `y_row0 .. y_row0 + T` of a taller y.
    #[allow(clippy::too_many_arguments)]
    pub fn encode_at(
        &self,
        rec: &mut Recorder,
        xq: &GpuTensor,
        sa: &GpuTensor,
        w: &GpuTensor,
        sw: &GpuTensor,
        y: &GpuTensor,
        y_row0: usize,
    ) -> Result<(), GpuError> {
        const OP: &str = "ternary_matmul";
        let t = rows(OP, xq, DType::I8x4, self.i)?;
        expect(OP, sa, DType::F32, &[t])?;
        expect(OP, w, DType::Ternary, &[self.o, self.i])?;
        expect(OP, sw, DType::F32, &[1])?;
        at_least(OP, y, DType::F32, y_row0 + t, self.o)?;
        let dims = rec.dims(OP, &[t, y_row0])?;
        rec.dispatch(
            &self.kernel,
            &[
                &dims, &xq.buffer, &sa.buffer, &w.buffer, &sw.buffer, &y.buffer,
            ],
            [self.o.div_ceil(4).div_ceil(super::WG), t.div_ceil(TT), 1],
        )
    }
}
