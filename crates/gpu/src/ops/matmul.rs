//! Launcher for `shaders/matmul.wgsl`.

use crate::GpuError;
use crate::record::{Kernel, Recorder, expect, rows};
use crate::tensor::{DType, GpuTensor};

pub const SOURCE: &str = include_str!("../../../../shaders/matmul.wgsl");

/// Output tile edge (the shader's `TILE`).
const TILE: usize = 16;

/// Dense f32 `y = x . W^T`: the language-model head (W is the embedding when tied).
///
/// Shapes: x (T, I) f32, W (O, I) f32, y (T, O) f32.
#[derive(Clone, Debug)]
pub struct Matmul {
    kernel: Kernel,
    i: usize,
    o: usize,
}

impl Matmul {
    pub fn new(device: &wgpu::Device, i: usize, o: usize) -> Matmul {
        let kernel = Kernel::new(
            device,
            "matmul",
            SOURCE,
            &[("I", super::c(i)), ("O", super::c(o))],
        );
        Matmul { kernel, i, o }
    }

    pub fn encode(
        &self,
        rec: &mut Recorder,
        x: &GpuTensor,
        w: &GpuTensor,
        y: &GpuTensor,
    ) -> Result<(), GpuError> {
        const OP: &str = "matmul";
        let t = rows(OP, x, DType::F32, self.i)?;
        expect(OP, w, DType::F32, &[self.o, self.i])?;
        expect(OP, y, DType::F32, &[t, self.o])?;
        let dims = rec.dims(t);
        rec.dispatch(
            &self.kernel,
            &[&dims, &x.buffer, &w.buffer, &y.buffer],
            [self.o.div_ceil(TILE), t.div_ceil(TILE), 1],
        )
    }
}
