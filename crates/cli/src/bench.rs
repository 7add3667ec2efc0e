//! `bitlora bench`: the named workloads of shared/BENCHMARKS-TARGETS.md on random weights.
//!
//! decode-<shape>: a 128-token prompt (batched prefill), then 128 generated tokens through the
//! KV cache, greedy. Reports prefill and decode tokens/s and the process's peak RSS, and on the
//! GPU the adapter and the GPU memory allocated for weights + KV cache + activations. Weights
//! are random (master weights quantized at load): the work is the same as for a trained model.
//!
//! train-<shape>: LoRA r 8, alpha 16 on all seven projections, one sequence of random tokens
//! per AdamW step; median tokens/s over the timed steps, on the CPU reference or the GPU.
//!
//! Each backend is timed on its own generation path, the one `bitlora generate` takes: the CPU
//! prefill is `Model::forward` of the prompt (all T rows of logits), the GPU prefill is
//! `GpuModel::forward_last` (the last row's logits only, which is all generation reads). Decode
//! is timed from the first generated token to the last; every GPU step ends with the readback
//! of its logits, so the clock stops only after the device has finished.

use std::time::Instant;

use bitlora_core::model::{self, Model};
use bitlora_core::rng::Rng;
use bitlora_core::trainer::{Backend, CpuBackend, TrainOptions, Trainer};
use bitlora_core::{KvCache, SamplingOptions, generate};
use bitlora_gpu::{
    Gpu, GpuBackend, GpuError, GpuKvCache, GpuModel, GpuTrainer, Placement, Recompute,
};

#[derive(serde::Serialize)]
pub struct DecodeReport {
    pub workload: String,
    pub backend: &'static str,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    pub peak_rss_mib: Option<f64>,
    /// The GPU adapter (GPU backend only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
    /// GPU memory allocated for weights + KV cache + activations, in bytes (GPU backend only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_bytes: Option<u64>,
    /// `--profile` (GPU backend): where a decode step's time goes (one token's pass), averaged
    /// over the generated tokens; the decode rate is then that of the profiled run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<TrainProfile>,
    /// GPU backend, unprofiled: the host's time per decoded token in the greedy loop that
    /// produced `decode_tokens_per_s`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<DecodeHost>,
}

/// The host's share of an unprofiled GPU decode: milliseconds per decoded token spent
/// recording and submitting its pass, and waiting for a token id (the host idle while the
/// GPU works). With passes in flight, a token costs about the larger of record and GPU time.
#[derive(serde::Serialize)]
pub struct DecodeHost {
    pub passes: usize,
    pub record_ms_per_token: f64,
    /// Of record_ms_per_token: inside wgpu's pass calls (set_pipeline, set_bind_group,
    /// dispatch_workgroups), ending the pass, finishing the command encoder and submitting it;
    /// the rest is bitlora's own bookkeeping (uniforms, bind group lookups, shape checks).
    pub wgpu_commands_ms_per_token: f64,
    pub pass_end_ms_per_token: f64,
    pub submit_ms_per_token: f64,
    pub wait_ms_per_token: f64,
}

/// The random model and prompt of decode-<shape>; None for an unknown shape.
fn setup(shape: &str, prompt_len: usize, seed: u64) -> Option<(Model, Vec<u32>)> {
    let config = model::bench_config(shape)?;
    eprintln!("bitlora bench: building random {shape} model (seed {seed})...");
    let model = Model::random_model(config, seed);
    let mut rng = Rng::new(seed ^ 0xbe7c);
    let prompt: Vec<u32> = (0..prompt_len)
        .map(|_| rng.below(model.config.vocab_size as u64) as u32)
        .collect();
    Some((model, prompt))
}

/// decode-<shape>'s random model as llama.cpp's TQ2_0 GGUF (`gguf::write_model_for_llama_cpp`);
/// None for an unknown shape.
pub fn model_gguf(shape: &str, seed: u64) -> Option<bitlora_core::Result<Vec<u8>>> {
    let (model, _) = setup(shape, 0, seed)?;
    Some(bitlora_core::gguf::write_model_for_llama_cpp(&model))
}

fn greedy(gen_len: usize) -> SamplingOptions {
    SamplingOptions {
        max_tokens: gen_len,
        ..Default::default()
    }
}

/// Runs decode-<shape> on the CPU reference. `shape` is one of model::bench_config's names.
pub fn decode_cpu(
    shape: &str,
    prompt_len: usize,
    gen_len: usize,
    seed: u64,
) -> Option<DecodeReport> {
    let (model, prompt) = setup(shape, prompt_len, seed)?;

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
    let mut first = None;
    let out = generate(&model, &prompt, &greedy(gen_len), |_| {
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
        adapter: None,
        gpu_bytes: None,
        profile: None,
        host: None,
    })
}

/// Runs decode-<shape> on the GPU (wgpu). Ok(None) for an unknown shape. With `profile`, every
/// pass records its host times and (where the device has timestamp queries) each dispatch's GPU
/// time, one compute pass per dispatch; the report carries the mean of the decode steps.
pub fn decode_gpu(
    shape: &str,
    prompt_len: usize,
    gen_len: usize,
    seed: u64,
    profile: bool,
) -> Result<Option<DecodeReport>, GpuError> {
    let Some((model, prompt)) = setup(shape, prompt_len, seed) else {
        return Ok(None);
    };
    let gpu = if profile {
        pollster::block_on(Gpu::with_timestamps())?
    } else {
        pollster::block_on(Gpu::new())?
    };
    eprintln!(
        "bitlora bench: GPU adapter {} ({})",
        gpu.info.name, gpu.info.backend
    );
    let gm = GpuModel::new(&gpu, &model)?;
    drop(model); // the GPU holds its own copy; keep peak RSS about the GPU run

    // Warm-up: pipelines and first-use allocations are not timed.
    pollster::block_on(gm.logits(&prompt[..4.min(prompt.len())]))?;

    // Prefill as generation runs it: the whole prompt in one pass, the last row read back.
    let mut cache = GpuKvCache::new(&gm, prompt_len + gen_len)?;
    let start = Instant::now();
    let last = pollster::block_on(gm.forward_last(&prompt, &mut cache))?;
    let prefill = start.elapsed().as_secs_f64();
    std::hint::black_box(&last);
    // The same allocation generate() makes: weights + a cache for prompt + generated tokens
    // with the activations of a prompt-sized pass.
    let gpu_bytes = gm.weight_bytes() + cache.bytes();
    drop(cache);

    let gpu_timestamps = profile && gm.set_profiling(true);
    gm.set_host_timing(!profile);
    let mut first = None;
    let out = pollster::block_on(gm.generate(&prompt, &greedy(gen_len), |_| {
        first.get_or_insert_with(Instant::now);
        true
    }))?;
    let decode = first.map_or(0.0, |t| t.elapsed().as_secs_f64());
    let host = gm
        .host_times()
        .filter(|h| h.passes > 0)
        .map(|h| DecodeHost {
            passes: h.passes,
            record_ms_per_token: 1e3 * h.record_s / h.passes as f64,
            wgpu_commands_ms_per_token: 1e3 * h.commands_s / h.passes as f64,
            pass_end_ms_per_token: 1e3 * h.pass_end_s / h.passes as f64,
            submit_ms_per_token: 1e3 * h.submit_s / h.passes as f64,
            wait_ms_per_token: 1e3 * h.wait_s / h.passes as f64,
        });
    let profile = profile.then(|| {
        let mut p = TrainProfile {
            gpu_timestamps,
            ..Default::default()
        };
        // The decode steps: one token each (the prefill is the pass before them).
        let steps: Vec<_> = gm
            .take_profiles()
            .into_iter()
            .filter(|s| s.tokens == 1)
            .collect();
        for s in &steps {
            p.add_pass(s);
        }
        p.finish(steps.len());
        p
    });
    Ok(Some(DecodeReport {
        workload: format!("decode-{shape}"),
        backend: "gpu",
        prompt_tokens: prompt_len,
        generated_tokens: out.len(),
        prefill_tokens_per_s: prompt_len as f64 / prefill,
        decode_tokens_per_s: out.len().saturating_sub(1) as f64 / decode.max(1e-9),
        peak_rss_mib: peak_rss_mib(),
        adapter: Some(format!("{} ({})", gpu.info.name, gpu.info.backend)),
        gpu_bytes: Some(gpu_bytes),
        profile,
        host,
    }))
}

/// VmHWM from /proc/self/status (Linux), in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

#[derive(serde::Serialize)]
pub struct TrainReport {
    pub workload: String,
    pub backend: &'static str,
    pub sequence_tokens: usize,
    pub steps_timed: usize,
    /// Median over the timed steps of (training tokens / step time); a step is forward,
    /// backward and the AdamW update.
    pub tokens_per_s_median: f64,
    pub step_seconds_median: f64,
    pub trainable_parameters: usize,
    pub peak_rss_mib: Option<f64>,
    /// The GPU adapter (GPU backend only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
    /// GPU memory allocated for weights + saved activations + adapter, gradients and scratch,
    /// in bytes (GPU backend only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_bytes: Option<u64>,
    /// Whether the backward recomputed each layer's activations instead of keeping them (GPU
    /// backend only; `BITLORA_BENCH_RECOMPUTE=on|off|auto`, default auto).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recompute: Option<bool>,
    /// `--profile` (GPU backend): where a step's time goes, averaged over the timed steps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<TrainProfile>,
}

/// `bench train --backend gpu --profile`: the mean per timed step of each host phase and of
/// each kernel's GPU time (wgpu timestamp queries, one compute pass per dispatch while
/// profiling, so the step itself runs a little slower than unprofiled).
#[derive(serde::Serialize, Default)]
pub struct TrainProfile {
    /// Whether the device granted `TIMESTAMP_QUERY`; without it `kernels` is empty.
    pub gpu_timestamps: bool,
    pub upload_ms: f64,
    pub record_ms: f64,
    /// Submit until the readback is mapped (GPU work + round trip).
    pub submit_to_readback_ms: f64,
    pub unpack_ms: f64,
    /// The optimizer's host time: recording and submitting AdamW on the GPU (its GPU time
    /// falls into the next step's wait), or core's AdamW on the CPU with
    /// BITLORA_BENCH_CPU_ADAMW=1.
    pub adamw_ms: f64,
    /// Sum of every dispatch's GPU time.
    pub gpu_kernels_ms: f64,
    /// Per kernel label, in order of first dispatch.
    pub kernels: Vec<KernelTime>,
}

#[derive(serde::Serialize, Clone)]
pub struct KernelTime {
    pub kernel: &'static str,
    /// Dispatches per step.
    pub dispatches: usize,
    /// GPU milliseconds per step.
    pub ms: f64,
}

impl TrainProfile {
    /// Adds one step's profile (host phases and dispatches) and its AdamW time.
    fn add(&mut self, p: &bitlora_gpu::StepProfile, adamw_s: f64) {
        self.upload_ms += 1e3 * p.upload_s;
        self.record_ms += 1e3 * p.record_s;
        self.submit_to_readback_ms += 1e3 * p.wait_s;
        self.unpack_ms += 1e3 * p.unpack_s;
        self.adamw_ms += 1e3 * adamw_s;
        self.add_dispatches(&p.dispatches);
    }

    /// Adds one forward pass's profile (a decode step: its record time, the wait for its
    /// logits, its dispatches).
    fn add_pass(&mut self, p: &bitlora_gpu::PassProfile) {
        self.record_ms += 1e3 * p.record_s;
        self.submit_to_readback_ms += 1e3 * p.wait_s;
        self.add_dispatches(&p.dispatches);
    }

    fn add_dispatches(&mut self, dispatches: &bitlora_gpu::DispatchTimes) {
        for &(label, ns) in dispatches {
            let i = match self.kernels.iter().position(|k| k.kernel == label) {
                Some(i) => i,
                None => {
                    self.kernels.push(KernelTime {
                        kernel: label,
                        dispatches: 0,
                        ms: 0.0,
                    });
                    self.kernels.len() - 1
                }
            };
            self.kernels[i].dispatches += 1;
            self.kernels[i].ms += ns * 1e-6;
        }
    }

    /// Divides the sums of `steps` steps into per-step means.
    fn finish(&mut self, steps: usize) {
        let n = steps.max(1) as f64;
        for v in [
            &mut self.upload_ms,
            &mut self.record_ms,
            &mut self.submit_to_readback_ms,
            &mut self.unpack_ms,
            &mut self.adamw_ms,
        ] {
            *v /= n;
        }
        for k in &mut self.kernels {
            k.ms /= n;
            k.dispatches = (k.dispatches as f64 / n).round() as usize;
        }
        self.gpu_kernels_ms = self.kernels.iter().map(|k| k.ms).sum();
    }

    /// The table `bench --profile` prints on stderr, kernels by time.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let mut kernels = self.kernels.clone();
        kernels.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        if self.gpu_timestamps {
            let total = self.gpu_kernels_ms.max(1e-12);
            let _ = writeln!(
                out,
                "{:<30} {:>10} {:>11} {:>7}",
                "kernel", "dispatches", "ms / step", "share"
            );
            for k in &kernels {
                let _ = writeln!(
                    out,
                    "{:<30} {:>10} {:>11.3} {:>6.1}%",
                    k.kernel,
                    k.dispatches,
                    k.ms,
                    100.0 * k.ms / total
                );
            }
            let n: usize = kernels.iter().map(|k| k.dispatches).sum();
            let _ = writeln!(
                out,
                "{:<30} {:>10} {:>11.3} {:>6.1}%",
                "GPU total (sum of dispatches)", n, self.gpu_kernels_ms, 100.0
            );
        } else {
            let _ = writeln!(
                out,
                "GPU timestamps: not available (the device has no TIMESTAMP_QUERY); host times only"
            );
        }
        let _ = writeln!(out, "host, ms / step:");
        for (what, ms) in [
            ("upload (checks, tokens, adapter)", self.upload_ms),
            ("record (dispatches, copies)", self.record_ms),
            ("submit -> readback mapped", self.submit_to_readback_ms),
            ("unpack (readback, grads +=)", self.unpack_ms),
            ("optimizer (AdamW or its submit)", self.adamw_ms),
        ] {
            // A decode step has no upload, unpack or optimizer phase.
            if ms > 0.0 {
                let _ = writeln!(out, "  {what:<34} {ms:>10.3}");
            }
        }
        out
    }
}

/// The random model, adapter and optimizer of train-<shape>: LoRA r 8, alpha 16 on all seven
/// projections, AdamW; None for an unknown shape.
fn train_setup(
    shape: &str,
    steps: usize,
    seed: u64,
) -> Option<(Model, bitlora_core::lora::Lora, bitlora_core::optim::AdamW)> {
    use bitlora_core::lora::{Lora, LoraConfig};
    use bitlora_core::optim::{AdamW, AdamWConfig};
    let config = model::bench_config(shape)?;
    eprintln!("bitlora bench: building random {shape} model (seed {seed})...");
    let model = Model::random_model(config, seed);
    let lora = Lora::init(
        &model.config,
        LoraConfig::new(8, 16.0, 0.0, false, &["all-linear"]).ok()?,
        seed,
    );
    let opt = AdamW::new(
        AdamWConfig {
            lr: 1e-4,
            total_steps: steps,
            ..Default::default()
        },
        &lora,
    );
    Some((model, lora, opt))
}

/// One training sequence of `seq_len` random tokens and its next-token targets.
fn random_sequence(rng: &mut Rng, seq_len: usize, vocab: usize) -> (Vec<u32>, Vec<Option<u32>>) {
    let toks: Vec<u32> = (0..=seq_len)
        .map(|_| rng.below(vocab as u64) as u32)
        .collect();
    let targets = toks[1..].iter().map(|&t| Some(t)).collect();
    (toks[..seq_len].to_vec(), targets)
}

/// Median of step times (seconds).
fn median(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// The run of train-<shape>: `n` random sequences of `seq_len` tokens, one per optimizer step,
/// no validation; the adapter and AdamW of [`train_setup`].
fn train_run<B: Backend>(
    backend: B,
    model: &bitlora_core::Config,
    lora: bitlora_core::lora::Lora,
    optim: bitlora_core::optim::AdamWConfig,
    seq_len: usize,
    n: usize,
    seed: u64,
) -> Result<Trainer<B>, B::Error> {
    let mut rng = Rng::new(seed ^ 0x7a1);
    let train: Vec<_> = (0..n)
        .map(|_| {
            let (tokens, targets) = random_sequence(&mut rng, seq_len, model.vocab_size);
            bitlora_core::data::Sequence { tokens, targets }
        })
        .collect();
    let data = bitlora_core::data::Dataset {
        examples: train.len(),
        train,
        val: Vec::new(),
        format: "random",
        truncated: 0,
    };
    let options = TrainOptions {
        steps: n,
        accumulation: 1,
        eval_every: 0,
        seed,
    };
    Trainer::new(backend, model, lora, optim, data, options)
}

/// Runs `steps + warmup` steps of core's loop and returns the timed steps' seconds; `each`
/// sees every step after it ran (its index and the trainer).
fn timed_steps<B: Backend>(
    trainer: &mut Trainer<B>,
    steps: usize,
    warmup: usize,
    mut each: impl FnMut(usize, &Trainer<B>),
) -> Result<Vec<f64>, B::Error> {
    let mut times = Vec::new();
    for step in 0..steps + warmup {
        let t0 = Instant::now();
        let r = pollster::block_on(trainer.step())?;
        let secs = t0.elapsed().as_secs_f64();
        if let Some(why) = r.skipped {
            eprintln!("bitlora bench: step {}: skipped, {why}", step + 1);
        }
        each(step, trainer);
        eprintln!(
            "bitlora bench: step {}{}: {secs:.3} s",
            step + 1,
            if step < warmup { " (warm-up)" } else { "" }
        );
        if step >= warmup {
            times.push(secs);
        }
    }
    Ok(times)
}

/// train-<shape> on the CPU reference: LoRA r 8, alpha 16 on all seven projections, one
/// sequence of `seq_len` random tokens per optimizer step, AdamW (core's loop with the CPU
/// backend); `warmup` untimed steps.
pub fn train_cpu(
    shape: &str,
    seq_len: usize,
    steps: usize,
    warmup: usize,
    seed: u64,
) -> Option<TrainReport> {
    let (model, lora, opt) = train_setup(shape, steps + warmup, seed)?;
    let num_params = lora.num_params();
    let config = model.config.clone();
    let backend = CpuBackend::new(&model);
    let mut trainer = train_run(
        backend,
        &config,
        lora,
        opt.config,
        seq_len,
        steps + warmup,
        seed,
    )
    .ok()?;
    let median = median(timed_steps(&mut trainer, steps, warmup, |_, _| {}).ok()?);
    Some(TrainReport {
        workload: format!("train-{shape}"),
        backend: "cpu",
        sequence_tokens: seq_len,
        steps_timed: steps,
        tokens_per_s_median: seq_len as f64 / median,
        step_seconds_median: median,
        trainable_parameters: num_params,
        peak_rss_mib: peak_rss_mib(),
        adapter: None,
        gpu_bytes: None,
        recompute: None,
        profile: None,
    })
}

/// train-<shape> on the GPU: the same model, adapter, data and AdamW as [`train_cpu`], core's
/// loop with [`GpuBackend`] (the adapter, its gradients and Adam's moments resident on the GPU;
/// a step reads back the losses and the squared gradient norm, so the clock stops after the
/// device has finished the step's passes). BITLORA_BENCH_CPU_ADAMW=1 keeps them on the host
/// instead (every gradient read back, AdamW on the CPU), for before/after figures from one
/// binary. Ok(None) for an unknown shape. With `profile`, every step records one compute pass
/// per dispatch with timestamps (where the device has them) and the report carries a
/// [`TrainProfile`]; the step times are then those of the profiled steps.
pub fn train_gpu(
    shape: &str,
    seq_len: usize,
    steps: usize,
    warmup: usize,
    seed: u64,
    profile: bool,
) -> Result<Option<TrainReport>, GpuError> {
    let Some((model, lora, opt)) = train_setup(shape, steps + warmup, seed) else {
        return Ok(None);
    };
    if seq_len == 0 || seq_len > model.config.max_position_embeddings {
        return Ok(None);
    }
    let gpu = if profile {
        pollster::block_on(Gpu::with_timestamps())?
    } else {
        pollster::block_on(Gpu::new())?
    };
    eprintln!(
        "bitlora bench: GPU adapter {} ({})",
        gpu.info.name, gpu.info.backend
    );
    let config = model.config.clone();
    let mut gm = GpuModel::new(&gpu, &model)?;
    if let Some(v) = std::env::var_os("BITLORA_BENCH_RECOMPUTE") {
        let v = v.to_string_lossy();
        let r = Recompute::parse(&v).ok_or_else(|| GpuError::Shape {
            op: "bench train",
            msg: format!("BITLORA_BENCH_RECOMPUTE={v}: expected on, off or auto"),
        })?;
        gm.set_recompute(r);
    }
    let recompute = gm.recomputes();
    let mut gt = GpuTrainer::new(gm, &lora.config, seq_len)?;
    drop(model); // the GPU holds its own copy; keep peak RSS about the GPU run
    let mut prof = profile.then(|| TrainProfile {
        gpu_timestamps: gt.set_profiling(true),
        ..Default::default()
    });
    if prof.as_ref().is_some_and(|p| !p.gpu_timestamps) {
        eprintln!(
            "bitlora bench: --profile: the device has no TIMESTAMP_QUERY, so no kernel times; host times only"
        );
    }
    let cpu_adamw = std::env::var_os("BITLORA_BENCH_CPU_ADAMW").is_some_and(|v| v == "1");
    let placement = if cpu_adamw {
        Placement::Host
    } else {
        Placement::Auto
    };
    let num_params = lora.num_params();
    let backend = GpuBackend::with_placement(gt, placement);
    let mut trainer = train_run(
        backend,
        &config,
        lora,
        opt.config,
        seq_len,
        steps + warmup,
        seed,
    )?;
    let times = timed_steps(&mut trainer, steps, warmup, |step, t| {
        if let Some(p) = prof.as_mut().filter(|_| step >= warmup) {
            let b = t.backend();
            p.add(b.trainer().profile(), b.update_seconds());
        }
    })?;
    let median = median(times);
    if let Some(p) = prof.as_mut() {
        p.finish(steps);
        eprint!("{}", p.table());
    }
    let b = trainer.backend();
    let gpu_bytes = b.trainer().model().weight_bytes() + b.bytes();
    Ok(Some(TrainReport {
        workload: format!("train-{shape}"),
        backend: "gpu",
        sequence_tokens: seq_len,
        steps_timed: steps,
        tokens_per_s_median: seq_len as f64 / median,
        step_seconds_median: median,
        trainable_parameters: num_params,
        peak_rss_mib: peak_rss_mib(),
        adapter: Some(format!("{} ({})", gpu.info.name, gpu.info.backend)),
        gpu_bytes: Some(gpu_bytes),
        recompute: Some(recompute),
        profile: prof,
    }))
}
