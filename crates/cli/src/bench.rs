//! `bitlora bench`: the named workloads of shared/BENCHMARKS-TARGETS.md on random weights.
//!
//! decode-<shape>: a 128-token prompt (batched prefill), then 128 generated tokens through the
//! KV cache, greedy. Reports prefill and decode tokens/s and the process's peak RSS. Weights
//! are random (master weights quantized at load): the work is the same as for a trained model.

use std::time::Instant;

use bitlora_core::model::{self, Model};
use bitlora_core::rng::Rng;
use bitlora_core::{KvCache, generate};

#[derive(serde::Serialize)]
pub struct DecodeReport {
    pub workload: String,
    pub backend: &'static str,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    pub peak_rss_mib: Option<f64>,
}

/// Runs decode-<shape> on the CPU reference. `shape` is one of model::bench_config's names.
pub fn decode_cpu(
    shape: &str,
    prompt_len: usize,
    gen_len: usize,
    seed: u64,
) -> Option<DecodeReport> {
    let config = model::bench_config(shape)?;
    eprintln!("bitlora bench: building random {shape} model (seed {seed})...");
    let (model, tensors) = Model::random(config, seed);
    drop(tensors);
    let mut rng = Rng::new(seed ^ 0xbe7c);
    let prompt: Vec<u32> = (0..prompt_len)
        .map(|_| rng.below(model.config.vocab_size as u64) as u32)
        .collect();

    // Warm-up: one short pass so page faults and lazy init are not timed.
    model
        .forward(
            &prompt[..4.min(prompt.len())],
            &mut KvCache::new(&model.config),
        )
        .ok()?;

    let start = Instant::now();
    let mut cache = KvCache::new(&model.config);
    let logits = model.forward(&prompt, &mut cache).ok()?;
    let prefill = start.elapsed().as_secs_f64();
    std::hint::black_box(&logits);

    // Decode through the library's own generate() (the same path `bitlora generate` takes),
    // timing from the first generated token so prefill is not counted twice.
    let opts = bitlora_core::SamplingOptions {
        max_tokens: gen_len,
        ..Default::default()
    };
    let mut first = None;
    let out = generate(&model, &prompt, &opts, |_| {
        first.get_or_insert_with(Instant::now);
        true
    })
    .ok()?;
    let decode = first.map_or(0.0, |t| t.elapsed().as_secs_f64());
    Some(DecodeReport {
        workload: format!("decode-{shape}"),
        backend: "cpu",
        prompt_tokens: prompt_len,
        generated_tokens: out.len(),
        prefill_tokens_per_s: prompt_len as f64 / prefill,
        decode_tokens_per_s: out.len().saturating_sub(1) as f64 / decode.max(1e-9),
        peak_rss_mib: peak_rss_mib(),
    })
}

/// VmHWM from /proc/self/status (Linux), in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}
