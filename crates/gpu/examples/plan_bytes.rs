//! The GPU trainer's table of buffers (`TrainPlan`) for the benchmark shapes, without a GPU:
//! bytes by role with recomputation off and on (T = 128, LoRA r 8 on all seven projections,
//! the head split as on a GPU, a binding limit of 4 GiB as on the lent H200). The model's
//! weights come on top (`bench train`'s `gpu_bytes` counts both).
//!
//!     cargo run --release -p bitlora-gpu --example plan_bytes

use std::collections::BTreeMap;

use bitlora_core::lora::LoraConfig;
use bitlora_gpu::{PlanOptions, TrainPlan};

fn main() {
    let mib = |b: u64| b as f64 / 1048576.0;
    for shape in ["125m", "1b", "2b4t"] {
        let Some(cfg) = bitlora_core::model::bench_config(shape) else {
            continue;
        };
        let lora = LoraConfig {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            use_rslora: false,
            targets: [true; 7],
        };
        for recompute in [false, true] {
            let opts = PlanOptions {
                max_tokens: 128,
                max_binding: 4 << 30,
                split_head: true,
                accumulate: false,
                recompute,
            };
            let plan = TrainPlan::new(&cfg, &lora, &opts);
            let mut by_role: BTreeMap<String, u64> = BTreeMap::new();
            for b in &plan.buffers {
                *by_role.entry(format!("{:?}", b.role)).or_default() += b.bytes();
            }
            let roles: Vec<String> = by_role
                .iter()
                .map(|(k, v)| format!("{k} {:.1}", mib(*v)))
                .collect();
            println!(
                "{shape:>5} recompute {:>3}: {:7.1} MiB ({})",
                if recompute { "on" } else { "off" },
                mib(plan.bytes()),
                roles.join(", ")
            );
        }
    }
}
