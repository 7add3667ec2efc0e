//! Launcher for `shaders/matmul.wgsl`.

use std::ops::Range;

use crate::GpuError;
use crate::record::{Kernel, Recorder, at_least, expect, rows};
use crate::tensor::{DType, GpuTensor, SplitTensor};

pub const SOURCE: &str = include_str!("../../../../shaders/matmul.wgsl");

/// Tokens and outputs per invocation of the direct blocked pipeline (the shader's `TT`, `TO`);
/// the decoding pipeline (T = 1) has one of each.
const TT: usize = 8;
const TO: usize = 4;

/// The tiled pipeline: invocations per workgroup, and the outputs and tokens each workgroup
/// owns (the shader's `BO`, `BT`).
const TILE_WG: usize = 256;
const BO: usize = 128;
const BT: usize = 64;

/// Dense f32 `y = x . W^T`: the language-model head (W is the embedding when tied).
///
/// Shapes: x (T, I) f32, W (O, I) f32 (or bf16: [`Matmul::with_bf16`], widened exactly, the
/// same results), y (T, O) f32. With [`Matmul::encode_split`], W is split along O into chunks
/// (OC, I) (one dispatch each, filling columns o0 .. o0+OC of y) and x may be a window
/// `x_rows` of a taller (R, I) buffer, T = x_rows.len().
///
/// One token (decoding) runs the direct kernel with one output per invocation, reading W 16
/// bytes a load where its rows are aligned for it (`main_rows`). More tokens run
/// the tiled kernel (W and x staged through workgroup memory in coalesced chunks) on a GPU, and
/// the direct kernel with 4 outputs x 8 tokens per invocation on CPU adapters (lavapipe,
/// SwiftShader), which pay for barriers and workgroup memory more than they gain (lavapipe, T =
/// 32: tiled 1.1-1.3x slower); [`Matmul::with_tiling`] chooses explicitly. Every variant sums
/// each output in the same order: the results are the same, bit for bit. Measured on an H100
/// (Vulkan, GPU timestamps, T = 128, O = 32000): tiled 0.30 ms at I = 768 and 0.74 ms at
/// I = 2048 (21-23 TFLOP/s), direct 2.96 and 6.9 ms.
#[derive(Clone, Debug)]
pub struct Matmul {
    /// Many tokens: tiled or direct (TT = 8, TO = 4).
    kernel: Kernel,
    tiled: bool,
    /// TT = TO = 1: one token (decoding).
    kernel_one: Kernel,
    /// One token reading W 16 bytes a load (`main_rows`), where W's rows start 16-byte
    /// aligned (I a multiple of 8 for bf16, of 4 for f32).
    kernel_rows: Option<Kernel>,
    i: usize,
    o: usize,
    /// W's element type: F32 or Bf16.
    w: DType,
}

impl Matmul {
    /// The tiled kernel for many tokens on GPUs, the direct one on CPU adapters; W f32.
    pub fn new(device: &wgpu::Device, i: usize, o: usize) -> Matmul {
        Self::with_bf16(device, i, o, false)
    }

    /// As [`Matmul::new`], for a [`DType::Bf16`] W with `bf16`, else an f32 one.
    pub fn with_bf16(device: &wgpu::Device, i: usize, o: usize, bf16: bool) -> Matmul {
        let gpu = device.adapter_info().device_type != wgpu::DeviceType::Cpu;
        Self::with_tiling_bf16(device, i, o, gpu, bf16)
    }

    /// With `tiled`: more than one token runs the tiled kernel, else the direct one; W f32.
    pub fn with_tiling(device: &wgpu::Device, i: usize, o: usize, tiled: bool) -> Matmul {
        Self::with_tiling_bf16(device, i, o, tiled, false)
    }

    /// With `tiled` as [`Matmul::with_tiling`], for a [`DType::Bf16`] W with `bf16`.
    pub fn with_tiling_bf16(
        device: &wgpu::Device,
        i: usize,
        o: usize,
        tiled: bool,
        bf16: bool,
    ) -> Matmul {
        let constants = |wg: usize, tiled: bool, tt: usize, to: usize| {
            [
                ("I", super::c(i)),
                ("O", super::c(o)),
                ("WG", super::c(wg)),
                ("TILED", f64::from(u8::from(tiled))),
                ("TT", super::c(tt)),
                ("TO", super::c(to)),
                ("BF16", f64::from(u8::from(bf16))),
            ]
        };
        let k = |wg: usize, tiled: bool, tt: usize, to: usize| {
            Kernel::new(device, "matmul", SOURCE, &constants(wg, tiled, tt, to))
        };
        let aligned = i.is_multiple_of(if bf16 { 8 } else { 4 });
        let kernel_rows = (aligned && !super::bench_switch("BITLORA_HEAD_SCALAR")).then(|| {
            let c = constants(super::WG, false, 1, 1);
            Kernel::entry(device, "matmul (rows)", SOURCE, "main_rows", &c)
        });
        Matmul {
            kernel: if tiled {
                k(TILE_WG, true, TT, TO)
            } else {
                k(super::WG, false, TT, TO)
            },
            tiled,
            kernel_one: k(super::WG, false, 1, 1),
            kernel_rows,
            i,
            o,
            w: if bf16 { DType::Bf16 } else { DType::F32 },
        }
    }

    /// W whole in one binding, every row of x.
    pub fn encode(
        &self,
        rec: &mut Recorder,
        x: &GpuTensor,
        w: &GpuTensor,
        y: &GpuTensor,
    ) -> Result<(), GpuError> {
        let t = rows("matmul", x, DType::F32, self.i)?;
        expect("matmul", w, self.w, &[self.o, self.i])?;
        self.encode_chunk(rec, x, 0..t, w, 0, y)
    }

    /// Every chunk of a W split along O, on rows `x_rows` of x.
    pub fn encode_split(
        &self,
        rec: &mut Recorder,
        x: &GpuTensor,
        x_rows: Range<usize>,
        w: &SplitTensor,
        y: &GpuTensor,
    ) -> Result<(), GpuError> {
        if w.rows != self.o || w.cols != self.i {
            return Err(GpuError::Shape {
                op: "matmul",
                msg: format!(
                    "`{}` is ({}, {}), expected (O, I) = ({}, {})",
                    w.name, w.rows, w.cols, self.o, self.i
                ),
            });
        }
        for (o0, chunk) in &w.chunks {
            self.encode_chunk(rec, x, x_rows.clone(), chunk, *o0, y)?;
        }
        Ok(())
    }

    /// One chunk (OC, I) of W holding its rows `o0 .. o0 + OC`, on rows `x_rows` of x.
    pub fn encode_chunk(
        &self,
        rec: &mut Recorder,
        x: &GpuTensor,
        x_rows: Range<usize>,
        w_chunk: &GpuTensor,
        o0: usize,
        y: &GpuTensor,
    ) -> Result<(), GpuError> {
        const OP: &str = "matmul";
        let t = x_rows.len();
        at_least(OP, x, DType::F32, x_rows.end, self.i)?;
        let oc = at_least(OP, w_chunk, self.w, 1, self.i)?;
        if t == 0 || o0 + oc > self.o {
            return Err(GpuError::Shape {
                op: OP,
                msg: format!(
                    "x rows {x_rows:?}, W chunk `{}` rows {o0}..{}: need T > 0 and rows within O = {}",
                    w_chunk.name,
                    o0 + oc,
                    self.o
                ),
            });
        }
        expect(OP, y, DType::F32, &[t, self.o])?;
        let dims = rec.dims(OP, &[t, x_rows.start, oc, o0])?;
        if let (1, Some(kernel)) = (t, &self.kernel_rows) {
            return rec.dispatch_at(
                kernel,
                &[0, 1, 4, 3],
                &[&dims, &x.buffer, &w_chunk.buffer, &y.buffer],
                [oc.div_ceil(super::WG), 1, 1],
            );
        }
        let (kernel, groups) = if t == 1 {
            (&self.kernel_one, [oc.div_ceil(super::WG), 1, 1])
        } else if self.tiled {
            (&self.kernel, [oc.div_ceil(BO), t.div_ceil(BT), 1])
        } else {
            let groups = [oc.div_ceil(TO).div_ceil(super::WG), t.div_ceil(TT), 1];
            (&self.kernel, groups)
        };
        rec.dispatch(
            kernel,
            &[&dims, &x.buffer, &w_chunk.buffer, &y.buffer],
            groups,
        )
    }
}
