//! Launcher for `shaders/embedding.wgsl`.

use crate::GpuError;
use crate::record::{Kernel, Recorder, expect};
use crate::tensor::{DType, GpuTensor, SplitTensor};

pub const SOURCE: &str = include_str!("../../../../shaders/embedding.wgsl");

/// Embedding gather `out[t] = table[tokens[t]]`.
///
/// Shapes: tokens (T) u32, table (V, C) f32 (or bf16: [`Embedding::with_bf16`]), out (T, C)
/// f32. Token ids must be < V (the model checks them before a forward pass). A table split along V ([`SplitTensor`]) takes one
/// dispatch per chunk (VC, C); each writes the tokens whose ids fall in its rows.
#[derive(Clone, Debug)]
pub struct Embedding {
    kernel: Kernel,
    c: usize,
    /// The table's element type: F32 or Bf16.
    table: DType,
}

impl Embedding {
    /// For an f32 table.
    pub fn new(device: &wgpu::Device, c: usize) -> Embedding {
        Self::with_bf16(device, c, false)
    }

    /// For a [`DType::Bf16`] table with `bf16`, else an f32 one. The rows gathered are the
    /// same f32 either way (bf16 widens exactly).
    pub fn with_bf16(device: &wgpu::Device, c: usize, bf16: bool) -> Embedding {
        let kernel = Kernel::new(
            device,
            "embedding",
            SOURCE,
            &[
                ("C", super::c(c)),
                ("WG", super::c(super::WG)),
                ("BF16", f64::from(u8::from(bf16))),
            ],
        );
        let table = if bf16 { DType::Bf16 } else { DType::F32 };
        Embedding { kernel, c, table }
    }

    /// The whole table in one binding.
    pub fn encode(
        &self,
        rec: &mut Recorder,
        tokens: &GpuTensor,
        table: &GpuTensor,
        out: &GpuTensor,
    ) -> Result<(), GpuError> {
        self.encode_chunk(rec, tokens, table, 0, out)
    }

    /// Every chunk of a table split along V.
    pub fn encode_split(
        &self,
        rec: &mut Recorder,
        tokens: &GpuTensor,
        table: &SplitTensor,
        out: &GpuTensor,
    ) -> Result<(), GpuError> {
        if table.cols != self.c {
            return Err(GpuError::Shape {
                op: "embedding",
                msg: format!(
                    "`{}` has {} columns, expected C = {}",
                    table.name, table.cols, self.c
                ),
            });
        }
        for (row0, chunk) in &table.chunks {
            self.encode_chunk(rec, tokens, chunk, *row0, out)?;
        }
        Ok(())
    }

    /// One chunk (VC, C): rows `row0 .. row0 + VC` of the table.
    pub fn encode_chunk(
        &self,
        rec: &mut Recorder,
        tokens: &GpuTensor,
        chunk: &GpuTensor,
        row0: usize,
        out: &GpuTensor,
    ) -> Result<(), GpuError> {
        const OP: &str = "embedding";
        let t = tokens.shape.first().copied().unwrap_or(0);
        expect(OP, tokens, DType::U32, &[t])?;
        let vc = chunk.shape.first().copied().unwrap_or(0);
        expect(OP, chunk, self.table, &[vc, self.c])?;
        expect(OP, out, DType::F32, &[t, self.c])?;
        let dims = rec.dims(OP, &[t, row0, vc])?;
        rec.dispatch(
            &self.kernel,
            &[&dims, &tokens.buffer, &chunk.buffer, &out.buffer],
            [self.c.div_ceil(super::WG), t, 1],
        )
    }
}
