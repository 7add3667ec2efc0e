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
///
/// Two ways to run it, giving the same bits: [`Attention::encode_cached`], one workgroup per
/// (query, head) walking the row's chunks of [`Attention::CHUNK`] keys, and
/// [`Attention::encode_split`], one workgroup per (chunk, head, query) and a second dispatch
/// that adds the chunks up: for decoding, where T_Q = 1 leaves only NH workgroups otherwise.
#[derive(Clone, Debug)]
pub struct Attention {
    kernel: Kernel,
    part: Kernel,
    combine: Kernel,
    nh: usize,
    nkv: usize,
    hs: usize,
}

impl Attention {
    /// Rows of at most this many keys keep their scores in workgroup memory (4 KiB of the
    /// 16 KiB WebGPU guarantees); longer rows recompute them (`shaders/attention.wgsl`).
    pub const SCORE_CACHE: usize = 1024;

    /// Keys per chunk of the softmax (`shaders/attention.wgsl` CH, the CPU's
    /// `ops::ATTENTION_CHUNK`).
    pub const CHUNK: usize = bitlora_core::ops::ATTENTION_CHUNK;

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
        let constants = [
            ("NH", super::c(nh)),
            ("NKV", super::c(nkv)),
            ("HS", super::c(hs)),
            ("SCALE", scale as f64),
            ("WG", super::c(super::WG)),
            ("SMAX", super::c(smax.max(1))),
            (
                "WIDE",
                f64::from(u8::from(
                    hs.is_multiple_of(4) && !super::bench_switch("BITLORA_ATT_NARROW"),
                )),
            ),
        ];
        let entry = |name, entry| Kernel::entry(device, name, SOURCE, entry, &constants);
        Attention {
            kernel: entry("attention", "main"),
            part: entry("attention (chunks)", "main_part"),
            combine: entry("attention (combine)", "main_combine"),
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

    /// f32 elements of [`Attention::encode_split`]'s `part` for T_Q queries over T_KV keys.
    pub fn part_len(&self, t_q: usize, t_kv: usize) -> usize {
        t_q * self.nh * t_kv.div_ceil(Self::CHUNK) * (self.hs + 2)
    }

    /// As [`Attention::encode_cached`] after RoPE, the keys split into chunks that run in
    /// workgroups of their own; `part` (at least [`Attention::part_len`] f32) holds each
    /// chunk's sums between the two dispatches. RoPE is applied here: q and the new keys
    /// (rows T_KV - T_Q .. T_KV of k) come in unrotated and the new keys are left rotated, as
    /// [`super::RopePair`] with the tables `(cos, sin)` ((P, HS/2), P >= T_KV) and then
    /// `encode_cached` would leave them, with the same bits for `out`.
    #[allow(clippy::too_many_arguments)]
    pub fn encode_split(
        &self,
        rec: &mut Recorder,
        q: &GpuTensor,
        k: &GpuTensor,
        v: &GpuTensor,
        t_kv: usize,
        part: &GpuTensor,
        out: &GpuTensor,
        (cos, sin): (&GpuTensor, &GpuTensor),
    ) -> Result<(), GpuError> {
        const OP: &str = "attention (split)";
        let (t_q, dims) = self.check(OP, rec, q, k, v, t_kv, Some(out))?;
        self.parts(rec, OP, (q, k, v), t_kv, part, (cos, sin), (t_q, &dims))?;
        let (c, s) = (&cos.buffer, &sin.buffer);
        rec.dispatch_at(
            &self.combine,
            &[0, 4, 5, 6, 7, 8],
            &[&dims, &out.buffer, &part.buffer, &k.buffer, c, s],
            [t_q, self.nh, 1],
        )
    }

    /// Checks the shapes; returns T_Q and the uniform (T_Q, PAST).
    #[allow(clippy::too_many_arguments)]
    fn check(
        &self,
        op: &'static str,
        rec: &mut Recorder,
        q: &GpuTensor,
        k: &GpuTensor,
        v: &GpuTensor,
        t_kv: usize,
        out: Option<&GpuTensor>,
    ) -> Result<(usize, wgpu::Buffer), GpuError> {
        let t_q = rows(op, q, DType::F32, self.nh * self.hs)?;
        if t_kv < t_q {
            return Err(GpuError::Shape {
                op,
                msg: format!("T_KV = {t_kv} keys for T_Q = {t_q} queries; need T_KV >= T_Q"),
            });
        }
        let r = at_least(op, k, DType::F32, t_kv, self.nkv * self.hs)?;
        expect(op, v, DType::F32, &[r, self.nkv * self.hs])?;
        if let Some(out) = out {
            expect(op, out, DType::F32, &[t_q, self.nh * self.hs])?;
        }
        let dims = rec.dims(op, &[t_q, t_kv - t_q])?;
        Ok((t_q, dims))
    }

    /// The first of [`Attention::encode_split`]'s two dispatches alone: each chunk's sums
    /// into `part`, for a consumer that combines them itself
    /// ([`super::TernaryDecode::encode_att`], which also rotates the new keys as the combine
    /// would).
    #[allow(clippy::too_many_arguments)]
    pub fn encode_parts(
        &self,
        rec: &mut Recorder,
        q: &GpuTensor,
        k: &GpuTensor,
        v: &GpuTensor,
        t_kv: usize,
        part: &GpuTensor,
        (cos, sin): (&GpuTensor, &GpuTensor),
    ) -> Result<(), GpuError> {
        const OP: &str = "attention (parts)";
        let (t_q, dims) = self.check(OP, rec, q, k, v, t_kv, None)?;
        self.parts(rec, OP, (q, k, v), t_kv, part, (cos, sin), (t_q, &dims))
    }

    /// Checks the tables and `part`, then records `main_part`.
    #[allow(clippy::too_many_arguments)]
    fn parts(
        &self,
        rec: &mut Recorder,
        op: &'static str,
        (q, k, v): (&GpuTensor, &GpuTensor, &GpuTensor),
        t_kv: usize,
        part: &GpuTensor,
        (cos, sin): (&GpuTensor, &GpuTensor),
        (t_q, dims): (usize, &wgpu::Buffer),
    ) -> Result<(), GpuError> {
        for table in [cos, sin] {
            at_least(op, table, DType::F32, t_kv, self.hs / 2)?;
        }
        let need = self.part_len(t_q, t_kv);
        if part.dtype != DType::F32 || part.numel() < need {
            return Err(GpuError::Shape {
                op,
                msg: format!(
                    "part is {:?} {:?}; need at least {need} f32",
                    part.dtype, part.shape
                ),
            });
        }
        let (c, s) = (&cos.buffer, &sin.buffer);
        rec.dispatch_at(
            &self.part,
            &[0, 1, 2, 3, 5, 7, 8, 9],
            &[
                dims,
                &q.buffer,
                &k.buffer,
                &v.buffer,
                &part.buffer,
                c,
                s,
                &k.buffer,
            ],
            [t_kv.div_ceil(Self::CHUNK), self.nh, t_q],
        )
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
        let (t_q, dims) = self.check("attention", rec, q, k, v, t_kv, Some(out))?;
        rec.dispatch_at(
            &self.kernel,
            &[0, 1, 2, 3, 4, 9],
            &[
                &dims,
                &q.buffer,
                &k.buffer,
                &v.buffer,
                &out.buffer,
                &k.buffer,
            ],
            [t_q, self.nh, 1],
        )
    }
}
