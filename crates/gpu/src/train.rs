//! LoRA training on the GPU: [`GpuTrainer`] computes what
//! `bitlora_core::train::forward_backward` computes (the mean cross-entropy over the counted
//! targets, and `grad_scale` times its gradient with respect to every LoRA A and B, added into
//! the caller's gradients) with the kernels of [`crate::ops`], recorded into one submission:
//!
//! ```text
//! upload: tokens, targets, A and B if changed; each dropout stream's RNG state (the kernels
//!         draw the CPU's numbers themselves: SplitMix64 is counter-based)
//! forward, saving per layer: h_in, q, k (after RoPE), v, attention, h_mid, gate, up, each u = x A^T
//!     h[0] = embed[tokens]
//!     layer l: x = input_layernorm(h[l]); q, k, v = BitLinear + LoRA; RoPE; attention
//!              h_mid[l] = o_proj(attn_sub_norm(att)) + h[l]
//!              x = post_attention_layernorm(h_mid[l]); f = act(gate) * up
//!              h[l+1] = down_proj(ffn_sub_norm(f)) + h_mid[l]
//! head, a window of rows at a time (no (T, V) buffer beyond one binding):
//!     logits = norm(h[L]) . W^T -> cross-entropy (per-row loss, dlogits in place) -> dxn += dlogits . W
//! backward in exact reverse (dh: the residual stream's gradient, dh = norm'(h[L])^T dxn):
//!     layer l: FFN: down (dX through the ternary weight + LoRA dA, dB, dX), ffn_sub_norm',
//!              gated act', gate and up, post_attention_layernorm' added into dh;
//!              attention: o, attn_sub_norm', attention' (q, kv), RoPE', q, k, v,
//!              input_layernorm' added into dh
//! copy: per-row losses and every dA, dB into one staging buffer; one readback
//! ```
//!
//! The normed activations (x, attn_sub_norm(att), act(gate) * up and its sub-norm) are not
//! saved but recomputed in the backward from what is: the same kernel on the same input gives
//! the same bits, and it halves the (T, F) memory. Attention probabilities are recomputed by
//! the attention backward itself.
//!
//! Gradient rules as on the CPU (crates/core/src/train.rs): LoRA A and B get gradients, every
//! frozen weight passes dX only (straight-through on the activation quantizer). Each
//! projection's dA and dB are written once per call (no clearing pass) and added into the
//! caller's [`Lora`] of gradients on the CPU after the readback, so accumulation over several
//! sequences works as on the CPU.
//!
//! [`GpuTrainer::step`] (core's `Trainer` loop) reads no gradients back: it keeps the adapter,
//! the gradients and Adam's moments in flat GPU buffers ([`OptState`]), copies each sequence's
//! dA and dB into them (adding in the CPU's order), reduces the squared global norm there
//! (`ops::SumSquares`) and reads back only that scalar with the losses; core decides (NaN
//! guard, lr, bias corrections) and `ops::AdamWStep` updates in place. [`GpuTrainer::sync`]
//! brings the state back for checkpoints and exports.
//!
//! Everything that waits is `async` and never blocks (the web); natively use `pollster`.

use bitlora_core::Config;
use bitlora_core::data::Sequence;
use bitlora_core::lora::{Lora, LoraConfig};
use bitlora_core::model::projections;
use bitlora_core::rng::Rng;
use bitlora_core::train::{self as cpu_train, StepLoss};
use bitlora_core::trainer::{StepReport, Trainer};

use crate::GpuError;
use crate::model::{GpuModel, Linear, cached};
use crate::ops::cross_entropy::MASKED;
use crate::ops::{
    AdamWScalars, AdamWStep, AttentionBackward, CrossEntropy, Dropout, GatedActBackward,
    LoraMatmul, MatmulBackward, ResidualAdd, RmsNormBackward, RopeBackward, SumSquares,
    TernaryBackward,
};
use crate::record::{BindCache, DispatchTimes, Profiler, Recorder};
use crate::tensor::{self, DType, GpuTensor};

/// One adapted projection's tensors on the GPU.
struct PairBufs {
    a: GpuTensor,  // (R, I)
    b: GpuTensor,  // (O, R)
    da: GpuTensor, // (R, I) this call's dA
    db: GpuTensor, // (O, R) this call's dB
    /// Offsets (in f32s) of dA and dB in the staging buffer.
    staging: (usize, usize),
}

/// Row width of the optimizer's flat buffers ([`OptState`]).
const FLAT_ROW: usize = 4096;

/// What a run does with the gradients of its backward.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Forward and loss only.
    Loss,
    /// Backward; every dA and dB is read back (for the caller's gradients on the CPU).
    Staging,
    /// Backward into the optimizer's flat gradients on the GPU: `first` sets them, a later
    /// sequence adds into them (the CPU's accumulation order); `last` also reduces their
    /// squared norm and reads it back with the losses.
    Flat { first: bool, last: bool },
}

/// The optimizer's state on the GPU ([`GpuTrainer::step`]): the adapter, the step's gradients
/// and Adam's moments, each one flat f32 buffer holding every pair's A then B, layer by layer,
/// projections in `model::projections` order (the staging order), zero-padded to whole rows
/// of [`FLAT_ROW`]. The pairs' own A and B buffers (which the kernels bind) are copies of `p`.
struct OptState {
    p: GpuTensor,
    g: GpuTensor,
    /// A later sequence's gradients before they are added into `g`: made by the first step
    /// of a trainer that accumulates (none for one sequence per step).
    g2: Option<GpuTensor>,
    m: GpuTensor,
    v: GpuTensor,
    partials: GpuTensor, // (SumSquares::PARTIALS)
    sumsq: GpuTensor,    // (1)
    adamw: AdamWStep,
    sum_squares: SumSquares,
    add: ResidualAdd,
    /// The trainer whose adapter and moments `p`, `m`, `v` hold ([`tag_of`]) as after the last
    /// step here; None: none yet.
    tag: Option<Tag>,
    /// Whether the pairs' A and B buffers hold `p` (not another adapter a loss uploaded).
    ab_current: bool,
    /// Map-read buffer of [`GpuTrainer::sync`] (3 flat buffers), made when first needed.
    readback: Option<wgpu::Buffer>,
}

impl OptState {
    /// Records copies of the adapter held in `p` into the pairs' A and B buffers (`p` is laid
    /// out as the staging buffer past its `base` loss rows).
    fn copy_adapter_out(&self, rec: &mut Recorder, adapter: &[Vec<Option<PairBufs>>], base: usize) {
        for pair in adapter.iter().flatten().flatten() {
            let (oa, ob) = pair.staging;
            for (off, t) in [(oa, &pair.a), (ob, &pair.b)] {
                rec.copy(
                    &self.p.buffer,
                    (4 * (off - base)) as u64,
                    &t.buffer,
                    0,
                    t.bytes(),
                );
            }
        }
    }

    fn bytes(&self) -> u64 {
        [&self.p, &self.g, &self.m, &self.v]
            .into_iter()
            .chain(&self.g2)
            .map(|t| t.buffer.size())
            .sum()
    }
}

/// Which trainer, at which step, the optimizer's buffers hold ([`tag_of`]).
type Tag = (u64, usize, usize, usize);

/// The tag of [`OptState::tag`] for `trainer` as it is now: its [`Trainer::id`], its step and
/// optimizer step counts (a step on the CPU or a resumed state changes them) and the address
/// of its adapter's layers (an adapter put in its place moves it).
fn tag_of(trainer: &Trainer) -> Tag {
    (
        trainer.id(),
        trainer.step,
        trainer.optimizer.step,
        trainer.lora.layers.as_ptr() as usize,
    )
}

/// The pipelines of the backward and the adapter's products, one per shape.
struct Ops {
    ternary_back: Vec<TernaryBackward>, // 7, `model::projections` order
    lora: Vec<Option<LoraMatmul>>,      // 7
    dropout: Vec<Option<Dropout>>,      // 7, built when a step first has dropout
    rms_back_c: RmsNormBackward,        // rows of width C
    rms_back_q: RmsNormBackward,        // NH*HS
    rms_back_f: RmsNormBackward,        // F
    gated_back: GatedActBackward,
    rope_back_q: RopeBackward,
    rope_back_k: RopeBackward,
    attention_back: AttentionBackward,
    cross_entropy: CrossEntropy,
    head_back: MatmulBackward,
}

/// The activations a step saves and its scratch, allocated once for `max_tokens` rows; each
/// step works on views of their first T rows ([`Acts::view`]).
#[derive(Clone)]
struct Acts {
    tokens: GpuTensor,  // (T) u32
    targets: GpuTensor, // (T) u32, MASKED where not counted
    loss: GpuTensor,    // (T) per-row loss
    // Saved by the forward, per layer.
    h: Vec<GpuTensor>,     // L+1 x (T, C): h[l] enters layer l, h[L] the final norm
    h_mid: Vec<GpuTensor>, // L x (T, C) after the attention block
    q: Vec<GpuTensor>,     // L x (T, NH*HS) after RoPE
    k: Vec<GpuTensor>,     // L x (T, NKV*HS) after RoPE
    v: Vec<GpuTensor>,     // L x (T, NKV*HS)
    att: Vec<GpuTensor>,   // L x (T, NH*HS) attention output, before attn_sub_norm
    gate: Vec<GpuTensor>,  // L x (T, F)
    up: Vec<GpuTensor>,    // L x (T, F)
    u: Vec<Vec<Option<GpuTensor>>>, // L x 7 x (T, R): x A^T of each adapted projection
    // Scratch of the forward (and recomputed in the backward).
    x: GpuTensor,     // (T, C) a block's normed input; the final norm's output
    xq_c: GpuTensor,  // (T, C) int8
    xq_q: GpuTensor,  // (T, NH*HS) int8
    xq_f: GpuTensor,  // (T, F) int8
    s_a: GpuTensor,   // (T)
    att_n: GpuTensor, // (T, NH*HS) attn_sub_norm(att)
    ffn: GpuTensor,   // (T, F) act(gate) * up
    ffn_n: GpuTensor, // (T, F) ffn_sub_norm(ffn)
    // Scratch of the backward.
    dh: GpuTensor,    // (T, C) the residual stream's gradient
    dx: GpuTensor,    // (T, C) d(normed input) of a block, or of the final norm
    dq_a: GpuTensor,  // (T, NH*HS) d attn_sub_norm(att)
    dq_b: GpuTensor,  // (T, NH*HS) d att
    dq: GpuTensor,    // (T, NH*HS)
    dk: GpuTensor,    // (T, NKV*HS)
    dv: GpuTensor,    // (T, NKV*HS)
    df_a: GpuTensor,  // (T, F) d ffn_sub_norm(f), then d gate
    df_b: GpuTensor,  // (T, F) d f
    df_c: GpuTensor,  // (T, F) d up
    du: GpuTensor,    // (T, R)
    stats: GpuTensor, // (NH, T, 3) attention backward's scratch
    // Dropout scratch, (T, I) views of (T_max, max I).
    xdrop: GpuTensor, // dropout(x), the adapter's input
    ldx: GpuTensor,   // du . A before the mask
}

impl Acts {
    fn new(
        dev: &wgpu::Device,
        gm: &GpuModel,
        rows: usize,
        r: usize,
        adapted: [bool; 7],
    ) -> Result<Acts, GpuError> {
        let cfg = &gm.config;
        let (c, f, l) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_hidden_layers,
        );
        let (qd, kvd, nh) = (cfg.q_dim(), cfg.kv_dim(), cfg.num_attention_heads);
        let t32 =
            |name: String, cols: usize| GpuTensor::zeros(dev, name, &[rows, cols], DType::F32);
        let i8t = |name: &str, cols: usize| GpuTensor::zeros(dev, name, &[rows, cols], DType::I8x4);
        let per_layer = |what: &str, cols: usize, n: usize| -> Result<Vec<GpuTensor>, GpuError> {
            (0..n)
                .map(|l| t32(format!("train {what} (layer {l})"), cols))
                .collect()
        };
        let max_i = projections(cfg)
            .iter()
            .map(|&(_, _, i)| i)
            .max()
            .unwrap_or(c);
        let u = (0..l)
            .map(|layer| {
                projections(cfg)
                    .iter()
                    .zip(adapted)
                    .map(|(&(name, _, _), on)| {
                        on.then(|| t32(format!("lora u layer {layer} {name}"), r))
                            .transpose()
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Acts {
            tokens: GpuTensor::zeros(dev, "train tokens", &[rows], DType::U32)?,
            targets: GpuTensor::zeros(dev, "train targets", &[rows], DType::U32)?,
            loss: GpuTensor::zeros(dev, "train loss", &[rows], DType::F32)?,
            h: per_layer("h", c, l + 1)?,
            h_mid: per_layer("h_mid", c, l)?,
            q: per_layer("q", qd, l)?,
            k: per_layer("k", kvd, l)?,
            v: per_layer("v", kvd, l)?,
            att: per_layer("attention", qd, l)?,
            gate: per_layer("gate", f, l)?,
            up: per_layer("up", f, l)?,
            u,
            x: t32("train x".into(), c)?,
            xq_c: i8t("train x_q (C)", c)?,
            xq_q: i8t("train x_q (NH*HS)", qd)?,
            xq_f: i8t("train x_q (F)", f)?,
            s_a: GpuTensor::zeros(dev, "train s_a", &[rows], DType::F32)?,
            att_n: t32("train attention (sub-normed)".into(), qd)?,
            ffn: t32("train ffn".into(), f)?,
            ffn_n: t32("train ffn (sub-normed)".into(), f)?,
            dh: t32("d h".into(), c)?,
            dx: t32("d x".into(), c)?,
            dq_a: t32("d attention (sub-normed)".into(), qd)?,
            dq_b: t32("d attention".into(), qd)?,
            dq: t32("d q".into(), qd)?,
            dk: t32("d k".into(), kvd)?,
            dv: t32("d v".into(), kvd)?,
            df_a: t32("d ffn (sub-normed) / d gate".into(), f)?,
            df_b: t32("d ffn".into(), f)?,
            df_c: t32("d up".into(), f)?,
            du: t32("d u".into(), r)?,
            stats: GpuTensor::zeros(dev, "attention backward stats", &[nh, rows, 3], DType::F32)?,
            xdrop: t32("dropout(x)".into(), max_i)?,
            ldx: t32("d dropout(x)".into(), max_i)?,
        })
    }

    /// Every tensor, for the byte count.
    fn all(&self) -> Vec<&GpuTensor> {
        let mut v = vec![
            &self.tokens,
            &self.targets,
            &self.loss,
            &self.x,
            &self.xq_c,
            &self.xq_q,
            &self.xq_f,
            &self.s_a,
            &self.att_n,
            &self.ffn,
            &self.ffn_n,
            &self.dh,
            &self.dx,
            &self.dq_a,
            &self.dq_b,
            &self.dq,
            &self.dk,
            &self.dv,
            &self.df_a,
            &self.df_b,
            &self.df_c,
            &self.du,
            &self.stats,
            &self.xdrop,
            &self.ldx,
        ];
        for group in [
            &self.h,
            &self.h_mid,
            &self.q,
            &self.k,
            &self.v,
            &self.att,
            &self.gate,
            &self.up,
        ] {
            v.extend(group.iter());
        }
        v.extend(self.u.iter().flatten().flatten());
        v
    }

    /// The first `t` rows of everything (the dropout scratch keeps its full size: it is
    /// viewed per projection as (T, I)).
    fn view(&self, t: usize) -> Result<Acts, GpuError> {
        let rv = |x: &GpuTensor| x.rows_view(t);
        let rvs = |xs: &Vec<GpuTensor>| {
            xs.iter()
                .map(|x| x.rows_view(t))
                .collect::<Result<Vec<_>, _>>()
        };
        let nh = self.stats.shape[0];
        Ok(Acts {
            tokens: rv(&self.tokens)?,
            targets: rv(&self.targets)?,
            loss: rv(&self.loss)?,
            h: rvs(&self.h)?,
            h_mid: rvs(&self.h_mid)?,
            q: rvs(&self.q)?,
            k: rvs(&self.k)?,
            v: rvs(&self.v)?,
            att: rvs(&self.att)?,
            gate: rvs(&self.gate)?,
            up: rvs(&self.up)?,
            u: self
                .u
                .iter()
                .map(|layer| {
                    layer
                        .iter()
                        .map(|u| u.as_ref().map(rv).transpose())
                        .collect()
                })
                .collect::<Result<Vec<_>, _>>()?,
            x: rv(&self.x)?,
            xq_c: rv(&self.xq_c)?,
            xq_q: rv(&self.xq_q)?,
            xq_f: rv(&self.xq_f)?,
            s_a: rv(&self.s_a)?,
            att_n: rv(&self.att_n)?,
            ffn: rv(&self.ffn)?,
            ffn_n: rv(&self.ffn_n)?,
            dh: rv(&self.dh)?,
            dx: rv(&self.dx)?,
            dq_a: rv(&self.dq_a)?,
            dq_b: rv(&self.dq_b)?,
            dq: rv(&self.dq)?,
            dk: rv(&self.dk)?,
            dv: rv(&self.dv)?,
            df_a: rv(&self.df_a)?,
            df_b: rv(&self.df_b)?,
            df_c: rv(&self.df_c)?,
            du: rv(&self.du)?,
            stats: self.stats.view(&[nh, t, 3])?,
            xdrop: self.xdrop.clone(),
            ldx: self.ldx.clone(),
        })
    }
}

/// Where the time of the last [`GpuTrainer::forward_backward`] or [`GpuTrainer::loss`] went,
/// kept while profiling ([`GpuTrainer::set_profiling`]). Host times are wall-clock seconds
/// (`std::time::Instant`: native only, which is why profiling is off unless asked for).
#[derive(Clone, Debug, Default)]
pub struct StepProfile {
    /// Checks, the token and target writes, the adapter comparison and its upload (queue
    /// writes; the copies themselves run at submit).
    pub upload_s: f64,
    /// Recording the dispatches and the staging copies (and, profiled, one pass each).
    pub record_s: f64,
    /// From submit until the staging buffer is mapped: the GPU's work plus the round trip.
    pub wait_s: f64,
    /// Copying the readback out and adding the gradients into the caller's.
    pub unpack_s: f64,
    /// Each dispatch's GPU time (label, ns) in dispatch order; empty when the device has
    /// no timestamp queries.
    pub dispatches: DispatchTimes,
}

/// `Some(now)` while profiling: `Instant::now` panics on wasm32, where nothing profiles.
fn clock(on: bool) -> Option<std::time::Instant> {
    on.then(std::time::Instant::now)
}

fn secs(t: Option<std::time::Instant>) -> f64 {
    t.map_or(0.0, |t| t.elapsed().as_secs_f64())
}

/// Each adapted projection's dropout stream: per layer, per projection, the RNG state its T*I
/// draws start from (None: no dropout).
type MaskPlan = Vec<[Option<u64>; 7]>;

/// The GPU LoRA training step. Owns the [`GpuModel`] (its weights, forward pipelines and
/// adapter for inference: [`GpuTrainer::model_mut`], [`GpuTrainer::into_model`]) and, allocated
/// once at [`GpuTrainer::new`] and reused by every step, the pipelines of the backward, the
/// saved activations for up to `max_tokens` tokens, the adapter's tensors and gradients, and a
/// staging buffer for the one readback per step.
pub struct GpuTrainer {
    model: GpuModel,
    lora_config: LoraConfig,
    max_tokens: usize,
    ops: Ops,
    acts: Acts,
    /// The cached views of `acts` for the last T.
    views: Option<Acts>,
    adapter: Vec<Vec<Option<PairBufs>>>, // L x 7
    /// The adapter A and B hold now (None: never uploaded).
    uploaded: Option<Vec<[Option<bitlora_core::lora::LoraPair>; 7]>>,
    /// The last rows of logits a window of the head holds: (W, V).
    logits: GpuTensor,
    staging: wgpu::Buffer,
    staging_floats: usize,
    /// Bind groups and uniform buffers of the last steps: the same every step of a given T.
    bind_cache: Option<BindCache>,
    /// The head backward's partial sums (S, W, C) when it splits the vocabulary (GPUs).
    head_scratch: Option<GpuTensor>,
    grad_floats: usize,
    bytes: u64,
    /// The optimizer on the GPU, made by the first [`GpuTrainer::step`] (None before, or when
    /// its buffers do not fit a binding: then steps run AdamW on the CPU).
    opt: Option<OptState>,
    opt_unavailable: bool,
    /// Host seconds of the last step's optimizer (recording and submitting it; its GPU time
    /// falls into the next submission's wait).
    optimizer_s: f64,
    /// Profiling on: host times, and GPU timestamps when `profiler` is Some.
    profiling: bool,
    profiler: Option<Profiler>,
    profile: StepProfile,
}

impl GpuTrainer {
    /// Builds the training pipelines for `model` and an adapter of `lora_config`'s shape
    /// (rank and target modules; dropout and alpha are read from the adapter at each step),
    /// and allocates everything a step of up to `max_tokens` tokens needs. A tensor that does
    /// not fit one storage binding is [`GpuError::TooLarge`]: use fewer tokens.
    pub fn new(
        model: GpuModel,
        lora_config: &LoraConfig,
        max_tokens: usize,
    ) -> Result<GpuTrainer, GpuError> {
        Ok(Self::build(&model, lora_config, max_tokens)?(model))
    }

    /// As [`GpuTrainer::new`], but a failure gives the model back with the error (e.g. to
    /// keep generating with it, or to retry with fewer tokens), instead of dropping it.
    pub fn try_new(
        model: GpuModel,
        lora_config: &LoraConfig,
        max_tokens: usize,
    ) -> Result<GpuTrainer, Box<(GpuError, GpuModel)>> {
        match Self::build(&model, lora_config, max_tokens) {
            Ok(assemble) => Ok(assemble(model)),
            Err(e) => Err(Box::new((e, model))),
        }
    }

    /// Everything [`GpuTrainer::new`] builds, then a function that puts the model in.
    fn build(
        model: &GpuModel,
        lora_config: &LoraConfig,
        max_tokens: usize,
    ) -> Result<impl FnOnce(GpuModel) -> GpuTrainer + use<>, GpuError> {
        let cfg = model.config.clone();
        let dev = model.device.clone();
        let max_tokens = max_tokens.min(cfg.max_position_embeddings);
        if max_tokens == 0 {
            return Err(bitlora_core::Error::NoTokens.into());
        }
        let (c, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let (nh, nkv, hs, eps) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
            cfg.rms_norm_eps,
        );
        let r = lora_config.r;
        let adapted = lora_config.targets;
        let shapes = projections(&cfg);
        let mut tb_cache: Vec<((usize, usize), TernaryBackward)> = Vec::new();
        let mut lora_cache: Vec<((usize, usize), LoraMatmul)> = Vec::new();
        let ternary_back = shapes
            .iter()
            .map(|&(_, o, i)| cached(&mut tb_cache, (o, i), || TernaryBackward::new(&dev, i, o)))
            .collect();
        let lora = shapes
            .iter()
            .zip(adapted)
            .map(|(&(_, o, i), on)| {
                on.then(|| cached(&mut lora_cache, (o, i), || LoraMatmul::new(&dev, i, o, r)))
            })
            .collect();
        let ops = Ops {
            ternary_back,
            lora,
            dropout: vec![None; 7],
            rms_back_c: RmsNormBackward::new(&dev, c, eps),
            rms_back_q: RmsNormBackward::new(&dev, cfg.q_dim(), eps),
            rms_back_f: RmsNormBackward::new(&dev, f, eps),
            gated_back: GatedActBackward::new(&dev, f, cfg.hidden_act),
            rope_back_q: RopeBackward::new(&dev, nh, hs),
            rope_back_k: RopeBackward::new(&dev, nkv, hs),
            attention_back: AttentionBackward::new(&dev, nh, nkv, hs),
            cross_entropy: CrossEntropy::new(&dev, v),
            head_back: MatmulBackward::with_bf16(
                &dev,
                c,
                v,
                model.head_weight().dtype == DType::Bf16,
            ),
        };
        let acts = Acts::new(&dev, model, max_tokens, r, adapted)?;

        // The adapter and its gradients; their places in the staging buffer after the
        // max_tokens per-row losses.
        let mut offset = max_tokens;
        let mut adapter = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let mut layer = Vec::with_capacity(7);
            for (&(name, o, i), on) in shapes.iter().zip(adapted) {
                if !on {
                    layer.push(None);
                    continue;
                }
                let n = format!("model.layers.{l}.{name}");
                let z = |what: &str, shape: &[usize]| {
                    GpuTensor::zeros(&dev, format!("{n}.{what}"), shape, DType::F32)
                };
                let pair = PairBufs {
                    a: z("lora_A.weight", &[r, i])?,
                    b: z("lora_B.weight", &[o, r])?,
                    da: z("lora_A.grad", &[r, i])?,
                    db: z("lora_B.grad", &[o, r])?,
                    staging: (offset, offset + r * i),
                };
                offset += r * i + o * r;
                layer.push(Some(pair));
            }
            adapter.push(layer);
        }
        let grad_floats = offset - max_tokens;
        let staging_floats = offset;
        let staging = dev.create_buffer(&wgpu::BufferDescriptor {
            label: Some("train readback"),
            size: (4 * staging_floats) as u64,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });

        // Rows of logits per window of the head: as many as one binding holds.
        let rows = ((model.max_binding / (4 * v as u64)) as usize).clamp(1, max_tokens);
        let logits = GpuTensor::zeros(&dev, "train logits window", &[rows, v], DType::F32)?;
        // On a GPU the head's dX sums over the whole vocabulary for only T x C outputs: split
        // that sum across workgroups (see ops::MatmulBackward). CPU adapters need no split.
        let head_scratch = if dev.adapter_info().device_type == wgpu::DeviceType::Cpu {
            None
        } else {
            Self::head_scratch(&dev, model, rows, Self::head_slabs(&model.config, rows))?
        };

        let bytes = acts.all().iter().map(|t| t.buffer.size()).sum::<u64>()
            + adapter
                .iter()
                .flatten()
                .flatten()
                .map(|p| {
                    p.a.buffer.size() + p.b.buffer.size() + p.da.buffer.size() + p.db.buffer.size()
                })
                .sum::<u64>()
            + logits.buffer.size();
        model.errors.take()?;
        let lora_config = lora_config.clone();
        Ok(move |model| GpuTrainer {
            model,
            lora_config,
            max_tokens,
            ops,
            acts,
            views: None,
            adapter,
            uploaded: None,
            logits,
            staging,
            staging_floats,
            bind_cache: None,
            head_scratch,
            grad_floats,
            bytes,
            opt: None,
            opt_unavailable: false,
            optimizer_s: 0.0,
            profiling: false,
            profiler: None,
            profile: StepProfile::default(),
        })
    }

    /// Slabs the head backward splits the vocabulary into on a GPU: enough workgroups to
    /// fill a large GPU (~512), each slab at least 256 rows of the vocabulary.
    fn head_slabs(cfg: &Config, rows: usize) -> usize {
        let groups = cfg.hidden_size.div_ceil(4).div_ceil(crate::ops::WG) * rows.div_ceil(8);
        512usize
            .div_ceil(groups.max(1))
            .min(cfg.vocab_size / 256)
            .clamp(1, 64)
    }

    /// The scratch of a head backward in `slabs` slabs (None for 1), fewer if it would not
    /// fit one binding.
    fn head_scratch(
        dev: &wgpu::Device,
        model: &GpuModel,
        rows: usize,
        slabs: usize,
    ) -> Result<Option<GpuTensor>, GpuError> {
        let c = model.config.hidden_size;
        let fit = (model.max_binding / (4 * (rows * c) as u64).max(1)) as usize;
        let slabs = slabs.min(fit);
        if slabs <= 1 {
            return Ok(None);
        }
        GpuTensor::zeros(dev, "head backward slabs", &[slabs, rows, c], DType::F32).map(Some)
    }

    /// Splits the head backward's sum over the vocabulary into `slabs` workgroups (1: no
    /// split). [`GpuTrainer::new`] splits on GPUs and not on CPU adapters; the result is the
    /// same up to rounding either way (tests force the split on lavapipe).
    pub fn set_head_slabs(&mut self, slabs: usize) -> Result<(), GpuError> {
        let rows = self.logits.shape[0];
        self.head_scratch = Self::head_scratch(&self.model.device, &self.model, rows, slabs)?;
        Ok(())
    }

    /// Turns profiling on or off: while on, every step keeps a [`StepProfile`]
    /// ([`GpuTrainer::profile`]) with host times, and each dispatch's GPU time when the device
    /// has `Features::TIMESTAMP_QUERY` ([`crate::Gpu::with_timestamps`]). Returns whether
    /// GPU timestamps are available. Native only (host clocks).
    pub fn set_profiling(&mut self, on: bool) -> bool {
        self.profiling = on;
        self.profiler = if on {
            Profiler::new(&self.model.device, &self.model.queue)
        } else {
            None
        };
        self.profiler.is_some()
    }

    /// The last step's profile (all zero and empty unless profiling).
    pub fn profile(&self) -> &StepProfile {
        &self.profile
    }

    /// The model (e.g. to generate with [`GpuModel::set_adapter`] after training).
    pub fn model(&self) -> &GpuModel {
        &self.model
    }

    pub fn model_mut(&mut self) -> &mut GpuModel {
        &mut self.model
    }

    /// Gives the model back; the training buffers are freed.
    pub fn into_model(self) -> GpuModel {
        self.model
    }

    /// Most tokens one step takes.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Bytes of GPU memory the training step holds beyond the model's weights: saved
    /// activations, scratch, the adapter with its gradients and the logits window.
    pub fn bytes(&self) -> u64 {
        self.bytes
            + self.head_scratch.as_ref().map_or(0, |t| t.buffer.size())
            + self.opt.as_ref().map_or(0, OptState::bytes)
    }

    /// Host seconds the last [`GpuTrainer::step`] spent on the optimizer (recording and
    /// submitting AdamW on the GPU, or AdamW itself on the CPU when it runs there).
    pub fn optimizer_seconds(&self) -> f64 {
        self.optimizer_s
    }

    /// One sequence's forward and backward, as `bitlora_core::train::forward_backward`:
    /// `targets[t]` is the token position t should predict (None: not counted). Returns the
    /// mean cross-entropy over the counted targets and ADDS `grad_scale` times its gradient
    /// into `grads` (same shapes as `lora`). Dropout draws from `rng` in the CPU reference's
    /// order (the kernels compute the draws, `rng` moves past them), so the same RNG gives the
    /// same masks, losses and gradients.
    #[allow(clippy::too_many_arguments)]
    pub async fn forward_backward(
        &mut self,
        lora: &Lora,
        tokens: &[u32],
        targets: &[Option<u32>],
        grads: &mut Lora,
        grad_scale: f32,
        rng: &mut Rng,
    ) -> Result<StepLoss, GpuError> {
        self.check_adapter("gradients", grads)?;
        let t0 = clock(self.profiling);
        let (counted, plan) = self.prepare(lora, true, tokens, targets, Some(rng))?;
        self.profile.upload_s = secs(t0);
        let t = tokens.len();
        let weight = if counted > 0 {
            grad_scale / counted as f32
        } else {
            0.0
        };
        let values = self
            .run(lora, t, weight, &plan, Mode::Staging, false)
            .await?;
        let t0 = clock(self.profiling);
        // Add this call's gradients into the caller's, in the order they were staged.
        for (bufs, grad) in self.adapter.iter().zip(grads.layers.iter_mut()) {
            for (b, g) in bufs.iter().zip(grad.iter_mut()) {
                let (Some(b), Some(g)) = (b, g) else { continue };
                let (oa, ob) = b.staging;
                for (x, &d) in g.a.iter_mut().zip(&values[oa..]) {
                    *x += d;
                }
                for (x, &d) in g.b.iter_mut().zip(&values[ob..]) {
                    *x += d;
                }
            }
        }
        self.profile.unpack_s += secs(t0);
        Ok(mean(&values[..t], targets, counted))
    }

    /// The mean cross-entropy of the model with `lora` applied, forward only and dropout off:
    /// the validation loss, as `bitlora_core::train::loss`.
    pub async fn loss(
        &mut self,
        lora: &Lora,
        tokens: &[u32],
        targets: &[Option<u32>],
    ) -> Result<StepLoss, GpuError> {
        let t0 = clock(self.profiling);
        let (counted, plan) = self.prepare(lora, true, tokens, targets, None)?;
        self.profile.upload_s = secs(t0);
        let t = tokens.len();
        let values = self.run(lora, t, 0.0, &plan, Mode::Loss, false).await?;
        Ok(mean(&values[..t], targets, counted))
    }

    /// Mean loss of `lora` over `seqs`, weighted by counted tokens (None when no target
    /// counts), as `bitlora_core::trainer::mean_loss`.
    pub async fn mean_loss(
        &mut self,
        lora: &Lora,
        seqs: &[Sequence],
    ) -> Result<Option<f32>, GpuError> {
        let (mut sum, mut n) = (0f64, 0usize);
        for s in seqs {
            let out = self.loss(lora, &s.tokens, &s.targets).await?;
            sum += out.loss as f64 * out.tokens as f64;
            n += out.tokens;
        }
        Ok((n > 0).then(|| (sum / n as f64) as f32))
    }

    /// One optimizer step of `trainer` (bitlora_core's loop: accumulation, clipping, AdamW,
    /// the NaN guard, validation when due) with the gradients and losses computed here:
    /// `Trainer::step` with the GPU in place of the CPU reference. Dropout draws from the
    /// trainer's RNG in the CPU's order.
    ///
    /// The adapter, the gradients and Adam's moments stay on the GPU: each sequence's dA and
    /// dB are gathered into one flat gradient buffer (summed over the step's sequences in the
    /// CPU's order), its squared norm is reduced on the GPU and read back as one scalar with
    /// the per-row losses, core's [`Trainer::finish_step_external`] decides (a non-finite loss
    /// or norm skips the step: the adapter and the moments are not touched) and AdamW runs on
    /// the GPU, submitted without waiting. So after a step `trainer.lora` and
    /// `trainer.optimizer.m` / `.v` are stale on the CPU: call [`GpuTrainer::sync`] before a
    /// checkpoint, an export or anything else that reads them on the CPU. The GPU's state is
    /// taken to be the trainer's while it is the same trainer ([`Trainer::id`]) with the step
    /// counts and adapter allocation of the last step here; otherwise (another trainer, a
    /// resumed one, a step on the CPU in between) the CPU's values are uploaded first. Values
    /// changed in place on the CPU are not seen: sync, change, then step a resumed trainer.
    /// Where the flat buffers do not fit one binding, AdamW runs on the CPU as before.
    ///
    /// One difference to the CPU: the squared norm is summed in f32 (the CPU sums in f64), so
    /// gradients with a norm above ~1.8e19 overflow to inf here and the step is skipped where
    /// the CPU would clip it; a run that far gone has diverged either way.
    pub async fn step(&mut self, trainer: &mut Trainer) -> Result<StepReport, GpuError> {
        if !self.make_resident(trainer)? {
            return self.step_on_cpu(trainer).await;
        }
        let seqs = trainer.begin_step();
        let scale = trainer.grad_scale();
        let mut rng = trainer.rng().clone();
        let mut losses = Vec::with_capacity(seqs.len());
        let mut sumsq = 0f32;
        for (k, &i) in seqs.iter().enumerate() {
            let seq = &trainer.data.train[i];
            let t0 = clock(self.profiling);
            let (counted, plan) = self.prepare(
                &trainer.lora,
                false,
                &seq.tokens,
                &seq.targets,
                Some(&mut rng),
            )?;
            self.profile.upload_s = secs(t0);
            let t = seq.tokens.len();
            let weight = if counted > 0 {
                scale / counted as f32
            } else {
                0.0
            };
            let last = k + 1 == seqs.len();
            let mode = Mode::Flat {
                first: k == 0,
                last,
            };
            let values = self
                .run(&trainer.lora, t, weight, &plan, mode, true)
                .await?;
            if last {
                sumsq = values[self.max_tokens];
            }
            losses.push(mean(&values[..t], &seq.targets, counted));
        }
        *trainer.rng() = rng;
        let t0 = clock(self.profiling);
        let grad_norm = (sumsq as f64).sqrt() as f32;
        let opt_step = trainer.optimizer.step;
        let mut report = trainer.finish_step_external(grad_norm, &seqs, &losses);
        if report.skipped.is_none() {
            let s = AdamWScalars::new(&trainer.optimizer.config, opt_step, grad_norm);
            self.apply_adamw(&s)?;
        }
        if let Some(o) = self.opt.as_mut() {
            o.tag = Some(tag_of(trainer));
        }
        self.optimizer_s = secs(t0);
        if trainer.validation_due() {
            report.val_loss = self.validate(trainer).await?;
        }
        Ok(report)
    }

    /// [`GpuTrainer::step`] with the gradients read back and AdamW on the CPU.
    async fn step_on_cpu(&mut self, trainer: &mut Trainer) -> Result<StepReport, GpuError> {
        let seqs = trainer.begin_step();
        let mut grads = trainer.lora.zeros_like();
        let scale = trainer.grad_scale();
        let mut rng = trainer.rng().clone();
        let mut losses = Vec::with_capacity(seqs.len());
        for &i in &seqs {
            let seq = &trainer.data.train[i];
            losses.push(
                self.forward_backward(
                    &trainer.lora,
                    &seq.tokens,
                    &seq.targets,
                    &mut grads,
                    scale,
                    &mut rng,
                )
                .await?,
            );
        }
        *trainer.rng() = rng;
        let t0 = clock(self.profiling);
        let mut report = trainer.finish_step(grads, &seqs, &losses);
        self.optimizer_s = secs(t0);
        if trainer.validation_due() {
            report.val_loss = self.validate(trainer).await?;
        }
        Ok(report)
    }

    /// Makes the optimizer's buffers hold `trainer`'s adapter and moments (uploading them
    /// unless they already do). False when the flat buffers do not fit one binding (the
    /// model's binding limit, [`GpuModel::with_max_binding`]).
    fn make_resident(&mut self, trainer: &Trainer) -> Result<bool, GpuError> {
        self.check_adapter("adapter", &trainer.lora)?;
        if self.opt_unavailable {
            return Ok(false);
        }
        if self.opt.is_none() {
            let dev = &self.model.device;
            let rows = self.grad_floats.div_ceil(FLAT_ROW).max(1);
            if (4 * rows * FLAT_ROW) as u64 > self.model.max_binding {
                self.opt_unavailable = true;
                return Ok(false);
            }
            let flat = |what: &str| {
                GpuTensor::zeros(
                    dev,
                    format!("optimizer {what}"),
                    &[rows, FLAT_ROW],
                    DType::F32,
                )
            };
            let bufs = (|| {
                Ok::<_, GpuError>((flat("adapter")?, flat("gradients")?, flat("m")?, flat("v")?))
            })();
            let (p, g, m, v) = match bufs {
                Ok(b) => b,
                Err(GpuError::TooLarge { .. }) => {
                    self.opt_unavailable = true;
                    return Ok(false);
                }
                Err(e) => return Err(e),
            };
            self.opt = Some(OptState {
                p,
                g,
                g2: None,
                m,
                v,
                partials: GpuTensor::zeros(
                    dev,
                    "grad norm partials",
                    &[SumSquares::PARTIALS],
                    DType::F32,
                )?,
                sumsq: GpuTensor::zeros(dev, "grad norm squared", &[1], DType::F32)?,
                adamw: AdamWStep::new(dev),
                sum_squares: SumSquares::new(dev),
                add: ResidualAdd::new(dev, FLAT_ROW),
                tag: None,
                ab_current: false,
                readback: None,
            });
            self.model.errors.take()?;
        }
        let o = self.opt.as_mut().expect("made above");
        if trainer.options.accumulation > 1 && o.g2.is_none() {
            let g = &o.g;
            o.g2 = Some(GpuTensor::zeros(
                &self.model.device,
                "optimizer gradients (next sequence)",
                &g.shape,
                DType::F32,
            )?);
        }
        if o.tag == Some(tag_of(trainer)) {
            return Ok(true);
        }
        let n = o.p.numel();
        let pack = |l: &Lora| {
            let mut flat = vec![0f32; n];
            let mut k = 0;
            l.clone().for_each_mut(|_, _, x| {
                flat[k..k + x.len()].copy_from_slice(x);
                k += x.len();
            });
            flat
        };
        let q = &self.model.queue;
        for (t, l) in [
            (&o.p, &trainer.lora),
            (&o.m, &trainer.optimizer.m),
            (&o.v, &trainer.optimizer.v),
        ] {
            q.write_buffer(&t.buffer, 0, bytemuck::cast_slice(&pack(l)));
        }
        o.tag = Some(tag_of(trainer));
        o.ab_current = false;
        self.uploaded = None;
        Ok(true)
    }

    /// Records and submits AdamW over the flat buffers and the copies of the new adapter into
    /// the pairs' A and B; nothing waits for it (the next submission runs after it).
    fn apply_adamw(&mut self, s: &AdamWScalars) -> Result<(), GpuError> {
        let o = self.opt.as_ref().expect("resident");
        let dev = &self.model.device;
        let mut rec = Recorder::new(dev);
        o.adamw.encode(&mut rec, s, &o.p, &o.g, &o.m, &o.v)?;
        o.copy_adapter_out(&mut rec, &self.adapter, self.max_tokens);
        rec.submit(&self.model.queue);
        self.uploaded = None;
        Ok(())
    }

    /// Whether the optimizer's buffers hold `trainer`'s adapter (after [`GpuTrainer::step`]).
    fn resident(&self, trainer: &Trainer) -> bool {
        self.opt
            .as_ref()
            .is_some_and(|o| o.tag == Some(tag_of(trainer)))
    }

    /// Brings the adapter and Adam's moments that [`GpuTrainer::step`] keeps on the GPU back
    /// into `trainer.lora` and `trainer.optimizer.m` / `.v` (one readback): call it before a
    /// checkpoint, an export or CPU work on them. Nothing to do (and nothing read) when the GPU
    /// does not hold this trainer's state.
    pub async fn sync(&mut self, trainer: &mut Trainer) -> Result<(), GpuError> {
        if !self.resident(trainer) {
            return Ok(());
        }
        let dev = self.model.device.clone();
        let o = self.opt.as_mut().expect("resident");
        let n = o.p.buffer.size();
        let readback = o
            .readback
            .get_or_insert_with(|| {
                dev.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("optimizer readback"),
                    size: 3 * n,
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                })
            })
            .clone();
        let mut enc = dev.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("optimizer sync"),
        });
        for (k, t) in [&o.p, &o.m, &o.v].into_iter().enumerate() {
            enc.copy_buffer_to_buffer(&t.buffer, 0, &readback, k as u64 * n, n);
        }
        self.model.queue.submit([enc.finish()]);
        tensor::map_read(&dev, &readback, "optimizer readback").await?;
        let values = {
            let view = readback.get_mapped_range(..).map_err(|e| GpuError::Map {
                tensor: "optimizer readback".into(),
                msg: e.to_string(),
            });
            let out = view.map(|v| bytemuck::pod_collect_to_vec::<u8, f32>(&v));
            readback.unmap();
            out?
        };
        let per = n as usize / 4;
        for (k, l) in [
            &mut trainer.lora,
            &mut trainer.optimizer.m,
            &mut trainer.optimizer.v,
        ]
        .into_iter()
        .enumerate()
        {
            let mut at = k * per;
            l.for_each_mut(|_, _, x| {
                let len = x.len();
                x.copy_from_slice(&values[at..at + len]);
                at += len;
            });
        }
        self.model.errors.take()?;
        Ok(())
    }

    /// The trainer's validation loss (`Trainer::validate` on the GPU), with the adapter the
    /// GPU holds for it after [`GpuTrainer::step`] (no sync needed).
    pub async fn validate(&mut self, trainer: &Trainer) -> Result<Option<f32>, GpuError> {
        if !self.resident(trainer) {
            return self.mean_loss(&trainer.lora, &trainer.data.val).await;
        }
        let (mut sum, mut n) = (0f64, 0usize);
        for s in &trainer.data.val {
            let (counted, plan) =
                self.prepare(&trainer.lora, false, &s.tokens, &s.targets, None)?;
            let t = s.tokens.len();
            let values = self
                .run(&trainer.lora, t, 0.0, &plan, Mode::Loss, true)
                .await?;
            let out = mean(&values[..t], &s.targets, counted);
            sum += out.loss as f64 * out.tokens as f64;
            n += out.tokens;
        }
        Ok((n > 0).then(|| (sum / n as f64) as f32))
    }

    /// Checks that `l` has the trainer's rank and targets and the model's shapes.
    fn check_adapter(&self, what: &str, l: &Lora) -> Result<(), GpuError> {
        let cfg = &self.model.config;
        let bad = |msg: String| GpuError::Model(bitlora_core::Error::Lora { msg });
        if l.config.r != self.lora_config.r || l.config.targets != self.lora_config.targets {
            return Err(bad(format!(
                "the {what} have rank {} on {:?}; this GPU trainer was built for rank {} on {:?}",
                l.config.r, l.config.targets, self.lora_config.r, self.lora_config.targets
            )));
        }
        if l.layers.len() != cfg.num_hidden_layers {
            return Err(bad(format!(
                "the {what} have {} layers, the model {}",
                l.layers.len(),
                cfg.num_hidden_layers
            )));
        }
        let r = l.config.r;
        for (layer, pairs) in l.layers.iter().enumerate() {
            for (p, (pair, &(name, o, i))) in pairs.iter().zip(projections(cfg).iter()).enumerate()
            {
                match pair {
                    Some(pair) if pair.a.len() == r * i && pair.b.len() == o * r => {}
                    None if !l.config.targets[p] => {}
                    _ => {
                        return Err(bad(format!(
                            "the {what} of model.layers.{layer}.{name} do not have the shapes ({r}, {i}) and ({o}, {r})"
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// Checks the inputs, uploads tokens, targets and the adapter (if it changed), and plans
    /// the dropout streams (from `rng` when given and the adapter has dropout). Returns the
    /// number of counted targets and the plan.
    fn prepare(
        &mut self,
        lora: &Lora,
        upload: bool,
        tokens: &[u32],
        targets: &[Option<u32>],
        rng: Option<&mut Rng>,
    ) -> Result<(usize, MaskPlan), GpuError> {
        let cfg = self.model.config.clone();
        let counted = cpu_train::check_sequence(&cfg, tokens, targets)?;
        let t = tokens.len();
        if t > self.max_tokens {
            return Err(bitlora_core::Error::TooManyTokens {
                count: t,
                max: self.max_tokens,
            }
            .into());
        }
        self.check_adapter("adapter", lora)?;
        let queue = &self.model.queue;
        queue.write_buffer(&self.acts.tokens.buffer, 0, bytemuck::cast_slice(tokens));
        let ids: Vec<u32> = targets.iter().map(|y| y.unwrap_or(MASKED)).collect();
        queue.write_buffer(&self.acts.targets.buffer, 0, bytemuck::cast_slice(&ids));

        if upload && self.uploaded.as_ref() != Some(&lora.layers) {
            if let Some(o) = self.opt.as_mut() {
                o.ab_current = false;
            }
            for (bufs, pairs) in self.adapter.iter().zip(&lora.layers) {
                for (b, p) in bufs.iter().zip(pairs) {
                    if let (Some(b), Some(p)) = (b, p) {
                        queue.write_buffer(&b.a.buffer, 0, bytemuck::cast_slice(&p.a));
                        queue.write_buffer(&b.b.buffer, 0, bytemuck::cast_slice(&p.b));
                    }
                }
            }
            self.uploaded = Some(lora.layers.clone());
        }

        let dropout = lora.config.dropout;
        let mut plan: MaskPlan = vec![[None; 7]; cfg.num_hidden_layers];
        let Some(rng) = rng.filter(|_| dropout > 0.0) else {
            return Ok((counted, plan));
        };
        // Each adapted projection's dropout stream starts where the CPU's draws for it would:
        // layer by layer, projections in `model::projections` order, T*I draws each. The
        // kernels draw from those states themselves; the caller's RNG moves past them all.
        let shapes = projections(&cfg);
        for (p, &(_, _, i)) in shapes.iter().enumerate() {
            if self.lora_config.targets[p] && self.ops.dropout[p].is_none() {
                let dev = &self.model.device;
                self.ops.dropout[p] = Some(
                    self.ops
                        .dropout
                        .iter()
                        .flatten()
                        .find(|d| d.width() == i)
                        .cloned()
                        .unwrap_or_else(|| Dropout::new(dev, i)),
                );
            }
        }
        for (layer_plan, pairs) in plan.iter_mut().zip(&lora.layers) {
            for (slot, (pair, &(_, _, i))) in layer_plan.iter_mut().zip(pairs.iter().zip(&shapes)) {
                if pair.is_some() {
                    *slot = Some(rng.state());
                    rng.skip((t * i) as u64);
                }
            }
        }
        Ok((counted, plan))
    }

    /// Records the step (forward, head and loss, and with `backward` the backward), submits it
    /// with the copies into the staging buffer, and reads the staging buffer back: per-row
    /// losses at 0..T and, after a backward, the gradients at their offsets.
    async fn run(
        &mut self,
        lora: &Lora,
        t: usize,
        weight: f32,
        plan: &MaskPlan,
        mode: Mode,
        resident: bool,
    ) -> Result<Vec<f32>, GpuError> {
        let backward = mode != Mode::Loss;
        let a = match &self.views {
            Some(v) if v.tokens.shape[0] == t => v.clone(),
            _ => {
                let v = self.acts.view(t)?;
                self.views = Some(v.clone());
                v
            }
        };
        let cache = self.bind_cache.take().unwrap_or_default();
        let profiler = self.profiler.take();
        let t0 = clock(self.profiling);
        let step = Step {
            tr: self,
            a: &a,
            t,
            scale: lora.config.scale(),
            p: lora.config.dropout,
            plan,
        };
        let dev = &self.model.device;
        self.model.errors.take()?;
        let oom = dev.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = dev.push_error_scope(wgpu::ErrorFilter::Validation);
        let recorded = (|| {
            let mut rec = Recorder::with_cache(dev, cache);
            if let Some(p) = profiler {
                rec.set_profiler(p);
            }
            if resident {
                step.restore_adapter(&mut rec);
            }
            step.forward(&mut rec)?;
            step.head(&mut rec, weight, backward)?;
            if backward {
                step.backward(&mut rec)?;
            }
            if let Mode::Flat { first, last } = mode {
                step.flat_grads(&mut rec, first, last)?;
            }
            Ok::<_, GpuError>(rec.finish_profiled())
        })();
        let validation = validation.pop().await;
        let oom = oom.pop().await;
        let (mut enc, cache, profiler) = recorded?;
        self.bind_cache = Some(cache);
        self.profiler = profiler;
        if let Some(e) = validation.or(oom) {
            return Err(GpuError::Device(e.to_string()));
        }
        enc.copy_buffer_to_buffer(&a.loss.buffer, 0, &self.staging, 0, (4 * t) as u64);
        let mut used = self.max_tokens;
        if resident && let Some(o) = self.opt.as_mut() {
            // The pairs' A and B now hold the optimizer's adapter, not the last upload.
            o.ab_current = true;
            self.uploaded = None;
        }
        if let Mode::Flat { last: true, .. } = mode {
            let o = self.opt.as_ref().expect("a flat run has the optimizer");
            let at = (4 * self.max_tokens) as u64;
            enc.copy_buffer_to_buffer(&o.sumsq.buffer, 0, &self.staging, at, 4);
            used = self.max_tokens + 1;
        }
        if mode == Mode::Staging {
            for p in self.adapter.iter().flatten().flatten() {
                let (oa, ob) = p.staging;
                enc.copy_buffer_to_buffer(
                    &p.da.buffer,
                    0,
                    &self.staging,
                    (4 * oa) as u64,
                    p.da.bytes(),
                );
                enc.copy_buffer_to_buffer(
                    &p.db.buffer,
                    0,
                    &self.staging,
                    (4 * ob) as u64,
                    p.db.bytes(),
                );
            }
            used = self.staging_floats;
        }
        debug_assert_eq!(self.staging_floats, self.max_tokens + self.grad_floats);
        let enc = enc.finish();
        self.profile.record_s = secs(t0);
        let t0 = clock(self.profiling);
        self.model.queue.submit([enc]);
        let bytes = (4 * used) as u64;
        tensor::map_read(dev, &self.staging, "train readback").await?;
        self.profile.wait_s = secs(t0);
        let t0 = clock(self.profiling);
        let values = {
            let view = self
                .staging
                .get_mapped_range(..bytes)
                .map_err(|e| GpuError::Map {
                    tensor: "train readback".into(),
                    msg: e.to_string(),
                });
            let out = view.map(|v| bytemuck::pod_collect_to_vec::<u8, f32>(&v));
            self.staging.unmap();
            out?
        };
        self.profile.unpack_s = secs(t0);
        if let Some(p) = self.profiler.as_mut() {
            self.profile.dispatches = p.read(dev).await?;
        }
        self.model.errors.take()?;
        Ok(values)
    }
}

/// The mean of the counted rows' losses, summed in f64 in row order as on the CPU.
fn mean(row_loss: &[f32], targets: &[Option<u32>], counted: usize) -> StepLoss {
    let sum = row_loss
        .iter()
        .zip(targets)
        .filter(|(_, y)| y.is_some())
        .fold(0f64, |s, (&l, _)| s + l as f64);
    StepLoss {
        loss: (sum / counted.max(1) as f64) as f32,
        tokens: counted,
    }
}

/// One step being recorded: the trainer, the views of its buffers for T tokens, and the
/// adapter's scale, dropout factor and mask plan.
struct Step<'a> {
    tr: &'a GpuTrainer,
    a: &'a Acts,
    t: usize,
    scale: f32,
    p: f32,
    plan: &'a MaskPlan,
}

impl Step<'_> {
    /// Copies the optimizer's adapter into the pairs' A and B when they hold another.
    fn restore_adapter(&self, r: &mut Recorder) {
        let Some(o) = self.tr.opt.as_ref().filter(|o| !o.ab_current) else {
            return;
        };
        o.copy_adapter_out(r, &self.tr.adapter, self.tr.max_tokens);
    }

    /// Gathers this sequence's dA and dB into the optimizer's flat gradients (set by the
    /// first sequence, added by later ones) and, after the last, reduces their squared norm.
    fn flat_grads(&self, r: &mut Recorder, first: bool, last: bool) -> Result<(), GpuError> {
        let o = self.tr.opt.as_ref().ok_or(GpuError::Shape {
            op: "GpuTrainer",
            msg: "a flat step without the optimizer's buffers".into(),
        })?;
        let dst = if first {
            &o.g
        } else {
            o.g2.as_ref().ok_or(GpuError::Shape {
                op: "GpuTrainer",
                msg: "a step of several sequences by a trainer made for one".into(),
            })?
        };
        let base = self.tr.max_tokens;
        for pair in self.tr.adapter.iter().flatten().flatten() {
            let (oa, ob) = pair.staging;
            r.copy(
                &pair.da.buffer,
                0,
                &dst.buffer,
                (4 * (oa - base)) as u64,
                pair.da.bytes(),
            );
            r.copy(
                &pair.db.buffer,
                0,
                &dst.buffer,
                (4 * (ob - base)) as u64,
                pair.db.bytes(),
            );
        }
        if !first {
            o.add.encode(r, &o.g, dst)?;
        }
        if last {
            o.sum_squares.encode(r, &o.g, &o.partials, &o.sumsq)?;
        }
        Ok(())
    }

    /// The frozen BitLinear `y = x_q . W^T / (s_a s_w)` of projection `lin`.
    fn bitlinear(
        &self,
        r: &mut Recorder,
        xq: &GpuTensor,
        lin: &Linear,
        y: &GpuTensor,
    ) -> Result<(), GpuError> {
        lin.op.encode(r, xq, &self.a.s_a, &lin.w, &lin.sw, y)
    }

    /// The adapter's dropout(x) for projection p of layer l: x itself without dropout.
    fn lora_input(
        &self,
        r: &mut Recorder,
        l: usize,
        p: usize,
        x: &GpuTensor,
    ) -> Result<GpuTensor, GpuError> {
        let Some(state) = self.plan[l][p] else {
            return Ok(x.clone());
        };
        let xd = self.a.xdrop.view(&[self.t, x.shape[1]])?;
        self.dropout(p)?.encode(r, x, state, self.p, &xd)?;
        Ok(xd)
    }

    fn dropout(&self, p: usize) -> Result<&Dropout, GpuError> {
        self.tr.ops.dropout[p].as_ref().ok_or(GpuError::Shape {
            op: "GpuTrainer",
            msg: "dropout was planned without its pipeline".into(),
        })
    }

    /// y += s * (dropout(x) A^T) B^T for projection p of layer l, saving u = dropout(x) A^T.
    fn lora_forward(
        &self,
        r: &mut Recorder,
        l: usize,
        p: usize,
        x: &GpuTensor,
        y: &GpuTensor,
    ) -> Result<(), GpuError> {
        let (Some(pair), Some(op), Some(u)) = (
            &self.tr.adapter[l][p],
            &self.tr.ops.lora[p],
            &self.a.u[l][p],
        ) else {
            return Ok(());
        };
        let xin = self.lora_input(r, l, p, x)?;
        op.down(r, &xin, &pair.a, u)?;
        op.up_add(r, u, &pair.b, self.scale, y)
    }

    /// The adapter's backward for projection p of layer l with input x and output gradient
    /// dy: dB = s dy^T u, du = s dy B, dA = du^T dropout(x), and dx += (du A) * mask.
    fn lora_backward(
        &self,
        r: &mut Recorder,
        l: usize,
        p: usize,
        x: &GpuTensor,
        dy: &GpuTensor,
        dx: &GpuTensor,
    ) -> Result<(), GpuError> {
        let (Some(pair), Some(op), Some(u)) = (
            &self.tr.adapter[l][p],
            &self.tr.ops.lora[p],
            &self.a.u[l][p],
        ) else {
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
                self.dropout(p)?.encode_add(r, &ldx, state, self.p, dx)
            }
        }
    }

    /// The training forward, saving each layer's activations (see the module doc).
    fn forward(&self, r: &mut Recorder) -> Result<(), GpuError> {
        let (m, a) = (&self.tr.model, self.a);
        let (cos, sin) = (&m.rope_cos, &m.rope_sin);
        m.embedding
            .encode_split(r, &a.tokens, &m.embed_tokens, &a.h[0])?;
        for (l, lay) in m.layers.iter().enumerate() {
            // Attention block: h_mid = h + o_proj(attn_sub_norm(attn(rope(q), rope(k), v))).
            let n = &lay.input_layernorm;
            n.op.encode(r, &a.h[l], &n.w, &a.x)?;
            m.quant_c.encode(r, &a.x, &a.xq_c, &a.s_a)?;
            self.bitlinear(r, &a.xq_c, &lay.q_proj, &a.q[l])?;
            self.lora_forward(r, l, 0, &a.x, &a.q[l])?;
            self.bitlinear(r, &a.xq_c, &lay.k_proj, &a.k[l])?;
            self.lora_forward(r, l, 1, &a.x, &a.k[l])?;
            self.bitlinear(r, &a.xq_c, &lay.v_proj, &a.v[l])?;
            self.lora_forward(r, l, 2, &a.x, &a.v[l])?;
            m.rope_q.encode(r, &a.q[l], cos, sin)?;
            m.rope_k.encode(r, &a.k[l], cos, sin)?;
            m.attention
                .encode(r, &a.q[l], &a.k[l], &a.v[l], &a.att[l])?;
            let n = &lay.attn_sub_norm;
            n.op.encode(r, &a.att[l], &n.w, &a.att_n)?;
            m.quant_q.encode(r, &a.att_n, &a.xq_q, &a.s_a)?;
            self.bitlinear(r, &a.xq_q, &lay.o_proj, &a.h_mid[l])?;
            self.lora_forward(r, l, 3, &a.att_n, &a.h_mid[l])?;
            // h_mid = o + h: the same f32 sums as the CPU's h + o.
            m.residual_add.encode(r, &a.h_mid[l], &a.h[l])?;

            // FFN block: h[l+1] = h_mid + down_proj(ffn_sub_norm(act(gate(x)) * up(x))).
            let n = &lay.post_attention_layernorm;
            n.op.encode(r, &a.h_mid[l], &n.w, &a.x)?;
            m.quant_c.encode(r, &a.x, &a.xq_c, &a.s_a)?;
            self.bitlinear(r, &a.xq_c, &lay.gate_proj, &a.gate[l])?;
            self.lora_forward(r, l, 4, &a.x, &a.gate[l])?;
            self.bitlinear(r, &a.xq_c, &lay.up_proj, &a.up[l])?;
            self.lora_forward(r, l, 5, &a.x, &a.up[l])?;
            m.gated_act.encode(r, &a.gate[l], &a.up[l], &a.ffn)?;
            let n = &lay.ffn_sub_norm;
            n.op.encode(r, &a.ffn, &n.w, &a.ffn_n)?;
            m.quant_f.encode(r, &a.ffn_n, &a.xq_f, &a.s_a)?;
            self.bitlinear(r, &a.xq_f, &lay.down_proj, &a.h[l + 1])?;
            self.lora_forward(r, l, 6, &a.ffn_n, &a.h[l + 1])?;
            m.residual_add.encode(r, &a.h[l + 1], &a.h_mid[l])?;
        }
        Ok(())
    }

    /// The final norm, the head and the loss a window of rows at a time; with `backward`, each
    /// window's dlogits go straight back through the head into dx (T, C).
    fn head(&self, r: &mut Recorder, weight: f32, backward: bool) -> Result<(), GpuError> {
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
    fn backward(&self, r: &mut Recorder) -> Result<(), GpuError> {
        let (m, a, ops) = (&self.tr.model, self.a, &self.tr.ops);
        let (cos, sin) = (&m.rope_cos, &m.rope_sin);
        let tb = &ops.ternary_back;
        let nl = m.layers.len();
        ops.rms_back_c
            .encode(r, &a.h[nl], &m.norm.w, &a.dx, &a.dh)?;
        for (l, lay) in m.layers.iter().enumerate().rev() {
            // FFN block. Recompute f = act(gate) * up and its sub-norm (the forward's bits).
            m.gated_act.encode(r, &a.gate[l], &a.up[l], &a.ffn)?;
            let n = &lay.ffn_sub_norm;
            n.op.encode(r, &a.ffn, &n.w, &a.ffn_n)?;
            let lin = &lay.down_proj;
            tb[6].encode(r, &a.dh, &lin.w, &lin.sw, &a.df_a)?; // d fnorm
            self.lora_backward(r, l, 6, &a.ffn_n, &a.dh, &a.df_a)?;
            ops.rms_back_f.encode(r, &a.ffn, &n.w, &a.df_a, &a.df_b)?; // d f
            ops.gated_back
                .encode(r, &a.gate[l], &a.up[l], &a.df_b, &a.df_a, &a.df_c)?; // d gate, d up
            let n = &lay.post_attention_layernorm;
            n.op.encode(r, &a.h_mid[l], &n.w, &a.x)?; // xn2
            let lin = &lay.gate_proj;
            tb[4].encode(r, &a.df_a, &lin.w, &lin.sw, &a.dx)?;
            self.lora_backward(r, l, 4, &a.x, &a.df_a, &a.dx)?;
            let lin = &lay.up_proj;
            tb[5].encode_add(r, &a.df_c, &lin.w, &lin.sw, &a.dx)?;
            self.lora_backward(r, l, 5, &a.x, &a.df_c, &a.dx)?;
            ops.rms_back_c
                .encode_add(r, &a.h_mid[l], &n.w, &a.dx, &a.dh)?;

            // Attention block.
            let n = &lay.attn_sub_norm;
            n.op.encode(r, &a.att[l], &n.w, &a.att_n)?; // an
            let lin = &lay.o_proj;
            tb[3].encode(r, &a.dh, &lin.w, &lin.sw, &a.dq_a)?; // d an
            self.lora_backward(r, l, 3, &a.att_n, &a.dh, &a.dq_a)?;
            ops.rms_back_q
                .encode(r, &a.att[l], &n.w, &a.dq_a, &a.dq_b)?; // d att
            ops.attention_back.encode(
                r, &a.q[l], &a.k[l], &a.v[l], &a.dq_b, &a.stats, &a.dq, &a.dk, &a.dv,
            )?;
            ops.rope_back_q.encode(r, &a.dq, cos, sin)?;
            ops.rope_back_k.encode(r, &a.dk, cos, sin)?;
            let n = &lay.input_layernorm;
            n.op.encode(r, &a.h[l], &n.w, &a.x)?; // xn1
            let lin = &lay.q_proj;
            tb[0].encode(r, &a.dq, &lin.w, &lin.sw, &a.dx)?;
            self.lora_backward(r, l, 0, &a.x, &a.dq, &a.dx)?;
            let lin = &lay.k_proj;
            tb[1].encode_add(r, &a.dk, &lin.w, &lin.sw, &a.dx)?;
            self.lora_backward(r, l, 1, &a.x, &a.dk, &a.dx)?;
            let lin = &lay.v_proj;
            tb[2].encode_add(r, &a.dv, &lin.w, &lin.sw, &a.dx)?;
            self.lora_backward(r, l, 2, &a.x, &a.dv, &a.dx)?;
            ops.rms_back_c.encode_add(r, &a.h[l], &n.w, &a.dx, &a.dh)?;
        }
        Ok(())
    }
}
