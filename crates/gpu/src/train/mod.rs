//! LoRA training on the GPU. [`GpuTrainer`] holds what a pass needs (the model's weights,
//! the pipelines, the saved activations and scratch for up to `max_tokens` tokens, the adapter
//! buffers the kernels bind) and records one training pass into one submission:
//!
//! ```text
//! upload: tokens, targets; each dropout stream's RNG state (the kernels draw the CPU's
//!         numbers themselves: SplitMix64 is counter-based); the adapter if it changed
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
//! gradients: into the run's flat gradient buffer on the GPU (resident), or copied out
//! readback: the T per-row losses (+ the squared gradient norm after a step's last sequence)
//! ```
//!
//! The normed activations (x, attn_sub_norm(att), act(gate) * up and its sub-norm) are not
//! saved but recomputed in the backward from what is: the same kernel on the same input gives
//! the same bits, and it halves the (T, F) memory. Attention probabilities are recomputed by
//! the attention backward itself.
//!
//! Gradient rules as on the CPU (crates/core/src/train.rs): LoRA A and B get gradients, every
//! frozen weight passes dX only (straight-through on the activation quantizer).
//!
//! The files: this one holds the trainer and its buffers; [`step`] records a pass (forward,
//! head, backward, gradient gathering), one projection at a time by its [`Proj`];
//! [`optimizer`] holds a run's adapter and moments ([`GpuState`], resident on the GPU) and
//! [`GpuBackend`], the GPU as core's training backend (`bitlora_core::trainer`): the training
//! loop itself is core's, written once for every backend.
//!
//! Everything that waits is `async` and never blocks (the web); natively use `pollster`.

mod optimizer;
mod plan;
mod step;

pub use optimizer::{GpuBackend, GpuState, Placement};

use bitlora_core::Config;
use bitlora_core::data::Sequence;
use bitlora_core::lora::{Lora, LoraConfig};
use bitlora_core::model::{Proj, projections};
use bitlora_core::rng::Rng;
use bitlora_core::train::{self as cpu_train, StepLoss};

use crate::GpuError;
use crate::model::{GpuModel, cached};
use crate::ops::cross_entropy::MASKED;
use crate::ops::{
    AttentionBackward, CrossEntropy, Dropout, GatedActBackward, LoraMatmul, MatmulBackward,
    RmsNormBackward, RopeBackward, TernaryBackward,
};
use crate::record::{BindCache, DispatchTimes, Profiler, Recorder};
use crate::tensor::{self, DType, GpuTensor};
use optimizer::Resident;
pub use plan::{
    HEAD_WINDOW_BYTES, PlanOptions, Planned, READBACK_CHUNK_ROWS, Recompute, Role, TrainPlan,
};
use step::Step;

/// One adapted projection's tensors on the GPU.
pub(super) struct PairBufs {
    pub(super) a: GpuTensor,  // (R, I)
    pub(super) b: GpuTensor,  // (O, R)
    pub(super) da: GpuTensor, // (R, I) this call's dA: one layer's, shared by the layers
    pub(super) db: GpuTensor, // (O, R) this call's dB: the same
    /// Offsets (in f32s) of dA and dB in the staging buffer.
    pub(super) staging: (usize, usize),
}

/// What a run does with the gradients of its backward.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Mode {
    /// Forward and loss only.
    Loss,
    /// Backward; every dA and dB is read back (for gradients summed on the CPU).
    Staging,
    /// Backward into the optimizer's flat gradients on the GPU: `first` sets them, a later
    /// sequence adds into them (the CPU's accumulation order); `last` also reduces their
    /// squared norm and reads it back with the losses.
    Flat { first: bool, last: bool },
}

/// The pipelines of the backward and the adapter's products, one per shape.
struct Ops {
    ternary_back: [TernaryBackward; 7], // per Proj
    lora: [Option<LoraMatmul>; 7],      // per Proj, adapted ones
    dropout: [Option<Dropout>; 7],      // per Proj, built when a step first has dropout
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
    u: Vec<[Option<GpuTensor>; 7]>, // L x 7 x (T, R): x A^T of each adapted projection
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
    /// Allocates every activation and scratch buffer from the table (`plan`).
    fn new(
        dev: &wgpu::Device,
        plan: &TrainPlan,
        cfg: &Config,
        adapted: [bool; 7],
    ) -> Result<Acts, GpuError> {
        let l = cfg.num_hidden_layers;
        let t = |name: &str| plan.alloc(dev, name);
        let per_layer = |what: &str, n: usize| -> Result<Vec<GpuTensor>, GpuError> {
            (0..n).map(|layer| t(&plan::saved(what, layer))).collect()
        };
        let kept = plan::saved_layers(l, plan.recompute);
        let u = (0..kept)
            .map(|layer| per_proj(|p| adapted[p].then(|| t(&plan::lora_u(layer, p))).transpose()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Acts {
            tokens: t("train tokens")?,
            targets: t("train targets")?,
            loss: t("train loss")?,
            h: per_layer("h", l + 1)?,
            h_mid: per_layer("h_mid", kept)?,
            q: per_layer("q", kept)?,
            k: per_layer("k", kept)?,
            v: per_layer("v", kept)?,
            att: per_layer("attention", kept)?,
            gate: per_layer("gate", kept)?,
            up: per_layer("up", kept)?,
            u,
            x: t("train x")?,
            xq_c: t("train x_q (C)")?,
            xq_q: t("train x_q (NH*HS)")?,
            xq_f: t("train x_q (F)")?,
            s_a: t("train s_a")?,
            att_n: t("train attention (sub-normed)")?,
            ffn: t("train ffn")?,
            ffn_n: t("train ffn (sub-normed)")?,
            dh: t("d h")?,
            dx: t("d x")?,
            dq_a: t("d attention (sub-normed)")?,
            dq_b: t("d attention")?,
            dq: t("d q")?,
            dk: t("d k")?,
            dv: t("d v")?,
            df_a: t("d ffn (sub-normed) / d gate")?,
            df_b: t("d ffn")?,
            df_c: t("d up")?,
            du: t("d u")?,
            stats: t("attention backward stats")?,
            xdrop: t("dropout(x)")?,
            ldx: t("d dropout(x)")?,
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
                .map(|layer| per_proj(|p| layer[p].as_ref().map(rv).transpose()))
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
pub(super) type MaskPlan = Vec<[Option<u64>; 7]>;

/// `[f(Q), f(K), ..., f(Down)]`, or the first error.
fn per_proj<T, E>(mut f: impl FnMut(Proj) -> Result<T, E>) -> Result<[T; 7], E> {
    let v = Proj::ALL
        .iter()
        .map(|&p| f(p))
        .collect::<Result<Vec<T>, E>>()?;
    match v.try_into() {
        Ok(a) => Ok(a),
        Err(_) => unreachable!("Proj::ALL has seven"),
    }
}

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
    adapter: Vec<[Option<PairBufs>; 7]>, // L x 7
    /// The (serial, version) of the [`GpuState`] whose adapter the pairs' A and B hold (None:
    /// another, e.g. one uploaded by [`GpuTrainer::forward_backward`], or none yet).
    holds: Option<(u64, u64)>,
    /// The last rows of logits a window of the head holds: (W, V).
    logits: GpuTensor,
    staging: wgpu::Buffer,
    staging_floats: usize,
    /// Bind groups and uniform buffers of the last steps: the same every step of a given T.
    bind_cache: Option<BindCache>,
    /// The head backward's partial sums (S, W, C) when it splits the vocabulary (GPUs).
    head_scratch: Option<GpuTensor>,
    /// Floats of all the adapter's tensors (the optimizer's flat buffers hold as many).
    grad_floats: usize,
    bytes: u64,
    /// Bytes mapped and read back by the last pass (losses, and the norm or the gradients).
    read_bytes: u64,
    /// Profiling on: host times, and GPU timestamps when `profiler` is Some.
    profiling: bool,
    /// The table every buffer here (and a run's [`GpuState`]) is allocated from.
    plan: TrainPlan,
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
        let mut tb_cache: Vec<((usize, usize), TernaryBackward)> = Vec::new();
        let mut lora_cache: Vec<((usize, usize), LoraMatmul)> = Vec::new();
        let ternary_back = Proj::ALL.map(|p| {
            let (o, i) = p.shape(&cfg);
            cached(&mut tb_cache, (o, i), || TernaryBackward::new(&dev, i, o))
        });
        let lora = Proj::ALL.map(|p| {
            let (o, i) = p.shape(&cfg);
            adapted[p].then(|| cached(&mut lora_cache, (o, i), || LoraMatmul::new(&dev, i, o, r)))
        });
        let ops = Ops {
            ternary_back,
            lora,
            dropout: Default::default(),
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
        // Every buffer's shape comes from one table (plan.rs), which the estimate sums too.
        let plan = TrainPlan::new(
            &cfg,
            lora_config,
            &model.train_plan_options(max_tokens, true),
        );
        let acts = Acts::new(&dev, &plan, &cfg, adapted)?;

        // The adapter and its gradients; their places in the staging buffer after the
        // max_tokens per-row losses.
        let mut offset = max_tokens;
        let mut adapter = Vec::with_capacity(cfg.num_hidden_layers);
        // One layer's gradients per projection, shared by the layers (see Step::grads_out).
        let mut grads: [Option<(GpuTensor, GpuTensor)>; 7] = Default::default();
        for p in Proj::ALL.into_iter().filter(|&p| adapted[p]) {
            grads[p] = Some((
                plan.alloc(&dev, &plan::grad_name(p, "A"))?,
                plan.alloc(&dev, &plan::grad_name(p, "B"))?,
            ));
        }
        for l in 0..cfg.num_hidden_layers {
            let mut layer: [Option<PairBufs>; 7] = Default::default();
            for p in Proj::ALL {
                if !adapted[p] {
                    continue;
                }
                let (o, i) = p.shape(&cfg);
                let n = format!("model.layers.{l}.{}", p.hf_name());
                let z = |what: &str| plan.alloc(&dev, &format!("{n}.{what}"));
                let (da, db) = grads[p].clone().ok_or(GpuError::Shape {
                    op: "GpuTrainer",
                    msg: format!("no gradient buffers for {n}"),
                })?;
                let pair = PairBufs {
                    a: z("lora_A.weight")?,
                    b: z("lora_B.weight")?,
                    da,
                    db,
                    staging: (offset, offset + r * i),
                };
                offset += r * i + o * r;
                layer[p] = Some(pair);
            }
            adapter.push(layer);
        }
        let grad_floats = offset - max_tokens;
        let staging_floats = offset;
        let staging = readback_buffer(&dev, plan.get("train readback")?.bytes());

        // The head's window of logits rows (as many as one binding holds). On a GPU the head's
        // dX sums over the whole vocabulary for only T x C outputs: the table splits that sum
        // across workgroups (see ops::MatmulBackward); CPU adapters need no split.
        let logits = plan.alloc(&dev, "train logits window")?;
        let head_scratch = plan
            .get("head backward slabs")
            .is_ok()
            .then(|| plan.alloc(&dev, "head backward slabs"))
            .transpose()?;

        let bytes = acts.all().iter().map(|t| t.buffer.size()).sum::<u64>()
            + adapter
                .iter()
                .flatten()
                .flatten()
                .map(|p| p.a.buffer.size() + p.b.buffer.size())
                .sum::<u64>()
            + grads
                .iter()
                .flatten()
                .map(|(da, db)| da.buffer.size() + db.buffer.size())
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
            holds: None,
            logits,
            staging,
            staging_floats,
            bind_cache: None,
            head_scratch,
            grad_floats,
            bytes,
            read_bytes: 0,
            profiling: false,
            profiler: None,
            profile: StepProfile::default(),
            plan,
        })
    }

    /// The table of this trainer's buffers (and of a run's optimizer state on it).
    pub fn plan(&self) -> &TrainPlan {
        &self.plan
    }

    /// The scratch of a head backward in `slabs` slabs (None for 1), fewer if it would not
    /// fit one binding: a test hook ([`GpuTrainer::set_head_slabs`]) outside the table.
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
    /// activations, scratch, the adapter with its gradients and the logits window (a run's
    /// optimizer state is [`GpuState::bytes`]).
    pub fn bytes(&self) -> u64 {
        self.bytes + self.staging.size() + self.head_scratch.as_ref().map_or(0, |t| t.buffer.size())
    }

    /// Bytes the last pass read back from the GPU: the per-row losses, plus the squared
    /// gradient norm (resident step) or every dA and dB (host optimizer, or
    /// [`GpuTrainer::forward_backward`]).
    pub fn read_bytes(&self) -> u64 {
        self.read_bytes
    }

    /// One sequence's forward and backward with the adapter `lora`, as
    /// `bitlora_core::train::forward_backward` (the op-level twin the tests compare): `targets[t]`
    /// is the token position t should predict (None: not counted). Returns the mean
    /// cross-entropy over the counted targets and ADDS `grad_scale` times its gradient into
    /// `grads` (same shapes as `lora`), read back from the GPU. Dropout draws from `rng` in the
    /// CPU reference's order (the kernels compute the draws, `rng` moves past them), so the
    /// same RNG gives the same masks, losses and gradients. Training runs use
    /// [`GpuTrainer::train_sequence`] through core's loop instead, which reads no gradients.
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
        self.check_adapter("adapter", lora)?;
        let t0 = clock(self.profiling);
        let (counted, plan) = self.prepare(&lora.config, tokens, targets, Some(rng))?;
        self.upload(lora);
        self.profile.upload_s = secs(t0);
        let t = tokens.len();
        let weight = if counted > 0 {
            grad_scale / counted as f32
        } else {
            0.0
        };
        let values = self
            .run(&lora.config, None, false, t, weight, &plan, Mode::Staging)
            .await?;
        let t0 = clock(self.profiling);
        self.add_staged(&values, grads);
        self.profile.unpack_s += secs(t0);
        Ok(mean(&values[..t], targets, counted))
    }

    /// Adds the gradients a [`Mode::Staging`] pass read back into `grads`, in staging order.
    fn add_staged(&self, values: &[f32], grads: &mut Lora) {
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
    }

    /// The mean cross-entropy of the model with `lora` applied, forward only and dropout off:
    /// the validation loss, as `bitlora_core::train::loss`.
    pub async fn loss(
        &mut self,
        lora: &Lora,
        tokens: &[u32],
        targets: &[Option<u32>],
    ) -> Result<StepLoss, GpuError> {
        self.check_adapter("adapter", lora)?;
        let t0 = clock(self.profiling);
        let (counted, plan) = self.prepare(&lora.config, tokens, targets, None)?;
        self.upload(lora);
        self.profile.upload_s = secs(t0);
        let t = tokens.len();
        let values = self
            .run(&lora.config, None, false, t, 0.0, &plan, Mode::Loss)
            .await?;
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

    /// Writes `lora` into the pairs' A and B buffers.
    fn upload(&mut self, lora: &Lora) {
        let queue = &self.model.queue;
        for (bufs, pairs) in self.adapter.iter().zip(&lora.layers) {
            for (b, p) in bufs.iter().zip(pairs) {
                if let (Some(b), Some(p)) = (b, p) {
                    queue.write_buffer(&b.a.buffer, 0, bytemuck::cast_slice(&p.a));
                    queue.write_buffer(&b.b.buffer, 0, bytemuck::cast_slice(&p.b));
                }
            }
        }
        self.holds = None;
    }

    /// Makes the pairs' A and B hold `lora`, a host-kept state's adapter at `id`.
    pub(super) fn hold_host(&mut self, lora: &Lora, id: (u64, u64)) {
        if self.holds != Some(id) {
            self.upload(lora);
            self.holds = Some(id);
        }
    }

    /// Checks that `l` has the trainer's rank and targets and the model's shapes.
    pub(super) fn check_adapter(&self, what: &str, l: &Lora) -> Result<(), GpuError> {
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

    /// Checks the inputs, uploads tokens and targets, and plans the dropout streams (from
    /// `rng` when given and the adapter has dropout). Returns the number of counted targets and
    /// the plan.
    fn prepare(
        &mut self,
        lora: &LoraConfig,
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
        let queue = &self.model.queue;
        queue.write_buffer(&self.acts.tokens.buffer, 0, bytemuck::cast_slice(tokens));
        let ids: Vec<u32> = targets.iter().map(|y| y.unwrap_or(MASKED)).collect();
        queue.write_buffer(&self.acts.targets.buffer, 0, bytemuck::cast_slice(&ids));

        let mut plan: MaskPlan = vec![[None; 7]; cfg.num_hidden_layers];
        let Some(rng) = rng.filter(|_| lora.dropout > 0.0) else {
            return Ok((counted, plan));
        };
        // Each adapted projection's dropout stream starts where the CPU's draws for it would:
        // layer by layer, projections in `Proj::ALL` order, T*I draws each. The kernels draw
        // from those states themselves; the caller's RNG moves past them all.
        let adapted = self.lora_config.targets;
        for p in Proj::ALL {
            let (_, i) = p.shape(&cfg);
            if adapted[p] && self.ops.dropout[p].is_none() {
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
        for layer_plan in plan.iter_mut() {
            for p in Proj::ALL {
                if adapted[p] {
                    layer_plan[p] = Some(rng.state());
                    rng.skip((t * p.shape(&cfg).1) as u64);
                }
            }
        }
        Ok((counted, plan))
    }

    /// Records the step (forward, head and loss, and with `backward` the backward), submits it
    /// with the copies into the staging buffer, and reads the staging buffer back: per-row
    /// losses at 0..T and, after a backward, the gradients at their offsets.
    #[allow(clippy::too_many_arguments)]
    async fn run(
        &mut self,
        lora: &LoraConfig,
        res: Option<&Resident>,
        restore: bool,
        t: usize,
        weight: f32,
        plan: &MaskPlan,
        mode: Mode,
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
        // What comes back: the T per-row losses; after a resident step's last sequence the
        // squared gradient norm at T; in staging mode every dA and dB at its offset, copied
        // there by each layer's backward.
        let need = (4 * self.staging_floats) as u64;
        if mode == Mode::Staging && self.staging.size() < need {
            // A resident run's trainer sized it for the losses and the norm only.
            self.staging = readback_buffer(&self.model.device, need);
        }
        let cache = self.bind_cache.take().unwrap_or_default();
        let profiler = self.profiler.take();
        let t0 = clock(self.profiling);
        let step = Step {
            mode,
            tr: self,
            a: &a,
            t,
            scale: lora.scale(),
            dropout: lora.dropout,
            plan,
            res,
            restore,
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
            step.restore_adapter(&mut rec);
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
        let mut used = t;
        if let (Mode::Flat { last: true, .. }, Some(o)) = (mode, res) {
            enc.copy_buffer_to_buffer(&o.sumsq.buffer, 0, &self.staging, (4 * t) as u64, 4);
            used = t + 1;
        }
        if mode == Mode::Staging {
            used = self.staging_floats;
        }
        debug_assert_eq!(self.staging_floats, self.max_tokens + self.grad_floats);
        let enc = enc.finish();
        self.profile.record_s = secs(t0);
        let t0 = clock(self.profiling);
        self.model.queue.submit([enc]);
        let bytes = (4 * used) as u64;
        self.read_bytes = bytes;
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

/// A buffer the host maps to read what a pass copied into it.
fn readback_buffer(dev: &wgpu::Device, size: u64) -> wgpu::Buffer {
    dev.create_buffer(&wgpu::BufferDescriptor {
        label: Some("train readback"),
        size,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    })
}
