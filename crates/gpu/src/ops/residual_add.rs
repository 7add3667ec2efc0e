//! Launcher for `shaders/residual_add.wgsl`.

use crate::GpuError;
use crate::record::{Kernel, Recorder, expect, rows};
use crate::tensor::{DType, GpuTensor};

pub const SOURCE: &str = include_str!("../../../../shaders/residual_add.wgsl");

/// The residual update `h += b`.
///
/// Shapes: h (T, C) f32 (read and written), b (T, C) f32.
#[derive(Clone, Debug)]
pub struct ResidualAdd {
    kernel: Kernel,
    c: usize,
}

impl ResidualAdd {
    pub fn new(device: &wgpu::Device, c: usize) -> ResidualAdd {
        let kernel = Kernel::new(
            device,
            "residual_add",
            SOURCE,
            &[("C", super::c(c)), ("WG", super::c(super::WG))],
        );
        ResidualAdd { kernel, c }
    }

    pub fn encode(&self, rec: &mut Recorder, h: &GpuTensor, b: &GpuTensor) -> Result<(), GpuError> {
        const OP: &str = "residual_add";
        let t = rows(OP, h, DType::F32, self.c)?;
        expect(OP, b, DType::F32, &[t, self.c])?;
        rec.dispatch(
            &self.kernel,
            &[&h.buffer, &b.buffer],
            [self.c.div_ceil(super::WG), t, 1],
        )
    }
}
