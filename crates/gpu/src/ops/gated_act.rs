//! Launcher for `shaders/gated_act.wgsl`.

use bitlora_core::Activation;

use crate::GpuError;
use crate::record::{Kernel, Recorder, expect, rows};
use crate::tensor::{DType, GpuTensor};

pub const SOURCE: &str = include_str!("../../../../shaders/gated_act.wgsl");

/// The FFN's gated activation `out = act(gate) * up`, act = relu^2 or SiLU.
///
/// Shapes: gate (T, F) f32, up (T, F) f32, out (T, F) f32.
#[derive(Clone, Debug)]
pub struct GatedAct {
    kernel: Kernel,
    f: usize,
}

impl GatedAct {
    pub fn new(device: &wgpu::Device, f: usize, act: Activation) -> GatedAct {
        let act = match act {
            Activation::Relu2 => 0.0,
            Activation::Silu => 1.0,
        };
        let kernel = Kernel::new(
            device,
            "gated_act",
            SOURCE,
            &[
                ("F", super::c(f)),
                ("ACT", act),
                ("WG", super::c(super::WG)),
            ],
        );
        GatedAct { kernel, f }
    }

    pub fn encode(
        &self,
        rec: &mut Recorder,
        gate: &GpuTensor,
        up: &GpuTensor,
        out: &GpuTensor,
    ) -> Result<(), GpuError> {
        const OP: &str = "gated_act";
        let t = rows(OP, gate, DType::F32, self.f)?;
        expect(OP, up, DType::F32, &[t, self.f])?;
        expect(OP, out, DType::F32, &[t, self.f])?;
        rec.dispatch(
            &self.kernel,
            &[&gate.buffer, &up.buffer, &out.buffer],
            [self.f.div_ceil(super::WG), t, 1],
        )
    }
}
