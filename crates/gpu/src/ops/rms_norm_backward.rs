//! Launcher for `shaders/rms_norm_backward.wgsl`.

use crate::GpuError;
use crate::record::{Kernel, Recorder, expect, rows};
use crate::tensor::{DType, GpuTensor};

pub const SOURCE: &str = include_str!("../../../../shaders/rms_norm_backward.wgsl");

/// RMSNorm backward with a frozen weight: dx from the norm's input x and dy.
///
/// Shapes: x (T, C) f32, w (C) f32, dy (T, C) f32, dx (T, C) f32 (written by
/// [`RmsNormBackward::encode`], added into by [`RmsNormBackward::encode_add`]).
#[derive(Clone, Debug)]
pub struct RmsNormBackward {
    kernel: Kernel,
    kernel_add: Kernel,
    c: usize,
}

impl RmsNormBackward {
    pub fn new(device: &wgpu::Device, c: usize, eps: f32) -> RmsNormBackward {
        let k = |acc: f64| {
            Kernel::new(
                device,
                "rms_norm_backward",
                SOURCE,
                &[
                    ("C", super::c(c)),
                    ("EPS", eps as f64),
                    ("WG", super::c(super::WG)),
                    ("ACC", acc),
                ],
            )
        };
        RmsNormBackward {
            kernel: k(0.0),
            kernel_add: k(1.0),
            c,
        }
    }

    /// dx = RMSNorm'(x)^T dy.
    pub fn encode(
        &self,
        rec: &mut Recorder,
        x: &GpuTensor,
        w: &GpuTensor,
        dy: &GpuTensor,
        dx: &GpuTensor,
    ) -> Result<(), GpuError> {
        self.record(rec, &self.kernel, x, w, dy, dx)
    }

    /// dx += RMSNorm'(x)^T dy (the residual stream's gradient).
    pub fn encode_add(
        &self,
        rec: &mut Recorder,
        x: &GpuTensor,
        w: &GpuTensor,
        dy: &GpuTensor,
        dx: &GpuTensor,
    ) -> Result<(), GpuError> {
        self.record(rec, &self.kernel_add, x, w, dy, dx)
    }

    fn record(
        &self,
        rec: &mut Recorder,
        kernel: &Kernel,
        x: &GpuTensor,
        w: &GpuTensor,
        dy: &GpuTensor,
        dx: &GpuTensor,
    ) -> Result<(), GpuError> {
        const OP: &str = "rms_norm_backward";
        let t = rows(OP, x, DType::F32, self.c)?;
        expect(OP, w, DType::F32, &[self.c])?;
        expect(OP, dy, DType::F32, &[t, self.c])?;
        expect(OP, dx, DType::F32, &[t, self.c])?;
        rec.dispatch(
            kernel,
            &[&x.buffer, &w.buffer, &dy.buffer, &dx.buffer],
            [t, 1, 1],
        )
    }
}
