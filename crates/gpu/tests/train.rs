//! GPU LoRA training (`GpuTrainer`) against PyTorch + PEFT's gradients (tests/fixtures/lora)
//! and against the CPU reference (`bitlora_core::train`) with dropout, masked targets,
//! accumulation, tied and untied heads, and a head split along the vocabulary; and training on
//! real text through the GPU step + core's AdamW lowers the validation loss. Fails, never
//! skips, without a GPU adapter (tests/common's `gpu()`).

mod common;

use std::path::{Path, PathBuf};

use bitlora_core::lora::{Lora, LoraConfig};
use bitlora_core::model::tiny_config;
use bitlora_core::optim::{AdamW, AdamWConfig, Schedule};
use bitlora_core::rng::Rng;
use bitlora_core::tolerance::LORA_GRAD_NORMWISE;
use bitlora_core::{Activation, Config, Model, Tokenizer, data, peft, train};
use bitlora_gpu::{GpuModel, GpuTrainer};
use common::{block, gpu};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn shifted(seq: &[u32]) -> Vec<Option<u32>> {
    seq[1..].iter().map(|&t| Some(t)).chain([None]).collect()
}

/// Normwise relative error of every tensor of `ours` against `reference`: max |ours - ref|
/// over max |ref| (elementwise relative error is meaningless near zero). Returns the worst
/// value and the tensor's PEFT name; fails naming the first tensor above `tol`.
fn compare_grads(what: &str, ours: &Lora, reference: &Lora, tol: f32) -> (f32, String) {
    let mut worst = (0f32, String::new());
    for (l, (a_layer, b_layer)) in ours.layers.iter().zip(&reference.layers).enumerate() {
        for (p, (a, b)) in a_layer.iter().zip(b_layer).enumerate() {
            let (Some(a), Some(b)) = (a, b) else {
                assert_eq!(
                    a.is_some(),
                    b.is_some(),
                    "{what}: adapters differ at {l}/{p}"
                );
                continue;
            };
            for (which, x, y) in [("A", &a.a, &b.a), ("B", &a.b, &b.b)] {
                let name = format!("{}.lora_{which}", peft::module_path(l, p));
                let scale = y.iter().fold(0f32, |m, v| m.max(v.abs()));
                let err = x.iter().zip(y).fold(0f32, |m, (u, v)| m.max((u - v).abs()));
                let rel = if scale == 0.0 && err == 0.0 {
                    0.0
                } else {
                    err / scale.max(f32::MIN_POSITIVE)
                };
                assert!(
                    rel <= tol,
                    "{what}: {name}: max |gpu - ref| = {err:e} is {rel:e} of max |ref| = {scale:e} (tolerance {tol:e})"
                );
                if rel >= worst.0 {
                    worst = (rel, name);
                }
            }
        }
    }
    worst
}

/// The adapter PEFT starts from and PEFT's gradients, with the fixture's model.
fn peft_fixture() -> (Model, Lora, Lora, serde_json::Value) {
    let g: serde_json::Value = serde_json::from_slice(
        &std::fs::read(root().join("tests/fixtures/lora/golden.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(g["magic"], "bitlora-golden-lora");
    let model = Model::from_dir(
        &root()
            .join("tests/fixtures/formats")
            .join(g["base"].as_str().unwrap()),
    )
    .unwrap();
    let targets: Vec<&str> = g["lora"]["target_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let cfg = LoraConfig::new(
        g["lora"]["r"].as_u64().unwrap() as usize,
        g["lora"]["lora_alpha"].as_f64().unwrap() as f32,
        0.0,
        false,
        &targets,
    )
    .unwrap();
    let bytes = std::fs::read(root().join("tests/fixtures/lora/lora.safetensors")).unwrap();
    let start = peft::read_adapter(cfg.clone(), &model.config, "lora.safetensors", &bytes).unwrap();
    // PEFT's gradients are stored beside the adapter as "grad." + name.
    let w = bitlora_core::weights::WeightFiles::parse(&[("lora.safetensors", &bytes)]).unwrap();
    let tensors: Vec<bitlora_core::weights::OwnedTensor> =
        peft::adapter_tensors(&start, &model.config)
            .into_iter()
            .map(|t| {
                // PEFT saved them under its module names, with the adapter name "default".
                let name = format!("grad.{}", t.name.replace(".weight", ".default.weight"));
                let values = w.f32(&name, &t.shape).unwrap();
                bitlora_core::weights::OwnedTensor::f32(t.name, &t.shape, &values)
            })
            .collect();
    let grads = peft::read_adapter(
        cfg,
        &model.config,
        "grads",
        &bitlora_core::weights::serialize(&tensors),
    )
    .unwrap();
    (model, start, grads, g)
}

#[test]
fn gpu_lora_gradients_match_peft() {
    let (model, start, reference, g) = peft_fixture();
    let seq: Vec<u32> = g["sequences"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect();
    let gm = GpuModel::new(gpu(), &model).unwrap();
    let mut trainer = GpuTrainer::new(gm, &start.config, seq.len()).unwrap();
    let mut grads = start.zeros_like();
    let step = block(trainer.forward_backward(
        &start,
        &seq,
        &shifted(&seq),
        &mut grads,
        1.0,
        &mut Rng::new(0),
    ))
    .unwrap();
    let want = g["grad_loss"].as_f64().unwrap() as f32;
    let loss_rel = (step.loss - want).abs() / want.abs();
    println!("GPU loss {} vs PEFT {want} (rel {loss_rel:.1e})", step.loss);
    assert!(loss_rel <= 1e-5, "GPU loss {} vs PEFT {want}", step.loss);
    let (worst, name) = compare_grads("GPU vs PEFT", &grads, &reference, LORA_GRAD_NORMWISE);
    println!(
        "{} GPU gradient tensors match PEFT {}: worst normwise relative error {worst:.2e} ({name})",
        2 * grads.layers.iter().flatten().flatten().count(),
        g["peft"]
    );
}

/// A random model and a moved PEFT-initialised adapter (B = 0 would zero every dA).
fn setup(cfg: Config, lc: LoraConfig, seed: u64) -> (Model, Lora) {
    let model = Model::random(cfg, seed).0;
    let mut lora = Lora::init(&model.config, lc, seed ^ 0x1a);
    let mut rng = Rng::new(seed ^ 0xada);
    lora.for_each_mut(|_, _, v| v.iter_mut().for_each(|x| *x += 0.05 * rng.normal()));
    (model, lora)
}

/// One training call: tokens, targets, grad_scale.
type Call = (Vec<u32>, Vec<Option<u32>>, f32);

/// GPU vs CPU: losses and accumulated gradients over several calls with the same RNG.
/// `calls` are (tokens, targets, grad_scale); every call adds into the same gradients.
fn check_against_cpu(
    what: &str,
    model: &Model,
    gm: GpuModel,
    lora: &Lora,
    calls: &[Call],
    head_slabs: Option<usize>,
) {
    let max = calls.iter().map(|c| c.0.len()).max().unwrap();
    let mut trainer = GpuTrainer::new(gm, &lora.config, max).unwrap();
    if let Some(s) = head_slabs {
        // The head backward's sum over the vocabulary split across workgroups, as on GPUs.
        trainer.set_head_slabs(s).unwrap();
    }
    let (mut cpu_grads, mut gpu_grads) = (lora.zeros_like(), lora.zeros_like());
    let (mut cpu_rng, mut gpu_rng) = (Rng::new(77), Rng::new(77));
    for (k, (tokens, targets, scale)) in calls.iter().enumerate() {
        let want = train::forward_backward(
            model,
            lora,
            tokens,
            targets,
            &mut cpu_grads,
            *scale,
            &mut cpu_rng,
        )
        .unwrap();
        let got = block(trainer.forward_backward(
            lora,
            tokens,
            targets,
            &mut gpu_grads,
            *scale,
            &mut gpu_rng,
        ))
        .unwrap();
        assert_eq!(got.tokens, want.tokens, "{what} call {k}: counted targets");
        let rel = (got.loss - want.loss).abs() / want.loss.abs().max(1e-6);
        println!(
            "{what} call {k} (T={}, {} targets): loss GPU {} CPU {} (rel {rel:.1e})",
            tokens.len(),
            want.tokens,
            got.loss,
            want.loss
        );
        assert!(
            rel <= 1e-5,
            "{what} call {k}: loss GPU {} vs CPU {}",
            got.loss,
            want.loss
        );
        // The same number of draws: the next masks line up too.
        assert_eq!(
            gpu_rng.state(),
            cpu_rng.state(),
            "{what} call {k}: RNG draws differ"
        );
        // Validation loss (no dropout) agrees as well.
        let vl = block(trainer.loss(lora, tokens, targets)).unwrap();
        let vw = train::loss(model, lora, tokens, targets).unwrap();
        assert!(
            (vl.loss - vw.loss).abs() <= 1e-5 * vw.loss.abs().max(1e-6),
            "{what} call {k}: validation loss GPU {} vs CPU {}",
            vl.loss,
            vw.loss
        );
    }
    let (worst, name) = compare_grads(what, &gpu_grads, &cpu_grads, LORA_GRAD_NORMWISE);
    println!("{what}: gradients GPU vs CPU: worst normwise relative error {worst:.2e} ({name})");
}

fn random_tokens(rng: &mut Rng, t: usize, v: usize) -> Vec<u32> {
    (0..t).map(|_| rng.below(v as u64) as u32).collect()
}

#[test]
fn gpu_gradients_match_cpu_with_dropout_masks_and_accumulation() {
    let cfg = tiny_config(); // untied head, relu2, GQA 4/2
    let lc = LoraConfig::new(4, 8.0, 0.1, false, &["all-linear"]).unwrap();
    let (model, lora) = setup(cfg, lc, 3);
    let v = model.config.vocab_size;
    let mut rng = Rng::new(5);
    let a = random_tokens(&mut rng, 37, v);
    let b = random_tokens(&mut rng, 20, v);
    let c = random_tokens(&mut rng, 9, v);
    // Completion-only: the first 12 targets masked.
    let mut half = shifted(&a);
    half.iter_mut().take(12).for_each(|y| *y = None);
    // A single counted target, and none at all.
    let mut one = vec![None; c.len()];
    one[4] = Some(c[5]);
    let calls = vec![
        (a.clone(), shifted(&a), 0.5),
        (b.clone(), shifted(&b), 0.5),
        (a.clone(), half, 0.25),
        (c.clone(), one, 1.0),
        (c.clone(), vec![None; c.len()], 1.0),
    ];
    let gm = GpuModel::new(gpu(), &model).unwrap();
    check_against_cpu("tiny untied, dropout 0.1", &model, gm, &lora, &calls, None);
}

#[test]
fn gpu_gradients_match_cpu_tied_silu_split_head_subset_of_targets() {
    let cfg = Config {
        tie_word_embeddings: true,
        hidden_act: Activation::Silu,
        ..tiny_config()
    };
    let lc = LoraConfig::new(3, 6.0, 0.05, true, &["q_proj", "v_proj", "down_proj"]).unwrap();
    let (model, lora) = setup(cfg, lc, 11);
    let v = model.config.vocab_size;
    let mut rng = Rng::new(6);
    let a = random_tokens(&mut rng, 30, v);
    let calls = vec![(a.clone(), shifted(&a), 1.0)];
    // A binding limit of 4 rows of logits: the head splits into chunks along V and the loss
    // runs on windows of 4 rows.
    let gm = GpuModel::with_max_binding(gpu(), &model, (4 * v * 4) as u64).unwrap();
    assert!(gm.vocab_chunks() > 1);
    check_against_cpu(
        "tiny tied SiLU, split head",
        &model,
        gm,
        &lora,
        &calls,
        Some(3),
    );
}

#[test]
fn gpu_gradients_match_cpu_on_the_onebitllm_fixture() {
    let model = Model::from_dir(&root().join("tests/fixtures/formats/onebitllm-fp16")).unwrap();
    let lc = LoraConfig::new(4, 16.0, 0.0, false, &["all-linear"]).unwrap();
    let mut lora = Lora::init(&model.config, lc, 4);
    let mut rng = Rng::new(9);
    lora.for_each_mut(|_, _, v| v.iter_mut().for_each(|x| *x += 0.05 * rng.normal()));
    let a = random_tokens(&mut rng, 16, model.config.vocab_size);
    let gm = GpuModel::new(gpu(), &model).unwrap();
    check_against_cpu(
        "1bitLLM layout",
        &model,
        gm,
        &lora,
        &[(a.clone(), shifted(&a), 1.0)],
        Some(4),
    );
}

#[test]
fn gpu_trainer_refuses_bad_inputs_by_name() {
    let (model, lora) = setup(
        tiny_config(),
        LoraConfig::new(2, 4.0, 0.0, false, &["q_proj"]).unwrap(),
        1,
    );
    let gm = GpuModel::new(gpu(), &model).unwrap();
    // A trainer that cannot be built gives the model back.
    let Err(failed) = GpuTrainer::try_new(gm, &lora.config, 0) else {
        panic!("a trainer for 0 tokens was built");
    };
    let (e, gm) = *failed;
    assert!(e.to_string().contains("no tokens"), "{e}");
    let mut tr = GpuTrainer::new(gm, &lora.config, 8).unwrap();
    let mut grads = lora.zeros_like();
    let mut rng = Rng::new(0);
    let e = block(tr.forward_backward(&lora, &[1; 9], &[None; 9], &mut grads, 1.0, &mut rng))
        .unwrap_err();
    assert!(e.to_string().contains("9"), "{e}");
    let e = block(tr.loss(&lora, &[1, 2], &[Some(600), None])).unwrap_err();
    assert!(e.to_string().contains("token id 600"), "{e}");
    let other = Lora::init(
        &model.config,
        LoraConfig::new(2, 4.0, 0.0, false, &["k_proj"]).unwrap(),
        1,
    );
    let e = block(tr.loss(&other, &[1, 2], &[Some(3), None])).unwrap_err();
    assert!(e.to_string().contains("rank 2"), "{e}");
}

#[test]
fn gpu_training_lowers_validation_loss_on_real_text() {
    let dir = root().join("web/models/default");
    let model = Model::from_dir(&dir).unwrap();
    let tok = Tokenizer::from_bytes(
        "tokenizer.json",
        &std::fs::read(dir.join("tokenizer.json")).unwrap(),
    )
    .unwrap();
    let eos = model.config.eos_token_ids[0];
    let opts = data::DataOptions {
        context: 48,
        completions_only: false,
        val_fraction: 0.0,
        seed: 0,
    };
    let load = |name: &str| {
        let bytes = std::fs::read(root().join("data/devil").join(name)).unwrap();
        let (ex, format) = data::parse(name, &bytes).unwrap();
        data::build(name, &ex, format, &tok, None, eos, &opts)
            .unwrap()
            .train
    };
    let train_seqs = load("train.jsonl");
    let val: Vec<_> = load("val.jsonl").into_iter().take(4).collect();
    let lc = LoraConfig::new(8, 16.0, 0.05, false, &["all-linear"]).unwrap();
    let mut lora = Lora::init(&model.config, lc.clone(), 0);
    let steps = 16;
    let mut opt = AdamW::new(
        AdamWConfig {
            lr: 3e-3,
            warmup_steps: 2,
            total_steps: steps,
            schedule: Schedule::Cosine,
            ..Default::default()
        },
        &lora,
    );
    let gm = GpuModel::new(gpu(), &model).unwrap();
    let mut tr = GpuTrainer::new(gm, &lc, opts.context).unwrap();
    let before = block(tr.mean_loss(&lora, &val)).unwrap().unwrap();
    let mut rng = Rng::new(1);
    let start = std::time::Instant::now();
    let mut tokens = 0;
    for step in 0..steps {
        let seq = &train_seqs[(step * 7) % train_seqs.len()];
        let mut grads = lora.zeros_like();
        let out =
            block(tr.forward_backward(&lora, &seq.tokens, &seq.targets, &mut grads, 1.0, &mut rng))
                .unwrap();
        assert!(out.loss.is_finite());
        tokens += seq.tokens.len();
        opt.step(&mut lora, &mut grads);
    }
    let secs = start.elapsed().as_secs_f64();
    let after = block(tr.mean_loss(&lora, &val)).unwrap().unwrap();
    // The CPU reference agrees on the trained adapter's validation loss.
    let cpu_after = bitlora_core::trainer::mean_loss(&model, &lora, &val)
        .unwrap()
        .unwrap();
    println!(
        "GPU training ({steps} steps of {} tokens, {:.0} tok/s on this adapter): validation loss {before:.4} -> {after:.4} (CPU {cpu_after:.4})",
        opts.context,
        tokens as f64 / secs
    );
    assert!((after - cpu_after).abs() < 1e-3 * cpu_after);
    assert!(
        after < before - 0.3,
        "validation loss {before} -> {after}: GPU training did not learn"
    );
}
