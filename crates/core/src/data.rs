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
}

/// Parses a data file; `file` names it in errors (with the line number for JSONL).
pub fn parse(file: &str, bytes: &[u8]) -> Result<(Vec<Example>, &'static str)> {
    let bad = |msg: String| Error::Data {
        file: file.to_string(),
        msg,
    };
    let bad_line = |line: usize, msg: String| Error::DataLine {
        file: file.to_string(),
        line,
        msg,
    };
    let text = std::str::from_utf8(bytes).map_err(|e| {
        bad(format!(
            "not UTF-8 text (byte {}): training data must be text or JSONL",
            e.valid_up_to()
        ))
    })?;
    // A byte-order mark (editors on Windows write one) is not text: JSONL after it is JSONL.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let first = text.lines().find(|l| !l.trim().is_empty());
    let Some(first) = first else {
        return Err(bad("is empty: give some text or JSONL to train on".into()));
    };
    if !first.trim_start().starts_with('{') {
        return Ok((vec![Example::Text(text.to_string())], "text"));
    }
    let mut examples = Vec::new();
    let mut kind = None;
    for (n, line) in text.lines().enumerate() {
        let line_no = n + 1;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| bad_line(line_no, format!("not JSON: {e}")))?;
        let field = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
        let ex = if let Some(t) = field("text") {
            Example::Text(t)
        } else if let (Some(prompt), Some(completion)) = (field("prompt"), field("completion")) {
            Example::PromptCompletion { prompt, completion }
        } else if let Some(msgs) = v.get("messages") {
            let msgs: Vec<Message> = serde_json::from_value(msgs.clone()).map_err(|e| {
                bad_line(
                    line_no,
                    format!(
                        "\"messages\" must be a list of {{\"role\", \"content\"}} objects: {e}"
                    ),
                )
            })?;
            if msgs.is_empty() {
                return Err(bad_line(line_no, "\"messages\" is empty".into()));
            }
            Example::Chat(msgs)
        } else {
            return Err(bad_line(
                line_no,
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
            return Err(bad_line(
                line_no,
                format!("mixes formats ({this} after {})", kind.unwrap_or(this)),
            ));
        }
        examples.push(ex);
    }
    Ok((examples, kind.unwrap_or("jsonl")))
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
                return Err(Error::Data { file: file.to_string(), msg: "chat examples need a chat template (tokenizer_config.json with chat_template)".into() });
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
    if opts.context < 2 {
        return Err(Error::Data {
            file: file.to_string(),
            msg: format!("context {} is too short (at least 2 tokens)", opts.context),
        });
    }
    let n = opts.context + 1; // tokens per sequence before the shift
    let mut seqs = Vec::new();
    let mut truncated = 0;
    let to_seq = |chunk: &[(u32, bool)]| Sequence {
        tokens: chunk[..chunk.len() - 1].iter().map(|t| t.0).collect(),
        targets: chunk[1..]
            .iter()
            .map(|&(id, counts)| counts.then_some(id))
            .collect(),
    };
    if examples.iter().all(|e| matches!(e, Example::Text(_))) {
        // Packing: one stream, cut into overlapping windows of context + 1 tokens.
        let mut stream = Vec::new();
        for ex in examples {
            stream.extend(tokenize(ex, tok, chat, eos, opts.completions_only, file)?);
        }
        let mut start = 0;
        while start + 1 < stream.len() {
            let end = (start + n).min(stream.len());
            seqs.push(to_seq(&stream[start..end]));
            start += opts.context;
        }
    } else {
        for ex in examples {
            let mut ids = tokenize(ex, tok, chat, eos, opts.completions_only, file)?;
            if ids.len() > n {
                truncated += 1;
                let first_counted = ids.iter().position(|t| t.1).unwrap_or(0);
                let keep_from = (ids.len() - n).min(first_counted);
                ids.drain(..keep_from);
                ids.truncate(n);
            }
            if ids.len() >= 2 {
                seqs.push(to_seq(&ids));
            }
        }
    }
    seqs.retain(|s| s.counted() > 0);
    if seqs.is_empty() {
        return Err(Error::Data {
            file: file.to_string(),
            msg: "holds no tokens to train on".into(),
        });
    }
    // Deterministic split: shuffle with the seed, hold out the first share.
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    shuffle(&mut order, &mut Rng::new(opts.seed));
    let n_val = if opts.val_fraction > 0.0 && seqs.len() >= 2 {
        let n = ((seqs.len() as f32 * opts.val_fraction).round() as usize).clamp(1, seqs.len() - 1);
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
        truncated,
    })
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
