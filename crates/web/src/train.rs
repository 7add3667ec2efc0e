//! Training for the page: data preparation, a memory estimate, and [`WebTrainer`]: core's
//! [`Trainer`] (the one training loop) over the page's backend (`backend.rs`: WebGPU's resident
//! path, or the CPU), advanced one unit at a time (a training sequence's forward and backward,
//! or a validation sequence's loss) so that the worker can yield to its event loop between
//! units (pause and stop messages get through while a CPU step runs synchronously). A run
//! resumed from a checkpoint continues exactly as the CLI's would: same loop, same checkpoint.
//!
//! Options come as a plain object with camelCase names (web/bitlora.d.ts, `TrainConfig`); unknown
//! names are errors, so a typo never silently means "default".

use std::cell::RefCell;
use std::rc::Rc;

use bitlora_core::data::{self, DataOptions, Dataset};
use bitlora_core::lora::{Lora, LoraConfig, TARGETS};
use bitlora_core::optim::{AdamWConfig, Schedule};
use bitlora_core::trainer::{Checkpoint, StepReport, TrainOptions, Trainer};
use bitlora_core::{Config, peft};
use serde::Serialize;
use wasm_bindgen::prelude::*;

use crate::backend::WebBackend;
use crate::{Loaded, to_js};

/// Largest integer a JavaScript number holds exactly (2^53 - 1).
const MAX_SAFE_INTEGER: f64 = 9_007_199_254_740_991.0;

/// wasm32's address space: the most memory the CPU backend can ever have.
pub(crate) const WASM_MEMORY_LIMIT: f64 = 4.0 * 1024.0 * 1024.0 * 1024.0;

/// The option names `parse_config` accepts (TrainConfig in web/bitlora.d.ts, without the
/// page-side `checkpointEvery` and `name`).
const OPTION_NAMES: [&str; 19] = [
    "rank",
    "alpha",
    "dropout",
    "targets",
    "rslora",
    "lr",
    "schedule",
    "warmup",
    "weightDecay",
    "maxGradNorm",
    "steps",
    "epochs",
    "batch",
    "evalEvery",
    "context",
    "completionOnly",
    "valFraction",
    "seed",
    // Page-side options, accepted and ignored here so that one object can be passed through.
    "checkpointEvery",
];

fn option_error(option: &str, msg: impl std::fmt::Display) -> JsError {
    JsError::new(&format!("training option `{option}` {msg}"))
}

/// A training config with every default filled in (TrainConfig, resolved).
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct TrainSpec {
    rank: usize,
    alpha: f32,
    dropout: f32,
    targets: Vec<String>,
    rslora: bool,
    lr: f32,
    schedule: &'static str,
    warmup: usize,
    weight_decay: f32,
    max_grad_norm: Option<f32>,
    /// Given, or None when steps come from epochs (or the default of one epoch).
    steps: Option<usize>,
    epochs: Option<f64>,
    pub(crate) batch: usize,
    eval_every: usize,
    pub(crate) context: usize,
    completion_only: bool,
    val_fraction: f32,
    seed: u64,
}

impl TrainSpec {
    fn defaults(model: &Config) -> TrainSpec {
        TrainSpec {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: vec!["all-linear".into()],
            rslora: false,
            lr: 2e-4,
            schedule: "cosine",
            warmup: 0,
            weight_decay: 0.01,
            max_grad_norm: Some(1.0),
            steps: None,
            epochs: None,
            batch: 1,
            eval_every: 20,
            context: 128.min(model.max_position_embeddings),
            completion_only: false,
            val_fraction: 0.1,
            seed: 0,
        }
    }

    fn data_options(&self) -> DataOptions {
        DataOptions {
            context: self.context,
            completions_only: self.completion_only,
            val_fraction: self.val_fraction,
            seed: self.seed,
        }
    }

    pub(crate) fn lora_config(&self) -> Result<LoraConfig, JsError> {
        let targets: Vec<&str> = self.targets.iter().map(String::as_str).collect();
        LoraConfig::new(self.rank, self.alpha, self.dropout, self.rslora, &targets)
            .map_err(|e| JsError::new(&e.to_string()))
    }

    /// Optimizer steps for `train` training sequences.
    fn total_steps(&self, train: usize) -> usize {
        self.steps.unwrap_or_else(|| {
            let epochs = self.epochs.unwrap_or(1.0);
            ((epochs * train as f64) / self.batch as f64)
                .ceil()
                .max(1.0) as usize
        })
    }
}

/// Reads a number option, or an error naming it.
fn number(option: &str, v: &JsValue) -> Result<f64, JsError> {
    match v.as_f64() {
        Some(x) if x.is_finite() => Ok(x),
        Some(x) => Err(option_error(
            option,
            format!("is {x}; it must be a finite number"),
        )),
        None => Err(option_error(
            option,
            format!("must be a number, got {}", describe(v)),
        )),
    }
}

fn whole(option: &str, v: &JsValue, min: f64) -> Result<u64, JsError> {
    let x = number(option, v)?;
    if x.fract() != 0.0 || !(min..=MAX_SAFE_INTEGER).contains(&x) {
        return Err(option_error(
            option,
            format!("is {x}; it must be a whole number of at least {min}"),
        ));
    }
    Ok(x as u64)
}

fn describe(v: &JsValue) -> String {
    if let Some(s) = v.as_string() {
        format!("the string {s:?}")
    } else if let Some(b) = v.as_bool() {
        format!("{b}")
    } else if v.is_null() {
        "null".into()
    } else if v.is_undefined() {
        "undefined".into()
    } else if js_sys::Array::is_array(v) {
        "a list".into()
    } else {
        "an object".into()
    }
}

/// `{ rank, alpha, ... }` (all optional) -> a resolved spec. Values are checked here, with the
/// option's name, before anything is built.
pub(crate) fn parse_config(model: &Config, value: &JsValue) -> Result<TrainSpec, JsError> {
    let mut s = TrainSpec::defaults(model);
    if value.is_undefined() || value.is_null() {
        return Ok(s);
    }
    if !value.is_object() || js_sys::Array::is_array(value) {
        return Err(JsError::new(
            "training options must be an object such as { rank: 8, lr: 2e-4, steps: 100 }",
        ));
    }
    let object: &js_sys::Object = value.unchecked_ref();
    for key in js_sys::Object::keys(object).iter() {
        let key = key.as_string().unwrap_or_default();
        let Some(&option) = OPTION_NAMES.iter().find(|&&n| n == key) else {
            return Err(JsError::new(&format!(
                "unknown training option `{key}`; the options are {}",
                OPTION_NAMES.join(", ")
            )));
        };
        let v = js_sys::Reflect::get(value, &JsValue::from_str(option)).unwrap_or_default();
        if v.is_undefined() {
            continue;
        }
        let positive = |x: f64| {
            if x > 0.0 {
                Ok(x)
            } else {
                Err(option_error(option, format!("is {x}; it must be positive")))
            }
        };
        let flag = |v: &JsValue| {
            v.as_bool().ok_or_else(|| {
                option_error(
                    option,
                    format!("must be true or false, got {}", describe(v)),
                )
            })
        };
        match option {
            "maxGradNorm" if v.is_null() => s.max_grad_norm = None,
            _ if v.is_null() => continue,
            "rank" => s.rank = whole(option, &v, 1.0)? as usize,
            "alpha" => s.alpha = positive(number(option, &v)?)? as f32,
            "dropout" => {
                let x = number(option, &v)?;
                if !(0.0..1.0).contains(&x) {
                    return Err(option_error(
                        option,
                        format!("is {x}; it must be in [0, 1)"),
                    ));
                }
                s.dropout = x as f32;
            }
            "targets" => {
                let list = if let Some(one) = v.as_string() {
                    vec![one]
                } else if js_sys::Array::is_array(&v) {
                    js_sys::Array::from(&v)
                        .iter()
                        .map(|t| {
                            t.as_string().ok_or_else(|| {
                                option_error(
                                    option,
                                    format!(
                                        "holds {}; give names such as \"q_proj\"",
                                        describe(&t)
                                    ),
                                )
                            })
                        })
                        .collect::<Result<_, _>>()?
                } else {
                    return Err(option_error(
                        option,
                        format!("must be a list of module names, got {}", describe(&v)),
                    ));
                };
                if let Some(bad) = list
                    .iter()
                    .find(|t| *t != "all-linear" && !TARGETS.contains(&t.as_str()))
                {
                    return Err(option_error(
                        option,
                        format!(
                            "holds the unknown module \"{bad}\"; choose from {}, or all-linear",
                            TARGETS.join(", ")
                        ),
                    ));
                }
                if list.is_empty() {
                    return Err(option_error(option, "is empty; choose at least one module"));
                }
                s.targets = list;
            }
            "rslora" => s.rslora = flag(&v)?,
            "lr" => s.lr = positive(number(option, &v)?)? as f32,
            "schedule" => {
                s.schedule = match v.as_string().as_deref() {
                    Some("cosine") => "cosine",
                    Some("linear") => "linear",
                    Some("constant") => "constant",
                    _ => {
                        return Err(option_error(
                            option,
                            format!(
                                "is {}; use \"cosine\", \"linear\" or \"constant\"",
                                describe(&v)
                            ),
                        ));
                    }
                }
            }
            "warmup" => s.warmup = whole(option, &v, 0.0)? as usize,
            "weightDecay" => {
                let x = number(option, &v)?;
                if x < 0.0 {
                    return Err(option_error(
                        option,
                        format!("is {x}; it must be 0 or more"),
                    ));
                }
                s.weight_decay = x as f32;
            }
            "maxGradNorm" => {
                let x = number(option, &v)?;
                if x < 0.0 {
                    return Err(option_error(
                        option,
                        format!("is {x}; it must be positive (0 or null: no clipping)"),
                    ));
                }
                s.max_grad_norm = (x > 0.0).then_some(x as f32);
            }
            "steps" => s.steps = Some(whole(option, &v, 1.0)? as usize),
            "epochs" => s.epochs = Some(positive(number(option, &v)?)?),
            "batch" => s.batch = whole(option, &v, 1.0)? as usize,
            "evalEvery" => s.eval_every = whole(option, &v, 0.0)? as usize,
            "context" => {
                let c = whole(option, &v, 2.0)? as usize;
                if c > model.max_position_embeddings {
                    return Err(option_error(
                        option,
                        format!(
                            "is {c}; the model's context is {} positions",
                            model.max_position_embeddings
                        ),
                    ));
                }
                s.context = c;
            }
            "completionOnly" => s.completion_only = flag(&v)?,
            "valFraction" => {
                let x = number(option, &v)?;
                if !(0.0..1.0).contains(&x) {
                    return Err(option_error(
                        option,
                        format!("is {x}; it must be in [0, 1)"),
                    ));
                }
                s.val_fraction = x as f32;
            }
            "seed" => s.seed = whole(option, &v, 0.0)?,
            "checkpointEvery" => {}
            _ => unreachable!("every name in OPTION_NAMES is handled"),
        }
    }
    if s.steps.is_some() && s.epochs.is_some() {
        return Err(JsError::new(
            "training options `steps` and `epochs` both given; give one of them",
        ));
    }
    s.lora_config()?; // rank, alpha, dropout and targets together, as core checks them
    Ok(s)
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
    spec: &TrainSpec,
) -> Result<(Dataset, usize), JsError> {
    let tokenizer = loaded.tokenizer.as_ref().ok_or_else(|| {
        JsError::new(
            "training needs the model's tokenizer.json: this model was loaded without one (pick tokenizer.json together with config.json and the .safetensors)",
        )
    })?;
    let core = |e: bitlora_core::Error| JsError::new(&e.to_string());
    let (examples, format) = data::parse(file, bytes).map_err(core)?;
    let dataset = data::build(
        file,
        &examples,
        format,
        tokenizer,
        loaded.chat_template.as_ref(),
        loaded.train_eos,
        &spec.data_options(),
    )
    .map_err(core)?;
    Ok((dataset, examples.len()))
}

fn summarize(
    file: &str,
    bytes: usize,
    examples: usize,
    d: &Dataset,
    spec: &TrainSpec,
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
        context: spec.context,
        steps_per_epoch: d.train.len().div_ceil(spec.batch),
        bytes,
    }
}

/// `Session.prepareData`: the data summary for `options` (DataOptions plus `batch`).
pub(crate) fn prepare_data(
    loaded: &Loaded,
    file: &str,
    bytes: &[u8],
    options: &JsValue,
) -> Result<JsValue, JsError> {
    let spec = parse_config(&loaded.model.config, options)?;
    let (dataset, examples) = build_dataset(loaded, file, bytes, &spec)?;
    if dataset.train.is_empty() {
        return Err(JsError::new(&format!(
            "{file}: every sequence went to validation; lower valFraction or give more data"
        )));
    }
    to_js(&summarize(file, bytes.len(), examples, &dataset, &spec))
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
    spec: TrainSpec,
    summary: DataSummary,
    adapter_params: usize,
    /// Bytes read back from the GPU during the current step's training sequences.
    step_read_bytes: u64,
}

/// The run's description (`info()`): the resolved config and the data.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TrainerInfo<'a> {
    config: &'a TrainSpec,
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
    ) -> Result<WebTrainer, JsError> {
        let c = &loaded.model.config;
        let mut spec = parse_config(c, config)?;
        let (dataset, examples) = build_dataset(&loaded, file, bytes, &spec)?;
        let summary = summarize(file, bytes.len(), examples, &dataset, &spec);
        let steps = spec.total_steps(dataset.train.len());
        spec.steps = Some(steps);
        let lora = Lora::init(c, spec.lora_config()?, spec.seed);
        let optim = AdamWConfig {
            lr: spec.lr,
            weight_decay: spec.weight_decay,
            max_grad_norm: spec.max_grad_norm,
            schedule: match spec.schedule {
                "linear" => Schedule::Linear,
                "constant" => Schedule::Constant,
                _ => Schedule::Cosine,
            },
            warmup_steps: spec.warmup,
            total_steps: steps,
            ..Default::default()
        };
        let options = TrainOptions {
            steps,
            accumulation: spec.batch,
            eval_every: spec.eval_every,
            seed: spec.seed,
        };
        let adapter_params = lora.num_params();
        let backend = WebBackend::new(loaded.clone(), gpu, &lora.config, spec.context);
        let trainer = Trainer::new(backend, c, lora, optim, dataset, options)
            .map_err(|e| JsError::new(&format!("{file}: {}", js_message(e))))?;
        Ok(WebTrainer::new(Inner {
            loaded,
            trainer,
            spec,
            summary,
            adapter_params,
            step_read_bytes: 0,
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
    ) -> Result<WebTrainer, JsError> {
        let c = &loaded.model.config;
        let mut spec = parse_config(c, config)?;
        let (dataset, examples) = build_dataset(&loaded, file, bytes, &spec)?;
        let summary = summarize(file, bytes.len(), examples, &dataset, &spec);
        let cannot = |e: bitlora_core::Error| JsError::new(&format!("cannot resume this run: {e}"));
        let ckpt = Checkpoint::read(c, "checkpoint.safetensors", checkpoint).map_err(cannot)?;
        let adapter_params = Lora::init(c, ckpt.lora_config().clone(), 0).num_params();
        let backend = WebBackend::new(loaded.clone(), gpu, ckpt.lora_config(), spec.context);
        let trainer = Trainer::resume(backend, c, dataset, ckpt)
            .map_err(|e| JsError::new(&format!("cannot resume this run: {}", js_message(e))))?;
        spec.steps = Some(trainer.options.steps);
        Ok(WebTrainer::new(Inner {
            loaded,
            trainer,
            spec,
            summary,
            adapter_params,
            step_read_bytes: 0,
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
            config: &s.spec,
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
