//! The whole forward pass: `GpuModel::logits` against the CPU reference `Model::logits` on
//! random tiny models (bitlora_core::model::tiny_config: V = 509, C = 64, F = 176, GQA 4/2,
//! HS = 16) over several seeds, tied and untied heads, relu^2 and SiLU, and T up to 100.
//! MODEL_LOGITS tolerance, and the same top-1 token on every row.

mod common;

use bitlora_core::model::tiny_config;
use bitlora_core::rng::Rng;
use bitlora_core::tolerance::MODEL_LOGITS;
use bitlora_core::{Activation, Config, Error, Model};
use bitlora_gpu::{GpuError, GpuModel};
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
