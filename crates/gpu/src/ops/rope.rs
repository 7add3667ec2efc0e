//! Launcher for `shaders/rope.wgsl`.

use crate::GpuError;
use crate::record::{Kernel, Recorder, expect, rows};
use crate::tensor::{DType, GpuTensor};

pub const SOURCE: &str = include_str!("../../../../shaders/rope.wgsl");

/// RoPE in place (HF rotate_half), token t at position t, with tables from
/// `bitlora_core::ops::rope_tables`.
///
/// Shapes: x (T, N*HS) f32 (read and written), cos (P, HS/2) f32, sin (P, HS/2) f32, P >= T.
#[derive(Clone, Debug)]
pub struct Rope {
    kernel: Kernel,
    n_heads: usize,
    hs: usize,
}

impl Rope {
    /// `n_heads` heads of size `hs` (even) per row.
    pub fn new(device: &wgpu::Device, n_heads: usize, hs: usize) -> Rope {
        let kernel = Kernel::new(
            device,
            "rope",
            SOURCE,
            &[
                ("NHEADS", super::c(n_heads)),
                ("HS", super::c(hs)),
                ("WG", super::c(super::WG)),
            ],
        );
        Rope {
            kernel,
            n_heads,
            hs,
        }
    }

    pub fn encode(
        &self,
        rec: &mut Recorder,
        x: &GpuTensor,
        cos: &GpuTensor,
        sin: &GpuTensor,
    ) -> Result<(), GpuError> {
        const OP: &str = "rope";
        let half = self.hs / 2;
        let t = rows(OP, x, DType::F32, self.n_heads * self.hs)?;
        let p = rows(OP, cos, DType::F32, half)?;
        expect(OP, sin, DType::F32, &[p, half])?;
        if p < t {
            return Err(GpuError::Shape {
                op: OP,
                msg: format!("RoPE tables cover {p} positions, fewer than T = {t}"),
            });
        }
        rec.dispatch(
            &self.kernel,
            &[&x.buffer, &cos.buffer, &sin.buffer],
            [(self.n_heads * half).div_ceil(super::WG), t, 1],
        )
    }
}
