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
/// loss (T) f32 (written); with [`CrossEntropy::encode_rows`] the logits are a window of rows
/// row0 .. row0+T of a longer sequence, whose targets (R) and losses (R) have R >= row0 + T.
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
        self.encode_rows(rec, logits, targets, 0, weight, loss)
    }

    /// The logits (T, V) of rows `row0 .. row0 + T` of a sequence: reads `targets[row0..]`,
    /// writes `loss[row0..]`.
    pub fn encode_rows(
        &self,
        rec: &mut Recorder,
        logits: &GpuTensor,
        targets: &GpuTensor,
        row0: usize,
        weight: f32,
        loss: &GpuTensor,
    ) -> Result<(), GpuError> {
        const OP: &str = "cross_entropy";
        let t = rows(OP, logits, DType::F32, self.v)?;
        let window = |x: &GpuTensor, dtype: DType| match x.shape[..] {
            [r] if x.dtype == dtype && r >= row0 + t => Ok(()),
            _ => Err(GpuError::Shape {
                op: OP,
                msg: format!(
                    "`{}` is {:?} {:?}, expected {dtype:?} (R) with R >= {}",
                    x.name,
                    x.dtype,
                    x.shape,
                    row0 + t
                ),
            }),
        };
        window(targets, DType::U32)?;
        window(loss, DType::F32)?;
        let row0 = u32::try_from(row0).map_err(|_| GpuError::Shape {
            op: OP,
            msg: format!("row {row0} does not fit a u32"),
        })?;
        let dims = rec.uniform([weight.to_bits(), row0, 0, 0]);
        rec.dispatch(
            &self.kernel,
            &[&dims, &logits.buffer, &targets.buffer, &loss.buffer],
            [t, 1, 1],
        )
    }
}
