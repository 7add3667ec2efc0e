#!/usr/bin/env python3
"""Encodes target/corpus/{train,val}.txt with data/tokenizer/tokenizer.json into
target/corpus/{train,val}.u16: little-endian uint16 token ids, one stream per split,

    <|endoftext|> doc1 <|endoftext|> doc2 ... <|endoftext|> docN <|endoftext|>

i.e. each document is what encode(doc, add_special_tokens=True) gives (the post-processor's
leading <|endoftext|>, id 0) and the stream ends with one more <|endoftext|>. A model trained on
windows of this stream sees every document start right after id 0, as a fine-tuning example or
a prompt encoded with special tokens does. Reading it back: numpy.fromfile(path, dtype="<u2").

Also writes target/corpus/encode_stats.json and prints token counts and bytes/token.
"""
import argparse
import array
import hashlib
import json
import os
import sys

from tokenizers import Tokenizer

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
EOT = "<|endoftext|>"
DOC_SEP = "\n\n" + EOT + "\n\n"


def read_docs(path):
    docs = open(path, encoding="utf-8").read().split(DOC_SEP)
    if docs and docs[-1] == "":
        docs.pop()
    return docs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", default=os.path.join(ROOT, "target/corpus"))
    ap.add_argument("--tokenizer", default=os.path.join(ROOT, "data/tokenizer/tokenizer.json"))
    args = ap.parse_args()
    tok = Tokenizer.from_file(args.tokenizer)
    eot = tok.token_to_id(EOT)
    if eot != 0 or tok.get_vocab_size() > 65536:
        sys.exit(f"encode.py: expected {EOT} = 0 and a vocabulary that fits uint16")
    stats = {"tokenizer_sha256": hashlib.sha256(open(args.tokenizer, "rb").read()).hexdigest()}
    for split in ("train", "val"):
        docs = read_docs(os.path.join(args.corpus, f"{split}.txt"))
        ids = array.array("H")
        nbytes = 0
        for enc in tok.encode_batch(docs, add_special_tokens=True):
            if enc.ids[0] != eot:
                sys.exit("encode.py: the tokenizer's post-processor did not add <|endoftext|>")
            ids.extend(enc.ids)
        ids.append(eot)
        nbytes = sum(len(d.encode("utf-8")) for d in docs)
        if sys.byteorder != "little":
            ids.byteswap()
        out = os.path.join(args.corpus, f"{split}.u16")
        with open(out + ".tmp", "wb") as f:
            ids.tofile(f)
        os.replace(out + ".tmp", out)
        text_tokens = len(ids) - len(docs) - 1
        stats[split] = {"documents": len(docs), "tokens": len(ids), "text_tokens": text_tokens,
                        "text_bytes": nbytes, "bytes_per_token": round(nbytes / text_tokens, 4),
                        "file_bytes": os.path.getsize(out),
                        "sha256": hashlib.sha256(open(out, "rb").read()).hexdigest()}
        print(f"[encode] {split}.u16: {len(ids):,} tokens ({len(docs):,} documents, "
              f"{os.path.getsize(out):,} bytes); {nbytes / text_tokens:.3f} bytes/token on the text")
    with open(os.path.join(args.corpus, "encode_stats.json"), "w") as f:
        json.dump(stats, f, indent=1)


if __name__ == "__main__":
    main()
