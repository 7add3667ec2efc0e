//! Recording one training pass: the forward saving activations, the head and loss in windows
//! of rows, the backward in exact reverse, and the gathering of the adapter's gradients into the
//! optimizer's flat buffers. See the module doc of [`super`] for the order of the ops.

use bitlora_core::model::Proj;

use super::optimizer::Resident;
use super::{Acts, GpuTrainer, MaskPlan, Mode, PairBufs};
use crate::GpuError;
use crate::ops::{Dropout, LoraMatmul};
use crate::record::Recorder;
use crate::tensor::GpuTensor;

/// One step being recorded: the trainer, the views of its buffers for T tokens, and the
/// adapter's scale, dropout factor and mask plan.
pub(super) struct Step<'a> {
    /// Where the backward's gradients go ([`Step::grads_out`]).
    pub(super) mode: Mode,
    pub(super) tr: &'a GpuTrainer,
    pub(super) a: &'a Acts,
    pub(super) t: usize,
    /// The adapter's scale (alpha / r, or rsLoRA's) and dropout probability.
    pub(super) scale: f32,
    pub(super) dropout: f32,
    pub(super) plan: &'a MaskPlan,
    /// The resident optimizer state of a run (its flat gradients are the backward's target),
    /// and whether its adapter must first be copied into the pairs' A and B.
    pub(super) res: Option<&'a Resident>,
    pub(super) restore: bool,
}

impl Step<'_> {
    /// Copies the optimizer's adapter into the pairs' A and B when they hold another.
    pub(super) fn restore_adapter(&self, r: &mut Recorder) {
        if let Some(o) = self.res.filter(|_| self.restore) {
            o.copy_adapter_out(r, &self.tr.adapter, self.tr.max_tokens);
        }
    }

    /// After the backward has copied this sequence's dA and dB into the optimizer's flat
    /// gradients ([`Step::grads_out`]): adds a later sequence's into the step's, and after the
    /// last sequence reduces their squared norm.
    pub(super) fn flat_grads(
        &self,
        r: &mut Recorder,
        first: bool,
        last: bool,
    ) -> Result<(), GpuError> {
        let o = self.res.ok_or(GpuError::Shape {
            op: "GpuTrainer",
            msg: "a flat step without the optimizer's buffers".into(),
        })?;
        if !first {
            let g2 = o.g2.as_ref().ok_or(GpuError::Shape {
                op: "GpuTrainer",
                msg: "a later sequence of a step without the second gradient buffer".into(),
            })?;
            o.add.encode(r, &o.g, g2)?;
        }
        if last {
            o.sum_squares.encode(r, &o.g, &o.partials, &o.sumsq)?;
        }
        Ok(())
    }

    /// Copies layer l's dA and dB (buffers the layers share) to where the pass gathers them:
    /// the optimizer's flat gradients (set by a step's first sequence; a later one's go to
    /// the second buffer, which [`Step::flat_grads`] adds in), or the staging readback at
    /// their offsets.
    fn grads_out(&self, r: &mut Recorder, l: usize) -> Result<(), GpuError> {
        let (dst, base) = match self.mode {
            Mode::Loss => return Ok(()),
            Mode::Staging => (&self.tr.staging, 0),
            Mode::Flat { first, .. } => {
                let o = self.res.ok_or(GpuError::Shape {
                    op: "GpuTrainer",
                    msg: "a flat step without the optimizer's buffers".into(),
                })?;
                let g = if first {
                    &o.g
                } else {
                    o.g2.as_ref().ok_or(GpuError::Shape {
                        op: "GpuTrainer",
                        msg: "a later sequence of a step without the second gradient buffer".into(),
                    })?
                };
                (&g.buffer, self.tr.max_tokens)
            }
        };
        for pair in self.tr.adapter[l].iter().flatten() {
            let (oa, ob) = pair.staging;
            r.copy(
                &pair.da.buffer,
                0,
                dst,
                (4 * (oa - base)) as u64,
                pair.da.bytes(),
            );
            r.copy(
                &pair.db.buffer,
                0,
                dst,
                (4 * (ob - base)) as u64,
                pair.db.bytes(),
            );
        }
        Ok(())
    }

    /// The adapter's dropout(x) for projection p of layer l: x itself without dropout.
    fn lora_input(
        &self,
        r: &mut Recorder,
        l: usize,
        p: Proj,
        x: &GpuTensor,
    ) -> Result<GpuTensor, GpuError> {
        let Some(state) = self.plan[l][p] else {
            return Ok(x.clone());
        };
        let xd = self.a.xdrop.view(&[self.t, x.shape[1]])?;
        self.dropout(p)?.encode(r, x, state, self.dropout, &xd)?;
        Ok(xd)
    }

    fn dropout(&self, p: Proj) -> Result<&Dropout, GpuError> {
        self.tr.ops.dropout[p].as_ref().ok_or(GpuError::Shape {
            op: "GpuTrainer",
            msg: "dropout was planned without its pipeline".into(),
        })
    }

    /// Projection p of layer l's adapter buffers, its launcher and its saved u = x A^T; None
    /// when p is not adapted.
    fn adapted(&self, l: usize, p: Proj) -> Option<(&PairBufs, &LoraMatmul, &GpuTensor)> {
        match (
            &self.tr.adapter[l][p],
            &self.tr.ops.lora[p],
            &self.a.u[self.slot(l)][p],
        ) {
            (Some(pair), Some(op), Some(u)) => Some((pair, op, u)),
            _ => None,
        }
    }

    /// y += s * (dropout(x) A^T) B^T for projection p of layer l, saving u = dropout(x) A^T.
    fn lora_forward(
        &self,
        r: &mut Recorder,
        l: usize,
        p: Proj,
        x: &GpuTensor,
        y: &GpuTensor,
    ) -> Result<(), GpuError> {
        let Some((pair, op, u)) = self.adapted(l, p) else {
            return Ok(());
        };
        self.lora_down(r, l, p, x)?;
        op.up_add(r, u, &pair.b, self.scale, y)
    }

    /// u = dropout(x) A^T for projection p of layer l, into its saved u (nothing when p is not
    /// adapted).
    fn lora_down(
        &self,
        r: &mut Recorder,
        l: usize,
        p: Proj,
        x: &GpuTensor,
    ) -> Result<(), GpuError> {
        let Some((pair, op, u)) = self.adapted(l, p) else {
            return Ok(());
        };
        let xin = self.lora_input(r, l, p, x)?;
        op.down(r, &xin, &pair.a, u)
    }

    /// The adapter's backward for projection p of layer l with input x and output gradient
    /// dy: dB = s dy^T u, du = s dy B, dA = du^T dropout(x), and dx += (du A) * mask.
    fn lora_backward(
        &self,
        r: &mut Recorder,
        l: usize,
        p: Proj,
        x: &GpuTensor,
        dy: &GpuTensor,
        dx: &GpuTensor,
    ) -> Result<(), GpuError> {
        let Some((pair, op, u)) = self.adapted(l, p) else {
            return Ok(());
        };
        op.grad_b_set(r, dy, u, self.scale, &pair.db)?;
        op.grad_u(r, dy, &pair.b, self.scale, &self.a.du)?;
        match self.plan[l][p] {
            None => {
                op.grad_a_set(r, &self.a.du, x, &pair.da)?;
                op.grad_x_add(r, &self.a.du, &pair.a, dx)
            }
            Some(state) => {
                let xd = self.lora_input(r, l, p, x)?;
                op.grad_a_set(r, &self.a.du, &xd, &pair.da)?;
                let ldx = self.a.ldx.view(&[self.t, x.shape[1]])?;
                op.grad_x(r, &self.a.du, &pair.a, &ldx)?;
                self.dropout(p)?
                    .encode_add(r, &ldx, state, self.dropout, dx)
            }
        }
    }

    /// Projection `p` of layer `l`: the frozen BitLinear on the quantized input `xq`, plus
    /// the adapter on the float input `x` (when `p` is adapted), into y (T, O).
    fn project(
        &self,
        r: &mut Recorder,
        l: usize,
        p: Proj,
        xq: &GpuTensor,
        x: &GpuTensor,
        y: &GpuTensor,
    ) -> Result<(), GpuError> {
        let lin = self.tr.model.layers[l].proj(p);
        lin.op.encode(r, xq, &self.a.s_a, &lin.w, &lin.sw, y)?;
        self.lora_forward(r, l, p, x, y)
    }

    /// The backward of [`Step::project`]: dx = dy . (T / s_w) (`add`: dx +=), then the
    /// adapter's dA, dB and its share of dx.
    #[allow(clippy::too_many_arguments)]
    fn project_back(
        &self,
        r: &mut Recorder,
        l: usize,
        p: Proj,
        x: &GpuTensor,
        dy: &GpuTensor,
        dx: &GpuTensor,
        add: bool,
    ) -> Result<(), GpuError> {
        let lin = self.tr.model.layers[l].proj(p);
        let op = &self.tr.ops.ternary_back[p];
        if add {
            op.encode_add(r, dy, &lin.w, &lin.sw, dx)?;
        } else {
            op.encode(r, dy, &lin.w, &lin.sw, dx)?;
        }
        self.lora_backward(r, l, p, x, dy, dx)
    }

    /// Where layer l's saved activations (all but h) live: their own slot, or the one slot a
    /// recomputing run shares between layers.
    fn slot(&self, l: usize) -> usize {
        if self.tr.plan.recompute { 0 } else { l }
    }

    /// The training forward, saving each layer's activations (see the module doc).
    pub(super) fn forward(&self, r: &mut Recorder) -> Result<(), GpuError> {
        let (m, a) = (&self.tr.model, self.a);
        m.embedding
            .encode_split(r, &a.tokens, &m.embed_tokens, &a.h[0])?;
        for l in 0..m.layers.len() {
            self.layer_forward(r, l, false)?;
        }
        Ok(())
    }

    /// Layer l's forward from h[l], saving its activations in its slot. `again`: the
    /// backward's recomputation (activation checkpointing), which stops after the gate and up
    /// projections: what follows (act(gate) * up, its sub-norm and the down projection's
    /// adapter input u) the backward recomputes itself, and h[l+1] is not needed again.
    fn layer_forward(&self, r: &mut Recorder, l: usize, again: bool) -> Result<(), GpuError> {
        let (m, a) = (&self.tr.model, self.a);
        let (cos, sin) = (&m.rope_cos, &m.rope_sin);
        let lay = &m.layers[l];
        let s = self.slot(l);
        // Attention block: h_mid = h + o_proj(attn_sub_norm(attn(rope(q), rope(k), v))).
        let n = &lay.input_layernorm;
        n.op.encode_quant(r, &a.h[l], &n.w, &a.x, &a.xq_c, &a.s_a)?;
        self.project(r, l, Proj::Q, &a.xq_c, &a.x, &a.q[s])?;
        self.project(r, l, Proj::K, &a.xq_c, &a.x, &a.k[s])?;
        self.project(r, l, Proj::V, &a.xq_c, &a.x, &a.v[s])?;
        m.rope_q.encode(r, &a.q[s], cos, sin)?;
        m.rope_k.encode(r, &a.k[s], cos, sin)?;
        m.attention
            .encode(r, &a.q[s], &a.k[s], &a.v[s], &a.att[s])?;
        let n = &lay.attn_sub_norm;
        n.op.encode_quant(r, &a.att[s], &n.w, &a.att_n, &a.xq_q, &a.s_a)?;
        self.project(r, l, Proj::O, &a.xq_q, &a.att_n, &a.h_mid[s])?;
        // h_mid = o + h: the same f32 sums as the CPU's h + o.
        m.residual_add.encode(r, &a.h_mid[s], &a.h[l])?;

        // FFN block: h[l+1] = h_mid + down_proj(ffn_sub_norm(act(gate(x)) * up(x))).
        let n = &lay.post_attention_layernorm;
        n.op.encode_quant(r, &a.h_mid[s], &n.w, &a.x, &a.xq_c, &a.s_a)?;
        self.project(r, l, Proj::Gate, &a.xq_c, &a.x, &a.gate[s])?;
        self.project(r, l, Proj::Up, &a.xq_c, &a.x, &a.up[s])?;
        if again {
            return Ok(());
        }
        m.gated_act.encode(r, &a.gate[s], &a.up[s], &a.ffn)?;
        let n = &lay.ffn_sub_norm;
        n.op.encode_quant(r, &a.ffn, &n.w, &a.ffn_n, &a.xq_f, &a.s_a)?;
        self.project(r, l, Proj::Down, &a.xq_f, &a.ffn_n, &a.h[l + 1])?;
        m.residual_add.encode(r, &a.h[l + 1], &a.h_mid[s])
    }

    /// The final norm, the head and the loss a window of rows at a time; with `backward`, each
    /// window's dlogits go straight back through the head into dx (T, C).
    pub(super) fn head(
        &self,
        r: &mut Recorder,
        weight: f32,
        backward: bool,
    ) -> Result<(), GpuError> {
        let (m, a, ops) = (&self.tr.model, self.a, &self.tr.ops);
        let l = m.layers.len();
        m.norm.op.encode(r, &a.h[l], &m.norm.w, &a.x)?;
        let w = m.lm_head.as_ref().unwrap_or(&m.embed_tokens);
        let rows = self.tr.logits.shape[0];
        for row0 in (0..self.t).step_by(rows) {
            let n = rows.min(self.t - row0);
            let logits = self.tr.logits.rows_view(n)?;
            m.head.encode_split(r, &a.x, row0..row0 + n, w, &logits)?;
            ops.cross_entropy
                .encode_rows(r, &logits, &a.targets, row0, weight, &a.loss)?;
            if backward {
                match &self.tr.head_scratch {
                    Some(scratch) => ops
                        .head_back
                        .encode_split_k(r, &logits, w, &a.dx, row0, scratch)?,
                    None => ops.head_back.encode_split(r, &logits, w, &a.dx, row0)?,
                }
            }
        }
        Ok(())
    }

    /// The backward, in exact reverse of [`Step::forward`] (crates/core/src/train.rs
    /// `forward_backward` line by line), from dx = d norm(h[L]).
    pub(super) fn backward(&self, r: &mut Recorder) -> Result<(), GpuError> {
        let (m, a, ops) = (&self.tr.model, self.a, &self.tr.ops);
        let (cos, sin) = (&m.rope_cos, &m.rope_sin);
        let nl = m.layers.len();
        ops.rms_back_c
            .encode(r, &a.h[nl], &m.norm.w, &a.dx, &a.dh)?;
        for (l, lay) in m.layers.iter().enumerate().rev() {
            let s = self.slot(l);
            if self.tr.plan.recompute {
                // The layer's activations again from h[l], into the shared slot.
                self.layer_forward(r, l, true)?;
            }
            // FFN block. Recompute f = act(gate) * up and its sub-norm (the forward's bits).
            m.gated_act.encode(r, &a.gate[s], &a.up[s], &a.ffn)?;
            let n = &lay.ffn_sub_norm;
            n.op.encode(r, &a.ffn, &n.w, &a.ffn_n)?;
            if self.tr.plan.recompute {
                // ... and the down projection's adapter input u, which the forward saved.
                self.lora_down(r, l, Proj::Down, &a.ffn_n)?;
            }
            self.project_back(r, l, Proj::Down, &a.ffn_n, &a.dh, &a.df_a, false)?; // d fnorm
            ops.rms_back_f.encode(r, &a.ffn, &n.w, &a.df_a, &a.df_b)?; // d f
            ops.gated_back
                .encode(r, &a.gate[s], &a.up[s], &a.df_b, &a.df_a, &a.df_c)?; // d gate, d up
            let n = &lay.post_attention_layernorm;
            n.op.encode(r, &a.h_mid[s], &n.w, &a.x)?; // xn2
            self.project_back(r, l, Proj::Gate, &a.x, &a.df_a, &a.dx, false)?;
            self.project_back(r, l, Proj::Up, &a.x, &a.df_c, &a.dx, true)?;
            ops.rms_back_c
                .encode_add(r, &a.h_mid[s], &n.w, &a.dx, &a.dh)?;

            // Attention block.
            let n = &lay.attn_sub_norm;
            n.op.encode(r, &a.att[s], &n.w, &a.att_n)?; // an
            self.project_back(r, l, Proj::O, &a.att_n, &a.dh, &a.dq_a, false)?; // d an
            ops.rms_back_q
                .encode(r, &a.att[s], &n.w, &a.dq_a, &a.dq_b)?; // d att
            ops.attention_back.encode(
                r, &a.q[s], &a.k[s], &a.v[s], &a.dq_b, &a.stats, &a.dq, &a.dk, &a.dv,
            )?;
            ops.rope_back_q.encode(r, &a.dq, cos, sin)?;
            ops.rope_back_k.encode(r, &a.dk, cos, sin)?;
            let n = &lay.input_layernorm;
            n.op.encode(r, &a.h[l], &n.w, &a.x)?; // xn1
            self.project_back(r, l, Proj::Q, &a.x, &a.dq, &a.dx, false)?;
            self.project_back(r, l, Proj::K, &a.x, &a.dk, &a.dx, true)?;
            self.project_back(r, l, Proj::V, &a.x, &a.dv, &a.dx, true)?;
            ops.rms_back_c.encode_add(r, &a.h[l], &n.w, &a.dx, &a.dh)?;
            self.grads_out(r, l)?;
        }
        Ok(())
    }
}
