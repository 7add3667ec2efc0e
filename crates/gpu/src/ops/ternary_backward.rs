//! Launcher for `shaders/ternary_backward.wgsl`.

use crate::GpuError;
use crate::record::{Kernel, Recorder, expect, rows};
use crate::tensor::{DType, GpuTensor};

pub const SOURCE: &str = include_str!("../../../../shaders/ternary_backward.wgsl");

/// BitLinear backward to the input, straight-through on the activation quantizer:
/// `dx = dy . W / s_w` from the forward's packed ternary weight (the transposed product).
///
/// Shapes: dy (T, O) f32, W (O, I) [`DType::Ternary`], s_w (1) f32, dx (T, I) f32 (written).
#[derive(Clone, Debug)]
pub struct TernaryBackward {
    kernel: Kernel,
    i: usize,
    o: usize,
}

impl TernaryBackward {
    pub fn new(device: &wgpu::Device, i: usize, o: usize) -> TernaryBackward {
        let kernel = Kernel::new(
            device,
            "ternary_backward",
            SOURCE,
            &[
                ("I", super::c(i)),
                ("O", super::c(o)),
                ("WG", super::c(super::WG)),
            ],
        );
        TernaryBackward { kernel, i, o }
    }

    pub fn encode(
        &self,
        rec: &mut Recorder,
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
        rec.dispatch(
            &self.kernel,
            &[&dy.buffer, &w.buffer, &sw.buffer, &dx.buffer],
            [self.i.div_ceil(super::WG), t, 1],
        )
    }
}
