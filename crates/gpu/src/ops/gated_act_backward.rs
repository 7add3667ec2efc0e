//! Launcher for `shaders/gated_act_backward.wgsl`.

use bitlora_core::Activation;

use crate::GpuError;
use crate::record::{Kernel, Recorder, expect, rows};
use crate::tensor::{DType, GpuTensor};

pub const SOURCE: &str = include_str!("../../../../shaders/gated_act_backward.wgsl");

/// Backward of `f = act(gate) * up` (relu^2 or SiLU): dgate and dup from df.
///
/// Shapes: gate, up, df (T, F) f32; dgate, dup (T, F) f32 (written).
#[derive(Clone, Debug)]
pub struct GatedActBackward {
    kernel: Kernel,
    f: usize,
}

impl GatedActBackward {
    pub fn new(device: &wgpu::Device, f: usize, act: Activation) -> GatedActBackward {
        let act = match act {
            Activation::Relu2 => 0.0,
            Activation::Silu => 1.0,
        };
        let kernel = Kernel::new(
            device,
            "gated_act_backward",
            SOURCE,
            &[
                ("F", super::c(f)),
                ("ACT", act),
                ("WG", super::c(super::WG)),
            ],
        );
        GatedActBackward { kernel, f }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn encode(
        &self,
        rec: &mut Recorder,
        gate: &GpuTensor,
        up: &GpuTensor,
        df: &GpuTensor,
        dgate: &GpuTensor,
        dup: &GpuTensor,
    ) -> Result<(), GpuError> {
        const OP: &str = "gated_act_backward";
        let t = rows(OP, gate, DType::F32, self.f)?;
        for x in [up, df, dgate, dup] {
            expect(OP, x, DType::F32, &[t, self.f])?;
        }
        rec.dispatch(
            &self.kernel,
            &[
                &gate.buffer,
                &up.buffer,
                &df.buffer,
                &dgate.buffer,
                &dup.buffer,
            ],
            [self.f.div_ceil(super::WG), t, 1],
        )
    }
}
