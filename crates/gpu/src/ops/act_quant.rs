//! Launcher for `shaders/act_quant.wgsl`.

use crate::GpuError;
use crate::record::{Kernel, Recorder, expect, rows};
use crate::tensor::{DType, GpuTensor};

pub const SOURCE: &str = include_str!("../../../../shaders/act_quant.wgsl");

/// Per-token absmax int8 quantization: `s_a = 127 / max(max|x|, 1e-5)`,
/// `x_q = clamp(round_half_even(x * s_a), -128, 127)`.
///
/// Shapes: x (T, C) f32, x_q (T, C) int8 codes ([`DType::I8x4`]), s_a (T) f32.
#[derive(Clone, Debug)]
pub struct ActQuant {
    kernel: Kernel,
    c: usize,
}

/// Workgroup size: see [`ActQuant::new`].
const WG: usize = 256;

impl ActQuant {
    pub fn new(device: &wgpu::Device, c: usize) -> ActQuant {
        let kernel = Kernel::new(
            device,
            "act_quant",
            SOURCE,
            // 256 invocations (WebGPU's default limit): at T = 1 one workgroup does the whole
            // row, and 64 left its loops over the row latency-bound. The max is exact in any
            // order, so the width changes nothing else.
            &[("C", super::c(c)), ("WG", super::c(WG))],
        );
        ActQuant { kernel, c }
    }

    pub fn encode(
        &self,
        rec: &mut Recorder,
        x: &GpuTensor,
        xq: &GpuTensor,
        scale: &GpuTensor,
    ) -> Result<(), GpuError> {
        const OP: &str = "act_quant";
        let t = rows(OP, x, DType::F32, self.c)?;
        expect(OP, xq, DType::I8x4, &[t, self.c])?;
        expect(OP, scale, DType::F32, &[t])?;
        rec.dispatch(
            &self.kernel,
            &[&x.buffer, &xq.buffer, &scale.buffer],
            [t, 1, 1],
        )
    }
}
