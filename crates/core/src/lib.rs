//! bitlora-core: BitNet b1.58 models on the CPU, exactly as Hugging Face transformers computes
//! them. Pure Rust: no GPU, no web. The GPU backend (bitlora-gpu) and the wasm API (bitlora-web)
//! build on the types here, and every fast path is tested against the plain code in this crate.

pub mod builder;
pub mod config;
pub mod data;
pub mod error;
pub mod expf;
/// Entry points for the fuzz targets in `fuzz/` and their corpus replay.
pub mod fuzzing;
pub mod generate;
pub mod gguf;
pub mod lora;
pub mod merge;
pub mod model;
pub mod ops;
pub mod optim;
pub mod par;
pub mod peft;
pub mod quant;
pub mod rng;
pub mod table;
pub mod template_limits;
pub mod tokenizer;
pub mod tolerance;
pub mod train;
pub mod train_config;
pub mod trainer;
pub mod weights;

pub use builder::ModelBuilder;
pub use config::{Activation, Config, Layout, WeightFormat};
pub use error::{Error, Result};
pub use generate::{SamplingOptions, generate, generate_with_adapter};
pub use model::{KvCache, LayerParams, Model, Params};
pub use ops::top_k;
pub use quant::TernaryLinear;
pub use table::{Table, TableDtype};
pub use tokenizer::{ChatTemplate, Message, TextStream, Tokenizer};
pub use train_config::{ConfigError, TrainConfig};
