//! `Session.estimateMemory`: the bytes a training run needs on the CPU backend (wasm memory)
//! or on WebGPU, against what that backend can hold.

use bitlora_core::Config;
use bitlora_core::lora::{Lora, LoraConfig};
use serde::Serialize;
use wasm_bindgen::prelude::*;

use crate::train::{WASM_MEMORY_LIMIT, parse_config};
use crate::{Loaded, to_js};

/// MemoryEstimate in web/bitlora.d.ts.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct MemoryEstimate {
    backend: &'static str,
    weights: f64,
    activations: f64,
    adapter: f64,
    total: f64,
    adapter_params: usize,
    limit: Option<f64>,
    largest_buffer: f64,
    max_binding: Option<f64>,
    fits: bool,
    message: Option<String>,
}

/// Bytes the CPU model holds: f32 embeddings (and head when untied) and norms, packed 2-bit
/// projections.
fn cpu_weight_bytes(c: &Config) -> f64 {
    let (v, h, f, l) = (
        c.vocab_size as f64,
        c.hidden_size as f64,
        c.intermediate_size as f64,
        c.num_hidden_layers as f64,
    );
    let packed: f64 = bitlora_core::model::projections(c)
        .iter()
        .map(|&(_, o, i)| o.div_ceil(4) as f64 * i as f64)
        .sum();
    let untied = if c.tie_word_embeddings { 1.0 } else { 2.0 };
    4.0 * (untied * v * h + h) + l * (packed + 4.0 * (2.0 * h + c.q_dim() as f64 + f))
}

/// f32 values one sequence of `t` tokens keeps alive during forward + backward: what each
/// layer's forward saves (train.rs `LayerActs`), plus the backward's temporaries and one row of
/// logits. (Sequences of a step are processed one at a time on every backend, so this does not
/// grow with the batch.)
fn activation_floats(c: &Config, t: usize, lora: &LoraConfig) -> (f64, f64) {
    let (h, f, q, kv) = (
        c.hidden_size as f64,
        c.intermediate_size as f64,
        c.q_dim() as f64,
        c.kv_dim() as f64,
    );
    let (t, nh, r) = (t as f64, c.num_attention_heads as f64, lora.r as f64);
    let probs = nh * t * t;
    let mut per_layer = t * (4.0 * h + 3.0 * q + 2.0 * kv + 4.0 * f) + probs;
    for (p, &(_, _, i)) in bitlora_core::model::projections(c).iter().enumerate() {
        if lora.targets[p] {
            per_layer += t * r
                + if lora.dropout > 0.0 {
                    t * i as f64
                } else {
                    0.0
                };
        }
    }
    let widest = h.max(f).max(q);
    let temporaries = 8.0 * t * widest + probs + 2.0 * c.vocab_size as f64;
    let largest = probs.max(t * widest).max(c.vocab_size as f64 * h);
    (
        c.num_hidden_layers as f64 * per_layer + temporaries,
        largest,
    )
}

/// What the WebGPU device offers a training run: the GPU model's weight bytes and the
/// device's largest storage binding.
pub(crate) struct GpuBudget {
    pub weight_bytes: f64,
    pub max_binding: f64,
    /// The run's buffers from the GPU trainer's table: the saved activations, scratch and head
    /// window; the adapter's buffers, the resident optimizer state and the readbacks; the
    /// largest one.
    pub activations: f64,
    pub adapter: f64,
    pub largest: f64,
}

/// `Session.estimateMemory`. `memory_in_use`: the wasm memory's size now, in bytes; `gpu`: when
/// runs train on WebGPU, what a run of (adapter shape, context, whether steps sum several
/// sequences, `recompute`) takes there.
pub(crate) fn estimate_memory(
    loaded: &Loaded,
    config: &JsValue,
    memory_in_use: f64,
    gpu: Option<impl FnOnce(&LoraConfig, usize, bool, Option<bool>) -> GpuBudget>,
) -> Result<JsValue, JsError> {
    let c = &loaded.model.config;
    let spec = parse_config(c, config)?;
    let lora_cfg = spec.lora_config()?;
    let gpu = gpu.map(|budget| budget(&lora_cfg, spec.context, spec.batch > 1, spec.recompute));
    let params = Lora::init(c, lora_cfg.clone(), 0).num_params();
    // On the CPU: A, B; their gradients; Adam's m and v; and the copy validation makes with
    // dropout off, in wasm memory.
    let cpu_adapter = 5.0 * 4.0 * params as f64;
    let cpu_weights = cpu_weight_bytes(c);
    // The model is already loaded: what else is in use counts against the limit, the weights once.
    let wasm_left = (WASM_MEMORY_LIMIT - (memory_in_use - cpu_weights).max(0.0)).max(0.0);
    let mib = |b: f64| format!("{:.0} MiB", b / 1048576.0);
    let estimate = match gpu {
        None => {
            let (acts, largest) = activation_floats(c, spec.context, &lora_cfg);
            let activations = 4.0 * acts;
            let total = cpu_weights + activations + cpu_adapter;
            let fits = total <= wasm_left;
            MemoryEstimate {
                backend: "cpu",
                weights: cpu_weights,
                activations,
                adapter: cpu_adapter,
                total,
                adapter_params: params,
                limit: Some(wasm_left),
                largest_buffer: 4.0 * largest,
                max_binding: None,
                fits,
                message: (!fits).then(|| {
                    format!(
                        "training needs about {} (model {}, activations {}, adapter and optimizer {}) but the CPU backend (wasm32) can use at most {} more; lower the context (activations grow with its square through attention) or the rank",
                        mib(total),
                        mib(cpu_weights),
                        mib(activations),
                        mib(cpu_adapter),
                        mib(wasm_left)
                    )
                }),
            }
        }
        Some(g) => {
            // Every buffer of the run, from the GPU trainer's own table (bitlora_gpu::TrainPlan):
            // nothing of the run stays in wasm.
            let (activations, adapter, largest) = (g.activations, g.adapter, g.largest);
            let total = g.weight_bytes + activations + adapter;
            let fits = largest <= g.max_binding;
            MemoryEstimate {
                backend: "webgpu",
                weights: g.weight_bytes,
                activations,
                adapter,
                total,
                adapter_params: params,
                limit: None,
                largest_buffer: largest,
                max_binding: Some(g.max_binding),
                fits,
                message: (!fits).then(|| {
                    format!(
                        "one training buffer needs {} but this GPU binds at most {} (maxStorageBufferBindingSize); lower the context",
                        mib(largest),
                        mib(g.max_binding)
                    )
                }),
            }
        }
    };
    to_js(&estimate)
}
