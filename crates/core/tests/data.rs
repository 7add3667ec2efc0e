//! The data pipeline on the real LLaMA-3 tokenizer and chat template (fetched by
//! tools/fetch-tokenizers.sh): packing, loss masks for completions and assistant turns,
//! truncation, the split, per-epoch order, and errors that name the line.

use std::path::{Path, PathBuf};

use bitlora_core::data::{self, DataOptions};
use bitlora_core::{ChatTemplate, Tokenizer};

fn llama3() -> (Tokenizer, ChatTemplate) {
    let dir: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/fixtures/llama3");
    let read = |f: &str| {
        std::fs::read(dir.join(f))
            .unwrap_or_else(|e| panic!("{f}: {e}; run tools/fetch-tokenizers.sh"))
    };
    let tok = Tokenizer::from_bytes("tokenizer.json", &read("tokenizer.json")).unwrap();
    let chat = ChatTemplate::from_tokenizer_config(
        "tokenizer_config.json",
        &read("tokenizer_config.json"),
    )
    .unwrap()
    .unwrap();
    (tok, chat)
}

const EOS: u32 = 128001; // <|end_of_text|>

fn opts(context: usize, completions_only: bool) -> DataOptions {
    DataOptions {
        context,
        completions_only,
        val_fraction: 0.0,
        max_val_sequences: 0,
        seed: 1,
    }
}

fn counted_text(tok: &Tokenizer, s: &data::Sequence) -> String {
    let ids: Vec<u32> = s.targets.iter().flatten().copied().collect();
    tok.decode(&ids, false).unwrap()
}

#[test]
fn plain_text_is_packed_into_overlapping_windows() {
    let (tok, _) = llama3();
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(20);
    let (ex, format) = data::parse("notes.txt", text.as_bytes()).unwrap();
    assert_eq!(format, "text");
    let ds = data::build("notes.txt", &ex, format, &tok, None, EOS, &opts(16, false)).unwrap();
    let stream: Vec<u32> = tok
        .encode(&text, true)
        .unwrap()
        .into_iter()
        .chain([EOS])
        .collect();
    assert_eq!(ds.train[0].tokens, stream[..16]);
    assert_eq!(
        ds.train[0].targets,
        stream[1..17].iter().map(|&t| Some(t)).collect::<Vec<_>>()
    );
    // Every token but the first is predicted exactly once across the windows.
    let total: usize = ds.train.iter().map(|s| s.counted()).sum();
    assert_eq!(total, stream.len() - 1);
    assert!(ds.train.iter().all(|s| s.tokens.len() <= 16));
}

#[test]
fn completions_only_counts_the_completion_and_eos() {
    let (tok, _) = llama3();
    let jsonl = "{\"prompt\": \"Define ABSURDITY.\", \"completion\": \" A statement at odds with one's own opinion.\"}\n\n{\"prompt\": \"Define BORE.\", \"completion\": \" A person who talks when you wish him to listen.\"}\n";
    let (ex, format) = data::parse("devil.jsonl", jsonl.as_bytes()).unwrap();
    assert_eq!((ex.len(), format), (2, "jsonl-prompt-completion"));
    let ds = data::build("devil.jsonl", &ex, format, &tok, None, EOS, &opts(64, true)).unwrap();
    let texts: Vec<String> = ds.train.iter().map(|s| counted_text(&tok, s)).collect();
    assert!(
        texts.contains(&" A statement at odds with one's own opinion.<|end_of_text|>".to_string()),
        "{texts:?}"
    );
    // Without the mask every next token counts.
    let all = data::build(
        "devil.jsonl",
        &ex,
        format,
        &tok,
        None,
        EOS,
        &opts(64, false),
    )
    .unwrap();
    assert!(all.train.iter().all(|s| s.counted() == s.tokens.len()));
}

#[test]
fn chat_counts_assistant_turns_only() {
    let (tok, chat) = llama3();
    let line = r#"{"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye?"}, {"role": "assistant", "content": "Farewell."}]}"#;
    let (ex, format) = data::parse("chat.jsonl", line.as_bytes()).unwrap();
    let ds = data::build(
        "chat.jsonl",
        &ex,
        format,
        &tok,
        Some(&chat),
        EOS,
        &opts(128, true),
    )
    .unwrap();
    assert_eq!(
        counted_text(&tok, &ds.train[0]),
        "Hello.<|eot_id|>Farewell.<|eot_id|>"
    );
    let e = data::build("chat.jsonl", &ex, format, &tok, None, EOS, &opts(128, true)).unwrap_err();
    assert!(e.to_string().contains("need a chat template"), "{e}");
}

#[test]
fn long_examples_keep_their_end() {
    let (tok, _) = llama3();
    let long_prompt = "word ".repeat(100);
    let line = serde_json::json!({"prompt": long_prompt, "completion": " the answer"}).to_string();
    let (ex, format) = data::parse("long.jsonl", line.as_bytes()).unwrap();
    let ds = data::build("long.jsonl", &ex, format, &tok, None, EOS, &opts(16, true)).unwrap();
    assert_eq!(ds.truncated, 1);
    assert_eq!(ds.train[0].tokens.len(), 16);
    assert_eq!(
        counted_text(&tok, &ds.train[0]),
        " the answer<|end_of_text|>"
    );
}

#[test]
fn split_and_epoch_order_are_deterministic() {
    let (tok, _) = llama3();
    let jsonl: String = (0..40)
        .map(|i| format!("{{\"text\": \"document number {i} says hello\"}}\n"))
        .collect();
    let (ex, format) = data::parse("docs.jsonl", jsonl.as_bytes()).unwrap();
    let o = DataOptions {
        context: 8,
        completions_only: false,
        val_fraction: 0.1,
        max_val_sequences: 0,
        seed: 7,
    };
    let a = data::build("docs.jsonl", &ex, format, &tok, None, EOS, &o).unwrap();
    let b = data::build("docs.jsonl", &ex, format, &tok, None, EOS, &o).unwrap();
    assert_eq!(a, b);
    let n = a.train.len() + a.val.len();
    assert_eq!(a.val.len(), (n as f32 * 0.1).round() as usize);
    let (e0, e1) = (
        data::epoch_order(a.train.len(), 7, 0),
        data::epoch_order(a.train.len(), 7, 1),
    );
    assert_ne!(e0, e1);
    assert_eq!(e0, data::epoch_order(a.train.len(), 7, 0));
    let mut sorted = e1.clone();
    sorted.sort();
    assert_eq!(sorted, (0..a.train.len()).collect::<Vec<_>>());
}

/// `max_val_sequences` bounds the held-out share; what it leaves out is trained on, and a
/// separate validation file is sampled to the same bound.
#[test]
fn validation_is_bounded() {
    let (tok, _) = llama3();
    let jsonl: String = (0..40)
        .map(|i| format!("{{\"text\": \"document number {i} says hello\"}}\n"))
        .collect();
    let (ex, format) = data::parse("docs.jsonl", jsonl.as_bytes()).unwrap();
    let o = |max| DataOptions {
        context: 8,
        completions_only: false,
        val_fraction: 0.5,
        max_val_sequences: max,
        seed: 7,
    };
    let all = data::build("docs.jsonl", &ex, format, &tok, None, EOS, &o(0)).unwrap();
    let capped = data::build("docs.jsonl", &ex, format, &tok, None, EOS, &o(3)).unwrap();
    let n = all.train.len() + all.val.len();
    assert_eq!(all.val.len(), (n as f32 * 0.5).round() as usize);
    assert_eq!(capped.val.len(), 3);
    assert_eq!(capped.train.len(), n - 3);
    // The same sequences, only split differently.
    let mut a: Vec<_> = all
        .train
        .iter()
        .chain(&all.val)
        .map(|s| s.tokens.clone())
        .collect();
    let mut c: Vec<_> = capped
        .train
        .iter()
        .chain(&capped.val)
        .map(|s| s.tokens.clone())
        .collect();
    a.sort();
    c.sort();
    assert_eq!(a, c);
    // A separate file: a seeded sample, in the file's order, the same for the same seed.
    let s = data::sample(all.train.clone(), 5, 7);
    assert_eq!(s.len(), 5);
    assert_eq!(s, data::sample(all.train.clone(), 5, 7));
    let pos: Vec<usize> = s
        .iter()
        .map(|q| all.train.iter().position(|t| t == q).unwrap())
        .collect();
    assert!(
        pos.windows(2).all(|w| w[0] < w[1]),
        "file order kept: {pos:?}"
    );
    assert_eq!(data::sample(all.train.clone(), 0, 7), all.train);
}

/// A UTF-8 byte-order mark before JSONL is not text: the file is still read as JSONL (it was
/// trained on as plain text, mark and braces included).
#[test]
fn a_byte_order_mark_is_not_text() {
    let (ex, format) = data::parse(
        "bom.jsonl",
        "\u{feff}{\"prompt\": \"a\", \"completion\": \"b\"}\n".as_bytes(),
    )
    .unwrap();
    assert_eq!(format, "jsonl-prompt-completion");
    assert_eq!(ex.len(), 1);
    let (ex, format) = data::parse("bom.txt", "\u{feff}plain words".as_bytes()).unwrap();
    assert_eq!(format, "text");
    assert_eq!(ex, vec![data::Example::Text("plain words".into())]);
}

#[test]
fn bad_data_is_named() {
    let e = data::parse("empty.txt", b"  \n\n ").unwrap_err();
    assert_eq!(
        e.to_string(),
        "empty.txt: is empty: give some text or JSONL to train on"
    );
    let e = data::parse("d.jsonl", b"{\"text\": \"ok\"}\n{\"text\": oops}\n").unwrap_err();
    assert!(
        e.to_string().starts_with("d.jsonl: line 2: not JSON"),
        "{e}"
    );
    let e = data::parse(
        "d.jsonl",
        b"{\"text\": \"ok\"}\n{\"prompt\": \"a\", \"completion\": \"b\"}\n",
    )
    .unwrap_err();
    assert!(e.to_string().contains("line 2: mixes formats"), "{e}");
    let e = data::parse("d.jsonl", b"{\"input\": \"x\"}\n").unwrap_err();
    assert!(e.to_string().contains("line 1: expected"), "{e}");
    let e = data::parse("bin.dat", &[0xff, 0xfe, 0x00]).unwrap_err();
    assert!(e.to_string().contains("not UTF-8"), "{e}");
}

/// A long text is encoded in pieces cut after lone newlines (bounded memory): the same ids as
/// one encode of the whole, for the LLaMA-3 tokenizer and the default model's, on text with
/// blank lines, indented lines, digits, punctuation before newlines and non-ASCII. (A tokenizer
/// whose pieces could span a cut, e.g. a Metaspace one, is encoded whole.)
#[test]
fn long_text_in_pieces_equals_the_whole() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let devil = std::fs::read_to_string(root.join("data/devil/train.jsonl")).unwrap();
    let mut text = String::new();
    for (k, line) in devil.lines().take(300).enumerate() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let sep = [
            "\n", "\n\n", "\n  ", ".\n", " \n", "\n\n\n", "\r\n", "\n1984 ",
        ][k % 8];
        text.push_str(v["prompt"].as_str().unwrap());
        text.push(' ');
        text.push_str(v["completion"].as_str().unwrap());
        text.push_str(sep);
        if k % 37 == 0 {
            text.push_str("naïve café — 東京\n");
        }
    }
    let default = Tokenizer::from_bytes(
        "tokenizer.json",
        &std::fs::read(root.join("web/models/default/tokenizer.json")).unwrap(),
    )
    .unwrap();
    for (name, tok) in [("llama3", llama3().0), ("default", default)] {
        assert!(tok.encodes_in_pieces(), "{name} is encoded whole");
        let whole = tok.encode(&text, true).unwrap();
        for piece in [1, 97, 1000, 1 << 16] {
            let pieces = tok.encode_in_pieces(&text, true, piece).unwrap();
            assert_eq!(pieces, whole, "{name}: pieces of ~{piece} bytes");
        }
        assert_eq!(tok.encode_long(&text, true).unwrap(), whole);
        println!(
            "{name}: {} bytes, {} tokens, equal in pieces",
            text.len(),
            whole.len()
        );
    }
}

/// `data::load` reads a file as a stream (a line or ~64 KiB of text at a time, tokenised as it
/// goes) and gives exactly what `parse` + `build` give on the whole file: plain text longer
/// than a piece (CRLF, blank lines, non-ASCII, a byte-order mark), every JSONL format, split
/// settings, and the same errors. Read through a 7-byte buffer so lines arrive in bits.
#[test]
fn streamed_loading_equals_parse_and_build() {
    let (tok, chat) = llama3();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let devil = std::fs::read_to_string(root.join("data/devil/train.jsonl")).unwrap();
    let mut text = String::from("\n\n");
    for (k, line) in devil.lines().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        text.push_str(v["completion"].as_str().unwrap());
        text.push_str(["\n", "\r\n", "\n\n", " \n"][k % 4]);
        if k % 50 == 0 {
            text.push_str("naïve café — 東京\n");
        }
    }
    assert!(text.len() > 3 << 16, "{} bytes: several pieces", text.len());
    let chat_lines: String = (0..40)
        .map(|i| {
            format!(
                "{{\"messages\": [{{\"role\": \"user\", \"content\": \"q{i}\"}}, {{\"role\": \"assistant\", \"content\": \"answer number {i}\"}}]}}\r\n"
            )
        })
        .collect();
    let text_lines: String = devil
        .lines()
        .take(200)
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            format!("{}\n\n", serde_json::json!({ "text": v["completion"] }))
        })
        .collect();
    let files: Vec<(&str, String)> = vec![
        ("long.txt", text.clone()),
        ("bom.txt", format!("\u{feff}{}", &text[..5000])),
        ("short.txt", "a few words".into()),
        ("devil.jsonl", devil.clone()),
        (
            "bom.jsonl",
            format!("\u{feff}{}", &devil[..20000].rsplit_once('\n').unwrap().0),
        ),
        ("docs.jsonl", text_lines),
        ("chat.jsonl", chat_lines),
        ("empty.txt", " \n\n ".into()),
        (
            "bad.jsonl",
            "{\"text\": \"ok\"}\n\n{\"text\": oops}\n".into(),
        ),
        (
            "mixed.jsonl",
            "{\"text\": \"ok\"}\n{\"prompt\": \"a\", \"completion\": \"b\"}\n".into(),
        ),
    ];
    let mut settings = vec![opts(16, true), opts(128, false)];
    settings.push(DataOptions {
        val_fraction: 0.2,
        max_val_sequences: 5,
        ..opts(32, true)
    });
    for (name, content) in &files {
        for o in &settings {
            let whole = data::parse(name, content.as_bytes())
                .and_then(|(ex, format)| data::build(name, &ex, format, &tok, Some(&chat), EOS, o));
            let reader = std::io::BufReader::with_capacity(7, content.as_bytes());
            let streamed = data::load(name, reader, &tok, Some(&chat), EOS, o);
            match (&whole, &streamed) {
                (Ok(a), Ok(b)) => assert!(a == b, "{name}, context {}: datasets differ", o.context),
                (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "{name}"),
                _ => panic!("{name}: {whole:?} vs {streamed:?}"),
            }
        }
        match data::load(
            name,
            content.as_bytes(),
            &tok,
            Some(&chat),
            EOS,
            &opts(16, true),
        ) {
            Ok(d) => println!(
                "{name}: {} bytes, {} ({} + {} sequences): equal",
                content.len(),
                d.format,
                d.train.len(),
                d.val.len()
            ),
            Err(e) => println!("{name}: same error: {e}"),
        }
    }
    // Not UTF-8: named with the byte, as parse does.
    let mut bytes = b"{\"text\": \"ok\"}\n{\"text\": \"".to_vec();
    bytes.extend([0xff, b'"', b'}', b'\n']);
    let e = data::load("bin.jsonl", &bytes[..], &tok, None, EOS, &opts(16, true)).unwrap_err();
    assert_eq!(
        e.to_string(),
        data::parse("bin.jsonl", &bytes).unwrap_err().to_string()
    );
}
