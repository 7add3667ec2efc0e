//! Launcher for `shaders/ternary_backward.wgsl`.

use crate::GpuError;
use crate::record::{Kernel, Recorder, expect, rows};
use crate::tensor::{DType, GpuTensor};

/// Tokens per invocation (the shader's `TT`) on CPU-emulated adapters; GPUs take 1.
const TT_CPU: usize = 4;

pub const SOURCE: &str = include_str!("../../../../shaders/ternary_backward.wgsl");

/// BitLinear backward to the input, straight-through on the activation quantizer:
/// `dx = dy . W / s_w` from the forward's packed ternary weight (the transposed product).
///
/// Shapes: dy (T, O) f32, W (O, I) [`DType::Ternary`], s_w (1) f32, dx (T, I) f32 (written by
/// [`TernaryBackward::encode`], added into by [`TernaryBackward::encode_add`]).
#[derive(Clone, Debug)]
pub struct TernaryBackward {
    kernel: Kernel,
    kernel_add: Kernel,
    i: usize,
    o: usize,
    tt: usize,
}

impl TernaryBackward {
    /// The blocking suits the device: 4 tokens per invocation on a CPU-emulated adapter
    /// (lavapipe, SwiftShader), 1 on a GPU.
    pub fn new(device: &wgpu::Device, i: usize, o: usize) -> TernaryBackward {
        let cpu = device.adapter_info().device_type == wgpu::DeviceType::Cpu;
        Self::with_tokens_per_invocation(device, i, o, if cpu { TT_CPU } else { 1 })
    }

    /// With an explicit blocking `tt` (4 or 1); the results are the same either way.
    pub fn with_tokens_per_invocation(
        device: &wgpu::Device,
        i: usize,
        o: usize,
        tt: usize,
    ) -> TernaryBackward {
        assert!(
            tt == 1 || tt == 4,
            "ternary_backward: 1 or 4 tokens per invocation"
        );
        let k = |acc: f64| {
            Kernel::new(
                device,
                "ternary_backward",
                SOURCE,
                &[
                    ("I", super::c(i)),
                    ("O", super::c(o)),
                    ("WG", super::c(super::WG)),
                    ("ACC", acc),
                    ("TT", super::c(tt)),
                ],
            )
        };
        TernaryBackward {
            kernel: k(0.0),
            kernel_add: k(1.0),
            i,
            o,
            tt,
        }
    }

    /// dx = dy . W / s_w.
    pub fn encode(
        &self,
        rec: &mut Recorder,
        dy: &GpuTensor,
        w: &GpuTensor,
        sw: &GpuTensor,
        dx: &GpuTensor,
    ) -> Result<(), GpuError> {
        self.record(rec, &self.kernel, dy, w, sw, dx)
    }

    /// dx += dy . W / s_w.
    pub fn encode_add(
        &self,
        rec: &mut Recorder,
        dy: &GpuTensor,
        w: &GpuTensor,
        sw: &GpuTensor,
        dx: &GpuTensor,
    ) -> Result<(), GpuError> {
        self.record(rec, &self.kernel_add, dy, w, sw, dx)
    }

    fn record(
        &self,
        rec: &mut Recorder,
        kernel: &Kernel,
        dy: &GpuTensor,
        w: &GpuTensor,
        sw: &GpuTensor,
        dx: &GpuTensor,
    ) -> Result<(), GpuError> {
        const OP: &str = "ternary_backward";
        let t = rows(OP, dy, DType::F32, self.o)?;
        expect(OP, w, DType::Ternary, &[self.o, self.i])?;
        expect(OP, sw, DType::F32, &[1])?;
        expect(OP, dx, DType::F32, &[t, self.i])?;
        let dims = rec.dims(OP, &[t])?;
        rec.dispatch(
            kernel,
            &[&dims, &dy.buffer, &w.buffer, &sw.buffer, &dx.buffer],
            [
                self.i.div_ceil(4).div_ceil(super::WG),
                t.div_ceil(self.tt),
                1,
            ],
        )
    }
}
