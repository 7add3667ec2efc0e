//! One launcher per shader in `shaders/`. Each launcher is built once per set of fixed
//! dimensions (the shader's `override` constants: model widths, head counts, eps, activation),
//! and its `encode` takes the tensors, checks their types and shapes against its doc comment,
//! and records the dispatch. The number of tokens T comes from the tensors' shapes.
//!
//! Dimension letters: T tokens, C channels, F ffn, V vocab, NH heads, NKV kv-heads, HS head
//! size, I/O a linear layer's in/out features, P tabulated RoPE positions.

pub mod act_quant;
pub mod attention;
pub mod embedding;
pub mod gated_act;
pub mod matmul;
pub mod residual_add;
pub mod rms_norm;
pub mod rope;
pub mod ternary_matmul;

pub use act_quant::ActQuant;
pub use attention::Attention;
pub use embedding::Embedding;
pub use gated_act::GatedAct;
pub use matmul::Matmul;
pub use residual_add::ResidualAdd;
pub use rms_norm::RmsNorm;
pub use rope::Rope;
pub use ternary_matmul::TernaryMatmul;

/// Workgroup size of the 1-D kernels (the `WG` override): a power of two, at most WebGPU's
/// guaranteed 256 invocations per workgroup.
pub const WG: usize = 64;

/// The shader sources, embedded at build time (also for the naga validation test).
pub const SHADERS: &[(&str, &str)] = &[
    ("act_quant", act_quant::SOURCE),
    ("attention", attention::SOURCE),
    ("embedding", embedding::SOURCE),
    ("gated_act", gated_act::SOURCE),
    ("matmul", matmul::SOURCE),
    ("residual_add", residual_add::SOURCE),
    ("rms_norm", rms_norm::SOURCE),
    ("rope", rope::SOURCE),
    ("ternary_matmul", ternary_matmul::SOURCE),
];

/// `n` as an override constant value.
pub(crate) fn c(n: usize) -> f64 {
    n as f64
}
