//! Launcher for `shaders/matmul_backward.wgsl` and `shaders/matmul_backward_reduce.wgsl` (the
//! second pass when the sum over O is split across workgroups).

use crate::GpuError;
use crate::record::{Kernel, Recorder, at_least, rows};
use crate::tensor::{DType, GpuTensor, SplitTensor};

pub const SOURCE: &str = include_str!("../../../../shaders/matmul_backward.wgsl");
pub const SOURCE_REDUCE: &str = include_str!("../../../../shaders/matmul_backward_reduce.wgsl");

/// Tokens and columns of dx per invocation (the shader's `TT` and `TI`).
const TT: usize = 8;
const TI: usize = 4;

/// The backward of [`super::Matmul`] to its input: `dx = dy . W`, the language-model head's
/// dX from dlogits (W is the embedding when tied).
///
/// Shapes: dy (T, O) f32, W (O, I) f32 (or bf16: [`MatmulBackward::with_bf16`], widened
/// exactly, the same results) as a [`SplitTensor`] (chunks along O, one dispatch each),
/// dx (R, I) f32 with rows `dx_row0 .. dx_row0 + T` written (R >= dx_row0 + T): a
/// window of rows of logits gives the dX of those rows.
///
/// [`MatmulBackward::encode_split`] sums each output in one invocation (CPU adapters).
/// [`MatmulBackward::encode_split_k`] splits the long sum over O = V into S slabs summed by
/// separate workgroups into a scratch (S, TP, I), TP >= T, then adds the slabs: T x I outputs
/// are too few to keep a GPU busy over a 32k-128k vocabulary otherwise.
#[derive(Clone, Debug)]
pub struct MatmulBackward {
    kernel: Kernel,
    reduce: Kernel,
    i: usize,
    o: usize,
    /// W's element type: F32 or Bf16.
    w: DType,
}

impl MatmulBackward {
    /// For an f32 W.
    pub fn new(device: &wgpu::Device, i: usize, o: usize) -> MatmulBackward {
        Self::with_bf16(device, i, o, false)
    }

    /// For a [`DType::Bf16`] W with `bf16`, else an f32 one.
    pub fn with_bf16(device: &wgpu::Device, i: usize, o: usize, bf16: bool) -> MatmulBackward {
        let consts = [
            ("I", super::c(i)),
            ("O", super::c(o)),
            ("WG", super::c(super::WG)),
            ("BF16", f64::from(u8::from(bf16))),
        ];
        MatmulBackward {
            kernel: Kernel::new(device, "matmul_backward", SOURCE, &consts),
            reduce: Kernel::new(
                device,
                "matmul_backward_reduce",
                SOURCE_REDUCE,
                &[("I", super::c(i)), ("WG", super::c(super::WG))],
            ),
            i,
            o,
            w: if bf16 { DType::Bf16 } else { DType::F32 },
        }
    }

    /// dx[dx_row0 .. dx_row0 + T] = dy . W, over every chunk of W.
    pub fn encode_split(
        &self,
        rec: &mut Recorder,
        dy: &GpuTensor,
        w: &SplitTensor,
        dx: &GpuTensor,
        dx_row0: usize,
    ) -> Result<(), GpuError> {
        let t = self.check(dy, w)?;
        at_least("matmul_backward", dx, DType::F32, dx_row0 + t, self.i)?;
        self.chunks(rec, dy, w, dx, dx_row0, 1, 0)
    }

    /// As [`MatmulBackward::encode_split`], the sum over O split into S = `scratch.shape[0]`
    /// slabs: scratch (S, TP, I) f32 with TP >= T holds the partial sums.
    pub fn encode_split_k(
        &self,
        rec: &mut Recorder,
        dy: &GpuTensor,
        w: &SplitTensor,
        dx: &GpuTensor,
        dx_row0: usize,
        scratch: &GpuTensor,
    ) -> Result<(), GpuError> {
        const OP: &str = "matmul_backward";
        let t = self.check(dy, w)?;
        at_least(OP, dx, DType::F32, dx_row0 + t, self.i)?;
        let (s, tp) = match scratch.shape[..] {
            [s, tp, i] if i == self.i && tp >= t && s > 0 && scratch.dtype == DType::F32 => (s, tp),
            _ => {
                return Err(GpuError::Shape {
                    op: OP,
                    msg: format!(
                        "scratch `{}` is {:?} {:?}, expected F32 (S, TP, {}) with TP >= {t}",
                        scratch.name, scratch.dtype, scratch.shape, self.i
                    ),
                });
            }
        };
        self.chunks(rec, dy, w, scratch, 0, s, tp * self.i)?;
        let dims = rec.dims(OP, &[t, dx_row0, s, tp * self.i])?;
        rec.dispatch(
            &self.reduce,
            &[&dims, &scratch.buffer, &dx.buffer],
            [self.i.div_ceil(super::WG), t, 1],
        )
    }

    /// T, after checking dy and W.
    fn check(&self, dy: &GpuTensor, w: &SplitTensor) -> Result<usize, GpuError> {
        if w.rows != self.o || w.cols != self.i {
            return Err(GpuError::Shape {
                op: "matmul_backward",
                msg: format!(
                    "`{}` is ({}, {}), expected (O, I) = ({}, {})",
                    w.name, w.rows, w.cols, self.o, self.i
                ),
            });
        }
        rows("matmul_backward", dy, DType::F32, self.o)
    }

    /// One dispatch per chunk of W, each with `slabs` workgroups along z.
    #[allow(clippy::too_many_arguments)]
    fn chunks(
        &self,
        rec: &mut Recorder,
        dy: &GpuTensor,
        w: &SplitTensor,
        out: &GpuTensor,
        out_row0: usize,
        slabs: usize,
        slab_stride: usize,
    ) -> Result<(), GpuError> {
        const OP: &str = "matmul_backward";
        let t = dy.shape[0];
        let fit = |v: usize| {
            u32::try_from(v).map_err(|_| GpuError::Shape {
                op: OP,
                msg: format!("{v} does not fit a u32 shader constant"),
            })
        };
        for (k, (o0, chunk)) in w.chunks.iter().enumerate() {
            let oc = at_least(OP, chunk, self.w, 1, self.i)?;
            if o0 + oc > self.o {
                return Err(GpuError::Shape {
                    op: OP,
                    msg: format!(
                        "W chunk `{}` rows {o0}..{} beyond O = {}",
                        chunk.name,
                        o0 + oc,
                        self.o
                    ),
                });
            }
            let dims = rec.uniform_words(&[
                fit(t)?,
                fit(out_row0)?,
                fit(oc)?,
                fit(*o0)?,
                u32::from(k > 0),
                fit(oc.div_ceil(slabs))?,
                fit(slab_stride)?,
            ]);
            rec.dispatch(
                &self.kernel,
                &[&dims, &dy.buffer, &chunk.buffer, &out.buffer],
                [
                    self.i.div_ceil(TI).div_ceil(super::WG),
                    t.div_ceil(TT),
                    slabs,
                ],
            )?;
        }
        Ok(())
    }
}
