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
//! where each BitLinear is act_quant (x -> x_q, s_a) then ternary_matmul. The ternary weights
//! stay in transformers' packed 2-bit layout on the GPU.

use bitlora_core::quant::TernaryLinear;
use bitlora_core::{Config, Model, ops as cpu_ops};

use crate::ops::{
    ActQuant, Attention, Embedding, GatedAct, Matmul, ResidualAdd, RmsNorm, Rope, TernaryMatmul,
};
use crate::record::Recorder;
use crate::tensor::{self, DType, GpuTensor};
use crate::{ErrorSink, Gpu, GpuError};

/// A BitLinear on the GPU: packed weight, its scale, and the launcher for its shape.
struct Linear {
    w: GpuTensor,  // (O, I) ternary
    sw: GpuTensor, // (1) s_w
    op: TernaryMatmul,
}

/// An RMSNorm weight with the launcher for its width.
struct Norm {
    w: GpuTensor, // (C) or (NH*HS) or (F)
    op: RmsNorm,
}

struct Layer {
    input_layernorm: Norm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    attn_sub_norm: Norm,
    o_proj: Linear,
    post_attention_layernorm: Norm,
    gate_proj: Linear,
    up_proj: Linear,
    ffn_sub_norm: Norm,
    down_proj: Linear,
}

/// The model's weights on the GPU and the pipelines of its forward pass.
pub struct GpuModel {
    device: wgpu::Device,
    queue: wgpu::Queue,
    errors: ErrorSink,
    config: Config,
    embed_tokens: GpuTensor,    // (V, C)
    layers: Vec<Layer>,         // L
    norm: Norm,                 // (C)
    lm_head: Option<GpuTensor>, // (V, C); None when tied to embed_tokens
    rope_cos: GpuTensor,        // (P, HS/2), P = max_position_embeddings
    rope_sin: GpuTensor,        // (P, HS/2)
    embedding: Embedding,
    quant_c: ActQuant, // rows of width C
    quant_q: ActQuant, // rows of width NH*HS
    quant_f: ActQuant, // rows of width F
    rope_q: Rope,
    rope_k: Rope,
    attention: Attention,
    gated_act: GatedAct,
    residual_add: ResidualAdd,
    head: Matmul,
}

/// Returns the cached value for `key`, creating it with `make` the first time.
fn cached<K: PartialEq, V: Clone>(cache: &mut Vec<(K, V)>, key: K, make: impl FnOnce() -> V) -> V {
    if let Some((_, v)) = cache.iter().find(|(k, _)| *k == key) {
        return v.clone();
    }
    let v = make();
    cache.push((key, v.clone()));
    v
}

impl GpuModel {
    /// Uploads `model`'s weights and builds the pipelines for its shapes. Fails with
    /// [`GpuError::TooLarge`] naming the first tensor that does not fit one storage binding.
    pub fn new(gpu: &Gpu, model: &Model) -> Result<GpuModel, GpuError> {
        let dev = &gpu.device;
        let cfg = &model.config;
        let p = &model.params;
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

        let embed_tokens =
            GpuTensor::f32(dev, "model.embed_tokens.weight", &[v, c], &p.embed_tokens)?;
        let lm_head = match &p.lm_head {
            Some(w) => Some(GpuTensor::f32(dev, "lm_head.weight", &[v, c], w)?),
            None => None,
        };
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
        }
        let norm = norm("model.norm.weight".into(), &p.norm)?;

        // RoPE tables for every position the model accepts, computed by the CPU reference.
        let positions = cfg.max_position_embeddings;
        let (cos, sin) = cpu_ops::rope_tables(positions, hs, cfg.rope_theta);
        let rope_cos = GpuTensor::f32(dev, "rope_cos", &[positions, hs / 2], &cos)?;
        let rope_sin = GpuTensor::f32(dev, "rope_sin", &[positions, hs / 2], &sin)?;

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
            embedding: Embedding::new(dev, c),
            quant_c: ActQuant::new(dev, c),
            quant_q: ActQuant::new(dev, q_dim),
            quant_f: ActQuant::new(dev, f),
            rope_q: Rope::new(dev, nh, hs),
            rope_k: Rope::new(dev, nkv, hs),
            attention: Attention::new(dev, nh, nkv, hs),
            gated_act: GatedAct::new(dev, f, cfg.hidden_act),
            residual_add: ResidualAdd::new(dev, c),
            head: Matmul::new(dev, c, v),
        };
        // Shader or pipeline errors surface here natively (on the web, at the first forward).
        model.errors.take()?;
        Ok(model)
    }

    /// The model's configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The full forward pass: tokens (T) -> logits (T, V), row-major, as `Model::logits`.
    pub async fn logits(&self, tokens: &[u32]) -> Result<Vec<f32>, GpuError> {
        self.config.check_tokens(tokens)?;
        self.errors.take()?;
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let logits = self.record_forward(tokens)?;
        if let Some(e) = validation.pop().await {
            return Err(GpuError::Device(e.to_string()));
        }
        if let Some(e) = oom.pop().await {
            return Err(GpuError::Device(e.to_string()));
        }
        let out = tensor::read_f32(&self.device, &self.queue, &logits).await?;
        self.errors.take()?;
        Ok(out)
    }

    /// Records and submits the forward pass; returns the logits tensor (T, V).
    fn record_forward(&self, tokens: &[u32]) -> Result<GpuTensor, GpuError> {
        let cfg = &self.config;
        let dev = &self.device;
        let t = tokens.len();
        let (c, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let (q_dim, kv_dim) = (cfg.q_dim(), cfg.kv_dim());
        let f32t = |name: &str, cols: usize| GpuTensor::zeros(dev, name, &[t, cols], DType::F32);
        let i8t = |name: &str, cols: usize| GpuTensor::zeros(dev, name, &[t, cols], DType::I8x4);

        let tokens = GpuTensor::u32(dev, "tokens", &[t], tokens)?;
        let h = f32t("h", c)?; // the residual stream
        let x = f32t("x", c)?; // normed input of a block
        let xq_c = i8t("x_q (C)", c)?;
        let xq_q = i8t("x_q (NH*HS)", q_dim)?;
        let xq_f = i8t("x_q (F)", f)?;
        let s_a = GpuTensor::zeros(dev, "s_a", &[t], DType::F32)?;
        let q = f32t("q", q_dim)?;
        let k = f32t("k", kv_dim)?;
        let vv = f32t("v", kv_dim)?;
        let att = f32t("attention", q_dim)?;
        let att_n = f32t("attention (sub-normed)", q_dim)?;
        let proj = f32t("projection (C)", c)?;
        let gate = f32t("gate", f)?;
        let up = f32t("up", f)?;
        let ffn = f32t("ffn", f)?;
        let ffn_n = f32t("ffn (sub-normed)", f)?;
        let logits = f32t("logits", v)?;

        let mut rec = Recorder::new(dev);
        let r = &mut rec;
        let bitlinear = |r: &mut Recorder, xq: &GpuTensor, lin: &Linear, y: &GpuTensor| {
            lin.op.encode(r, xq, &s_a, &lin.w, &lin.sw, y)
        };

        self.embedding.encode(r, &tokens, &self.embed_tokens, &h)?;
        for layer in &self.layers {
            // Attention block.
            let n = &layer.input_layernorm;
            n.op.encode(r, &h, &n.w, &x)?;
            self.quant_c.encode(r, &x, &xq_c, &s_a)?;
            bitlinear(r, &xq_c, &layer.q_proj, &q)?;
            bitlinear(r, &xq_c, &layer.k_proj, &k)?;
            bitlinear(r, &xq_c, &layer.v_proj, &vv)?;
            self.rope_q.encode(r, &q, &self.rope_cos, &self.rope_sin)?;
            self.rope_k.encode(r, &k, &self.rope_cos, &self.rope_sin)?;
            self.attention.encode(r, &q, &k, &vv, &att)?;
            let n = &layer.attn_sub_norm;
            n.op.encode(r, &att, &n.w, &att_n)?;
            self.quant_q.encode(r, &att_n, &xq_q, &s_a)?;
            bitlinear(r, &xq_q, &layer.o_proj, &proj)?;
            self.residual_add.encode(r, &h, &proj)?;

            // FFN block.
            let n = &layer.post_attention_layernorm;
            n.op.encode(r, &h, &n.w, &x)?;
            self.quant_c.encode(r, &x, &xq_c, &s_a)?;
            bitlinear(r, &xq_c, &layer.gate_proj, &gate)?;
            bitlinear(r, &xq_c, &layer.up_proj, &up)?;
            self.gated_act.encode(r, &gate, &up, &ffn)?;
            let n = &layer.ffn_sub_norm;
            n.op.encode(r, &ffn, &n.w, &ffn_n)?;
            self.quant_f.encode(r, &ffn_n, &xq_f, &s_a)?;
            bitlinear(r, &xq_f, &layer.down_proj, &proj)?;
            self.residual_add.encode(r, &h, &proj)?;
        }
        self.norm.op.encode(r, &h, &self.norm.w, &x)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        self.head.encode(r, &x, head, &logits)?;
        rec.submit(&self.queue);
        Ok(logits)
    }
}
