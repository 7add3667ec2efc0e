//! Launcher for `shaders/ternary_glu.wgsl`.

use bitlora_core::Activation;

use crate::GpuError;
use crate::record::{Kernel, Recorder, expect, rows};
use crate::tensor::{DType, GpuTensor};

use super::ternary_matmul::{DECODE_LANES, DECODE_SPLIT};

pub const SOURCE: &str = include_str!("../../../../shaders/ternary_glu.wgsl");

/// The FFN's gate and up BitLinear products and its gated activation in one dispatch:
/// `out = act((x_q . W_g^T) / (s_a s_g)) * ((x_q . W_u^T) / (s_a s_u))`, bit for bit what
/// [`super::TernaryMatmul`] twice and [`super::GatedAct`] compute. Blocked for one token
/// (decoding), like `TernaryMatmul`'s one-token kernel.
///
/// Shapes: x_q (T, I) int8 ([`DType::I8x4`]), s_a (T) f32, W_g and W_u (O, I)
/// ([`DType::Ternary`]), s_g and s_u (1) f32, out (T, O) f32.
#[derive(Clone, Debug)]
pub struct TernaryGlu {
    kernel: Kernel,
    i: usize,
    o: usize,
}

impl TernaryGlu {
    /// `i` in features (C), `o` out features (F).
    pub fn new(device: &wgpu::Device, i: usize, o: usize, act: Activation) -> TernaryGlu {
        let act = match act {
            Activation::Relu2 => 0.0,
            Activation::Silu => 1.0,
        };
        let kernel = Kernel::new(
            device,
            "ternary_glu",
            SOURCE,
            &[
                ("I", super::c(i)),
                ("O", super::c(o)),
                ("LANES", super::c(DECODE_LANES)),
                ("SPLIT", super::c(DECODE_SPLIT)),
                ("ACT", act),
            ],
        );
        TernaryGlu { kernel, i, o }
    }

    /// `gate` and `up` are (W, s_w) pairs.
    pub fn encode(
        &self,
        rec: &mut Recorder,
        xq: &GpuTensor,
        sa: &GpuTensor,
        gate: (&GpuTensor, &GpuTensor),
        up: (&GpuTensor, &GpuTensor),
        out: &GpuTensor,
    ) -> Result<(), GpuError> {
        const OP: &str = "ternary_glu";
        let t = rows(OP, xq, DType::I8x4, self.i)?;
        expect(OP, sa, DType::F32, &[t])?;
        for (w, sw) in [gate, up] {
            expect(OP, w, DType::Ternary, &[self.o, self.i])?;
            expect(OP, sw, DType::F32, &[1])?;
        }
        expect(OP, out, DType::F32, &[t, self.o])?;
        rec.dispatch(
            &self.kernel,
            &[
                &xq.buffer,
                &sa.buffer,
                &gate.0.buffer,
                &gate.1.buffer,
                &up.0.buffer,
                &up.1.buffer,
                &out.buffer,
            ],
            [self.o.div_ceil(4).div_ceil(DECODE_LANES), t, 1],
        )
    }
}
