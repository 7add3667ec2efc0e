//! Launcher for `shaders/adamw.wgsl`.

use bitlora_core::optim::AdamWConfig;

use crate::GpuError;
use crate::record::{Kernel, Recorder};
use crate::tensor::{DType, GpuTensor};

pub const SOURCE: &str = include_str!("../../../../shaders/adamw.wgsl");

/// The scalars of one AdamW step, computed on the CPU exactly as
/// `bitlora_core::optim::AdamW::step` does (bias corrections in f64).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWScalars {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// lr / (1 - beta1^t)
    pub step_size: f32,
    /// sqrt(1 - beta2^t)
    pub bc2_sqrt: f32,
    /// Clipping factor on the gradients (1: none), `max / (norm + 1e-6)` when below 1.
    pub coef: f32,
}

impl AdamWScalars {
    /// For optimizer step `step` (0-based: the number of steps taken before this one) with
    /// global gradient norm `grad_norm` (before clipping).
    pub fn new(config: &AdamWConfig, step: usize, grad_norm: f32) -> AdamWScalars {
        let coef = match config.max_grad_norm {
            Some(max) => (max / (grad_norm + 1e-6)).min(1.0),
            None => 1.0,
        };
        let lr = config.lr_at(step);
        let t = (step + 1) as i32;
        let bc1 = 1.0 - (config.beta1 as f64).powi(t);
        let bc2 = 1.0 - (config.beta2 as f64).powi(t);
        AdamWScalars {
            lr,
            beta1: config.beta1,
            beta2: config.beta2,
            eps: config.eps,
            weight_decay: config.weight_decay,
            step_size: (lr as f64 / bc1) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
            coef,
        }
    }
}

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
