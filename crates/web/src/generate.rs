//! Generation for the page: a prompt (text through the model's tokenizer, or token ids) in,
//! tokens streamed to a JavaScript callback one by one as they are produced.
//!
//! The sampling itself is core's (`bitlora_core::generate` on the CPU, `GpuModel::generate` on
//! WebGPU, both with `SamplingOptions`); this module only turns JavaScript values into a prompt
//! and options, with errors that name the option or the prompt position at fault, and turns the
//! produced ids into the events the page shows.
//!
//! Options come as a plain object with the same names as the CLI flags and core's fields, in
//! snake_case: `{ max_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop_tokens }`,
//! every one optional (core's defaults: greedy, 64 tokens), and `adapter` (the key of an adapter
//! added to the session, or null; inference.rs reads it). Unknown names are errors, so a typo never
//! silently means "default".

use bitlora_core::{Error, Message, SamplingOptions};
use wasm_bindgen::prelude::*;

use crate::Loaded;

/// The option names `parse_options` accepts.
const OPTION_NAMES: [&str; 7] = [
    "max_tokens",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "seed",
    "stop_tokens",
];

/// End-of-turn tokens of common chat templates (LLaMA-3, ChatML, Gemma). With the chat template
/// on, whichever of them the tokenizer has ends the reply, as in `bitlora generate --chat`.
const END_OF_TURN: [&str; 3] = ["<|eot_id|>", "<|im_end|>", "<end_of_turn>"];

/// Largest integer a JavaScript number holds exactly (2^53 - 1).
const MAX_SAFE_INTEGER: f64 = 9_007_199_254_740_991.0;

pub(crate) fn sampling_error(option: &'static str, msg: String) -> JsError {
    JsError::new(&Error::Sampling { option, msg }.to_string())
}

/// A whole number in `min..=MAX_SAFE_INTEGER`, or an error naming `option`; `range` says
/// which numbers are allowed, for people.
fn whole(option: &'static str, x: f64, min: f64, range: &str) -> Result<u64, JsError> {
    if x.fract() != 0.0 || !(min..=MAX_SAFE_INTEGER).contains(&x) {
        return Err(sampling_error(
            option,
            format!("is {x}; it must be a whole number {range}"),
        ));
    }
    Ok(x as u64)
}

/// `{ max_tokens, temperature, ... }` -> core's options (stop tokens: only the ones given here;
/// the caller adds EOS). `undefined` or `null` means all defaults.
pub(crate) fn parse_options(value: &JsValue) -> Result<SamplingOptions, JsError> {
    let mut opts = SamplingOptions::default();
    if value.is_undefined() || value.is_null() {
        return Ok(opts);
    }
    if !value.is_object() || js_sys::Array::is_array(value) {
        return Err(JsError::new(
            "generate: options must be an object such as { max_tokens: 32, temperature: 0.7 }",
        ));
    }
    let object: &js_sys::Object = value.unchecked_ref();
    for key in js_sys::Object::keys(object).iter() {
        let key = key.as_string().unwrap_or_default();
        if key == "adapter" {
            continue; // which adapter to apply: Session::adapter_option reads it
        }
        let Some(&option) = OPTION_NAMES.iter().find(|&&n| n == key) else {
            return Err(JsError::new(&format!(
                "unknown sampling option `{key}`; the options are {}",
                OPTION_NAMES.join(", ")
            )));
        };
        let v = js_sys::Reflect::get(value, &JsValue::from_str(option)).unwrap_or_default();
        if v.is_undefined() || v.is_null() {
            continue; // absent: the default
        }
        if option == "stop_tokens" {
            opts.stop_tokens = token_ids(&v, |i, msg| {
                sampling_error("stop_tokens", format!("entry {i} {msg}"))
            })?;
            continue;
        }
        let x = v.as_f64().ok_or_else(|| {
            sampling_error(option, format!("must be a number, got {}", describe_js(&v)))
        })?;
        if x.is_nan() {
            return Err(sampling_error(option, "is NaN; it must be a number".into()));
        }
        match option {
            "max_tokens" => opts.max_tokens = whole(option, x, 1.0, "of at least 1")? as usize,
            "top_k" => opts.top_k = whole(option, x, 0.0, "of at least 0 (0 = off)")? as usize,
            "seed" => opts.seed = whole(option, x, 0.0, "from 0 to 2^53-1")?,
            "temperature" => opts.temperature = x as f32,
            "top_p" => opts.top_p = x as f32,
            "repetition_penalty" => opts.repetition_penalty = x as f32,
            _ => unreachable!("every name in OPTION_NAMES is handled"),
        }
    }
    // Core's own checks (temperature >= 0, top_p in (0, 1], repetition_penalty > 0), up front so
    // that nothing starts with options that cannot work.
    opts.validate().map_err(|e| JsError::new(&e.to_string()))?;
    Ok(opts)
}

/// An array (or typed array) of token ids; `err(i, msg)` builds the error for entry `i`.
fn token_ids(v: &JsValue, err: impl Fn(usize, String) -> JsError) -> Result<Vec<u32>, JsError> {
    if !(js_sys::Array::is_array(v) || v.is_instance_of::<js_sys::Uint32Array>()) {
        return Err(err(0, format!("is not in a list: got {}", describe_js(v))));
    }
    let list = js_sys::Array::from(v);
    (0..list.length())
        .map(|i| {
            let x = list.get(i);
            match x.as_f64() {
                Some(f) if f.fract() == 0.0 && (0.0..=u32::MAX as f64).contains(&f) => Ok(f as u32),
                _ => Err(err(
                    i as usize,
                    format!(
                        "is {}; token ids are whole numbers from 0 to 4294967295",
                        describe_js(&x)
                    ),
                )),
            }
        })
        .collect()
}

/// A short description of a JavaScript value for error messages.
fn describe_js(v: &JsValue) -> String {
    if let Some(s) = v.as_string() {
        format!("the string {s:?}")
    } else if let Some(b) = v.as_bool() {
        format!("{b}")
    } else if let Some(x) = v.as_f64() {
        format!("{x}")
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

/// What the model is given: the ids, and the text they came from when the tokenizer made them.
pub(crate) struct Prompt {
    pub ids: Vec<u32>,
    /// The text the tokenizer encoded (after the chat template when `chat`); None for ids.
    pub text: Option<String>,
    /// Extra stop tokens that come with the prompt's form (the chat template's end of turn).
    pub stop_tokens: Vec<u32>,
}

/// The prompt argument of `Session.generate`:
/// - a string, or `{ text, chat }`: text, encoded with the loaded tokenizer.json; with `chat`
///   it is first wrapped as one user message by the chat template of tokenizer_config.json;
/// - `{ messages: [{ role, content }, ...] }`: a conversation, rendered by the chat template
///   with the assistant's turn to come (OpenAI's and transformers' form);
/// - an array or Uint32Array of token ids, or `{ tokens }`: used as they are.
pub(crate) fn parse_prompt(loaded: &Loaded, value: &JsValue) -> Result<Prompt, JsError> {
    // Reflect.get only throws on odd objects (a throwing getter); read that as "absent".
    let get = |key: &str| js_sys::Reflect::get(value, &JsValue::from_str(key)).unwrap_or_default();
    if value.is_object() && !get("messages").is_undefined() {
        return chat_prompt(loaded, parse_messages(&get("messages"))?);
    }
    let (text, chat, tokens) = if let Some(s) = value.as_string() {
        (Some(s), false, None)
    } else if js_sys::Array::is_array(value) || value.is_instance_of::<js_sys::Uint32Array>() {
        (None, false, Some(value.clone()))
    } else if value.is_object() {
        let text = get("text");
        let tokens = get("tokens");
        let chat = get("chat").is_truthy();
        match (text.as_string(), tokens.is_undefined() || tokens.is_null()) {
            (Some(t), true) => (Some(t), chat, None),
            (None, false) if text.is_undefined() || text.is_null() => (None, chat, Some(tokens)),
            _ => {
                return Err(JsError::new(
                    "generate: the prompt must be text ({ text: \"...\" }) or token ids ({ tokens: [1, 5, 17] }), not both or neither",
                ));
            }
        }
    } else {
        return Err(JsError::new(&format!(
            "generate: the prompt must be text or a list of token ids, got {}",
            describe_js(value)
        )));
    };

    if let Some(tokens) = tokens {
        if chat {
            return Err(JsError::new(
                "generate: the chat template applies to text prompts only; give text, or turn chat off",
            ));
        }
        let ids = token_ids(&tokens, |i, msg| {
            JsError::new(&format!("prompt token at position {i} {msg}"))
        })?;
        return Ok(Prompt {
            ids,
            text: None,
            stop_tokens: Vec::new(),
        });
    }

    let text = text.unwrap_or_default();
    if chat {
        return chat_prompt(
            loaded,
            vec![Message {
                role: "user".into(),
                content: text,
            }],
        );
    }
    // A plain prompt gets the tokenizer's own BOS (as the CLI does).
    let ids = tokenizer(loaded)?
        .encode(&text, true)
        .map_err(|e| JsError::new(&e.to_string()))?;
    Ok(Prompt {
        ids,
        text: Some(text),
        stop_tokens: Vec::new(),
    })
}

fn tokenizer(loaded: &Loaded) -> Result<&bitlora_core::tokenizer::Tokenizer, JsError> {
    loaded.tokenizer.as_ref().ok_or_else(|| {
        JsError::new(
            "generate: this model was loaded without a tokenizer.json, so it only takes token ids (e.g. 1,5,17); pick tokenizer.json together with config.json and the .safetensors to use text",
        )
    })
}

/// `messages` rendered by the model's chat template with the generation prompt after them,
/// then encoded (the template writes the BOS itself); its end-of-turn token stops the reply.
fn chat_prompt(loaded: &Loaded, messages: Vec<Message>) -> Result<Prompt, JsError> {
    let tokenizer = tokenizer(loaded)?;
    let template = loaded.chat_template.as_ref().ok_or_else(|| {
        JsError::new(
            "generate: chat is on but this model has no chat template (pick its tokenizer_config.json with a chat_template, or a .gguf with tokenizer.chat_template; or turn chat off)",
        )
    })?;
    let rendered = template
        .render(&messages, true)
        .map_err(|e| JsError::new(&e.to_string()))?;
    let ids = tokenizer
        .encode(&rendered, false)
        .map_err(|e| JsError::new(&e.to_string()))?;
    Ok(Prompt {
        ids,
        text: Some(rendered),
        stop_tokens: END_OF_TURN
            .iter()
            .filter_map(|t| tokenizer.token_to_id(t))
            .collect(),
    })
}

/// The `messages` of a `{ messages }` prompt: a non-empty array of `{ role, content }` with
/// role "system", "user" or "assistant" and content a string, as OpenAI's chat API takes them.
fn parse_messages(value: &JsValue) -> Result<Vec<Message>, JsError> {
    let bad = |msg: String| JsError::new(&format!("generate: messages: {msg}"));
    if !js_sys::Array::is_array(value) {
        return Err(bad(format!(
            "must be an array of {{ role, content }}, got {}",
            describe_js(value)
        )));
    }
    let arr = js_sys::Array::from(value);
    if arr.length() == 0 {
        return Err(bad("is empty; give at least one message".into()));
    }
    let mut out = Vec::with_capacity(arr.length() as usize);
    for (i, m) in arr.iter().enumerate() {
        let field = |k: &str| js_sys::Reflect::get(&m, &JsValue::from_str(k)).ok();
        let role = field("role").and_then(|v| v.as_string());
        let content = field("content").and_then(|v| v.as_string());
        match (role, content) {
            (Some(role), Some(content))
                if ["system", "user", "assistant"].contains(&role.as_str()) =>
            {
                out.push(Message { role, content })
            }
            (Some(role), Some(_)) => {
                return Err(bad(format!(
                    "message {i} has role {role:?}; the roles are \"system\", \"user\" and \"assistant\""
                )));
            }
            _ => {
                return Err(bad(format!(
                    "message {i} must be {{ role: string, content: string }}, got {}",
                    describe_js(&m)
                )));
            }
        }
    }
    Ok(out)
}
