//! PEFT adapters in and out: `adapter_model.safetensors` + `adapter_config.json` exactly as
//! PEFT's `save_pretrained` writes them, so `PeftModel.from_pretrained(base, dir)` loads what
//! bitlora trained, and bitlora continues training or generates with what PEFT trained.
//!
//! Tensor names: `base_model.model.model.layers.{l}.{self_attn|mlp}.{proj}.lora_{A|B}.weight`,
//! A (R, I), B (O, R), f32. (In memory PEFT adds the adapter name, `.lora_A.default.weight`;
//! files written by `save_pretrained` drop it. Both are read.)

use serde_json::{Value, json};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::lora::{Lora, LoraConfig, LoraPair, TARGETS};
use crate::model::projections;
use crate::weights::{OwnedTensor, WeightFiles};

/// PEFT's module path of projection `p` (TARGETS order) in layer `l`.
pub fn module_path(l: usize, p: usize) -> String {
    let block = if p < 4 { "self_attn" } else { "mlp" };
    format!("base_model.model.model.layers.{l}.{block}.{}", TARGETS[p])
}

/// The `adapter_config.json` PEFT writes for this adapter.
pub fn adapter_config_json(config: &LoraConfig, base_model: &str) -> Value {
    let targets: Vec<&str> = TARGETS
        .iter()
        .zip(config.targets)
        .filter(|(_, on)| *on)
        .map(|(n, _)| *n)
        .collect();
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": targets,
        "bias": "none",
        "use_rslora": config.use_rslora,
        "use_dora": false,
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "rank_pattern": {},
        "alpha_pattern": {},
    })
}

/// The adapter's tensors under PEFT's file names.
pub fn adapter_tensors(lora: &Lora, model: &Config) -> Vec<OwnedTensor> {
    let r = lora.config.r;
    let shapes = projections(model);
    let mut out = Vec::new();
    for (l, layer) in lora.layers.iter().enumerate() {
        for (p, pair) in layer.iter().enumerate() {
            if let Some(pair) = pair {
                let (_, o, i) = shapes[p];
                let base = module_path(l, p);
                out.push(OwnedTensor::f32(
                    format!("{base}.lora_A.weight"),
                    &[r, i],
                    &pair.a,
                ));
                out.push(OwnedTensor::f32(
                    format!("{base}.lora_B.weight"),
                    &[o, r],
                    &pair.b,
                ));
            }
        }
    }
    out
}

/// Reads `adapter_config.json`; rejects what bitlora cannot reproduce exactly.
pub fn read_adapter_config(file: &str, json: &[u8]) -> Result<LoraConfig> {
    let v: Value = serde_json::from_slice(json).map_err(|e| Error::Json {
        file: file.to_string(),
        msg: e.to_string(),
    })?;
    let bad = |msg: String| Error::Lora {
        msg: format!("{file}: {msg}"),
    };
    if v.get("peft_type")
        .and_then(Value::as_str)
        .is_some_and(|t| t != "LORA")
    {
        return Err(bad(format!(
            "peft_type is {}; only LORA adapters are supported",
            v["peft_type"]
        )));
    }
    for flag in ["use_dora", "fan_in_fan_out"] {
        if v.get(flag).and_then(Value::as_bool) == Some(true) {
            return Err(bad(format!("{flag} = true is not supported")));
        }
    }
    if v.get("bias")
        .and_then(Value::as_str)
        .is_some_and(|b| b != "none")
    {
        return Err(bad("bias must be \"none\"".into()));
    }
    // Fields that change what the adapter means: silently ignoring them would apply it wrongly.
    let set = |k: &str| match v.get(k) {
        None | Some(Value::Null) => false,
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(m)) => !m.is_empty(),
        Some(Value::String(s)) => !s.is_empty(),
        Some(_) => true,
    };
    if set("layers_to_transform") {
        return Err(bad(format!(
            "layers_to_transform = {} (an adapter on some layers only) is not supported; bitlora adapters cover every layer",
            v["layers_to_transform"]
        )));
    }
    if set("modules_to_save") {
        return Err(bad(format!(
            "modules_to_save = {} (fully trained copies of whole modules) is not supported; only LoRA's A and B are read",
            v["modules_to_save"]
        )));
    }
    for pattern in ["rank_pattern", "alpha_pattern"] {
        if v.get(pattern)
            .and_then(Value::as_object)
            .is_some_and(|m| !m.is_empty())
        {
            return Err(bad(format!(
                "{pattern} (per-module ranks) is not supported"
            )));
        }
    }
    let r = v
        .get("r")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad("field `r` is missing".into()))? as usize;
    let alpha = v
        .get("lora_alpha")
        .and_then(Value::as_f64)
        .ok_or_else(|| bad("field `lora_alpha` is missing".into()))? as f32;
    let dropout = v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0) as f32;
    let rslora = v
        .get("use_rslora")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let targets: Vec<String> = match v.get("target_modules") {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_str().map(str::to_string))
            .collect(),
        Some(Value::String(s)) => vec![s.clone()],
        _ => return Err(bad("field `target_modules` is missing".into())),
    };
    let refs: Vec<&str> = targets.iter().map(String::as_str).collect();
    LoraConfig::new(r, alpha, dropout, rslora, &refs).map_err(|e| bad(e.to_string()))
}

/// Loads a PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`).
pub fn load_dir(dir: &std::path::Path, model: &Config) -> Result<Lora> {
    let read = |name: &str| {
        let p = dir.join(name);
        std::fs::read(&p)
            .map(|b| (p.display().to_string(), b))
            .map_err(|source| Error::Io {
                path: p.display().to_string(),
                source,
            })
    };
    let (cfg_name, cfg_bytes) = read("adapter_config.json")?;
    let config = read_adapter_config(&cfg_name, &cfg_bytes)?;
    let (st_name, st_bytes) = read("adapter_model.safetensors")?;
    read_adapter(config, model, &st_name, &st_bytes)
}

/// Reads an adapter's tensors for `model`, checking every shape against the model.
pub fn read_adapter(config: LoraConfig, model: &Config, file: &str, bytes: &[u8]) -> Result<Lora> {
    let w = WeightFiles::parse(&[(file, bytes)])?;
    let r = config.r;
    let shapes = projections(model);
    let mut layers = Vec::with_capacity(model.num_hidden_layers);
    for l in 0..model.num_hidden_layers {
        let mut pairs: [Option<LoraPair>; 7] = Default::default();
        for (p, pair) in pairs.iter_mut().enumerate() {
            if !config.targets[p] {
                continue;
            }
            let (_, o, i) = shapes[p];
            let base = module_path(l, p);
            let name = |ab: &str| {
                let plain = format!("{base}.lora_{ab}.weight");
                if w.contains(&plain) {
                    plain
                } else {
                    format!("{base}.lora_{ab}.default.weight")
                }
            };
            *pair = Some(LoraPair {
                a: w.f32(&name("A"), &[r, i])?,
                b: w.f32(&name("B"), &[o, r])?,
            });
        }
        layers.push(pairs);
    }
    Ok(Lora { config, layers })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tiny_config;
    use crate::weights::serialize;

    #[test]
    fn export_then_import_is_identity_and_names_follow_peft() {
        let cfg = tiny_config();
        let lcfg = LoraConfig::new(4, 8.0, 0.05, true, &["q_proj", "v_proj", "down_proj"]).unwrap();
        let mut lora = Lora::init(&cfg, lcfg.clone(), 3);
        let mut x = 0.0;
        lora.for_each_mut(|_, _, t| {
            t.iter_mut().for_each(|v| {
                x += 0.001;
                *v += x
            })
        });
        let tensors = adapter_tensors(&lora, &cfg);
        assert_eq!(
            tensors[0].name,
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        );
        assert!(
            tensors
                .iter()
                .any(|t| t.name == "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight")
        );
        let json = adapter_config_json(&lcfg, "bitlora/tiny").to_string();
        let back_cfg = read_adapter_config("adapter_config.json", json.as_bytes()).unwrap();
        assert_eq!(back_cfg, lcfg);
        let back = read_adapter(
            back_cfg,
            &cfg,
            "adapter_model.safetensors",
            &serialize(&tensors),
        )
        .unwrap();
        assert_eq!(back, lora);
    }

    #[test]
    fn mismatched_or_unsupported_adapters_are_named() {
        let cfg = tiny_config();
        let lcfg = LoraConfig::new(4, 8.0, 0.0, false, &["q_proj"]).unwrap();
        let tensors = adapter_tensors(&Lora::init(&cfg, lcfg, 1), &cfg);
        // The adapter was made for hidden size 64; a model with 32 does not fit it.
        let mut small = cfg.clone();
        small.hidden_size = 32;
        small.head_dim = 8;
        let e = read_adapter(
            LoraConfig::new(4, 8.0, 0.0, false, &["q_proj"]).unwrap(),
            &small,
            "a.safetensors",
            &serialize(&tensors),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("has shape [4, 64], expected [4, 32]"),
            "{e}"
        );
        for (field, value) in [
            ("layers_to_transform", "[0, 1]"),
            ("layers_to_transform", "3"),
            ("modules_to_save", "[\"lm_head\"]"),
        ] {
            let json = format!(
                r#"{{"peft_type":"LORA","r":4,"lora_alpha":8,"target_modules":["q_proj"],"{field}":{value}}}"#
            );
            let e = read_adapter_config("c.json", json.as_bytes()).unwrap_err();
            assert!(e.to_string().contains(&format!("{field} = ")), "{e}");
        }
        // null and empty mean "not used", as PEFT writes them.
        read_adapter_config(
            "c.json",
            br#"{"r":4,"lora_alpha":8,"target_modules":["q_proj"],"layers_to_transform":null,"modules_to_save":[]}"#,
        )
        .unwrap();
        let e = read_adapter_config("c.json", br#"{"peft_type":"LORA","r":4,"lora_alpha":8,"target_modules":["q_proj"],"use_dora":true}"#).unwrap_err();
        assert!(e.to_string().contains("use_dora"), "{e}");
        let e = read_adapter_config(
            "c.json",
            br#"{"r":4,"lora_alpha":8,"target_modules":["wq"]}"#,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("unknown target module \"wq\""),
            "{e}"
        );
    }
}
