//! The whole forward pass: `GpuModel::logits` against the CPU reference `Model::logits` on
//! random tiny models (bitlora_core::model::tiny_config: V = 509, C = 64, F = 176, GQA 4/2,
//! HS = 16) over several seeds, tied and untied heads, relu^2 and SiLU, and T up to 100.
//! MODEL_LOGITS tolerance, and the same top-1 token on every row. And the embedding and the
//! head stored as bf16 (when lossless) give the f32 storage's logits, generations, losses and
//! LoRA gradients bit for bit, tied and untied, whole and split along V.

mod common;

use bitlora_core::lora::{Lora, LoraConfig};
use bitlora_core::model::tiny_config;
use bitlora_core::rng::Rng;
use bitlora_core::tolerance::MODEL_LOGITS;
use bitlora_core::{Activation, Config, Error, Model, SamplingOptions};
use bitlora_gpu::{DType, GpuError, GpuModel, GpuTrainer};
use common::{block, gpu};

fn argmax(row: &[f32]) -> usize {
    (0..row.len()).fold(0, |best, i| if row[i] > row[best] { i } else { best })
}

/// Compares GPU and CPU logits of a random model and returns the max abs diff.
fn check(what: &str, cfg: Config, seed: u64, t: usize) -> f32 {
    let (model, _) = Model::random(cfg, seed);
    let mut rng = Rng::new(seed ^ 0x5eed);
    let tokens: Vec<u32> = (0..t)
        .map(|_| rng.below(model.config.vocab_size as u64) as u32)
        .collect();
    let want = model.logits(&tokens).unwrap();
    let gpu_model = GpuModel::new(gpu(), &model).unwrap();
    let got = block(gpu_model.logits(&tokens)).unwrap();
    let what = format!("{what} seed {seed} T={t} logits");
    MODEL_LOGITS.assert_close(&what, &got, &want);
    let v = model.config.vocab_size;
    for (r, (g, w)) in got.chunks_exact(v).zip(want.chunks_exact(v)).enumerate() {
        assert_eq!(argmax(g), argmax(w), "{what}: top-1 differs at row {r}");
    }
    MODEL_LOGITS.compare(&got, &want).max_abs
}

#[test]
fn logits_match_reference_over_seeds() {
    let mut worst = 0f32;
    for seed in 1..=6 {
        worst = worst.max(check("untied relu2", tiny_config(), seed, 23));
    }
    println!("max abs diff over 6 seeds: {worst:.3e}");
}

#[test]
fn logits_match_reference_tied_head() {
    let mut cfg = tiny_config();
    cfg.tie_word_embeddings = true;
    for seed in [7, 8] {
        check("tied relu2", cfg.clone(), seed, 17);
    }
}

#[test]
fn logits_match_reference_long_sequence() {
    // T = 100: more keys than the attention workgroup (64), two blocks per query.
    for seed in [9, 10] {
        check("untied relu2", tiny_config(), seed, 100);
    }
}

#[test]
fn logits_match_reference_silu_mha() {
    // The 1bitLLM shape: SiLU-gated FFN, full multi-head attention (NKV = NH).
    let mut cfg = tiny_config();
    cfg.hidden_act = Activation::Silu;
    cfg.num_key_value_heads = cfg.num_attention_heads;
    check("silu mha", cfg, 11, 31);
}

#[test]
fn single_token_and_bad_tokens() {
    let (model, _) = Model::random(tiny_config(), 12);
    let gm = GpuModel::new(gpu(), &model).unwrap();
    let got = block(gm.logits(&[508])).unwrap();
    MODEL_LOGITS.assert_close("T=1 logits", &got, &model.logits(&[508]).unwrap());

    let e = block(gm.logits(&[])).unwrap_err();
    assert!(matches!(e, GpuError::Model(Error::NoTokens)), "{e}");
    let e = block(gm.logits(&[1, 509])).unwrap_err();
    assert_eq!(
        e.to_string(),
        "token id 509 at position 1 is out of range: the vocabulary has 509 tokens"
    );
    let e = block(gm.logits(&vec![0; 257])).unwrap_err();
    assert!(
        matches!(
            e,
            GpuError::Model(Error::TooManyTokens {
                count: 257,
                max: 256
            })
        ),
        "{e}"
    );
}

/// Rounds to the nearest bf16, ties to even (no NaN here): the values of a bf16 checkpoint.
fn round_bf16(w: &mut [f32]) {
    for x in w {
        let b = x.to_bits();
        *x = f32::from_bits(b.wrapping_add(0x7fff + ((b >> 16) & 1)) & 0xffff_0000);
    }
}

/// A random tiny model whose embedding and head (when untied) are exactly bf16.
fn bf16_model(tied: bool, seed: u64) -> Model {
    let mut cfg = tiny_config();
    cfg.tie_word_embeddings = tied;
    let (mut model, _) = Model::random(cfg, seed);
    round_bf16(&mut model.params.embed_tokens);
    if let Some(h) = model.params.lm_head.as_mut() {
        round_bf16(h);
    }
    model
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// `GpuModel::new` stores an exactly-bf16 embedding and head as bf16 (half the bytes), and its
/// logits (a long input in several passes when split) and greedy generations equal the f32
/// storage's bit for bit: tied and untied, whole and split along V (a 16 KiB limit: chunks of
/// 64 rows, 12 KiB: 48 rows, in both formats), with tokens on both sides of every chunk
/// boundary.
#[test]
fn bf16_tables_give_the_f32_tables_logits_bit_for_bit() {
    let full = u64::MAX;
    for (tied, seed, max_binding) in [
        (false, 41, full),
        (true, 42, full),
        (false, 43, 16 << 10),
        (true, 44, 12 << 10),
    ] {
        let model = bf16_model(tied, seed);
        let (v, c) = (model.config.vocab_size, model.config.hidden_size);
        let bf = GpuModel::with_max_binding(gpu(), &model, max_binding).unwrap();
        let f = GpuModel::with_f32_tables(gpu(), &model, max_binding).unwrap();
        let untied = |d| (!tied).then_some(d);
        assert_eq!(bf.table_dtypes(), (DType::Bf16, untied(DType::Bf16)));
        assert_eq!(f.table_dtypes(), (DType::F32, untied(DType::F32)));
        let tables = if tied { 1 } else { 2 };
        let saved = f.weight_bytes() - bf.weight_bytes();
        assert_eq!(
            saved,
            (tables * v * c * 2) as u64,
            "bf16 saves half of each table"
        );
        // Rows per chunk, those of f32 in both formats (the same boundaries, the same sums).
        let rows = (max_binding / (4 * c) as u64).min(v as u64) as usize;
        assert_eq!(f.vocab_chunks(), v.div_ceil(rows));
        assert_eq!(bf.vocab_chunks(), v.div_ceil(rows));
        if max_binding != full {
            assert!(bf.vocab_chunks() > 1, "{} chunks", bf.vocab_chunks());
        }
        let mut tokens: Vec<u32> = Vec::new();
        for b in (rows..v).step_by(rows) {
            tokens.extend([b as u32 - 1, b as u32]);
        }
        let mut rng = Rng::new(seed);
        tokens.extend((0..12).map(|_| rng.below(v as u64) as u32));
        tokens.extend([0, v as u32 - 1]);
        let case = format!(
            "tied {tied}, {} chunks, T = {}",
            bf.vocab_chunks(),
            tokens.len()
        );
        let got = block(bf.logits(&tokens)).unwrap();
        let want = block(f.logits(&tokens)).unwrap();
        assert!(bits(&got) == bits(&want), "{case}: logits differ");
        MODEL_LOGITS.assert_close(&case, &got, &model.logits(&tokens).unwrap());
        let greedy = SamplingOptions {
            max_tokens: 12,
            ..Default::default()
        };
        let prompt = &tokens[..5];
        let gen_bf = block(bf.generate(prompt, &greedy, |_| true)).unwrap();
        let gen_f = block(f.generate(prompt, &greedy, |_| true)).unwrap();
        assert_eq!(gen_bf, gen_f, "{case}: greedy generations");
        println!(
            "{case}: logits and {} generated tokens equal bit for bit; bf16 saves {saved} bytes",
            gen_bf.len()
        );
    }
}

/// A table that is not exactly bf16 stays f32 (bytes unchanged), chosen per table: an untied
/// head that is bf16 still is, and the mixed model gives the all-f32 logits bit for bit.
#[test]
fn tables_not_exactly_bf16_stay_f32() {
    for tied in [false, true] {
        let mut model = bf16_model(tied, 45);
        let (v, c) = (model.config.vocab_size, model.config.hidden_size);
        let x = &mut model.params.embed_tokens[3 * c + 7];
        *x = f32::from_bits(x.to_bits() | 1);
        let gm = GpuModel::new(gpu(), &model).unwrap();
        let f = GpuModel::with_f32_tables(gpu(), &model, u64::MAX).unwrap();
        let head = (!tied).then_some(DType::Bf16);
        assert_eq!(gm.table_dtypes(), (DType::F32, head));
        let saved = if tied { 0 } else { (v * c * 2) as u64 };
        assert_eq!(f.weight_bytes() - gm.weight_bytes(), saved);
        let tokens = [3, 5, 3, 508, 0, 3];
        let got = block(gm.logits(&tokens)).unwrap();
        let want = block(f.logits(&tokens)).unwrap();
        assert!(bits(&got) == bits(&want), "tied {tied}: logits differ");
        println!("tied {tied}: embedding stays f32, head {head:?}; logits equal bit for bit");
    }
}

/// One GPU training step (forward and backward through the embedding and the head, dropout
/// on, several calls accumulating) gives the same losses and LoRA gradients bit for bit with
/// bf16 tables as with f32 ones: tied and untied, the head whole, and split along V with the
/// loss on windows of 4 rows and the head backward's sum over V in 3 slabs.
#[test]
fn bf16_tables_train_bit_for_bit_like_f32() {
    for (tied, seed, split) in [(false, 46, false), (true, 47, true), (false, 48, true)] {
        let model = bf16_model(tied, seed);
        let v = model.config.vocab_size;
        let lc = LoraConfig::new(4, 8.0, 0.1, false, &["all-linear"]).unwrap();
        let mut lora = Lora::init(&model.config, lc, seed);
        let mut rng = Rng::new(seed ^ 0xada);
        lora.for_each_mut(|_, _, w| w.iter_mut().for_each(|x| *x += 0.05 * rng.normal()));
        let max_binding = if split { (4 * v * 4) as u64 } else { u64::MAX };
        let calls: Vec<Vec<u32>> = [19, 7]
            .iter()
            .map(|&n| (0..n).map(|_| rng.below(v as u64) as u32).collect())
            .collect();
        let run = |gm: GpuModel| {
            let mut trainer = GpuTrainer::new(gm, &lora.config, 19).unwrap();
            if split {
                trainer.set_head_slabs(3).unwrap();
            }
            let mut grads = lora.zeros_like();
            let mut rng = Rng::new(77);
            let mut losses = Vec::new();
            for tokens in &calls {
                let targets: Vec<Option<u32>> =
                    tokens[1..].iter().map(|&t| Some(t)).chain([None]).collect();
                let l = block(
                    trainer.forward_backward(&lora, tokens, &targets, &mut grads, 0.5, &mut rng),
                )
                .unwrap();
                losses.push(l.loss.to_bits());
            }
            let mut g = Vec::new();
            grads.for_each_mut(|_, _, w| g.extend(bits(w)));
            (losses, g)
        };
        let bf = GpuModel::with_max_binding(gpu(), &model, max_binding).unwrap();
        let f = GpuModel::with_f32_tables(gpu(), &model, max_binding).unwrap();
        assert_eq!(bf.table_dtypes().0, DType::Bf16);
        assert_eq!(f.table_dtypes().0, DType::F32);
        let chunks = bf.vocab_chunks();
        let (lb, gb) = run(bf);
        let (lf, gf) = run(f);
        let case = format!("tied {tied}, {chunks} chunks");
        assert_eq!(lb, lf, "{case}: losses");
        assert!(gb.iter().any(|&b| b != 0), "{case}: gradients are zero");
        let diff = gb.iter().zip(&gf).filter(|(a, b)| a != b).count();
        assert_eq!(
            diff,
            0,
            "{case}: {diff} of {} gradient values differ",
            gb.len()
        );
        println!(
            "{case}: losses {:?} and {} gradient values equal bit for bit",
            lb.iter().map(|&b| f32::from_bits(b)).collect::<Vec<_>>(),
            gb.len()
        );
    }
}
