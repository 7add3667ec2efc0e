//! Launcher for `shaders/cross_entropy.wgsl`.

use crate::GpuError;
use crate::record::{Kernel, Recorder, expect, rows};
use crate::tensor::{DType, GpuTensor};

pub const SOURCE: &str = include_str!("../../../../shaders/cross_entropy.wgsl");

/// The target id of a row that does not count (loss 0, dlogits 0).
pub const MASKED: u32 = u32::MAX;

/// Cross-entropy forward + backward over the vocabulary, one row per workgroup: per-row loss
/// `lse - l_y`, and the logits overwritten in place with `(softmax - onehot) * weight`
/// (weight = grad_scale / counted targets). Rows with target [`MASKED`] give 0 and 0. For a
/// large vocabulary the caller runs the head and this op on windows of rows (a (T, V) buffer
/// of a few rows), as the CPU goes one row at a time.
///
/// Shapes: logits (T, V) f32 (read, then written with dlogits), targets (T) u32,
/// loss (T) f32 (written).
#[derive(Clone, Debug)]
pub struct CrossEntropy {
    kernel: Kernel,
    v: usize,
}

impl CrossEntropy {
    pub fn new(device: &wgpu::Device, v: usize) -> CrossEntropy {
        let kernel = Kernel::new(
            device,
            "cross_entropy",
            SOURCE,
            &[("V", super::c(v)), ("WG", super::c(super::WG))],
        );
        CrossEntropy { kernel, v }
    }

    pub fn encode(
        &self,
        rec: &mut Recorder,
        logits: &GpuTensor,
        targets: &GpuTensor,
        weight: f32,
        loss: &GpuTensor,
    ) -> Result<(), GpuError> {
        const OP: &str = "cross_entropy";
        let t = rows(OP, logits, DType::F32, self.v)?;
        expect(OP, targets, DType::U32, &[t])?;
        expect(OP, loss, DType::F32, &[t])?;
        let dims = rec.uniform([weight.to_bits(), 0, 0, 0]);
        rec.dispatch(
            &self.kernel,
            &[&dims, &logits.buffer, &targets.buffer, &loss.buffer],
            [t, 1, 1],
        )
    }
}
