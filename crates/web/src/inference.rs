//! Inference on the loaded model: `forward` (logits and the most likely next tokens) and
//! `generate` (tokens streamed to a callback), on the GPU when the model is there, else on the
//! CPU. The prompt and sampling options are parsed in `generate.rs`.

use serde::Serialize;
use wasm_bindgen::prelude::*;

#[cfg(feature = "gpu")]
use crate::gpu_slot::use_gpu_adapter;
use crate::{Loaded, LoraAdapter, Session, generate, now_ms, to_js};

/// How many of the most likely next tokens `forward` reports.
const TOP_K: usize = 10;

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

#[wasm_bindgen]
impl Session {
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

impl Session {
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
