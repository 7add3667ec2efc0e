//! Launcher for `shaders/attention.wgsl`.

use crate::GpuError;
use crate::record::{Kernel, Recorder, at_least, expect, rows};
use crate::tensor::{DType, GpuTensor};

pub const SOURCE: &str = include_str!("../../../../shaders/attention.wgsl");

/// Causal grouped-query attention, scores scaled by HS^-0.5, softmax in f32; query head h
/// reads kv head h / (NH/NKV). T_Q new queries attend over T_KV keys, the last T_Q of which
/// are their own (query i sits at position T_KV - T_Q + i), as
/// `bitlora_core::ops::attention_cached`.
///
/// Shapes: q (T_Q, NH*HS) f32, k (R, NKV*HS) f32, v (R, NKV*HS) f32 with R >= T_KV (a KV
/// cache of capacity R holding T_KV tokens), out (T_Q, NH*HS) f32.
#[derive(Clone, Debug)]
pub struct Attention {
    kernel: Kernel,
    nh: usize,
    nkv: usize,
    hs: usize,
}

impl Attention {
    /// Rows of at most this many keys keep their scores in workgroup memory (4 KiB of the
    /// 16 KiB WebGPU guarantees); longer rows recompute them (`shaders/attention.wgsl`).
    pub const SCORE_CACHE: usize = 1024;

    /// NH must be a multiple of NKV.
    pub fn new(device: &wgpu::Device, nh: usize, nkv: usize, hs: usize) -> Attention {
        Self::with_score_cache(device, nh, nkv, hs, Self::SCORE_CACHE)
    }

    /// [`Attention::new`] keeping the scores of rows of at most `smax` keys in workgroup
    /// memory; the result is the same bits for any `smax` (the tests run both paths).
    pub fn with_score_cache(
        device: &wgpu::Device,
        nh: usize,
        nkv: usize,
        hs: usize,
        smax: usize,
    ) -> Attention {
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
                ("SMAX", super::c(smax.max(1))),
            ],
        );
        Attention {
            kernel,
            nh,
            nkv,
            hs,
        }
    }

    /// The whole-sequence case: k and v are exactly (T, NKV*HS), T = T_Q = T_KV.
    pub fn encode(
        &self,
        rec: &mut Recorder,
        q: &GpuTensor,
        k: &GpuTensor,
        v: &GpuTensor,
        out: &GpuTensor,
    ) -> Result<(), GpuError> {
        let t = rows("attention", q, DType::F32, self.nh * self.hs)?;
        expect("attention", k, DType::F32, &[t, self.nkv * self.hs])?;
        self.encode_cached(rec, q, k, v, t, out)
    }

    /// T_Q queries over the first `t_kv` rows of k and v.
    pub fn encode_cached(
        &self,
        rec: &mut Recorder,
        q: &GpuTensor,
        k: &GpuTensor,
        v: &GpuTensor,
        t_kv: usize,
        out: &GpuTensor,
    ) -> Result<(), GpuError> {
        const OP: &str = "attention";
        let t_q = rows(OP, q, DType::F32, self.nh * self.hs)?;
        if t_kv < t_q {
            return Err(GpuError::Shape {
                op: OP,
                msg: format!("T_KV = {t_kv} keys for T_Q = {t_q} queries; need T_KV >= T_Q"),
            });
        }
        let r = at_least(OP, k, DType::F32, t_kv, self.nkv * self.hs)?;
        expect(OP, v, DType::F32, &[r, self.nkv * self.hs])?;
        expect(OP, out, DType::F32, &[t_q, self.nh * self.hs])?;
        let dims = rec.dims(OP, &[t_q, t_kv - t_q])?;
        rec.dispatch(
            &self.kernel,
            &[&dims, &q.buffer, &k.buffer, &v.buffer, &out.buffer],
            [t_q, self.nh, 1],
        )
    }
}
