//! Launcher for `shaders/attention_backward_q.wgsl` and `shaders/attention_backward_kv.wgsl`
//! (the two passes of one op).

use crate::GpuError;
use crate::record::{Kernel, Recorder, expect, rows};
use crate::tensor::{DType, GpuTensor};

pub const SOURCE_Q: &str = include_str!("../../../../shaders/attention_backward_q.wgsl");
pub const SOURCE_KV: &str = include_str!("../../../../shaders/attention_backward_kv.wgsl");

/// Causal GQA attention backward: dq, dk, dv from q, k (after RoPE), v and dout; the
/// probabilities are recomputed, and dk, dv of a kv-head sum over its group of query heads.
/// Pass 1 runs a workgroup per (query row, head), pass 2 one per (key row, kv-head), each
/// splitting its loop over keys (rows) across the workgroup; every sum keeps the CPU
/// reference's order.
///
/// Shapes: q (T, NH*HS) f32, k (T, NKV*HS) f32, v (T, NKV*HS) f32, dout (T, NH*HS) f32,
/// stats (NH, T, 3) f32 scratch (written by pass 1, read by pass 2), dq (T, NH*HS) f32,
/// dk (T, NKV*HS) f32, dv (T, NKV*HS) f32 (all three written).
#[derive(Clone, Debug)]
pub struct AttentionBackward {
    q_pass: Kernel,
    kv_pass: Kernel,
    nh: usize,
    nkv: usize,
    hs: usize,
}

/// Keys per query row whose score and dP pass 1 keeps in workgroup memory (its `SMAX`).
const KEPT_KEYS: usize = 1024;

impl AttentionBackward {
    /// `nkv` must divide `nh`.
    pub fn new(device: &wgpu::Device, nh: usize, nkv: usize, hs: usize) -> AttentionBackward {
        Self::with_kept_keys(device, nh, nkv, hs, KEPT_KEYS)
    }

    /// Pass 1 keeping the score and dP of rows of at most `kept` keys (1 ..= 1024) in
    /// workgroup memory and recomputing them for longer rows (tests cover both: the values
    /// are the same bit for bit).
    pub fn with_kept_keys(
        device: &wgpu::Device,
        nh: usize,
        nkv: usize,
        hs: usize,
        kept: usize,
    ) -> AttentionBackward {
        assert!(
            (1..=KEPT_KEYS).contains(&kept),
            "attention_backward: 1 ..= {KEPT_KEYS} kept keys"
        );
        assert!(
            nkv > 0 && nh.is_multiple_of(nkv),
            "NKV = {nkv} must divide NH = {nh}"
        );
        let consts = [
            ("NH", super::c(nh)),
            ("NKV", super::c(nkv)),
            ("HS", super::c(hs)),
            ("WG", super::c(super::WG)),
        ];
        let mut q_consts = consts.to_vec();
        q_consts.push(("SMAX", super::c(kept)));
        AttentionBackward {
            q_pass: Kernel::new(device, "attention_backward_q", SOURCE_Q, &q_consts),
            kv_pass: Kernel::new(device, "attention_backward_kv", SOURCE_KV, &consts),
            nh,
            nkv,
            hs,
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn encode(
        &self,
        rec: &mut Recorder,
        q: &GpuTensor,
        k: &GpuTensor,
        v: &GpuTensor,
        dout: &GpuTensor,
        stats: &GpuTensor,
        dq: &GpuTensor,
        dk: &GpuTensor,
        dv: &GpuTensor,
    ) -> Result<(), GpuError> {
        const OP: &str = "attention_backward";
        let (qw, kw) = (self.nh * self.hs, self.nkv * self.hs);
        let t = rows(OP, q, DType::F32, qw)?;
        expect(OP, k, DType::F32, &[t, kw])?;
        expect(OP, v, DType::F32, &[t, kw])?;
        expect(OP, dout, DType::F32, &[t, qw])?;
        expect(OP, stats, DType::F32, &[self.nh, t, 3])?;
        expect(OP, dq, DType::F32, &[t, qw])?;
        expect(OP, dk, DType::F32, &[t, kw])?;
        expect(OP, dv, DType::F32, &[t, kw])?;
        let dims = rec.dims(OP, &[t])?;
        // A workgroup per (row, head): see the shaders' headers.
        let groups = t;
        rec.dispatch(
            &self.q_pass,
            &[
                &dims,
                &q.buffer,
                &k.buffer,
                &v.buffer,
                &dout.buffer,
                &stats.buffer,
                &dq.buffer,
            ],
            [groups, self.nh, 1],
        )?;
        rec.dispatch(
            &self.kv_pass,
            &[
                &dims,
                &q.buffer,
                &k.buffer,
                &v.buffer,
                &dout.buffer,
                &stats.buffer,
                &dk.buffer,
                &dv.buffer,
            ],
            [groups, self.nkv, 1],
        )
    }
}
