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
//! session.load('config.json', configBytes, ['model.safetensors'], [weightBytes]);
//! const r = await session.forward(new Uint32Array([5, 17, 42]));
//! // r = { backend, tokens, rows: T, vocab: V, logits: Float32Array(T*V), top: [{token, prob}], ms }
//! ```
//!
//! Everything here runs inside a worker, so the page stays responsive while a CPU forward pass
//! blocks the worker's thread.

use std::rc::Rc;

use serde::Serialize;
use wasm_bindgen::prelude::*;

/// How many of the most likely next tokens `forward` reports.
const TOP_K: usize = 10;

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
    /// One line for people: "WebGPU: <adapter name>" or "CPU (SIMD128)".
    label: String,
    /// The adapter's name, backend and limits when `kind` is "webgpu".
    adapter: Option<Adapter>,
    /// Why WebGPU is not used when `kind` is "cpu".
    fallback_reason: Option<String>,
}

/// The CPU backend's label says whether this build really has SIMD128 (tools/build-web.sh sets
/// `+simd128`; a plain cargo build would not), so the page never claims what did not happen.
fn cpu_label() -> &'static str {
    if cfg!(target_feature = "simd128") {
        "CPU (SIMD128)"
    } else {
        "CPU (scalar wasm, built without +simd128)"
    }
}

fn cpu_backend(reason: String) -> BackendInfo {
    BackendInfo {
        kind: "cpu",
        label: cpu_label().to_string(),
        adapter: None,
        fallback_reason: Some(reason),
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
}

/// A loaded model, immutable once built. Shared through `Rc` so that a forward pass in flight
/// keeps the model it started with even if another one is loaded meanwhile.
struct Loaded {
    summary: ModelSummary,
    model: bitlora_core::Model,
    #[cfg(feature = "gpu")]
    gpu_model: Option<bitlora_gpu::GpuModel>,
}

#[derive(Serialize)]
struct TopToken {
    token: u32,
    prob: f32,
}

/// `forward`'s result apart from the logits, which go across as one Float32Array.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ForwardMeta {
    backend: &'static str,
    tokens: Vec<u32>,
    /// T: one row of logits per input position.
    rows: usize,
    /// V: logits per row.
    vocab: usize,
    /// The most likely next tokens after the last position, softmax probabilities.
    top: Vec<TopToken>,
    /// Wall time of the forward pass including the GPU readback, in milliseconds.
    ms: f64,
}

/// One backend and at most one loaded model.
#[wasm_bindgen]
pub struct Session {
    backend: BackendInfo,
    #[cfg(feature = "gpu")]
    gpu: Option<bitlora_gpu::Gpu>,
    /// Replaced only when a load succeeds, so a bad upload leaves the previous model working.
    loaded: Option<Rc<Loaded>>,
}

#[wasm_bindgen]
impl Session {
    /// Picks the backend: WebGPU when `prefer_gpu` and the browser grants an adapter, else the
    /// CPU. Never fails: every reason WebGPU is not used is reported in `backend().fallbackReason`.
    pub async fn create(prefer_gpu: bool) -> Session {
        #[cfg(feature = "gpu")]
        {
            let (backend, gpu) = pick_gpu(prefer_gpu).await;
            Session {
                backend,
                gpu,
                loaded: None,
            }
        }
        #[cfg(not(feature = "gpu"))]
        {
            let reason = if prefer_gpu {
                "this build of bitlora-web has no WebGPU backend (built without the `gpu` feature)"
            } else {
                "WebGPU not requested (?backend=cpu)"
            };
            Session {
                backend: cpu_backend(reason.to_string()),
                loaded: None,
            }
        }
    }

    /// `{ kind, label, adapter, fallbackReason }`, see [`BackendInfo`].
    pub fn backend(&self) -> Result<JsValue, JsError> {
        to_js(&self.backend)
    }

    /// Loads a model from a config.json and one or more safetensors files (`names[i]` is the
    /// name of `files[i]`; names appear in error messages). On error the previously loaded
    /// model, if any, stays loaded. Returns a summary `{ config, files, bytes, vocabSize, ... }`.
    pub fn load(
        &mut self,
        config_name: &str,
        config_json: &[u8],
        names: Vec<String>,
        files: Vec<js_sys::Uint8Array>,
    ) -> Result<JsValue, JsError> {
        if names.len() != files.len() {
            return Err(JsError::new(&format!(
                "load: got {} file names but {} files",
                names.len(),
                files.len()
            )));
        }
        // Copy each file into wasm memory once; core parses from these slices.
        let bytes: Vec<Vec<u8>> = files.iter().map(|f| f.to_vec()).collect();
        let weights: Vec<(&str, &[u8])> = names
            .iter()
            .zip(&bytes)
            .map(|(n, b)| (n.as_str(), b.as_slice()))
            .collect();
        let model = bitlora_core::Model::from_bytes(config_name, config_json, &weights)
            .map_err(|e| JsError::new(&e.to_string()))?;

        // `mut`: the gpu feature records where the model runs and why not on the GPU.
        #[cfg_attr(not(feature = "gpu"), allow(unused_mut))]
        let mut summary = ModelSummary {
            config: config_name.to_string(),
            files: names.clone(),
            bytes: config_json.len() + bytes.iter().map(Vec::len).sum::<usize>(),
            vocab_size: model.config.vocab_size,
            hidden_size: model.config.hidden_size,
            num_hidden_layers: model.config.num_hidden_layers,
            backend: "cpu",
            note: None,
        };
        drop(weights);
        drop(bytes); // the model holds its own tensors; free the raw files before a GPU upload

        #[cfg(feature = "gpu")]
        let gpu_model = match &self.gpu {
            Some(gpu) => match bitlora_gpu::GpuModel::new(gpu, &model) {
                Ok(m) => {
                    summary.backend = "webgpu";
                    Some(m)
                }
                // E.g. a tensor larger than this adapter's maxStorageBufferBindingSize: the CPU
                // can still run it, and the page says why it is slower.
                Err(e) => {
                    summary.note = Some(format!(
                        "WebGPU could not take this model ({e}); it runs on the CPU instead"
                    ));
                    None
                }
            },
            None => None,
        };

        let out = to_js(&summary)?;
        self.loaded = Some(Rc::new(Loaded {
            summary,
            model,
            #[cfg(feature = "gpu")]
            gpu_model,
        }));
        Ok(out)
    }

    /// The summary of the loaded model, or null.
    pub fn model(&self) -> Result<JsValue, JsError> {
        match &self.loaded {
            Some(l) => to_js(&l.summary),
            None => Ok(JsValue::NULL),
        }
    }

    /// Runs the model on `tokens` and resolves to
    /// `{ backend, tokens, rows, vocab, logits: Float32Array(rows*vocab), top: [{token, prob}], ms }`;
    /// rejects with an Error naming the problem (no model, bad token id, too many tokens, GPU).
    ///
    /// Returns a Promise rather than being an `async fn` so the future owns what it uses (an
    /// `Rc` of the model) instead of borrowing the Session across an await.
    pub fn forward(&self, tokens: Vec<u32>) -> js_sys::Promise {
        let loaded = self.loaded.clone();
        wasm_bindgen_futures::future_to_promise(async move {
            let loaded = loaded.ok_or_else(|| {
                JsError::new(
                    "forward: no model loaded yet; load a config.json and its .safetensors first",
                )
            })?;
            let start = now_ms();
            let (backend, logits) = run_forward(&loaded, &tokens).await?;
            let ms = now_ms() - start;

            let vocab = loaded.summary.vocab_size;
            let rows = logits.len().checked_div(vocab).unwrap_or(0);
            if rows == 0 || rows != tokens.len() || rows * vocab != logits.len() {
                return Err(JsError::new(&format!(
                    "forward: the backend returned {} logits for {} tokens x vocab {vocab}",
                    logits.len(),
                    tokens.len()
                ))
                .into());
            }
            let last = &logits[(rows - 1) * vocab..];
            let top = bitlora_core::top_k(last, TOP_K)
                .into_iter()
                .map(|(token, prob)| TopToken { token, prob })
                .collect();
            let meta = ForwardMeta {
                backend,
                tokens,
                rows,
                vocab,
                top,
                ms,
            };
            let out = to_js(&meta)?;
            js_sys::Reflect::set(
                &out,
                &JsValue::from_str("logits"),
                &js_sys::Float32Array::from(logits.as_slice()),
            )?;
            Ok(out)
        })
    }
}

async fn run_forward(loaded: &Loaded, tokens: &[u32]) -> Result<(&'static str, Vec<f32>), JsError> {
    #[cfg(feature = "gpu")]
    if let Some(gpu_model) = &loaded.gpu_model {
        let logits = gpu_model.logits(tokens).await.map_err(|e| match e {
            // Bad input (token ids, length) reads the same on either backend.
            bitlora_gpu::GpuError::Model(e) => JsError::new(&e.to_string()),
            e => JsError::new(&format!("WebGPU forward pass failed: {e}")),
        })?;
        return Ok(("webgpu", logits));
    }
    let logits = loaded
        .model
        .logits(tokens)
        .map_err(|e| JsError::new(&e.to_string()))?;
    Ok(("cpu", logits))
}

/// Asks the browser for WebGPU and says why not when it cannot have it.
#[cfg(feature = "gpu")]
async fn pick_gpu(prefer_gpu: bool) -> (BackendInfo, Option<bitlora_gpu::Gpu>) {
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
    match bitlora_gpu::Gpu::new().await {
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
