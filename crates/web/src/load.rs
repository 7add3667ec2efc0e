//! Loading a model into the session: `load` (whole files), or tensor by tensor with
//! `beginLoad` / `addFile` / `addTensor` / `finishLoad` (safetensors) or `beginGguf` /
//! `addTensor` / `finishLoad` (one .gguf file) so that wasm memory never holds a whole file;
//! then `install` makes it the loaded model with its tokenizer, chat template and (when the
//! session has WebGPU) its GPU upload.

#[cfg(feature = "gpu")]
use std::cell::RefCell;
use std::rc::Rc;

use serde::Serialize;
use wasm_bindgen::prelude::*;

use crate::error::core_error;
#[cfg(feature = "gpu")]
use crate::gpu_slot::{GpuHolder, GpuSlot};
use crate::{Loaded, ModelSummary, Session, to_js, wasm_memory_bytes};

/// Bytes of wasm linear memory when a load began, once its weights were built (before the
/// tokenizer and the GPU upload) and when it ended. Linear memory only grows, so `weights`
/// includes the peak of building the model: with `load`, the whole files copied in.
#[derive(Serialize, Clone, Copy)]
pub(crate) struct LoadMemory {
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

/// What a tensor-by-tensor load builds from.
enum Builder {
    Safetensors(bitlora_core::ModelBuilder),
    Gguf(Box<bitlora_core::gguf::GgufBuilder>),
}

/// The state of a tensor-by-tensor load: the builder, and the file names and byte count the
/// summary reports.
pub(crate) struct Building {
    builder: Builder,
    config_name: String,
    names: Vec<String>,
    bytes: usize,
    /// Wasm memory at beginLoad.
    memory_before: f64,
}

#[wasm_bindgen]
impl Session {
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
            None,
            memory_before,
            config_name,
            names,
            total,
            tokenizer_name,
            tokenizer_json,
            tokenizer_config_name,
            tokenizer_config_json,
            None,
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
            builder: Builder::Safetensors(builder),
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
        let Builder::Safetensors(builder) = &mut b.builder else {
            return Err(JsError::new(
                "addFile: a .gguf load takes no other files (its tensors come with addTensor)",
            ));
        };
        let spans = builder
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
        let read = |at: usize, out: &mut [u8]| {
            bytes
                .subarray(at as u32, (at + out.len()) as u32)
                .copy_to(out)
        };
        let len = bytes.length() as u64;
        match &mut b.builder {
            Builder::Safetensors(builder) => builder.add_tensor_from(name, len, read),
            Builder::Gguf(builder) => builder.add_tensor_from(name, len, read),
        }
        .map_err(|e| JsError::new(&e.to_string()))
    }

    /// Starts loading a model from one GGUF file (llama.cpp, QVAC Fabric, bitnet.cpp: TQ1_0,
    /// TQ2_0 or I2_S projections) by its first bytes (`prefix`) and its size: the config comes
    /// from its metadata. Returns the tensors to `addTensor`, `[{ name, start, end }]` in file
    /// order, then `finishLoad`; or null when `prefix` ends inside the header: call again with
    /// more of the file's start. A file that is not GGUF, or a damaged one, fails with core's
    /// error (the file, the offset, what is wrong); the loaded model, if any, stays loaded.
    #[wasm_bindgen(js_name = beginGguf)]
    pub fn begin_gguf(&mut self, name: &str, prefix: &[u8], size: f64) -> Result<JsValue, JsValue> {
        self.building = None;
        let memory_before = wasm_memory_bytes();
        let file_len = size as u64;
        let (builder, tensors) = match bitlora_core::gguf::GgufBuilder::new(name, prefix, file_len)
        {
            Ok(b) => b,
            // The header runs past the prefix, not past the file.
            Err(bitlora_core::Error::GgufTruncated { len, .. })
                if len == prefix.len() as u64 && len < file_len =>
            {
                return Ok(JsValue::NULL);
            }
            Err(e) => return Err(core_error(&e)),
        };
        let out: Vec<TensorSpanJs> = tensors
            .into_iter()
            .map(|t| TensorSpanJs {
                name: t.name,
                start: t.offset as f64,
                end: (t.offset + t.size) as f64,
            })
            .collect();
        self.building = Some(Building {
            builder: Builder::Gguf(Box::new(builder)),
            config_name: name.to_string(),
            names: vec![name.to_string()],
            bytes: file_len as usize,
            memory_before,
        });
        Ok(to_js(&out)?)
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
        let (model, gguf) = match b.builder {
            Builder::Safetensors(builder) => (builder.finish(), None),
            Builder::Gguf(builder) => {
                let header = builder.header();
                let arch = header.architecture().map(str::to_string);
                // Without a tokenizer.json, the file's own tokenizer.ggml.* when it has one
                // (rebuilt as a tokenizer.json; an unsupported one fails naming the key).
                let own = match (&tokenizer_json, header.get("tokenizer.ggml.model")) {
                    (None, Some(_)) => Some(header.tokenizer_json()),
                    _ => None,
                };
                // Without a tokenizer_config.json, the file's own tokenizer.chat_template.
                let own_template = match &tokenizer_config_json {
                    None => header.chat_template(),
                    Some(_) => Ok(None),
                };
                (builder.finish(), Some((arch, own, own_template)))
            }
        };
        let model = model.map_err(|e| JsError::new(&e.to_string()))?;
        let (mut tokenizer_name, mut tokenizer_json) = (tokenizer_name, tokenizer_json);
        let mut gguf_architecture = None;
        let mut gguf_chat_template = None;
        if let Some((arch, own, own_template)) = gguf {
            gguf_architecture = Some(arch.map_err(|e| JsError::new(&e.to_string()))?);
            if let Some(json) = own {
                let json = json.map_err(|e| JsError::new(&e.to_string()))?;
                tokenizer_name = Some(format!("{} (tokenizer.ggml.*)", b.config_name));
                tokenizer_json = Some(js_sys::Uint8Array::from(json.as_bytes()));
            }
            gguf_chat_template = own_template.map_err(|e| JsError::new(&e.to_string()))?;
        }
        self.install(
            model,
            gguf_architecture,
            b.memory_before,
            &b.config_name,
            b.names,
            b.bytes,
            tokenizer_name,
            tokenizer_json,
            tokenizer_config_name,
            tokenizer_config_json,
            gguf_chat_template,
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
        gguf_architecture: Option<String>,
        memory_before: f64,
        config_name: &str,
        names: Vec<String>,
        total_bytes: usize,
        tokenizer_name: Option<String>,
        tokenizer_json: Option<js_sys::Uint8Array>,
        tokenizer_config_name: Option<String>,
        tokenizer_config_json: Option<js_sys::Uint8Array>,
        gguf_chat_template: Option<bitlora_core::ChatTemplate>,
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
        // A .gguf's own template (finishLoad takes it only without a tokenizer_config.json),
        // for a model that has a tokenizer to render it with.
        let chat_template = chat_template.or(gguf_chat_template.filter(|_| tokenizer.is_some()));

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
            gguf_config: gguf_architecture.as_ref().map(|_| model.config.to_json()),
            gguf_architecture,
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
