//! GPU LoRA training. The op-level twin (`GpuTrainer::forward_backward`, `loss`) against
//! PyTorch + PEFT's gradients (tests/fixtures/lora) and against the CPU reference
//! (`bitlora_core::train`) with dropout, masked targets, accumulation, tied and untied heads,
//! and a head split along the vocabulary; training on real text through it with core's AdamW
//! lowers the validation loss. Core's training loop (`Trainer`) on the GPU backend
//! (`GpuBackend`: AdamW, the adapter and Adam's moments resident on the GPU) against the same
//! loop on the CPU reference (`CpuBackend`) and against a twin backend (the GPU's read-back
//! gradients with core's `AdamW::step`), each step from the GPU's state through a checkpoint;
//! a run whose state is never read, a checkpoint resumed on a fresh GPU trainer, accumulation
//! of three sequences, the NaN guard, the bytes a resident step reads back (only the losses
//! and the norm) against `Placement::Host`, and the host fallback when the state does not fit
//! a binding. Fails, never skips, without a GPU adapter (tests/common's `gpu()`).

mod common;

use std::borrow::BorrowMut;
use std::path::{Path, PathBuf};

use bitlora_core::data::{Dataset, Sequence, epoch_order};
use bitlora_core::lora::{Lora, LoraConfig};
use bitlora_core::model::tiny_config;
use bitlora_core::optim::{AdamW, AdamWConfig, AdamWScalars, Schedule};
use bitlora_core::rng::Rng;
use bitlora_core::tolerance::{
    ADAMW_STATE_NORMWISE, LORA_GRAD_NORMWISE, TRAIN_STATE_BACKENDS, TRAIN_STEP_BACKENDS,
    TRAIN_STEP_SAME_KERNELS,
};
use bitlora_core::train::StepLoss;
use bitlora_core::trainer::{
    Accumulate, AdapterState, Backend, Checkpoint, CpuBackend, SequenceResult, StepReport,
    TrainOptions, Trainer,
};
use bitlora_core::{Activation, Config, Model, Tokenizer, data, peft, train};
use bitlora_gpu::{GpuBackend, GpuError, GpuModel, GpuTrainer, Placement, Recompute, Role};
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

/// Normwise relative error over the whole adapter: the largest |ours - ref| of any tensor over
/// the largest |ref| of any tensor.
fn whole_adapter_normwise(ours: &Lora, reference: &Lora) -> f32 {
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    ours.clone().for_each_mut(|_, _, t| xs.extend_from_slice(t));
    reference
        .clone()
        .for_each_mut(|_, _, t| ys.extend_from_slice(t));
    assert_eq!(xs.len(), ys.len(), "adapters of other shapes");
    let scale = ys.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = xs
        .iter()
        .zip(&ys)
        .fold(0f32, |m, (u, v)| m.max((u - v).abs()));
    if err == 0.0 {
        0.0
    } else {
        err / scale.max(f32::MIN_POSITIVE)
    }
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

/// Activation recomputation (`Recompute::On`: the forward keeps each layer's input and one
/// layer's worth of the rest, the backward runs each layer's forward again) gives the same
/// bits as keeping every layer's activations: losses, RNG draws, every dA and dB, over calls
/// of several lengths with dropout on every projection, and a validation loss; and it
/// allocates less.
#[test]
fn recomputed_activations_give_the_same_bits_in_fewer_bytes() {
    let cfg = Config {
        num_hidden_layers: 3,
        ..tiny_config()
    };
    let lc = LoraConfig::new(4, 8.0, 0.1, false, &["all-linear"]).unwrap();
    let (model, lora) = setup(cfg, lc, 21);
    let v = model.config.vocab_size;
    let mut rng = Rng::new(8);
    let calls: Vec<Call> = [29, 7, 29]
        .iter()
        .map(|&t| {
            let a = random_tokens(&mut rng, t, v);
            (a.clone(), shifted(&a), 0.5)
        })
        .collect();
    let run = |recompute: Recompute| {
        let mut gm = GpuModel::new(gpu(), &model).unwrap();
        gm.set_recompute(recompute);
        let mut tr = GpuTrainer::new(gm, &lora.config, 29).unwrap();
        assert_eq!(tr.plan().recompute, recompute == Recompute::On);
        let mut grads = lora.zeros_like();
        let mut rng = Rng::new(77);
        let mut losses = Vec::new();
        for (tokens, targets, scale) in &calls {
            let out =
                block(tr.forward_backward(&lora, tokens, targets, &mut grads, *scale, &mut rng))
                    .unwrap();
            losses.push(out.loss.to_bits());
        }
        let (tokens, targets, _) = &calls[1];
        losses.push(
            block(tr.loss(&lora, tokens, targets))
                .unwrap()
                .loss
                .to_bits(),
        );
        (
            losses,
            rng.state(),
            grads,
            tr.bytes(),
            tr.plan().bytes_of(Role::Saved),
        )
    };
    let (kept, kept_rng, kept_grads, kept_bytes, kept_saved) = run(Recompute::Off);
    let (again, again_rng, again_grads, again_bytes, again_saved) = run(Recompute::On);
    assert_eq!(again, kept, "losses (bits) recomputing vs keeping");
    assert_eq!(again_rng, kept_rng, "RNG draws recomputing vs keeping");
    compare_grads("recompute vs keep", &again_grads, &kept_grads, 0.0);
    // Kept: h for L+1 layers, seven more (T, width) tensors and the u's for each of L; recomputed:
    // the seven and the u's once.
    let c = model.config.hidden_size;
    let h = (4 * 29 * c * (model.config.num_hidden_layers + 1)) as u64;
    let per_layer = (kept_saved - h) / model.config.num_hidden_layers as u64;
    assert_eq!(again_saved, h + per_layer, "saved bytes recomputing");
    assert_eq!(kept_bytes - again_bytes, kept_saved - again_saved);
    println!(
        "recompute: saved activations {kept_saved} -> {again_saved} bytes, trainer {kept_bytes} -> {again_bytes}"
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

/// The resident state reads back through a readback buffer smaller than the flat buffers,
/// a chunk at a time: an adapter of more than `READBACK_CHUNK_ROWS` rows (two chunks, the
/// second partial) comes back bit for bit, with its moments, and the table's readback entry
/// is one chunk, not the flat size.
#[test]
fn resident_state_reads_back_in_chunks() {
    let cfg = Config {
        num_hidden_layers: 4,
        ..tiny_config()
    };
    let lc = LoraConfig::new(256, 16.0, 0.0, false, &["all-linear"]).unwrap();
    let (model, lora) = setup(cfg, lc, 5);
    let floats = lora.num_params();
    let chunk = bitlora_gpu::train::READBACK_CHUNK_ROWS * 4096;
    assert!(
        floats > chunk && floats < 2 * chunk,
        "{floats} floats: not two chunks"
    );
    let gm = GpuModel::new(gpu(), &model).unwrap();
    let tr = GpuTrainer::new(gm, &lora.config, 4).unwrap();
    assert_eq!(
        tr.plan().get("optimizer readback").unwrap().bytes(),
        4 * chunk as u64
    );
    let mut rng = Rng::new(3);
    let mut noise = |l: &Lora| {
        let mut l = l.clone();
        l.for_each_mut(|_, _, v| v.iter_mut().for_each(|x| *x = rng.normal()));
        l
    };
    let state = AdapterState {
        m: noise(&lora),
        v: noise(&lora),
        lora: lora.clone(),
    };
    let mut gs = bitlora_gpu::GpuState::new(&tr, state.clone(), Placement::Auto).unwrap();
    assert!(gs.resident());
    let back = block(gs.read()).unwrap();
    for (what, a, b) in [
        ("adapter", &back.lora, &state.lora),
        ("m", &back.m, &state.m),
        ("v", &back.v, &state.v),
    ] {
        let bits = |l: &Lora| {
            let mut out = Vec::new();
            l.clone()
                .for_each_mut(|_, _, x| out.extend(x.iter().map(|f| f.to_bits())));
            out
        };
        let (ours, want) = (bits(a), bits(b));
        assert_eq!(ours.len(), floats);
        assert!(ours == want, "{what} differs after a chunked readback");
    }
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
        max_val_sequences: 0,
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

/// Training data for the `Trainer` tests: `n_train` + `n_val` sequences of awkward, varied
/// lengths (9..=33 tokens) with a few targets masked, tokens drawn from 3..V.
fn dataset(rng: &mut Rng, v: usize, n_train: usize, n_val: usize) -> Dataset {
    let mut seqs: Vec<Sequence> = (0..n_train + n_val)
        .map(|k| {
            let t = 9 + (k * 7) % 25;
            let toks: Vec<u32> = (0..=t)
                .map(|_| 3 + rng.below(v as u64 - 3) as u32)
                .collect();
            let mut targets: Vec<Option<u32>> = toks[1..].iter().map(|&x| Some(x)).collect();
            // Completion-only style: the first few targets of every third sequence masked.
            if k % 3 == 1 {
                targets.iter_mut().take(4).for_each(|y| *y = None);
            }
            Sequence {
                tokens: toks[..t].to_vec(),
                targets,
            }
        })
        .collect();
    let val = seqs.split_off(n_train);
    Dataset {
        examples: seqs.len() + val.len(),
        train: seqs,
        val,
        format: "test",
        truncated: 0,
    }
}

/// The twin of the resident GPU backend, as a backend of core's loop: the GPU's gradients
/// (`GpuTrainer::forward_backward`, every dA and dB read back each sequence, summed on the
/// host) and core's `AdamW::step` on the CPU, validation with `GpuTrainer::loss` from the host's
/// adapter. `G` is how it holds the GPU trainer: borrowed from a resident run (one GPU trainer
/// serving both in turn) or its own.
struct Twin<G> {
    gpu: G,
    optim: AdamWConfig,
    /// The adapter and the optimizer (moments and step count), on the host.
    held: Option<(Lora, AdamW)>,
    /// The step's gradients so far.
    grads: Option<Lora>,
}

impl<G: BorrowMut<GpuTrainer>> Twin<G> {
    fn new(gpu: G, optim: &AdamWConfig) -> Twin<G> {
        Twin {
            gpu,
            optim: optim.clone(),
            held: None,
            grads: None,
        }
    }
}

impl<G: BorrowMut<GpuTrainer>> Backend for Twin<G> {
    type Error = GpuError;

    fn name(&self) -> &'static str {
        "twin"
    }

    fn load(&mut self, state: AdapterState) -> Result<(), GpuError> {
        let step = self.held.as_ref().map_or(0, |h| h.1.step);
        self.grads = None;
        let opt = AdamW {
            config: self.optim.clone(),
            m: state.m,
            v: state.v,
            step,
        };
        self.held = Some((state.lora, opt));
        Ok(())
    }

    async fn forward_backward(
        &mut self,
        seq: &Sequence,
        acc: Accumulate,
        scale: f32,
        rng: &mut Rng,
    ) -> Result<SequenceResult, GpuError> {
        let Twin {
            gpu, held, grads, ..
        } = self;
        let lora = &held.as_ref().expect("the twin holds an adapter").0;
        let mut g = match grads.take() {
            Some(g) if !acc.first => g,
            _ => lora.zeros_like(),
        };
        let loss = gpu
            .borrow_mut()
            .forward_backward(lora, &seq.tokens, &seq.targets, &mut g, scale, rng)
            .await?;
        let grad_norm = acc.last.then(|| AdamW::grad_norm(&g));
        *grads = Some(g);
        Ok(SequenceResult { loss, grad_norm })
    }

    async fn loss(&mut self, seq: &Sequence) -> Result<StepLoss, GpuError> {
        let lora = &self.held.as_ref().expect("the twin holds an adapter").0;
        self.gpu
            .borrow_mut()
            .loss(lora, &seq.tokens, &seq.targets)
            .await
    }

    /// `AdamW::step` with the twin's own step count and gradient norm; the loop's scalars must
    /// be the ones they give.
    fn update(&mut self, s: &AdamWScalars) -> Result<(), GpuError> {
        let mut grads = self
            .grads
            .take()
            .expect("an update after a step's gradients");
        let (lora, opt) = self.held.as_mut().expect("the twin holds an adapter");
        let own = AdamWScalars::new(&opt.config, opt.step, AdamW::grad_norm(&grads));
        assert_eq!(
            *s, own,
            "the loop's AdamW scalars are not those of the twin's step count and norm"
        );
        opt.step(lora, &mut grads);
        Ok(())
    }

    async fn state(&mut self) -> Result<AdapterState, GpuError> {
        let (lora, opt) = self.held.as_ref().expect("the twin holds an adapter");
        Ok(AdapterState {
            lora: lora.clone(),
            m: opt.m.clone(),
            v: opt.v.clone(),
        })
    }
}

/// A run on the CPU reference.
type CpuRun<'a> = Trainer<CpuBackend<&'a Model>>;
/// A run on the GPU backend (resident unless the state does not fit or `Placement::Host`).
type GpuRun = Trainer<GpuBackend>;

/// The longest sequence of `data` (what a GPU trainer for it must hold).
fn longest(data: &Dataset) -> usize {
    data.train
        .iter()
        .chain(&data.val)
        .map(|s| s.tokens.len())
        .max()
        .unwrap()
}

/// A GPU run of `lora` on `data` over `gm` (`model` on the GPU), its state placed as
/// `placement` says.
fn gpu_run(
    model: &Model,
    gm: GpuModel,
    lora: &Lora,
    optim: &AdamWConfig,
    data: &Dataset,
    options: &TrainOptions,
    placement: Placement,
) -> GpuRun {
    let gt = GpuTrainer::new(gm, &lora.config, longest(data)).unwrap();
    Trainer::new(
        GpuBackend::with_placement(gt, placement),
        &model.config,
        lora.clone(),
        optim.clone(),
        data.clone(),
        options.clone(),
    )
    .unwrap()
}

/// Reads a checkpoint of a run on `model`.
fn read_checkpoint(model: &Model, bytes: &[u8]) -> Checkpoint {
    Checkpoint::read(&model.config, "checkpoint.safetensors", bytes).unwrap()
}

/// A CPU run resumed from `bytes` (a checkpoint of a run on `data`).
fn fork_cpu<'a>(model: &'a Model, data: &Dataset, bytes: &[u8]) -> CpuRun<'a> {
    Trainer::resume(
        CpuBackend::new(model),
        &model.config,
        data.clone(),
        read_checkpoint(model, bytes),
    )
    .unwrap()
}

/// The twin resumed from `bytes`, on the GPU trainer `gpu`, its optimizer at the checkpoint's
/// step count.
fn fork_twin<G: BorrowMut<GpuTrainer>>(
    gpu: G,
    model: &Model,
    optim: &AdamWConfig,
    data: &Dataset,
    bytes: &[u8],
) -> Trainer<Twin<G>> {
    let mut t = Trainer::resume(
        Twin::new(gpu, optim),
        &model.config,
        data.clone(),
        read_checkpoint(model, bytes),
    )
    .unwrap();
    let n = t.optimizer_steps();
    t.backend_mut().held.as_mut().unwrap().1.step = n;
    t
}

/// Steps taken and optimizer updates applied.
fn counts<B: Backend>(t: &Trainer<B>) -> (usize, usize) {
    (t.step, t.optimizer_steps())
}

/// Every tensor of `a` minus `b`'s.
fn minus(a: &Lora, b: &Lora) -> Lora {
    let mut d = a.clone();
    let mut rhs = Vec::new();
    b.clone().for_each_mut(|_, _, t| rhs.push(t.clone()));
    let mut k = 0;
    d.for_each_mut(|_, _, t| {
        t.iter_mut().zip(&rhs[k]).for_each(|(x, y)| *x -= y);
        k += 1;
    });
    d
}

fn rel(a: f32, b: f32) -> f32 {
    (a - b).abs() / b.abs().max(1e-12)
}

/// The settings of the `Trainer` tests: warmup then cosine, weight decay, clipping that acts
/// (the tiny model's gradient norms are ~10), accumulation 2, dropout, validation every 2.
fn trainer_settings(steps: usize) -> (LoraConfig, AdamWConfig, TrainOptions) {
    let lc = LoraConfig::new(4, 8.0, 0.1, false, &["all-linear"]).unwrap();
    let optim = AdamWConfig {
        lr: 1e-2,
        weight_decay: 0.1,
        max_grad_norm: Some(0.5),
        schedule: Schedule::Cosine,
        warmup_steps: 2,
        total_steps: steps,
        ..Default::default()
    };
    let options = TrainOptions {
        steps,
        accumulation: 2,
        eval_every: 2,
        seed: 7,
    };
    (lc, optim, options)
}

/// One step of the resident GPU run `res` (`Trainer<GpuBackend>`) against core's loop on the
/// CPU (`Trainer<CpuBackend>`) and against the twin (the GPU's read-back gradients with core's
/// AdamW, `Twin`), both resumed from a checkpoint of the state the GPU holds before the step
/// (read back from it). The twin runs on `res`'s own GPU trainer, so the resident run finds the
/// twin's adapter in the trainer's buffers at its next step and must restore its own. Each step
/// is compared from one shared state, never after the paths have run apart: AdamW turns
/// last-ulp differences into full-size updates of the elements whose gradients are near zero,
/// and a last-ulp difference in front of the int8 quantizer flips a code now and then (more
/// often on some GPUs than others: on an H100 one such flip, carried through five steps, moved
/// the grad norm by 1.2e-3), so free-running paths drift apart by amounts no tolerance can
/// bound. From a shared state the twin computes the same gradients bit for bit, so the moments
/// and the update must agree with it to ADAMW_STATE_NORMWISE per tensor. Against the CPU the
/// loss, norm and validation loss agree to TRAIN_STEP_BACKENDS, and m and v (linear in the
/// gradient and its square) to TRAIN_STATE_BACKENDS over the whole adapter, which allows for a
/// flipped code (this happens on lavapipe in
/// `gpu_backend_skips_a_non_finite_step_without_touching_the_state`'s step 2); the per-tensor
/// differences are reported. So is the update against the CPU: an element whose gradient is
/// within rounding of zero may move by +lr on one backend and -lr on the other. The gradients
/// themselves are held to LORA_GRAD_NORMWISE per tensor against the CPU and PEFT by the tests
/// above, on inputs where no code flips. A skipped step must leave the adapter and the moments
/// bit for bit as they were on all three.
/// Returns the GPU's report and the worst normwise differences (to the twin, to the CPU).
fn step_against_cpu_and_twin(
    what: &str,
    model: &Model,
    res: &mut GpuRun,
) -> (StepReport, f32, f32) {
    assert!(
        res.backend().resident(),
        "{what}: the GPU run is not resident"
    );
    let before = block(res.state()).unwrap();
    let counts_before = counts(res);
    let bytes = block(res.checkpoint()).unwrap();
    let (optim, data) = (res.optimizer_config().clone(), res.data.clone());
    let mut cpu = fork_cpu(model, &data, &bytes);
    assert!(
        block(cpu.state()).unwrap() == before && counts(&cpu) == counts_before,
        "{what}: the CPU run forked through the checkpoint is not in the GPU's state"
    );
    let want = block(cpu.step()).unwrap();
    let got = block(res.step()).unwrap();
    let (tw, tw_state, tw_counts) = {
        let mut twin = fork_twin(
            res.backend_mut().trainer_mut(),
            model,
            &optim,
            &data,
            &bytes,
        );
        assert!(
            block(twin.state()).unwrap() == before && counts(&twin) == counts_before,
            "{what}: the twin forked through the checkpoint is not in the GPU's state"
        );
        let r = block(twin.step()).unwrap();
        (r, block(twin.state()).unwrap(), counts(&twin))
    };
    println!(
        "{what} (lr {}): loss CPU {} GPU {} twin {}; grad norm CPU {} GPU {} twin {}; val CPU {:?} GPU {:?} twin {:?}; skipped CPU {:?} GPU {:?}",
        got.lr,
        want.loss,
        got.loss,
        tw.loss,
        want.grad_norm,
        got.grad_norm,
        tw.grad_norm,
        want.val_loss,
        got.val_loss,
        tw.val_loss,
        want.skipped,
        got.skipped
    );
    for (name, r) in [("the CPU", &want), ("the twin", &tw)] {
        assert_eq!(
            (got.step, got.epoch, got.tokens, got.lr),
            (r.step, r.epoch, r.tokens, r.lr),
            "{what}: step, epoch, tokens, lr of the GPU vs {name}"
        );
    }
    assert_eq!(
        (got.skipped.is_some(), tw.skipped.is_some()),
        (want.skipped.is_some(), want.skipped.is_some()),
        "{what}: skipped on one path only"
    );
    assert_eq!(
        (got.val_loss.is_some(), tw.val_loss.is_some()),
        (want.val_loss.is_some(), want.val_loss.is_some()),
        "{what}: validation"
    );
    let mut pairs = vec![];
    if got.skipped.is_none() {
        pairs.push(("loss", got.loss, want.loss, tw.loss));
        pairs.push(("grad norm", got.grad_norm, want.grad_norm, tw.grad_norm));
    }
    if let (Some(a), Some(b), Some(c)) = (got.val_loss, want.val_loss, tw.val_loss) {
        pairs.push(("validation loss", a, b, c));
    }
    for (name, gpu_v, cpu_v, twin_v) in pairs {
        let (r_cpu, r_twin) = (rel(gpu_v, cpu_v), rel(gpu_v, twin_v));
        println!(
            "  {name}: relative difference to the CPU {r_cpu:.1e} (TRAIN_STEP_BACKENDS {TRAIN_STEP_BACKENDS:.0e}), to the twin {r_twin:.1e} (TRAIN_STEP_SAME_KERNELS {TRAIN_STEP_SAME_KERNELS:.0e})"
        );
        assert!(
            r_cpu <= TRAIN_STEP_BACKENDS && r_twin <= TRAIN_STEP_SAME_KERNELS,
            "{what}: {name} GPU {gpu_v} CPU {cpu_v} twin {twin_v}"
        );
    }
    let after = block(res.state()).unwrap();
    let cpu_after = block(cpu.state()).unwrap();
    assert_eq!(
        counts(res),
        counts(&cpu),
        "{what}: counts of the GPU vs the CPU"
    );
    assert_eq!(
        counts(res),
        tw_counts,
        "{what}: counts of the GPU vs the twin"
    );
    if got.skipped.is_some() {
        for (name, s) in [("GPU", &after), ("CPU", &cpu_after), ("twin", &tw_state)] {
            assert!(
                s == &before,
                "{what}: a skipped step changed the {name}'s adapter or moments"
            );
        }
        assert_eq!(
            counts(res),
            (counts_before.0 + 1, counts_before.1),
            "{what}: a skipped step's counts"
        );
        return (got, 0.0, 0.0);
    }
    assert_eq!(
        counts(res),
        (counts_before.0 + 1, counts_before.1 + 1),
        "{what}: an applied step's counts"
    );
    let (mut to_twin, mut to_cpu) = (0f32, 0f32);
    for (name, ours, cpu_v, twin_v, asserted) in [
        (
            "adapter update",
            minus(&after.lora, &before.lora),
            minus(&cpu_after.lora, &before.lora),
            minus(&tw_state.lora, &before.lora),
            false,
        ),
        (
            "m",
            after.m.clone(),
            cpu_after.m.clone(),
            tw_state.m.clone(),
            true,
        ),
        (
            "v",
            after.v.clone(),
            cpu_after.v.clone(),
            tw_state.v.clone(),
            true,
        ),
    ] {
        let (w_twin, n_twin) = compare_grads(
            &format!("{what}: {name} vs the twin"),
            &ours,
            &twin_v,
            ADAMW_STATE_NORMWISE,
        );
        let (w_cpu, n_cpu) = compare_grads(
            &format!("{what}: {name} vs the CPU"),
            &ours,
            &cpu_v,
            f32::INFINITY,
        );
        let whole = whole_adapter_normwise(&ours, &cpu_v);
        println!(
            "  {name}: worst normwise difference to the twin {w_twin:.2e} ({n_twin}; ADAMW_STATE_NORMWISE {ADAMW_STATE_NORMWISE:.0e}); to the CPU {whole:.2e} over the whole adapter ({}), {w_cpu:.2e} in {n_cpu} (reported)",
            if asserted {
                format!("TRAIN_STATE_BACKENDS {TRAIN_STATE_BACKENDS:.0e}")
            } else {
                "reported".to_string()
            }
        );
        assert!(
            !asserted || whole <= TRAIN_STATE_BACKENDS,
            "{what}: {name} vs the CPU: {whole:e} of the whole adapter's largest value (tolerance {TRAIN_STATE_BACKENDS:e})"
        );
        to_twin = to_twin.max(w_twin);
        if asserted {
            to_cpu = to_cpu.max(whole);
        }
    }
    (got, to_twin, to_cpu)
}

/// Core's loop on the resident GPU backend (AdamW, the adapter and Adam's moments in GPU
/// buffers) for five steps: each step against the CPU reference's run and against the twin,
/// from the state the GPU holds (`step_against_cpu_and_twin`): warmup, cosine, weight decay,
/// clipping (norms ~10 against a maximum of 0.5), accumulation 2, dropout and validation every
/// 2. One GPU trainer serves the resident run and the twin in turn, and a loss of another
/// adapter in between: each must find its own adapter there. A second resident run does the
/// same five steps with no state read at all (the adapter and the moments never leave the
/// GPU): the same reports and, at the end, the same state bit for bit. A checkpoint written
/// after step 3, resumed into a fresh run on a fresh `GpuTrainer`, continues exactly as the run
/// did.
#[test]
fn gpu_backend_keeps_adamw_on_the_gpu_and_matches_the_cpu_trainer() {
    const STEPS: usize = 5;
    let (lc, optim, options) = trainer_settings(STEPS);
    let (model, lora) = setup(tiny_config(), lc, 21);
    let data = dataset(&mut Rng::new(22), model.config.vocab_size, 7, 2);
    let make = || {
        let gm = GpuModel::new(gpu(), &model).unwrap();
        gpu_run(&model, gm, &lora, &optim, &data, &options, Placement::Auto)
    };
    let (mut res, mut free) = (make(), make());
    assert!(res.backend().resident() && free.backend().resident());
    let l0 = block(res.backend_mut().trainer_mut().mean_loss(&lora, &data.val))
        .unwrap()
        .unwrap();
    let mut reports = Vec::new();
    let mut checkpoint = None;
    let (mut to_twin, mut to_cpu) = (0f32, 0f32);
    for step in 1..=STEPS {
        let (got, w_twin, w_cpu) =
            step_against_cpu_and_twin(&format!("step {step}"), &model, &mut res);
        assert!(got.skipped.is_none(), "step {step}: {:?}", got.skipped);
        assert!(
            got.grad_norm > optim.max_grad_norm.unwrap(),
            "step {step}: clipping does not act"
        );
        (to_twin, to_cpu) = (to_twin.max(w_twin), to_cpu.max(w_cpu));
        assert_eq!(
            block(free.step()).unwrap(),
            got,
            "step {step}: the run whose state is never read"
        );
        if step == 3 {
            checkpoint = Some(block(res.checkpoint()).unwrap());
        }
        reports.push(got);
    }
    let end = block(res.state()).unwrap();
    assert!(end.lora != lora, "the adapter did not train");
    assert!(
        block(free.state()).unwrap() == end && counts(&free) == counts(&res),
        "the run whose state was never read ends in another state"
    );

    // Another adapter's loss between resident passes: the trainer's adapter buffers must not
    // be taken for the run's (the run's validation restores its own from the flat buffers).
    let g = res.backend_mut().trainer_mut();
    assert_eq!(block(g.mean_loss(&lora, &data.val)).unwrap(), Some(l0));
    let v = block(res.validate()).unwrap();
    assert_eq!(v, reports[STEPS - 1].val_loss, "validation after the run");
    let g = res.backend_mut().trainer_mut();
    assert_eq!(block(g.mean_loss(&lora, &data.val)).unwrap(), Some(l0));

    // Resume the step-3 checkpoint into a fresh run on a fresh GpuTrainer: the same reports
    // bit for bit, and the same state at the end.
    let gm = GpuModel::new(gpu(), &model).unwrap();
    let gt = GpuTrainer::new(gm, &lora.config, longest(&data)).unwrap();
    let mut resumed = Trainer::resume(
        GpuBackend::new(gt),
        &model.config,
        data.clone(),
        read_checkpoint(&model, &checkpoint.unwrap()),
    )
    .unwrap();
    assert!(resumed.backend().resident());
    assert_eq!(counts(&resumed), (3, 3));
    for want in &reports[3..] {
        assert_eq!(&block(resumed.step()).unwrap(), want, "resumed");
    }
    assert!(resumed.done());
    assert!(
        block(resumed.state()).unwrap() == end && counts(&resumed) == counts(&res),
        "resumed state differs"
    );
    println!(
        "{STEPS} steps, each from the GPU's state: worst normwise difference of the update, m and v to the twin {to_twin:.2e} (per tensor), of m and v to the CPU {to_cpu:.2e} (over the whole adapter); a run whose state is never read gives the same reports and state; resumed from step 3 on a fresh GPU trainer: steps 4-5 and the state identical"
    );
}

/// Accumulation of three sequences of different lengths per step on the resident path (the
/// first sequence sets the flat gradients, the others add into them, the last reduces the
/// norm), an epoch boundary inside step 3 and validation every step: each step against the CPU
/// and the twin (`step_against_cpu_and_twin`). A second resident run, driven one unit at a
/// time (`Trainer::advance`), reads back per unit only the per-row losses (4 T bytes), plus
/// the squared norm after a step's last sequence (4 (T + 1)), gives the same reports and ends
/// in the same state bit for bit.
#[test]
fn gpu_backend_accumulates_three_sequences_as_the_cpu_trainer() {
    const STEPS: usize = 3;
    let (lc, optim, mut options) = trainer_settings(STEPS);
    options.accumulation = 3;
    options.eval_every = 1;
    let (model, lora) = setup(tiny_config(), lc, 61);
    let data = dataset(&mut Rng::new(62), model.config.vocab_size, 7, 2);
    let make = || {
        let gm = GpuModel::new(gpu(), &model).unwrap();
        gpu_run(&model, gm, &lora, &optim, &data, &options, Placement::Auto)
    };
    let (mut res, mut units) = (make(), make());
    let n = data.train.len();
    let (mut drawn, mut epoch) = (0usize, 0);
    let (mut to_twin, mut to_cpu) = (0f32, 0f32);
    for step in 1..=STEPS {
        let (got, w_twin, w_cpu) =
            step_against_cpu_and_twin(&format!("step {step}"), &model, &mut res);
        assert!(got.skipped.is_none(), "step {step}: {:?}", got.skipped);
        assert!(got.val_loss.is_some(), "step {step}: no validation");
        epoch = got.epoch;
        (to_twin, to_cpu) = (to_twin.max(w_twin), to_cpu.max(w_cpu));
        // The same step one unit at a time; the data order as the loop draws it.
        let mut k = 0;
        let report = loop {
            let out = block(units.advance()).unwrap();
            let read = units.backend().trainer().read_bytes();
            let (what, t, norm) = if k < options.accumulation {
                let i = epoch_order(n, options.seed, (drawn / n) as u64)[drawn % n];
                drawn += 1;
                let last = k + 1 == options.accumulation;
                (
                    format!("training sequence {i}"),
                    data.train[i].tokens.len(),
                    last,
                )
            } else {
                let j = k - options.accumulation;
                (
                    format!("validation sequence {j}"),
                    data.val[j].tokens.len(),
                    false,
                )
            };
            let want = 4 * (t + norm as usize) as u64;
            assert_eq!(
                read,
                want,
                "step {step} unit {k} ({what}, T = {t}): bytes read back (want the losses{})",
                if norm { " and the norm" } else { "" }
            );
            k += 1;
            if let Some(r) = out {
                break r;
            }
        };
        assert_eq!(
            k,
            options.accumulation + data.val.len(),
            "step {step}: units"
        );
        assert_eq!(report, got, "step {step}: the run driven unit by unit");
    }
    assert_eq!(epoch, 1, "the run did not cross an epoch");
    assert!(
        block(units.state()).unwrap() == block(res.state()).unwrap(),
        "the run driven unit by unit ends in another state"
    );
    println!(
        "{STEPS} steps of 3 sequences, each from the GPU's state: worst normwise difference of the update, m and v to the twin {to_twin:.2e} (per tensor), of m and v to the CPU {to_cpu:.2e} (over the whole adapter); unit by unit: only the losses (and the norm) read back, the same reports and state"
    );
}

/// What a step reads back from the GPU. Resident: after a step of one sequence of T tokens,
/// only the T per-row losses and the squared gradient norm (4 (T + 1) bytes), and a validation
/// pass only its losses (4 T); never the adapter or its gradients. `Placement::Host` (AdamW on
/// the CPU) reads back every dA and dB as well: exactly 4 (max_tokens + the adapter's floats)
/// bytes. The two placements give the same reports: step 1's loss bit for bit (the same
/// adapter through the same kernels), its norm to TRAIN_STEP_SAME_KERNELS (an f32 tree on the
/// GPU, an f64 sum on the host), the later steps' losses and norms and the validation loss to
/// TRAIN_STEP_BACKENDS.
#[test]
fn resident_step_reads_back_only_the_losses_and_the_norm() {
    const STEPS: usize = 3;
    let (lc, optim, mut options) = trainer_settings(STEPS);
    options.accumulation = 1;
    options.eval_every = 0;
    let (model, lora) = setup(tiny_config(), lc, 51);
    // One training sequence (T = 9) and a longer validation one (the trainer holds 16 rows).
    let data = dataset(&mut Rng::new(52), model.config.vocab_size, 1, 1);
    let (t, t_val) = (data.train[0].tokens.len(), data.val[0].tokens.len());
    assert!(t < t_val);
    let make = |placement| {
        let gm = GpuModel::new(gpu(), &model).unwrap();
        gpu_run(&model, gm, &lora, &optim, &data, &options, placement)
    };
    let (mut res, mut host) = (make(Placement::Auto), make(Placement::Host));
    assert!(
        res.backend().resident(),
        "the resident placement is on the host"
    );
    assert!(!host.backend().resident(), "Placement::Host is resident");
    let host_bytes = 4 * (host.backend().trainer().max_tokens() + lora.num_params()) as u64;
    for step in 1..=STEPS {
        let r = block(res.step()).unwrap();
        let read = res.backend().trainer().read_bytes();
        let h = block(host.step()).unwrap();
        let host_read = host.backend().trainer().read_bytes();
        println!(
            "step {step}: read back {read} bytes resident, {host_read} on the host; loss {} / {}, grad norm {} / {}",
            r.loss, h.loss, r.grad_norm, h.grad_norm
        );
        assert_eq!(
            read,
            4 * (t + 1) as u64,
            "step {step}: the resident step read back more than its {t} losses and the norm"
        );
        assert_eq!(
            host_read, host_bytes,
            "step {step}: the host placement's readback (losses and every dA, dB)"
        );
        assert!(host_read > read);
        assert_eq!(
            (r.step, r.epoch, r.tokens, r.lr),
            (h.step, h.epoch, h.tokens, h.lr),
            "step {step}"
        );
        assert!(
            r.skipped.is_none() && h.skipped.is_none(),
            "step {step}: {:?} {:?}",
            r.skipped,
            h.skipped
        );
        if step == 1 {
            assert_eq!(r.loss, h.loss, "step 1: the loss of the same adapter");
            assert!(
                rel(r.grad_norm, h.grad_norm) <= TRAIN_STEP_SAME_KERNELS,
                "step 1: grad norm resident {} host {}",
                r.grad_norm,
                h.grad_norm
            );
        }
        for (name, a, b) in [
            ("loss", r.loss, h.loss),
            ("grad norm", r.grad_norm, h.grad_norm),
        ] {
            println!(
                "  {name}: relative difference {:.1e} (TRAIN_STEP_BACKENDS {TRAIN_STEP_BACKENDS:.0e})",
                rel(a, b)
            );
            assert!(
                rel(a, b) <= TRAIN_STEP_BACKENDS,
                "step {step}: {name} resident {a} host {b}"
            );
        }
    }
    let v = block(res.validate()).unwrap().unwrap();
    let read = res.backend().trainer().read_bytes();
    let hv = block(host.validate()).unwrap().unwrap();
    let host_read = host.backend().trainer().read_bytes();
    assert_eq!(
        read,
        4 * t_val as u64,
        "a resident validation pass reads back its losses only"
    );
    assert_eq!(
        host_read,
        4 * t_val as u64,
        "a validation pass on the host placement"
    );
    assert!(
        rel(v, hv) <= TRAIN_STEP_BACKENDS,
        "validation loss resident {v} host {hv}"
    );
    println!(
        "a resident step of T = {t} read back {} bytes (the losses and the norm), the host placement {host_bytes}; validation {read} bytes; validation loss resident {v} host {hv} (rel {:.1e})",
        4 * (t + 1),
        rel(v, hv)
    );
}

/// A step whose loss is not finite (a NaN in one token's embedding, in one training sequence)
/// is skipped on the GPU as on the CPU and the twin: the adapter and the moments (the GPU's
/// read back around the step) stay bit for bit as they were on all three and the optimizer's
/// step is not counted; the steps around it are compared as in `step_against_cpu_and_twin`.
#[test]
fn gpu_backend_skips_a_non_finite_step_without_touching_the_state() {
    const STEPS: usize = 6;
    let (lc, optim, mut options) = trainer_settings(STEPS);
    options.eval_every = 0;
    let (mut model, lora) = setup(tiny_config(), lc, 31);
    let mut data = dataset(&mut Rng::new(32), model.config.vocab_size, 5, 0);
    // Token 1 appears nowhere else (dataset() draws from 3..V).
    const POISON: u32 = 1;
    data.train[2].tokens[4] = POISON;
    let c = model.config.hidden_size;
    model.params.embed_tokens[POISON as usize * c] = f32::NAN;
    let gm = GpuModel::new(gpu(), &model).unwrap();
    let mut res = gpu_run(&model, gm, &lora, &optim, &data, &options, Placement::Auto);
    let (mut skipped, mut to_twin, mut to_cpu) = (0, 0f32, 0f32);
    for step in 1..=STEPS {
        let (got, w_twin, w_cpu) =
            step_against_cpu_and_twin(&format!("step {step}"), &model, &mut res);
        skipped += got.skipped.is_some() as usize;
        (to_twin, to_cpu) = (to_twin.max(w_twin), to_cpu.max(w_cpu));
    }
    assert!(skipped > 0, "the poisoned sequence was never drawn");
    assert!(skipped < STEPS, "every step was skipped");
    assert_eq!(res.optimizer_steps(), STEPS - skipped);
    println!(
        "{skipped} of {STEPS} steps skipped on the GPU, the twin and the CPU; the others' state vs the twin: worst normwise {to_twin:.2e} (ADAMW_STATE_NORMWISE {ADAMW_STATE_NORMWISE:.0e}); m and v vs the CPU {to_cpu:.2e} over the whole adapter (TRAIN_STATE_BACKENDS {TRAIN_STATE_BACKENDS:.0e})"
    );
}

/// Where the optimizer's flat buffers do not fit one binding (here a model limited to 8 KiB
/// bindings, as the split-head test above), `GpuBackend` keeps the state on the host: it reads
/// the gradients back and runs core's AdamW, exactly as the twin does (on a GPU trainer of its
/// own, both free-running from the start): the same reports and states bit for bit.
#[test]
fn gpu_backend_falls_back_to_cpu_adamw_when_the_state_does_not_fit_a_binding() {
    const STEPS: usize = 3;
    let (lc, optim, options) = trainer_settings(STEPS);
    let (model, lora) = setup(tiny_config(), lc, 41);
    let data = dataset(&mut Rng::new(42), model.config.vocab_size, 4, 1);
    let v = model.config.vocab_size;
    let small = || GpuModel::with_max_binding(gpu(), &model, (4 * v * 4) as u64).unwrap();
    let mut res = gpu_run(
        &model,
        small(),
        &lora,
        &optim,
        &data,
        &options,
        Placement::Auto,
    );
    assert!(
        !res.backend().resident(),
        "the state was placed in one binding of 8 KiB"
    );
    let gt = GpuTrainer::new(small(), &lora.config, longest(&data)).unwrap();
    let mut twin = Trainer::new(
        Twin::new(gt, &optim),
        &model.config,
        lora.clone(),
        optim.clone(),
        data.clone(),
        options.clone(),
    )
    .unwrap();
    for step in 1..=STEPS {
        let got = block(res.step()).unwrap();
        let want = block(twin.step()).unwrap();
        assert_eq!(got, want, "step {step}");
        assert!(
            block(res.state()).unwrap() == block(twin.state()).unwrap(),
            "step {step}: state"
        );
        assert_eq!(counts(&res), counts(&twin), "step {step}: counts");
    }
    assert!(
        block(res.adapter()).unwrap() != lora,
        "the adapter did not train"
    );
    println!("{STEPS} steps with AdamW on the CPU (state over the binding limit): as the twin");
}
