//! A phone's device limits (issue 17, point 5). Chrome on Android grants WebGPU's default
//! limits: 128 MiB storage bindings, 256 MiB buffers, 16 KiB of workgroup memory, 256
//! invocations per workgroup. Here the backend runs on a device created with exactly those
//! (`Gpu::with_limits(DeviceLimits::Phone)`, lavapipe), which enforces them: anything that
//! allocated a buffer or bound a range past them would be a wgpu validation error, caught by
//! the passes' error scopes or by the device's error sink (`Gpu::check_errors`), never a pass
//! that quietly succeeds.
//!
//! - The device really has the limits and enforces them: a buffer over maxBufferSize and a
//!   binding over maxStorageBufferBindingSize are validation errors on it, and a tensor over the
//!   binding limit is refused by name (`GpuError::TooLarge`) before it reaches the device.
//! - A model whose vocabulary x hidden tables (V = 34,000, C = 1,024, f32: 139 MB each, the
//!   embedding and an untied head) exceed the binding limit: the split along V (`SplitTensor`)
//!   cuts each into chunks that fit. On the
//!   phone device its logits, greedy decoding (plain and with the trained adapter) and two
//!   LoRA training steps (losses, gradient norms, the adapter and Adam's moments at the end)
//!   equal the unrestricted device's run (the adapter's own limits, `Gpu::new`) bit for bit,
//!   and the decoded tokens equal the CPU reference's.
//!
//! What "unrestricted" means on lavapipe: its own storage-binding limit is 128 MiB already (a
//! desktop GPU's is 2-4 GiB), so both devices split the table at the same rows; what the phone
//! device adds is maxBufferSize 256 MiB and WebGPU's defaults for everything else (workgroup
//! memory, invocations per workgroup, bindings per stage), which are what a phone has and which
//! pick other kernel variants where a kernel adapts to them. In the browser (SwiftShader, 1 GiB
//! bindings) the unrestricted run holds the table whole: tests/browser/limits.test.mjs.
//!
//! The table is stored as f32 (`GpuModel::with_f32_tables`; the random model's values are bf16,
//! which would halve it): the CPU reference then needs half the vocabulary for the same bytes,
//! which keeps this test cheap on CI's two cores.

mod common;

use std::sync::OnceLock;
use std::time::Instant;

use bitlora_core::data::{Dataset, Sequence};
use bitlora_core::generate::generate_with_adapter;
use bitlora_core::lora::{Lora, LoraConfig};
use bitlora_core::model::tiny_config;
use bitlora_core::optim::{AdamWConfig, Schedule};
use bitlora_core::rng::Rng;
use bitlora_core::tolerance::{MODEL_LOGITS, TRAIN_STEP_BACKENDS};
use bitlora_core::trainer::{AdapterState, CpuBackend, StepReport, TrainOptions, Trainer};
use bitlora_core::{Config, Model, SamplingOptions};
use bitlora_gpu::wgpu;
use bitlora_gpu::{DType, DeviceLimits, Gpu, GpuBackend, GpuError, GpuModel, GpuTrainer};
use common::{block, gpu};

const MIB: u64 = 1 << 20;

/// The device with a phone's limits, shared by this binary's tests.
fn phone() -> &'static Gpu {
    static PHONE: OnceLock<Gpu> = OnceLock::new();
    PHONE.get_or_init(|| {
        gpu(); // the unrestricted device first: it sets XDG_RUNTIME_DIR for Mesa
        let g = block(Gpu::with_limits(DeviceLimits::Phone)).unwrap_or_else(|e| {
            panic!(
                "no GPU device with a phone's limits: install mesa-vulkan-drivers (lavapipe): {e}"
            )
        });
        println!(
            "phone device on {} ({}): max storage binding {} MiB, max buffer {} MiB",
            g.info.name,
            g.info.backend,
            g.info.max_storage_buffer_binding_size / MIB,
            g.info.max_buffer_size / MIB
        );
        g
    })
}

/// The model: one layer, a small FFN, and an embedding and a head of V x C = 34,000 x 1,024.
fn config() -> Config {
    let mut cfg = tiny_config();
    cfg.vocab_size = 34_000; // V
    cfg.hidden_size = 1_024; // C
    cfg.intermediate_size = 256; // F
    cfg.num_hidden_layers = 1; // L
    cfg.num_attention_heads = 8; // NH
    cfg.num_key_value_heads = 4; // NKV
    cfg.head_dim = 128; // HS: NH * HS = C
    cfg.max_position_embeddings = 64;
    // Untied: the embedding (read by row) and the head (read whole, and in the backward)
    // are both split. A tied random table would also decode the prompt's last token forever
    // (its own row has the largest dot product), which would make greedy decoding a weak check.
    cfg.tie_word_embeddings = false;
    cfg
}

/// The model once per binary (its random values take a while to draw).
fn model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| Model::random_model(config(), 17))
}

/// Runs `f`, then fails on any error the device reported outside a pass's error scopes (an
/// allocation past a limit is reported there, natively before the call that made it returns).
fn checked<T>(g: &Gpu, what: &str, f: impl FnOnce() -> T) -> T {
    let out = f();
    if let Err(e) = g.check_errors() {
        panic!("{what}: the device reported an error: {e}");
    }
    out
}

/// Validation errors raised by `f` on `g` (in an error scope), as text.
fn validation_errors(g: &Gpu, f: impl FnOnce()) -> Option<String> {
    let scope = g.device.push_error_scope(wgpu::ErrorFilter::Validation);
    f();
    block(scope.pop()).map(|e| e.to_string())
}

/// The last line of a wgpu error (its innermost cause).
fn cause(e: Option<String>) -> String {
    let e = e.unwrap_or_default();
    e.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_string()
}

#[test]
fn the_phone_device_has_a_phones_limits_and_enforces_them() {
    let p = phone();
    let l = p.device.limits();
    assert_eq!(l.max_storage_buffer_binding_size, 128 * MIB);
    assert_eq!(l.max_buffer_size, 256 * MIB);
    assert_eq!(l.max_compute_workgroup_storage_size, 16 << 10);
    assert_eq!(l.max_compute_invocations_per_workgroup, 256);
    assert_eq!(l.max_storage_buffers_per_shader_stage, 8);
    assert_eq!(
        (
            p.info.max_storage_buffer_binding_size,
            p.info.max_buffer_size
        ),
        (128 * MIB, 256 * MIB),
        "what the page shows of the device"
    );
    let u = gpu().device.limits();
    println!(
        "unrestricted device: max storage binding {} MiB, max buffer {} MiB, workgroup memory {} KiB, {} invocations per workgroup",
        u.max_storage_buffer_binding_size / MIB,
        u.max_buffer_size / MIB,
        u.max_compute_workgroup_storage_size >> 10,
        u.max_compute_invocations_per_workgroup
    );

    // A buffer past maxBufferSize: a validation error on this device.
    let over_buffer = validation_errors(p, || {
        let _ = p.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("over maxBufferSize"),
            size: 256 * MIB + 4,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
    });
    assert!(
        over_buffer.is_some(),
        "a {} MiB + 4 B buffer was created on the phone device",
        256
    );
    // A binding past maxStorageBufferBindingSize (of a buffer within maxBufferSize).
    let big = p.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("129 MiB"),
        size: 129 * MIB,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    let layout = p
        .device
        .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: None,
            entries: &[wgpu::BindGroupLayoutEntry {
                binding: 0,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Storage { read_only: true },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            }],
        });
    let over_binding = validation_errors(p, || {
        let _ = p.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("over maxStorageBufferBindingSize"),
            layout: &layout,
            entries: &[wgpu::BindGroupEntry {
                binding: 0,
                resource: big.as_entire_binding(),
            }],
        });
    });
    assert!(
        over_binding.is_some(),
        "a 129 MiB storage binding was accepted by the phone device"
    );
    println!(
        "phone device refuses a 256 MiB + 4 B buffer ({}) and a 129 MiB binding ({})",
        cause(over_buffer),
        cause(over_binding)
    );
    p.check_errors().unwrap();

    // The table in one piece: refused by name before it reaches the device.
    let cfg = config();
    let e = p
        .zeros(
            "model.embed_tokens.weight",
            &[cfg.vocab_size, cfg.hidden_size],
            DType::F32,
        )
        .unwrap_err();
    assert!(
        matches!(&e, GpuError::TooLarge { bytes, limit, .. } if *bytes == 4 * 34_000 * 1_024 && *limit == 128 * MIB),
        "{e}"
    );
}

/// Greedy decoding options.
fn greedy(max_tokens: usize) -> SamplingOptions {
    SamplingOptions {
        max_tokens,
        ..Default::default()
    }
}

/// Training sequences of 10..=17 tokens drawn from 3..V, the first targets of one masked.
fn dataset(v: usize) -> Dataset {
    let mut rng = Rng::new(5);
    let mut seqs: Vec<Sequence> = (0..5)
        .map(|k| {
            let t = 10 + (k * 3) % 8;
            let toks: Vec<u32> = (0..=t)
                .map(|_| 3 + rng.below(v as u64 - 3) as u32)
                .collect();
            let mut targets: Vec<Option<u32>> = toks[1..].iter().map(|&x| Some(x)).collect();
            if k == 1 {
                targets.iter_mut().take(3).for_each(|y| *y = None);
            }
            Sequence {
                tokens: toks[..t].to_vec(),
                targets,
            }
        })
        .collect();
    let val = seqs.split_off(4);
    Dataset {
        examples: seqs.len() + val.len(),
        train: seqs,
        val,
        format: "test",
        truncated: 0,
    }
}

const STEPS: usize = 2;

/// The adapter (moved off PEFT's B = 0, which would zero every dA), AdamW and the loop's
/// options: validation at the last step.
fn training(model: &Model) -> (Lora, AdamWConfig, TrainOptions) {
    let lc = LoraConfig::new(4, 8.0, 0.0, false, &["all-linear"]).unwrap();
    let mut lora = Lora::init(&model.config, lc, 3);
    let mut rng = Rng::new(4);
    lora.for_each_mut(|_, _, v| v.iter_mut().for_each(|x| *x += 0.05 * rng.normal()));
    let optim = AdamWConfig {
        lr: 1e-2,
        weight_decay: 0.1,
        max_grad_norm: Some(1.0),
        schedule: Schedule::Constant,
        total_steps: STEPS,
        ..Default::default()
    };
    let options = TrainOptions {
        steps: STEPS,
        accumulation: 1,
        eval_every: STEPS,
        seed: 9,
    };
    (lora, optim, options)
}

/// What one device gives: the prompt's logits, greedy tokens, the training reports and state,
/// greedy tokens with the trained adapter.
struct Run {
    logits: Vec<f32>,
    tokens: Vec<u32>,
    reports: Vec<StepReport>,
    state: AdapterState,
    tuned_tokens: Vec<u32>,
    chunks: usize,
    weight_bytes: u64,
    /// Whether the trainer recomputed activations (Recompute::Auto on this device).
    recompute: bool,
    secs: f64,
}

const PROMPT: [u32; 6] = [1, 4_711, 33_999, 17, 20_000, 5];
const NEW_TOKENS: usize = 8;

fn run_on(g: &Gpu, what: &str) -> Run {
    let start = Instant::now();
    let model = model();
    let data = dataset(model.config.vocab_size);
    let (lora, optim, options) = training(model);
    let gm = checked(g, what, || {
        GpuModel::with_f32_tables(g, model, u64::MAX).unwrap()
    });
    let (chunks, weight_bytes) = (gm.vocab_chunks(), gm.weight_bytes());
    assert_eq!(
        gm.table_dtypes(),
        (DType::F32, Some(DType::F32)),
        "{what}: f32 tables"
    );
    let mut times = vec![("load", start.elapsed().as_secs_f64())];
    let logits = checked(g, what, || block(gm.logits(&PROMPT)).unwrap());
    let tokens = checked(g, what, || {
        block(gm.generate(&PROMPT, &greedy(NEW_TOKENS), |_| true)).unwrap()
    });

    times.push(("logits + decode", start.elapsed().as_secs_f64()));
    let longest = data.train.iter().chain(&data.val);
    let longest = longest.map(|s| s.tokens.len()).max().unwrap();
    let trainer = checked(g, what, || {
        GpuTrainer::new(gm, &lora.config, longest).unwrap()
    });
    let recompute = trainer.plan().recompute;
    let mut run = Trainer::new(
        GpuBackend::new(trainer),
        &model.config,
        lora,
        optim,
        data,
        options,
    )
    .unwrap();
    let reports: Vec<StepReport> = (0..STEPS)
        .map(|k| {
            checked(g, what, || block(run.step()))
                .unwrap_or_else(|e| panic!("{what}: step {}: {e}", k + 1))
        })
        .collect();
    let state = checked(g, what, || block(run.state()).unwrap());
    times.push(("train", start.elapsed().as_secs_f64()));
    let mut gm = run.into_backend().into_trainer().into_model();
    gm.set_adapter(Some(&state.lora)).unwrap();
    let tuned_tokens = checked(g, what, || {
        block(gm.generate(&PROMPT, &greedy(NEW_TOKENS), |_| true)).unwrap()
    });
    times.push(("decode with the adapter", start.elapsed().as_secs_f64()));
    let mut last = 0.0;
    let times: Vec<String> = times
        .into_iter()
        .map(|(name, t)| {
            let s = format!("{name} {:.1} s", t - last);
            last = t;
            s
        })
        .collect();
    println!("{what}: {}", times.join(", "));
    Run {
        logits,
        tokens,
        reports,
        state,
        tuned_tokens,
        chunks,
        weight_bytes,
        recompute,
        secs: start.elapsed().as_secs_f64(),
    }
}

#[test]
fn a_model_over_the_limits_trains_and_decodes_on_the_phone_device_as_unrestricted() {
    let (phone, free) = (phone(), gpu());
    let model = model();
    let (v, c) = (model.config.vocab_size, model.config.hidden_size);
    let limit = phone.device.limits().max_storage_buffer_binding_size;
    // The table really is over the limit (not bf16 in disguise: f32 on the GPU).
    let table_bytes = 4 * (v * c) as u64;
    assert!(
        table_bytes > limit,
        "the table ({table_bytes} B) fits one binding ({limit} B): the test would prove nothing"
    );

    // Side by side: each device compiles its own pipelines, which on lavapipe is most of a
    // first pass, one core each.
    let (p, u) = std::thread::scope(|s| {
        let p = s.spawn(|| run_on(phone, "phone"));
        let u = run_on(free, "unrestricted");
        (p.join().unwrap_or_else(|e| std::panic::resume_unwind(e)), u)
    });
    assert!(
        p.chunks >= 2,
        "the phone device holds the {table_bytes} B table in {} chunk(s)",
        p.chunks
    );
    assert!(p.weight_bytes > limit, "{} weight bytes", p.weight_bytes);
    // Recompute::Auto: the phone device recomputes activations in the backward, the
    // unrestricted one keeps them; the comparisons below hold that to the same bits too.
    assert!(
        p.recompute && !u.recompute,
        "recompute: phone {}, unrestricted {}",
        p.recompute,
        u.recompute
    );

    // The phone device against the unrestricted one: bit for bit.
    assert!(
        p.logits == u.logits,
        "logits differ (max abs {:.3e})",
        MODEL_LOGITS.compare(&p.logits, &u.logits).max_abs
    );
    assert_eq!(p.tokens, u.tokens, "greedy tokens");
    for (a, b) in p.reports.iter().zip(&u.reports) {
        assert_eq!(a, b, "step {}", b.step);
    }
    assert!(p.state == u.state, "the adapter or Adam's moments differ");
    assert_eq!(
        p.tuned_tokens, u.tuned_tokens,
        "greedy tokens with the adapter"
    );

    // Against the CPU reference: the logits within MODEL_LOGITS, the same tokens, plain and
    // with the trained adapter, and the first step's loss within TRAIN_STEP_BACKENDS (later
    // steps start from adapters that differ in the last ulps).
    let cpu = model.logits(&PROMPT).unwrap();
    MODEL_LOGITS.assert_close("phone GPU vs CPU logits", &p.logits, &cpu);
    let want = bitlora_core::generate(model, &PROMPT, &greedy(NEW_TOKENS), |_| true).unwrap();
    assert_eq!(p.tokens, want, "greedy tokens vs the CPU");
    let tuned = generate_with_adapter(
        model,
        Some(&p.state.lora),
        &PROMPT,
        &greedy(NEW_TOKENS),
        |_| true,
    )
    .unwrap();
    assert_eq!(
        p.tuned_tokens, tuned,
        "greedy tokens with the adapter vs the CPU"
    );
    let (lora, optim, mut options) = training(model);
    options.steps = 1;
    let mut cpu_run = Trainer::new(
        CpuBackend::new(model),
        &model.config,
        lora,
        optim,
        dataset(v),
        options,
    )
    .unwrap();
    let first = block(cpu_run.step()).unwrap();
    let rel = |a: f32, b: f32| (a - b).abs() / b.abs().max(1e-12);
    let (dl, dn) = (
        rel(p.reports[0].loss, first.loss),
        rel(p.reports[0].grad_norm, first.grad_norm),
    );
    assert!(
        dl <= TRAIN_STEP_BACKENDS && dn <= TRAIN_STEP_BACKENDS,
        "step 1 vs the CPU: loss {} vs {}, norm {} vs {}",
        p.reports[0].loss,
        first.loss,
        p.reports[0].grad_norm,
        first.grad_norm
    );
    assert!(
        p.state.lora != training(model).0,
        "the adapter did not train"
    );

    println!(
        "V x C = {v} x {c}: f32 table {:.1} MiB > the {} MiB binding limit, in {} chunks; weights {:.1} MiB on the GPU",
        table_bytes as f64 / MIB as f64,
        limit / MIB,
        p.chunks,
        p.weight_bytes as f64 / MIB as f64
    );
    println!(
        "phone device == unrestricted device bit for bit: logits of {} tokens, {} greedy tokens {:?}, {STEPS} steps (losses {:?}, norms {:?}, val {:?}), adapter and moments, {} greedy tokens with the adapter; tokens == CPU; step 1 vs CPU: loss rel {dl:.1e}, norm rel {dn:.1e}; logits vs CPU max abs {:.2e}",
        PROMPT.len(),
        NEW_TOKENS,
        p.tokens,
        p.reports.iter().map(|r| r.loss).collect::<Vec<_>>(),
        p.reports.iter().map(|r| r.grad_norm).collect::<Vec<_>>(),
        p.reports.last().and_then(|r| r.val_loss),
        NEW_TOKENS,
        MODEL_LOGITS.compare(&p.logits, &cpu).max_abs
    );
    println!("time: phone {:.1} s, unrestricted {:.1} s", p.secs, u.secs);
}
