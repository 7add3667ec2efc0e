//! Launcher for `shaders/argmax.wgsl`.

use crate::GpuError;
use crate::record::{Kernel, Recorder, expect};
use crate::tensor::{DType, GpuTensor};

pub const SOURCE: &str = include_str!("../../../../shaders/argmax.wgsl");

/// Greedy sampling on the GPU: `next[0] = argmax(logits)` (lowest index on ties, NaN never
/// chosen), as `bitlora_core::generate::argmax`.
///
/// Shapes: logits (1, V) or (V) f32, next (N >= 1) u32.
#[derive(Clone, Debug)]
pub struct Argmax {
    kernel: Kernel,
    v: usize,
}

impl Argmax {
    pub fn new(device: &wgpu::Device, v: usize) -> Argmax {
        let kernel = Kernel::new(device, "argmax", SOURCE, &[("V", super::c(v))]);
        Argmax { kernel, v }
    }

    pub fn encode(
        &self,
        rec: &mut Recorder,
        logits: &GpuTensor,
        next: &GpuTensor,
    ) -> Result<(), GpuError> {
        const OP: &str = "argmax";
        if logits.dtype != DType::F32 || logits.shape.iter().product::<usize>() != self.v {
            expect(OP, logits, DType::F32, &[1, self.v])?;
        }
        if next.dtype != DType::U32 || next.shape.iter().product::<usize>() == 0 {
            expect(OP, next, DType::U32, &[1])?;
        }
        rec.dispatch(&self.kernel, &[&logits.buffer, &next.buffer], [1, 1, 1])
    }
}
