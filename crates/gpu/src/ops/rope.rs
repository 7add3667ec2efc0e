//! Launcher for `shaders/rope.wgsl`.

use std::ops::Range;

use crate::GpuError;
use crate::record::{Kernel, Recorder, at_least, expect, rows};
use crate::tensor::{DType, GpuTensor};

pub const SOURCE: &str = include_str!("../../../../shaders/rope.wgsl");

/// RoPE in place (HF rotate_half) with tables from `bitlora_core::ops::rope_tables`.
///
/// Shapes: x (R, N*HS) f32 (read and written), cos (P, HS/2) f32, sin (P, HS/2) f32.
/// [`Rope::encode`] rotates every row, row t at position t (P >= R);
/// [`Rope::encode_rows`] rotates rows `a..b`, row a at position `pos0` (P >= pos0 + b - a).
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

    /// Every row of x (T, N*HS), token t at position t.
    pub fn encode(
        &self,
        rec: &mut Recorder,
        x: &GpuTensor,
        cos: &GpuTensor,
        sin: &GpuTensor,
    ) -> Result<(), GpuError> {
        let t = rows("rope", x, DType::F32, self.n_heads * self.hs)?;
        self.encode_rows(rec, x, 0..t, 0, cos, sin)
    }

    /// Rows `rows` of x, the first at position `pos0`.
    pub fn encode_rows(
        &self,
        rec: &mut Recorder,
        x: &GpuTensor,
        rows: Range<usize>,
        pos0: usize,
        cos: &GpuTensor,
        sin: &GpuTensor,
    ) -> Result<(), GpuError> {
        const OP: &str = "rope";
        let half = self.hs / 2;
        let t = rows.len();
        at_least(OP, x, DType::F32, rows.end, self.n_heads * self.hs)?;
        let p = at_least(OP, cos, DType::F32, 1, half)?;
        expect(OP, sin, DType::F32, &[p, half])?;
        if t == 0 || p < pos0 + t {
            return Err(GpuError::Shape {
                op: OP,
                msg: format!(
                    "rows {rows:?} at positions {pos0}..{}: RoPE tables cover {p} positions",
                    pos0 + t
                ),
            });
        }
        let dims = rec.dims(OP, &[t, rows.start, pos0])?;
        rec.dispatch(
            &self.kernel,
            &[&dims, &x.buffer, &cos.buffer, &sin.buffer],
            [(self.n_heads * half).div_ceil(super::WG), t, 1],
        )
    }
}
