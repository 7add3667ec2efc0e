//! Launcher for `shaders/attention.wgsl`.

use crate::GpuError;
use crate::record::{Kernel, Recorder, expect, rows};
use crate::tensor::{DType, GpuTensor};

pub const SOURCE: &str = include_str!("../../../../shaders/attention.wgsl");

/// Causal grouped-query attention, scores scaled by HS^-0.5, softmax in f32; query head h
/// reads kv head h / (NH/NKV).
///
/// Shapes: q (T, NH*HS) f32, k (T, NKV*HS) f32, v (T, NKV*HS) f32, out (T, NH*HS) f32.
#[derive(Clone, Debug)]
pub struct Attention {
    kernel: Kernel,
    nh: usize,
    nkv: usize,
    hs: usize,
}

impl Attention {
    /// NH must be a multiple of NKV.
    pub fn new(device: &wgpu::Device, nh: usize, nkv: usize, hs: usize) -> Attention {
        // The reference's scale, computed the same way on the CPU so both use the same f32.
        let scale = 1.0 / (hs as f32).sqrt();
        let kernel = Kernel::new(
            device,
            "attention",
            SOURCE,
            &[
                ("NH", super::c(nh)),
                ("NKV", super::c(nkv)),
                ("HS", super::c(hs)),
                ("SCALE", scale as f64),
                ("WG", super::c(super::WG)),
            ],
        );
        Attention {
            kernel,
            nh,
            nkv,
            hs,
        }
    }

    pub fn encode(
        &self,
        rec: &mut Recorder,
        q: &GpuTensor,
        k: &GpuTensor,
        v: &GpuTensor,
        out: &GpuTensor,
    ) -> Result<(), GpuError> {
        const OP: &str = "attention";
        let t = rows(OP, q, DType::F32, self.nh * self.hs)?;
        expect(OP, k, DType::F32, &[t, self.nkv * self.hs])?;
        expect(OP, v, DType::F32, &[t, self.nkv * self.hs])?;
        expect(OP, out, DType::F32, &[t, self.nh * self.hs])?;
        rec.dispatch(
            &self.kernel,
            &[&q.buffer, &k.buffer, &v.buffer, &out.buffer],
            [t, self.nh, 1],
        )
    }
}
