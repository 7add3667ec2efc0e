//! Launcher for `shaders/ternary_backward.wgsl`.

use std::sync::Mutex;

use crate::GpuError;
use crate::record::{Kernel, Recorder, expect, rows};
use crate::tensor::{DType, GpuTensor};

/// Word columns per workgroup (the shader's `KW`).
const KW: usize = 8;
/// Invocations per workgroup of the reduce pass (its `WG`).
const REDUCE_WG: usize = 64;
/// Split the packed rows until a dispatch has about this many workgroups (several per SM on a
/// large GPU), at most [`MAX_SPLITS`] ways.
const TARGET_GROUPS: usize = 1024;
const MAX_SPLITS: usize = 8;

pub const SOURCE: &str = include_str!("../../../../shaders/ternary_backward.wgsl");
pub const REDUCE_SOURCE: &str = include_str!("../../../../shaders/ternary_backward_reduce.wgsl");

/// BitLinear backward to the input, straight-through on the activation quantizer:
/// `dx = dy . W / s_w` from the forward's packed ternary weight (the transposed product).
///
/// Shapes: dy (T, O) f32, W (O, I) [`DType::Ternary`], s_w (1) f32, dx (T, I) f32 (written by
/// [`TernaryBackward::encode`], added into by [`TernaryBackward::encode_add`]).
///
/// Where the outputs alone give few workgroups (a GPU, not a CPU-emulated adapter), the packed
/// rows are split across workgroups too and a second pass adds the partial sums in order
/// (`ternary_backward_reduce.wgsl`); dx then equals the CPU reference within f32 rounding
/// instead of bit for bit, which is harmless: it feeds only gradients, no int8 quantizer.
#[derive(Debug)]
pub struct TernaryBackward {
    kernel: Kernel,
    reduce: Kernel,
    reduce_add: Kernel,
    i: usize,
    o: usize,
    tm: usize,
    tg: usize,
    /// Splits of the packed rows: Some(n) n ways (1: never), None chosen from T (GPUs).
    splits: Option<usize>,
    /// The (S, T, I) partial sums, grown on demand (the queue runs this op's dispatches one
    /// after another); a clone makes its own.
    scratch: Mutex<Option<GpuTensor>>,
    device: wgpu::Device,
}

impl Clone for TernaryBackward {
    fn clone(&self) -> TernaryBackward {
        TernaryBackward {
            kernel: self.kernel.clone(),
            reduce: self.reduce.clone(),
            reduce_add: self.reduce_add.clone(),
            scratch: Mutex::new(None),
            device: self.device.clone(),
            ..*self
        }
    }
}

impl TernaryBackward {
    /// The blocking suits the device: on a CPU-emulated adapter (lavapipe, SwiftShader), which
    /// runs a workgroup's invocations one after another anyway, 4 tokens per invocation (the
    /// least staging per multiply-add), never split; on a GPU, workgroups of 8 x 32 with 2
    /// tokens per invocation and the packed rows split (see the type's doc) up to 8 ways, until
    /// a dispatch has about 1,024 workgroups. Measured on the H100 at T = 128
    /// (`BITLORA_BENCH_SWEEP=1 bitlora bench ternary`, every blocking 1-16 ways): this is the
    /// fastest or within 8% of it at all six 125m and 1b shapes, 1.4-1.9x the unsplit best.
    pub fn new(device: &wgpu::Device, i: usize, o: usize) -> TernaryBackward {
        let cpu = device.adapter_info().device_type == wgpu::DeviceType::Cpu;
        let (tm, tg) = if cpu { (4, 32) } else { (2, 32) };
        let mut op = Self::with_blocking(device, i, o, tm, tg);
        if !cpu {
            op.splits = None;
        }
        op
    }

    /// The same op with the packed rows split `n` ways (at most one split per chunk of rows;
    /// 1: never), whatever the device (tests, benchmarks).
    pub fn with_splits(mut self, n: usize) -> TernaryBackward {
        self.splits = Some(n.max(1));
        self
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
    /// the same, bit for bit, with any. Never splits the rows (see [`TernaryBackward::with_splits`]).
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
        let reduce = |acc: f64| {
            Kernel::new(
                device,
                "ternary_backward_reduce",
                REDUCE_SOURCE,
                &[("I", super::c(i)), ("ACC", acc)],
            )
        };
        TernaryBackward {
            kernel: Kernel::new(
                device,
                "ternary_backward",
                SOURCE,
                &[
                    ("I", super::c(i)),
                    ("O", super::c(o)),
                    ("TM", super::c(tm)),
                    ("TG", super::c(tg)),
                ],
            ),
            reduce: reduce(0.0),
            reduce_add: reduce(1.0),
            i,
            o,
            tm,
            tg,
            splits: Some(1),
            scratch: Mutex::new(None),
            device: device.clone(),
        }
    }

    /// (S, PS) for `t` tokens: S workgroups along the packed rows of PS rows each (PS a
    /// multiple of the shader's chunk PC = 16 / TM); (1, 0) unsplit.
    fn split_for(&self, t: usize) -> (usize, usize) {
        let o4 = self.o.div_ceil(4);
        let pc = 16 / self.tm;
        let want = match self.splits {
            Some(n) => n,
            None => {
                let groups = self.i.div_ceil(4).div_ceil(KW) * t.div_ceil(self.tg * self.tm);
                (TARGET_GROUPS / groups.max(1)).clamp(1, MAX_SPLITS)
            }
        };
        let want = want.min(o4.div_ceil(pc));
        if want <= 1 {
            return (1, 0);
        }
        let ps = o4.div_ceil(want).div_ceil(pc) * pc;
        (o4.div_ceil(ps), ps)
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
        self.record(rec, false, dy, w, sw, dx)
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
        self.record(rec, true, dy, w, sw, dx)
    }

    fn record(
        &self,
        rec: &mut Recorder,
        add: bool,
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
        let (splits, ps) = self.split_for(t);
        let groups = [
            self.i.div_ceil(4).div_ceil(KW),
            t.div_ceil(self.tg * self.tm),
            splits,
        ];
        if splits == 1 {
            // One serial sum per output, divided by s_w and written (or added) in place.
            let dims = rec.dims(OP, &[t, 0, usize::from(add)])?;
            return rec.dispatch(
                &self.kernel,
                &[&dims, &dy.buffer, &w.buffer, &sw.buffer, &dx.buffer],
                groups,
            );
        }
        let part = {
            let mut slot = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
            let need = splits * t * self.i;
            if slot.as_ref().is_none_or(|p| p.numel() < need) {
                *slot = Some(GpuTensor::zeros(
                    &self.device,
                    "ternary_backward partial sums",
                    &[need],
                    DType::F32,
                )?);
            }
            slot.as_ref().expect("made above").buffer.clone()
        };
        let dims = rec.dims(OP, &[t, ps, 0])?;
        rec.dispatch(
            &self.kernel,
            &[&dims, &dy.buffer, &w.buffer, &sw.buffer, &part],
            groups,
        )?;
        let dims = rec.dims(OP, &[t, splits])?;
        rec.dispatch(
            if add { &self.reduce_add } else { &self.reduce },
            &[&dims, &part, &sw.buffer, &dx.buffer],
            [self.i.div_ceil(REDUCE_WG), t, 1],
        )
    }
}
