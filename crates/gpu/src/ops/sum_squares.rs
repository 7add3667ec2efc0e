//! Launcher for `shaders/sum_squares.wgsl`.

use crate::GpuError;
use crate::record::{Kernel, Recorder};
use crate::tensor::{DType, GpuTensor};

pub const SOURCE: &str = include_str!("../../../../shaders/sum_squares.wgsl");

/// Invocations per workgroup, and workgroups of the first pass (partial sums).
const WG: usize = 256;

/// The sum of squares of a tensor's values in a fixed order (the squared global gradient
/// norm), in two dispatches: per-workgroup partial sums, then their total.
///
/// Shapes: x any shape, f32 (read); partials (256) f32 scratch; out (>= 1) f32: out[0] is
/// the sum.
#[derive(Clone, Debug)]
pub struct SumSquares {
    kernel: Kernel,
}

impl SumSquares {
    /// Partial sums of the first pass (the `partials` tensor's length).
    pub const PARTIALS: usize = WG;

    pub fn new(device: &wgpu::Device) -> SumSquares {
        let kernel = Kernel::new(device, "sum_squares", SOURCE, &[("WG", super::c(WG))]);
        SumSquares { kernel }
    }

    pub fn encode(
        &self,
        rec: &mut Recorder,
        x: &GpuTensor,
        partials: &GpuTensor,
        out: &GpuTensor,
    ) -> Result<(), GpuError> {
        const OP: &str = "sum_squares";
        for (t, min) in [(x, 0), (partials, WG), (out, 1)] {
            if t.dtype != DType::F32 || t.numel() < min {
                return Err(GpuError::Shape {
                    op: OP,
                    msg: format!(
                        "`{}` is {:?} {:?}, expected F32 of at least {min} values",
                        t.name, t.dtype, t.shape
                    ),
                });
            }
        }
        let n = u32::try_from(x.numel()).map_err(|_| GpuError::Shape {
            op: OP,
            msg: format!("{} values do not fit a u32", x.numel()),
        })?;
        let stride = (WG * WG) as u32;
        let first = rec.uniform_words(&[n, 1, stride, 0]);
        rec.dispatch(
            &self.kernel,
            &[&first, &x.buffer, &partials.buffer],
            [WG, 1, 1],
        )?;
        let second = rec.uniform_words(&[WG as u32, 0, WG as u32, 0]);
        rec.dispatch(
            &self.kernel,
            &[&second, &partials.buffer, &out.buffer],
            [1, 1, 1],
        )
    }
}
