//! Launcher for `shaders/rope_backward.wgsl`.

use crate::GpuError;
use crate::record::{Kernel, Recorder, at_least, expect, rows};
use crate::tensor::{DType, GpuTensor};

pub const SOURCE: &str = include_str!("../../../../shaders/rope_backward.wgsl");

/// RoPE backward (the transposed rotation) in place on dq or dk, row t at position t, with
/// the forward's tables from `bitlora_core::ops::rope_tables`.
///
/// Shapes: d (T, N*HS) f32 (read and written), cos (P, HS/2) f32, sin (P, HS/2) f32, P >= T.
#[derive(Clone, Debug)]
pub struct RopeBackward {
    kernel: Kernel,
    n_heads: usize,
    hs: usize,
}

impl RopeBackward {
    pub fn new(device: &wgpu::Device, n_heads: usize, hs: usize) -> RopeBackward {
        let kernel = Kernel::new(
            device,
            "rope_backward",
            SOURCE,
            &[
                ("NHEADS", super::c(n_heads)),
                ("HS", super::c(hs)),
                ("WG", super::c(super::WG)),
            ],
        );
        RopeBackward {
            kernel,
            n_heads,
            hs,
        }
    }

    pub fn encode(
        &self,
        rec: &mut Recorder,
        d: &GpuTensor,
        cos: &GpuTensor,
        sin: &GpuTensor,
    ) -> Result<(), GpuError> {
        const OP: &str = "rope_backward";
        let half = self.hs / 2;
        let t = rows(OP, d, DType::F32, self.n_heads * self.hs)?;
        let p = at_least(OP, cos, DType::F32, t, half)?;
        expect(OP, sin, DType::F32, &[p, half])?;
        rec.dispatch(
            &self.kernel,
            &[&d.buffer, &cos.buffer, &sin.buffer],
            [(self.n_heads * half).div_ceil(super::WG), t, 1],
        )
    }
}
