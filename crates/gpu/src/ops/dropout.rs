//! Launcher for `shaders/dropout.wgsl`.

use crate::GpuError;
use crate::record::{Kernel, Recorder, expect, rows};
use crate::tensor::{DType, GpuTensor};

pub const SOURCE: &str = include_str!("../../../../shaders/dropout.wgsl");

/// LoRA dropout with the CPU reference's random numbers: input (t, i) is kept when draw
/// `t*I + i` of the stream starting at RNG state `state` (a `bitlora_core::rng::Rng` state) is
/// not below `p`, as `bitlora_core::train::dropout_draws` draws them, and then multiplied by
/// `1/(1-p)`; a dropped input becomes 0. The kernel computes each draw itself (SplitMix64 is
/// counter-based); after the T*I draws the host moves its RNG on with `Rng::skip(T * I)`.
///
/// Shapes: x (T, I) f32, out (T, I) f32 (written by [`Dropout::encode`], added into by
/// [`Dropout::encode_add`]).
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
        state: u64,
        p: f32,
        out: &GpuTensor,
    ) -> Result<(), GpuError> {
        self.record(rec, &self.kernel, x, state, p, out)
    }

    /// out += x * m (the adapter's input gradient in the backward).
    pub fn encode_add(
        &self,
        rec: &mut Recorder,
        x: &GpuTensor,
        state: u64,
        p: f32,
        out: &GpuTensor,
    ) -> Result<(), GpuError> {
        self.record(rec, &self.kernel_add, x, state, p, out)
    }

    fn record(
        &self,
        rec: &mut Recorder,
        kernel: &Kernel,
        x: &GpuTensor,
        state: u64,
        p: f32,
        out: &GpuTensor,
    ) -> Result<(), GpuError> {
        const OP: &str = "dropout";
        let t = rows(OP, x, DType::F32, self.i)?;
        expect(OP, out, DType::F32, &[t, self.i])?;
        if u32::try_from(t * self.i).is_err() || !(0.0..1.0).contains(&p) {
            return Err(GpuError::Shape {
                op: OP,
                msg: format!(
                    "{t} x {} inputs with p = {p}: need T*I < 2^32, 0 <= p < 1",
                    self.i
                ),
            });
        }
        let keep = bitlora_core::train::dropout_keep_factor(p);
        let dims = rec.uniform_words(&[
            t as u32,
            keep.to_bits(),
            p.to_bits(),
            state as u32,
            (state >> 32) as u32,
        ]);
        rec.dispatch(
            kernel,
            &[&dims, &x.buffer, &out.buffer],
            [self.i.div_ceil(super::WG), t, 1],
        )
    }
}
