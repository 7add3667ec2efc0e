//! Launcher for `shaders/adamw.wgsl`.

pub use bitlora_core::optim::AdamWScalars;

use crate::GpuError;
use crate::record::{Kernel, Recorder};
use crate::tensor::{DType, GpuTensor};

pub const SOURCE: &str = include_str!("../../../../shaders/adamw.wgsl");

/// One AdamW step (PyTorch semantics) on one tensor of N parameters, in place: the gradient
/// is scaled by the clipping factor (and written back), then p, m and v are updated.
///
/// Shapes: p, g, m, v: the same shape, N elements, f32 (all read and written).
#[derive(Clone, Debug)]
pub struct AdamWStep {
    kernel: Kernel,
}

impl AdamWStep {
    pub fn new(device: &wgpu::Device) -> AdamWStep {
        let kernel = Kernel::new(device, "adamw", SOURCE, &[("WG", super::c(super::WG))]);
        AdamWStep { kernel }
    }

    pub fn encode(
        &self,
        rec: &mut Recorder,
        s: &AdamWScalars,
        p: &GpuTensor,
        g: &GpuTensor,
        m: &GpuTensor,
        v: &GpuTensor,
    ) -> Result<(), GpuError> {
        const OP: &str = "adamw";
        for x in [p, g, m, v] {
            if x.dtype != DType::F32 || x.shape != p.shape {
                return Err(GpuError::Shape {
                    op: OP,
                    msg: format!(
                        "`{}` is {:?} {:?}, expected F32 {:?} as `{}`",
                        x.name, x.dtype, x.shape, p.shape, p.name
                    ),
                });
            }
        }
        let n = p.numel();
        let n32 = u32::try_from(n).map_err(|_| GpuError::Shape {
            op: OP,
            msg: format!("{n} elements do not fit a u32"),
        })?;
        let gx = n.div_ceil(super::WG).clamp(1, rec.max_groups());
        let row = gx * super::WG;
        let gy = n.div_ceil(row);
        let params = rec.uniform_words(&[
            n32,
            row as u32,
            s.lr.to_bits(),
            s.beta1.to_bits(),
            s.beta2.to_bits(),
            s.eps.to_bits(),
            s.weight_decay.to_bits(),
            s.step_size.to_bits(),
            s.bc2_sqrt.to_bits(),
            s.coef.to_bits(),
        ]);
        rec.dispatch(
            &self.kernel,
            &[&params, &p.buffer, &g.buffer, &m.buffer, &v.buffer],
            [gx, gy, 1],
        )
    }
}
