//! Launcher for `shaders/rms_norm.wgsl`.

use crate::GpuError;
use crate::record::{Kernel, Recorder, expect, rows};
use crate::tensor::{DType, GpuTensor};

pub const SOURCE: &str = include_str!("../../../../shaders/rms_norm.wgsl");

/// RMSNorm `y = w * x / sqrt(mean(x^2) + eps)` over rows, alone ([`RmsNorm::encode`]) or fused
/// with the int8 activation quantization of y ([`RmsNorm::encode_quant`], equal to
/// [`crate::ops::ActQuant`] on y bit for bit).
///
/// Shapes: x (T, C) f32, w (C) f32, y (T, C) f32; fused also xq (T, C) i8x4, s_a (T) f32.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    kernel: Kernel,
    quant: Kernel,
    c: usize,
}

impl RmsNorm {
    pub fn new(device: &wgpu::Device, c: usize, eps: f32) -> RmsNorm {
        let constants = [("C", super::c(c)), ("EPS", eps as f64)];
        let kernel = Kernel::new(device, "rms_norm", SOURCE, &constants);
        let quant = Kernel::entry(device, "rms_norm_quant", SOURCE, "main_quant", &constants);
        RmsNorm { kernel, quant, c }
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

    /// y = RMSNorm(x), and y's int8 codes and per-row scale as `ActQuant` writes them.
    pub fn encode_quant(
        &self,
        rec: &mut Recorder,
        x: &GpuTensor,
        w: &GpuTensor,
        y: &GpuTensor,
        xq: &GpuTensor,
        s_a: &GpuTensor,
    ) -> Result<(), GpuError> {
        const OP: &str = "rms_norm_quant";
        let t = rows(OP, x, DType::F32, self.c)?;
        expect(OP, w, DType::F32, &[self.c])?;
        expect(OP, y, DType::F32, &[t, self.c])?;
        expect(OP, xq, DType::I8x4, &[t, self.c])?;
        expect(OP, s_a, DType::F32, &[t])?;
        let buffers = [&x.buffer, &w.buffer, &y.buffer, &xq.buffer, &s_a.buffer];
        rec.dispatch(&self.quant, &buffers, [t, 1, 1])
    }
}
