//! bitlora-web: the wasm-bindgen API that the page's module Web Worker (`web/worker.js`) drives.
//!
//! Thin on purpose: the model and its maths live in `bitlora-core` (CPU reference) and
//! `bitlora-gpu` (WebGPU); this crate only picks the backend, moves bytes in and results out, and
//! turns errors into `JsError`s. It is the only place where errors become JavaScript exceptions,
//! and their messages are core's `Display` text unchanged, which names the file and the problem.
//!
//! ```js
//! import init, { Session } from './pkg/bitlora_web.js';
//! await init();
//! const session = await Session.create(true);          // true: try WebGPU first
//! session.backend();                                     // { kind: "webgpu" | "cpu", label, adapter, fallbackReason }
//! session.load('config.json', configBytes, ['model.safetensors'], [weightBytes],
//!              'tokenizer.json', tokenizerBytes, 'tokenizer_config.json', tokConfigBytes); // last 4 optional
//! const r = await session.forward(new Uint32Array([5, 17, 42]));
//! // r = { backend, tokens, rows: T, vocab: V, logits: Float32Array(T*V), top: [{token, prob}], ms }
//! const g = await session.generate({ text: 'Hello', chat: true }, { max_tokens: 32, temperature: 0.7 },
//!                                  (e) => { show(e.text ?? `${e.token} `); return !stopped; });
//! // e = { index, token, text (text prompts only), ms }; returning false stops generation.
//! // g = { backend, promptTokens, promptText, tokens, text, stoppedBy, prefillMs, decodeMs, ms, tokensPerSecond }
//! ```
//!
//! Everything here runs inside a worker, so the page stays responsive while a CPU forward pass
//! or generation blocks the worker's thread.

// RefCells are borrowed across awaits on purpose: the GPU model (and a run's training state)
// is held for the whole of a pass that awaits the GPU. The worker runs one pass at a time
// (web/training.js `withModel`), and a borrow that finds it taken is reported as "busy"
// (try_borrow), never a panic.
#![allow(clippy::await_holding_refcell_ref)]

mod backend;
mod error;
mod generate;
#[cfg(feature = "gpu")]
mod gpu_slot;
mod inference;
mod load;
mod memory;
/// The threaded build's `initThreadPool(n, glueUrl)`: n Web Workers on this module and its
/// shared memory become rayon's global pool (the CPU kernels' threads, crates/core/src/par.rs).
#[cfg(feature = "threads")]
mod threads;
mod train;

#[cfg(feature = "gpu")]
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

#[cfg(feature = "gpu")]
use gpu_slot::GpuSlot;
use load::{Building, LoadMemory};
pub use train::WebTrainer;

use serde::Serialize;
use wasm_bindgen::prelude::*;

/// Runs once when the wasm module is instantiated.
#[wasm_bindgen(start)]
pub fn start() {
    // A panic would otherwise surface as a bare "unreachable executed"; this logs the message
    // and location to the worker's console first.
    console_error_panic_hook::set_once();
}

#[cfg(feature = "gpu")]
type Adapter = bitlora_gpu::AdapterSummary;
/// Without the `gpu` feature there is never an adapter to describe.
#[cfg(not(feature = "gpu"))]
#[derive(Serialize, Clone, Debug)]
enum Adapter {}

/// Which backend runs the forward pass, as the page shows it.
#[derive(Serialize, Clone, Debug)]
#[serde(rename_all = "camelCase")]
struct BackendInfo {
    /// "webgpu" or "cpu".
    kind: &'static str,
    /// One line for people: "WebGPU: <adapter name>" or "CPU (SIMD128, 2 threads)".
    label: String,
    /// The adapter's name, backend and limits when `kind` is "webgpu".
    adapter: Option<Adapter>,
    /// Why WebGPU is not used when `kind` is "cpu".
    fallback_reason: Option<String>,
    /// Where training steps run: "webgpu" with an adapter (unless a model or run does not fit
    /// it: each trainer's `backend` says where it trains), else "cpu".
    training: &'static str,
    /// Why training does not run on WebGPU although the session has it.
    training_reason: Option<String>,
    /// The most memory the CPU backend can use (wasm32: 4 GiB).
    wasm_memory_limit: f64,
    /// Threads the CPU kernels run on: rayon's pool, i.e. the Web Workers the threaded build
    /// started (`initThreadPool`), or 1 in the single-thread build.
    threads: usize,
}

/// The CPU threads: rayon's global pool as it is now (the page's worker starts the threaded
/// build's pool before it creates the session; without threads rayon reports 1).
fn cpu_threads() -> usize {
    rayon::current_num_threads()
}

#[wasm_bindgen]
impl Session {
    /// Tests (tests/browser/threads.test.mjs): how many distinct threads ran the blocks of one
    /// parallel loop over `blocks` blocks (at most 1024) of ~0.5 ms of integer work each; the pool
    /// size alone would not show that its workers really run. 1 in the single-thread build.
    #[wasm_bindgen(js_name = cpuThreadsUsed)]
    pub fn cpu_threads_used(blocks: usize) -> usize {
        use rayon::prelude::*;
        let ran_on: std::collections::BTreeSet<Option<usize>> = (0..blocks.clamp(1, 1024))
            .into_par_iter()
            .map(|b| {
                let mut h = b as u64;
                for k in 0..300_000u64 {
                    h = h.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(k);
                }
                std::hint::black_box(h);
                rayon::current_thread_index()
            })
            .collect();
        ran_on.len()
    }
}

/// The CPU backend's label says whether this build really has SIMD128 (tools/build-web.sh sets
/// `+simd128`; a plain cargo build would not) and on how many threads it runs, so the page
/// never claims what did not happen.
fn cpu_label() -> String {
    let n = cpu_threads();
    let threads = if n == 1 {
        "1 thread".to_string()
    } else {
        format!("{n} threads")
    };
    if cfg!(target_feature = "simd128") {
        format!("CPU (SIMD128, {threads})")
    } else {
        format!("CPU (scalar wasm, built without +simd128, {threads})")
    }
}

fn cpu_backend(reason: String) -> BackendInfo {
    BackendInfo {
        kind: "cpu",
        label: cpu_label(),
        adapter: None,
        fallback_reason: Some(reason),
        training: "cpu",
        training_reason: None,
        wasm_memory_limit: train::WASM_MEMORY_LIMIT,
        threads: cpu_threads(),
    }
}

/// What `load` reports about the model it loaded.
#[derive(Serialize, Clone, Debug)]
#[serde(rename_all = "camelCase")]
struct ModelSummary {
    config: String,
    files: Vec<String>,
    bytes: usize,
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    /// "webgpu" or "cpu": where this model's forward passes run.
    backend: &'static str,
    /// Set when the session has WebGPU but this model could not be put on it.
    note: Option<String>,
    /// The tokenizer.json loaded with the model, if any: prompts can then be text.
    tokenizer: Option<String>,
    /// Tokens the tokenizer knows (including added tokens), when there is one.
    tokenizer_vocab_size: Option<usize>,
    /// The tokenizer_config.json loaded with the model, if any.
    tokenizer_config: Option<String>,
    /// Whether that file has a chat template (instruct models): the page offers "chat".
    chat_template: bool,
    /// Generation always stops after one of these (config.json's eos_token_id).
    eos_token_ids: Vec<u32>,
    /// The model's context: prompt plus generated tokens must fit in it.
    max_positions: usize,
    /// `general.architecture` of the .gguf file the model came from (what an adapter exported
    /// as GGUF names as its base); None for a safetensors model.
    gguf_architecture: Option<String>,
    /// A .gguf model's config, read from its metadata, under config.json's names.
    gguf_config: Option<serde_json::Value>,
}

/// A loaded model, immutable once built. Shared through `Rc` so that a forward pass in flight
/// keeps the model it started with even if another one is loaded meanwhile.
struct Loaded {
    summary: ModelSummary,
    model: bitlora_core::Model,
    tokenizer: Option<bitlora_core::Tokenizer>,
    chat_template: Option<bitlora_core::ChatTemplate>,
    /// The end-of-text token training data ends documents with (as `bitlora train` picks it):
    /// tokenizer_config.json's eos_token when the tokenizer knows it, else config.json's.
    train_eos: u32,
    /// The model on the GPU, with the adapter it currently applies (a RefCell: setting the
    /// adapter needs `&mut`, and a generation or a training step holds it while it awaits the
    /// GPU; the worker never runs two of them at once).
    #[cfg(feature = "gpu")]
    gpu_model: Option<RefCell<GpuSlot>>,
}

/// The session's WebGPU device (an uninhabited type without the `gpu` feature).
#[cfg(feature = "gpu")]
pub(crate) type GpuHandle = bitlora_gpu::Gpu;
#[cfg(not(feature = "gpu"))]
pub(crate) enum GpuHandle {}

/// An adapter validated against the loaded model, ready for generation.
struct LoraAdapter {
    lora: Rc<bitlora_core::lora::Lora>,
    /// Unique per `addAdapter` call: tells the GPU slot whether it holds this upload.
    serial: u64,
}

/// One backend and at most one loaded model.
#[wasm_bindgen]
pub struct Session {
    backend: BackendInfo,
    #[cfg(feature = "gpu")]
    gpu: Option<Rc<bitlora_gpu::Gpu>>,
    /// Replaced only when a load succeeds, so a bad upload leaves the previous model working.
    loaded: Option<Rc<Loaded>>,
    /// Adapters for generation by the page's key (validated against `loaded`; cleared on load).
    adapters: HashMap<String, LoraAdapter>,
    next_serial: u64,
    /// A model being loaded tensor by tensor (beginLoad .. finishLoad).
    building: Option<Building>,
    /// Wasm memory at the marks of the last successful load (`loadMemory`).
    load_memory: Option<LoadMemory>,
}

#[wasm_bindgen]
impl Session {
    /// Picks the backend: WebGPU when `prefer_gpu` and the browser grants an adapter, else the
    /// CPU. `cpu_reason`: the caller chose the CPU and says why (the worker does when the
    /// browser's adapter is a software renderer, slower than the CPU path); it wins over
    /// `prefer_gpu`. `limits`: the WebGPU device's limits, "adapter" (the default: the
    /// adapter's own) or "phone" (WebGPU's defaults, what a phone grants: 128 MiB storage
    /// bindings, 256 MiB buffers; `bitlora_gpu::DeviceLimits::Phone`), for trying a model
    /// against a phone's limits on a desktop. Never fails: every reason WebGPU is not used is
    /// reported in `backend().fallbackReason`.
    pub async fn create(
        prefer_gpu: bool,
        cpu_reason: Option<String>,
        limits: Option<String>,
    ) -> Session {
        #[cfg(feature = "gpu")]
        {
            let (backend, gpu) = match (cpu_reason, device_limits(limits.as_deref())) {
                (Some(reason), _) => (cpu_backend(reason), None),
                (None, Err(why)) => (cpu_backend(why), None),
                (None, Ok(limits)) => pick_gpu(prefer_gpu, limits).await,
            };
            Session {
                backend,
                gpu: gpu.map(|g| {
                    gpu_slot::watch(&g);
                    Rc::new(g)
                }),
                loaded: None,
                adapters: HashMap::new(),
                next_serial: 1,
                building: None,
                load_memory: None,
            }
        }
        #[cfg(not(feature = "gpu"))]
        {
            let _ = limits;
            let reason = cpu_reason.unwrap_or_else(|| {
                if prefer_gpu {
                    "this build of bitlora-web has no WebGPU backend (built without the `gpu` feature)"
                } else {
                    "WebGPU not requested (?backend=cpu)"
                }
                .to_string()
            });
            Session {
                backend: cpu_backend(reason),
                loaded: None,
                adapters: HashMap::new(),
                next_serial: 1,
                building: None,
                load_memory: None,
            }
        }
    }

    /// `{ kind, label, adapter, fallbackReason }`, see [`BackendInfo`].
    pub fn backend(&self) -> Result<JsValue, JsError> {
        to_js(&self.backend)
    }

    /// The summary of the loaded model, or null.
    pub fn model(&self) -> Result<JsValue, JsError> {
        match &self.loaded {
            Some(l) => to_js(&l.summary),
            None => Ok(JsValue::NULL),
        }
    }
}

/// Training and adapters (web/bitlora.d.ts's Trainer and adapters sit on these; see
/// `train.rs`).
#[wasm_bindgen]
impl Session {
    /// Parses and tokenizes training data (`bytes`, named `file_name` in errors) with the loaded
    /// model's tokenizer: `{ fileName, format, examples, tokens, targetTokens, trainSequences,
    /// valSequences, ..., truncated, context, stepsPerEpoch, bytes }`. `options`: `{ context,
    /// completionOnly, valFraction, seed, batch }`, all optional.
    #[wasm_bindgen(js_name = prepareData)]
    pub fn prepare_data(
        &self,
        file_name: &str,
        bytes: &[u8],
        options: JsValue,
    ) -> Result<JsValue, JsValue> {
        train::prepare_data(self.need_model("prepare data")?, file_name, bytes, &options)
    }

    /// Bytes needed to train with `config` (TrainConfig) on the loaded model, against what the
    /// training backend can hold: MemoryEstimate in web/bitlora.d.ts.
    #[wasm_bindgen(js_name = estimateMemory)]
    pub fn estimate_memory(&self, config: JsValue) -> Result<JsValue, JsValue> {
        let loaded = self.need_model("estimate memory")?;
        // Checked here first so that an error keeps its `field` (the estimate parses it again).
        train::train_config(&loaded.model.config, &config).map_err(|e| error::config_error(&e))?;
        Ok(memory::estimate_memory(
            loaded,
            &config,
            wasm_memory_bytes(),
            self.gpu_budget(loaded),
        )?)
    }

    /// A new training run on the loaded model over `bytes` (the data file) with `config`
    /// (TrainConfig). Errors name the option, the file and the JSONL line at fault.
    #[wasm_bindgen(js_name = createTrainer)]
    pub fn create_trainer(
        &self,
        file_name: &str,
        bytes: &[u8],
        config: JsValue,
    ) -> Result<WebTrainer, JsValue> {
        let loaded = self.need_model("train")?;
        WebTrainer::create(
            Rc::clone(loaded),
            self.gpu_handle(),
            file_name,
            bytes,
            &config,
        )
    }

    /// Continues a run from its checkpoint (`WebTrainer.checkpoint()`'s bytes), given the same
    /// data and the config it was created with.
    #[wasm_bindgen(js_name = resumeTrainer)]
    pub fn resume_trainer(
        &self,
        file_name: &str,
        bytes: &[u8],
        config: JsValue,
        checkpoint: &[u8],
    ) -> Result<WebTrainer, JsValue> {
        let loaded = self.need_model("resume training")?;
        WebTrainer::resume(
            Rc::clone(loaded),
            self.gpu_handle(),
            file_name,
            bytes,
            &config,
            checkpoint,
        )
    }

    /// Reads PEFT files (adapter_config.json + adapter_model.safetensors), checks them against
    /// the loaded model and keeps the adapter under `key` for `generate(..., { adapter: key })`
    /// (replacing one with that key). Returns `{ r, alpha, dropout, rslora, targets, params,
    /// baseModel }`. Errors name the file and the tensor that does not fit.
    #[wasm_bindgen(js_name = addAdapter)]
    pub fn add_adapter(
        &mut self,
        key: &str,
        config_json: &[u8],
        weights: &[u8],
    ) -> Result<JsValue, JsError> {
        let loaded = self.need_model("use an adapter")?;
        let (lora, summary) = train::read_peft(
            &loaded.model.config,
            "adapter_config.json",
            config_json,
            "adapter_model.safetensors",
            weights,
        )?;
        let out = to_js(&summary)?;
        let serial = self.next_serial;
        self.next_serial += 1;
        self.adapters.insert(
            key.to_string(),
            LoraAdapter {
                lora: Rc::new(lora),
                serial,
            },
        );
        Ok(out)
    }

    /// Checks PEFT files against the loaded model without keeping them; see `addAdapter`.
    #[wasm_bindgen(js_name = checkAdapter)]
    pub fn check_adapter(
        &self,
        config_name: &str,
        config_json: &[u8],
        weights_name: &str,
        weights: &[u8],
    ) -> Result<JsValue, JsError> {
        let loaded = self.need_model("check an adapter")?;
        let (_, summary) = train::read_peft(
            &loaded.model.config,
            config_name,
            config_json,
            weights_name,
            weights,
        )?;
        to_js(&summary)
    }

    /// A PEFT adapter (adapter_config.json + adapter_model.safetensors, checked against the
    /// loaded model as `addAdapter` does) as a GGUF LoRA adapter for llama.cpp or QVAC Fabric:
    /// the bytes `bitlora export --format gguf --target <target>` writes. `target`: "llama"
    /// (llama.cpp's semantics, PEFT's update) or "qvac" (QVAC Fabric's BitNet graph: each B
    /// multiplied by its projection's weight scale). `arch`: the base model's
    /// `general.architecture`; by default the loaded .gguf's, else "bitnet".
    #[wasm_bindgen(js_name = adapterGguf)]
    pub fn adapter_gguf(
        &self,
        config_json: &[u8],
        weights: &[u8],
        target: &str,
        arch: Option<String>,
    ) -> Result<Vec<u8>, JsValue> {
        let target = match target {
            "llama" => bitlora_core::gguf::AdapterTarget::Llama,
            "qvac" => bitlora_core::gguf::AdapterTarget::Qvac,
            other => {
                return Err(error::js_error(
                    &format!(
                        "target is \"{other}\"; a GGUF adapter is for \"llama\" (llama.cpp) or \"qvac\" (QVAC Fabric)"
                    ),
                    Some("target"),
                    None,
                ));
            }
        };
        let loaded = self.need_model("export an adapter")?;
        let (lora, _) = train::read_peft(
            &loaded.model.config,
            "adapter_config.json",
            config_json,
            "adapter_model.safetensors",
            weights,
        )?;
        let arch = arch
            .or_else(|| loaded.summary.gguf_architecture.clone())
            .unwrap_or_else(|| "bitnet".to_string());
        Ok(bitlora_core::gguf::write_adapter(
            &lora,
            &loaded.model,
            target,
            &arch,
        ))
    }

    /// Whether an adapter is kept under `key`.
    #[wasm_bindgen(js_name = hasAdapter)]
    pub fn has_adapter(&self, key: &str) -> bool {
        self.adapters.contains_key(key)
    }

    /// Forgets the adapter kept under `key` (no error when there is none).
    #[wasm_bindgen(js_name = removeAdapter)]
    pub fn remove_adapter(&mut self, key: &str) {
        self.adapters.remove(key);
    }
}

impl Session {
    /// What a WebGPU run of (adapter shape, context, accumulating) needs with the loaded model,
    /// from the GPU trainer's table of buffers; None when runs train on the CPU.
    #[cfg_attr(not(feature = "gpu"), allow(unused_variables))]
    fn gpu_budget(
        &self,
        loaded: &Loaded,
    ) -> Option<
        impl FnOnce(&bitlora_core::lora::LoraConfig, usize, bool, Option<bool>) -> memory::GpuBudget,
    > {
        #[cfg(feature = "gpu")]
        {
            self.gpu.as_ref()?;
            // The worker asks between passes (web/training.js withModel), so the slot is free.
            let mut slot = loaded.gpu_model.as_ref()?.try_borrow_mut().ok()?;
            let model = slot.model_mut()?;
            let weight_bytes = model.weight_bytes() as f64;
            let max_binding = model.max_binding() as f64;
            let base = model.train_plan_options(0, false);
            // `recompute: null` means this on this device.
            let auto = model.would_recompute(bitlora_gpu::Recompute::Auto);
            Some(
                move |lora: &bitlora_core::lora::LoraConfig,
                      context: usize,
                      accumulate: bool,
                      recompute: Option<bool>| {
                    use bitlora_gpu::{Role, TrainPlan};
                    let opts = bitlora_gpu::PlanOptions {
                        max_tokens: context,
                        accumulate,
                        recompute: recompute.unwrap_or(auto),
                        ..base
                    };
                    let plan = TrainPlan::new(&loaded.model.config, lora, &opts);
                    let of = |roles: &[Role]| {
                        roles.iter().map(|&r| plan.bytes_of(r)).sum::<u64>() as f64
                    };
                    memory::GpuBudget {
                        weight_bytes,
                        max_binding,
                        activations: of(&[Role::Saved, Role::Scratch, Role::Head]),
                        adapter: of(&[Role::Adapter, Role::Optimizer, Role::Readback]),
                        largest: plan.largest() as f64,
                    }
                },
            )
        }
        #[cfg(not(feature = "gpu"))]
        {
            let _ = loaded;
            None::<
                fn(&bitlora_core::lora::LoraConfig, usize, bool, Option<bool>) -> memory::GpuBudget,
            >
        }
    }

    /// The WebGPU device for training, when the session has one.
    fn gpu_handle(&self) -> Option<Rc<GpuHandle>> {
        #[cfg(feature = "gpu")]
        {
            self.gpu.clone()
        }
        #[cfg(not(feature = "gpu"))]
        {
            None
        }
    }

    fn need_model(&self, what: &str) -> Result<&Rc<Loaded>, JsError> {
        self.loaded.as_ref().ok_or_else(|| {
            JsError::new(&format!(
                "cannot {what}: no model loaded yet; load a model first"
            ))
        })
    }
}

/// The size of this module's wasm memory now, in bytes.
fn wasm_memory_bytes() -> f64 {
    wasm_bindgen::memory()
        .dyn_into::<js_sys::WebAssembly::Memory>()
        .map(|m| {
            m.buffer()
                .unchecked_into::<js_sys::ArrayBuffer>()
                .byte_length() as f64
        })
        .unwrap_or(0.0)
}

/// The device limits named by `Session.create`'s and `Session.requestGpu`'s `limits`.
#[cfg(feature = "gpu")]
pub(crate) fn device_limits(name: Option<&str>) -> Result<bitlora_gpu::DeviceLimits, String> {
    match name {
        None | Some("adapter") => Ok(bitlora_gpu::DeviceLimits::Adapter),
        Some("phone") => Ok(bitlora_gpu::DeviceLimits::Phone),
        Some(other) => Err(format!(
            "unknown WebGPU device limits {other:?}: use \"adapter\" or \"phone\""
        )),
    }
}

/// Asks the browser for WebGPU and says why not when it cannot have it.
#[cfg(feature = "gpu")]
async fn pick_gpu(
    prefer_gpu: bool,
    limits: bitlora_gpu::DeviceLimits,
) -> (BackendInfo, Option<bitlora_gpu::Gpu>) {
    if !prefer_gpu {
        return (
            cpu_backend("WebGPU not requested (?backend=cpu)".into()),
            None,
        );
    }
    // Check first: without navigator.gpu, wgpu's web backend has nothing to talk to.
    if !navigator_has_gpu() {
        return (
            cpu_backend(
                "navigator.gpu is missing: this browser does not expose WebGPU to workers (or has it disabled)"
                    .into(),
            ),
            None,
        );
    }
    match bitlora_gpu::Gpu::with_limits(limits).await {
        Ok(gpu) => {
            let name = if gpu.info.name.is_empty() {
                format!("unnamed {} adapter", gpu.info.backend)
            } else {
                gpu.info.name.clone()
            };
            let info = BackendInfo {
                kind: "webgpu",
                label: format!("WebGPU: {name}"),
                adapter: Some(gpu.info.clone()),
                fallback_reason: None,
                training: "webgpu",
                training_reason: None,
                wasm_memory_limit: train::WASM_MEMORY_LIMIT,
                threads: cpu_threads(),
            };
            (info, Some(gpu))
        }
        // navigator.gpu exists but requestAdapter() resolved to null: the usual case on Linux
        // without a blessed GPU, and in headless Chromium without --enable-unsafe-webgpu.
        Err(bitlora_gpu::GpuError::NoAdapter { .. }) => (
            cpu_backend(
                "the browser has WebGPU (navigator.gpu) but granted no adapter: no supported GPU, or WebGPU is disabled for it (see chrome://gpu)"
                    .into(),
            ),
            None,
        ),
        Err(e) => (cpu_backend(format!("WebGPU adapter found but unusable: {e}")), None),
    }
}

#[cfg(feature = "gpu")]
fn navigator_has_gpu() -> bool {
    let get = |obj: &JsValue, key: &str| {
        js_sys::Reflect::get(obj, &JsValue::from_str(key))
            .ok()
            .filter(|v| !v.is_undefined() && !v.is_null())
    };
    get(&js_sys::global(), "navigator")
        .and_then(|nav| get(&nav, "gpu"))
        .is_some()
}

/// `performance.now()` where there is one (workers have it), else `Date.now()`.
fn now_ms() -> f64 {
    let perf = js_sys::Reflect::get(&js_sys::global(), &JsValue::from_str("performance")).ok();
    perf.and_then(|p| {
        let now: js_sys::Function = js_sys::Reflect::get(&p, &JsValue::from_str("now"))
            .ok()?
            .dyn_into()
            .ok()?;
        now.call0(&p).ok()?.as_f64()
    })
    .unwrap_or_else(js_sys::Date::now)
}

/// Plain JS objects (not Maps), `null` for `None`, numbers for u64s: what the page expects.
fn to_js<T: Serialize>(value: &T) -> Result<JsValue, JsError> {
    value
        .serialize(&serde_wasm_bindgen::Serializer::json_compatible())
        .map_err(|e| {
            JsError::new(&format!(
                "internal: cannot convert a result to JavaScript: {e}"
            ))
        })
}
