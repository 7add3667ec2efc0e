//! Launcher for `shaders/ternary_backward.wgsl`.

use crate::GpuError;
use crate::record::{Kernel, Recorder, expect, rows};
use crate::tensor::{DType, GpuTensor};

/// Word columns per workgroup (the shader's `KW`).
const KW: usize = 8;

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
    tm: usize,
    tg: usize,
}

impl TernaryBackward {
    /// The blocking suits the device: on a CPU-emulated adapter (lavapipe, SwiftShader), which
    /// runs a workgroup's invocations one after another anyway, 4 tokens per invocation (the
    /// least staging per multiply-add); on a GPU, workgroups of 8 x 16 with 1 token per
    /// invocation where I is small (the most invocations: each output's sum is serial, so the
    /// parallelism at T = 128 is in the outputs) and 2 where I >= 2048, which leaves enough
    /// workgroups (I/32 x T/32 = 256 at T = 128) and halves the staging per multiply-add.
    /// Measured on the H100 at T = 128 (`BITLORA_BENCH_SWEEP=1 bitlora bench ternary`): 2 is
    /// 25-30% faster for I = 2048, 3072 and 3584, 1 is 12-14% faster for I = 768.
    pub fn new(device: &wgpu::Device, i: usize, o: usize) -> TernaryBackward {
        let cpu = device.adapter_info().device_type == wgpu::DeviceType::Cpu;
        let (tm, tg) = match (cpu, i >= 2048) {
            (true, _) => (4, 32),
            (false, false) => (1, 16),
            (false, true) => (2, 16),
        };
        Self::with_blocking(device, i, o, tm, tg)
    }

    /// With `tt` tokens per invocation (1, 2 or 4) in workgroups of 8 x 16 (1) or 8 x 32.
    pub fn with_tokens_per_invocation(
        device: &wgpu::Device,
        i: usize,
        o: usize,
        tt: usize,
    ) -> TernaryBackward {
        Self::with_blocking(device, i, o, tt, if tt == 1 { 16 } else { 32 })
    }

    /// With an explicit blocking (benchmarks, tests): `tm` tokens per invocation (1, 2 or 4)
    /// and `tg` token blocks per workgroup (16 or 32; workgroups of 8 x tg invocations), not
    /// (1, 32), whose staging would pass WebGPU's 16 KiB of workgroup memory. The results are
    /// the same, bit for bit, with any.
    pub fn with_blocking(
        device: &wgpu::Device,
        i: usize,
        o: usize,
        tm: usize,
        tg: usize,
    ) -> TernaryBackward {
        assert!(
            [1, 2, 4].contains(&tm),
            "ternary_backward: 1, 2 or 4 tokens per invocation"
        );
        assert!(
            [16, 32].contains(&tg) && (tm, tg) != (1, 32),
            "ternary_backward: 16 or 32 token blocks per workgroup, 16 with 1 token per invocation"
        );
        let k = |acc: f64| {
            Kernel::new(
                device,
                "ternary_backward",
                SOURCE,
                &[
                    ("I", super::c(i)),
                    ("O", super::c(o)),
                    ("ACC", acc),
                    ("TM", super::c(tm)),
                    ("TG", super::c(tg)),
                ],
            )
        };
        TernaryBackward {
            kernel: k(0.0),
            kernel_add: k(1.0),
            i,
            o,
            tm,
            tg,
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
                self.i.div_ceil(4).div_ceil(KW),
                t.div_ceil(self.tg * self.tm),
                1,
            ],
        )
    }
}
