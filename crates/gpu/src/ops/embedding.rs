//! Launcher for `shaders/embedding.wgsl`.

use crate::GpuError;
use crate::record::{Kernel, Recorder, expect};
use crate::tensor::{DType, GpuTensor};

pub const SOURCE: &str = include_str!("../../../../shaders/embedding.wgsl");

/// Embedding gather `out[t] = table[tokens[t]]`.
///
/// Shapes: tokens (T) u32, table (V, C) f32, out (T, C) f32. Token ids must be < V (the
/// model checks them before a forward pass).
#[derive(Clone, Debug)]
pub struct Embedding {
    kernel: Kernel,
    c: usize,
}

impl Embedding {
    pub fn new(device: &wgpu::Device, c: usize) -> Embedding {
        let kernel = Kernel::new(
            device,
            "embedding",
            SOURCE,
            &[("C", super::c(c)), ("WG", super::c(super::WG))],
        );
        Embedding { kernel, c }
    }

    pub fn encode(
        &self,
        rec: &mut Recorder,
        tokens: &GpuTensor,
        table: &GpuTensor,
        out: &GpuTensor,
    ) -> Result<(), GpuError> {
        const OP: &str = "embedding";
        let t = tokens.shape.first().copied().unwrap_or(0);
        expect(OP, tokens, DType::U32, &[t])?;
        let v = table.shape.first().copied().unwrap_or(0);
        expect(OP, table, DType::F32, &[v, self.c])?;
        expect(OP, out, DType::F32, &[t, self.c])?;
        rec.dispatch(
            &self.kernel,
            &[&tokens.buffer, &table.buffer, &out.buffer],
            [self.c.div_ceil(super::WG), t, 1],
        )
    }
}
