//! The adapter export, guarded: tests/fixtures/peft-roundtrip holds an adapter that
//! `bitlora train` wrote, the logits `bitlora logits --adapter` gave with it, and the logits
//! PEFT gave after `PeftModel.from_pretrained` loaded it unchanged
//! (tools/fixtures/peft_roundtrip.py, run on the GPU machine).

use std::path::{Path, PathBuf};
use std::process::Command;

use bitlora_core::tolerance::HF_LOGITS;

mod common;
#[cfg(target_os = "linux")]
use common::{assert_write_failed, bitlora_with_file_limit, files};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn rows(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .flat_map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
        })
        .collect()
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

#[test]
fn peft_reproduces_bitlora_logits_and_bitlora_still_does() {
    let rt = repo().join("tests/fixtures/peft-roundtrip");
    let ours = json(&rt.join("bitlora_logits.json"));
    let peft = json(&rt.join("peft_result.json"));
    assert_eq!(peft["magic"], "bitlora-peft-roundtrip");
    println!(
        "PEFT {} loaded the adapter: max |PEFT - bitlora| {:e}, adapter effect {:.2}",
        peft["peft"],
        peft["max_abs_diff_vs_bitlora"].as_f64().unwrap(),
        peft["adapter_effect_max_abs"].as_f64().unwrap()
    );
    HF_LOGITS.assert_close(
        "PEFT vs bitlora logits with the adapter",
        &rows(&peft["peft_logits"]),
        &rows(&ours["logits"]),
    );
    assert!(
        peft["adapter_effect_max_abs"].as_f64().unwrap() > 1.0,
        "the adapter must matter for the check to mean anything"
    );

    // Today's bitlora reads the same files and still agrees.
    let tokens: Vec<String> = ours["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.to_string())
        .collect();
    let out = Command::new(env!("CARGO_BIN_EXE_bitlora"))
        .args([
            "logits",
            "--model",
            repo()
                .join("tests/fixtures/formats/master-f32-untied")
                .to_str()
                .unwrap(),
            "--adapter",
            rt.join("adapter").to_str().unwrap(),
            "--tokens",
            &tokens.join(","),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let now: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // Today's bitlora against PEFT itself (the property that matters), and against the
    // committed run (summation order may change between versions: a few ulps).
    HF_LOGITS.assert_close(
        "today's bitlora vs PEFT with the adapter",
        &rows(&now["logits"]),
        &rows(&peft["peft_logits"]),
    );
    bitlora_core::tolerance::KERNEL_F32.assert_close(
        "today's bitlora vs the committed bitlora logits",
        &rows(&now["logits"]),
        &rows(&ours["logits"]),
    );
}

/// The same adapter on the GPU backend (`logits --backend gpu --adapter`, LoRA applied
/// unmerged by the GPU kernels) against PEFT's logits, under the same tolerance.
#[test]
fn the_gpu_backend_with_the_adapter_reproduces_peft() {
    let rt = repo().join("tests/fixtures/peft-roundtrip");
    let ours = json(&rt.join("bitlora_logits.json"));
    let peft = json(&rt.join("peft_result.json"));
    let tokens: Vec<String> = ours["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.to_string())
        .collect();
    let out = Command::new(env!("CARGO_BIN_EXE_bitlora"))
        .args([
            "logits",
            "--backend",
            "gpu",
            "--model",
            repo()
                .join("tests/fixtures/formats/master-f32-untied")
                .to_str()
                .unwrap(),
            "--adapter",
            rt.join("adapter").to_str().unwrap(),
            "--tokens",
            &tokens.join(","),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    print!("{stderr}");
    let gpu: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    HF_LOGITS.assert_close(
        "GPU bitlora vs PEFT with the adapter",
        &rows(&gpu["logits"]),
        &rows(&peft["peft_logits"]),
    );
}

#[test]
fn a_fresh_export_has_the_committed_layout() {
    // Train two steps on the same base and compare the files' structure with the committed
    // adapter that PEFT loaded: config keys and values, tensor names, shapes and dtypes.
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("export-layout");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("base")).unwrap();
    for (from, f) in [
        ("tests/fixtures/formats/master-f32-untied", "config.json"),
        (
            "tests/fixtures/formats/master-f32-untied",
            "model.safetensors",
        ),
        ("tests/fixtures/byte-tokenizer", "tokenizer.json"),
        ("tests/fixtures/byte-tokenizer", "tokenizer_config.json"),
    ] {
        std::fs::copy(repo().join(from).join(f), dir.join("base").join(f)).unwrap();
    }
    std::fs::write(dir.join("data.txt"), "the cat sat on the mat. ".repeat(40)).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_bitlora"))
        .args([
            "train",
            "--model",
            dir.join("base").to_str().unwrap(),
            "--data",
            dir.join("data.txt").to_str().unwrap(),
            "--out",
            dir.join("out").to_str().unwrap(),
            "--steps",
            "2",
            "--rank",
            "4",
            "--alpha",
            "8",
            "--context",
            "32",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let committed = repo().join("tests/fixtures/peft-roundtrip/adapter");
    let (mut a, mut b) = (
        json(&dir.join("out/adapter_config.json")),
        json(&committed.join("adapter_config.json")),
    );
    for v in [&mut a, &mut b] {
        v.as_object_mut().unwrap().remove("base_model_name_or_path");
    }
    assert_eq!(a, b, "adapter_config.json changed");
    let header = |p: &Path| -> serde_json::Value {
        let bytes = std::fs::read(p).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let mut h: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        for (_, t) in h.as_object_mut().unwrap().iter_mut() {
            if let Some(o) = t.as_object_mut() {
                o.remove("data_offsets");
            }
        }
        h
    };
    assert_eq!(
        header(&dir.join("out/adapter_model.safetensors")),
        header(&committed.join("adapter_model.safetensors")),
        "tensor names, shapes or dtypes changed"
    );
}

/// `bitlora merge` writes a model that loads and runs, whose targeted weights moved by the
/// adapter's delta (checked tensor by tensor in bitlora-core's merge tests); a packed model
/// is refused with the reason.
#[test]
fn merge_writes_a_runnable_model_and_refuses_packed_weights() {
    let rt = repo().join("tests/fixtures/peft-roundtrip");
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("merged");
    let _ = std::fs::remove_dir_all(&out);
    let base = repo().join("tests/fixtures/formats/master-f32-untied");
    let o = Command::new(env!("CARGO_BIN_EXE_bitlora"))
        .args(["merge", "--model", base.to_str().unwrap(), "--adapter"])
        .arg(rt.join("adapter"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let logits = |dir: &Path| -> Vec<f32> {
        let o = Command::new(env!("CARGO_BIN_EXE_bitlora"))
            .args([
                "logits",
                "--model",
                dir.to_str().unwrap(),
                "--tokens",
                "1,2,3",
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        rows(&serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["logits"])
    };
    let (merged, plain) = (logits(&out), logits(&base));
    let moved = merged
        .iter()
        .zip(&plain)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    println!("merged model runs; logits moved by up to {moved:.3} from the base");
    assert!(moved > 0.1 && merged.iter().all(|x| x.is_finite()));

    let o = Command::new(env!("CARGO_BIN_EXE_bitlora"))
        .args(["merge", "--model"])
        .arg(repo().join("tests/fixtures/formats/packed-bitlinear"))
        .arg("--adapter")
        .arg(rt.join("adapter"))
        .arg("--out")
        .arg(out.with_extension("packed"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && stderr.contains("master (float) weights"),
        "{stderr}"
    );

    // Writes go through temporary names: no temporary file is left in --out, and a --out that
    // cannot be written says "cannot write" (not "cannot read").
    let left: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
    let blocked = out.with_extension("file");
    std::fs::write(&blocked, "a file where --out's directory should go").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_bitlora"))
        .args(["merge", "--model", base.to_str().unwrap(), "--adapter"])
        .arg(rt.join("adapter"))
        .arg("--out")
        .arg(blocked.join("merged"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && stderr.contains("cannot write"),
        "{stderr}"
    );
}

/// A disk that fills while `merge` writes (RLIMIT_FSIZE with SIGXFSZ ignored: writes fail with
/// EFBIG, as with ENOSPC): "cannot write" with the reason, no temporary file left, and the
/// model merged before into the same --out byte for byte as it was.
#[cfg(target_os = "linux")]
#[test]
fn merge_on_a_full_disk_leaves_the_previous_model_whole() {
    let rt = repo().join("tests/fixtures/peft-roundtrip");
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("merged-full-disk");
    let _ = std::fs::remove_dir_all(&out);
    let base = repo().join("tests/fixtures/formats/master-f32-untied");
    let args = |out: &Path| -> Vec<std::ffi::OsString> {
        let mut a: Vec<std::ffi::OsString> = ["merge", "--model"].map(Into::into).into();
        a.extend([
            base.as_os_str().into(),
            "--adapter".into(),
            rt.join("adapter").into(),
        ]);
        a.extend(["--out".into(), out.as_os_str().into()]);
        a
    };
    let o = Command::new(env!("CARGO_BIN_EXE_bitlora"))
        .args(args(&out))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let snapshot = || files(&out);
    let before = snapshot();
    let largest = before.iter().map(|f| f.1.len()).max().unwrap() as u64;
    let kib = (largest / 2).div_ceil(1024);
    let o = bitlora_with_file_limit(kib, &args(&out));
    assert_write_failed(
        &o,
        &format!("largest file {largest} bytes, files limited to {kib} KiB"),
    );
    let after = snapshot();
    let names: Vec<_> = after.iter().map(|f| f.0.clone()).collect();
    assert!(
        !names.iter().any(|n| n.ends_with(".tmp")),
        "temporary files left: {names:?}"
    );
    assert!(after == before, "the merged model changed: {names:?}");
}

/// `merge --out-format gguf` for llama.cpp (the default `--gguf-arch bitnet`) on a 256-wide
/// master model with a tied head and the byte-level tokenizer, built here from fixed seeds
/// (no committed fixture has rows in whole 256-value blocks and master weights): model.gguf
/// reads back through bitlora's reader as the merged safetensors model, the ternary values
/// exactly, each scale within GGUF_F16_SCALE (TQ's f16 block scale), and with the GGUF's scales
/// given to the safetensors model the logits under EXACT; its tokenizer.ggml.* (`gpt2`) encodes
/// as tokenizer.json and it carries tokenizer_config.json's chat template as
/// `tokenizer.chat_template`, with which `generate --chat` on the .gguf alone prompts as with
/// the JSON files beside it. Also with `--gguf-type tq1_0`; `i2_s` (unknown to llama.cpp) is
/// refused before --out is written.
#[test]
fn merge_to_gguf_for_llama_cpp_reads_back_as_the_merged_model() {
    use bitlora_core::Model;
    use bitlora_core::gguf::{Gguf, Value};
    use bitlora_core::model::Proj;
    use bitlora_core::tolerance::{EXACT, GGUF_F16_SCALE};
    use bitlora_core::weights::{OwnedTensor, serialize};

    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR")).join("merge-gguf");
    let _ = std::fs::remove_dir_all(&tmp);
    let (base, adapter) = (tmp.join("base"), tmp.join("adapter"));
    std::fs::create_dir_all(&base).unwrap();
    std::fs::create_dir_all(&adapter).unwrap();
    let (h, f, v, layers, r) = (256usize, 256usize, 258usize, 2usize, 4usize);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rand = |n: usize, scale: f32, offset: f32| -> Vec<f32> {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                offset + scale * ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
            })
            .collect()
    };
    let config = serde_json::json!({
        "architectures": ["BitNetForCausalLM"], "model_type": "bitnet",
        "vocab_size": v, "hidden_size": h, "intermediate_size": f,
        "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 64, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "hidden_act": "relu2", "tie_word_embeddings": true,
        "bos_token_id": 256, "eos_token_id": 256,
        "quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear",
            "quantization_mode": "online"}
    });
    std::fs::write(base.join("config.json"), config.to_string()).unwrap();
    std::fs::copy(
        repo().join("tests/fixtures/byte-tokenizer/tokenizer.json"),
        base.join("tokenizer.json"),
    )
    .unwrap();
    // The byte-level fixture's tokenizer_config.json with a chat template (and its BOS named,
    // as config.json's bos_token_id, which the GGUF carries, names it).
    let chat_template = "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";
    let mut tc = json(&repo().join("tests/fixtures/byte-tokenizer/tokenizer_config.json"));
    tc["bos_token"] = serde_json::json!("<|endoftext|>");
    tc["chat_template"] = serde_json::json!(chat_template);
    std::fs::write(base.join("tokenizer_config.json"), tc.to_string()).unwrap();
    let mut tensors = vec![
        OwnedTensor::f32("model.embed_tokens.weight", &[v, h], &rand(v * h, 2.0, 0.0)),
        OwnedTensor::f32("model.norm.weight", &[h], &rand(h, 0.2, 1.0)),
    ];
    let mut lora = Vec::new();
    for l in 0..layers {
        let p = |s: &str| format!("model.layers.{l}.{s}.weight");
        for (name, n) in [
            ("input_layernorm", h),
            ("post_attention_layernorm", h),
            ("self_attn.attn_sub_norm", h),
            ("mlp.ffn_sub_norm", f),
        ] {
            tensors.push(OwnedTensor::f32(p(name), &[n], &rand(n, 0.2, 1.0)));
        }
        for (name, o, i) in [
            ("self_attn.q_proj", h, h),
            ("self_attn.k_proj", 128, h),
            ("self_attn.v_proj", 128, h),
            ("self_attn.o_proj", h, h),
            ("mlp.gate_proj", f, h),
            ("mlp.up_proj", f, h),
            ("mlp.down_proj", h, f),
        ] {
            tensors.push(OwnedTensor::f32(p(name), &[o, i], &rand(o * i, 0.1, 0.0)));
            let a = format!("base_model.model.model.layers.{l}.{name}.lora_A.weight");
            lora.push(OwnedTensor::f32(a, &[r, i], &rand(r * i, 0.2, 0.0)));
            let b = format!("base_model.model.model.layers.{l}.{name}.lora_B.weight");
            lora.push(OwnedTensor::f32(b, &[o, r], &rand(o * r, 0.2, 0.0)));
        }
    }
    std::fs::write(base.join("model.safetensors"), serialize(&tensors)).unwrap();
    std::fs::write(adapter.join("adapter_model.safetensors"), serialize(&lora)).unwrap();
    let mut ac = json(&repo().join("tests/fixtures/peft-roundtrip/adapter/adapter_config.json"));
    ac["base_model_name_or_path"] = serde_json::json!(base.display().to_string());
    std::fs::write(adapter.join("adapter_config.json"), ac.to_string()).unwrap();

    let merge = |out: &Path, extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_bitlora"))
            .args(["merge", "--model"])
            .arg(&base)
            .arg("--adapter")
            .arg(&adapter)
            .arg("--out")
            .arg(out)
            .args(["--out-format", "gguf"])
            .args(extra)
            .output()
            .unwrap()
    };
    let tokens: Vec<u32> = vec![256, 72, 101, 108, 108, 111, 32, 49, 50, 51, 257];
    for (kind, extra) in [("tq2_0", &[][..]), ("tq1_0", &["--gguf-type", "tq1_0"][..])] {
        let out = tmp.join(format!("merged-{kind}"));
        let o = merge(&out, extra);
        assert!(
            o.status.success(),
            "{kind}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let bytes = std::fs::read(out.join("model.gguf")).unwrap();
        let g = Gguf::parse("model.gguf", &bytes).unwrap();
        assert_eq!(g.architecture().unwrap(), "bitnet");
        assert_eq!(
            g.get("tokenizer.ggml.model").and_then(Value::as_str),
            Some("gpt2")
        );
        assert!(
            g.tensor("output.weight").is_none(),
            "{kind}: an untied head"
        );
        let tok = bitlora_core::Tokenizer::from_bytes(
            "tokenizer.json",
            &std::fs::read(out.join("tokenizer.json")).unwrap(),
        )
        .unwrap();
        let text = "Hello, world! 12345\n<|endoftext|>";
        assert_eq!(
            g.tokenizer().unwrap().encode(text, true).unwrap(),
            tok.encode(text, true).unwrap(),
            "{kind}: the GGUF's tokenizer"
        );
        let gm = Model::from_path(&out.join("model.gguf")).unwrap();
        let mut st = Model::from_path(&out).unwrap();
        EXACT.assert_close(
            &format!("{kind}: embed"),
            &gm.params.embed_tokens,
            &st.params.embed_tokens,
        );
        for (l, (gl, sl)) in gm
            .params
            .layers
            .iter()
            .zip(&mut st.params.layers)
            .enumerate()
        {
            for p in Proj::ALL {
                let (a, b) = (gl.proj(p), sl.proj(p));
                assert_eq!(
                    a.unpack(),
                    b.unpack(),
                    "{kind}: layer {l} {p:?} ternary values"
                );
                GGUF_F16_SCALE.assert_close(
                    &format!("{kind}: layer {l} {p:?} w_scale"),
                    &[a.w_scale],
                    &[b.w_scale],
                );
                let lin = match p {
                    Proj::Q => &mut sl.q_proj,
                    Proj::K => &mut sl.k_proj,
                    Proj::V => &mut sl.v_proj,
                    Proj::O => &mut sl.o_proj,
                    Proj::Gate => &mut sl.gate_proj,
                    Proj::Up => &mut sl.up_proj,
                    Proj::Down => &mut sl.down_proj,
                };
                lin.w_scale = a.w_scale;
            }
        }
        let (lg, ls) = (gm.logits(&tokens).unwrap(), st.logits(&tokens).unwrap());
        EXACT.assert_close(&format!("{kind}: logits"), &lg, &ls);
        assert_eq!(
            g.get("tokenizer.chat_template").and_then(Value::as_str),
            Some(chat_template),
            "{kind}: tokenizer.chat_template"
        );
    }
    // `generate --chat` on the .gguf alone (its tokenizer.ggml.* and tokenizer.chat_template)
    // renders the prompt and replies as with tokenizer.json and tokenizer_config.json beside
    // it: the same prompt length (one token a byte) and the same greedy reply.
    let beside = tmp.join("merged-tq2_0/model.gguf");
    let alone = tmp.join("alone");
    std::fs::create_dir_all(&alone).unwrap();
    std::fs::copy(&beside, alone.join("model.gguf")).unwrap();
    let chat = |model: &Path| {
        let o = Command::new(env!("CARGO_BIN_EXE_bitlora"))
            .args(["generate", "--model"])
            .arg(model)
            .args(["--chat", "--prompt", "Hi there", "--max-tokens", "6"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(o.status.success(), "{}: {stderr}", model.display());
        let prompt = stderr
            .split("prompt ")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .unwrap_or_else(|| panic!("no prompt length in {stderr}"))
            .to_string();
        (prompt, String::from_utf8_lossy(&o.stdout).to_string())
    };
    let rendered = "<|endoftext|><|user|>Hi there<|endoftext|><|assistant|>";
    let want_len = bitlora_core::Tokenizer::from_bytes(
        "tokenizer.json",
        &std::fs::read(base.join("tokenizer.json")).unwrap(),
    )
    .unwrap()
    .encode(rendered, false)
    .unwrap()
    .len();
    let (from_gguf, from_files) = (chat(&alone.join("model.gguf")), chat(&beside));
    println!("generate --chat: .gguf alone {from_gguf:?}, with the JSON files {from_files:?}");
    assert_eq!(
        from_gguf.0,
        want_len.to_string(),
        "prompt tokens of {rendered:?}"
    );
    assert_eq!(
        from_gguf, from_files,
        "(prompt length, reply) from the .gguf alone"
    );
    let out = tmp.join("merged-i2_s");
    let o = merge(&out, &["--gguf-type", "i2_s"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && stderr.contains("bitnet-b1.58"),
        "{stderr}"
    );
    assert!(!out.exists(), "a refused merge wrote {}", out.display());
}
