//! Launcher for `shaders/matmul.wgsl`.

use std::ops::Range;

use crate::GpuError;
use crate::record::{Kernel, Recorder, at_least, expect, rows};
use crate::tensor::{DType, GpuTensor, SplitTensor};

pub const SOURCE: &str = include_str!("../../../../shaders/matmul.wgsl");

/// Tokens and outputs per invocation of the blocked pipeline (the shader's `TT`, `TO`); the
/// decoding pipeline (T = 1) has one of each.
const TT: usize = 8;
const TO: usize = 4;

/// Dense f32 `y = x . W^T`: the language-model head (W is the embedding when tied).
///
/// Shapes: x (T, I) f32, W (O, I) f32, y (T, O) f32. With [`Matmul::encode_split`], W is split
/// along O into chunks (OC, I) (one dispatch each, filling columns o0 .. o0+OC of y) and x may
/// be a window `x_rows` of a taller (R, I) buffer, T = x_rows.len().
#[derive(Clone, Debug)]
pub struct Matmul {
    kernel: Kernel,
    /// TT = TO = 1: one token (decoding).
    kernel_one: Kernel,
    i: usize,
    o: usize,
}

impl Matmul {
    pub fn new(device: &wgpu::Device, i: usize, o: usize) -> Matmul {
        let k = |tt: usize, to: usize| {
            Kernel::new(
                device,
                "matmul",
                SOURCE,
                &[
                    ("I", super::c(i)),
                    ("O", super::c(o)),
                    ("WG", super::c(super::WG)),
                    ("TT", super::c(tt)),
                    ("TO", super::c(to)),
                ],
            )
        };
        Matmul {
            kernel: k(TT, TO),
            kernel_one: k(1, 1),
            i,
            o,
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
        expect("matmul", w, DType::F32, &[self.o, self.i])?;
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
        let oc = at_least(OP, w_chunk, DType::F32, 1, self.i)?;
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
        let (kernel, tt, to) = if t == 1 {
            (&self.kernel_one, 1, 1)
        } else {
            (&self.kernel, TT, TO)
        };
        rec.dispatch(
            kernel,
            &[&dims, &x.buffer, &w_chunk.buffer, &y.buffer],
            [oc.div_ceil(to).div_ceil(super::WG), t.div_ceil(tt), 1],
        )
    }
}
