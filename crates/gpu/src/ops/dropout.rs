//! Launcher for `shaders/dropout.wgsl`.

use crate::GpuError;
use crate::record::{Kernel, Recorder, expect, rows};
use crate::tensor::{DType, GpuTensor};

pub const SOURCE: &str = include_str!("../../../../shaders/dropout.wgsl");

/// LoRA dropout from a bit mask drawn on the CPU (`bitlora_core::train::dropout_draws`): bit
/// `t*I + i` of the segment starting at mask word `word0` keeps input (t, i), which is then
/// multiplied by `keep = 1/(1-p)`; a dropped input becomes 0.
///
/// Shapes: x (T, I) f32, mask (W) u32 with W >= word0 + ceil(T*I/32), out (T, I) f32
/// (written by [`Dropout::encode`], added into by [`Dropout::encode_add`]).
#[derive(Clone, Debug)]
pub struct Dropout {
    kernel: Kernel,
    kernel_add: Kernel,
    i: usize,
}

impl Dropout {
    pub fn new(device: &wgpu::Device, i: usize) -> Dropout {
        let k = |acc: f64| {
            Kernel::new(
                device,
                "dropout",
                SOURCE,
                &[
                    ("I", super::c(i)),
                    ("WG", super::c(super::WG)),
                    ("ACC", acc),
                ],
            )
        };
        Dropout {
            kernel: k(0.0),
            kernel_add: k(1.0),
            i,
        }
    }

    /// I, the width of the rows it masks.
    pub fn width(&self) -> usize {
        self.i
    }

    /// out = x * m (the adapter's input in the forward).
    pub fn encode(
        &self,
        rec: &mut Recorder,
        x: &GpuTensor,
        mask: &GpuTensor,
        word0: usize,
        keep: f32,
        out: &GpuTensor,
    ) -> Result<(), GpuError> {
        self.record(rec, &self.kernel, x, mask, word0, keep, out)
    }

    /// out += x * m (the adapter's input gradient in the backward).
    pub fn encode_add(
        &self,
        rec: &mut Recorder,
        x: &GpuTensor,
        mask: &GpuTensor,
        word0: usize,
        keep: f32,
        out: &GpuTensor,
    ) -> Result<(), GpuError> {
        self.record(rec, &self.kernel_add, x, mask, word0, keep, out)
    }

    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        rec: &mut Recorder,
        kernel: &Kernel,
        x: &GpuTensor,
        mask: &GpuTensor,
        word0: usize,
        keep: f32,
        out: &GpuTensor,
    ) -> Result<(), GpuError> {
        const OP: &str = "dropout";
        let t = rows(OP, x, DType::F32, self.i)?;
        expect(OP, out, DType::F32, &[t, self.i])?;
        let words = (t * self.i).div_ceil(32);
        match mask.shape[..] {
            [w] if mask.dtype == DType::U32 && w >= word0 + words => {}
            _ => {
                return Err(GpuError::Shape {
                    op: OP,
                    msg: format!(
                        "mask `{}` is {:?} {:?}, expected U32 (W) with W >= {}",
                        mask.name,
                        mask.dtype,
                        mask.shape,
                        word0 + words
                    ),
                });
            }
        }
        let fit = |v: usize| {
            u32::try_from(v).map_err(|_| GpuError::Shape {
                op: OP,
                msg: format!("{v} does not fit a u32 shader constant"),
            })
        };
        let dims = rec.uniform([fit(t)?, fit(word0)?, keep.to_bits(), 0]);
        rec.dispatch(
            kernel,
            &[&dims, &x.buffer, &mask.buffer, &out.buffer],
            [self.i.div_ceil(super::WG), t, 1],
        )
    }
}
