//! Launcher for `shaders/matmul_backward.wgsl`.

use crate::GpuError;
use crate::record::{Kernel, Recorder, at_least, rows};
use crate::tensor::{DType, GpuTensor, SplitTensor};

pub const SOURCE: &str = include_str!("../../../../shaders/matmul_backward.wgsl");

/// Tokens and columns of dx per invocation (the shader's `TT` and `TI`).
const TT: usize = 8;
const TI: usize = 4;

/// The backward of [`super::Matmul`] to its input: `dx = dy . W`, the language-model head's
/// dX from dlogits (W is the embedding when tied).
///
/// Shapes: dy (T, O) f32, W (O, I) f32 as a [`SplitTensor`] (chunks along O, one dispatch
/// each), dx (R, I) f32 with rows `dx_row0 .. dx_row0 + T` written (R >= dx_row0 + T): a
/// window of rows of logits gives the dX of those rows.
#[derive(Clone, Debug)]
pub struct MatmulBackward {
    kernel: Kernel,
    i: usize,
    o: usize,
}

impl MatmulBackward {
    pub fn new(device: &wgpu::Device, i: usize, o: usize) -> MatmulBackward {
        let kernel = Kernel::new(
            device,
            "matmul_backward",
            SOURCE,
            &[
                ("I", super::c(i)),
                ("O", super::c(o)),
                ("WG", super::c(super::WG)),
            ],
        );
        MatmulBackward { kernel, i, o }
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
        const OP: &str = "matmul_backward";
        if w.rows != self.o || w.cols != self.i {
            return Err(GpuError::Shape {
                op: OP,
                msg: format!(
                    "`{}` is ({}, {}), expected (O, I) = ({}, {})",
                    w.name, w.rows, w.cols, self.o, self.i
                ),
            });
        }
        let t = rows(OP, dy, DType::F32, self.o)?;
        at_least(OP, dx, DType::F32, dx_row0 + t, self.i)?;
        for (k, (o0, chunk)) in w.chunks.iter().enumerate() {
            let oc = at_least(OP, chunk, DType::F32, 1, self.i)?;
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
            let fit = |v: usize| {
                u32::try_from(v).map_err(|_| GpuError::Shape {
                    op: OP,
                    msg: format!("{v} does not fit a u32 shader constant"),
                })
            };
            let dims = rec.uniform_words(&[
                fit(t)?,
                fit(dx_row0)?,
                fit(oc)?,
                fit(*o0)?,
                u32::from(k > 0),
            ]);
            rec.dispatch(
                &self.kernel,
                &[&dims, &dy.buffer, &chunk.buffer, &dx.buffer],
                [self.i.div_ceil(TI).div_ceil(super::WG), t.div_ceil(TT), 1],
            )?;
        }
        Ok(())
    }
}
