//! One training configuration for every front end: the CLI builds a [`TrainConfig`] from its
//! flags, the page's wasm API parses it from a JavaScript object (web/bitlora.d.ts `TrainConfig`,
//! camelCase names), and both then call the same methods to check it ([`TrainConfig::validate`])
//! and to derive what the trainer needs ([`TrainConfig::lora_config`],
//! [`TrainConfig::adamw_config`], [`TrainConfig::data_options`], [`TrainConfig::train_options`],
//! [`TrainConfig::total_steps`]).
//!
//! Parsing ([`TrainConfig::parse`]) is serde's, over a JSON value, one option at a time so that
//! every error names its option ([`ConfigError::field`]); unknown names are refused, so a typo
//! never silently means "default". `null` means the default, except for `maxGradNorm`, where
//! `null` (like 0) turns clipping off. The values serde cannot judge alone (ranges, the model's
//! context, `steps` with `epochs`) are checked by `validate`, which is the one check whoever
//! builds the config by hand (the CLI) calls too.
//!
//! `checkpointEvery` and `name` are the driver's, not the trainer's: core accepts and carries
//! them (so that the page's object passes through whole) and uses neither; the CLI's
//! `--checkpoint-every` fills the first, the page's run list reads the second.

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::config::Config;
use crate::data::DataOptions;
use crate::lora::{LoraConfig, TARGETS};
use crate::optim::{AdamWConfig, Schedule};
use crate::trainer::TrainOptions;

/// Tokens per sequence unless given (lowered to the model's context when that is shorter).
pub const DEFAULT_CONTEXT: usize = 128;

/// Validation sequences held out at most unless given (`maxValSequences`): one validation pass
/// then costs about a third of 64 training sequences (a forward pass, no backward).
pub const DEFAULT_MAX_VAL_SEQUENCES: usize = 64;

/// Largest integer a JavaScript number holds exactly (2^53 - 1): larger whole numbers from JS
/// are already rounded, so they are refused rather than silently changed.
const MAX_SAFE_INTEGER: f64 = 9_007_199_254_740_991.0;

/// A training run's options with every default filled in. Field docs give the default.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct TrainConfig {
    /// LoRA rank r (8).
    #[serde(deserialize_with = "whole::<_, _, 1>")]
    pub rank: usize,
    /// LoRA alpha (16): scale = alpha / r, or alpha / sqrt(r) with `rslora`.
    #[serde(deserialize_with = "number")]
    pub alpha: f32,
    /// Dropout on the adapter's input, in [0, 1) (0).
    #[serde(deserialize_with = "number")]
    pub dropout: f32,
    /// PEFT module names ([`TARGETS`]) or "all-linear" (["all-linear"]); one name alone may be
    /// given as a string.
    #[serde(deserialize_with = "targets")]
    pub targets: Vec<String>,
    /// Scale by alpha / sqrt(r) (false).
    #[serde(deserialize_with = "flag")]
    pub rslora: bool,
    /// Peak learning rate (2e-4).
    #[serde(deserialize_with = "number")]
    pub lr: f32,
    /// After warmup ("cosine"; "linear", "constant").
    #[serde(deserialize_with = "schedule")]
    pub schedule: Schedule,
    /// Linear warmup steps (0).
    #[serde(deserialize_with = "whole::<_, _, 0>")]
    pub warmup: usize,
    /// AdamW's decoupled weight decay (0.01).
    #[serde(deserialize_with = "number")]
    pub weight_decay: f32,
    /// Global gradient-norm clipping (1); None or 0: off.
    #[serde(deserialize_with = "grad_norm")]
    pub max_grad_norm: Option<f32>,
    /// Optimizer steps; None: from `epochs` (one epoch when neither is given).
    #[serde(deserialize_with = "optional_whole::<_, _, 1>")]
    pub steps: Option<usize>,
    /// Passes over the training sequences (exclusive with `steps`).
    #[serde(deserialize_with = "optional_number")]
    pub epochs: Option<f64>,
    /// Sequences per optimizer step: gradient accumulation (1).
    #[serde(deserialize_with = "whole::<_, _, 1>")]
    pub batch: usize,
    /// Validation loss every N steps (20; 0: only at the end).
    #[serde(deserialize_with = "whole::<_, _, 0>")]
    pub eval_every: usize,
    /// Tokens per sequence ([`DEFAULT_CONTEXT`], or the model's context when shorter).
    #[serde(deserialize_with = "whole::<_, _, 2>")]
    pub context: usize,
    /// Count the loss on completions / assistant turns only (false).
    #[serde(deserialize_with = "flag")]
    pub completion_only: bool,
    /// Share of the sequences held out for validation, in [0, 1) (0.1).
    #[serde(deserialize_with = "number")]
    pub val_fraction: f32,
    /// At most this many sequences are held out for validation (64; 0: no cap): on large data
    /// `valFraction` would otherwise make every validation pass as long as many steps. The
    /// held-out sequences are a seeded random sample, the rest are trained on.
    #[serde(deserialize_with = "whole::<_, _, 0>")]
    pub max_val_sequences: usize,
    /// Seed of the split, the data order, dropout and the adapter's init (0).
    #[serde(deserialize_with = "whole::<_, _, 0>")]
    pub seed: u64,
    /// The driver's: a checkpoint every N steps (50; 0: only at the end / on pause and stop).
    #[serde(deserialize_with = "whole::<_, _, 0>")]
    pub checkpoint_every: usize,
    /// The driver's: a name for the run (the page's run list). Not used by core.
    #[serde(deserialize_with = "text", skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// GPU training: true recomputes each layer's activations in the backward instead of
    /// keeping every layer's (less GPU memory for about one more forward pass of work a step),
    /// false keeps them; None (null): recompute where memory is short, on a device with a
    /// phone's limits. The CPU backend ignores it. The same bits either way.
    #[serde(deserialize_with = "optional_flag")]
    pub recompute: Option<bool>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: vec!["all-linear".into()],
            rslora: false,
            lr: 2e-4,
            schedule: Schedule::Cosine,
            warmup: 0,
            weight_decay: 0.01,
            max_grad_norm: Some(1.0),
            steps: None,
            epochs: None,
            batch: 1,
            eval_every: 20,
            context: DEFAULT_CONTEXT,
            completion_only: false,
            val_fraction: 0.1,
            max_val_sequences: DEFAULT_MAX_VAL_SEQUENCES,
            seed: 0,
            checkpoint_every: 50,
            name: None,
            recompute: None,
        }
    }
}

/// A training option that is not right. `message` is the whole sentence
/// ("training option `context` is 100000; the model's context is 512 positions").
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ConfigError {
    /// The option at fault, named as JavaScript and JSON name it (camelCase); None when the
    /// config as a whole is wrong (not an object, `steps` and `epochs` both given).
    pub field: Option<String>,
    /// What is wrong with the option, said after its name ("is 0; it must be a whole number of
    /// at least 1"), for front ends that name the option their own way (the CLI's `--rank`);
    /// without a field, the same as `message`.
    pub problem: String,
    pub message: String,
}

impl ConfigError {
    /// `training option `{field}` {problem}`.
    pub fn option(field: &str, problem: impl Into<String>) -> ConfigError {
        let problem = problem.into();
        ConfigError {
            field: Some(field.to_string()),
            message: format!("training option `{field}` {problem}"),
            problem,
        }
    }

    /// An error about the config as a whole.
    pub fn whole(message: impl Into<String>) -> ConfigError {
        let message = message.into();
        ConfigError {
            field: None,
            problem: message.clone(),
            message,
        }
    }
}

impl TrainConfig {
    /// Every option name [`TrainConfig::parse`] accepts, as serde spells them.
    pub const FIELDS: [&'static str; 22] = [
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
        "maxValSequences",
        "seed",
        "checkpointEvery",
        "name",
        "recompute",
    ];

    /// The defaults for `model`: [`Default`], with the context lowered to the model's when
    /// that is shorter than [`DEFAULT_CONTEXT`].
    pub fn for_model(model: &Config) -> TrainConfig {
        TrainConfig {
            context: DEFAULT_CONTEXT.min(model.max_position_embeddings),
            ..TrainConfig::default()
        }
    }

    /// `{ rank, alpha, ... }` (every option optional; `null` or no value: the default) -> a
    /// checked config for `model`. Each option is deserialized on its own, so an error names
    /// the option; then [`TrainConfig::validate`] runs.
    pub fn parse(model: &Config, value: &Value) -> Result<TrainConfig, ConfigError> {
        let object = match value {
            Value::Null => return Ok(TrainConfig::for_model(model)),
            Value::Object(o) => o,
            _ => {
                return Err(ConfigError::whole(
                    "training options must be an object such as { rank: 8, lr: 2e-4, steps: 100 }",
                ));
            }
        };
        let mut given = serde_json::Map::new();
        for (key, v) in object {
            if !Self::FIELDS.contains(&key.as_str()) {
                return Err(ConfigError {
                    field: Some(key.clone()),
                    problem: format!(
                        "is not a training option; the options are {}",
                        Self::FIELDS.join(", ")
                    ),
                    message: format!(
                        "unknown training option `{key}`; the options are {}",
                        Self::FIELDS.join(", ")
                    ),
                });
            }
            // null: the default (for maxGradNorm, whose default is to clip: off).
            if v.is_null() && key != "maxGradNorm" {
                continue;
            }
            let one = Value::Object([(key.clone(), v.clone())].into_iter().collect());
            serde_json::from_value::<TrainConfig>(one)
                .map_err(|e| ConfigError::option(key, e.to_string()))?;
            given.insert(key.clone(), v.clone());
        }
        let has_context = given.contains_key("context");
        // Every option deserialized alone above, so together they do too.
        let mut config = serde_json::from_value::<TrainConfig>(Value::Object(given))
            .map_err(|e| ConfigError::whole(format!("training options: {e}")))?;
        if !has_context {
            config.context = TrainConfig::for_model(model).context;
        }
        config.validate(model)?;
        Ok(config)
    }

    /// Every check of the values, with the option's name: ranges, the LoRA targets, the
    /// model's context, `steps` with `epochs`. Whoever builds a config (the CLI from its flags,
    /// `parse`) calls this before using it.
    pub fn validate(&self, model: &Config) -> Result<(), ConfigError> {
        // f32 or f64, shown as given (an f32's 0.001, not its f64 widening).
        fn finite<T: Into<f64> + Copy + std::fmt::Display>(
            field: &str,
            x: T,
        ) -> Result<f64, ConfigError> {
            if x.into().is_finite() {
                Ok(x.into())
            } else {
                Err(ConfigError::option(
                    field,
                    format!("is {x}; it must be a finite number"),
                ))
            }
        }
        fn positive<T: Into<f64> + Copy + std::fmt::Display>(
            field: &str,
            x: T,
        ) -> Result<(), ConfigError> {
            if finite(field, x)? > 0.0 {
                Ok(())
            } else {
                Err(ConfigError::option(
                    field,
                    format!("is {x}; it must be positive"),
                ))
            }
        }
        fn fraction(field: &str, x: f32) -> Result<(), ConfigError> {
            if (0.0..1.0).contains(&finite(field, x)?) {
                Ok(())
            } else {
                Err(ConfigError::option(
                    field,
                    format!("is {x}; it must be in [0, 1)"),
                ))
            }
        }
        let bad = ConfigError::option;
        let at_least = |field: &str, x: usize, min: usize| {
            if x < min {
                Err(bad(
                    field,
                    format!("is {x}; it must be a whole number of at least {min}"),
                ))
            } else {
                Ok(())
            }
        };
        at_least("rank", self.rank, 1)?;
        positive("alpha", self.alpha)?;
        fraction("dropout", self.dropout)?;
        if self.targets.is_empty() {
            return Err(bad(
                "targets",
                "is empty; choose at least one module".to_string(),
            ));
        }
        if let Some(t) = self
            .targets
            .iter()
            .find(|t| *t != "all-linear" && !TARGETS.contains(&t.as_str()))
        {
            return Err(bad(
                "targets",
                format!(
                    "holds the unknown target module \"{t}\"; choose from {}, or all-linear",
                    TARGETS.join(", ")
                ),
            ));
        }
        positive("lr", self.lr)?;
        if finite("weightDecay", self.weight_decay)? < 0.0 {
            return Err(bad(
                "weightDecay",
                format!("is {}; it must be 0 or more", self.weight_decay),
            ));
        }
        if let Some(x) = self.max_grad_norm
            && finite("maxGradNorm", x)? < 0.0
        {
            return Err(bad(
                "maxGradNorm",
                format!("is {x}; it must be positive (0 or null: no clipping)"),
            ));
        }
        if let Some(steps) = self.steps {
            at_least("steps", steps, 1)?;
        }
        if let Some(epochs) = self.epochs {
            positive("epochs", epochs)?;
        }
        if self.steps.is_some() && self.epochs.is_some() {
            return Err(ConfigError::whole(
                "training options `steps` and `epochs` both given; give one of them",
            ));
        }
        at_least("batch", self.batch, 1)?;
        at_least("context", self.context, 2)?;
        if self.context > model.max_position_embeddings {
            return Err(bad(
                "context",
                format!(
                    "is {}; the model's context is {} positions",
                    self.context, model.max_position_embeddings
                ),
            ));
        }
        fraction("valFraction", self.val_fraction)?;
        // rank, alpha, dropout and targets together, as core's LoRA checks them.
        let lora = self.lora_config()?;
        let max = lora.max_rank(model);
        if self.rank > max {
            return Err(bad(
                "rank",
                format!(
                    "is {}; on this model the adapted projections allow at most {max} (the smallest side of an adapted weight)",
                    self.rank
                ),
            ));
        }
        Ok(())
    }

    /// The adapter's shape (PEFT's LoraConfig).
    pub fn lora_config(&self) -> Result<LoraConfig, ConfigError> {
        let targets: Vec<&str> = self.targets.iter().map(String::as_str).collect();
        LoraConfig::new(self.rank, self.alpha, self.dropout, self.rslora, &targets)
            .map_err(|e| ConfigError::whole(e.to_string()))
    }

    /// Optimizer steps for `train_sequences` training sequences: `steps` when given, else
    /// `epochs` (default 1) passes of `batch` sequences a step, rounded up, at least one.
    pub fn total_steps(&self, train_sequences: usize) -> usize {
        self.steps.unwrap_or_else(|| {
            let epochs = self.epochs.unwrap_or(1.0);
            ((epochs * train_sequences as f64) / self.batch.max(1) as f64)
                .ceil()
                .max(1.0) as usize
        })
    }

    /// AdamW over a run of `total_steps` steps (see [`TrainConfig::total_steps`]).
    pub fn adamw_config(&self, total_steps: usize) -> AdamWConfig {
        AdamWConfig {
            lr: self.lr,
            weight_decay: self.weight_decay,
            max_grad_norm: self.max_grad_norm.filter(|&x| x > 0.0),
            schedule: self.schedule,
            warmup_steps: self.warmup,
            total_steps,
            ..AdamWConfig::default()
        }
    }

    /// How the data becomes sequences (context, loss mask, split).
    pub fn data_options(&self) -> DataOptions {
        DataOptions {
            context: self.context,
            completions_only: self.completion_only,
            val_fraction: self.val_fraction,
            max_val_sequences: self.max_val_sequences,
            seed: self.seed,
        }
    }

    /// The loop's options for a run of `total_steps` steps.
    pub fn train_options(&self, total_steps: usize) -> TrainOptions {
        TrainOptions {
            steps: total_steps,
            accumulation: self.batch,
            eval_every: self.eval_every,
            seed: self.seed,
        }
    }
}

// ---- serde helpers: each reads a JSON value and says what it got when it is not what the
// option takes. The messages follow the option's name ("training option `rank` ...").

/// How a value reads in an error: "the string \"8\"", "a list", "null".
fn describe(v: &Value) -> String {
    match v {
        Value::String(s) => format!("the string {s:?}"),
        Value::Bool(b) => b.to_string(),
        Value::Null => "null".into(),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "an object".into(),
        Value::Number(n) => format!("the number {n}"),
    }
}

fn number_value<E: serde::de::Error>(v: &Value) -> Result<f64, E> {
    match v {
        Value::Number(n) => n
            .as_f64()
            .ok_or_else(|| E::custom(format!("is {n}; it must be a number"))),
        _ => Err(E::custom(format!("must be a number, got {}", describe(v)))),
    }
}

fn number<'de, D: Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
    Ok(number_value::<D::Error>(&Value::deserialize(d)?)? as f32)
}

fn optional_number<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        v => number_value(&v).map(Some),
    }
}

/// A whole number of at least `MIN` (JavaScript sends every number as a double: 1.5 is refused
/// here, not truncated).
fn whole_value<E: serde::de::Error, T: TryFrom<u64>, const MIN: u64>(v: &Value) -> Result<T, E> {
    let n = match v {
        Value::Number(n) => match n.as_u64() {
            Some(u) => Some(u),
            None => n
                .as_f64()
                .filter(|x| x.fract() == 0.0 && (0.0..=MAX_SAFE_INTEGER).contains(x))
                .map(|x| x as u64),
        },
        _ => return Err(E::custom(format!("must be a number, got {}", describe(v)))),
    };
    n.filter(|&u| u >= MIN)
        .and_then(|u| T::try_from(u).ok())
        .ok_or_else(|| {
            E::custom(format!(
                "is {v}; it must be a whole number of at least {MIN}"
            ))
        })
}

fn whole<'de, D: Deserializer<'de>, T: TryFrom<u64>, const MIN: u64>(d: D) -> Result<T, D::Error> {
    whole_value::<D::Error, T, MIN>(&Value::deserialize(d)?)
}

fn optional_whole<'de, D: Deserializer<'de>, T: TryFrom<u64>, const MIN: u64>(
    d: D,
) -> Result<Option<T>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        v => whole_value::<D::Error, T, MIN>(&v).map(Some),
    }
}

/// null or 0: no clipping.
fn grad_norm<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f32>, D::Error> {
    Ok(optional_number(d)?.filter(|&x| x != 0.0).map(|x| x as f32))
}

fn flag<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    match Value::deserialize(d)? {
        Value::Bool(b) => Ok(b),
        v => Err(D::Error::custom(format!(
            "must be true or false, got {}",
            describe(&v)
        ))),
    }
}

/// null: None (the default); else true or false.
fn optional_flag<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        Value::Bool(b) => Ok(Some(b)),
        v => Err(D::Error::custom(format!(
            "must be true, false or null, got {}",
            describe(&v)
        ))),
    }
}

fn text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s)),
        v => Err(D::Error::custom(format!(
            "must be a string, got {}",
            describe(&v)
        ))),
    }
}

fn targets<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    match Value::deserialize(d)? {
        Value::String(s) => Ok(vec![s]),
        Value::Array(list) => list
            .into_iter()
            .map(|t| match t {
                Value::String(s) => Ok(s),
                t => Err(D::Error::custom(format!(
                    "holds {}; give names such as \"q_proj\"",
                    describe(&t)
                ))),
            })
            .collect(),
        v => Err(D::Error::custom(format!(
            "must be a list of module names, got {}",
            describe(&v)
        ))),
    }
}

fn schedule<'de, D: Deserializer<'de>>(d: D) -> Result<Schedule, D::Error> {
    let v = Value::deserialize(d)?;
    v.as_str().and_then(|s| s.parse().ok()).ok_or_else(|| {
        D::Error::custom(format!(
            "is {}; use \"cosine\", \"linear\" or \"constant\"",
            describe(&v)
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tiny_config;
    use serde_json::json;

    fn parse(v: Value) -> Result<TrainConfig, ConfigError> {
        TrainConfig::parse(&tiny_config(), &v)
    }

    /// The error for `options`, which must fail on `field` with exactly `message`.
    fn refused(options: Value, field: Option<&str>, message: &str) {
        let e = parse(options.clone()).expect_err(&options.to_string());
        assert_eq!(e.message, message, "{options}");
        assert_eq!(e.field.as_deref(), field, "{options}");
        assert_eq!(e.to_string(), message);
        if let Some(f) = field
            && !message.starts_with("unknown")
        {
            assert_eq!(e.message, format!("training option `{f}` {}", e.problem));
        }
    }

    #[test]
    fn defaults_are_the_cli_defaults() {
        let c = parse(json!({})).unwrap();
        assert_eq!(c, TrainConfig::default());
        assert_eq!(parse(Value::Null).unwrap(), c);
        assert_eq!(
            (c.rank, c.alpha, c.dropout, c.rslora),
            (8, 16.0, 0.0, false)
        );
        assert_eq!(c.targets, ["all-linear"]);
        assert_eq!((c.lr, c.schedule, c.warmup), (2e-4, Schedule::Cosine, 0));
        assert_eq!((c.weight_decay, c.max_grad_norm), (0.01, Some(1.0)));
        assert_eq!(
            (c.steps, c.epochs, c.batch, c.eval_every),
            (None, None, 1, 20)
        );
        assert_eq!(
            (c.context, c.completion_only, c.val_fraction),
            (128, false, 0.1)
        );
        assert_eq!(
            (c.seed, c.checkpoint_every, c.name.as_deref()),
            (0, 50, None)
        );
        // The default context never exceeds the model's.
        let short = Config {
            max_position_embeddings: 64,
            ..tiny_config()
        };
        let c = TrainConfig::parse(&short, &json!({ "rank": 4 })).unwrap();
        assert_eq!((c.rank, c.context), (4, 64));
        // null means the default; for maxGradNorm it means off, as 0 does.
        let c = parse(json!({ "rank": null, "steps": null, "maxGradNorm": null })).unwrap();
        assert_eq!((c.rank, c.steps, c.max_grad_norm), (8, None, None));
        assert_eq!(
            parse(json!({ "maxGradNorm": 0 })).unwrap().max_grad_norm,
            None
        );
    }

    #[test]
    fn every_option_is_read() {
        let c = parse(json!({
            "rank": 4, "alpha": 8, "dropout": 0.05, "targets": ["q_proj", "v_proj"],
            "rslora": true, "lr": 1e-3, "schedule": "linear", "warmup": 2, "weightDecay": 0,
            "maxGradNorm": 0.5, "epochs": 2.5, "batch": 3, "evalEvery": 0, "context": 256,
            "completionOnly": true, "valFraction": 0, "maxValSequences": 5, "seed": 7,
            "checkpointEvery": 10, "name": "run", "recompute": true,
        }))
        .unwrap();
        let expected = TrainConfig {
            rank: 4,
            alpha: 8.0,
            dropout: 0.05,
            targets: vec!["q_proj".into(), "v_proj".into()],
            rslora: true,
            lr: 1e-3,
            schedule: Schedule::Linear,
            warmup: 2,
            weight_decay: 0.0,
            max_grad_norm: Some(0.5),
            steps: None,
            epochs: Some(2.5),
            batch: 3,
            eval_every: 0,
            context: 256,
            completion_only: true,
            val_fraction: 0.0,
            max_val_sequences: 5,
            seed: 7,
            checkpoint_every: 10,
            name: Some("run".into()),
            recompute: Some(true),
        };
        assert_eq!(c, expected);
        // One module may be given as a string.
        assert_eq!(
            parse(json!({ "targets": "k_proj" })).unwrap().targets,
            ["k_proj"]
        );
        // Serialized with the same names, it reads back the same.
        let back = serde_json::to_value(&c).unwrap();
        assert_eq!(back["weightDecay"], json!(0.0));
        assert_eq!(back["schedule"], json!("linear"));
        assert_eq!(parse(back).unwrap(), c);
        // FIELDS is exactly what serde accepts.
        let all: serde_json::Map<_, _> = TrainConfig::FIELDS
            .iter()
            .map(|f| {
                (
                    f.to_string(),
                    serde_json::to_value(TrainConfig::default()).unwrap()[f].clone(),
                )
            })
            .collect();
        assert_eq!(all.len(), 22);
        serde_json::from_value::<TrainConfig>(Value::Object(all)).unwrap();
    }

    #[test]
    fn unknown_options_are_refused_with_the_list() {
        let list = TrainConfig::FIELDS.join(", ");
        refused(
            json!({ "rank": 4, "learningRate": 1e-3 }),
            Some("learningRate"),
            &format!("unknown training option `learningRate`; the options are {list}"),
        );
        assert!(list.contains("weightDecay, maxGradNorm") && list.contains("checkpointEvery"));
        // serde's own check agrees (deny_unknown_fields), for configs read without `parse`.
        let e = serde_json::from_value::<TrainConfig>(json!({ "data": {} })).unwrap_err();
        assert!(e.to_string().contains("unknown field `data`"), "{e}");
        refused(
            json!([1, 2]),
            None,
            "training options must be an object such as { rank: 8, lr: 2e-4, steps: 100 }",
        );
    }

    #[test]
    fn bad_values_name_their_option() {
        let cases: &[(Value, &str, &str)] = &[
            (
                json!({ "rank": 1.5 }),
                "rank",
                "is 1.5; it must be a whole number of at least 1",
            ),
            (
                json!({ "rank": 0 }),
                "rank",
                "is 0; it must be a whole number of at least 1",
            ),
            (
                json!({ "rank": -2 }),
                "rank",
                "is -2; it must be a whole number of at least 1",
            ),
            (
                json!({ "rank": 100000 }),
                "rank",
                "is 100000; on this model the adapted projections allow at most 32 (the smallest side of an adapted weight)",
            ),
            (
                json!({ "rank": "8" }),
                "rank",
                "must be a number, got the string \"8\"",
            ),
            (
                json!({ "rank": 1e300 }),
                "rank",
                "is 1e+300; it must be a whole number of at least 1",
            ),
            (json!({ "alpha": 0 }), "alpha", "is 0; it must be positive"),
            (
                json!({ "alpha": [] }),
                "alpha",
                "must be a number, got a list",
            ),
            (
                json!({ "dropout": 1 }),
                "dropout",
                "is 1; it must be in [0, 1)",
            ),
            (
                json!({ "targets": [] }),
                "targets",
                "is empty; choose at least one module",
            ),
            (
                json!({ "targets": 3 }),
                "targets",
                "must be a list of module names, got the number 3",
            ),
            (
                json!({ "targets": ["q_proj", 1] }),
                "targets",
                "holds the number 1; give names such as \"q_proj\"",
            ),
            (
                json!({ "targets": ["attn"] }),
                "targets",
                "holds the unknown target module \"attn\"; choose from q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, or all-linear",
            ),
            (
                json!({ "rslora": "yes" }),
                "rslora",
                "must be true or false, got the string \"yes\"",
            ),
            (
                json!({ "lr": -1e-3 }),
                "lr",
                "is -0.001; it must be positive",
            ),
            (
                json!({ "schedule": "step" }),
                "schedule",
                "is the string \"step\"; use \"cosine\", \"linear\" or \"constant\"",
            ),
            (
                json!({ "warmup": 0.5 }),
                "warmup",
                "is 0.5; it must be a whole number of at least 0",
            ),
            (
                json!({ "weightDecay": -0.1 }),
                "weightDecay",
                "is -0.1; it must be 0 or more",
            ),
            (
                json!({ "maxGradNorm": -1 }),
                "maxGradNorm",
                "is -1; it must be positive (0 or null: no clipping)",
            ),
            (
                json!({ "steps": 0 }),
                "steps",
                "is 0; it must be a whole number of at least 1",
            ),
            (
                json!({ "epochs": 0 }),
                "epochs",
                "is 0; it must be positive",
            ),
            (
                json!({ "batch": 0 }),
                "batch",
                "is 0; it must be a whole number of at least 1",
            ),
            (
                json!({ "evalEvery": true }),
                "evalEvery",
                "must be a number, got true",
            ),
            (
                json!({ "context": 1 }),
                "context",
                "is 1; it must be a whole number of at least 2",
            ),
            (
                json!({ "context": 100000 }),
                "context",
                "is 100000; the model's context is 256 positions",
            ),
            (
                json!({ "completionOnly": 1 }),
                "completionOnly",
                "must be true or false, got the number 1",
            ),
            (
                json!({ "valFraction": 1.5 }),
                "valFraction",
                "is 1.5; it must be in [0, 1)",
            ),
            (
                json!({ "seed": -1 }),
                "seed",
                "is -1; it must be a whole number of at least 0",
            ),
            (
                json!({ "checkpointEvery": "10" }),
                "checkpointEvery",
                "must be a number, got the string \"10\"",
            ),
            (
                json!({ "name": 5 }),
                "name",
                "must be a string, got the number 5",
            ),
            (
                json!({ "recompute": "auto" }),
                "recompute",
                "must be true, false or null, got the string \"auto\"",
            ),
        ];
        for (options, field, problem) in cases {
            refused(
                options.clone(),
                Some(field),
                &format!("training option `{field}` {problem}"),
            );
        }
    }

    #[test]
    fn steps_and_epochs_exclude_each_other() {
        refused(
            json!({ "steps": 10, "epochs": 2 }),
            None,
            "training options `steps` and `epochs` both given; give one of them",
        );
        let c = parse(json!({ "steps": 10 })).unwrap();
        assert_eq!(c.total_steps(1000), 10);
        // Steps from epochs: ceil(epochs * sequences / batch), at least one.
        let c = parse(json!({ "epochs": 1.5, "batch": 4 })).unwrap();
        assert_eq!(c.total_steps(10), 4);
        assert_eq!(parse(json!({})).unwrap().total_steps(7), 7);
        assert_eq!(parse(json!({ "batch": 2 })).unwrap().total_steps(7), 4);
        assert_eq!(parse(json!({ "epochs": 0.1 })).unwrap().total_steps(10), 1);
        assert_eq!(parse(json!({})).unwrap().total_steps(0), 1);
    }

    #[test]
    fn validate_checks_hand_built_configs() {
        let m = tiny_config();
        let bad = |c: TrainConfig| c.validate(&m).unwrap_err();
        let e = bad(TrainConfig {
            lr: f32::NAN,
            ..TrainConfig::default()
        });
        assert_eq!(e.field.as_deref(), Some("lr"));
        assert_eq!(e.problem, "is NaN; it must be a finite number");
        let e = bad(TrainConfig {
            targets: vec!["q_proj".into(), "attn".into()],
            ..TrainConfig::default()
        });
        assert!(e.message.contains("unknown target module \"attn\""), "{e}");
        TrainConfig::default().validate(&m).unwrap();
    }

    #[test]
    fn derived_configs() {
        let c = parse(json!({
            "rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj"], "lr": 1e-3,
            "schedule": "constant", "warmup": 3, "maxGradNorm": 0, "batch": 2, "evalEvery": 5,
            "context": 64, "completionOnly": true, "valFraction": 0.2, "seed": 9,
        }))
        .unwrap();
        let l = c.lora_config().unwrap();
        assert_eq!((l.r, l.alpha, l.use_rslora), (4, 8.0, false));
        assert_eq!(l.targets, [true, false, true, false, false, false, false]);
        let o = c.adamw_config(40);
        assert_eq!(
            o,
            AdamWConfig {
                lr: 1e-3,
                weight_decay: 0.01,
                max_grad_norm: None,
                schedule: Schedule::Constant,
                warmup_steps: 3,
                total_steps: 40,
                ..AdamWConfig::default()
            }
        );
        let d = c.data_options();
        assert_eq!(
            (
                d.context,
                d.completions_only,
                d.val_fraction,
                d.max_val_sequences,
                d.seed
            ),
            (64, true, 0.2, DEFAULT_MAX_VAL_SEQUENCES, 9)
        );
        let t = c.train_options(40);
        assert_eq!(
            (t.steps, t.accumulation, t.eval_every, t.seed),
            (40, 2, 5, 9)
        );
    }
}
