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
