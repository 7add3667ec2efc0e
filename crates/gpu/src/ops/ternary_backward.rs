//! Launcher for `shaders/ternary_backward.wgsl`.

use crate::GpuError;
use crate::record::{Kernel, Recorder, expect, rows};
use crate::tensor::{DType, GpuTensor};

/// Tokens per invocation (the shader's `TT`).
const TT: usize = 4;

pub const SOURCE: &str = include_str!("../../../../shaders/ternary_backward.wgsl");

/// BitLinear backward to the input, straight-through on the activation quantizer:
/// `dx = dy . W / s_w` from the forward's packed ternary weight (the transposed product).
///
/// Shapes: dy (T, O) f32, W (O, I) [`DType::Ternary`], s_w (1) f32, dx (T, I) f32 (written by
/// [`TernaryBackward::encode`], added into by [`TernaryBackward::encode_add`]).
#[derive(Clone, Debug)]
pub struct TernaryBackward {
    kernel: Kernel,
    kernel_add: Kernel,
    i: usize,
    o: usize,
}

impl TernaryBackward {
    pub fn new(device: &wgpu::Device, i: usize, o: usize) -> TernaryBackward {
        let k = |acc: f64| {
            Kernel::new(
                device,
                "ternary_backward",
                SOURCE,
                &[
                    ("I", super::c(i)),
                    ("O", super::c(o)),
                    ("WG", super::c(super::WG)),
                    ("ACC", acc),
                ],
            )
        };
        TernaryBackward {
            kernel: k(0.0),
            kernel_add: k(1.0),
            i,
            o,
        }
    }

    /// dx = dy . W / s_w.
    pub fn encode(
        &self,
        rec: &mut Recorder,
        dy: &GpuTensor,
        w: &GpuTensor,
        sw: &GpuTensor,
        dx: &GpuTensor,
    ) -> Result<(), GpuError> {
        self.record(rec, &self.kernel, dy, w, sw, dx)
    }

    /// dx += dy . W / s_w.
    pub fn encode_add(
        &self,
        rec: &mut Recorder,
        dy: &GpuTensor,
        w: &GpuTensor,
        sw: &GpuTensor,
        dx: &GpuTensor,
    ) -> Result<(), GpuError> {
        self.record(rec, &self.kernel_add, dy, w, sw, dx)
    }

    fn record(
        &self,
        rec: &mut Recorder,
        kernel: &Kernel,
        dy: &GpuTensor,
        w: &GpuTensor,
        sw: &GpuTensor,
        dx: &GpuTensor,
    ) -> Result<(), GpuError> {
        const OP: &str = "ternary_backward";
        let t = rows(OP, dy, DType::F32, self.o)?;
        expect(OP, w, DType::Ternary, &[self.o, self.i])?;
        expect(OP, sw, DType::F32, &[1])?;
        expect(OP, dx, DType::F32, &[t, self.i])?;
        let dims = rec.dims(OP, &[t])?;
        rec.dispatch(
            kernel,
            &[&dims, &dy.buffer, &w.buffer, &sw.buffer, &dx.buffer],
            [self.i.div_ceil(4).div_ceil(super::WG), t.div_ceil(TT), 1],
        )
    }
}
