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

mod error;
mod generate;
mod train;

#[cfg(feature = "gpu")]
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

pub use train::WebTrainer;

mod backend;
mod memory;

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
    /// Where training steps run: "webgpu" with an adapter (unless a model or run does not fit
    /// it: each trainer's `backend` says where it trains), else "cpu".
    training: &'static str,
    /// Why training does not run on WebGPU although the session has it.
    training_reason: Option<String>,
    /// The most memory the CPU backend can use (wasm32: 4 GiB).
    wasm_memory_limit: f64,
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
        training: "cpu",
        training_reason: None,
        wasm_memory_limit: train::WASM_MEMORY_LIMIT,
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

/// The loaded model on the GPU: a plain `GpuModel`, or one lent to a `GpuTrainer` (which owns
/// it, and whose model still serves inference), so the weights are uploaded once.
#[cfg(feature = "gpu")]
struct GpuSlot {
    holder: GpuHolder,
    /// `LoraAdapter::serial` of the inference adapter uploaded, None for the plain model.
    adapter: Option<u64>,
}

#[cfg(feature = "gpu")]
enum GpuHolder {
    Model(Box<bitlora_gpu::GpuModel>),
    /// Built for the run `owner` (its rank, targets and context).
    Trainer {
        trainer: Box<bitlora_gpu::GpuTrainer>,
        owner: u64,
    },
    /// Only while a trainer is being built, or after uploading the model again failed.
    Empty,
}

#[cfg(feature = "gpu")]
impl GpuSlot {
    /// GPU bytes of the model's weights and the GPU trainer's buffers, when a trainer is there.
    fn trainer_bytes(&self) -> Option<u64> {
        match &self.holder {
            GpuHolder::Trainer { trainer, .. } => {
                Some(trainer.model().weight_bytes() + trainer.bytes())
            }
            _ => None,
        }
    }

    /// Bytes the GPU trainer's last pass read back, when a trainer is there.
    fn trainer_read_bytes(&self) -> Option<u64> {
        match &self.holder {
            GpuHolder::Trainer { trainer, .. } => Some(trainer.read_bytes()),
            _ => None,
        }
    }

    fn model_mut(&mut self) -> Option<&mut bitlora_gpu::GpuModel> {
        match &mut self.holder {
            GpuHolder::Model(m) => Some(m),
            GpuHolder::Trainer { trainer, .. } => Some(trainer.model_mut()),
            GpuHolder::Empty => None,
        }
    }
}

/// Why a run cannot use the GPU trainer now.
#[cfg(feature = "gpu")]
pub(crate) enum GpuTrainError {
    /// Another pass holds the GPU model (a bug in the caller's ordering).
    Busy,
    /// This run cannot train on this GPU (e.g. a tensor larger than a binding): train on the CPU.
    Unusable(String),
}

/// The GPU trainer for run `owner`, built (from the loaded model's GPU weights) at its first
/// use or when another run's trainer is there.
#[cfg(feature = "gpu")]
pub(crate) fn gpu_trainer<'a>(
    loaded: &'a Loaded,
    gpu: &bitlora_gpu::Gpu,
    owner: u64,
    lora: &bitlora_core::lora::LoraConfig,
    max_tokens: usize,
) -> Result<std::cell::RefMut<'a, bitlora_gpu::GpuTrainer>, GpuTrainError> {
    let slot = loaded
        .gpu_model
        .as_ref()
        .ok_or_else(|| GpuTrainError::Unusable("the model is not on the GPU".into()))?;
    let mut s = slot.try_borrow_mut().map_err(|_| GpuTrainError::Busy)?;
    let reuse = matches!(&s.holder, GpuHolder::Trainer { trainer, owner: o }
        if *o == owner && trainer.max_tokens() >= max_tokens);
    if !reuse {
        let model = match std::mem::replace(&mut s.holder, GpuHolder::Empty) {
            GpuHolder::Model(m) => Ok(*m),
            GpuHolder::Trainer { trainer, .. } => Ok(trainer.into_model()),
            GpuHolder::Empty => {
                s.adapter = None;
                bitlora_gpu::GpuModel::new(gpu, &loaded.model)
            }
        };
        let model = model.map_err(|e| GpuTrainError::Unusable(e.to_string()))?;
        match bitlora_gpu::GpuTrainer::try_new(model, lora, max_tokens) {
            Ok(t) => {
                s.holder = GpuHolder::Trainer {
                    trainer: Box::new(t),
                    owner,
                }
            }
            Err(failed) => {
                // The model comes back with the error and keeps serving inference.
                let (e, model) = *failed;
                s.holder = GpuHolder::Model(Box::new(model));
                return Err(GpuTrainError::Unusable(e.to_string()));
            }
        }
    }
    std::cell::RefMut::filter_map(s, |s| match &mut s.holder {
        GpuHolder::Trainer { trainer, .. } => Some(trainer.as_mut()),
        _ => None,
    })
    .map_err(|_| GpuTrainError::Unusable("internal: the GPU trainer vanished".into()))
}

/// An adapter validated against the loaded model, ready for generation.
struct LoraAdapter {
    lora: Rc<bitlora_core::lora::Lora>,
    /// Unique per `addAdapter` call: tells the GPU slot whether it holds this upload.
    serial: u64,
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

/// `generate`'s result.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct GenerateResult {
    backend: &'static str,
    /// The adapter generation ran through (options.adapter), or null for the base model.
    adapter: Option<String>,
    /// The ids the model was given (after the tokenizer and chat template, for text).
    prompt_tokens: Vec<u32>,
    /// The text they came from (after the chat template), for text prompts.
    prompt_text: Option<String>,
    /// The generated ids, a stop token included when one ended generation.
    tokens: Vec<u32>,
    /// Their text (special tokens left out), for text prompts.
    text: Option<String>,
    /// "max_tokens", "stop_token" (EOS, end of turn, or one of stop_tokens) or "stop" (the
    /// callback returned false).
    stopped_by: &'static str,
    /// Every token that would have stopped generation.
    stop_tokens: Vec<u32>,
    /// Milliseconds until the first token existed (the prompt's prefill plus one sampling).
    prefill_ms: f64,
    /// Milliseconds after that until the end.
    decode_ms: f64,
    ms: f64,
    /// Decode speed, tokens after the first per second; null with fewer than two tokens.
    tokens_per_second: Option<f64>,
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

/// Bytes of wasm linear memory when a load began, once its weights were built (before the
/// tokenizer and the GPU upload) and when it ended. Linear memory only grows, so `weights`
/// includes the peak of building the model: with `load`, the whole files copied in.
#[derive(Serialize, Clone, Copy)]
struct LoadMemory {
    before: f64,
    weights: f64,
    after: f64,
}

/// A tensor to stream into `addTensor`: its byte range in the file.
#[derive(Serialize)]
struct TensorSpanJs {
    name: String,
    start: f64,
    end: f64,
}

/// The state of a tensor-by-tensor load: the builder, and the file names and byte count the
/// summary reports.
struct Building {
    builder: bitlora_core::ModelBuilder,
    config_name: String,
    names: Vec<String>,
    bytes: usize,
    /// Wasm memory at beginLoad.
    memory_before: f64,
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
                gpu: gpu.map(Rc::new),
                loaded: None,
                adapters: HashMap::new(),
                next_serial: 1,
                building: None,
                load_memory: None,
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

    /// Loads a model from a config.json and one or more safetensors files (`names[i]` is the
    /// name of `files[i]`; names appear in error messages), optionally with its tokenizer.json
    /// (prompts can then be text) and tokenizer_config.json (its chat template). On error the
    /// previously loaded model, if any, stays loaded. Returns a summary
    /// `{ config, files, bytes, vocabSize, ..., tokenizer, chatTemplate, eosTokenIds }`.
    #[allow(clippy::too_many_arguments)] // the JS API: one call, every file of a model
    pub fn load(
        &mut self,
        config_name: &str,
        config_json: &[u8],
        names: Vec<String>,
        files: Vec<js_sys::Uint8Array>,
        tokenizer_name: Option<String>,
        tokenizer_json: Option<js_sys::Uint8Array>,
        tokenizer_config_name: Option<String>,
        tokenizer_config_json: Option<js_sys::Uint8Array>,
    ) -> Result<JsValue, JsError> {
        if names.len() != files.len() {
            return Err(JsError::new(&format!(
                "load: got {} file names but {} files",
                names.len(),
                files.len()
            )));
        }
        let memory_before = wasm_memory_bytes();
        // Copy each file into wasm memory once; core parses from these slices. (Stored models
        // load tensor by tensor instead: beginLoad / addFile / addTensor / finishLoad.)
        let bytes: Vec<Vec<u8>> = files.iter().map(|f| f.to_vec()).collect();
        let weights: Vec<(&str, &[u8])> = names
            .iter()
            .zip(&bytes)
            .map(|(n, b)| (n.as_str(), b.as_slice()))
            .collect();
        let model = bitlora_core::Model::from_bytes(config_name, config_json, &weights)
            .map_err(|e| JsError::new(&e.to_string()))?;
        let total = config_json.len() + bytes.iter().map(Vec::len).sum::<usize>();
        drop(weights);
        drop(bytes); // the model holds its own tensors; free the raw files before a GPU upload
        self.install(
            model,
            memory_before,
            config_name,
            names,
            total,
            tokenizer_name,
            tokenizer_json,
            tokenizer_config_name,
            tokenizer_config_json,
        )
    }

    /// Starts loading a model tensor by tensor, so that wasm memory never holds a whole
    /// safetensors file: `addFile` each file's header, `addTensor` the tensors it names, then
    /// `finishLoad`. Fails on a bad config.json as `load` does.
    #[wasm_bindgen(js_name = beginLoad)]
    pub fn begin_load(&mut self, config_name: &str, config_json: &[u8]) -> Result<(), JsError> {
        self.building = None;
        let memory_before = wasm_memory_bytes();
        let builder = bitlora_core::ModelBuilder::new(config_name, config_json)
            .map_err(|e| JsError::new(&e.to_string()))?;
        self.building = Some(Building {
            builder,
            config_name: config_name.to_string(),
            names: Vec::new(),
            bytes: config_json.len(),
            memory_before,
        });
        Ok(())
    }

    /// Adds a safetensors file by its first bytes (`prefix`: the 8-byte length and the JSON
    /// header, or the whole file when shorter) and its size. Returns the tensors the model
    /// reads from it, `[{ name, start, end }]` (byte offsets in the file), for `addTensor`.
    #[wasm_bindgen(js_name = addFile)]
    pub fn add_file(&mut self, name: &str, prefix: &[u8], size: f64) -> Result<JsValue, JsError> {
        let b = self.building_mut()?;
        let spans = b
            .builder
            .add_file(name, prefix, size as u64)
            .map_err(|e| JsError::new(&e.to_string()))?;
        b.names.push(name.to_string());
        b.bytes += size as usize;
        let out: Vec<TensorSpanJs> = spans
            .into_iter()
            .map(|s| TensorSpanJs {
                name: s.name,
                start: s.start as f64,
                end: s.end as f64,
            })
            .collect();
        to_js(&out)
    }

    /// One tensor's bytes (its span of the last added file that declares it), converted as
    /// they are copied in: packed bytes straight into the model, floats 64 KiB at a time, so
    /// wasm memory never holds a raw copy of a whole tensor either.
    #[wasm_bindgen(js_name = addTensor)]
    pub fn add_tensor(&mut self, name: &str, bytes: &js_sys::Uint8Array) -> Result<(), JsError> {
        let b = self.building_mut()?;
        b.builder
            .add_tensor_from(name, bytes.length() as u64, |at, out| {
                bytes
                    .subarray(at as u32, (at + out.len()) as u32)
                    .copy_to(out)
            })
            .map_err(|e| JsError::new(&e.to_string()))
    }

    /// Builds the model from the tensors added (checks as `load`), with its tokenizer, and
    /// makes it the loaded model. Returns the summary `load` returns.
    #[wasm_bindgen(js_name = finishLoad)]
    pub fn finish_load(
        &mut self,
        tokenizer_name: Option<String>,
        tokenizer_json: Option<js_sys::Uint8Array>,
        tokenizer_config_name: Option<String>,
        tokenizer_config_json: Option<js_sys::Uint8Array>,
    ) -> Result<JsValue, JsError> {
        let Some(b) = self.building.take() else {
            return Err(JsError::new(
                "finishLoad: no load was begun (call beginLoad first)",
            ));
        };
        let model = b
            .builder
            .finish()
            .map_err(|e| JsError::new(&e.to_string()))?;
        self.install(
            model,
            b.memory_before,
            &b.config_name,
            b.names,
            b.bytes,
            tokenizer_name,
            tokenizer_json,
            tokenizer_config_name,
            tokenizer_config_json,
        )
    }

    /// Bytes of wasm linear memory now (it only grows): for tests of how much a load takes.
    #[wasm_bindgen(js_name = wasmMemoryBytes)]
    pub fn wasm_memory_bytes() -> f64 {
        wasm_memory_bytes()
    }

    /// `{ before, weights, after }`: bytes of wasm memory when the last successful load began,
    /// once its weights were built (before the tokenizer and the GPU upload) and when it
    /// ended; null before any load. For tests of how much memory loading takes.
    #[wasm_bindgen(js_name = loadMemory)]
    pub fn load_memory(&self) -> Result<JsValue, JsError> {
        to_js(&self.load_memory)
    }
}

impl Session {
    fn building_mut(&mut self) -> Result<&mut Building, JsError> {
        self.building
            .as_mut()
            .ok_or_else(|| JsError::new("no load was begun (call beginLoad first)"))
    }

    /// Makes `model` the loaded model: its tokenizer, the GPU upload, the summary.
    #[allow(clippy::too_many_arguments)]
    fn install(
        &mut self,
        model: bitlora_core::Model,
        memory_before: f64,
        config_name: &str,
        names: Vec<String>,
        total_bytes: usize,
        tokenizer_name: Option<String>,
        tokenizer_json: Option<js_sys::Uint8Array>,
        tokenizer_config_name: Option<String>,
        tokenizer_config_json: Option<js_sys::Uint8Array>,
    ) -> Result<JsValue, JsError> {
        let memory_weights = wasm_memory_bytes();
        let has_tokenizer_config = tokenizer_config_json.is_some();
        let eos_text = tokenizer_config_json
            .as_ref()
            .and_then(|b| bitlora_core::tokenizer::eos_token_text(&b.to_vec()));
        let (tokenizer, chat_template) = load_tokenizer(
            &model.config,
            tokenizer_name.as_deref().unwrap_or("tokenizer.json"),
            tokenizer_json,
            tokenizer_config_name
                .as_deref()
                .unwrap_or("tokenizer_config.json"),
            tokenizer_config_json,
        )?;

        // `mut`: the gpu feature records where the model runs and why not on the GPU.
        #[cfg_attr(not(feature = "gpu"), allow(unused_mut))]
        let mut summary = ModelSummary {
            config: config_name.to_string(),
            files: names,
            bytes: total_bytes,
            vocab_size: model.config.vocab_size,
            hidden_size: model.config.hidden_size,
            num_hidden_layers: model.config.num_hidden_layers,
            backend: "cpu",
            note: None,
            tokenizer: tokenizer
                .as_ref()
                .map(|_| tokenizer_name.clone().unwrap_or_default()),
            tokenizer_vocab_size: tokenizer.as_ref().map(|t| t.vocab_size()),
            tokenizer_config: tokenizer_config_name.filter(|_| has_tokenizer_config),
            chat_template: chat_template.is_some(),
            eos_token_ids: model.config.eos_token_ids.clone(),
            max_positions: model.config.max_position_embeddings,
        };
        let train_eos = bitlora_core::tokenizer::training_eos(
            eos_text.as_deref(),
            tokenizer.as_ref(),
            &model.config,
        );

        #[cfg(feature = "gpu")]
        let gpu_model = match &self.gpu {
            Some(gpu) => match bitlora_gpu::GpuModel::new(gpu, &model) {
                Ok(m) => {
                    summary.backend = "webgpu";
                    Some(RefCell::new(GpuSlot {
                        holder: GpuHolder::Model(Box::new(m)),
                        adapter: None,
                    }))
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
            tokenizer,
            chat_template,
            train_eos,
            #[cfg(feature = "gpu")]
            gpu_model,
        }));
        // Adapters were validated against the previous model.
        self.adapters.clear();
        self.load_memory = Some(LoadMemory {
            before: memory_before,
            weights: memory_weights,
            after: wasm_memory_bytes(),
        });
        Ok(out)
    }
}

#[wasm_bindgen]
impl Session {
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

    /// Generates tokens after `prompt`, calling `on_token(event)` with each one as soon as it
    /// exists; resolves when generation ends (max_tokens, a stop token, or `on_token` returning
    /// `false`). See the module docs for the shapes of `prompt`, `options`, `event` and the
    /// result. The model's EOS tokens always stop; with the chat template, its end of turn too.
    ///
    /// Rejects with an Error naming the problem: no model, an unknown or invalid sampling option
    /// (core's `sampling option `top_p` is 0; ...`), a text prompt without a tokenizer, a token id
    /// out of range, a prompt plus max_tokens longer than the model's context, or whatever
    /// `on_token` threw.
    pub fn generate(
        &self,
        prompt: JsValue,
        options: JsValue,
        on_token: js_sys::Function,
    ) -> js_sys::Promise {
        let loaded = self.loaded.clone();
        let adapter = self.adapter_option(&options);
        wasm_bindgen_futures::future_to_promise(async move {
            let loaded = loaded.ok_or_else(|| {
                JsError::new(
                    "generate: no model loaded yet; load a config.json and its .safetensors first",
                )
            })?;
            let adapter = adapter?;
            let mut opts = generate::parse_options(&options)?;
            let prompt = generate::parse_prompt(&loaded, &prompt)?;
            if prompt.ids.is_empty() {
                return Err(JsError::new(
                    "generate: the prompt is empty (it encodes to no tokens); type something or give token ids",
                )
                .into());
            }
            loaded
                .model
                .check_tokens(&prompt.ids)
                .map_err(|e| JsError::new(&format!("prompt: {e}")))?;
            let context = loaded.model.config.max_position_embeddings;
            if prompt.ids.len() + opts.max_tokens > context {
                return Err(generate::sampling_error(
                    "max_tokens",
                    format!(
                        "is {}; with the prompt's {} tokens that exceeds the model's context of {context} positions: use at most {}",
                        opts.max_tokens,
                        prompt.ids.len(),
                        context.saturating_sub(prompt.ids.len())
                    ),
                )
                .into());
            }
            let mut stop_tokens = loaded.model.config.eos_token_ids.clone();
            stop_tokens.extend(&prompt.stop_tokens);
            stop_tokens.extend(&opts.stop_tokens);
            opts.stop_tokens = stop_tokens;

            // Text prompts stream text; id prompts stream ids only.
            let mut stream = match (&prompt.text, &loaded.tokenizer) {
                (Some(_), Some(t)) => Some(bitlora_core::TextStream::new(t)),
                _ => None,
            };
            let mut failure: Option<JsValue> = None;
            let mut cancelled = false;
            let mut first_token_ms = None;
            let mut index = 0u32;
            let start = now_ms();
            let on_token_rs = |token: u32| -> bool {
                let ms = now_ms() - start;
                first_token_ms.get_or_insert(ms);
                let event = js_sys::Object::new();
                let set = |k: &str, v: JsValue| {
                    js_sys::Reflect::set(&event, &JsValue::from_str(k), &v).map(|_| ())
                };
                let mut fill = || -> Result<(), JsValue> {
                    set("index", index.into())?;
                    set("token", token.into())?;
                    set("ms", ms.into())?;
                    if let Some(s) = &mut stream {
                        let piece = s.push(token).map_err(|e| JsError::new(&e.to_string()))?;
                        set("text", JsValue::from_str(piece.as_deref().unwrap_or("")))?;
                    }
                    Ok(())
                };
                if let Err(e) = fill() {
                    failure = Some(e);
                    return false;
                }
                index += 1;
                match on_token.call1(&JsValue::NULL, &event) {
                    Ok(v) if v == JsValue::FALSE => {
                        cancelled = true;
                        false
                    }
                    Ok(_) => true,
                    Err(e) => {
                        failure = Some(e);
                        false
                    }
                }
            };
            let (backend, tokens) = run_generate(
                &loaded,
                adapter.as_ref().map(|(_, a)| a),
                &prompt.ids,
                &opts,
                on_token_rs,
            )
            .await?;
            if let Some(e) = failure {
                return Err(e);
            }
            let ms = now_ms() - start;
            let prefill_ms = first_token_ms.unwrap_or(ms);
            let decode_ms = ms - prefill_ms;
            let stopped_by = if cancelled {
                "stop"
            } else if tokens.last().is_some_and(|t| opts.stop_tokens.contains(t)) {
                "stop_token"
            } else {
                "max_tokens"
            };
            let text = match (&prompt.text, &loaded.tokenizer) {
                (Some(_), Some(t)) => Some(
                    t.decode(&tokens, true)
                        .map_err(|e| JsError::new(&e.to_string()))?,
                ),
                _ => None,
            };
            let result = GenerateResult {
                backend,
                adapter: adapter.map(|(name, _)| name),
                prompt_tokens: prompt.ids,
                prompt_text: prompt.text,
                // Decode speed: tokens after the first over the time after the first (the
                // first token's time is the prefill of the whole prompt).
                tokens_per_second: if tokens.len() > 1 && decode_ms > 0.0 {
                    Some((tokens.len() - 1) as f64 / (decode_ms / 1000.0))
                } else {
                    None
                },
                tokens,
                text,
                stopped_by,
                stop_tokens: opts.stop_tokens,
                prefill_ms,
                decode_ms,
                ms,
            };
            Ok(to_js(&result)?)
        })
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
    ) -> Option<impl FnOnce(&bitlora_core::lora::LoraConfig, usize, bool) -> memory::GpuBudget>
    {
        #[cfg(feature = "gpu")]
        {
            self.gpu.as_ref()?;
            // The worker asks between passes (web/training.js withModel), so the slot is free.
            let mut slot = loaded.gpu_model.as_ref()?.try_borrow_mut().ok()?;
            let model = slot.model_mut()?;
            let weight_bytes = model.weight_bytes() as f64;
            let max_binding = model.max_binding() as f64;
            let base = model.train_plan_options(0, false);
            Some(
                move |lora: &bitlora_core::lora::LoraConfig, context: usize, accumulate: bool| {
                    use bitlora_gpu::{Role, TrainPlan};
                    let opts = bitlora_gpu::PlanOptions {
                        max_tokens: context,
                        accumulate,
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
            None::<fn(&bitlora_core::lora::LoraConfig, usize, bool) -> memory::GpuBudget>
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

    /// `options.adapter` of a generation: absent or null for the base model, else the key of an
    /// adapter kept by `addAdapter`. Returns the key and the adapter.
    fn adapter_option(&self, options: &JsValue) -> Result<Option<(String, LoraAdapter)>, JsError> {
        if !options.is_object() {
            return Ok(None);
        }
        let v = js_sys::Reflect::get(options, &JsValue::from_str("adapter")).unwrap_or_default();
        if v.is_undefined() || v.is_null() {
            return Ok(None);
        }
        let key = v.as_string().ok_or_else(|| {
            JsError::new("generate: option `adapter` must be an adapter's name or null")
        })?;
        let a = self.adapters.get(&key).ok_or_else(|| {
            JsError::new(&format!(
                "generate: no adapter \"{key}\" is loaded for this model (add it first)"
            ))
        })?;
        let adapter = LoraAdapter {
            lora: a.lora.clone(),
            serial: a.serial,
        };
        Ok(Some((key, adapter)))
    }
}

/// Parses the optional tokenizer.json and tokenizer_config.json given with a model.
fn load_tokenizer(
    config: &bitlora_core::Config,
    tokenizer_name: &str,
    tokenizer_json: Option<js_sys::Uint8Array>,
    tokenizer_config_name: &str,
    tokenizer_config_json: Option<js_sys::Uint8Array>,
) -> Result<
    (
        Option<bitlora_core::Tokenizer>,
        Option<bitlora_core::ChatTemplate>,
    ),
    JsError,
> {
    let core_err = |e: bitlora_core::Error| JsError::new(&e.to_string());
    let Some(json) = tokenizer_json else {
        if tokenizer_config_json.is_some() {
            return Err(JsError::new(&format!(
                "{tokenizer_config_name} was given without a tokenizer.json; pick the model's tokenizer.json too (or neither)"
            )));
        }
        return Ok((None, None));
    };
    let tokenizer =
        bitlora_core::Tokenizer::from_bytes(tokenizer_name, &json.to_vec()).map_err(core_err)?;
    // Ids the model has no embedding for would only fail later, mid-prompt; a tokenizer that
    // is bigger than the model's vocabulary belongs to another model.
    if tokenizer.vocab_size() > config.vocab_size {
        return Err(JsError::new(&format!(
            "{tokenizer_name}: the tokenizer has {} tokens but the model's vocabulary (vocab_size in config.json) has only {}; is it the tokenizer of another model?",
            tokenizer.vocab_size(),
            config.vocab_size
        )));
    }
    let chat_template = match tokenizer_config_json {
        Some(json) => {
            bitlora_core::ChatTemplate::from_tokenizer_config(tokenizer_config_name, &json.to_vec())
                .map_err(core_err)?
        }
        None => None,
    };
    Ok((Some(tokenizer), chat_template))
}

async fn run_forward(loaded: &Loaded, tokens: &[u32]) -> Result<(&'static str, Vec<f32>), JsError> {
    #[cfg(feature = "gpu")]
    if let Some(slot) = &loaded.gpu_model
        && let Some(model) = use_gpu_adapter(slot, None)?
    {
        let logits = model.logits(tokens).await.map_err(|e| match e {
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

/// Runs core's generation on the loaded model's backend; `on_token` returns false to stop.
async fn run_generate(
    loaded: &Loaded,
    adapter: Option<&LoraAdapter>,
    prompt: &[u32],
    opts: &bitlora_core::SamplingOptions,
    on_token: impl FnMut(u32) -> bool,
) -> Result<(&'static str, Vec<u32>), JsError> {
    #[cfg(feature = "gpu")]
    if let Some(slot) = &loaded.gpu_model
        && let Some(model) = use_gpu_adapter(slot, adapter)?
    {
        let out = model
            .generate(prompt, opts, on_token)
            .await
            .map_err(|e| match e {
                bitlora_gpu::GpuError::Model(e) => JsError::new(&e.to_string()),
                e => JsError::new(&format!("WebGPU generation failed: {e}")),
            })?;
        return Ok(("webgpu", out));
    }
    let lora = adapter.map(|a| a.lora.as_ref());
    let out = bitlora_core::generate_with_adapter(&loaded.model, lora, prompt, opts, on_token)
        .map_err(|e| JsError::new(&e.to_string()))?;
    Ok(("cpu", out))
}

/// Borrows the GPU model with `adapter` (None: the plain model) uploaded, uploading it only when
/// another one is there; None when the model is not on the GPU any more (the caller uses the
/// CPU). The borrow lasts for the caller's pass; the worker runs one pass at a time, so finding
/// it taken means a bug in the caller, reported rather than panicking.
#[cfg(feature = "gpu")]
fn use_gpu_adapter<'a>(
    slot: &'a RefCell<GpuSlot>,
    adapter: Option<&LoraAdapter>,
) -> Result<Option<std::cell::RefMut<'a, bitlora_gpu::GpuModel>>, JsError> {
    let mut slot = slot.try_borrow_mut().map_err(|_| {
        JsError::new("the WebGPU model is busy with another pass; wait for it to finish")
    })?;
    let want = adapter.map(|a| a.serial);
    let current = slot.adapter;
    let Some(model) = slot.model_mut() else {
        return Ok(None);
    };
    if current != want {
        model
            .set_adapter(adapter.map(|a| a.lora.as_ref()))
            .map_err(|e| JsError::new(&format!("WebGPU could not take the adapter: {e}")))?;
    }
    slot.adapter = want;
    Ok(std::cell::RefMut::filter_map(slot, GpuSlot::model_mut).ok())
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
                training: "webgpu",
                training_reason: None,
                wasm_memory_limit: train::WASM_MEMORY_LIMIT,
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
