//! Launcher for `shaders/ternary_decode.wgsl`.

use std::sync::OnceLock;

use bitlora_core::Activation;

use crate::GpuError;
use crate::record::{Kernel, Recorder, at_least, expect};
use crate::tensor::{DType, GpuTensor};

use super::ternary_matmul::{DECODE_LANES, DECODE_SPLIT};

pub const SOURCE: &str = include_str!("../../../../shaders/ternary_decode.wgsl");

/// Workgroup memory the shader declares besides the row's codes: the sum of squares' chunk
/// (256 vec4), its 64 lane sums, the row's max and 8 x LANES part sums, in bytes.
const FIXED_WORKGROUP_BYTES: usize = 16 * 256 + 4 * 64 + 4 + 4 * 8 * DECODE_LANES;

/// A decoded token's BitLinear products with the RMSNorm and the int8 quantization of their
/// input folded in: one dispatch for what [`super::RmsNorm::encode_quant`] and one or two
/// [`super::TernaryMatmul`] (and [`super::GatedAct`]) record, bit for bit the same outputs
/// (`shaders/ternary_decode.wgsl` says how). For one token (T = 1) only.
///
/// Shapes: x (1, I) f32 (the norm's input), nw (I) f32 (the norm's weight), each W (O, I)
/// ([`DType::Ternary`]) with its s_w (1) f32; y (R, O) f32 written at row `y_row0` (or
/// (1, O) for the GLU).
///
/// The pipelines are compiled on first use. [`TernaryDecode::fits`] says whether the device
/// holds the row's codes in one workgroup's memory; where not, use the unfused kernels.
#[derive(Clone, Debug)]
pub struct TernaryDecode {
    device: wgpu::Device,
    i: usize,
    o: usize,
    eps: f32,
    act: Activation,
    plain: OnceLock<Kernel>,
    adding: OnceLock<Kernel>,
    kv: OnceLock<Kernel>,
    glu: OnceLock<Kernel>,
}

impl TernaryDecode {
    /// `i` in features (the norm's width), `o` out features, `eps` the norm's epsilon, `act`
    /// the GLU's activation ([`TernaryDecode::encode_glu`] only).
    pub fn new(device: &wgpu::Device, i: usize, o: usize, eps: f32, act: Activation) -> Self {
        TernaryDecode {
            device: device.clone(),
            i,
            o,
            eps,
            act,
            plain: OnceLock::new(),
            adding: OnceLock::new(),
            kv: OnceLock::new(),
            glu: OnceLock::new(),
        }
    }

    /// Whether `device` runs the kernel for in-width `i`: the row's codes (i/4 words) and the
    /// norm's scratch fit one workgroup's memory, and a workgroup may have 256 invocations.
    pub fn fits(device: &wgpu::Device, i: usize) -> bool {
        let limits = device.limits();
        let bytes = FIXED_WORKGROUP_BYTES + 4 * i.div_ceil(4);
        bytes <= limits.max_compute_workgroup_storage_size as usize
            && limits.max_compute_invocations_per_workgroup as usize >= DECODE_LANES * DECODE_SPLIT
    }

    fn kernel<'a>(&self, cell: &'a OnceLock<Kernel>, entry: &str, accum: bool) -> &'a Kernel {
        cell.get_or_init(|| {
            let act = match self.act {
                Activation::Relu2 => 0.0,
                Activation::Silu => 1.0,
            };
            Kernel::entry(
                &self.device,
                "ternary_decode",
                SOURCE,
                entry,
                &[
                    ("I", super::c(self.i)),
                    ("O", super::c(self.o)),
                    ("EPS", self.eps as f64),
                    ("LANES", super::c(DECODE_LANES)),
                    ("SPLIT", super::c(DECODE_SPLIT)),
                    ("ACCUM", f64::from(u8::from(accum))),
                    ("ACT", act),
                ],
            )
        })
    }

    /// Checks x (1, I), nw (I) and each (W, s_w).
    fn check(
        &self,
        op: &'static str,
        x: &GpuTensor,
        nw: &GpuTensor,
        ws: &[(&GpuTensor, &GpuTensor)],
    ) -> Result<(), GpuError> {
        expect(op, x, DType::F32, &[1, self.i])?;
        expect(op, nw, DType::F32, &[self.i])?;
        for (w, sw) in ws {
            expect(op, w, DType::Ternary, &[self.o, self.i])?;
            expect(op, sw, DType::F32, &[1])?;
        }
        Ok(())
    }

    fn groups(&self) -> [usize; 3] {
        [self.o.div_ceil(4).div_ceil(DECODE_LANES), 1, 1]
    }

    /// Row `y_row0` of y = BitLinear(RMSNorm(x; nw); W, s_w); with `accumulate`, added to
    /// that row instead (a projection and the residual add after it).
    #[allow(clippy::too_many_arguments)]
    pub fn encode(
        &self,
        rec: &mut Recorder,
        x: &GpuTensor,
        nw: &GpuTensor,
        (w, sw): (&GpuTensor, &GpuTensor),
        y: &GpuTensor,
        y_row0: usize,
        accumulate: bool,
    ) -> Result<(), GpuError> {
        const OP: &str = "ternary_decode";
        self.check(OP, x, nw, &[(w, sw)])?;
        at_least(OP, y, DType::F32, y_row0 + 1, self.o)?;
        let dims = rec.dims(OP, &[y_row0])?;
        let cell = if accumulate {
            &self.adding
        } else {
            &self.plain
        };
        let kernel = self.kernel(cell, "main", accumulate);
        rec.dispatch(
            kernel,
            &[
                &dims, &x.buffer, &nw.buffer, &w.buffer, &sw.buffer, &y.buffer,
            ],
            self.groups(),
        )
    }

    /// Row `y_row0` of y = BitLinear(RMSNorm(x); W, s_w) and of y2 = BitLinear(RMSNorm(x);
    /// W2, s_w2): the k and v projections of a token, into the KV cache.
    #[allow(clippy::too_many_arguments)]
    pub fn encode_kv(
        &self,
        rec: &mut Recorder,
        x: &GpuTensor,
        nw: &GpuTensor,
        (w, sw): (&GpuTensor, &GpuTensor),
        (w2, sw2): (&GpuTensor, &GpuTensor),
        (y, y2): (&GpuTensor, &GpuTensor),
        y_row0: usize,
    ) -> Result<(), GpuError> {
        const OP: &str = "ternary_decode_kv";
        self.check(OP, x, nw, &[(w, sw), (w2, sw2)])?;
        at_least(OP, y, DType::F32, y_row0 + 1, self.o)?;
        at_least(OP, y2, DType::F32, y_row0 + 1, self.o)?;
        let dims = rec.dims(OP, &[y_row0])?;
        let kernel = self.kernel(&self.kv, "main_kv", false);
        rec.dispatch(
            kernel,
            &[
                &dims,
                &x.buffer,
                &nw.buffer,
                &w.buffer,
                &sw.buffer,
                &y.buffer,
                &w2.buffer,
                &sw2.buffer,
                &y2.buffer,
            ],
            self.groups(),
        )
    }

    /// out (1, O) = act(BitLinear(RMSNorm(x); W_g)) * BitLinear(RMSNorm(x); W_u): the FFN's
    /// gated product as [`super::TernaryGlu`] computes it, with its input's norm.
    pub fn encode_glu(
        &self,
        rec: &mut Recorder,
        x: &GpuTensor,
        nw: &GpuTensor,
        gate: (&GpuTensor, &GpuTensor),
        up: (&GpuTensor, &GpuTensor),
        out: &GpuTensor,
    ) -> Result<(), GpuError> {
        const OP: &str = "ternary_decode_glu";
        self.check(OP, x, nw, &[gate, up])?;
        expect(OP, out, DType::F32, &[1, self.o])?;
        let kernel = self.kernel(&self.glu, "main_glu", false);
        rec.dispatch_at(
            kernel,
            &[1, 2, 3, 4, 5, 6, 7],
            &[
                &x.buffer,
                &nw.buffer,
                &gate.0.buffer,
                &gate.1.buffer,
                &out.buffer,
                &up.0.buffer,
                &up.1.buffer,
            ],
            self.groups(),
        )
    }
}
