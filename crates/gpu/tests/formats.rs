//! Every checkpoint format in tests/fixtures/formats on the GPU: the GPU's logits against the
//! CPU reference (`Model::logits`, itself checked against transformers by
//! crates/core/tests/formats.rs) within MODEL_LOGITS with the same top-1 at every position,
//! and the GPU's 32-token greedy continuation (`GpuModel::generate`: batched prefill, then the
//! KV cache) equal to transformers' in golden.json.
//!
//! One test per known fixture, plus one that runs any fixture folder not listed here, so a
//! format added to tests/fixtures/formats is covered on the GPU the day it lands.

mod common;

use std::path::{Path, PathBuf};

use bitlora_core::tolerance::MODEL_LOGITS;
use bitlora_core::{Model, SamplingOptions, top_k};
use bitlora_gpu::GpuModel;
use common::{block, gpu};

const KNOWN: &[&str] = &[
    "master-f32-untied",
    "master-bf16-tied",
    "packed-bitlinear",
    "packed-autobitlinear",
    "sharded",
    "onebitllm-fp16",
];

fn formats() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/formats")
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected an array of token ids, got {v}"))
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect()
}

fn check(name: &str) {
    let dir = formats().join(name);
    let golden: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("golden.json")).unwrap()).unwrap();
    assert_eq!(golden["magic"], "bitlora-golden");
    let model = Model::from_dir(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
    let gm = GpuModel::new(gpu(), &model).unwrap_or_else(|e| panic!("{name}: {e}"));
    let tokens = ids(&golden["tokens"]);
    let v = model.config.vocab_size;

    let cpu = model.logits(&tokens).unwrap();
    let got = block(gm.logits(&tokens)).unwrap();
    MODEL_LOGITS.assert_close(&format!("{name}: GPU logits vs CPU"), &got, &cpu);
    for (pos, (g, c)) in got.chunks_exact(v).zip(cpu.chunks_exact(v)).enumerate() {
        assert_eq!(
            top_k(g, 1)[0].0,
            top_k(c, 1)[0].0,
            "{name}: top-1 at position {pos}"
        );
    }

    let expected = ids(&golden["greedy"]);
    let opts = SamplingOptions {
        max_tokens: expected.len(),
        ..Default::default()
    };
    let greedy = block(gm.generate(&tokens, &opts, |_| true)).unwrap();
    assert_eq!(greedy, expected, "{name}: GPU greedy continuation");
    println!(
        "{name}: GPU logits within MODEL_LOGITS of the CPU (max abs {:.3e}), {} greedy tokens equal transformers {}",
        MODEL_LOGITS.compare(&got, &cpu).max_abs,
        expected.len(),
        golden["transformers"]
    );
}

#[test]
fn master_f32_untied() {
    check("master-f32-untied");
}

#[test]
fn master_bf16_tied() {
    check("master-bf16-tied");
}

#[test]
fn packed_bitlinear() {
    check("packed-bitlinear");
}

#[test]
fn packed_autobitlinear() {
    check("packed-autobitlinear");
}

#[test]
fn sharded() {
    check("sharded");
}

#[test]
fn onebitllm_fp16() {
    check("onebitllm-fp16");
}

#[test]
fn every_other_fixture() {
    let mut others: Vec<String> = std::fs::read_dir(formats())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("golden.json").exists())
        .map(|p| p.file_name().unwrap().to_string_lossy().to_string())
        .filter(|n| !KNOWN.contains(&n.as_str()))
        .collect();
    others.sort();
    for name in &others {
        check(name);
    }
    println!("fixtures beyond the known {}: {others:?}", KNOWN.len());
}
