//! Entry points for the fuzz targets in `fuzz/` and their corpus replay
//! (`crates/core/tests/fuzz_corpus.rs`, on stable in `cargo test`).
//!
//! Each `pub fn <target>(data: &[u8])` feeds untrusted bytes to one of the readers bitlora
//! exposes to files a user picks or downloads. Errors are the expected outcome for most
//! inputs; a panic, an abort or an allocation out of proportion to the input is a bug. A
//! target that needs several files splits `data` with [`split`]: the first two bytes (little
//! endian) are the length of the first part, the rest is the second.
//!
//! The model every target checks against is [`fuzz_config`], small enough that one execution
//! takes microseconds, so a fuzzer explores the formats rather than the arithmetic.

use std::sync::OnceLock;

use crate::config::Config;
use crate::data::{self, DataOptions, Dataset, Sequence};
use crate::lora::{Lora, LoraConfig};
use crate::model::{KvCache, Model};
use crate::optim::AdamWConfig;
use crate::tokenizer::{ChatTemplate, Message, TextStream, Tokenizer};
use crate::trainer::{Checkpoint, CpuBackend, TrainOptions, Trainer};
use crate::weights::{self, WeightFiles};
use crate::{ModelBuilder, merge, peft};

/// The names of the targets, as `fuzz/fuzz_targets/<name>.rs` and `fuzz/corpus/<name>/`.
pub const TARGETS: [&str; 10] = [
    "safetensors",
    "gguf",
    "shard_index",
    "model",
    "tokenizer",
    "chat_template",
    "data",
    "peft_adapter",
    "checkpoint",
    "train_options",
];

/// Runs target `name` on `data`; false for an unknown name.
pub fn run(name: &str, data: &[u8]) -> bool {
    match name {
        "safetensors" => safetensors(data),
        "gguf" => gguf(data),
        "shard_index" => shard_index(data),
        "model" => model(data),
        "tokenizer" => tokenizer(data),
        "chat_template" => chat_template(data),
        "data" => training_data(data),
        "peft_adapter" => peft_adapter(data),
        "checkpoint" => checkpoint(data),
        "train_options" => train_options(data),
        _ => return false,
    }
    true
}

/// Splits `data` into two parts: the first two bytes (little endian) give the first part's
/// length, clamped to what is there.
pub fn split(data: &[u8]) -> (&[u8], &[u8]) {
    let Some((len, rest)) = data.split_first_chunk::<2>() else {
        return (data, &[]);
    };
    let n = (u16::from_le_bytes(*len) as usize).min(rest.len());
    rest.split_at(n)
}

/// [`split`]'s inverse: the bytes a target that takes two files reads as `a` and `b`.
pub fn join(a: &[u8], b: &[u8]) -> Vec<u8> {
    let n = u16::try_from(a.len()).expect("first part under 64 KiB");
    let mut out = n.to_le_bytes().to_vec();
    out.extend_from_slice(a);
    out.extend_from_slice(b);
    out
}

/// The model the adapter, checkpoint and training-option targets are checked against:
/// every feature of the real ones (GQA, an untied head, master weights) at toy sizes.
pub fn fuzz_config() -> Config {
    Config {
        vocab_size: 32,
        hidden_size: 16,
        intermediate_size: 24,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        head_dim: 8,
        max_position_embeddings: 32,
        // The rest as the bundled tiny model (eps, theta, relu2, untied, master weights).
        ..crate::model::tiny_config()
    }
}

/// The [`fuzz_config`] model (random weights, fixed seed) and its safetensors bytes.
pub fn fuzz_model() -> &'static (Model, Vec<u8>) {
    static MODEL: OnceLock<(Model, Vec<u8>)> = OnceLock::new();
    MODEL.get_or_init(|| {
        let (model, tensors) = Model::random(fuzz_config(), 7);
        (model, weights::serialize(&tensors))
    })
}

/// The training data the checkpoint target resumes on (a checkpoint is tied to its data).
pub fn fuzz_dataset() -> Dataset {
    let seqs: Vec<Sequence> = (0..6u32)
        .map(|k| {
            let toks: Vec<u32> = (0..9u32).map(|i| (k * 5 + i * 3) % 32).collect();
            Sequence {
                tokens: toks[..8].to_vec(),
                targets: toks[1..].iter().map(|&t| Some(t)).collect(),
            }
        })
        .collect();
    let (val, train) = seqs.split_at(1);
    Dataset {
        train: train.to_vec(),
        val: val.to_vec(),
        format: "jsonl-text",
        truncated: 0,
        examples: train.len() + val.len(),
    }
}

/// The options the checkpoint corpus was written with ([`fuzz_trainer`]).
pub fn fuzz_train_options() -> (AdamWConfig, TrainOptions) {
    let optim = AdamWConfig {
        lr: 1e-2,
        warmup_steps: 1,
        total_steps: 4,
        ..AdamWConfig::default()
    };
    let options = TrainOptions {
        steps: 4,
        accumulation: 2,
        eval_every: 2,
        seed: 3,
    };
    (optim, options)
}

/// A fresh run on [`fuzz_model`] and [`fuzz_dataset`]: how the checkpoint seeds are made.
pub fn fuzz_trainer(lora: LoraConfig) -> crate::Result<Trainer<CpuBackend<&'static Model>>> {
    let model = &fuzz_model().0;
    let (optim, options) = fuzz_train_options();
    Trainer::new(
        CpuBackend::new(model),
        &model.config,
        Lora::init(&model.config, lora, 5),
        optim,
        fuzz_dataset(),
        options,
    )
}

/// Polls a future that does not wait on anything (the CPU backend's) to its end; None if it
/// ever says pending, rather than spinning.
pub fn block_on<F: Future>(f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    }
}

/// A safetensors file: [`WeightFiles::parse`], then every tensor read with its own shape as
/// floats and as bytes, the metadata, and [`weights::parse_header`] on the whole file and on
/// a prefix of it (what the browser's loader reads first).
pub fn safetensors(data: &[u8]) {
    if let Ok(w) = WeightFiles::parse(&[("model.safetensors", data)]) {
        let _ = w.metadata("format");
        for name in w.names() {
            if let Ok((shape, _)) = w.info(name) {
                let _ = w.f32(name, &shape);
                let _ = w.u8(name, &shape);
                let _ = w.u8(name, &[1]);
            }
            let _ = w.file_of(name);
        }
        let _ = w.f32("missing", &[1]);
    }
    let len = data.len() as u64;
    if let Ok(spans) = weights::parse_header("model.safetensors", data, len) {
        for s in &spans {
            assert!(
                s.start <= s.end && s.end <= len,
                "span {s:?} outside the file"
            );
        }
    }
    let cut = data.len().min(9 + data.len() / 2);
    let _ = weights::parse_header("model.safetensors", &data[..cut], len);
}

/// A GGUF file: [`crate::gguf::Gguf::parse`] (and `parse_header` on a prefix), every tensor
/// decoded as floats and as ternary, the config, the chat template rendered, and the model
/// loaded from it.
pub fn gguf(data: &[u8]) {
    use crate::gguf::{self, Gguf};
    let len = data.len() as u64;
    if let Ok(g) = Gguf::parse("model.gguf", data) {
        for t in &g.tensors {
            assert!(
                t.offset + t.size <= len,
                "tensor {} outside the file",
                t.name
            );
            if let Ok(bytes) = g.data(data, t) {
                let _ = gguf::decode_f32("model.gguf", t, bytes);
                let _ = gguf::decode_ternary("model.gguf", t, bytes);
            }
        }
        let _ = g.config();
        if let Ok(Some(t)) = g.chat_template() {
            let hi = Message {
                role: "user".into(),
                content: "Hi".into(),
            };
            let _ = t.render(&[hi], true);
        }
        let _ = gguf::load_model("model.gguf", data);
    }
    let cut = data.len().min(24 + data.len() / 2);
    let _ = Gguf::parse_header("model.gguf", &data[..cut], len);
}

/// A sharded checkpoint's `model.safetensors.index.json`: [`crate::model::shard_names`].
pub fn shard_index(data: &[u8]) {
    if let Ok(names) = crate::model::shard_names("model.safetensors.index.json", data) {
        for n in &names {
            assert!(
                !n.contains(['/', '\\']) && !n.starts_with('.'),
                "shard name {n:?} escapes the model directory"
            );
        }
        assert!(names.is_sorted(), "shard names are not sorted");
    }
}

/// `config.json` + one safetensors file ([`split`]): [`Config::from_json`], the model built
/// from the whole file ([`Model::from_bytes`]) and tensor by tensor ([`ModelBuilder`]); both
/// must agree, and a model that loads runs a forward pass on two tokens.
pub fn model(data: &[u8]) {
    let (config, weights_bytes) = split(data);
    if Config::from_json("config.json", config).is_err() {
        return;
    }
    let files = [("model.safetensors", weights_bytes)];
    let whole = Model::from_bytes("config.json", config, &files);
    let built = build_by_tensor(config, weights_bytes);
    assert_eq!(
        whole.is_ok(),
        built.is_ok(),
        "Model::from_bytes and ModelBuilder disagree: {:?} vs {:?}",
        whole.as_ref().err(),
        built.as_ref().err()
    );
    if let (Ok(a), Ok(b)) = (whole, built) {
        let tokens = [1 % a.config.vocab_size as u32, 0];
        let la = a.logits(&tokens);
        let lb = b.logits(&tokens);
        match (la, lb) {
            (Ok(x), Ok(y)) => assert!(
                x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
                "the two loaders' models compute different logits"
            ),
            (x, y) => assert_eq!(x.is_ok(), y.is_ok(), "one forward pass failed"),
        }
        let mut cache = KvCache::new(&a.config);
        let _ = a.forward(&tokens[..1], &mut cache);
        let _ = a.forward(&tokens[1..], &mut cache);
    }
}

fn build_by_tensor(config: &[u8], file: &[u8]) -> crate::Result<Model> {
    let mut b = ModelBuilder::new("config.json", config)?;
    let spans = b.add_file("model.safetensors", file, file.len() as u64)?;
    for s in spans {
        b.add_tensor(&s.name, file[s.start as usize..s.end as usize].to_vec())?;
    }
    b.finish()
}

/// `tokenizer.json`: [`Tokenizer::from_bytes`], then encoding and decoding a fixed text
/// (with special tokens, offsets, streamed decoding).
pub fn tokenizer(data: &[u8]) {
    let Ok(tok) = Tokenizer::from_bytes("tokenizer.json", data) else {
        return;
    };
    let _ = tok.vocab_size();
    let text = "Hello, wörld! <|endoftext|> 12\n\t日本 🙂";
    for special in [true, false] {
        if let Ok(ids) = tok.encode(text, special) {
            let _ = tok.decode(&ids, true);
            let _ = tok.decode(&ids, false);
            let mut stream = TextStream::new(&tok);
            for &id in ids.iter().take(64) {
                let _ = stream.push(id);
            }
        }
        if let Ok(spans) = tok.encode_with_offsets(text, special) {
            for (_, (s, e)) in spans {
                assert!(s <= e, "offset span {s}..{e} is reversed");
            }
        }
    }
    let _ = tok.decode(&[0, 1, 2, u32::MAX], false);
    let _ = tok.token_to_id("<|endoftext|>");
}

/// A chat template: `data` is a whole `tokenizer_config.json` when it starts with `{`, else
/// the template's source (put into one with a BOS and an EOS token). Rendered with
/// [`ChatTemplate::render`] on a short conversation, with and without the generation prompt.
pub fn chat_template(data: &[u8]) {
    let json;
    let config = if data.first() == Some(&b'{') {
        data
    } else {
        let source = String::from_utf8_lossy(data);
        json = serde_json::json!({
            "bos_token": "<s>",
            "eos_token": { "content": "</s>" },
            "chat_template": source,
        })
        .to_string();
        json.as_bytes()
    };
    let _ = crate::tokenizer::eos_token_text(config);
    let Ok(Some(t)) = ChatTemplate::from_tokenizer_config("tokenizer_config.json", config) else {
        return;
    };
    let messages = [
        Message {
            role: "system".into(),
            content: "Be brief.".into(),
        },
        Message {
            role: "user".into(),
            content: "Hi {{ there }} {% raw %}".into(),
        },
        Message {
            role: "assistant".into(),
            content: "Hello!".into(),
        },
    ];
    let _ = t.render(&messages, false);
    let _ = t.render(&messages[..2], true);
    let _ = t.render(&[], true);
}

/// The byte-level tokenizer of `tests/fixtures/byte-tokenizer`, for the data target.
pub fn byte_tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        Tokenizer::from_bytes(
            "byte-tokenizer/tokenizer.json",
            include_bytes!("../../../tests/fixtures/byte-tokenizer/tokenizer.json"),
        )
        .expect("the fixture tokenizer loads")
    })
}

/// A ChatML-style template for the data target's chat examples.
const DATA_CHAT_TEMPLATE: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// A training data file (plain text, JSONL text, prompt/completion or chat): the first byte
/// picks the options (context 2..=33, completions only, a validation share), the rest is the
/// file: [`data::parse`], then [`data::build`] with the byte tokenizer and a chat template.
pub fn training_data(data: &[u8]) {
    let Some((&flags, file)) = data.split_first() else {
        return;
    };
    let Ok((examples, format)) = data::parse("train.jsonl", file) else {
        return;
    };
    static CHAT: OnceLock<ChatTemplate> = OnceLock::new();
    let chat = CHAT.get_or_init(|| {
        let json = serde_json::json!({ "eos_token": "<|endoftext|>", "chat_template": DATA_CHAT_TEMPLATE });
        ChatTemplate::from_tokenizer_config("tokenizer_config.json", json.to_string().as_bytes())
            .expect("the template parses")
            .expect("it has one")
    });
    let tok = byte_tokenizer();
    let opts = DataOptions {
        context: 2 + (flags & 31) as usize,
        completions_only: flags & 32 != 0,
        val_fraction: if flags & 64 != 0 { 0.25 } else { 0.0 },
        max_val_sequences: (flags >> 7) as usize,
        seed: 11,
    };
    let eos = tok.token_to_id("<|endoftext|>").unwrap_or(0);
    let Ok(set) = data::build(
        "train.jsonl",
        &examples,
        format,
        tok,
        Some(chat),
        eos,
        &opts,
    ) else {
        return;
    };
    for s in set.train.iter().chain(&set.val) {
        assert_eq!(s.tokens.len(), s.targets.len(), "inputs and targets differ");
        assert!(
            s.tokens.len() <= opts.context,
            "a sequence is longer than the context"
        );
        assert!(s.counted() > 0, "a sequence with nothing to learn was kept");
    }
}

/// A PEFT adapter: `adapter_config.json` + `adapter_model.safetensors` ([`split`]), read for
/// [`fuzz_config`]'s model ([`peft::read_adapter_config`], [`peft::read_adapter`]); one that
/// loads runs a forward pass with the model and is merged into its weights.
pub fn peft_adapter(data: &[u8]) {
    let (config, st) = split(data);
    let Ok(lcfg) = peft::read_adapter_config("adapter_config.json", config) else {
        return;
    };
    let (model, base) = fuzz_model();
    let Ok(lora) = peft::read_adapter(lcfg, &model.config, "adapter_model.safetensors", st) else {
        return;
    };
    let _ = lora.num_params();
    let _ = lora.first_non_finite();
    let _ = model.forward_with_adapter(&[1, 2, 3], &mut KvCache::new(&model.config), Some(&lora));
    let w = WeightFiles::parse(&[("model.safetensors", base)]).expect("the base model parses");
    let _ = merge::merge(&model.config, &w, &lora);
}

/// A training checkpoint: [`Checkpoint::read`] for [`fuzz_config`]'s model, then
/// [`Trainer::resume`] on [`fuzz_dataset`] and one training step.
pub fn checkpoint(data: &[u8]) {
    let model = &fuzz_model().0;
    let Ok(c) = Checkpoint::read(&model.config, "checkpoint.safetensors", data) else {
        return;
    };
    let _ = c.steps();
    let _ = c.lora_config();
    let Ok(mut t) = Trainer::resume(CpuBackend::new(model), &model.config, fuzz_dataset(), c)
    else {
        return;
    };
    if !t.done() {
        let _ = block_on(t.step());
    }
}

/// The training options (the page's JSON object, the CLI's flags once parsed):
/// [`crate::TrainConfig::parse`] for [`fuzz_config`]'s model, then everything derived from it.
pub fn train_options(data: &[u8]) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let model = fuzz_config();
    let Ok(c) = crate::TrainConfig::parse(&model, &v) else {
        return;
    };
    let _ = c.lora_config();
    let steps = c.total_steps(5);
    let _ = c.adamw_config(steps);
    let _ = c.data_options();
    let _ = c.train_options(steps);
}
