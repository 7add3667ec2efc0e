//! One launcher per shader in `shaders/`. Each launcher is built once per set of fixed
//! dimensions (the shader's `override` constants: model widths, head counts, eps, activation),
//! and its `encode` takes the tensors, checks their types and shapes against its doc comment,
//! and records the dispatch. The number of tokens T comes from the tensors' shapes.
//!
//! Dimension letters: T tokens, C channels, F ffn, V vocab, NH heads, NKV kv-heads, HS head
//! size, I/O a linear layer's in/out features, P tabulated RoPE positions.

pub mod act_quant;
pub mod adamw;
pub mod argmax;
pub mod attention;
pub mod attention_backward;
pub mod cross_entropy;
pub mod dropout;
pub mod embedding;
pub mod gated_act;
pub mod gated_act_backward;
pub mod lora_matmul;
pub mod matmul;
pub mod matmul_backward;
pub mod residual_add;
pub mod rms_norm;
pub mod rms_norm_backward;
pub mod rope;
pub mod rope_backward;
pub mod sum_squares;
pub mod ternary_backward;
pub mod ternary_decode;
pub mod ternary_glu;
pub mod ternary_matmul;

pub use act_quant::ActQuant;
pub use adamw::{AdamWScalars, AdamWStep};
pub use argmax::Argmax;
pub use attention::Attention;
pub use attention_backward::AttentionBackward;
pub use cross_entropy::CrossEntropy;
pub use dropout::Dropout;
pub use embedding::Embedding;
pub use gated_act::GatedAct;
pub use gated_act_backward::GatedActBackward;
pub use lora_matmul::LoraMatmul;
pub use matmul::Matmul;
pub use matmul_backward::MatmulBackward;
pub use residual_add::ResidualAdd;
pub use rms_norm::RmsNorm;
pub use rms_norm_backward::RmsNormBackward;
pub use rope::{Rope, RopePair};
pub use rope_backward::RopeBackward;
pub use sum_squares::SumSquares;
pub use ternary_backward::TernaryBackward;
pub use ternary_decode::TernaryDecode;
pub use ternary_glu::TernaryGlu;
pub use ternary_matmul::TernaryMatmul;

/// Workgroup size of the 1-D kernels (the `WG` override): a power of two, at most WebGPU's
/// guaranteed 256 invocations per workgroup.
pub const WG: usize = 64;

/// The shader sources, embedded at build time (also for the naga validation test).
pub const SHADERS: &[(&str, &str)] = &[
    ("act_quant", act_quant::SOURCE),
    ("adamw", adamw::SOURCE),
    ("argmax", argmax::SOURCE),
    ("attention", attention::SOURCE),
    ("attention_backward_kv", attention_backward::SOURCE_KV),
    ("attention_backward_q", attention_backward::SOURCE_Q),
    ("cross_entropy", cross_entropy::SOURCE),
    ("dropout", dropout::SOURCE),
    ("embedding", embedding::SOURCE),
    ("gated_act", gated_act::SOURCE),
    ("gated_act_backward", gated_act_backward::SOURCE),
    ("lora_matmul", lora_matmul::SOURCE),
    ("lora_matmul_reduce", lora_matmul::SOURCE_REDUCE),
    ("matmul", matmul::SOURCE),
    ("matmul_backward", matmul_backward::SOURCE),
    ("matmul_backward_reduce", matmul_backward::SOURCE_REDUCE),
    ("residual_add", residual_add::SOURCE),
    ("rms_norm", rms_norm::SOURCE),
    ("rms_norm_backward", rms_norm_backward::SOURCE),
    ("rope", rope::SOURCE),
    ("rope_backward", rope_backward::SOURCE),
    ("sum_squares", sum_squares::SOURCE),
    ("ternary_backward", ternary_backward::SOURCE),
    ("ternary_backward_reduce", ternary_backward::REDUCE_SOURCE),
    ("ternary_decode", ternary_decode::SOURCE),
    ("ternary_glu", ternary_glu::SOURCE),
    ("ternary_matmul", ternary_matmul::SOURCE),
];

/// Whether the benchmark switch `name` (an environment variable) is set: `bitlora bench` runs
/// compare a fused or staged kernel with the one it replaced in one binary
/// (`BITLORA_DECODE_UNFUSED`). Never set on the web.
pub fn bench_switch(name: &str) -> bool {
    #[cfg(not(target_arch = "wasm32"))]
    {
        std::env::var_os(name).is_some_and(|v| v != "0")
    }
    #[cfg(target_arch = "wasm32")]
    {
        let _ = name;
        false
    }
}

/// `n` as an override constant value.
pub(crate) fn c(n: usize) -> f64 {
    n as f64
}
