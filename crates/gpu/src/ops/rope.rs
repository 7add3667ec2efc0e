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

/// RoPE on the queries and the keys of one pass in a single dispatch (`main_pair` of
/// `shaders/rope.wgsl`): each element gets [`Rope`]'s arithmetic, so the results are the two
/// [`Rope::encode_rows`] calls' bit for bit.
///
/// Shapes: q (R_Q, NH*HS) and k (R_K, NKV*HS) f32 (read and written), cos and sin (P, HS/2).
#[derive(Clone, Debug)]
pub struct RopePair {
    kernel: Kernel,
    nh: usize,
    nkv: usize,
    hs: usize,
}

impl RopePair {
    /// `nh` query heads and `nkv` key heads of size `hs` (even) per row.
    pub fn new(device: &wgpu::Device, nh: usize, nkv: usize, hs: usize) -> RopePair {
        let kernel = Kernel::entry(
            device,
            "rope",
            SOURCE,
            "main_pair",
            &[
                ("NHEADS", super::c(nh)),
                ("NHEADS_K", super::c(nkv)),
                ("HS", super::c(hs)),
                ("WG", super::c(super::WG)),
            ],
        );
        RopePair {
            kernel,
            nh,
            nkv,
            hs,
        }
    }

    /// Rows `q_rows` of q and `k_rows` of k (as many), the first of each at position `pos0`.
    #[allow(clippy::too_many_arguments)]
    pub fn encode_rows(
        &self,
        rec: &mut Recorder,
        q: &GpuTensor,
        q_rows: Range<usize>,
        k: &GpuTensor,
        k_rows: Range<usize>,
        pos0: usize,
        cos: &GpuTensor,
        sin: &GpuTensor,
    ) -> Result<(), GpuError> {
        const OP: &str = "rope";
        let half = self.hs / 2;
        let t = q_rows.len();
        at_least(OP, q, DType::F32, q_rows.end, self.nh * self.hs)?;
        at_least(OP, k, DType::F32, k_rows.end, self.nkv * self.hs)?;
        let p = at_least(OP, cos, DType::F32, 1, half)?;
        expect(OP, sin, DType::F32, &[p, half])?;
        if t == 0 || k_rows.len() != t || p < pos0 + t {
            return Err(GpuError::Shape {
                op: OP,
                msg: format!(
                    "query rows {q_rows:?} and key rows {k_rows:?} at positions {pos0}..{}: \
                     need as many of each, and RoPE tables cover {p} positions",
                    pos0 + t
                ),
            });
        }
        let dims = rec.dims(OP, &[t, q_rows.start, pos0, k_rows.start])?;
        rec.dispatch(
            &self.kernel,
            &[&dims, &q.buffer, &cos.buffer, &sin.buffer, &k.buffer],
            [((self.nh + self.nkv) * half).div_ceil(super::WG), t, 1],
        )
    }
}
