//! Errors into JavaScript as objects, not strings to parse: an `Error` whose `message` is the
//! text and, where they apply, `field` (the option at fault, as the JS API names it: `rank`,
//! `weightDecay`) and `line` (the JSONL line of the data, 1-based). The worker forwards both
//! properties in its replies and web/bitlora.js puts them back on the `Error` it rejects with.

use bitlora_core::{ConfigError, Error};
use wasm_bindgen::prelude::*;

/// `new Error(message)` with `field` and `line` set where given.
pub(crate) fn js_error(message: &str, field: Option<&str>, line: Option<usize>) -> JsValue {
    let err = js_sys::Error::new(message);
    // Setting a property on a fresh Error cannot fail; if it did, the message still gets through.
    if let Some(f) = field {
        let _ = js_sys::Reflect::set(&err, &"field".into(), &f.into());
    }
    if let Some(l) = line {
        let _ = js_sys::Reflect::set(&err, &"line".into(), &JsValue::from_f64(l as f64));
    }
    err.into()
}

/// A training option's error, with its `field`.
pub(crate) fn config_error(e: &ConfigError) -> JsValue {
    js_error(&e.message, e.field.as_deref(), None)
}

/// One of core's errors: a data file's line as `line`, a sampling option as `field`.
pub(crate) fn core_error(e: &Error) -> JsValue {
    let (field, line) = match e {
        Error::DataLine { line, .. } => (None, Some(*line)),
        Error::Sampling { option, .. } => (Some(*option), None),
        _ => (None, None),
    };
    js_error(&e.to_string(), field, line)
}
