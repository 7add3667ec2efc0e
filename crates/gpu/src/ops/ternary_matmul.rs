//! Launcher for `shaders/ternary_matmul.wgsl`.

use std::sync::OnceLock;

use crate::GpuError;
use crate::record::{Kernel, Recorder, at_least, expect, rows};
use crate::tensor::{DType, GpuTensor};

pub const SOURCE: &str = include_str!("../../../../shaders/ternary_matmul.wgsl");

/// The shader's token blockings (`TM`, tokens per invocation), smallest first; a dispatch of T
/// tokens takes the first that covers T, else the last.
const TOKEN_BLOCKS: [usize; 3] = [1, 4, 8];

/// Packed rows per workgroup (the shader's `LANES`) over several tokens.
const LANES: usize = 32;

/// Decoding (one token, TM = 1): packed rows per workgroup and invocations splitting K. Fewer
/// rows per workgroup spread the matrix-vector product over 8x more workgroups (the shader's
/// header says why); 4 x 64 = 256 invocations, WebGPU's default limit. Measured on the H100
/// (`BITLORA_BENCH_SWEEP=1 bench ternary --prompt-len 1`, BENCHMARKS.md): 7.5-8.9 us per 1b
/// projection against 12.8-18.1 us with the 32 x 16 blocking of many tokens; 8 x 32 was 8.9-11.4.
pub(crate) const DECODE_LANES: usize = 4;
pub(crate) const DECODE_SPLIT: usize = 64;

/// Invocations sharing each output's K range (the shader's `SPLIT`, the workgroup's y size):
/// 16 where the device allows workgroups of 512 invocations (measured on the H100 at T = 128:
/// 10-35% faster than 8, most on the long K of the down projection), else 8 (WebGPU's default
/// limit is 256).
const SPLIT: usize = 16;
const SPLIT_SMALL: usize = 8;

/// BitLinear on packed ternary weights: `y = (x_q . W^T) / (s_a * s_w)`, the product exact in
/// i32. With s_a = 1 and s_w = 1 the output is the integer accumulator itself (exact in f32
/// while |acc| < 2^24, i.e. I < 131072), which is how the tests check it bit for bit.
///
/// Shapes: x_q (T, I) int8 ([`DType::I8x4`]), s_a (T) f32, W (O, I) ([`DType::Ternary`],
/// transformers' packed layout), s_w (1) f32, y (T, O) f32; or, with
/// [`TernaryMatmul::encode_at`], y (R, O) written at rows `y_row0 .. y_row0 + T` (the k and v
/// projections write into the KV cache).
///
/// The pipeline for each token blocking (1 token per invocation for decoding, 4 for short
/// prompts, 8 otherwise) is compiled on first use.
#[derive(Clone, Debug)]
pub struct TernaryMatmul {
    device: wgpu::Device,
    kernels: [OnceLock<Kernel>; TOKEN_BLOCKS.len()],
    /// The same blockings adding their result to y (`ACCUM`).
    adding: [OnceLock<Kernel>; TOKEN_BLOCKS.len()],
    i: usize,
    o: usize,
    split: usize,
    tm: Option<usize>,
    /// (LANES, SPLIT) of the one-token kernel.
    decode: (usize, usize),
}

impl TernaryMatmul {
    /// `i` in features, `o` out features (any sizes; O need not be a multiple of 4).
    pub fn new(device: &wgpu::Device, i: usize, o: usize) -> TernaryMatmul {
        let big = device.limits().max_compute_invocations_per_workgroup as usize >= LANES * SPLIT;
        Self::with_blocking(device, i, o, None, if big { SPLIT } else { SPLIT_SMALL })
    }

    /// With an explicit blocking (benchmarks, tests): `tm` tokens per invocation (1, 4 or 8;
    /// None: chosen by T) and `split` invocations sharing each output's K range (1 to 32).
    /// The results are the same, bit for bit, with any blocking.
    pub fn with_blocking(
        device: &wgpu::Device,
        i: usize,
        o: usize,
        tm: Option<usize>,
        split: usize,
    ) -> TernaryMatmul {
        assert!(
            tm.is_none_or(|tm| TOKEN_BLOCKS.contains(&tm)),
            "ternary_matmul: 1, 4 or 8 tokens per invocation"
        );
        assert!((1..=32).contains(&split), "ternary_matmul: split 1..=32");
        TernaryMatmul {
            device: device.clone(),
            kernels: Default::default(),
            adding: Default::default(),
            i,
            o,
            split,
            tm,
            decode: (DECODE_LANES, DECODE_SPLIT),
        }
    }

    /// The one-token kernel (TM = 1) with `lanes` packed rows per workgroup (1 to 32) and
    /// `split` invocations splitting K (lanes * split at most the device's invocations per
    /// workgroup); benchmarks and tests. The results are the same, bit for bit.
    pub fn with_decode_blocking(mut self, lanes: usize, split: usize) -> TernaryMatmul {
        assert!(
            (1..=32).contains(&lanes) && split >= 1,
            "ternary_matmul: lanes 1..=32"
        );
        self.decode = (lanes, split);
        self.kernels = Default::default();
        self.adding = Default::default();
        self
    }

    pub fn encode(
        &self,
        rec: &mut Recorder,
        xq: &GpuTensor,
        sa: &GpuTensor,
        w: &GpuTensor,
        sw: &GpuTensor,
        y: &GpuTensor,
    ) -> Result<(), GpuError> {
        self.whole(rec, [xq, sa, w, sw, y], false)
    }

    /// As [`TernaryMatmul::encode`], adding the result to y (y (T, O) += x_q W^T / (s_a s_w),
    /// the same f32 addition as [`super::ResidualAdd`]): a projection and the residual add
    /// after it in one dispatch.
    pub fn encode_add(
        &self,
        rec: &mut Recorder,
        xq: &GpuTensor,
        sa: &GpuTensor,
        w: &GpuTensor,
        sw: &GpuTensor,
        y: &GpuTensor,
    ) -> Result<(), GpuError> {
        self.whole(rec, [xq, sa, w, sw, y], true)
    }

    /// x_q, s_a, W, s_w, y with y exactly (T, O).
    fn whole(
        &self,
        rec: &mut Recorder,
        [xq, sa, w, sw, y]: [&GpuTensor; 5],
        accumulate: bool,
    ) -> Result<(), GpuError> {
        let t = rows("ternary_matmul", xq, DType::I8x4, self.i)?;
        expect("ternary_matmul", y, DType::F32, &[t, self.o])?;
        self.record(rec, xq, sa, w, sw, y, 0, accumulate)
    }

    /// As [`TernaryMatmul::encode`], writing rows `y_row0 .. y_row0 + T` of a taller y.
    #[allow(clippy::too_many_arguments)]
    pub fn encode_at(
        &self,
        rec: &mut Recorder,
        xq: &GpuTensor,
        sa: &GpuTensor,
        w: &GpuTensor,
        sw: &GpuTensor,
        y: &GpuTensor,
        y_row0: usize,
    ) -> Result<(), GpuError> {
        self.record(rec, xq, sa, w, sw, y, y_row0, false)
    }

    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        rec: &mut Recorder,
        xq: &GpuTensor,
        sa: &GpuTensor,
        w: &GpuTensor,
        sw: &GpuTensor,
        y: &GpuTensor,
        y_row0: usize,
        accumulate: bool,
    ) -> Result<(), GpuError> {
        const OP: &str = "ternary_matmul";
        let t = rows(OP, xq, DType::I8x4, self.i)?;
        expect(OP, sa, DType::F32, &[t])?;
        expect(OP, w, DType::Ternary, &[self.o, self.i])?;
        expect(OP, sw, DType::F32, &[1])?;
        at_least(OP, y, DType::F32, y_row0 + t, self.o)?;
        let dims = rec.dims(OP, &[t, y_row0])?;
        let b = match self.tm {
            Some(tm) => TOKEN_BLOCKS.iter().position(|&b| b == tm),
            None => TOKEN_BLOCKS.iter().position(|&b| b >= t),
        }
        .unwrap_or(TOKEN_BLOCKS.len() - 1);
        let tm = TOKEN_BLOCKS[b];
        let (lanes, split) = if tm == 1 {
            self.decode
        } else {
            (LANES, self.split)
        };
        let kernels = if accumulate {
            &self.adding
        } else {
            &self.kernels
        };
        let kernel = kernels[b].get_or_init(|| {
            Kernel::new(
                &self.device,
                OP,
                SOURCE,
                &[
                    ("I", super::c(self.i)),
                    ("O", super::c(self.o)),
                    ("TM", super::c(tm)),
                    ("SPLIT", super::c(split)),
                    ("LANES", super::c(lanes)),
                    ("ACCUM", f64::from(u8::from(accumulate))),
                ],
            )
        });
        rec.dispatch(
            kernel,
            &[
                &dims, &xq.buffer, &sa.buffer, &w.buffer, &sw.buffer, &y.buffer,
            ],
            [self.o.div_ceil(4).div_ceil(lanes), t.div_ceil(tm), 1],
        )
    }
}
