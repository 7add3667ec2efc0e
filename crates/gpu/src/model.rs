//! [`GpuModel`]: a `bitlora_core::Model` uploaded to the GPU, and its forward pass, the same
//! sequence of ops as `Model::logits` (crates/core/src/model.rs), one dispatch per op:
//! ```text
//! h = embed[tokens]                                                     (T, C)
//! for each layer:
//!     x = input_layernorm(h)                                            (T, C)
//!     q, k, v = rope(q_proj(x)), rope(k_proj(x)), v_proj(x)             (T, NH*HS), (T, NKV*HS) x2
//!     h += o_proj(attn_sub_norm(causal_gqa_attention(q, k, v)))         (T, C)
//!     x = post_attention_layernorm(h)                                   (T, C)
//!     h += down_proj(ffn_sub_norm(act(gate_proj(x)) * up_proj(x)))      (T, C)
//! logits = norm(h) . lm_head^T   (lm_head = embed when tied)            (T, V)
//! ```
//! where each BitLinear is act_quant (x -> x_q, s_a) then ternary_matmul. Every BitLinear's
//! input is an RMSNorm's output, so the norm and the quantization run as one dispatch
//! (`RmsNorm::encode_quant`, bit-identical to the two). The ternary weights stay in
//! transformers' packed 2-bit layout on the GPU.
//!
//! One code path serves every use: [`GpuModel::forward`] runs T new tokens after the tokens
//! already in a [`GpuKvCache`] (k_proj and v_proj write straight into the cache rows past..past+T,
//! RoPE rotates them there at positions past.., attention reads all past+T keys), exactly as
//! `Model::forward` on the CPU. [`GpuModel::logits`] is the empty-cache case, batched prefill is
//! one forward of the whole prompt, and decoding feeds one token at a time.
//!
//! Every kernel computes a row the same way whatever T and the cache offset are (the same
//! summation order, integer ternary products), so cached decoding reproduces the full pass's
//! logits bit for bit; tests/model.rs checks it with `assert_eq!`.
//!
//! Large tensors: the embedding and the head are [`SplitTensor`]s, split along V into chunks
//! that fit one storage binding (one dispatch per chunk). A pass over more tokens than its
//! (T, V) logits or (T, F) activations can hold in one binding is cut into several passes
//! through the cache, which by the above gives the same logits.
//!
//! Storage of the embedding and the head: bf16 when every value is exactly a bf16 and C is
//! even, else f32 ([`SplitTensor::upload`]). BitNet checkpoints store both tables in bf16 and
//! the loader widens them to f32 exactly, so they take half the f32 bytes on the GPU (1b shape,
//! V = 32002, C = 2048, untied: 2 x 131 MB instead of 2 x 262 MB), split at the rows where f32
//! chunks would be (the head's backward sums chunk by chunk). embedding.wgsl, matmul.wgsl and
//! matmul_backward.wgsl read a bf16 value as the same f32 (`bits << 16`) and do the same f32
//! operations in the same order, so logits and gradients are bit-identical to f32 storage ([`GpuModel::with_f32_tables`] forces f32;
//! tests/model.rs compares the two). The embedding and an untied head choose independently;
//! the ops are built for the format of the tensor they read.

use bitlora_core::lora::Lora;
use bitlora_core::model::{Proj, projections};
use bitlora_core::quant::TernaryLinear;
use bitlora_core::{Config, Model, ops as cpu_ops};

use crate::ops::{
    Argmax, Attention, Embedding, GatedAct, LoraMatmul, Matmul, ResidualAdd, RmsNorm, Rope,
    RopePair, TernaryDecode, TernaryGlu, TernaryMatmul,
};
use bitlora_core::generate::{Sampler, SamplingOptions};

use std::cell::RefCell;

use crate::record::{BindCache, DispatchTimes, Profiler, Recorder};
use crate::tensor::{self, DType, GpuTensor, SplitTensor};
use crate::{ErrorSink, Gpu, GpuError};

/// A BitLinear on the GPU: packed weight, its scale, and the launcher for its shape.
pub(crate) struct Linear {
    pub(crate) w: GpuTensor,  // (O, I) ternary
    pub(crate) sw: GpuTensor, // (1) s_w
    pub(crate) s: f32,        // s_w again, for kernels that take it as a number
    pub(crate) op: TernaryMatmul,
}

impl Linear {
    /// (W, s_w).
    fn pair(&self) -> (&GpuTensor, &GpuTensor) {
        (&self.w, &self.sw)
    }

    /// (W, s_w as a number).
    fn with_scale(&self) -> (&GpuTensor, f32) {
        (&self.w, self.s)
    }
}

/// An RMSNorm weight with the launcher for its width.
pub(crate) struct Norm {
    pub(crate) w: GpuTensor, // (C) or (NH*HS) or (F)
    pub(crate) op: RmsNorm,
}

pub(crate) struct Layer {
    pub(crate) input_layernorm: Norm,
    pub(crate) q_proj: Linear,
    pub(crate) k_proj: Linear,
    pub(crate) v_proj: Linear,
    pub(crate) attn_sub_norm: Norm,
    pub(crate) o_proj: Linear,
    pub(crate) post_attention_layernorm: Norm,
    pub(crate) gate_proj: Linear,
    pub(crate) up_proj: Linear,
    pub(crate) ffn_sub_norm: Norm,
    pub(crate) down_proj: Linear,
}

impl Layer {
    /// The weight and launcher of projection `p`.
    pub(crate) fn proj(&self, p: Proj) -> &Linear {
        match p {
            Proj::Q => &self.q_proj,
            Proj::K => &self.k_proj,
            Proj::V => &self.v_proj,
            Proj::O => &self.o_proj,
            Proj::Gate => &self.gate_proj,
            Proj::Up => &self.up_proj,
            Proj::Down => &self.down_proj,
        }
    }
}

/// One adapted projection: A (R, I) and B (O, R) with the launcher for its shape.
struct AdapterPair {
    a: GpuTensor,
    b: GpuTensor,
    op: LoraMatmul,
}

/// A LoRA adapter applied unmerged, as `Model::forward_with_adapter`: each adapted
/// projection adds `scale * (x A^T) B^T` on its float input x to the BitLinear output.
struct GpuAdapter {
    scale: f32,
    layers: Vec<[Option<AdapterPair>; 7]>, // L x 7, `model::projections` order
    u: GpuTensor,                          // (max_pass_tokens, R) scratch x A^T
}

/// [`TernaryDecode`] launchers, one per product shape of a layer.
struct DecodeOps {
    qkv: TernaryDecode, // C -> NH*HS, and NKV*HS twice into the cache, after input_layernorm
    o: TernaryDecode,   // NH*HS -> C added to h, after attn_sub_norm
    /// The same with the attention's combine folded in (None: HS not a multiple of 4).
    o_att: Option<TernaryDecode>,
    glu: TernaryDecode,  // C -> F twice, gated, after post_attention_layernorm
    down: TernaryDecode, // F -> C added to h, after ffn_sub_norm
}

/// The model's weights on the GPU and the pipelines of its forward pass.
pub struct GpuModel {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    pub(crate) errors: ErrorSink,
    pub(crate) config: Config,
    pub(crate) embed_tokens: SplitTensor, // (V, C), in chunks along V
    pub(crate) layers: Vec<Layer>,        // L
    pub(crate) norm: Norm,                // (C)
    pub(crate) lm_head: Option<SplitTensor>, // (V, C); None when tied to embed_tokens
    pub(crate) rope_cos: GpuTensor,       // (P, HS/2), P = max_position_embeddings
    pub(crate) rope_sin: GpuTensor,       // (P, HS/2)
    pub(crate) embedding: Embedding,
    pub(crate) rope_q: Rope,
    pub(crate) rope_k: Rope,
    /// Both at once, for the passes of inference.
    rope_qk: RopePair,
    pub(crate) attention: Attention,
    pub(crate) gated_act: GatedAct,
    /// gate, up and gated_act in one dispatch, for one-token passes.
    glu: TernaryGlu,
    /// A decoded token's products with their input's RMSNorm folded in; None where the
    /// device's workgroup memory cannot hold a row's codes ([`TernaryDecode::fits`]).
    decode_ops: Option<DecodeOps>,
    pub(crate) residual_add: ResidualAdd,
    pub(crate) head: Matmul,
    /// Greedy decoding's sampler: the last row's argmax into the next pass's token input.
    argmax: Argmax,
    /// Most tokens one pass records: every (T, width) activation, the (T, V) logits included,
    /// fits the split threshold. Longer inputs take several passes through the cache.
    max_pass_tokens: usize,
    /// The split threshold: no tensor this model allocates per pass (nor a chunk of the
    /// embedding or the head) exceeds this many bytes.
    pub(crate) max_binding: u64,
    /// Bytes of every weight buffer (ternary, norms, embedding, head, RoPE tables).
    weight_bytes: u64,
    /// The LoRA adapter every forward applies, if any ([`GpuModel::set_adapter`]).
    adapter: Option<GpuAdapter>,
    /// While [`GpuModel::generate`] runs: the uniform buffers and bind groups of its passes,
    /// kept from token to token, so a decode step creates only those whose values are new
    /// (the ones that carry the position) instead of every one of them. Dropped when the
    /// generation ends: its bind groups hold the generation's KV cache alive.
    decode_cache: RefCell<Option<BindCache>>,
    /// `bench decode --profile`: where each pass's time went ([`GpuModel::set_profiling`]).
    profile: RefCell<Option<PassProfiler>>,
    /// `bench decode`: the host's time in the unprofiled greedy loop
    /// ([`GpuModel::set_host_timing`]); None while off.
    host_times: std::cell::Cell<Option<DecodeHostTimes>>,
    /// Whether a trainer built on this model recomputes activations
    /// ([`GpuModel::set_recompute`]).
    recompute: crate::Recompute,
}

/// Where the host's time went in [`GpuModel::generate`]'s greedy loop, unprofiled (nothing
/// else changes: one compute pass per token, passes in flight): wall-clock seconds summed over
/// the decode passes (`std::time::Instant`: native only).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DecodeHostTimes {
    /// Decode passes recorded (one token each; the prefill is not counted).
    pub passes: usize,
    /// Recording and submitting them.
    pub record_s: f64,
    /// Of which inside wgpu's compute pass calls (set_pipeline, set_bind_group, dispatch).
    pub commands_s: f64,
    /// Of which ending the compute pass.
    pub pass_end_s: f64,
    /// Of which `CommandEncoder::finish` and `Queue::submit` (wgpu validates the commands and
    /// encodes them for the driver there).
    pub submit_s: f64,
    /// Waiting for their token ids: the time the host had nothing to record.
    pub wait_s: f64,
}

/// Where the time of one forward pass went (profiling on: [`GpuModel::set_profiling`]). Host
/// times are wall-clock seconds (`std::time::Instant`: native only).
#[derive(Clone, Debug, Default)]
pub struct PassProfile {
    /// Tokens in the pass (1 for a decode step).
    pub tokens: usize,
    /// Recording the dispatches up to the submission (and, profiled, one compute pass each).
    pub record_s: f64,
    /// From the submission until the logits are read back: the GPU's work plus the round trip.
    pub wait_s: f64,
    /// Each dispatch's GPU time (label, ns) in dispatch order; empty without timestamp queries.
    pub dispatches: DispatchTimes,
}

struct PassProfiler {
    gpu: Option<Profiler>,
    passes: Vec<PassProfile>,
}

/// Which rows of logits a pass computes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Head<'a> {
    /// None: an early chunk of a prefill whose logits nobody reads.
    Skip,
    /// The last token's only (generation).
    Last,
    /// Every token's.
    All,
    /// The last token's, then its argmax on the GPU into the token input of the next pass
    /// (greedy decoding: [`GpuModel::decode_greedy`]), and from there into this buffer (4 bytes)
    /// for the host to read once the pass is done.
    Greedy(&'a wgpu::Buffer),
}

/// Where a pass's token ids come from.
#[derive(Clone, Copy)]
enum Input<'a> {
    /// Written by the host.
    Host(&'a [u32]),
    /// One token, already in the workspace's token input: the previous pass's argmax.
    Gpu,
}

/// Greedy decoding passes recorded and submitted ahead of the token being read back: the host
/// records pass n + 1 while the GPU runs pass n, so a token costs the longer of the two
/// instead of their sum plus a round trip.
const IN_FLIGHT: usize = 2;

/// The activations of one pass of up to `rows` tokens, kept with the cache and reused by
/// every later pass of at most `rows` tokens (views of their first T rows), so decoding
/// allocates nothing per token.
#[derive(Clone)]
struct Workspace {
    rows: usize,
    tokens: GpuTensor, // (T) u32
    h: GpuTensor,      // (T, C) the residual stream
    x: GpuTensor,      // (T, C) normed input of a block
    xq_c: GpuTensor,   // (T, C) int8
    xq_q: GpuTensor,   // (T, NH*HS) int8
    xq_f: GpuTensor,   // (T, F) int8
    s_a: GpuTensor,    // (T)
    q: GpuTensor,      // (T, NH*HS)
    att: GpuTensor,    // (T, NH*HS)
    att_n: GpuTensor,  // (T, NH*HS) sub-normed
    proj: GpuTensor,   // (T, C) o_proj / down_proj output
    gate: GpuTensor,   // (T, F)
    up: GpuTensor,     // (T, F)
    ffn: GpuTensor,    // (T, F)
    ffn_n: GpuTensor,  // (T, F) sub-normed
    logits: GpuTensor, // (T, V)
}

impl Workspace {
    fn new(dev: &wgpu::Device, cfg: &Config, t: usize) -> Result<Workspace, GpuError> {
        let (c, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let q_dim = cfg.q_dim();
        let f32t = |name: &str, cols: usize| GpuTensor::zeros(dev, name, &[t, cols], DType::F32);
        let i8t = |name: &str, cols: usize| GpuTensor::zeros(dev, name, &[t, cols], DType::I8x4);
        Ok(Workspace {
            rows: t,
            tokens: GpuTensor::zeros(dev, "tokens", &[t], DType::U32)?,
            h: f32t("h", c)?,
            x: f32t("x", c)?,
            xq_c: i8t("x_q (C)", c)?,
            xq_q: i8t("x_q (NH*HS)", q_dim)?,
            xq_f: i8t("x_q (F)", f)?,
            s_a: GpuTensor::zeros(dev, "s_a", &[t], DType::F32)?,
            q: f32t("q", q_dim)?,
            att: f32t("attention", q_dim)?,
            att_n: f32t("attention (sub-normed)", q_dim)?,
            proj: f32t("projection (C)", c)?,
            gate: f32t("gate", f)?,
            up: f32t("up", f)?,
            ffn: f32t("ffn", f)?,
            ffn_n: f32t("ffn (sub-normed)", f)?,
            logits: f32t("logits", v)?,
        })
    }

    fn all(&self) -> [&GpuTensor; 16] {
        [
            &self.tokens,
            &self.h,
            &self.x,
            &self.xq_c,
            &self.xq_q,
            &self.xq_f,
            &self.s_a,
            &self.q,
            &self.att,
            &self.att_n,
            &self.proj,
            &self.gate,
            &self.up,
            &self.ffn,
            &self.ffn_n,
            &self.logits,
        ]
    }

    /// The first `t` rows of every activation.
    fn view(&self, t: usize) -> Result<Workspace, GpuError> {
        Ok(Workspace {
            rows: t,
            tokens: self.tokens.rows_view(t)?,
            h: self.h.rows_view(t)?,
            x: self.x.rows_view(t)?,
            xq_c: self.xq_c.rows_view(t)?,
            xq_q: self.xq_q.rows_view(t)?,
            xq_f: self.xq_f.rows_view(t)?,
            s_a: self.s_a.rows_view(t)?,
            q: self.q.rows_view(t)?,
            att: self.att.rows_view(t)?,
            att_n: self.att_n.rows_view(t)?,
            proj: self.proj.rows_view(t)?,
            gate: self.gate.rows_view(t)?,
            up: self.up.rows_view(t)?,
            ffn: self.ffn.rows_view(t)?,
            ffn_n: self.ffn_n.rows_view(t)?,
            logits: self.logits.rows_view(t)?,
        })
    }

    fn bytes(&self) -> u64 {
        self.all().iter().map(|t| t.buffer.size()).sum()
    }
}

/// Keys (after RoPE) and values of the tokens seen so far, per layer, on the GPU; plus the
/// activation buffers of the passes that use it (reused from pass to pass).
///
/// Sizing: the buffers hold `capacity` positions, chosen at creation
/// ([`GpuModel::generate`] asks for exactly prompt + max_tokens). A forward that would pass
/// the capacity grows it to the next multiple of [`GpuKvCache::GROW`] positions (at most
/// max_position_embeddings), copying the cached rows on the GPU; so a cache made with a small
/// capacity works for any sequence, at the price of a copy every GROW tokens.
pub struct GpuKvCache {
    k: Vec<GpuTensor>, // L x (CAP, NKV*HS), rows 0..len hold positions 0..len
    v: Vec<GpuTensor>, // L x (CAP, NKV*HS)
    /// A decoded token's attention split over its keys: the chunks' sums between the two
    /// dispatches of `Attention::encode_split` (NH * ceil(CAP / CHUNK) * (HS + 2) f32), shared
    /// by the layers, which run one after another.
    part: GpuTensor,
    len: usize,
    capacity: usize,
    ws: Option<Workspace>,
}

impl GpuKvCache {
    /// Positions added at a time when a forward outgrows the capacity.
    pub const GROW: usize = 256;

    /// An empty cache for `model` with room for `capacity` positions (at least 1, at most the
    /// model's max_position_embeddings).
    pub fn new(model: &GpuModel, capacity: usize) -> Result<GpuKvCache, GpuError> {
        let cfg = &model.config;
        let capacity = capacity.clamp(1, cfg.max_position_embeddings);
        let (k, v) = Self::buffers(&model.device, cfg, capacity)?;
        Ok(GpuKvCache {
            k,
            v,
            part: Self::part(&model.device, cfg, capacity)?,
            len: 0,
            capacity,
            ws: None,
        })
    }

    #[allow(clippy::type_complexity)]
    fn buffers(
        dev: &wgpu::Device,
        cfg: &Config,
        capacity: usize,
    ) -> Result<(Vec<GpuTensor>, Vec<GpuTensor>), GpuError> {
        let kv_dim = cfg.kv_dim();
        let mk = |what: &str, l: usize| {
            GpuTensor::zeros(
                dev,
                format!("kv cache layer {l} {what}"),
                &[capacity, kv_dim],
                DType::F32,
            )
        };
        let l = cfg.num_hidden_layers;
        Ok((
            (0..l).map(|l| mk("keys", l)).collect::<Result<_, _>>()?,
            (0..l).map(|l| mk("values", l)).collect::<Result<_, _>>()?,
        ))
    }

    /// [`GpuKvCache::part`] for `capacity` positions.
    fn part(dev: &wgpu::Device, cfg: &Config, capacity: usize) -> Result<GpuTensor, GpuError> {
        let chunks = capacity.div_ceil(Attention::CHUNK);
        GpuTensor::zeros(
            dev,
            "attention chunks",
            &[cfg.num_attention_heads * chunks, cfg.head_dim + 2],
            DType::F32,
        )
    }

    /// Tokens cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the buffers hold now.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets the cached tokens (the buffers stay for the next sequence).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Bytes of GPU memory held: keys, values and the reused activations.
    pub fn bytes(&self) -> u64 {
        let kv: u64 = self.k.iter().chain(&self.v).map(|t| t.buffer.size()).sum();
        kv + self.part.buffer.size() + self.ws.as_ref().map_or(0, Workspace::bytes)
    }

    /// Grows the buffers to hold `need` positions, keeping the cached rows.
    fn reserve(&mut self, model: &GpuModel, need: usize) -> Result<(), GpuError> {
        if need <= self.capacity {
            return Ok(());
        }
        let cfg = &model.config;
        let capacity = need
            .next_multiple_of(Self::GROW)
            .min(cfg.max_position_embeddings)
            .max(need);
        let (k, v) = Self::buffers(&model.device, cfg, capacity)?;
        let bytes = (self.len * cfg.kv_dim() * 4) as u64;
        if bytes > 0 {
            let mut enc = model.device.create_command_encoder(&Default::default());
            for (old, new) in self.k.iter().zip(&k).chain(self.v.iter().zip(&v)) {
                enc.copy_buffer_to_buffer(&old.buffer, 0, &new.buffer, 0, bytes);
            }
            model.queue.submit([enc.finish()]);
        }
        self.k = k;
        self.v = v;
        self.part = Self::part(&model.device, cfg, capacity)?;
        self.capacity = capacity;
        Ok(())
    }

    /// The activations for a pass of `t` tokens, allocated once for the largest T seen.
    fn workspace(&mut self, model: &GpuModel, t: usize) -> Result<Workspace, GpuError> {
        match &self.ws {
            Some(ws) if ws.rows >= t => ws.view(t),
            _ => {
                let ws = Workspace::new(&model.device, &model.config, t)?;
                self.ws = Some(ws.clone());
                Ok(ws)
            }
        }
    }

    /// Checks that this cache was made for a model of `cfg`'s shape.
    fn check(&self, cfg: &Config) -> Result<(), GpuError> {
        let ok = self.k.len() == cfg.num_hidden_layers
            && self.k.iter().all(|k| k.shape[1] == cfg.kv_dim());
        if ok {
            return Ok(());
        }
        Err(GpuError::Shape {
            op: "GpuModel::forward",
            msg: format!(
                "the KV cache has {} layers of width {:?}; the model has {} layers of width {}",
                self.k.len(),
                self.k.first().map(|k| k.shape[1]),
                cfg.num_hidden_layers,
                cfg.kv_dim()
            ),
        })
    }
}

/// Returns the cached value for `key`, creating it with `make` the first time.
pub(crate) fn cached<K: PartialEq, V: Clone>(
    cache: &mut Vec<(K, V)>,
    key: K,
    make: impl FnOnce() -> V,
) -> V {
    if let Some((_, v)) = cache.iter().find(|(k, _)| *k == key) {
        return v.clone();
    }
    let v = make();
    cache.push((key, v.clone()));
    v
}

impl GpuModel {
    /// Uploads `model`'s weights and builds the pipelines for its shapes. The embedding and
    /// the head are split along V to fit this device's storage-binding limit.
    pub fn new(gpu: &Gpu, model: &Model) -> Result<GpuModel, GpuError> {
        Self::with_max_binding(gpu, model, tensor::binding_limit(&gpu.device))
    }

    /// As [`GpuModel::new`], splitting tensors (and passes over many tokens) as if no binding
    /// could exceed `max_binding` bytes (capped at the device's limit). For tests: a small
    /// value runs the multi-chunk embedding and head and multi-pass prefill on a tiny model.
    pub fn with_max_binding(
        gpu: &Gpu,
        model: &Model,
        max_binding: u64,
    ) -> Result<GpuModel, GpuError> {
        Self::build(gpu, model, max_binding, true)
    }

    /// As [`GpuModel::with_max_binding`], the embedding and the head stored as f32 even when
    /// bf16 would be lossless: for tests (and measurements) comparing the two formats, which
    /// give the same results bit for bit.
    pub fn with_f32_tables(
        gpu: &Gpu,
        model: &Model,
        max_binding: u64,
    ) -> Result<GpuModel, GpuError> {
        Self::build(gpu, model, max_binding, false)
    }

    /// `bf16_tables`: store the embedding and the head as bf16 where that is lossless.
    fn build(
        gpu: &Gpu,
        model: &Model,
        max_binding: u64,
        bf16_tables: bool,
    ) -> Result<GpuModel, GpuError> {
        let dev = &gpu.device;
        let cfg = &model.config;
        let p = &model.params;
        let split = max_binding.min(tensor::binding_limit(dev)).max(4);
        let (v, c, f) = (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size);
        let (nh, nkv, hs) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let q_dim = nh * hs;
        if nkv == 0 || nh % nkv != 0 || hs % 2 != 0 {
            return Err(GpuError::Shape {
                op: "GpuModel::new",
                msg: format!("NH = {nh} must be a multiple of NKV = {nkv} and HS = {hs} even"),
            });
        }

        let mut matmuls: Vec<((usize, usize), TernaryMatmul)> = Vec::new();
        let mut linear = |name: String, lin: &TernaryLinear| -> Result<Linear, GpuError> {
            let (o, i) = (lin.out_features, lin.in_features);
            Ok(Linear {
                w: GpuTensor::ternary(dev, name.clone(), lin)?,
                sw: GpuTensor::f32(dev, format!("{name}_scale"), &[1], &[lin.w_scale])?,
                s: lin.w_scale,
                op: cached(&mut matmuls, (o, i), || TernaryMatmul::new(dev, i, o)),
            })
        };
        let mut norms: Vec<(usize, RmsNorm)> = Vec::new();
        let mut norm = |name: String, w: &[f32]| -> Result<Norm, GpuError> {
            Ok(Norm {
                w: GpuTensor::f32(dev, name, &[w.len()], w)?,
                op: cached(&mut norms, w.len(), || {
                    RmsNorm::new(dev, w.len(), cfg.rms_norm_eps)
                }),
            })
        };

        // Streamed: natively, the staging memory of one piece at a time (see flush_uploads).
        let table = |name: &str, w: &[f32]| {
            SplitTensor::upload_streamed(dev, &gpu.queue, name, v, c, w, split, bf16_tables)
        };
        // to_f32: a widened copy dropped after the upload (Deref would keep one in the model).
        let embed_tokens = table("model.embed_tokens.weight", &p.embed_tokens.to_f32())?;
        let lm_head = match &p.lm_head {
            Some(w) => Some(table("lm_head.weight", &w.to_f32())?),
            None => None,
        };
        let head_w = lm_head.as_ref().unwrap_or(&embed_tokens);
        let embedding = Embedding::with_bf16(dev, c, embed_tokens.dtype == DType::Bf16);
        let head = Matmul::with_bf16(dev, c, v, head_w.dtype == DType::Bf16);
        let mut layers = Vec::with_capacity(p.layers.len());
        for (l, lp) in p.layers.iter().enumerate() {
            let n = |s: &str| format!("model.layers.{l}.{s}.weight");
            layers.push(Layer {
                input_layernorm: norm(n("input_layernorm"), &lp.input_layernorm)?,
                q_proj: linear(n("self_attn.q_proj"), &lp.q_proj)?,
                k_proj: linear(n("self_attn.k_proj"), &lp.k_proj)?,
                v_proj: linear(n("self_attn.v_proj"), &lp.v_proj)?,
                attn_sub_norm: norm(n("self_attn.attn_sub_norm"), &lp.attn_sub_norm)?,
                o_proj: linear(n("self_attn.o_proj"), &lp.o_proj)?,
                post_attention_layernorm: norm(
                    n("post_attention_layernorm"),
                    &lp.post_attention_layernorm,
                )?,
                gate_proj: linear(n("mlp.gate_proj"), &lp.gate_proj)?,
                up_proj: linear(n("mlp.up_proj"), &lp.up_proj)?,
                ffn_sub_norm: norm(n("mlp.ffn_sub_norm"), &lp.ffn_sub_norm)?,
                down_proj: linear(n("mlp.down_proj"), &lp.down_proj)?,
            });
            // Free this layer's staging memory before the next layer's uploads.
            tensor::flush_uploads(dev, &gpu.queue)?;
        }
        let norm = norm("model.norm.weight".into(), &p.norm)?;

        // RoPE tables for every position the model accepts, computed by the CPU reference
        // (rope_tables_from(start, ..) gives the same values as these rows start..).
        let positions = cfg.max_position_embeddings;
        let (cos, sin) = cpu_ops::rope_tables(positions, hs, cfg.rope_theta);
        let rope_cos = GpuTensor::f32(dev, "rope_cos", &[positions, hs / 2], &cos)?;
        let rope_sin = GpuTensor::f32(dev, "rope_sin", &[positions, hs / 2], &sin)?;

        let widest = [c, q_dim, f, v].into_iter().max().unwrap_or(1) as u64;
        let max_pass_tokens = ((split / (4 * widest)) as usize).max(1);
        let weight_bytes = embed_tokens.bytes()
            + lm_head.as_ref().map_or(0, SplitTensor::bytes)
            + rope_cos.bytes()
            + rope_sin.bytes()
            + norm.w.bytes()
            + layers
                .iter()
                .map(|l| {
                    let lin = Proj::ALL.map(|p| l.proj(p));
                    let norms = [
                        &l.input_layernorm,
                        &l.attn_sub_norm,
                        &l.post_attention_layernorm,
                        &l.ffn_sub_norm,
                    ];
                    lin.iter().map(|x| x.w.bytes() + x.sw.bytes()).sum::<u64>()
                        + norms.iter().map(|n| n.w.bytes()).sum::<u64>()
                })
                .sum::<u64>();

        let model = GpuModel {
            device: dev.clone(),
            queue: gpu.queue.clone(),
            errors: gpu.error_sink(),
            config: cfg.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope_cos,
            rope_sin,
            embedding,
            rope_q: Rope::new(dev, nh, hs),
            rope_k: Rope::new(dev, nkv, hs),
            rope_qk: RopePair::new(dev, nh, nkv, hs),
            attention: Attention::new(dev, nh, nkv, hs),
            gated_act: GatedAct::new(dev, f, cfg.hidden_act),
            glu: TernaryGlu::new(dev, c, f, cfg.hidden_act),
            decode_ops: ([c, q_dim, f].iter().all(|&i| TernaryDecode::fits(dev, i))
                && !crate::ops::bench_switch("BITLORA_DECODE_UNFUSED"))
            .then(|| {
                let op = |i, o| TernaryDecode::new(dev, i, o, cfg.rms_norm_eps, cfg.hidden_act);
                let eps = cfg.rms_norm_eps;
                DecodeOps {
                    qkv: TernaryDecode::new_qkv(dev, c, q_dim, nkv * hs, eps),
                    o: op(q_dim, c),
                    o_att: TernaryDecode::new_att(dev, (nh, nkv, hs), c, eps)
                        .filter(|_| !crate::ops::bench_switch("BITLORA_DECODE_NOATT")),
                    glu: op(c, f),
                    down: op(f, c),
                }
            }),
            residual_add: ResidualAdd::new(dev, c),
            head,
            argmax: Argmax::new(dev, v),
            max_pass_tokens,
            max_binding: split,
            weight_bytes,
            adapter: None,
            decode_cache: RefCell::new(None),
            profile: RefCell::new(None),
            host_times: std::cell::Cell::new(None),
            recompute: crate::Recompute::Auto,
        };
        // Shader or pipeline errors surface here natively (on the web, at the first forward).
        model.errors.take()?;
        Ok(model)
    }

    /// Applies `lora` unmerged in every later forward (None: the plain model again), as
    /// `Model::forward_with_adapter`: the adapter's A and B are uploaded, the base weights stay
    /// as they are. Dropout is off, as in PEFT's inference. A cache filled under another
    /// adapter holds that adapter's keys and values: clear it.
    pub fn set_adapter(&mut self, lora: Option<&Lora>) -> Result<(), GpuError> {
        let Some(lora) = lora else {
            self.adapter = None;
            return Ok(());
        };
        let cfg = &self.config;
        let bad = |msg: String| GpuError::Model(bitlora_core::Error::Lora { msg });
        if lora.layers.len() != cfg.num_hidden_layers {
            return Err(bad(format!(
                "the adapter has {} layers, the model {}",
                lora.layers.len(),
                cfg.num_hidden_layers
            )));
        }
        let (dev, r) = (&self.device, lora.config.r);
        let mut ops: Vec<((usize, usize), LoraMatmul)> = Vec::new();
        let mut layers = Vec::with_capacity(lora.layers.len());
        for (l, layer) in lora.layers.iter().enumerate() {
            let mut pairs: [Option<AdapterPair>; 7] = Default::default();
            for (slot, (&(name, o, i), pair)) in
                pairs.iter_mut().zip(projections(cfg).iter().zip(layer))
            {
                let Some(pair) = pair else { continue };
                let n = format!("model.layers.{l}.{name}");
                if pair.a.len() != r * i || pair.b.len() != o * r {
                    return Err(bad(format!(
                        "{n}: lora_A has {} values and lora_B {}; the model needs ({r}, {i}) and ({o}, {r})",
                        pair.a.len(),
                        pair.b.len()
                    )));
                }
                *slot = Some(AdapterPair {
                    a: GpuTensor::f32(dev, format!("{n}.lora_A.weight"), &[r, i], &pair.a)?,
                    b: GpuTensor::f32(dev, format!("{n}.lora_B.weight"), &[o, r], &pair.b)?,
                    op: cached(&mut ops, (o, i), || LoraMatmul::new(dev, i, o, r)),
                });
            }
            layers.push(pairs);
        }
        let rows = self.max_pass_tokens.min(cfg.max_position_embeddings).max(1);
        let u = GpuTensor::zeros(dev, "lora u", &[rows, r], DType::F32)?;
        self.errors.take()?;
        self.adapter = Some(GpuAdapter {
            scale: lora.config.scale(),
            layers,
            u,
        });
        Ok(())
    }

    /// The model's configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The largest storage binding this model's buffers may use (the device's, or a lower
    /// limit set for tests), in bytes.
    pub fn max_binding(&self) -> u64 {
        self.max_binding
    }

    /// The options of a training run's table of buffers ([`crate::TrainPlan`]) on this model's
    /// device: `max_tokens` per pass, and whether steps sum several sequences.
    pub fn train_plan_options(&self, max_tokens: usize, accumulate: bool) -> crate::PlanOptions {
        crate::PlanOptions {
            max_tokens,
            max_binding: self.max_binding,
            split_head: self.device.adapter_info().device_type != wgpu::DeviceType::Cpu,
            accumulate,
            recompute: self.recomputes(),
        }
    }

    /// Whether a [`crate::GpuTrainer`] built on this model next recomputes activations in the
    /// backward instead of keeping every layer's ([`crate::Recompute`]; default `Auto`: on a
    /// device with a phone's limits). Takes effect when a trainer is built.
    pub fn set_recompute(&mut self, recompute: crate::Recompute) {
        self.recompute = recompute;
    }

    /// Whether a trainer built on this model now would recompute activations.
    pub fn recomputes(&self) -> bool {
        self.would_recompute(self.recompute)
    }

    /// Whether `recompute` means recomputing on this model's device.
    pub fn would_recompute(&self, recompute: crate::Recompute) -> bool {
        recompute.resolve(self.device.limits().max_buffer_size)
    }

    /// Bytes of GPU memory the weights take (packed ternary projections, f32 norms,
    /// embedding and head (bf16 or f32), RoPE tables). A [`GpuKvCache`] adds
    /// [`GpuKvCache::bytes`].
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    /// How the embedding and the untied head (None when tied) are stored: [`DType::Bf16`]
    /// when lossless, else [`DType::F32`] (see the module doc).
    pub fn table_dtypes(&self) -> (DType, Option<DType>) {
        (
            self.embed_tokens.dtype,
            self.lm_head.as_ref().map(|h| h.dtype),
        )
    }

    /// The head's weight: the untied head, or the embedding when tied.
    pub(crate) fn head_weight(&self) -> &SplitTensor {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// Chunks the embedding (and the head, when untied) is split into along V.
    pub fn vocab_chunks(&self) -> usize {
        self.embed_tokens.chunks.len()
    }

    /// Most tokens one recorded pass takes; longer inputs run as several passes.
    pub fn max_pass_tokens(&self) -> usize {
        self.max_pass_tokens
    }

    /// The full forward pass: tokens (T) -> logits (T, V), row-major, as `Model::logits`.
    /// The empty-cache case of [`GpuModel::forward`].
    pub async fn logits(&self, tokens: &[u32]) -> Result<Vec<f32>, GpuError> {
        self.config.check_tokens(tokens)?;
        let mut cache = GpuKvCache::new(self, tokens.len())?;
        self.forward(tokens, &mut cache).await
    }

    /// The forward pass of T new tokens after the `cache.len()` tokens in `cache`: returns
    /// their logits (T, V) and appends their keys and values to the cache, as
    /// `Model::forward`.
    pub async fn forward(
        &self,
        tokens: &[u32],
        cache: &mut GpuKvCache,
    ) -> Result<Vec<f32>, GpuError> {
        self.check(tokens, cache)?;
        let mut out = Vec::with_capacity(tokens.len() * self.config.vocab_size);
        for chunk in tokens.chunks(self.max_pass_tokens) {
            out.extend(self.pass(chunk, cache, Head::All).await?);
        }
        Ok(out)
    }

    /// As [`GpuModel::forward`], but computes and reads back only the last token's logits (V):
    /// what generation needs, without the head's (T-1, V) rows of a prefill.
    pub async fn forward_last(
        &self,
        tokens: &[u32],
        cache: &mut GpuKvCache,
    ) -> Result<Vec<f32>, GpuError> {
        self.check(tokens, cache)?;
        let n = tokens.len().div_ceil(self.max_pass_tokens);
        let mut out = Vec::new();
        for (i, chunk) in tokens.chunks(self.max_pass_tokens).enumerate() {
            let head = if i + 1 == n { Head::Last } else { Head::Skip };
            out = self.pass(chunk, cache, head).await?;
        }
        Ok(out)
    }

    /// Generates up to `opts.max_tokens` tokens after `prompt`, as
    /// `bitlora_core::generate`: one batched prefill of the prompt, then one token at a time
    /// through a [`GpuKvCache`] sized for prompt + max_tokens. Each token is sampled on the CPU
    /// from the last row of logits with `bitlora_core::generate::Sampler`, so CPU and GPU
    /// sample identically from identical logits. `on_token` gets each token as soon as it
    /// exists and returns false to stop. Never blocks (awaits the GPU's readbacks), so it runs
    /// on the web too.
    pub async fn generate(
        &self,
        prompt: &[u32],
        opts: &SamplingOptions,
        on_token: impl FnMut(u32) -> bool,
    ) -> Result<Vec<u32>, GpuError> {
        let mut sampler = Sampler::new(opts.clone())?;
        let max = self.config.max_position_embeddings;
        if prompt.len() + opts.max_tokens > max {
            return Err(bitlora_core::Error::TooManyTokens {
                count: prompt.len() + opts.max_tokens,
                max,
            }
            .into());
        }
        self.config.check_tokens(prompt)?;
        let mut cache = GpuKvCache::new(self, prompt.len() + opts.max_tokens)?;
        // Bind groups and uniforms kept for this generation only (see `decode_cache`).
        *self.decode_cache.borrow_mut() = Some(BindCache::default());
        let out = self
            .decode(prompt, &mut cache, &mut sampler, opts, on_token)
            .await;
        *self.decode_cache.borrow_mut() = None;
        out
    }

    /// [`GpuModel::generate`]'s loop: the prefill, then a token at a time.
    async fn decode(
        &self,
        prompt: &[u32],
        cache: &mut GpuKvCache,
        sampler: &mut Sampler,
        opts: &SamplingOptions,
        mut on_token: impl FnMut(u32) -> bool,
    ) -> Result<Vec<u32>, GpuError> {
        let greedy = opts.temperature == 0.0 && opts.repetition_penalty == 1.0;
        if greedy && self.profile.borrow().is_none() {
            return self.decode_greedy(prompt, cache, opts, on_token).await;
        }
        let mut seq = prompt.to_vec();
        let mut last = self.forward_last(prompt, cache).await?; // batched prefill: (V)
        let mut out = Vec::new();
        while out.len() < opts.max_tokens {
            let next = sampler.sample(&last, &seq);
            seq.push(next);
            out.push(next);
            if !on_token(next) || opts.stop_tokens.contains(&next) {
                break;
            }
            if out.len() < opts.max_tokens {
                last = self.forward_last(&[next], cache).await?; // (V)
            }
        }
        Ok(out)
    }

    /// Greedy decoding with the sampler on the GPU: after the prefill (whose token the CPU
    /// picks, as `Sampler` would), each pass ends in [`Head::Greedy`], so only its token id
    /// (4 bytes) comes back, and up to [`IN_FLIGHT`] passes run ahead of the id being read.
    /// When a token ends the generation, the passes already in flight are dropped with the
    /// cache. The tokens equal [`GpuModel::decode`]'s with the CPU's `argmax` (the kernel's tie
    /// and NaN rules are the CPU's).
    async fn decode_greedy(
        &self,
        prompt: &[u32],
        cache: &mut GpuKvCache,
        opts: &SamplingOptions,
        mut on_token: impl FnMut(u32) -> bool,
    ) -> Result<Vec<u32>, GpuError> {
        let last = self.forward_last(prompt, cache).await?; // batched prefill: (V)
        let first = bitlora_core::generate::argmax(&last);
        let mut out = vec![first];
        if out.len() >= opts.max_tokens || !on_token(first) || opts.stop_tokens.contains(&first) {
            return Ok(out);
        }
        // One 4-byte readback buffer per pass in flight, used round robin.
        let slots: Vec<wgpu::Buffer> = (0..=IN_FLIGHT)
            .map(|_| {
                self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("next token"),
                    size: 4,
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                })
            })
            .collect();
        let mut in_flight = std::collections::VecDeque::new();
        let mut recorded = 0; // passes recorded; pass k makes token k + 1
        let mut input = Some(first);
        loop {
            while recorded + 1 < opts.max_tokens && in_flight.len() < IN_FLIGHT {
                let slot = recorded % slots.len();
                let host = input.take().map(|t| [t]);
                let tokens = match &host {
                    Some(t) => Input::Host(t),
                    None => Input::Gpu,
                };
                self.errors.take()?;
                let t0 = self.host_clock();
                let (_, index) = self
                    .scoped_pass(tokens, cache, Head::Greedy(&slots[slot]))
                    .await?;
                self.add_host_time(t0, |h, s| {
                    h.passes += 1;
                    h.record_s += s;
                });
                cache.len += 1;
                in_flight.push_back((slot, index));
                recorded += 1;
            }
            let Some((slot, index)) = in_flight.pop_front() else {
                return Ok(out);
            };
            let buffer = &slots[slot];
            let t0 = self.host_clock();
            tensor::map_read_after(&self.device, buffer, "next token", Some(index)).await?;
            self.add_host_time(t0, |h, s| h.wait_s += s);
            let bytes = buffer.get_mapped_range(..).map_err(|e| GpuError::Map {
                tensor: "next token".into(),
                msg: e.to_string(),
            })?;
            let next = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
            drop(bytes);
            buffer.unmap();
            self.errors.take()?;
            out.push(next);
            if !on_token(next) || opts.stop_tokens.contains(&next) {
                return Ok(out);
            }
        }
    }

    /// Token ids, context length and the cache's shape, before any work.
    fn check(&self, tokens: &[u32], cache: &GpuKvCache) -> Result<(), GpuError> {
        self.config.check_tokens(tokens)?;
        cache.check(&self.config)?;
        let max = self.config.max_position_embeddings;
        if cache.len + tokens.len() > max {
            return Err(bitlora_core::Error::TooManyTokens {
                count: cache.len + tokens.len(),
                max,
            }
            .into());
        }
        Ok(())
    }

    /// One recorded pass of at most `max_pass_tokens` tokens: submits it, checks the device's
    /// errors, advances the cache and reads back the logits `head` asks for.
    async fn pass(
        &self,
        tokens: &[u32],
        cache: &mut GpuKvCache,
        head: Head<'_>,
    ) -> Result<Vec<f32>, GpuError> {
        self.errors.take()?;
        let profiling = self.profile.borrow().is_some();
        let t0 = profiling.then(std::time::Instant::now);
        let (logits, _) = self.scoped_pass(Input::Host(tokens), cache, head).await?;
        let record_s = t0.map_or(0.0, |t| t.elapsed().as_secs_f64());
        cache.len += tokens.len();
        let t1 = profiling.then(std::time::Instant::now);
        let out = match logits {
            Some(l) => tensor::read_f32(&self.device, &self.queue, &l).await?,
            None => Vec::new(),
        };
        if profiling {
            let wait_s = t1.map_or(0.0, |t| t.elapsed().as_secs_f64());
            let gpu = self
                .profile
                .borrow_mut()
                .as_mut()
                .and_then(|p| p.gpu.take());
            let (dispatches, gpu) = match gpu {
                Some(mut g) => (g.read(&self.device).await?, Some(g)),
                None => (Vec::new(), None),
            };
            if let Some(p) = self.profile.borrow_mut().as_mut() {
                p.gpu = gpu;
                p.passes.push(PassProfile {
                    tokens: tokens.len(),
                    record_s,
                    wait_s,
                    dispatches,
                });
            }
        }
        self.errors.take()?;
        Ok(out)
    }

    /// [`GpuModel::record_pass`] inside error scopes: a validation or out-of-memory error that
    /// recording or submitting raises comes back as [`GpuError::Device`].
    async fn scoped_pass(
        &self,
        tokens: Input<'_>,
        cache: &mut GpuKvCache,
        head: Head<'_>,
    ) -> Result<(Option<GpuTensor>, wgpu::SubmissionIndex), GpuError> {
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let recorded = self.record_pass(tokens, cache, head);
        let validation = validation.pop().await;
        let oom = oom.pop().await;
        let recorded = recorded?;
        match validation.or(oom) {
            Some(e) => Err(GpuError::Device(e.to_string())),
            None => Ok(recorded),
        }
    }

    /// Records and submits one pass of T tokens at positions `cache.len() ..`; returns the
    /// logits tensor ((T, V), (1, V) for [`Head::Last`], none for [`Head::Skip`]).
    fn record_pass(
        &self,
        tokens: Input,
        cache: &mut GpuKvCache,
        head: Head<'_>,
    ) -> Result<(Option<GpuTensor>, wgpu::SubmissionIndex), GpuError> {
        let t = match tokens {
            Input::Host(tokens) => tokens.len(),
            Input::Gpu => 1,
        };
        let past = cache.len;
        let t_kv = past + t;
        cache.reserve(self, t_kv)?;
        let ws = cache.workspace(self, t)?;
        if let Input::Host(tokens) = tokens {
            self.queue
                .write_buffer(&ws.tokens.buffer, 0, bytemuck::cast_slice(tokens));
        }
        let (cos, sin) = (&self.rope_cos, &self.rope_sin);

        let kept = self.decode_cache.borrow_mut().take();
        let generating = kept.is_some();
        let mut rec = Recorder::with_cache(&self.device, kept.unwrap_or_default());
        if generating {
            // Each token's pass differs from the last only in its position: keeping the
            // uniform buffers (rewritten) keeps every bind group.
            rec.reuse_uniforms(&self.queue);
            if self.host_times.get().is_some() {
                rec.time_wgpu();
            }
        }
        if let Some(g) = self
            .profile
            .borrow_mut()
            .as_mut()
            .and_then(|p| p.gpu.take())
        {
            rec.set_profiler(g);
        }
        let r = &mut rec;
        let s_a = &ws.s_a;
        let bitlinear = |r: &mut Recorder, xq: &GpuTensor, lin: &Linear, y: &GpuTensor| {
            lin.op.encode(r, xq, s_a, &lin.w, &lin.sw, y)
        };
        // k and v land in the cache at rows past..past+T.
        let into_cache = |r: &mut Recorder, xq: &GpuTensor, lin: &Linear, y: &GpuTensor| {
            lin.op.encode_at(r, xq, s_a, &lin.w, &lin.sw, y, past)
        };

        // The adapter's term on projection p of layer l: y[row0..row0+T] += s (x A^T) B^T.
        let adapter = self.adapter.as_ref();
        let u = adapter.map(|a| a.u.rows_view(t)).transpose()?;
        let lora = |r: &mut Recorder,
                    l: usize,
                    p: Proj,
                    x: &GpuTensor,
                    y: &GpuTensor,
                    row0: usize|
         -> Result<(), GpuError> {
            let (Some(ad), Some(u)) = (adapter, u.as_ref()) else {
                return Ok(());
            };
            let Some(pair) = &ad.layers[l][p] else {
                return Ok(());
            };
            pair.op.down(r, x, &pair.a, u)?;
            pair.op.up_add_at(r, u, &pair.b, ad.scale, y, row0)
        };

        let adapted = |l: usize, p: Proj| adapter.is_some_and(|ad| ad.layers[l][p].is_some());
        // h += the projection p of layer l (with the adapter's term, if it has one there):
        // without an adapter term the projection adds itself to h in one dispatch, the same
        // addition as the residual add.
        let residual = |r: &mut Recorder,
                        l: usize,
                        p: Proj,
                        xq: &GpuTensor,
                        x: &GpuTensor,
                        lin: &Linear|
         -> Result<(), GpuError> {
            if !adapted(l, p) {
                return lin.op.encode_add(r, xq, s_a, &lin.w, &lin.sw, &ws.h);
            }
            bitlinear(r, xq, lin, &ws.proj)?;
            lora(r, l, p, x, &ws.proj, 0)?;
            self.residual_add.encode(r, &ws.h, &ws.proj)
        };

        // One query's attention split over the keys (RoPE inside: q and the new key go in
        // unrotated), into ws.att.
        let part = &cache.part;
        let split_attention = |r: &mut Recorder, kc: &GpuTensor, vc: &GpuTensor| {
            let att = &self.attention;
            att.encode_split(r, &ws.q, kc, vc, t_kv, part, &ws.att, (cos, sin))
        };
        self.embedding
            .encode_split(r, &ws.tokens, &self.embed_tokens, &ws.h)?;
        for (l, (layer, (kc, vc))) in self
            .layers
            .iter()
            .zip(cache.k.iter().zip(&cache.v))
            .enumerate()
        {
            // A decoded token through a layer without an adapter: six dispatches, each
            // product with its input's norm folded in (the same bits as the path below).
            let fused = self
                .decode_ops
                .as_ref()
                .filter(|_| t == 1 && !Proj::ALL.iter().any(|&p| adapted(l, p)));
            if let Some(d) = fused {
                let n = &layer.input_layernorm.w;
                let q = layer.q_proj.with_scale();
                let (k, v) = (layer.k_proj.with_scale(), layer.v_proj.with_scale());
                d.qkv
                    .encode_qkv(r, &ws.h, n, q, k, v, &ws.q, (kc, vc), past)?;
                // RoPE inside: q and the new key go in unrotated.
                let n = &layer.attn_sub_norm.w;
                let o = layer.o_proj.pair();
                // Up to 512 keys (8 chunks), the chunks' sums are combined by the o product
                // itself: every one of its workgroups combines the whole row, work that grows
                // with the chunks, where the combine dispatch does it once (the same bits
                // either way, so the switch mid-generation changes nothing).
                if let Some(o_att) = d.o_att.as_ref().filter(|_| t_kv <= 512) {
                    let att = &self.attention;
                    att.encode_parts(r, &ws.q, kc, vc, t_kv, &cache.part, (cos, sin))?;
                    o_att.encode_att(r, &cache.part, n, o, &ws.h, kc, (cos, sin), past)?;
                } else {
                    split_attention(r, kc, vc)?;
                    d.o.encode(r, &ws.att, n, o, &ws.h, 0, true)?;
                }
                let n = &layer.post_attention_layernorm.w;
                let (g, u) = (layer.gate_proj.pair(), layer.up_proj.pair());
                d.glu.encode_glu(r, &ws.h, n, g, u, &ws.ffn)?;
                let n = &layer.ffn_sub_norm.w;
                d.down
                    .encode(r, &ws.ffn, n, layer.down_proj.pair(), &ws.h, 0, true)?;
                continue;
            }
            // Attention block.
            let n = &layer.input_layernorm;
            n.op.encode_quant(r, &ws.h, &n.w, &ws.x, &ws.xq_c, s_a)?;
            bitlinear(r, &ws.xq_c, &layer.q_proj, &ws.q)?;
            lora(r, l, Proj::Q, &ws.x, &ws.q, 0)?;
            into_cache(r, &ws.xq_c, &layer.k_proj, kc)?;
            lora(r, l, Proj::K, &ws.x, kc, past)?;
            into_cache(r, &ws.xq_c, &layer.v_proj, vc)?;
            lora(r, l, Proj::V, &ws.x, vc, past)?;
            if t == 1 {
                // One query: NH workgroups alone would leave most of the GPU idle. RoPE
                // inside: q and the new key go in unrotated.
                split_attention(r, kc, vc)?;
            } else {
                self.rope_qk
                    .encode_rows(r, &ws.q, 0..t, kc, past..t_kv, past, cos, sin)?;
                self.attention
                    .encode_cached(r, &ws.q, kc, vc, t_kv, &ws.att)?;
            }
            let n = &layer.attn_sub_norm;
            n.op.encode_quant(r, &ws.att, &n.w, &ws.att_n, &ws.xq_q, s_a)?;
            residual(r, l, Proj::O, &ws.xq_q, &ws.att_n, &layer.o_proj)?;

            // FFN block.
            let n = &layer.post_attention_layernorm;
            n.op.encode_quant(r, &ws.h, &n.w, &ws.x, &ws.xq_c, s_a)?;
            if t == 1 && !adapted(l, Proj::Gate) && !adapted(l, Proj::Up) {
                let (g, u) = (&layer.gate_proj, &layer.up_proj);
                self.glu
                    .encode(r, &ws.xq_c, s_a, (&g.w, &g.sw), (&u.w, &u.sw), &ws.ffn)?;
            } else {
                bitlinear(r, &ws.xq_c, &layer.gate_proj, &ws.gate)?;
                lora(r, l, Proj::Gate, &ws.x, &ws.gate, 0)?;
                bitlinear(r, &ws.xq_c, &layer.up_proj, &ws.up)?;
                lora(r, l, Proj::Up, &ws.x, &ws.up, 0)?;
                self.gated_act.encode(r, &ws.gate, &ws.up, &ws.ffn)?;
            }
            let n = &layer.ffn_sub_norm;
            n.op.encode_quant(r, &ws.ffn, &n.w, &ws.ffn_n, &ws.xq_f, s_a)?;
            residual(r, l, Proj::Down, &ws.xq_f, &ws.ffn_n, &layer.down_proj)?;
        }
        let w = self.head_weight();
        let logits = match head {
            Head::Skip => None,
            Head::All => {
                self.norm.op.encode(r, &ws.h, &self.norm.w, &ws.x)?;
                self.head.encode_split(r, &ws.x, 0..t, w, &ws.logits)?;
                Some(ws.logits.clone())
            }
            Head::Last => {
                self.norm.op.encode(r, &ws.h, &self.norm.w, &ws.x)?;
                let logits = ws.logits.rows_view(1)?;
                self.head.encode_split(r, &ws.x, t - 1..t, w, &logits)?;
                Some(logits)
            }
            Head::Greedy(out) => {
                self.norm.op.encode(r, &ws.h, &self.norm.w, &ws.x)?;
                let logits = ws.logits.rows_view(1)?;
                self.head.encode_split(r, &ws.x, t - 1..t, w, &logits)?;
                self.argmax.encode(r, &logits, &ws.tokens)?;
                r.copy(&ws.tokens.buffer, 0, out, 0, 4);
                None
            }
        };
        let (encoder, bind_cache, gpu, clock) = rec.finish_timed();
        if let Some(c) = clock {
            self.add_host_time(Some(std::time::Instant::now()), |h, _| {
                h.commands_s += c.commands_s;
                h.pass_end_s += c.pass_end_s;
            });
        }
        let t0 = if generating { self.host_clock() } else { None };
        let index = self.queue.submit([encoder.finish()]);
        self.add_host_time(t0, |h, s| h.submit_s += s);
        if let Some(p) = self.profile.borrow_mut().as_mut() {
            p.gpu = gpu;
        }
        // Kept only while a generation runs.
        if generating {
            *self.decode_cache.borrow_mut() = Some(bind_cache);
        }
        Ok((logits, index))
    }

    /// Host timing of the greedy decode loop on or off ([`DecodeHostTimes`]); turning it on
    /// starts from zero. Native only (`std::time::Instant` panics on wasm32).
    pub fn set_host_timing(&self, on: bool) {
        self.host_times.set(on.then(DecodeHostTimes::default));
    }

    /// The host times summed since [`GpuModel::set_host_timing`] turned them on.
    pub fn host_times(&self) -> Option<DecodeHostTimes> {
        self.host_times.get()
    }

    /// `Some(now)` while host timing is on.
    fn host_clock(&self) -> Option<std::time::Instant> {
        self.host_times.get().map(|_| std::time::Instant::now())
    }

    /// Adds the seconds since `t0` (when timing) through `add`.
    fn add_host_time(
        &self,
        t0: Option<std::time::Instant>,
        add: impl FnOnce(&mut DecodeHostTimes, f64),
    ) {
        if let (Some(t0), Some(mut h)) = (t0, self.host_times.get()) {
            add(&mut h, t0.elapsed().as_secs_f64());
            self.host_times.set(Some(h));
        }
    }

    /// Profiling on or off: while on, every pass records where its time went (host record
    /// time, the wait for its readback, and each dispatch's GPU time where the device was
    /// created with timestamp queries: [`crate::Gpu::with_timestamps`]); each dispatch then
    /// runs in a compute pass of its own. Returns whether GPU times are measured. Native
    /// only (host times use `std::time::Instant`).
    pub fn set_profiling(&self, on: bool) -> bool {
        let p = on.then(|| PassProfiler {
            gpu: Profiler::new(&self.device, &self.queue),
            passes: Vec::new(),
        });
        let gpu = p.as_ref().is_some_and(|p| p.gpu.is_some());
        *self.profile.borrow_mut() = p;
        gpu
    }

    /// The profiles of the passes since profiling was turned on (or since the last call).
    pub fn take_profiles(&self) -> Vec<PassProfile> {
        self.profile
            .borrow_mut()
            .as_mut()
            .map(|p| std::mem::take(&mut p.passes))
            .unwrap_or_default()
    }
}
