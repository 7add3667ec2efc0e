//! ModelBuilder (tensors handed over one at a time, as the browser streams them out of its
//! store) gives exactly the Model of `Model::from_bytes` on every format fixture and bundled
//! model, and the same first error, word for word, on broken inputs.

use std::path::{Path, PathBuf};

use bitlora_core::model::tiny_config;
use bitlora_core::weights::{self, OwnedTensor};
use bitlora_core::{Model, ModelBuilder, Result};
use safetensors::{Dtype, SafeTensors};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Streams `files` into a builder: the header from the file's first bytes only, then each
/// tensor's own bytes, last tensor first (the builder must not depend on the order).
fn build(config_json: &[u8], files: &[(&str, &[u8])]) -> Result<Model> {
    let mut b = ModelBuilder::new("config.json", config_json)?;
    for (name, bytes) in files {
        let header_end = if bytes.len() >= 8 {
            let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
            (8 + n.min(100_000_000)).min(bytes.len() as u64) as usize
        } else {
            bytes.len()
        };
        let spans = b.add_file(
            name,
            &bytes[..header_end.max(bytes.len().min(9))],
            bytes.len() as u64,
        )?;
        for span in spans.iter().rev() {
            b.add_tensor(
                &span.name,
                bytes[span.start as usize..span.end as usize].to_vec(),
            )?;
        }
    }
    b.finish()
}

fn same(a: &Model, b: &Model) {
    assert_eq!(a.config, b.config);
    // Debug prints every f32 exactly (shortest round-trip form).
    assert_eq!(format!("{:?}", a.params), format!("{:?}", b.params));
}

/// Every model directory with a config.json: the format fixtures (master f32/bf16, tied and
/// untied, 1bitLLM fp16, both packed formats, a sharded checkpoint) and the bundled models.
fn model_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for parent in ["tests/fixtures/formats", "web/models"] {
        for entry in std::fs::read_dir(root().join(parent)).unwrap() {
            let dir = entry.unwrap().path();
            if dir.join("config.json").exists() {
                dirs.push(dir);
            }
        }
    }
    dirs.sort();
    dirs
}

/// A directory's safetensors files, as `Model::from_dir` reads them: the shards an index names,
/// else every `*.safetensors` in name order.
fn weight_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let index = dir.join("model.safetensors.index.json");
    let mut names: Vec<PathBuf> = if index.exists() {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&index).unwrap()).unwrap();
        let mut shards: Vec<String> = v["weight_map"]
            .as_object()
            .unwrap()
            .values()
            .map(|f| f.as_str().unwrap().to_string())
            .collect();
        shards.sort();
        shards.dedup();
        shards.into_iter().map(|f| dir.join(f)).collect()
    } else {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect()
    };
    names.sort();
    names
        .iter()
        .map(|p| (p.display().to_string(), std::fs::read(p).unwrap()))
        .collect()
}

fn refs(files: &[(String, Vec<u8>)]) -> Vec<(&str, &[u8])> {
    files
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_slice()))
        .collect()
}

#[test]
fn every_fixture_and_bundled_model_builds_the_same_model() {
    let mut formats = std::collections::BTreeSet::new();
    for dir in model_dirs() {
        let reference = Model::from_dir(&dir).unwrap();
        let config = std::fs::read(dir.join("config.json")).unwrap();
        let files = weight_files(&dir);
        let built = build(&config, &refs(&files)).unwrap();
        same(&reference, &built);
        let tokens = [1, 5, 17, 42];
        assert_eq!(
            reference.logits(&tokens).unwrap(),
            built.logits(&tokens).unwrap()
        );
        let c = &reference.config;
        formats.insert(format!("{:?}", c.weight_format));
        println!(
            "{}: {:?}, {} file(s), tied {}: identical params and logits",
            dir.strip_prefix(root()).unwrap_or(&dir).display(),
            c.weight_format,
            files.len(),
            c.tie_word_embeddings
        );
    }
    assert_eq!(formats.len(), 3, "formats seen: {formats:?}");
}

/// A later file redeclaring a tensor wins in both loaders (as in `WeightFiles`): a copy of the
/// model with some tensors changed, listed after the original, gives the changed model.
#[test]
fn a_later_file_redeclaring_a_tensor_wins() {
    let (json, all) = tensors(false);
    let cfg = json.as_bytes();
    let changed = [
        "model.layers.0.input_layernorm.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "lm_head.weight",
    ];
    let later: Vec<OwnedTensor> = all
        .iter()
        .filter(|t| changed.contains(&t.name.as_str()))
        .map(|t| {
            let v: Vec<f32> = (0..t.shape.iter().product::<usize>())
                .map(|k| ((k % 7) as f32 - 3.0) * 0.25)
                .collect();
            OwnedTensor::f32(t.name.clone(), &t.shape, &v)
        })
        .collect();
    let merged: Vec<OwnedTensor> = all
        .iter()
        .filter(|t| !changed.contains(&t.name.as_str()))
        .map(clone)
        .chain(later.iter().map(clone))
        .collect();
    let (f1, f2, fm) = (file(&all), file(&later), file(&merged));
    let two = [
        ("a.safetensors", f1.as_slice()),
        ("b.safetensors", f2.as_slice()),
    ];
    let reference = Model::from_bytes("config.json", cfg, &two).unwrap();
    let built = build(cfg, &two).unwrap();
    same(&reference, &built);
    let expected = Model::from_bytes("config.json", cfg, &[("m.safetensors", &fm)]).unwrap();
    same(&expected, &built);
    let original = Model::from_bytes("config.json", cfg, &[("a.safetensors", &f1)]).unwrap();
    assert_ne!(
        format!("{:?}", original.params),
        format!("{:?}", built.params)
    );

    // The later file's copy is the one checked: a bad shape there is the error.
    let bad = [OwnedTensor::f32(
        "model.layers.0.input_layernorm.weight",
        &[3],
        &[1.0; 3],
    )];
    let fb = file(&bad);
    let e = same_error(cfg, &[("a.safetensors", &f1), ("b.safetensors", &fb)]);
    assert!(e.starts_with("b.safetensors") && e.contains("[3]"), "{e}");
}

fn file(ts: &[OwnedTensor]) -> Vec<u8> {
    weights::serialize(ts)
}

/// Every tensor of a safetensors file.
fn read_tensors(path: &Path) -> Vec<OwnedTensor> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, v)| OwnedTensor {
            name,
            dtype: v.dtype(),
            shape: v.shape().to_vec(),
            data: v.data().to_vec(),
        })
        .collect()
}

/// `all` with tensor `name` replaced by `f(old)`, or removed when `f` gives None.
fn edit(
    all: &[OwnedTensor],
    name: &str,
    f: impl Fn(&OwnedTensor) -> Option<OwnedTensor>,
) -> Vec<u8> {
    assert!(all.iter().any(|t| t.name == name), "no tensor {name}");
    let ts: Vec<OwnedTensor> = all
        .iter()
        .filter_map(|t| if t.name == name { f(t) } else { Some(clone(t)) })
        .collect();
    file(&ts)
}

#[test]
fn broken_packed_checkpoints_fail_with_the_messages_of_from_bytes() {
    let dir = root().join("tests/fixtures/formats/packed-bitlinear");
    let cfg = std::fs::read(dir.join("config.json")).unwrap();
    let all = read_tensors(&dir.join("model.safetensors"));
    let w = "model.layers.1.mlp.up_proj.weight";
    let s = "model.layers.1.mlp.up_proj.weight_scale";
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        // Packed bytes stored as floats.
        (
            "weight dtype",
            edit(&all, w, |t| {
                let n: usize = t.shape.iter().product();
                Some(OwnedTensor::f32(w, &t.shape, &vec![0.0; n]))
            }),
            "expected U8",
        ),
        // A byte holding the 2-bit code 3 (no ternary value).
        (
            "invalid code",
            edit(&all, w, |t| {
                let mut t = clone(t);
                t.data[5] = 0b1100_0000;
                Some(t)
            }),
            "invalid 2-bit code 3",
        ),
        // A non-positive scale.
        (
            "scale",
            edit(&all, s, |_| Some(OwnedTensor::f32(s, &[1], &[-2.0]))),
            "expected a positive number",
        ),
        // An infinite scale: named as a bad value (it once said "shape mismatch").
        (
            "infinite scale",
            edit(&all, s, |_| {
                Some(OwnedTensor::f32(s, &[1], &[f32::INFINITY]))
            }),
            "is inf, expected a positive number",
        ),
        ("scale missing", edit(&all, s, |_| None), "missing"),
        (
            "weight shape",
            edit(&all, w, |t| {
                Some(OwnedTensor::u8(
                    w,
                    &[t.shape[0] + 1, t.shape[1]],
                    vec![0; (t.shape[0] + 1) * t.shape[1]],
                ))
            }),
            "has shape",
        ),
        // A norm of integer dtype: never decoded, only named.
        (
            "norm dtype",
            edit(&all, "model.norm.weight", |t| {
                Some(OwnedTensor {
                    dtype: Dtype::I16,
                    ..clone(t)
                })
            }),
            "dtype I16",
        ),
    ];
    for (what, bytes, needle) in cases {
        let e = same_error(&cfg, &[("model.safetensors", &bytes)]);
        assert!(e.contains(needle), "{what}: {e}");
        println!("{what}: {e}");
    }
}

/// The builder's own misuse errors (a caller bug, not bad input), and that floats are read in
/// pieces and packed bytes in one read straight into the model's buffer.
#[test]
fn streaming_reads_and_misuse() {
    let (json, all) = tensors(false);
    let bytes = file(&all);
    let mut b = ModelBuilder::new("config.json", json.as_bytes()).unwrap();
    let spans = b
        .add_file("m.safetensors", &bytes, bytes.len() as u64)
        .unwrap();
    assert_eq!(spans.len(), all.len());
    let e = b
        .add_tensor("not.a.tensor", vec![0; 4])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("not.a.tensor") && e.contains("not declared"),
        "{e}"
    );
    let first = &spans[0];
    let e = b
        .add_tensor(&first.name, vec![0; (first.end - first.start) as usize + 1])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&first.name) && e.contains("bytes by its header"),
        "{e}"
    );
    let mut largest_read = 0;
    for span in &spans[1..] {
        let data = &bytes[span.start as usize..span.end as usize];
        b.add_tensor_from(&span.name, data.len() as u64, |at, out| {
            largest_read = largest_read.max(out.len());
            out.copy_from_slice(&data[at..at + out.len()]);
        })
        .unwrap();
    }
    assert!(
        largest_read <= 64 * 1024,
        "read {largest_read} bytes at once"
    );
    let e = b.finish().unwrap_err().to_string();
    assert!(e.contains(&first.name) && e.contains("never added"), "{e}");

    let e = ModelBuilder::new("config.json", json.as_bytes())
        .unwrap()
        .add_file("m.safetensors", &bytes[..8], bytes.len() as u64)
        .unwrap_err()
        .to_string();
    assert!(e.contains("were given"), "{e}");
}

/// from_bytes and the builder on the same input: both fail with the same message.
fn same_error(config_json: &[u8], files: &[(&str, &[u8])]) -> String {
    let a = Model::from_bytes("config.json", config_json, files)
        .unwrap_err()
        .to_string();
    let b = build(config_json, files).unwrap_err().to_string();
    assert_eq!(a, b);
    a
}

fn tensors(tied: bool) -> (String, Vec<OwnedTensor>) {
    let mut cfg = tiny_config();
    cfg.tie_word_embeddings = tied;
    let (_, tensors) = Model::random(cfg.clone(), 7);
    (cfg.to_json().to_string(), tensors)
}

#[test]
fn broken_inputs_fail_with_the_messages_of_from_bytes() {
    let (json, all) = tensors(false);
    let cfg = json.as_bytes();
    let file = |ts: Vec<OwnedTensor>| file(&ts);

    // A missing tensor, named with the files searched.
    let without = |name: &str| file(all.iter().filter(|t| t.name != name).map(clone).collect());
    let bytes = without("model.layers.1.mlp.down_proj.weight");
    let e = same_error(cfg, &[("a.safetensors", &bytes)]);
    assert!(
        e.contains("model.layers.1.mlp.down_proj.weight") && e.contains("missing"),
        "{e}"
    );
    let e = same_error(cfg, &[("a.safetensors", &without("lm_head.weight"))]);
    assert!(e.contains("lm_head.weight"), "{e}");
    let e = same_error(cfg, &[("a.safetensors", &without("model.norm.weight"))]);
    assert!(e.contains("model.norm.weight"), "{e}");

    // A wrong shape, of a norm and of a projection.
    for name in [
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.self_attn.k_proj.weight",
    ] {
        let ts: Vec<OwnedTensor> = all
            .iter()
            .map(|t| {
                if t.name == name {
                    OwnedTensor::bf16(name, &[2, 3], &[0.5; 6])
                } else {
                    clone(t)
                }
            })
            .collect();
        let e = same_error(cfg, &[("a.safetensors", &file(ts))]);
        assert!(e.contains(name) && e.contains("[2, 3]"), "{e}");
    }

    // A wrong dtype: packed bytes where master weights belong.
    let name = "model.layers.0.mlp.up_proj.weight";
    let ts: Vec<OwnedTensor> = all
        .iter()
        .map(|t| {
            if t.name == name {
                OwnedTensor::u8(name, &t.shape, vec![0; t.shape.iter().product()])
            } else {
                clone(t)
            }
        })
        .collect();
    let e = same_error(cfg, &[("a.safetensors", &file(ts))]);
    assert!(e.contains(name) && e.contains("U8"), "{e}");

    // Split over two files (as shards), and a truncated or foreign file.
    let (first, second): (Vec<_>, Vec<_>) = all
        .iter()
        .map(clone)
        .partition(|t| t.name.contains("layers.0"));
    let (f1, f2) = (file(first), file(second));
    assert!(build(cfg, &[("s1.safetensors", &f1), ("s2.safetensors", &f2)]).is_ok());
    let e = same_error(cfg, &[("s1.safetensors", &f1)]);
    assert!(e.contains("s1.safetensors"), "{e}");
    let e = same_error(
        cfg,
        &[
            ("s1.safetensors", &f1),
            ("s2.safetensors", &f2[..f2.len() - 100]),
        ],
    );
    assert!(e.contains("truncated"), "{e}");
    let e = same_error(
        cfg,
        &[
            ("s1.safetensors", &f1),
            ("notes.safetensors", b"hello, world: not a model"),
        ],
    );
    assert!(e.contains("not a safetensors file"), "{e}");
    let mut extra = f2.clone();
    extra.extend_from_slice(&[0; 10]);
    same_error(cfg, &[("s2.safetensors", &extra)]);
    same_error(cfg, &[("tiny.safetensors", b"1234")]);
    same_error(cfg, &[]);
    same_error(b"{\"model_type\": \"gpt2\"}", &[("a.safetensors", &f1)]);

    // Tied: no lm_head is needed.
    let (json, all) = tensors(true);
    let bytes = file(all);
    let a =
        Model::from_bytes("config.json", json.as_bytes(), &[("m.safetensors", &bytes)]).unwrap();
    let b = build(json.as_bytes(), &[("m.safetensors", &bytes)]).unwrap();
    same(&a, &b);
}

fn clone(t: &OwnedTensor) -> OwnedTensor {
    OwnedTensor {
        name: t.name.clone(),
        dtype: t.dtype,
        shape: t.shape.clone(),
        data: t.data.clone(),
    }
}

/// A config.json that claims a billion layers: the builder's list of wanted tensors does not
/// grow with it (it once grew to 4 GB before a single weight was read); the weights then
/// disagree with the config, as `Model::from_bytes` says too.
#[test]
fn a_config_claiming_a_billion_layers_costs_nothing_until_the_weights_disagree() {
    let dir = root().join("web/models/tiny");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    config["num_hidden_layers"] = 1_000_000_000u64.into();
    let config = serde_json::to_vec(&config).unwrap();
    let st = std::fs::read(dir.join("model.safetensors")).unwrap();
    let streamed = build(&config, &[("model.safetensors", st.as_slice())])
        .err()
        .unwrap();
    let whole = Model::from_bytes(
        "config.json",
        &config,
        &[("model.safetensors", st.as_slice())],
    )
    .err()
    .unwrap();
    assert_eq!(streamed.to_string(), whole.to_string());
    assert!(streamed.to_string().contains("is missing"), "{streamed}");
}

/// A NaN or an infinity in a model's float weights (embedding, a norm, the head, a master
/// projection) is refused at load, naming the tensor, by both loaders: such a model only ever
/// generated junk (with exit 0).
#[test]
fn non_finite_weights_are_refused_at_load() {
    let (json, all) = tensors(false);
    let cfg = json.as_bytes();
    for (name, bad) in [
        ("model.embed_tokens.weight", f32::NAN),
        (
            "model.layers.1.post_attention_layernorm.weight",
            f32::INFINITY,
        ),
        ("lm_head.weight", f32::NEG_INFINITY),
        ("model.norm.weight", f32::NAN),
        ("model.layers.0.self_attn.q_proj.weight", f32::NAN),
    ] {
        let t = all.iter().find(|t| t.name == name).unwrap();
        let n: usize = t.shape.iter().product();
        let mut v = vec![0.25f32; n];
        v[n / 2] = bad;
        let bytes = edit(&all, name, |t| Some(OwnedTensor::f32(name, &t.shape, &v)));
        let files = [("model.safetensors", bytes.as_slice())];
        let whole = Model::from_bytes("config.json", cfg, &files)
            .err()
            .unwrap()
            .to_string();
        let streamed = build(cfg, &files).err().unwrap().to_string();
        println!("{name} = {bad}: {whole}");
        assert_eq!(whole, streamed);
        assert!(whole.contains(name) && whole.contains("finite"), "{whole}");
    }
}

/// A sharded model's index that is JSON but names a bad shard says what is wrong with it, not
/// "not valid JSON" (as it once did); broken JSON still says so.
#[test]
fn a_bad_shard_index_names_its_problem() {
    let e = bitlora_core::model::shard_names(
        "model.safetensors.index.json",
        br#"{"weight_map": {"model.embed_tokens.weight": "../x.safetensors"}}"#,
    )
    .unwrap_err()
    .to_string();
    assert!(
        !e.contains("not valid JSON") && e.contains("is not a plain file name"),
        "{e}"
    );
    let e = bitlora_core::model::shard_names("model.safetensors.index.json", b"{\"weight_map\": ")
        .unwrap_err()
        .to_string();
    assert!(e.contains("not valid JSON"), "{e}");
}
