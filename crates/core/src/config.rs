//! `Config`: the model hyper-parameters, read from a Hugging Face `config.json`.
//!
//! Field names follow transformers' `BitNetConfig` (transformers >= 5), e.g. for
//! microsoft/bitnet-b1.58-2B-4T: hidden_size 2560, intermediate_size 6912, num_hidden_layers 30,
//! num_attention_heads 20, num_key_value_heads 5, vocab_size 128256, hidden_act "relu2",
//! rms_norm_eps 1e-5, rope_theta 500000, tie_word_embeddings true.
//! Fields are read one by one (not with a serde derive) so an error names the exact field.

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// The gated FFN's activation: `down(act(gate(x)) * up(x))`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `relu(x)^2`, transformers' ACT2FN["relu2"]: BitNet b1.58 2B-4T.
    Relu2,
    /// `x * sigmoid(x)`: the 1bitLLM checkpoints (LLaMA-style).
    Silu,
}

/// How the stored BitLinear weights are to be read (`quantization_config.linear_class`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightFormat {
    /// Full-precision master weights (f32/bf16/f16), quantized to ternary at load.
    Master,
    /// Packed u8 `weight` [out/4, in] with `weight_scale`; W = T / weight_scale.
    PackedBitLinear,
    /// Packed u8 `weight` [out/4, in] with `weight_scale`; W = T * weight_scale.
    PackedAutoBitLinear,
}

/// Which family of checkpoints the tensors follow: the same maths, different names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// transformers' BitNet (model_type "bitnet"), e.g. microsoft/bitnet-b1.58-2B-4T.
    BitNet,
    /// The 1bitLLM reproductions (model_type "llama", architectures ["BitnetForCausalLM"]):
    /// sub-norms named `inner_attn_ln` / `ffn_layernorm`, fp16 latent weights quantized on the fly.
    OneBitLlm,
}

impl Layout {
    /// Tensor name (after `model.layers.N.`, before `.weight`) of the norm before o_proj.
    pub fn attn_sub_norm(self) -> &'static str {
        match self {
            Layout::BitNet => "self_attn.attn_sub_norm",
            Layout::OneBitLlm => "self_attn.inner_attn_ln",
        }
    }

    /// Tensor name of the norm before down_proj.
    pub fn ffn_sub_norm(self) -> &'static str {
        match self {
            Layout::BitNet => "mlp.ffn_sub_norm",
            Layout::OneBitLlm => "mlp.ffn_layernorm",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub vocab_size: usize,              // V
    pub hidden_size: usize,             // C
    pub intermediate_size: usize,       // F
    pub num_hidden_layers: usize,       // L
    pub num_attention_heads: usize,     // NH
    pub num_key_value_heads: usize,     // NKV
    pub head_dim: usize,                // HS
    pub max_position_embeddings: usize, // longest sequence
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub hidden_act: Activation,
    pub tie_word_embeddings: bool,
    pub weight_format: WeightFormat,
    pub layout: Layout,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl Config {
    /// Parses a `config.json`; `file` is the name used in error messages.
    pub fn from_json(file: &str, bytes: &[u8]) -> Result<Config> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| Error::Json {
            file: file.to_string(),
            msg: e.to_string(),
        })?;
        let Value::Object(obj) = value else {
            return Err(Error::Json {
                file: file.to_string(),
                msg: "the top level is not an object".into(),
            });
        };
        let f = Fields { file, obj: &obj };

        let model_type = f.string("model_type")?;
        let is_bitnet_arch = obj
            .get("architectures")
            .and_then(Value::as_array)
            .is_some_and(|a| a.iter().any(|x| x.as_str() == Some("BitnetForCausalLM")));
        let layout = match model_type.as_str() {
            "bitnet" => Layout::BitNet,
            "llama" if is_bitnet_arch => Layout::OneBitLlm,
            _ => {
                return Err(Error::UnsupportedModelType {
                    file: file.to_string(),
                    model_type,
                });
            }
        };

        let hidden_size = f.positive("hidden_size")?;
        let num_attention_heads = f.positive("num_attention_heads")?;
        let num_key_value_heads = match obj.get("num_key_value_heads") {
            None | Some(Value::Null) => num_attention_heads,
            Some(_) => f.positive("num_key_value_heads")?,
        };
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(f.bad(
                "num_key_value_heads",
                format!("({num_key_value_heads}) must divide num_attention_heads ({num_attention_heads})"),
            ));
        }
        let head_dim = match obj.get("head_dim") {
            None | Some(Value::Null) => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(f.bad(
                        "num_attention_heads",
                        format!("({num_attention_heads}) must divide hidden_size ({hidden_size}) when head_dim is absent"),
                    ));
                }
                hidden_size / num_attention_heads
            }
            Some(_) => f.positive("head_dim")?,
        };
        if head_dim % 2 != 0 {
            return Err(f.bad("head_dim", format!("({head_dim}) must be even for RoPE")));
        }

        let hidden_act = match f.string("hidden_act")?.as_str() {
            "relu2" => Activation::Relu2,
            "silu" | "swish" => Activation::Silu,
            other => {
                return Err(f.bad(
                    "hidden_act",
                    format!("is \"{other}\"; supported: \"relu2\", \"silu\""),
                ));
            }
        };

        Ok(Config {
            vocab_size: f.positive("vocab_size")?,
            hidden_size,
            intermediate_size: f.positive("intermediate_size")?,
            num_hidden_layers: f.positive("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings: f.positive("max_position_embeddings")?,
            rms_norm_eps: f.number("rms_norm_eps")? as f32,
            rope_theta: f.rope_theta()? as f32,
            hidden_act,
            tie_word_embeddings: f.optional_bool("tie_word_embeddings")?.unwrap_or(true),
            // 1bitLLM checkpoints hold fp16 latent weights and no quantization_config: their
            // BitLinear quantizes on every call, which is our Master format.
            weight_format: match layout {
                Layout::BitNet => f.weight_format()?,
                Layout::OneBitLlm => WeightFormat::Master,
            },
            layout,
            bos_token_id: f.optional_u32("bos_token_id")?,
            eos_token_ids: f.eos_token_ids()?,
        })
    }

    /// Checks token ids against the vocabulary and the context length (every backend calls
    /// this, so they all reject the same inputs with the same errors).
    pub fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        if tokens.is_empty() {
            return Err(Error::NoTokens);
        }
        if tokens.len() > self.max_position_embeddings {
            return Err(Error::TooManyTokens {
                count: tokens.len(),
                max: self.max_position_embeddings,
            });
        }
        let vocab = self.vocab_size;
        match tokens.iter().position(|&t| t as usize >= vocab) {
            Some(position) => Err(Error::TokenOutOfRange {
                token: tokens[position],
                position,
                vocab,
            }),
            None => Ok(()),
        }
    }

    /// Query width NH*HS.
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Key/value width NKV*HS.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Serializes back to an HF-style `config.json` (used when writing models).
    pub fn to_json(&self) -> Value {
        // f32 -> the shortest decimal that reads back as the same f32 (1e-5, not 9.99999974e-6).
        let f = |x: f32| -> f64 {
            x.to_string()
                .parse()
                .expect("an f32's Display parses as f64")
        };
        let mut v = serde_json::json!({
            "architectures": [if self.layout == Layout::BitNet { "BitNetForCausalLM" } else { "BitnetForCausalLM" }],
            "model_type": if self.layout == Layout::BitNet { "bitnet" } else { "llama" },
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": f(self.rms_norm_eps),
            "rope_theta": f(self.rope_theta),
            "hidden_act": match self.hidden_act { Activation::Relu2 => "relu2", Activation::Silu => "silu" },
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": false,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids.first(),
        });
        // Master weights are written as transformers' "online" mode (AutoBitLinear quantizing
        // on the fly, as microsoft/bitnet-b1.58-2B-4T-bf16 does): without a
        // quantization_config transformers would run the projections unquantized.
        if self.layout == Layout::OneBitLlm {
            v["input_bits"] = 8.into();
            v["weight_bits"] = 1.into();
            return v;
        }
        let (linear_class, mode) = match self.weight_format {
            WeightFormat::Master => ("autobitlinear", "online"),
            WeightFormat::PackedBitLinear => ("bitlinear", "offline"),
            WeightFormat::PackedAutoBitLinear => ("autobitlinear", "offline"),
        };
        v["quantization_config"] = serde_json::json!({
            "quant_method": "bitnet", "linear_class": linear_class, "quantization_mode": mode
        });
        v
    }
}

/// Typed access to the fields of one JSON object, with errors that name the file and field.
struct Fields<'a> {
    file: &'a str,
    obj: &'a Map<String, Value>,
}

impl Fields<'_> {
    fn bad(&self, field: &'static str, problem: String) -> Error {
        Error::ConfigField {
            file: self.file.to_string(),
            field,
            problem,
        }
    }

    fn get(&self, field: &'static str) -> Result<&Value> {
        match self.obj.get(field) {
            None | Some(Value::Null) => Err(self.bad(field, "is missing".into())),
            Some(v) => Ok(v),
        }
    }

    fn string(&self, field: &'static str) -> Result<String> {
        match self.get(field)? {
            Value::String(s) => Ok(s.clone()),
            other => Err(self.bad(field, format!("should be a string, found {other}"))),
        }
    }

    fn number(&self, field: &'static str) -> Result<f64> {
        match self.get(field)? {
            Value::Number(n) => n
                .as_f64()
                .filter(|x| x.is_finite() && *x > 0.0)
                .ok_or_else(|| self.bad(field, format!("should be a positive number, found {n}"))),
            other => Err(self.bad(field, format!("should be a number, found {other}"))),
        }
    }

    fn positive(&self, field: &'static str) -> Result<usize> {
        match self.get(field)? {
            Value::Number(n) => n
                .as_u64()
                .filter(|&x| x > 0 && x <= u32::MAX as u64)
                .map(|x| x as usize)
                .ok_or_else(|| self.bad(field, format!("should be a positive integer, found {n}"))),
            other => Err(self.bad(
                field,
                format!("should be a positive integer, found {other}"),
            )),
        }
    }

    fn optional_bool(&self, field: &'static str) -> Result<Option<bool>> {
        match self.obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(self.bad(field, format!("should be true or false, found {other}"))),
        }
    }

    fn optional_u32(&self, field: &'static str) -> Result<Option<u32>> {
        match self.obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => n
                .as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .map(Some)
                .ok_or_else(|| self.bad(field, format!("should be a token id, found {n}"))),
            Some(other) => Err(self.bad(field, format!("should be a token id, found {other}"))),
        }
    }

    /// `eos_token_id` is a single id or a list of ids in HF configs.
    fn eos_token_ids(&self) -> Result<Vec<u32>> {
        match self.obj.get("eos_token_id") {
            None | Some(Value::Null) => Ok(vec![]),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_u64()
                        .and_then(|x| u32::try_from(x).ok())
                        .ok_or_else(|| {
                            self.bad("eos_token_id", format!("should hold token ids, found {v}"))
                        })
                })
                .collect(),
            Some(_) => Ok(self.optional_u32("eos_token_id")?.into_iter().collect()),
        }
    }

    /// transformers < 5 writes `rope_theta` at the top level; >= 5 may write
    /// `rope_parameters: {"rope_type": "default", "rope_theta": ...}`. Only default RoPE is
    /// supported: scaled variants (llama3, yarn, ...) are refused rather than silently ignored.
    fn rope_theta(&self) -> Result<f64> {
        for key in ["rope_parameters", "rope_scaling"] {
            if let Some(Value::Object(rp)) = self.obj.get(key) {
                if let Some(Value::String(t)) = rp.get("rope_type").or_else(|| rp.get("type"))
                    && t != "default"
                {
                    return Err(self.bad(
                        "rope_parameters",
                        format!("has rope_type \"{t}\"; only \"default\" RoPE is supported"),
                    ));
                }
                if key == "rope_parameters"
                    && let Some(theta) = rp.get("rope_theta")
                {
                    return theta.as_f64().filter(|x| *x > 0.0).ok_or_else(|| {
                        self.bad(
                            "rope_parameters",
                            format!("rope_theta should be a positive number, found {theta}"),
                        )
                    });
                }
            }
        }
        match self.obj.get("rope_theta") {
            None | Some(Value::Null) => Ok(10_000.0), // transformers' default
            Some(_) => self.number("rope_theta"),
        }
    }

    fn weight_format(&self) -> Result<WeightFormat> {
        let Some(qc) = self.obj.get("quantization_config") else {
            return Ok(WeightFormat::Master);
        };
        let Value::Object(qc) = qc else {
            return Err(self.bad("quantization_config", "should be an object".into()));
        };
        if let Some(Value::String(mode)) = qc.get("quantization_mode")
            && mode == "online"
        {
            return Ok(WeightFormat::Master);
        }
        match qc.get("linear_class").and_then(Value::as_str) {
            Some("bitlinear") => Ok(WeightFormat::PackedBitLinear),
            Some("autobitlinear") => Ok(WeightFormat::PackedAutoBitLinear),
            None => Ok(WeightFormat::PackedBitLinear), // transformers' default linear_class
            Some(other) => Err(self.bad(
                "quantization_config",
                format!(
                    "has linear_class \"{other}\"; supported: \"bitlinear\", \"autobitlinear\""
                ),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TINY: &str = r#"{"model_type":"bitnet","vocab_size":512,"hidden_size":64,
        "intermediate_size":176,"num_hidden_layers":2,"num_attention_heads":4,
        "num_key_value_heads":2,"max_position_embeddings":128,"rms_norm_eps":1e-5,
        "rope_theta":10000.0,"hidden_act":"relu2","tie_word_embeddings":true}"#;

    #[test]
    fn parses_tiny_config() {
        let c = Config::from_json("config.json", TINY.as_bytes()).unwrap();
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.kv_dim(), 32);
        assert_eq!(c.hidden_act, Activation::Relu2);
        assert_eq!(c.weight_format, WeightFormat::Master);
        let back = Config::from_json("x", c.to_json().to_string().as_bytes()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn missing_field_is_named() {
        let mut v: Value = serde_json::from_str(TINY).unwrap();
        v.as_object_mut().unwrap().remove("hidden_size");
        let e = Config::from_json("m/config.json", v.to_string().as_bytes()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "m/config.json: field `hidden_size` is missing"
        );
    }

    #[test]
    fn unsupported_model_type_is_named() {
        let s = TINY.replace("\"bitnet\"", "\"gpt2\"");
        let e = Config::from_json("config.json", s.as_bytes()).unwrap_err();
        assert!(matches!(e, Error::UnsupportedModelType { .. }), "{e}");
        assert!(e.to_string().contains("\"gpt2\""));
    }

    #[test]
    fn not_json_is_an_error() {
        let e = Config::from_json("config.json", b"\x00\x01garbage").unwrap_err();
        assert!(
            e.to_string().starts_with("config.json: not valid JSON"),
            "{e}"
        );
    }

    #[test]
    fn scaled_rope_is_refused() {
        let s = TINY.replace(
            "\"rope_theta\":10000.0",
            "\"rope_parameters\":{\"rope_type\":\"llama3\",\"rope_theta\":500000.0}",
        );
        let e = Config::from_json("config.json", s.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("llama3"), "{e}");
    }
}
