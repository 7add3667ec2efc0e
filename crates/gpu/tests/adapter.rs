//! LoRA applied unmerged on the GPU: `GpuModel::set_adapter` + forward against the CPU's
//! `Model::forward_with_adapter` on random tiny models (MODEL_LOGITS, same top-1), cached
//! decoding with an adapter (k and v adapters add into the KV cache) bit for bit equal to the
//! full pass, removing the adapter, and a mismatched adapter refused by name.

mod common;

use bitlora_core::lora::{Lora, LoraConfig};
use bitlora_core::model::{KvCache, Proj, tiny_config};
use bitlora_core::rng::Rng;
use bitlora_core::tolerance::MODEL_LOGITS;
use bitlora_core::{Activation, Config, Model};
use bitlora_gpu::{GpuKvCache, GpuModel};
use common::{block, gpu};

fn argmax(row: &[f32]) -> usize {
    (0..row.len()).fold(0, |best, i| if row[i] > row[best] { i } else { best })
}

/// PEFT's initialisation, then every A and B moved (B = 0 would make the adapter a no-op).
fn adapter(cfg: &Config, lc: LoraConfig, seed: u64) -> Lora {
    let mut lora = Lora::init(cfg, lc, seed);
    let mut rng = Rng::new(seed ^ 0xada);
    lora.for_each_mut(|_, _, v| v.iter_mut().for_each(|x| *x += 0.05 * rng.normal()));
    lora
}

fn check(what: &str, cfg: Config, lc: LoraConfig, seed: u64, t: usize) {
    let (model, _) = Model::random(cfg, seed);
    let lora = adapter(&model.config, lc, seed);
    let mut rng = Rng::new(seed ^ 0x5eed);
    let tokens: Vec<u32> = (0..t)
        .map(|_| rng.below(model.config.vocab_size as u64) as u32)
        .collect();
    let want = model
        .forward_with_adapter(&tokens, &mut KvCache::new(&model.config), Some(&lora))
        .unwrap();
    let plain = model.logits(&tokens).unwrap();
    let mut gm = GpuModel::new(gpu(), &model).unwrap();
    gm.set_adapter(Some(&lora)).unwrap();
    let got = block(gm.logits(&tokens)).unwrap();
    let what = format!("{what} seed {seed} T={t}");
    MODEL_LOGITS.assert_close(&format!("{what} logits with adapter"), &got, &want);
    let v = model.config.vocab_size;
    for (r, (g, w)) in got.chunks_exact(v).zip(want.chunks_exact(v)).enumerate() {
        assert_eq!(argmax(g), argmax(w), "{what}: top-1 differs at row {r}");
    }
    // The adapter really moves the logits, far beyond the tolerance.
    let moved = MODEL_LOGITS.compare(&want, &plain).max_abs;
    println!("{what}: the adapter moves logits by up to {moved:.3e}");
    assert!(moved > 0.1, "{what}: adapter moved logits by only {moved}");

    // Cached: a prefill then one token at a time gives the full pass's rows bit for bit.
    let mut cache = GpuKvCache::new(&gm, 4).unwrap();
    let split = t / 2;
    let mut cached = block(gm.forward(&tokens[..split], &mut cache)).unwrap();
    for &tok in &tokens[split..] {
        cached.extend(block(gm.forward(&[tok], &mut cache)).unwrap());
    }
    assert_eq!(cached, got, "{what}: cached decoding with the adapter");

    // Removing the adapter gives the plain model's GPU logits again.
    let gpu_plain = block(GpuModel::new(gpu(), &model).unwrap().logits(&tokens)).unwrap();
    gm.set_adapter(None).unwrap();
    assert_eq!(
        block(gm.logits(&tokens)).unwrap(),
        gpu_plain,
        "{what}: adapter removed"
    );
}

#[test]
fn adapter_logits_match_reference_all_linear() {
    let lc = LoraConfig::new(4, 8.0, 0.0, false, &["all-linear"]).unwrap();
    for seed in [1, 2] {
        check("all-linear r=4", tiny_config(), lc.clone(), seed, 23);
    }
}

#[test]
fn adapter_logits_match_reference_subset_rslora_silu() {
    let mut cfg = tiny_config();
    cfg.hidden_act = Activation::Silu;
    let lc = LoraConfig::new(3, 6.0, 0.0, true, &["k_proj", "v_proj", "down_proj"]).unwrap();
    check("k,v,down r=3 rsLoRA silu", cfg, lc, 3, 37);
}

#[test]
fn mismatched_adapter_is_refused_by_name() {
    let (model, _) = Model::random(tiny_config(), 4);
    let mut gm = GpuModel::new(gpu(), &model).unwrap();
    let mut lora = Lora::init(
        &model.config,
        LoraConfig::new(2, 4.0, 0.0, false, &["o_proj"]).unwrap(),
        1,
    );
    lora.layers[1][Proj::O].as_mut().unwrap().a.pop();
    let e = gm.set_adapter(Some(&lora)).unwrap_err().to_string();
    assert!(e.contains("model.layers.1.self_attn.o_proj"), "{e}");
    lora.layers.pop();
    let e = gm.set_adapter(Some(&lora)).unwrap_err().to_string();
    assert!(e.contains("layers"), "{e}");
}
