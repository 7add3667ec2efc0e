//! Training data: from a file the user gives to the token sequences a training step consumes.
//!
//! Formats (detected from the content: JSON Lines when the first non-blank line starts with
//! `{`, plain text otherwise):
//! - plain text: one document; tokenized with the tokenizer's special tokens (BOS), an EOS
//!   after it, and cut into sequences of `context` tokens (packing);
//! - JSONL `{"text": ...}`: each line a document, packed the same way, EOS between documents;
//! - JSONL `{"prompt": ..., "completion": ...}`: one sequence per line, prompt + completion +
//!   EOS; with `completions_only` the loss counts only the completion (and its EOS);
//! - JSONL `{"messages": [{"role", "content"}, ...]}`: one sequence per line, rendered with the
//!   model's chat template; with `completions_only` the loss counts only assistant turns.
//!
//! Longer than the context: packed text simply continues in the next sequence. A prompt /
//! completion or chat example longer than `context + 1` tokens keeps its END (the answer) and
//! drops tokens from the start of the prompt; if the part that counts is longer than the
//! context by itself, it keeps the first `context + 1` tokens of it. The number of truncated
//! examples is reported.
//!
//! Targets: sequence position t predicts token t+1 (as transformers' `labels = input_ids`
//! with its internal shift), so a sequence of n+1 tokens gives n inputs and n targets.

use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::tokenizer::{ChatTemplate, Message, Tokenizer};

/// One parsed training example.
#[derive(Clone, Debug, PartialEq)]
pub enum Example {
    Text(String),
    PromptCompletion { prompt: String, completion: String },
    Chat(Vec<Message>),
}

/// Inputs and targets of one training sequence; `targets[t] = None` does not count.
#[derive(Clone, Debug, PartialEq)]
pub struct Sequence {
    pub tokens: Vec<u32>,
    pub targets: Vec<Option<u32>>,
}

impl Sequence {
    /// Targets that count toward the loss.
    pub fn counted(&self) -> usize {
        self.targets.iter().filter(|t| t.is_some()).count()
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct DataOptions {
    /// Tokens per sequence (T).
    pub context: usize,
    /// Count the loss on completions / assistant turns only.
    pub completions_only: bool,
    /// Share of sequences held out for validation (0 = none).
    pub val_fraction: f32,
    /// At most this many validation sequences (0: no cap); the rest of the share is trained on.
    pub max_val_sequences: usize,
    /// Seed of the train/validation split.
    pub seed: u64,
}

/// Train and validation sequences, plus what happened on the way.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    pub train: Vec<Sequence>,
    pub val: Vec<Sequence>,
    pub format: &'static str,
    pub truncated: usize,
    /// Examples read: JSONL lines with an example, 1 for a plain-text file.
    pub examples: usize,
}

/// Parses a data file; `file` names it in errors (with the line number for JSONL). Holds
/// every example's text: [`load`] reads and tokenises a file as a stream instead.
pub fn parse(file: &str, bytes: &[u8]) -> Result<(Vec<Example>, &'static str)> {
    let text = std::str::from_utf8(bytes).map_err(|e| not_utf8(file, e.valid_up_to()))?;
    // A byte-order mark (editors on Windows write one) is not text: JSONL after it is JSONL.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let first = text.lines().find(|l| !l.trim().is_empty());
    let Some(first) = first else {
        return Err(empty(file));
    };
    if !is_jsonl(first) {
        return Ok((vec![Example::Text(text.to_string())], "text"));
    }
    let mut examples = Vec::new();
    let mut kind = None;
    for (n, line) in text.lines().enumerate() {
        if let Some(ex) = parse_line(file, n + 1, line, &mut kind)? {
            examples.push(ex);
        }
    }
    Ok((examples, kind.unwrap_or("jsonl")))
}

fn not_utf8(file: &str, byte: usize) -> Error {
    Error::Data {
        file: file.to_string(),
        msg: format!("not UTF-8 text (byte {byte}): training data must be text or JSONL"),
    }
}

fn empty(file: &str) -> Error {
    Error::Data {
        file: file.to_string(),
        msg: "is empty: give some text or JSONL to train on".into(),
    }
}

/// The format is JSONL when the first non-blank line starts with `{`.
fn is_jsonl(first_line: &str) -> bool {
    first_line.trim_start().starts_with('{')
}

/// One JSONL line (None if blank); `kind` is the file's format so far, set by its first
/// example: a line of another format is refused.
fn parse_line(
    file: &str,
    line_no: usize,
    line: &str,
    kind: &mut Option<&'static str>,
) -> Result<Option<Example>> {
    let bad_line = |msg: String| Error::DataLine {
        file: file.to_string(),
        line: line_no,
        msg,
    };
    if line.trim().is_empty() {
        return Ok(None);
    }
    let v: serde_json::Value =
        serde_json::from_str(line).map_err(|e| bad_line(format!("not JSON: {e}")))?;
    let field = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
    let ex = if let Some(t) = field("text") {
        Example::Text(t)
    } else if let (Some(prompt), Some(completion)) = (field("prompt"), field("completion")) {
        Example::PromptCompletion { prompt, completion }
    } else if let Some(msgs) = v.get("messages") {
        let msgs: Vec<Message> = serde_json::from_value(msgs.clone()).map_err(|e| {
            bad_line(format!(
                "\"messages\" must be a list of {{\"role\", \"content\"}} objects: {e}"
            ))
        })?;
        if msgs.is_empty() {
            return Err(bad_line("\"messages\" is empty".into()));
        }
        Example::Chat(msgs)
    } else {
        return Err(bad_line(
            "expected {\"text\"}, {\"prompt\", \"completion\"} or {\"messages\"} with string values"
                .into(),
        ));
    };
    let this = match &ex {
        Example::Text(_) => "jsonl-text",
        Example::PromptCompletion { .. } => "jsonl-prompt-completion",
        Example::Chat(_) => "jsonl-chat",
    };
    if *kind.get_or_insert(this) != this {
        return Err(bad_line(format!(
            "mixes formats ({this} after {})",
            kind.unwrap_or(this)
        )));
    }
    Ok(Some(ex))
}

/// End-of-turn markers of the chat templates in use (LLaMA-3, ChatML, Gemma, LLaMA-2).
const END_OF_TURN: [&str; 5] = [
    "<|eot_id|>",
    "<|im_end|>",
    "<end_of_turn>",
    "</s>",
    "<|end_of_text|>",
];

/// Tokens of an example with, for each token, whether it counts toward the loss.
fn tokenize(
    ex: &Example,
    tok: &Tokenizer,
    chat: Option<&ChatTemplate>,
    eos: u32,
    completions_only: bool,
    file: &str,
) -> Result<Vec<(u32, bool)>> {
    Ok(match ex {
        Example::Text(t) => {
            let mut ids: Vec<(u32, bool)> = tok
                .encode_long(t, true)?
                .into_iter()
                .map(|i| (i, true))
                .collect();
            ids.push((eos, true));
            ids
        }
        Example::PromptCompletion { prompt, completion } => {
            let mut ids: Vec<(u32, bool)> = tok
                .encode(prompt, true)?
                .into_iter()
                .map(|i| (i, !completions_only))
                .collect();
            ids.extend(
                tok.encode(completion, false)?
                    .into_iter()
                    .map(|i| (i, true)),
            );
            ids.push((eos, true));
            ids
        }
        Example::Chat(messages) => {
            let Some(chat) = chat else {
                return Err(Error::Data { file: file.to_string(), msg: "chat examples need a chat template (tokenizer_config.json with chat_template, or a .gguf with tokenizer.chat_template)".into() });
            };
            let text = chat.render(messages, false)?;
            // Byte spans of the assistant turns: from the end of the prompt that asks for turn
            // i (rendered with add_generation_prompt) to the end of the turn's content plus the
            // end-of-turn marker right after it. The end is found from the content, not from a
            // rendering without the generation prompt, because some templates (early LLaMA-3)
            // append the assistant header whatever add_generation_prompt says.
            let mut spans = Vec::new();
            for (i, m) in messages.iter().enumerate() {
                if m.role == "assistant" {
                    let start = chat.render(&messages[..i], true)?.len();
                    let content = m.content.trim();
                    let Some(pos) = text.get(start..).and_then(|rest| rest.find(content)) else {
                        return Err(Error::Data {
                            file: file.to_string(),
                            msg: format!(
                                "the chat template does not render assistant turn {} where expected",
                                i + 1
                            ),
                        });
                    };
                    let mut end = start + pos + content.len();
                    if let Some(marker) =
                        END_OF_TURN.iter().find(|mk| text[end..].starts_with(**mk))
                    {
                        end += marker.len();
                    }
                    spans.push((start, end));
                }
            }
            // The template writes BOS itself: no special tokens from the tokenizer.
            tok.encode_with_offsets(&text, false)?
                .into_iter()
                .map(|(id, (s, _))| {
                    (
                        id,
                        !completions_only || spans.iter().any(|&(a, b)| s >= a && s < b),
                    )
                })
                .collect()
        }
    })
}

/// Turns examples into train and validation sequences of at most `context` tokens.
pub fn build(
    file: &str,
    examples: &[Example],
    format: &'static str,
    tok: &Tokenizer,
    chat: Option<&ChatTemplate>,
    eos: u32,
    opts: &DataOptions,
) -> Result<Dataset> {
    let mut b = Builder::new(file, tok, chat, eos, opts)?;
    let packed = examples.iter().all(|e| matches!(e, Example::Text(_)));
    for ex in examples {
        b.example(ex, packed)?;
    }
    b.finish(format)
}

/// Bytes of plain text tokenised at a time by [`load`] (as [`Tokenizer::encode_long`]).
const TEXT_PIECE: usize = 1 << 16;

/// [`parse`] + [`build`] as a stream: reads `reader` a line at a time (JSONL) or about 64 KiB
/// at a time (plain text, cut where [`Tokenizer::encode_long`] cuts, so the same ids), and
/// tokenises as it goes. What it keeps is the sequences (12 bytes a token: id and target) plus
/// one line or piece of text, not the file or its parsed examples.
pub fn load(
    file: &str,
    mut reader: impl std::io::BufRead,
    tok: &Tokenizer,
    chat: Option<&ChatTemplate>,
    eos: u32,
    opts: &DataOptions,
) -> Result<Dataset> {
    let mut b = Builder::new(file, tok, chat, eos, opts)?;
    let mut raw = Vec::new();
    let mut offset = 0; // bytes read before `raw`
    let mut line_no = 0;
    // Reads the next line (with its newline) into `raw`; false at the end of the file.
    let mut next_line = |raw: &mut Vec<u8>, offset: &mut usize| -> Result<bool> {
        *offset += raw.len();
        raw.clear();
        let n = reader.read_until(b'\n', raw).map_err(|source| Error::Io {
            path: file.to_string(),
            source,
        })?;
        Ok(n > 0)
    };
    // Up to the first non-blank line: its format decides the file's.
    let mut text = String::new(); // plain text read but not yet tokenised
    let jsonl = loop {
        if !next_line(&mut raw, &mut offset)? {
            return Err(empty(file));
        }
        line_no += 1;
        let line = decode(file, &raw, offset, line_no)?;
        if !line.trim().is_empty() {
            break is_jsonl(line);
        }
        text.push_str(line);
    };
    if jsonl {
        let mut kind = None;
        loop {
            let line = decode(file, &raw, offset, line_no)?;
            // As str::lines: the newline, and a carriage return before it, end the line.
            let line = line
                .strip_suffix('\n')
                .map_or(line, |l| l.strip_suffix('\r').unwrap_or(l));
            if let Some(ex) = parse_line(file, line_no, line, &mut kind)? {
                b.example(&ex, kind == Some("jsonl-text"))?;
            }
            if !next_line(&mut raw, &mut offset)? {
                break;
            }
            line_no += 1;
        }
        return b.finish(kind.unwrap_or("jsonl"));
    }
    // Plain text: one document, tokenised a piece at a time as the text arrives.
    let mut first = true;
    loop {
        let line = decode(file, &raw, offset, line_no)?;
        text.push_str(line);
        while let Some(end) = tok.piece_end(&text, TEXT_PIECE) {
            let ids = tok.encode(&text[..end], first)?;
            first = false;
            b.pack(ids.into_iter().map(|i| (i, true)));
            text.drain(..end);
        }
        if !next_line(&mut raw, &mut offset)? {
            break;
        }
        line_no += 1;
    }
    let ids = tok.encode(&text, first)?;
    b.pack(ids.into_iter().map(|i| (i, true)).chain([(eos, true)]));
    b.examples = 1;
    b.finish("text")
}

/// Line `line_no` (read after `offset` bytes) as text; the file's first may start with a
/// byte-order mark, which is not text.
fn decode<'r>(file: &str, raw: &'r [u8], offset: usize, line_no: usize) -> Result<&'r str> {
    let line = std::str::from_utf8(raw).map_err(|e| not_utf8(file, offset + e.valid_up_to()))?;
    Ok(if line_no == 1 {
        line.strip_prefix('\u{feff}').unwrap_or(line)
    } else {
        line
    })
}

/// Sequences built as tokens arrive: packed text cut into windows, or one example at a time.
struct Builder<'a> {
    file: &'a str,
    tok: &'a Tokenizer,
    chat: Option<&'a ChatTemplate>,
    eos: u32,
    opts: &'a DataOptions,
    seqs: Vec<Sequence>,
    /// Packed tokens not yet in a full window.
    stream: Vec<(u32, bool)>,
    truncated: usize,
    examples: usize,
}

impl<'a> Builder<'a> {
    fn new(
        file: &'a str,
        tok: &'a Tokenizer,
        chat: Option<&'a ChatTemplate>,
        eos: u32,
        opts: &'a DataOptions,
    ) -> Result<Builder<'a>> {
        if opts.context < 2 {
            return Err(Error::Data {
                file: file.to_string(),
                msg: format!("context {} is too short (at least 2 tokens)", opts.context),
            });
        }
        Ok(Builder {
            file,
            tok,
            chat,
            eos,
            opts,
            seqs: Vec::new(),
            stream: Vec::new(),
            truncated: 0,
            examples: 0,
        })
    }

    fn example(&mut self, ex: &Example, packed: bool) -> Result<()> {
        self.examples += 1;
        let ids = tokenize(
            ex,
            self.tok,
            self.chat,
            self.eos,
            self.opts.completions_only,
            self.file,
        )?;
        if packed {
            self.pack(ids);
        } else {
            self.single(ids);
        }
        Ok(())
    }

    /// Packing: one stream cut into overlapping windows of context + 1 tokens, `context`
    /// apart; a window is made as soon as its tokens are there.
    fn pack(&mut self, ids: impl IntoIterator<Item = (u32, bool)>) {
        let n = self.opts.context + 1;
        self.stream.extend(ids);
        let mut start = 0;
        while self.stream.len() - start >= n {
            self.seqs.push(to_seq(&self.stream[start..start + n]));
            start += self.opts.context;
        }
        self.stream.drain(..start);
    }

    /// One sequence per example; a long one keeps its end (see the module doc).
    fn single(&mut self, mut ids: Vec<(u32, bool)>) {
        let n = self.opts.context + 1;
        if ids.len() > n {
            self.truncated += 1;
            let first_counted = ids.iter().position(|t| t.1).unwrap_or(0);
            let keep_from = (ids.len() - n).min(first_counted);
            ids.drain(..keep_from);
            ids.truncate(n);
        }
        if ids.len() >= 2 {
            self.seqs.push(to_seq(&ids));
        }
    }

    fn finish(mut self, format: &'static str) -> Result<Dataset> {
        let opts = self.opts;
        // The last, shorter window of the packed stream.
        if self.stream.len() >= 2 {
            self.seqs.push(to_seq(&self.stream));
        }
        let mut seqs = self.seqs;
        seqs.retain(|s| s.counted() > 0);
        if seqs.is_empty() {
            return Err(Error::Data {
                file: self.file.to_string(),
                msg: "holds no tokens to train on".into(),
            });
        }
        // Deterministic split: shuffle with the seed, hold out the first share.
        let mut order: Vec<usize> = (0..seqs.len()).collect();
        shuffle(&mut order, &mut Rng::new(opts.seed));
        let n_val = if opts.val_fraction > 0.0 && seqs.len() >= 2 {
            let n =
                ((seqs.len() as f32 * opts.val_fraction).round() as usize).clamp(1, seqs.len() - 1);
            match opts.max_val_sequences {
                0 => n,
                max => n.min(max),
            }
        } else {
            0
        };
        let mut slots: Vec<Option<Sequence>> = seqs.into_iter().map(Some).collect();
        let mut take = |i: usize| slots[i].take().expect("each index once");
        // Each side keeps the file's order (the trainer shuffles per epoch).
        let (mut val_idx, mut train_idx) = (order[..n_val].to_vec(), order[n_val..].to_vec());
        val_idx.sort_unstable();
        train_idx.sort_unstable();
        let val = val_idx.into_iter().map(&mut take).collect();
        let train = train_idx.into_iter().map(&mut take).collect();
        Ok(Dataset {
            train,
            val,
            format,
            truncated: self.truncated,
            examples: self.examples,
        })
    }
}

/// A window of n + 1 tokens: n inputs, the n targets after them.
fn to_seq(chunk: &[(u32, bool)]) -> Sequence {
    Sequence {
        tokens: chunk[..chunk.len() - 1].iter().map(|t| t.0).collect(),
        targets: chunk[1..]
            .iter()
            .map(|&(id, counts)| counts.then_some(id))
            .collect(),
    }
}

/// At most `max` of `seqs` (0: all), a random sample by `seed` kept in the given order: a
/// separate validation file bounded like a held-out share.
pub fn sample(seqs: Vec<Sequence>, max: usize, seed: u64) -> Vec<Sequence> {
    if max == 0 || seqs.len() <= max {
        return seqs;
    }
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    shuffle(&mut order, &mut Rng::new(seed));
    let mut keep = vec![false; seqs.len()];
    for &i in &order[..max] {
        keep[i] = true;
    }
    seqs.into_iter()
        .zip(keep)
        .filter_map(|(s, k)| k.then_some(s))
        .collect()
}

/// Fisher-Yates with our RNG (the same permutation on every platform).
pub fn shuffle<T>(items: &mut [T], rng: &mut Rng) {
    for i in (1..items.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        items.swap(i, j);
    }
}

/// The order of training sequences in `epoch`: a fresh permutation per epoch, a function of
/// (seed, epoch) alone, so a resumed run sees exactly the order it would have seen.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    shuffle(
        &mut order,
        &mut Rng::new(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1)),
    );
    order
}
