//! Text <-> token ids through Hugging Face's `tokenizers` library (the one transformers uses),
//! from a model's `tokenizer.json`, plus its chat template from `tokenizer_config.json` (or a
//! .gguf's `tokenizer.chat_template`, [`crate::gguf::Gguf::chat_template`]).
//!
//! Special tokens (BOS) are added by the tokenizer's own post-processor, as in transformers'
//! `tokenizer(text)`; `encode(text, false)` gives the bare ids. Streaming output goes through
//! [`TextStream`], which only emits text once the bytes of a character are complete.

use serde::Serialize;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::template_limits;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    file: String,
    /// Whether a long text may be encoded piece by piece, cut after a lone newline
    /// ([`Tokenizer::encode_long`]): no normalizer, a pre-tokenizer of regex splits and byte
    /// level (GPT-2, LLaMA 3, bitlora's own) whose pieces never span such a cut, a BPE model,
    /// and special tokens added only in front.
    splits_at_newlines: bool,
}

/// Every TemplateProcessing in a post-processor (as JSON; Sequence ones nest them) names only
/// special tokens it defines, each with as many ids as tokens.
fn check_templates(v: &serde_json::Value) -> std::result::Result<(), String> {
    use serde_json::Value;
    match v {
        Value::Object(o) => {
            if o.get("type").and_then(Value::as_str) == Some("TemplateProcessing") {
                let specials = o.get("special_tokens").and_then(Value::as_object);
                let pieces = ["single", "pair"]
                    .into_iter()
                    .filter_map(|k| o.get(k)?.as_array())
                    .flatten();
                for piece in pieces {
                    let Some(id) = piece.pointer("/SpecialToken/id").and_then(Value::as_str) else {
                        continue;
                    };
                    let Some(t) = specials.and_then(|s| s.get(id)) else {
                        return Err(format!(
                            "a template uses special token \"{id}\", which special_tokens lacks"
                        ));
                    };
                    let len = |k: &str| t.get(k).and_then(Value::as_array).map(Vec::len);
                    if len("ids") != len("tokens") {
                        return Err(format!(
                            "special token \"{id}\" has not as many ids as tokens"
                        ));
                    }
                }
            }
            o.values().try_for_each(check_templates)
        }
        Value::Array(a) => a.iter().try_for_each(check_templates),
        _ => Ok(()),
    }
}

/// Any JSON value, checked as `serde_json` checks it when deserializing strings (UTF-8,
/// escapes), without building it.
struct ValidJson;

impl<'de> serde::Deserialize<'de> for ValidJson {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(ValidJson)
    }
}

impl<'de> serde::de::Visitor<'de> for ValidJson {
    type Value = ValidJson;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> std::result::Result<ValidJson, E> {
        Ok(ValidJson)
    }
    fn visit_i64<E>(self, _: i64) -> std::result::Result<ValidJson, E> {
        Ok(ValidJson)
    }
    fn visit_u64<E>(self, _: u64) -> std::result::Result<ValidJson, E> {
        Ok(ValidJson)
    }
    fn visit_f64<E>(self, _: f64) -> std::result::Result<ValidJson, E> {
        Ok(ValidJson)
    }
    fn visit_str<E>(self, _: &str) -> std::result::Result<ValidJson, E> {
        Ok(ValidJson)
    }
    fn visit_unit<E>(self) -> std::result::Result<ValidJson, E> {
        Ok(ValidJson)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> std::result::Result<ValidJson, A::Error> {
        while seq.next_element::<ValidJson>()?.is_some() {}
        Ok(ValidJson)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<ValidJson, A::Error> {
        while map.next_entry::<ValidJson, ValidJson>()?.is_some() {}
        Ok(ValidJson)
    }
}

/// The first cut at or after byte `from`: just after a `\n` that a non-space precedes and a
/// non-space follows (None: no such newline).
fn lone_newline_after(text: &str, from: usize) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut p = from.max(2);
    while p < bytes.len() {
        let q = p + bytes[p..].iter().position(|&b| b == b'\n')? + 1; // just after a newline
        let before = text[..q - 1].chars().next_back();
        let after = text.get(q..).and_then(|s| s.chars().next());
        if before.is_some_and(|c| !c.is_whitespace()) && after.is_some_and(|c| !c.is_whitespace()) {
            return Some(q);
        }
        p = q;
    }
    None
}

impl Tokenizer {
    /// Parses a `tokenizer.json`; `file` names it in errors.
    pub fn from_bytes(file: &str, json: &[u8]) -> Result<Tokenizer> {
        // tokenizers 0.22 panics ("Helper") on a syntax error or invalid UTF-8 inside the
        // `decoder` object instead of returning it (found by fuzz/'s tokenizer target): check
        // the whole file first.
        serde_json::from_slice::<ValidJson>(json).map_err(|e| Error::Tokenizer {
            file: file.to_string(),
            msg: format!("not a tokenizers JSON file: {e}"),
        })?;
        let inner = tokenizers::Tokenizer::from_bytes(json).map_err(|e| Error::Tokenizer {
            file: file.to_string(),
            msg: format!("not a tokenizers JSON file: {e}"),
        })?;
        // Nor does it check, when reading a TemplateProcessing post-processor, that the special
        // tokens its templates name exist: encoding then panics (fuzz/ again).
        if let Some(pp) = inner.get_post_processor() {
            let pp = serde_json::to_value(pp).map_err(|e| Error::Tokenizer {
                file: file.to_string(),
                msg: e.to_string(),
            })?;
            check_templates(&pp).map_err(|msg| Error::Tokenizer {
                file: file.to_string(),
                msg: format!("post_processor: {msg}"),
            })?;
        }
        let mut t = Tokenizer {
            inner,
            file: file.to_string(),
            splits_at_newlines: false,
        };
        t.splits_at_newlines = t.pieces_split_at_newlines();
        Ok(t)
    }

    /// See `splits_at_newlines`.
    fn pieces_split_at_newlines(&self) -> bool {
        use serde_json::Value;
        let json = |v: Option<Value>| v.unwrap_or(Value::Null);
        let normalizer = json(
            self.inner
                .get_normalizer()
                .and_then(|n| serde_json::to_value(n).ok()),
        );
        let pre = json(
            self.inner
                .get_pre_tokenizer()
                .and_then(|p| serde_json::to_value(p).ok()),
        );
        let kind = |v: &Value| v.get("type").and_then(Value::as_str).map(str::to_string);
        let parts: Vec<Value> = match kind(&pre).as_deref() {
            Some("Sequence") => pre
                .get("pretokenizers")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default(),
            Some(_) => vec![pre.clone()],
            None => return false,
        };
        // Byte level with its regex (or after a regex Split), digits apart: every piece of
        // such a pre-tokenizer ends at a newline that a non-space follows.
        let byte_level = parts.iter().any(|p| {
            kind(p).as_deref() == Some("ByteLevel")
                && (p.get("use_regex").and_then(Value::as_bool) != Some(false)
                    || parts.iter().any(|q| kind(q).as_deref() == Some("Split")))
                && p.get("add_prefix_space").and_then(Value::as_bool) != Some(true)
        });
        let known = parts
            .iter()
            .all(|p| matches!(kind(p).as_deref(), Some("ByteLevel" | "Digits" | "Split")));
        let bpe = serde_json::to_value(self.inner.get_model())
            .ok()
            .and_then(|m| kind(&m))
            .as_deref()
            == Some("BPE");
        // Special tokens only in front (a BOS), none after the text.
        let (with, without) = (self.encode("a\nb", true), self.encode("a\nb", false));
        let front_only = matches!((with, without), (Ok(w), Ok(o)) if w.ends_with(&o));
        normalizer.is_null() && byte_level && known && bpe && front_only
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text`; with `add_special_tokens` the post-processor adds BOS etc.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| self.err(e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// [`Tokenizer::encode`] of a long text in bounded memory: `tokenizers` keeps ~100 bytes
    /// per byte of text while it encodes (alignments, offsets, token strings), so a 30 MB
    /// file would not fit the page's 4 GiB. Where the tokenizer's pieces never span a lone
    /// newline between two non-spaces (`splits_at_newlines`), the text is encoded 64 KiB at a
    /// time, cut after such a newline: the same ids (tests compare them); otherwise whole.
    pub fn encode_long(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        self.encode_in_pieces(text, add_special_tokens, 1 << 16)
    }

    /// Whether [`Tokenizer::encode_long`] encodes in pieces (else whole).
    pub fn encodes_in_pieces(&self) -> bool {
        self.splits_at_newlines
    }

    /// [`Tokenizer::encode_long`] with pieces of about `piece` bytes (tests use small ones).
    pub fn encode_in_pieces(
        &self,
        text: &str,
        add_special_tokens: bool,
        piece: usize,
    ) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        let mut start = 0;
        loop {
            let end = self
                .piece_end(&text[start..], piece)
                .map_or(text.len(), |e| start + e);
            ids.extend(self.encode(&text[start..end], add_special_tokens && start == 0)?);
            start = end;
            if start >= text.len() {
                return Ok(ids);
            }
        }
    }

    /// Where [`Tokenizer::encode_in_pieces`] ends the piece that starts `text`: just after the
    /// first lone newline past `piece` bytes, or None (encode all of `text` as one piece; also
    /// for a tokenizer that does not split). Decided by the bytes up to the character after
    /// that newline, so a reader can call it on a growing buffer of text and cut where a whole
    /// encode would.
    pub fn piece_end(&self, text: &str, piece: usize) -> Option<usize> {
        if !self.splits_at_newlines || text.len() <= piece {
            return None;
        }
        lone_newline_after(text, piece.max(1))
    }

    /// Token ids with each token's byte span in `text` (special tokens added by the
    /// post-processor get an empty span).
    pub fn encode_with_offsets(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<Vec<(u32, (usize, usize))>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| self.err(e))?;
        Ok(enc
            .get_ids()
            .iter()
            .copied()
            .zip(enc.get_offsets().iter().copied())
            .collect())
    }

    /// Text of `ids`, special tokens included unless `skip_special_tokens`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| self.err(e))
    }

    /// The id of a token given as text (e.g. "<|eot_id|>").
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    fn err(&self, e: tokenizers::Error) -> Error {
        Error::Tokenizer {
            file: self.file.clone(),
            msg: e.to_string(),
        }
    }
}

/// tokenizer_config.json's `eos_token` (a string, or `{ content }`), if it names one.
pub fn eos_token_text(tokenizer_config: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(tokenizer_config).ok()?;
    match &v["eos_token"] {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// The end-of-text token training data gets between documents and after completions: the
/// tokenizer's own (`eos_text`, from [`eos_token_text`]) when the tokenizer knows it, else the
/// model config's first eos_token_id, else 0. The CLI and the page both ask this.
pub fn training_eos(eos_text: Option<&str>, tokenizer: Option<&Tokenizer>, model: &Config) -> u32 {
    eos_text
        .and_then(|t| tokenizer?.token_to_id(t))
        .or_else(|| model.eos_token_ids.first().copied())
        .unwrap_or(0)
}

/// Turns a stream of token ids into a stream of text pieces. Decoding token by token breaks
/// multi-byte characters and drops the spaces some tokenizers add between tokens, so each step
/// decodes everything so far and emits only the new, complete suffix.
pub struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    emitted: usize, // bytes of the decoded text already emitted
}

impl<'a> TextStream<'a> {
    pub fn new(tokenizer: &'a Tokenizer) -> TextStream<'a> {
        TextStream {
            tokenizer,
            ids: Vec::new(),
            emitted: 0,
        }
    }

    /// Adds one token; returns the text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids, true)?;
        // An unfinished UTF-8 sequence decodes to U+FFFD: wait for the next token.
        if text.ends_with('\u{FFFD}')
            || text.len() <= self.emitted
            || !text.is_char_boundary(self.emitted)
        {
            return Ok(None);
        }
        let piece = text[self.emitted..].to_string();
        self.emitted = text.len();
        Ok(Some(piece))
    }
}

fn parse_tokenizer_config(file: &str, json: &[u8]) -> Result<serde_json::Value> {
    serde_json::from_slice(json).map_err(|e| Error::Json {
        file: file.to_string(),
        msg: e.to_string(),
    })
}

/// `chat_template` of a parsed tokenizer_config.json: a string, or a list of named templates
/// of which transformers takes "default".
fn template_source(file: &str, v: &serde_json::Value) -> Result<Option<String>> {
    match v.get("chat_template") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template")?.as_str())
            .map(|s| Some(s.to_string()))
            .ok_or_else(|| Error::Json {
                file: file.to_string(),
                msg: "chat_template list has no \"default\" entry".into(),
            }),
        Some(_) => Err(Error::Json {
            file: file.to_string(),
            msg: "chat_template is not a string".into(),
        }),
    }
}

/// Instructions one rendering of a chat template may run (minijinja's fuel).
pub const CHAT_TEMPLATE_FUEL: u64 = 1_000_000;

/// One chat turn, as in transformers' `apply_chat_template(messages)`.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// A model's chat template (Jinja, from `tokenizer_config.json` or a .gguf's
/// `tokenizer.chat_template`), rendered as transformers does:
/// `trim_blocks` and `lstrip_blocks` on, `bos_token` / `eos_token` and `add_generation_prompt`
/// in scope, `raise_exception(msg)` available.
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
    file: String,
}

impl ChatTemplate {
    /// Reads the template from a `tokenizer_config.json`; `Ok(None)` when it has none (a base
    /// model: prompts are used as they are).
    pub fn from_tokenizer_config(file: &str, json: &[u8]) -> Result<Option<ChatTemplate>> {
        let v = parse_tokenizer_config(file, json)?;
        let token = |key: &str| -> String {
            match v.get(key) {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(serde_json::Value::Object(o)) => o
                    .get("content")
                    .and_then(|c| c.as_str())
                    .unwrap_or("")
                    .to_string(),
                _ => String::new(),
            }
        };
        match template_source(file, &v)? {
            None => Ok(None),
            Some(source) => {
                ChatTemplate::new(file, source, token("bos_token"), token("eos_token")).map(Some)
            }
        }
    }

    /// The template source of a `tokenizer_config.json` (`chat_template`, or the "default" one
    /// of a list), unparsed: what a GGUF export writes as `tokenizer.chat_template`, as
    /// llama.cpp's `convert_hf_to_gguf.py` does.
    pub fn source_in_tokenizer_config(file: &str, json: &[u8]) -> Result<Option<String>> {
        template_source(file, &parse_tokenizer_config(file, json)?)
    }

    /// A template from its Jinja `source`, with the texts of the BOS and EOS tokens it may
    /// use; `file` names it in errors. A template that does not parse is an
    /// [`Error::ChatTemplate`] now, not at the first render.
    pub fn new(
        file: &str,
        source: String,
        bos_token: String,
        eos_token: String,
    ) -> Result<ChatTemplate> {
        let t = ChatTemplate {
            source,
            bos_token,
            eos_token,
            file: file.to_string(),
        };
        t.env(&template_limits::Meter::new(0))?; // fail now on a template that does not parse
        Ok(t)
    }

    /// The Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The texts `bos_token` and `eos_token` have in the template.
    pub fn special_tokens(&self) -> (&str, &str) {
        (&self.bos_token, &self.eos_token)
    }

    fn env(
        &self,
        meter: &std::sync::Arc<template_limits::Meter>,
    ) -> Result<minijinja::Environment<'_>> {
        let mut env = minijinja::Environment::new();
        // A template is a model's file, so untrusted: its loops are bounded by fuel (real chat
        // templates spend a few thousand units on a long conversation; a nested
        // range(100000) loop once hung the CLI and the page), the bytes it builds by a budget
        // (template_limits: 40 string doublings once took 6.3 GB).
        env.set_fuel(Some(CHAT_TEMPLATE_FUEL));
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        template_limits::install(&mut env, meter);
        template_limits::check_constants(&self.source).map_err(|e| self.err(e))?;
        env.add_function(
            "raise_exception",
            |msg: minijinja::Value| -> std::result::Result<String, minijinja::Error> {
                // The message is the template's: a short one (it may be any value).
                let msg = match msg.as_str() {
                    Some(s) => s.chars().take(500).collect::<String>(),
                    None => format!("({})", msg.kind()),
                };
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", &self.source)
            .map_err(|e| self.err(e))?;
        Ok(env)
    }

    fn err(&self, e: minijinja::Error) -> Error {
        Error::ChatTemplate {
            file: self.file.clone(),
            msg: e.to_string(),
        }
    }

    /// The prompt text for `messages`; with `add_generation_prompt`, ends where the assistant's
    /// reply begins.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        use minijinja::machinery;
        let input: usize = messages
            .iter()
            .map(|m| m.role.len() + m.content.len())
            .sum::<usize>()
            + self.bos_token.len()
            + self.eos_token.len();
        let meter = template_limits::Meter::new(
            template_limits::BUDGET_BASE
                .saturating_add(input.saturating_mul(template_limits::BUDGET_PER_INPUT_BYTE)),
        );
        let env = self.env(&meter)?;
        let tmpl = env.get_template("chat").map_err(|e| self.err(e))?;
        // minijinja's own render (Template::render) runs exactly this Vm::eval, on the
        // instructions before the checks were inserted.
        let compiled = machinery::get_compiled_template(&tmpl);
        let instructions = template_limits::metered(&compiled.instructions);
        let blocks = compiled
            .blocks
            .iter()
            .map(|(name, b)| (*name, template_limits::metered(b)))
            .collect();
        let root = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        };
        let mut text = String::new();
        machinery::Vm::new(&env)
            .eval(
                &instructions,
                root,
                &blocks,
                &mut machinery::make_string_output(&mut text),
                compiled.initial_auto_escape,
            )
            .map_err(|e| self.err(e))?;
        Ok(text)
    }
}
