//! The CPU reference against the oracle: logits that Hugging Face transformers' BitNet
//! (`BitNetForCausalLM`, AutoBitLinear online quantization) computed for the bundled tiny model,
//! written by tools/fixtures/hf_logits.py on the GPU machine and committed. No torch here.

use std::path::Path;

use bitlora_core::tolerance::HF_LOGITS;
use bitlora_core::{Model, top_k};

#[test]
fn tiny_model_matches_transformers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let golden: serde_json::Value = serde_json::from_slice(
        &std::fs::read(root.join("tests/fixtures/tiny/hf_logits.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(golden["magic"], "bitlora-golden-logits");
    assert_eq!(golden["version"], 1);
    println!(
        "oracle: transformers {} / torch {} on {}",
        golden["transformers"], golden["torch"], golden["device"]
    );
    let tokens: Vec<u32> = golden["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect();
    let reference: Vec<Vec<f32>> = golden["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect();

    let model = Model::from_dir(&root.join("web/models/tiny")).unwrap();
    let ours = model.logits(&tokens).unwrap();
    let v = model.config.vocab_size;
    for (pos, hf) in reference.iter().enumerate() {
        let row = &ours[pos * v..(pos + 1) * v];
        HF_LOGITS.assert_close(&format!("logits[{pos}]"), row, hf);
        assert_eq!(
            top_k(row, 1)[0].0,
            top_k(hf, 1)[0].0,
            "top-1 at position {pos}"
        );
    }
}
