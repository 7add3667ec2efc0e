//! Launcher for `shaders/ternary_decode.wgsl`.

use std::sync::OnceLock;

use bitlora_core::Activation;

use crate::GpuError;
use crate::record::{Kernel, Recorder, at_least, expect};
use crate::tensor::{DType, GpuTensor};

use super::ternary_matmul::{DECODE_LANES, DECODE_SPLIT};

// shaders/ternary_decode.wgsl's TREE_PART adds the SPLIT parts eight at a time.
const _: () = assert!(DECODE_SPLIT.is_multiple_of(8));

pub const SOURCE: &str = include_str!("../../../../shaders/ternary_decode.wgsl");

/// Workgroup memory the shader declares besides the row's codes: the sum of squares' chunk
/// (256 vec4), its 64 lane sums and their total, the row's max and 8 x LANES part sums, in
/// bytes.
const FIXED_WORKGROUP_BYTES: usize = 16 * 256 + 4 * 64 + 4 + 4 + 4 * 8 * DECODE_LANES;

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
    o_kv: usize, // encode_qkv's k and v widths
    /// encode_att's attention shape: (NH, NKV, HS), NH * HS = i.
    att: Option<(usize, usize, usize)>,

    eps: f32,
    act: Activation,
    plain: OnceLock<Kernel>,
    adding: OnceLock<Kernel>,
    qkv: OnceLock<Kernel>,
    glu: OnceLock<Kernel>,
    att_kernel: OnceLock<Kernel>,
}

impl TernaryDecode {
    /// `i` in features (the norm's width), `o` out features, `eps` the norm's epsilon, `act`
    /// the GLU's activation ([`TernaryDecode::encode_glu`] only).
    pub fn new(device: &wgpu::Device, i: usize, o: usize, eps: f32, act: Activation) -> Self {
        TernaryDecode {
            device: device.clone(),
            i,
            o,
            o_kv: o,
            att: None,
            eps,
            act,
            plain: OnceLock::new(),
            adding: OnceLock::new(),
            qkv: OnceLock::new(),
            glu: OnceLock::new(),
            att_kernel: OnceLock::new(),
        }
    }

    /// The launcher of [`TernaryDecode::encode_att`]: the o projection (NH * HS -> `o`) of
    /// the decode attention of `nh` query heads over `nkv` key/value heads of size `hs`.
    /// None where the fold does not apply (HS not a multiple of 4: a group of four would
    /// straddle two heads).
    pub fn new_att(
        device: &wgpu::Device,
        (nh, nkv, hs): (usize, usize, usize),
        o: usize,
        eps: f32,
    ) -> Option<Self> {
        // head_m and head_l beside what `fits` counts.
        let limit = device.limits().max_compute_workgroup_storage_size as usize;
        let fits = Self::fits(device, nh * hs)
            && FIXED_WORKGROUP_BYTES + 4 * (nh * hs).div_ceil(4) + 8 * nh <= limit;
        (hs.is_multiple_of(4) && fits).then(|| TernaryDecode {
            att: Some((nh, nkv, hs)),
            ..TernaryDecode::new(device, nh * hs, o, eps, Activation::Relu2)
        })
    }

    /// The launcher of [`TernaryDecode::encode_qkv`]: q `o` wide, k and v `o_kv` wide.
    pub fn new_qkv(device: &wgpu::Device, i: usize, o: usize, o_kv: usize, eps: f32) -> Self {
        TernaryDecode {
            o_kv,
            ..TernaryDecode::new(device, i, o, eps, Activation::Relu2)
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

    /// `name` labels the dispatches in a profile.
    fn kernel<'a>(
        &self,
        cell: &'a OnceLock<Kernel>,
        name: &'static str,
        entry: &str,
        accum: bool,
    ) -> &'a Kernel {
        cell.get_or_init(|| {
            let act = match self.act {
                Activation::Relu2 => 0.0,
                Activation::Silu => 1.0,
            };
            let (nh, nkv, hs) = self.att.unwrap_or((1, 1, 4));
            Kernel::entry(
                &self.device,
                name,
                SOURCE,
                entry,
                &[
                    ("ATT", f64::from(u8::from(self.att.is_some()))),
                    ("NH", super::c(nh)),
                    ("NKV", super::c(nkv)),
                    ("HS", super::c(hs)),
                    ("I", super::c(self.i)),
                    ("O", super::c(self.o)),
                    ("OKV", super::c(self.o_kv)),
                    ("EPS", self.eps as f64),
                    ("LANES", super::c(DECODE_LANES)),
                    ("SPLIT", super::c(DECODE_SPLIT)),
                    ("ACCUM", f64::from(u8::from(accum))),
                    ("ACT", act),
                    (
                        "PRE",
                        f64::from(u8::from(!super::bench_switch("BITLORA_DECODE_NOPRE"))),
                    ),
                    (
                        "PREX",
                        f64::from(u8::from(!super::bench_switch("BITLORA_DECODE_NOPREX"))),
                    ),
                    (
                        "TREE_PART",
                        f64::from(u8::from(!super::bench_switch("BITLORA_DECODE_ATOMIC"))),
                    ),
                    (
                        "TREE_REG",
                        f64::from(u8::from(!super::bench_switch("BITLORA_DECODE_SERIALTREE"))),
                    ),
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
        let kernel = if accumulate {
            self.kernel(&self.adding, "ternary_decode +=", "main", true)
        } else {
            self.kernel(&self.plain, "ternary_decode", "main", false)
        };
        rec.dispatch(
            kernel,
            &[
                &dims, &x.buffer, &nw.buffer, &w.buffer, &sw.buffer, &y.buffer,
            ],
            self.groups(),
        )
    }

    /// h (1, O) += BitLinear(RMSNorm(att); W, s_w), where att is the decode attention's
    /// output that [`super::Attention::encode_split`]'s combine dispatch would write from the
    /// chunk records `part` of [`super::Attention::encode_parts`]: that dispatch folded into
    /// this one, the same bits. Also leaves the new key (row `past` of the k cache) rotated,
    /// as the combine does; `(cos, sin)` are the RoPE tables ((P, HS/2), P > past).
    #[allow(clippy::too_many_arguments)]
    pub fn encode_att(
        &self,
        rec: &mut Recorder,
        part: &GpuTensor,
        nw: &GpuTensor,
        (w, sw): (&GpuTensor, &GpuTensor),
        h: &GpuTensor,
        k: &GpuTensor,
        (cos, sin): (&GpuTensor, &GpuTensor),
        past: usize,
    ) -> Result<(), GpuError> {
        const OP: &str = "ternary_decode_att";
        let Some((nh, nkv, hs)) = self.att else {
            return Err(GpuError::Shape {
                op: OP,
                msg: "a launcher made by TernaryDecode::new_att is needed".into(),
            });
        };
        expect(OP, nw, DType::F32, &[self.i])?;
        expect(OP, w, DType::Ternary, &[self.o, self.i])?;
        expect(OP, sw, DType::F32, &[1])?;
        expect(OP, h, DType::F32, &[1, self.o])?;
        at_least(OP, k, DType::F32, past + 1, nkv * hs)?;
        at_least(OP, cos, DType::F32, past + 1, hs / 2)?;
        at_least(OP, sin, DType::F32, past + 1, hs / 2)?;
        let need = nh * (past + 1).div_ceil(64) * (hs + 2);
        if part.dtype != DType::F32 || part.numel() < need {
            return Err(GpuError::Shape {
                op: OP,
                msg: format!(
                    "part is {:?} {:?}; need at least {need} f32",
                    part.dtype, part.shape
                ),
            });
        }
        let dims = rec.dims(OP, &[past])?;
        let kernel = self.kernel(&self.att_kernel, "ternary_decode o+att", "main_att", true);
        rec.dispatch_at(
            kernel,
            &[0, 1, 2, 3, 4, 5, 8, 11, 12],
            &[
                &dims,
                &part.buffer,
                &nw.buffer,
                &w.buffer,
                &sw.buffer,
                &h.buffer,
                &k.buffer,
                &cos.buffer,
                &sin.buffer,
            ],
            self.groups(),
        )
    }

    /// A token's q, k and v in one dispatch: row 0 of q = BitLinear(RMSNorm(x); W_q), and row
    /// `row` of the caches k and v = BitLinear(RMSNorm(x); W_k), (...; W_v). Each projection
    /// comes as its W (O, I) with s_w as a number: the scales travel in the dispatch's
    /// uniform, so that it binds eight storage buffers (WebGPU's default limit).
    #[allow(clippy::too_many_arguments)]
    pub fn encode_qkv(
        &self,
        rec: &mut Recorder,
        x: &GpuTensor,
        nw: &GpuTensor,
        (wq, sq): (&GpuTensor, f32),
        (wk, sk): (&GpuTensor, f32),
        (wv, sv): (&GpuTensor, f32),
        q: &GpuTensor,
        (k, v): (&GpuTensor, &GpuTensor),
        row: usize,
    ) -> Result<(), GpuError> {
        const OP: &str = "ternary_decode_qkv";
        self.check(OP, x, nw, &[])?;
        expect(OP, wq, DType::Ternary, &[self.o, self.i])?;
        expect(OP, wk, DType::Ternary, &[self.o_kv, self.i])?;
        expect(OP, wv, DType::Ternary, &[self.o_kv, self.i])?;
        at_least(OP, q, DType::F32, 1, self.o)?;
        at_least(OP, k, DType::F32, row + 1, self.o_kv)?;
        at_least(OP, v, DType::F32, row + 1, self.o_kv)?;
        let bits = |s: f32| s.to_bits() as usize;
        let dims = rec.dims(OP, &[row, bits(sq), bits(sk), bits(sv)])?;
        let kernel = self.kernel(&self.qkv, "ternary_decode qkv", "main_qkv", false);
        let groups = self.o.div_ceil(4).div_ceil(DECODE_LANES)
            + self.o_kv.div_ceil(4).div_ceil(DECODE_LANES);
        rec.dispatch_at(
            kernel,
            &[0, 1, 2, 3, 5, 6, 8, 9, 10],
            &[
                &dims, &x.buffer, &nw.buffer, &wq.buffer, &q.buffer, &wk.buffer, &k.buffer,
                &wv.buffer, &v.buffer,
            ],
            [groups, 1, 1],
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
        // The uniform is unused here, but the shader's row loads name it (main_att's).
        let dims = rec.dims(OP, &[0])?;
        let kernel = self.kernel(&self.glu, "ternary_decode glu", "main_glu", false);
        rec.dispatch_at(
            kernel,
            &[0, 1, 2, 3, 4, 5, 6, 7],
            &[
                &dims,
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
