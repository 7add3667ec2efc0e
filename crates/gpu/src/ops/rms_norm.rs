//! Launcher for `shaders/rms_norm.wgsl`.

use crate::GpuError;
use crate::record::{Kernel, Recorder, expect, rows};
use crate::tensor::{DType, GpuTensor};

pub const SOURCE: &str = include_str!("../../../../shaders/rms_norm.wgsl");

/// RMSNorm `y = w * x / sqrt(mean(x^2) + eps)` over rows.
///
/// Shapes: x (T, C) f32, w (C) f32, y (T, C) f32.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    kernel: Kernel,
    c: usize,
}

impl RmsNorm {
    pub fn new(device: &wgpu::Device, c: usize, eps: f32) -> RmsNorm {
        let kernel = Kernel::new(
            device,
            "rms_norm",
            SOURCE,
            &[("C", super::c(c)), ("EPS", eps as f64)],
        );
        RmsNorm { kernel, c }
    }

    pub fn encode(
        &self,
        rec: &mut Recorder,
        x: &GpuTensor,
        w: &GpuTensor,
        y: &GpuTensor,
    ) -> Result<(), GpuError> {
        const OP: &str = "rms_norm";
        let t = rows(OP, x, DType::F32, self.c)?;
        expect(OP, w, DType::F32, &[self.c])?;
        expect(OP, y, DType::F32, &[t, self.c])?;
        rec.dispatch(&self.kernel, &[&x.buffer, &w.buffer, &y.buffer], [t, 1, 1])
    }
}
