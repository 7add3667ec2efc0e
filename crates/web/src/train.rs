//! Training for the page: data preparation, a memory estimate, and [`WebTrainer`]: core's
//! [`Trainer`] (the one training loop) over the page's backend (`backend.rs`: WebGPU's resident
//! path, or the CPU), advanced one unit at a time (a training sequence's forward and backward,
//! or a validation sequence's loss) so that the worker can yield to its event loop between
//! units (pause and stop messages get through while a CPU step runs synchronously). A run
//! resumed from a checkpoint continues exactly as the CLI's would: same loop, same checkpoint.
//!
//! Options come as a plain object with camelCase names (web/bitlora.d.ts, `TrainConfig`), read
//! into core's [`TrainConfig`] (the CLI's too); unknown names are errors, so a typo never
//! silently means "default". Errors reach JavaScript as `Error`s with `field` (the option) or
//! `line` (the JSONL line) where they apply (`error.rs`).

use std::cell::RefCell;
use std::rc::Rc;

use bitlora_core::data::{self, Dataset};
use bitlora_core::lora::{Lora, TARGETS};
use bitlora_core::trainer::{Checkpoint, StepReport, Trainer, Validation};
use bitlora_core::{Config, ConfigError, TrainConfig, peft};
use serde::Serialize;
use wasm_bindgen::prelude::*;

use crate::backend::WebBackend;
use crate::error::{config_error, core_error};
use crate::{Loaded, to_js};

/// wasm32's address space: the most memory the CPU backend can ever have.
pub(crate) const WASM_MEMORY_LIMIT: f64 = 4.0 * 1024.0 * 1024.0 * 1024.0;

/// `{ rank, alpha, ... }` (TrainConfig in web/bitlora.d.ts, all optional) -> core's checked
/// [`TrainConfig`] for `model`; errors name the option ([`ConfigError::field`]).
///
/// The object goes through serde as JSON (`serde_json::Value`), and core's
/// [`TrainConfig::parse`] reads it one option at a time. Not `from_value::<TrainConfig>`
/// directly: serde-wasm-bindgen reads a struct by looking up the struct's own field names on
/// the object, so it never sees another key and `deny_unknown_fields` could not refuse a typo.
/// JSON has no NaN or Infinity (serde_json would read them as null, i.e. the default), so those
/// are refused here first.
pub(crate) fn train_config(model: &Config, value: &JsValue) -> Result<TrainConfig, ConfigError> {
    if value.is_object() && !js_sys::Array::is_array(value) {
        let object: &js_sys::Object = value.unchecked_ref();
        for key in js_sys::Object::keys(object).iter() {
            let key = key.as_string().unwrap_or_default();
            if !TrainConfig::FIELDS.contains(&key.as_str()) {
                continue; // parse names it
            }
            let v = js_sys::Reflect::get(value, &JsValue::from_str(&key)).unwrap_or_default();
            if let Some(x) = v.as_f64().filter(|x| !x.is_finite()) {
                return Err(ConfigError::option(
                    &key,
                    format!("is {x}; it must be a finite number"),
                ));
            }
        }
    }
    let json: serde_json::Value = serde_wasm_bindgen::from_value(value.clone())
        .map_err(|e| ConfigError::whole(format!("training options: {e}")))?;
    TrainConfig::parse(model, &json)
}

/// [`train_config`] with the error as a plain message (memory.rs's estimate; the exported
/// `estimateMemory` checks the config with [`train_config`] first, so its errors keep their
/// field).
pub(crate) fn parse_config(model: &Config, value: &JsValue) -> Result<TrainConfig, JsError> {
    train_config(model, value).map_err(|e| JsError::new(&e.message))
}

/// What `prepareData` reports (DataSummary in web/bitlora.d.ts).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DataSummary {
    file_name: String,
    format: &'static str,
    examples: usize,
    tokens: usize,
    target_tokens: usize,
    train_sequences: usize,
    val_sequences: usize,
    train_target_tokens: usize,
    val_target_tokens: usize,
    truncated: usize,
    pub(crate) context: usize,
    steps_per_epoch: usize,
    bytes: usize,
}

/// Parses and tokenizes `bytes` into train and validation sequences with the model's tokenizer
/// (and chat template, for chat data). Errors name the file and, for JSONL, the line.
fn build_dataset(
    loaded: &Loaded,
    file: &str,
    bytes: &[u8],
    config: &TrainConfig,
) -> Result<(Dataset, usize), JsValue> {
    let tokenizer = loaded.tokenizer.as_ref().ok_or_else(|| {
        JsError::new(
            "training needs the model's tokenizer.json: this model was loaded without one (pick tokenizer.json together with config.json and the .safetensors)",
        )
    })?;
    let core = |e: bitlora_core::Error| core_error(&e);
    // Read and tokenised as a stream (core's data::load): the wasm heap holds the sequences
    // kept, not a parsed copy of the file's text besides the bytes.
    let dataset = data::load(
        file,
        bytes,
        tokenizer,
        loaded.chat_template.as_ref(),
        loaded.train_eos,
        &config.data_options(),
    )
    .map_err(core)?;
    let examples = dataset.examples;
    Ok((dataset, examples))
}

fn summarize(
    file: &str,
    bytes: usize,
    examples: usize,
    d: &Dataset,
    config: &TrainConfig,
) -> DataSummary {
    let tokens = |s: &[data::Sequence]| s.iter().map(|q| q.tokens.len()).sum::<usize>();
    let targets = |s: &[data::Sequence]| s.iter().map(data::Sequence::counted).sum::<usize>();
    DataSummary {
        file_name: file.to_string(),
        format: d.format,
        examples,
        tokens: tokens(&d.train) + tokens(&d.val),
        target_tokens: targets(&d.train) + targets(&d.val),
        train_sequences: d.train.len(),
        val_sequences: d.val.len(),
        train_target_tokens: targets(&d.train),
        val_target_tokens: targets(&d.val),
        truncated: d.truncated,
        context: config.context,
        steps_per_epoch: d.train.len().div_ceil(config.batch),
        bytes,
    }
}

/// `Session.prepareData`: the data summary for `options` (DataOptions plus `batch`).
pub(crate) fn prepare_data(
    loaded: &Loaded,
    file: &str,
    bytes: &[u8],
    options: &JsValue,
) -> Result<JsValue, JsValue> {
    let config = train_config(&loaded.model.config, options).map_err(|e| config_error(&e))?;
    let (dataset, examples) = build_dataset(loaded, file, bytes, &config)?;
    if dataset.train.is_empty() {
        return Err(crate::error::js_error(
            &format!(
                "{file}: every sequence went to validation; lower valFraction or give more data"
            ),
            Some("valFraction"),
            None,
        ));
    }
    Ok(to_js(&summarize(
        file,
        bytes.len(),
        examples,
        &dataset,
        &config,
    ))?)
}

/// A training run over the loaded model: `Session.createTrainer` / `Session.resumeTrainer`.
/// Core's [`Trainer`] with the page's backend ([`WebBackend`]: WebGPU's resident path, or the
/// CPU); this type only adapts it to JavaScript.
///
/// The state sits in an `Rc<RefCell>` so that `advance`, `validate`, `checkpoint` and
/// `adapterFiles` can return Promises that own it while they await the GPU; the worker calls
/// one method at a time (its training loop awaits each `advance`), and a call that finds the
/// state taken is an error, not a panic.
#[wasm_bindgen]
pub struct WebTrainer {
    inner: Rc<RefCell<Inner>>,
}

struct Inner {
    loaded: Rc<Loaded>,
    trainer: Trainer<WebBackend>,
    /// As given, with `steps` resolved (from epochs, or the checkpoint's).
    config: TrainConfig,
    summary: DataSummary,
    adapter_params: usize,
    /// Bytes read back from the GPU during the current step's training sequences.
    step_read_bytes: u64,
    /// A validation outside the steps (`validateNext`, the loss before the first step) that
    /// runs a sequence at a time: the next sequence and the sum so far.
    standalone: Option<(usize, Validation)>,
}

/// Where a validation run a sequence at a time stands (`validateNext`).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ValidationProgress {
    done: usize,
    total: usize,
    /// The mean loss once `done == total` (null without counted targets, and before that).
    val_loss: Option<f32>,
}

/// The run's description (`info()`): the resolved config and the data.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TrainerInfo<'a> {
    config: &'a TrainConfig,
    data: &'a DataSummary,
    step: usize,
    total_steps: usize,
    adapter_params: usize,
    backend: &'static str,
    backend_note: Option<&'a str>,
}

/// A finished step as the page sees it (ProgressEvent without the page's timing fields).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Report {
    step: usize,
    total_steps: usize,
    epoch: u64,
    loss: f32,
    val_loss: Option<f32>,
    lr: f32,
    grad_norm: f32,
    tokens: usize,
    skipped: Option<String>,
    backend: &'static str,
    /// Bytes read back from the GPU by the step's training sequences (0 on the CPU): the
    /// per-row losses and the squared gradient norm on WebGPU's resident path.
    read_bytes: u64,
    /// GPU bytes the run holds (weights, the trainer's buffers, the optimizer state); None on
    /// the CPU.
    #[serde(skip_serializing_if = "Option::is_none")]
    gpu_bytes: Option<u64>,
    /// Whether the step recomputed activations in the backward (the `recompute` option);
    /// None on the CPU.
    #[serde(skip_serializing_if = "Option::is_none")]
    recompute: Option<bool>,
}

impl Inner {
    fn report(&self, r: &StepReport) -> Report {
        Report {
            step: r.step,
            total_steps: self.trainer.options.steps,
            epoch: r.epoch,
            loss: r.loss,
            val_loss: r.val_loss,
            lr: r.lr,
            grad_norm: r.grad_norm,
            tokens: r.tokens,
            skipped: r.skipped.clone(),
            backend: self.trainer.backend().label(),
            read_bytes: self.step_read_bytes,
            gpu_bytes: self.trainer.backend().gpu_bytes(),
            recompute: self.trainer.backend().recomputes(),
        }
    }
}

impl WebTrainer {
    fn new(inner: Inner) -> WebTrainer {
        WebTrainer {
            inner: Rc::new(RefCell::new(inner)),
        }
    }

    pub(crate) fn create(
        loaded: Rc<Loaded>,
        gpu: Option<Rc<crate::GpuHandle>>,
        file: &str,
        bytes: &[u8],
        config: &JsValue,
    ) -> Result<WebTrainer, JsValue> {
        let c = &loaded.model.config;
        let mut config = train_config(c, config).map_err(|e| config_error(&e))?;
        let (dataset, examples) = build_dataset(&loaded, file, bytes, &config)?;
        let summary = summarize(file, bytes.len(), examples, &dataset, &config);
        let steps = config.total_steps(dataset.train.len());
        config.steps = Some(steps);
        let lora_config = config.lora_config().map_err(|e| config_error(&e))?;
        let lora = Lora::init(c, lora_config, config.seed);
        let adapter_params = lora.num_params();
        let backend = WebBackend::new(
            loaded.clone(),
            gpu,
            &lora.config,
            config.context,
            config.recompute,
        );
        let trainer = Trainer::new(
            backend,
            c,
            lora,
            config.adamw_config(steps),
            dataset,
            config.train_options(steps),
        )
        .map_err(|e| JsError::new(&format!("{file}: {}", js_message(e))))?;
        Ok(WebTrainer::new(Inner {
            loaded,
            trainer,
            config,
            summary,
            adapter_params,
            step_read_bytes: 0,
            standalone: None,
        }))
    }

    /// Continues from `checkpoint` (Trainer::checkpoint's bytes) with the same data and config.
    pub(crate) fn resume(
        loaded: Rc<Loaded>,
        gpu: Option<Rc<crate::GpuHandle>>,
        file: &str,
        bytes: &[u8],
        config: &JsValue,
        checkpoint: &[u8],
    ) -> Result<WebTrainer, JsValue> {
        let c = &loaded.model.config;
        let mut config = train_config(c, config).map_err(|e| config_error(&e))?;
        let (dataset, examples) = build_dataset(&loaded, file, bytes, &config)?;
        let summary = summarize(file, bytes.len(), examples, &dataset, &config);
        let cannot = |e: bitlora_core::Error| JsError::new(&format!("cannot resume this run: {e}"));
        let ckpt = Checkpoint::read(c, "checkpoint.safetensors", checkpoint).map_err(cannot)?;
        let adapter_params = Lora::init(c, ckpt.lora_config().clone(), 0).num_params();
        let backend = WebBackend::new(
            loaded.clone(),
            gpu,
            ckpt.lora_config(),
            config.context,
            config.recompute,
        );
        let trainer = Trainer::resume(backend, c, dataset, ckpt)
            .map_err(|e| JsError::new(&format!("cannot resume this run: {}", js_message(e))))?;
        config.steps = Some(trainer.options.steps);
        Ok(WebTrainer::new(Inner {
            loaded,
            trainer,
            config,
            summary,
            adapter_params,
            step_read_bytes: 0,
            standalone: None,
        }))
    }

    fn state(&self) -> Result<std::cell::Ref<'_, Inner>, JsError> {
        self.inner.try_borrow().map_err(|_| busy())
    }
}

/// A JsError's message (to prefix it with context).
fn js_message(e: JsError) -> String {
    let v: JsValue = e.into();
    js_sys::Reflect::get(&v, &JsValue::from_str("message"))
        .ok()
        .and_then(|m| m.as_string())
        .unwrap_or_else(|| "unknown error".into())
}

fn busy() -> JsError {
    JsError::new(
        "the trainer is busy with a step; wait for it (the worker runs one call at a time)",
    )
}

#[wasm_bindgen]
impl WebTrainer {
    /// `{ config (resolved), data (DataSummary), step, totalSteps, adapterParams, backend,
    /// backendNote }`.
    pub fn info(&self) -> Result<JsValue, JsError> {
        let s = self.state()?;
        let backend = s.trainer.backend();
        to_js(&TrainerInfo {
            config: &s.config,
            data: &s.summary,
            step: s.trainer.step,
            total_steps: s.trainer.options.steps,
            adapter_params: s.adapter_params,
            backend: backend.label(),
            backend_note: backend.note.as_deref(),
        })
    }

    /// Steps taken so far.
    #[wasm_bindgen(getter)]
    pub fn step(&self) -> Result<usize, JsError> {
        Ok(self.state()?.trainer.step)
    }

    #[wasm_bindgen(getter, js_name = totalSteps)]
    pub fn total_steps(&self) -> Result<usize, JsError> {
        Ok(self.state()?.trainer.options.steps)
    }

    /// Whether every step has run (and the last one's validation, if any).
    pub fn done(&self) -> Result<bool, JsError> {
        Ok(self.state()?.trainer.done())
    }

    /// Whether the run is between two steps (where checkpoints are taken).
    #[wasm_bindgen(js_name = atStepBoundary)]
    pub fn at_step_boundary(&self) -> Result<bool, JsError> {
        Ok(self.state()?.trainer.at_step_boundary())
    }

    /// Whether a checkpoint can be taken now: between steps, or while a finished step's
    /// validation runs (validation changes nothing a checkpoint holds; a run resumed from such
    /// a checkpoint continues with the next step, without that step's validation loss).
    #[wasm_bindgen(js_name = atSafePoint)]
    pub fn at_safe_point(&self) -> Result<bool, JsError> {
        Ok(self.state()?.trainer.at_safe_point())
    }

    /// Does one unit of work: one training sequence's forward and backward, or one validation
    /// sequence's loss (core's `Trainer::advance`). Resolves to the step's report
    /// (ProgressEvent fields without timing) when this unit finished a step (with its
    /// validation when due), else to `undefined`. On the CPU the work runs synchronously
    /// inside the call; on WebGPU it awaits the GPU.
    pub fn advance(&self) -> js_sys::Promise {
        let inner = self.inner.clone();
        wasm_bindgen_futures::future_to_promise(async move {
            let mut s = inner.try_borrow_mut().map_err(|_| busy())?;
            if s.trainer.at_step_boundary() {
                s.step_read_bytes = 0;
            }
            let training = !s.trainer.at_safe_point() || s.trainer.at_step_boundary();
            let out = s.trainer.advance().await?;
            if training {
                let read = s.trainer.backend().read_bytes();
                s.step_read_bytes += read;
            }
            match out {
                Some(report) => Ok(to_js(&s.report(&report))?),
                None => Ok(JsValue::UNDEFINED),
            }
        })
    }

    /// `{ done, total }` validation sequences while a validation runs (a finished step's, or
    /// one started with `validateNext`), else null.
    #[wasm_bindgen(js_name = validationProgress)]
    pub fn validation_progress(&self) -> Result<JsValue, JsError> {
        let s = self.state()?;
        let total = s.trainer.data.val.len();
        let done = match (&s.standalone, s.trainer.validation_progress()) {
            (Some((next, _)), _) => *next,
            (None, Some((next, _))) => next,
            (None, None) => return Ok(JsValue::NULL),
        };
        to_js(&ValidationProgress {
            done,
            total,
            val_loss: None,
        })
    }

    /// One sequence of a validation of the adapter as it is now, outside the steps (the loss
    /// before the first step): resolves to `{ done, total, valLoss }`, with `valLoss` once
    /// `done == total`; the next call then starts a new validation. The sum is core's
    /// (`Validation`), so the loss equals `validate()`'s. Only at a safe point.
    #[wasm_bindgen(js_name = validateNext)]
    pub fn validate_next(&self) -> js_sys::Promise {
        let inner = self.inner.clone();
        wasm_bindgen_futures::future_to_promise(async move {
            let mut s = inner.try_borrow_mut().map_err(|_| busy())?;
            let total = s.trainer.data.val.len();
            let (next, mut v) = s.standalone.take().unwrap_or_default();
            if next < total {
                let out = s.trainer.validation_loss(next).await?;
                v.add(out);
            }
            let done = (next + 1).min(total);
            let val_loss = if done == total {
                v.mean()
            } else {
                s.standalone = Some((done, v));
                None
            };
            Ok(to_js(&ValidationProgress {
                done,
                total,
                val_loss,
            })?)
        })
    }

    /// Drops a validation started with `validateNext` (a stop or pause that should not wait
    /// for it), and a finished step's validation that is running: that step's report comes
    /// back without its validation loss (the step itself is applied either way), else
    /// `undefined`.
    #[wasm_bindgen(js_name = skipValidation)]
    pub fn skip_validation(&self) -> Result<JsValue, JsError> {
        let mut s = self.inner.try_borrow_mut().map_err(|_| busy())?;
        s.standalone = None;
        match s.trainer.skip_validation() {
            Some(report) => Ok(to_js(&s.report(&report))?),
            None => Ok(JsValue::UNDEFINED),
        }
    }

    /// Resolves to the validation loss of the adapter as it is now (null without validation
    /// sequences).
    pub fn validate(&self) -> js_sys::Promise {
        let inner = self.inner.clone();
        wasm_bindgen_futures::future_to_promise(async move {
            let mut s = inner.try_borrow_mut().map_err(|_| busy())?;
            Ok(match s.trainer.validate().await? {
                Some(v) => JsValue::from_f64(v as f64),
                None => JsValue::NULL,
            })
        })
    }

    /// Resolves to the whole training state as one safetensors file (core's checkpoint
    /// format; on WebGPU the adapter and Adam's moments are read back for it). Only at a safe
    /// point (`atSafePoint()`).
    pub fn checkpoint(&self) -> js_sys::Promise {
        let inner = self.inner.clone();
        wasm_bindgen_futures::future_to_promise(async move {
            let mut s = inner.try_borrow_mut().map_err(|_| busy())?;
            let bytes = s.trainer.checkpoint().await?;
            Ok(js_sys::Uint8Array::from(bytes.as_slice()).into())
        })
    }

    /// Resolves to the adapter as PEFT files: `{ config: string (adapter_config.json),
    /// weights: Uint8Array (adapter_model.safetensors) }`. `base_model` goes into the config's
    /// base_model_name_or_path.
    #[wasm_bindgen(js_name = adapterFiles)]
    pub fn adapter_files(&self, base_model: String) -> js_sys::Promise {
        let inner = self.inner.clone();
        wasm_bindgen_futures::future_to_promise(async move {
            let mut s = inner.try_borrow_mut().map_err(|_| busy())?;
            let lora = s.trainer.adapter().await?;
            Ok(peft_files(&lora, &s.loaded.model.config, &base_model)?)
        })
    }
}

/// `{ config, weights }` of an adapter, see [`WebTrainer::adapter_files`].
pub(crate) fn peft_files(
    lora: &Lora,
    model: &Config,
    base_model: &str,
) -> Result<JsValue, JsError> {
    let tensors = peft::adapter_tensors(lora, model);
    let weights = bitlora_core::weights::serialize(&tensors);
    let config = serde_json::to_string_pretty(&peft::adapter_config_json(&lora.config, base_model))
        .map_err(|e| JsError::new(&format!("internal: adapter_config.json: {e}")))?;
    let out = js_sys::Object::new();
    let set = |k: &str, v: &JsValue| {
        js_sys::Reflect::set(&out, &JsValue::from_str(k), v)
            .map_err(|_| JsError::new("internal: cannot build the adapter files object"))
    };
    set("config", &JsValue::from_str(&config))?;
    set(
        "weights",
        &js_sys::Uint8Array::from(weights.as_slice()).into(),
    )?;
    Ok(out.into())
}

/// What an adapter is, for the adapters list (AdapterInfo's adapter fields).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct AdapterSummary {
    pub r: usize,
    pub alpha: f32,
    pub dropout: f32,
    pub rslora: bool,
    pub targets: Vec<&'static str>,
    pub params: usize,
    /// base_model_name_or_path from adapter_config.json, if any.
    pub base_model: Option<String>,
}

/// Reads and validates PEFT files against `model`; errors name the file and the tensor.
pub(crate) fn read_peft(
    model: &Config,
    config_name: &str,
    config_json: &[u8],
    weights_name: &str,
    weights: &[u8],
) -> Result<(Lora, AdapterSummary), JsError> {
    let core = |e: bitlora_core::Error| JsError::new(&e.to_string());
    let cfg = peft::read_adapter_config(config_name, config_json).map_err(core)?;
    let lora = peft::read_adapter(cfg, model, weights_name, weights).map_err(|e| match e {
        // A tensor of the wrong shape, or one the model needs and the file lacks: another
        // model's adapter, most likely.
        bitlora_core::Error::Shape { .. }
        | bitlora_core::Error::MissingTensor { .. }
        | bitlora_core::Error::TensorShape { .. } => JsError::new(&format!(
            "{e} (is this adapter made for another model? it must match this model's layers and sizes)"
        )),
        e => JsError::new(&e.to_string()),
    })?;
    let base_model = serde_json::from_slice::<serde_json::Value>(config_json)
        .ok()
        .and_then(|v| v["base_model_name_or_path"].as_str().map(str::to_string))
        .filter(|s| !s.is_empty());
    let c = &lora.config;
    let summary = AdapterSummary {
        r: c.r,
        alpha: c.alpha,
        dropout: c.dropout,
        rslora: c.use_rslora,
        targets: TARGETS
            .iter()
            .zip(c.targets)
            .filter(|(_, on)| *on)
            .map(|(n, _)| *n)
            .collect(),
        params: lora.num_params(),
        base_model,
    };
    Ok((lora, summary))
}
