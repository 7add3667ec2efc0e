#!/usr/bin/env python3
"""Trains the byte-level BPE tokenizer of bitlora's default model on target/corpus/train.txt
(built by tools/corpus/build.sh) and writes

    data/tokenizer/tokenizer.json          Hugging Face tokenizers format (loads in the Rust
                                           `tokenizers` 0.22 crate, fancy-regex, and in
                                           transformers' PreTrainedTokenizerFast)
    data/tokenizer/tokenizer_config.json   bos/eos/pad tokens for transformers and bitlora

Design (python `tokenizers` == 0.22.1):
  - vocabulary: 8,192 ids in all = 2 special tokens + 256 byte symbols + 7,934 merges;
  - special tokens: id 0 `<|endoftext|>` (document separator; bos_token AND eos_token, GPT-2
    style), id 1 `<|pad|>` (padding only; never in training data). No separate <|bos|>: every
    document of the pretraining stream follows an <|endoftext|>, so that token already marks
    "a document starts here";
  - post-processor: encode(text, add_special_tokens=True) prepends <|endoftext|>, so a prompt
    looks like the start of a pretraining document; add_special_tokens=False gives bare ids;
  - no normalizer: decode(encode(s)) == s for any UTF-8 string (the corpus itself is NFC);
  - pre-tokenizer: digits split one by one, then GPT-2 byte-level regex split, no prefix space;
    decoder: byte-level.
Training is deterministic: the same train.txt gives the same tokenizer.json byte for byte
(train.py checks this when run with --check-determinism, by training twice).
"""
import argparse
import hashlib
import json
import os
import sys

import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
EOT, PAD = "<|endoftext|>", "<|pad|>"
SPECIALS = [EOT, PAD]  # ids 0, 1
VOCAB_SIZE = 8192
DOC_SEP = "\n\n" + EOT + "\n\n"
TOKENIZERS_VERSION = "0.22.1"


def read_docs(path):
    text = open(path, encoding="utf-8").read()
    docs = text.split(DOC_SEP)
    if docs and docs[-1] == "":
        docs.pop()
    for d in docs:
        if EOT in d or PAD in d:
            sys.exit(f"train.py: a document of {path} contains a special token string")
    return docs


def build(docs):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{EOT} $A",
        pair=f"{EOT} $A $B:1",
        special_tokens=[(EOT, 0)],
    )
    return tok


def check(tok):
    assert tok.get_vocab_size(with_added_tokens=True) == VOCAB_SIZE, tok.get_vocab_size()
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    samples = ["Hello, world!", "  two  spaces\tand a tab\n\nnew paragraph ", "1790: $3,000,000",
               "naïve café — “quotes” 日本語 🤖 \u0301", "", "<|endoftext|> inside text"]
    for s in samples:
        ids = tok.encode(s, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == s, (s, tok.decode(ids))
    assert tok.encode("Hi").ids[0] == 0  # BOS from the post-processor
    assert tok.encode("<|endoftext|>", add_special_tokens=False).ids == [0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", default=os.path.join(ROOT, "target/corpus/train.txt"))
    ap.add_argument("--out", default=os.path.join(ROOT, "data/tokenizer"))
    ap.add_argument("--check-determinism", action="store_true", help="train twice, compare")
    args = ap.parse_args()
    if tokenizers.__version__ != TOKENIZERS_VERSION:
        sys.exit(f"train.py: needs tokenizers=={TOKENIZERS_VERSION}, found {tokenizers.__version__} "
                 "(tools/corpus/build.sh installs it into target/corpus/venv)")
    docs = read_docs(args.train)
    tok = build(docs)
    check(tok)
    js = tok.to_str(pretty=True)
    if args.check_determinism:
        js2 = build(docs).to_str(pretty=True)
        if js2 != js:
            sys.exit("train.py: two trainings on the same data differ")
        print("[tokenizer] determinism: two trainings gave identical tokenizer.json")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tokenizer.json"), "w", encoding="utf-8", newline="\n") as f:
        f.write(js + "\n")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOT,
        "eos_token": EOT,
        "pad_token": PAD,
        "unk_token": None,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "added_tokens_decoder": {
            str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for i, s in enumerate(SPECIALS)
        },
    }
    with open(os.path.join(args.out, "tokenizer_config.json"), "w", encoding="utf-8", newline="\n") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    digest = hashlib.sha256(js.encode()).hexdigest()
    print(f"[tokenizer] vocab {tok.get_vocab_size()} (specials {', '.join(f'{s}={i}' for i, s in enumerate(SPECIALS))}); "
          f"trained on {len(docs)} documents of {os.path.relpath(args.train, ROOT)}; "
          f"tokenizer.json sha256 {digest[:16]}... -> {os.path.relpath(args.out, ROOT)}")


if __name__ == "__main__":
    main()
