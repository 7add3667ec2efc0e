//! Replays the fuzz corpora (`fuzz/corpus/<target>/`, seeds and every input a fuzzing run
//! kept, crash inputs included) through the harness functions of `bitlora_core::fuzzing`, on
//! stable, in `cargo test`: no input may panic. A missing or empty corpus fails the test.
//!
//! `cargo test -p bitlora-core --test fuzz_corpus -- --ignored write_seeds` rewrites the
//! generated seeds (`seed-*` files) from the repository's fixtures and the fuzz model.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use bitlora_core::config::{Config, Layout, WeightFormat};
use bitlora_core::fuzzing::{self, TARGETS, fuzz_config, fuzz_model, join};
use bitlora_core::lora::{Lora, LoraConfig};
use bitlora_core::model::Model;
use bitlora_core::peft;
use bitlora_core::quant::{pack_ternary, quantize_weights};
use bitlora_core::weights::{OwnedTensor, serialize, serialize_with_metadata};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn corpus(target: &str) -> PathBuf {
    root().join("fuzz/corpus").join(target)
}

#[test]
fn every_corpus_input_replays_without_a_panic() {
    let mut failures = Vec::new();
    let mut total = 0;
    for target in TARGETS {
        let dir = corpus(target);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e} (every target needs a corpus)", dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "{}: the corpus is empty", dir.display());
        for f in &files {
            let bytes = std::fs::read(f).unwrap();
            let ran = catch_unwind(AssertUnwindSafe(|| fuzzing::run(target, &bytes)));
            match ran {
                Ok(true) => {}
                Ok(false) => panic!("unknown target {target}"),
                Err(_) => failures.push(f.display().to_string()),
            }
        }
        println!("{target}: {} inputs replayed", files.len());
        total += files.len();
    }
    println!("total: {total} inputs");
    assert!(failures.is_empty(), "inputs that panicked: {failures:#?}");
}

#[test]
fn split_and_join_are_inverse() {
    let joined = join(b"abc", b"defg");
    assert_eq!(fuzzing::split(&joined), (&b"abc"[..], &b"defg"[..]));
    assert_eq!(fuzzing::split(b"\x09"), (&b"\x09"[..], &b""[..]));
    assert_eq!(fuzzing::split(b"\xff\x00ab"), (&b"ab"[..], &b""[..]));
}

// ---- seeds ----------------------------------------------------------------------------

fn fixture(path: &str) -> Vec<u8> {
    std::fs::read(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The fuzz model's tensors in the packed format (u8 ternary weights + weight_scale).
fn packed(tensors: Vec<OwnedTensor>, model: &Model) -> Vec<OwnedTensor> {
    let _ = model;
    let mut out = Vec::new();
    for t in tensors {
        if t.name.ends_with("_proj.weight") && t.shape.len() == 2 {
            let (o, i) = (t.shape[0], t.shape[1]);
            let w = bitlora_core::weights::decode_f32(t.dtype, &t.data).unwrap();
            let (q, scale) = quantize_weights(&w);
            let scale_name = t.name.replace(".weight", ".weight_scale");
            out.push(OwnedTensor::u8(t.name, &[o / 4, i], pack_ternary(&q, o, i)));
            out.push(OwnedTensor::f32(scale_name, &[1], &[scale]));
        } else {
            out.push(t);
        }
    }
    out
}

fn model_seed(config: Config, format_packed: bool) -> Vec<u8> {
    let (model, tensors) = Model::random(config.clone(), 3);
    let tensors = if format_packed {
        packed(tensors, &model)
    } else {
        tensors
    };
    join(
        config.to_json().to_string().as_bytes(),
        &serialize(&tensors),
    )
}

fn adapter_config(r: usize, targets: &[&str], rslora: bool) -> Vec<u8> {
    let c = LoraConfig::new(r, 2.0 * r as f32, 0.05, rslora, targets).unwrap();
    peft::adapter_config_json(&c, "bitlora/fuzz")
        .to_string()
        .into_bytes()
}

fn adapter_seed(r: usize, targets: &[&str], rslora: bool, default_names: bool) -> Vec<u8> {
    let cfg = fuzz_config();
    let lcfg = LoraConfig::new(r, 2.0 * r as f32, 0.05, rslora, targets).unwrap();
    let mut tensors = peft::adapter_tensors(&Lora::init(&cfg, lcfg, 9), &cfg);
    if default_names {
        for t in &mut tensors {
            t.name = t.name.replace(".weight", ".default.weight");
        }
    }
    join(&adapter_config(r, targets, rslora), &serialize(&tensors))
}

fn checkpoint_seed(lora: LoraConfig, steps: usize) -> Vec<u8> {
    let mut t = fuzzing::fuzz_trainer(lora).unwrap();
    for _ in 0..steps {
        fuzzing::block_on(t.step()).unwrap().unwrap();
    }
    fuzzing::block_on(t.checkpoint()).unwrap().unwrap()
}

fn seeds() -> HashMap<&'static str, Vec<(&'static str, Vec<u8>)>> {
    let mut s: HashMap<&str, Vec<(&str, Vec<u8>)>> = HashMap::new();
    let (_, base) = fuzz_model();
    let cfg = fuzz_config();
    let tiny_meta = serialize_with_metadata(
        &[
            OwnedTensor::bf16("a", &[2, 2], &[1.0, -2.0, 0.5, 3.0]),
            OwnedTensor::u8("b", &[3], vec![1, 2, 255]),
            OwnedTensor::f32("c", &[], &[7.0]),
        ],
        Some(HashMap::from([("format".to_string(), "pt".to_string())])),
    );
    let f16 = {
        let data: Vec<u8> = [1.0f32, -0.5, 65504.0]
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect();
        serialize(&[OwnedTensor {
            name: "h".into(),
            dtype: safetensors::Dtype::F16,
            shape: vec![3],
            data,
        }])
    };
    s.insert(
        "safetensors",
        vec![
            ("seed-fuzz-model.safetensors", base.clone()),
            ("seed-small-metadata.safetensors", tiny_meta),
            ("seed-f16.safetensors", f16),
            ("seed-empty.safetensors", serialize(&[])),
            (
                "seed-peft-adapter.safetensors",
                fixture("tests/fixtures/peft-roundtrip/adapter/adapter_model.safetensors"),
            ),
        ],
    );
    {
        use bitlora_core::gguf::{GgmlType, GgufWriter, Value, write_model};
        let model = &fuzz_model().0;
        let mut small = GgufWriter::new();
        small
            .kv("general.architecture", Value::Str("bitnet".into()))
            .kv(
                "list",
                Value::Array(vec![Value::Str("a".into()), Value::Str("b".into())]),
            )
            .kv(
                "tokenizer.ggml.tokens",
                Value::Array(vec![Value::Str("<s>".into()), Value::Str("</s>".into())]),
            )
            .kv("tokenizer.ggml.bos_token_id", Value::U32(0))
            .kv("tokenizer.ggml.eos_token_id", Value::U32(1))
            .kv(
                "tokenizer.chat_template",
                Value::Str(
                    "{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content }}{{ eos_token }}{% endfor %}".into(),
                ),
            )
            .tensor_f32("token_embd.weight", &[2, 4], &[0.5; 8]);
        s.insert(
            "gguf",
            vec![
                (
                    "seed-fuzz-model-i2_s.gguf",
                    write_model(model, GgmlType::I2_S).unwrap(),
                ),
                ("seed-small.gguf", small.to_bytes()),
            ],
        );
    }
    s.insert(
        "shard_index",
        vec![
            (
                "seed-fixture-index.json",
                fixture("tests/fixtures/formats/sharded/model.safetensors.index.json"),
            ),
            (
                "seed-small-index.json",
                br#"{"metadata":{"total_size":1024},"weight_map":{"a":"model-00001-of-00002.safetensors","b":"model-00002-of-00002.safetensors","c":"model-00001-of-00002.safetensors"}}"#.to_vec(),
            ),
            ("seed-bad-name.json", br#"{"weight_map":{"a":"../x.safetensors"}}"#.to_vec()),
        ],
    );
    let mut tied = cfg.clone();
    tied.tie_word_embeddings = true;
    tied.hidden_act = bitlora_core::Activation::Silu;
    let mut onebit = cfg.clone();
    onebit.layout = Layout::OneBitLlm;
    let mut pbl = cfg.clone();
    pbl.weight_format = WeightFormat::PackedBitLinear;
    let mut pabl = cfg.clone();
    pabl.weight_format = WeightFormat::PackedAutoBitLinear;
    pabl.num_key_value_heads = 2;
    let mut model_seeds = vec![
        ("seed-master.bin", model_seed(cfg.clone(), false)),
        ("seed-master-tied-silu.bin", model_seed(tied, false)),
        ("seed-onebitllm.bin", model_seed(onebit, false)),
        ("seed-packed-bitlinear.bin", model_seed(pbl, true)),
        ("seed-packed-autobitlinear.bin", model_seed(pabl, true)),
    ];
    for (name, path) in [
        (
            "seed-config-master-bf16-tied.bin",
            "tests/fixtures/formats/master-bf16-tied/config.json",
        ),
        (
            "seed-config-master-f32-untied.bin",
            "tests/fixtures/formats/master-f32-untied/config.json",
        ),
        (
            "seed-config-onebitllm-fp16.bin",
            "tests/fixtures/formats/onebitllm-fp16/config.json",
        ),
        (
            "seed-config-packed-autobitlinear.bin",
            "tests/fixtures/formats/packed-autobitlinear/config.json",
        ),
        ("seed-config-web-tiny.bin", "web/models/tiny/config.json"),
    ] {
        model_seeds.push((name, join(&fixture(path), &[])));
    }
    let packed_dir = "tests/fixtures/formats/packed-bitlinear";
    model_seeds.push((
        "seed-fixture-packed-bitlinear.bin",
        join(
            &fixture(&format!("{packed_dir}/config.json")),
            &fixture(&format!("{packed_dir}/model.safetensors")),
        ),
    ));
    s.insert("model", model_seeds);
    let word_level = br#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[{"id":2,"content":"<|endoftext|>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}],"normalizer":{"type":"Lowercase"},"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,"model":{"type":"WordLevel","vocab":{"hello":0,"[UNK]":1,"<|endoftext|>":2,",":3,"!":4},"unk_token":"[UNK]"}}"#;
    let bpe = br#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":{"type":"NFC"},"pre_tokenizer":{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":true,"use_regex":true},"post_processor":{"type":"TemplateProcessing","single":[{"SpecialToken":{"id":"<s>","type_id":0}},{"Sequence":{"id":"A","type_id":0}}],"pair":[{"Sequence":{"id":"A","type_id":0}},{"Sequence":{"id":"B","type_id":1}}],"special_tokens":{"<s>":{"id":"<s>","ids":[5],"tokens":["<s>"]}}},"decoder":{"type":"ByteLevel","add_prefix_space":true,"trim_offsets":true,"use_regex":true},"model":{"type":"BPE","dropout":null,"unk_token":null,"continuing_subword_prefix":null,"end_of_word_suffix":null,"fuse_unk":false,"byte_fallback":false,"ignore_merges":false,"vocab":{"H":0,"e":1,"l":2,"o":3,"He":4,"<s>":5,"ll":6},"merges":["H e","l l"]}}"#;
    let unigram = br#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,"pre_tokenizer":{"type":"Metaspace","replacement":"\u2581","prepend_scheme":"always","split":true},"post_processor":null,"decoder":{"type":"Metaspace","replacement":"\u2581","prepend_scheme":"always","split":true},"model":{"type":"Unigram","unk_id":0,"vocab":[["<unk>",0.0],["\u2581H",-1.0],["e",-2.0],["llo",-1.5],["l",-3.0],["o",-3.0]],"byte_fallback":false}}"#;
    s.insert(
        "tokenizer",
        vec![
            (
                "seed-byte-tokenizer.json",
                fixture("tests/fixtures/byte-tokenizer/tokenizer.json"),
            ),
            ("seed-wordlevel.json", word_level.to_vec()),
            ("seed-bpe.json", bpe.to_vec()),
            ("seed-unigram.json", unigram.to_vec()),
        ],
    );
    s.insert(
        "chat_template",
        vec![
            ("seed-chatml.jinja", b"{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}".to_vec()),
            ("seed-llama3.jinja", b"{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}".to_vec()),
            ("seed-raise.jinja", b"{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}{% for m in messages %}{{ m.role|upper }}: {{ m.content }}{{ eos_token }}\n{% endfor %}".to_vec()),
            ("seed-loops.jinja", b"{% for i in range(3) %}{% for m in messages|reverse %}{{ loop.index }}{{ m['content'][:2] ~ i }}{% endfor %}{% endfor %}{{ messages|length * 2 }}".to_vec()),
            ("seed-list.json", br#"{"bos_token":{"content":"<s>"},"eos_token":"</s>","chat_template":[{"name":"default","template":"{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}{% endfor %}"},{"name":"tool_use","template":"x"}]}"#.to_vec()),
            ("seed-byte-tokenizer-config.json", fixture("tests/fixtures/byte-tokenizer/tokenizer_config.json")),
        ],
    );
    let devil: Vec<u8> = {
        let text = String::from_utf8(fixture("data/devil/train.jsonl")).unwrap();
        text.lines()
            .take(8)
            .flat_map(|l| format!("{l}\n").into_bytes())
            .collect()
    };
    let with = |flags: u8, body: &[u8]| [&[flags][..], body].concat();
    s.insert(
        "data",
        vec![
            ("seed-devil-jsonl.bin", with(6, &devil)),
            ("seed-plain.bin", with(64 + 5, "The quick brown fox jumps over the lazy dog.\nÀ bientôt 🙂\n".as_bytes())),
            ("seed-text-jsonl.bin", with(3, b"{\"text\": \"hello world\"}\n\n{\"text\": \"second doc\"}\n")),
            ("seed-prompt-completion.bin", with(32 + 64 + 128 + 4, b"{\"prompt\": \"2+2=\", \"completion\": \" 4\"}\n{\"prompt\": \"a very long prompt that will be cut\", \"completion\": \" ok\"}\n")),
            ("seed-chat.bin", with(32 + 8, br#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": " 4 "}, {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}]}
"#)),
        ],
    );
    s.insert(
        "peft_adapter",
        vec![
            (
                "seed-all-linear.bin",
                adapter_seed(2, &["all-linear"], false, false),
            ),
            (
                "seed-qv-rslora.bin",
                adapter_seed(4, &["q_proj", "v_proj"], true, false),
            ),
            (
                "seed-mlp-default-names.bin",
                adapter_seed(1, &["gate_proj", "up_proj", "down_proj"], false, true),
            ),
            (
                "seed-fixture-roundtrip.bin",
                join(
                    &fixture("tests/fixtures/peft-roundtrip/adapter/adapter_config.json"),
                    &fixture("tests/fixtures/peft-roundtrip/adapter/adapter_model.safetensors"),
                ),
            ),
        ],
    );
    let l = |r, t: &[&str], rs| LoraConfig::new(r, 4.0, 0.1, rs, t).unwrap();
    s.insert(
        "checkpoint",
        vec![
            (
                "seed-step0.safetensors",
                checkpoint_seed(l(2, &["all-linear"], false), 0),
            ),
            (
                "seed-step1-qv.safetensors",
                checkpoint_seed(l(2, &["q_proj", "v_proj"], true), 1),
            ),
            (
                "seed-step3-o.safetensors",
                checkpoint_seed(l(1, &["o_proj"], false), 3),
            ),
        ],
    );
    s.insert(
        "train_options",
        vec![
            ("seed-empty.json", b"{}".to_vec()),
            ("seed-null.json", b"null".to_vec()),
            ("seed-all.json", br#"{"rank":4,"alpha":8,"dropout":0.05,"targets":["q_proj","v_proj"],"rslora":true,"lr":0.0002,"schedule":"linear","warmup":2,"weightDecay":0.01,"maxGradNorm":1.0,"steps":10,"batch":2,"evalEvery":5,"context":16,"completionOnly":true,"valFraction":0.1,"maxValSequences":4,"seed":"7","checkpointEvery":5,"name":"run"}"#.to_vec()),
            ("seed-epochs.json", br#"{"epochs":2,"targets":"all-linear","schedule":"cosine","maxGradNorm":null}"#.to_vec()),
        ],
    );
    s
}

/// Writes the generated seeds into `fuzz/corpus/<target>/seed-*`.
#[test]
#[ignore = "rewrites fuzz/corpus seeds; run by hand"]
fn write_seeds() {
    for (target, files) in seeds() {
        let dir = corpus(target);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in files {
            assert!(
                bytes.len() < 200_000,
                "{target}/{name} is {} bytes",
                bytes.len()
            );
            std::fs::write(dir.join(name), &bytes).unwrap();
            println!("{target}/{name}: {} bytes", bytes.len());
        }
    }
}

/// The seeds are meant to get far: each must load (apart from those made to fail).
#[test]
fn generated_seeds_load() {
    let s = seeds();
    let model_cfg = fuzz_config();
    for (name, bytes) in &s["model"] {
        if name.starts_with("seed-config") {
            continue;
        }
        let (c, w) = fuzzing::split(bytes);
        Model::from_bytes("config.json", c, &[("model.safetensors", w)])
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    for (name, bytes) in &s["tokenizer"] {
        bitlora_core::Tokenizer::from_bytes(name, bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    for (name, bytes) in &s["peft_adapter"][..3] {
        let (c, w) = fuzzing::split(bytes);
        let lc = peft::read_adapter_config(name, c).unwrap();
        peft::read_adapter(lc, &model_cfg, name, w).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    for (name, bytes) in &s["gguf"][..1] {
        bitlora_core::gguf::load_model(name, bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    for (name, bytes) in &s["checkpoint"] {
        bitlora_core::trainer::Checkpoint::read(&model_cfg, name, bytes)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}
