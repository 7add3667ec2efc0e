#!/usr/bin/env python3
"""Parses Debian's dict-devil (Ambrose Bierce, The Devil's Dictionary, public domain) and writes
the demo fine-tuning set data/devil/{train,val}.jsonl:

    {"prompt": "Define ABSURDITY.", "completion": " A statement or belief manifestly ..."}

One line per definition. The dictd files (devil.index + devil.dict.dz) are read from the
extracted, sha256-verified package that tools/corpus/build_corpus.py leaves in
target/corpus/cache/src/dict-devil (run that first, or run tools/corpus/build.sh).

Parsing (each dictd entry is one byte range of the .dict file, named by the index):
  - header line: 'HEADWORD[, HEADWORD2 | or HEADWORD2 | (or HEADWORD2)], pos.  text...';
    also 'HEAD.  [Latin]  text', 'HEAD?  [Latin]  text', 'IMPOSTOR n.  text' (no comma),
    'INFERIAE,n.' and the letter entries ('I is the first letter ...', 'T, the twentieth ...')
    whose whole text is the definition;
  - body: blocks separated by blank lines. A block whose lines are all indented is verse (line
    breaks kept, indentation dropped; the right-aligned attribution, e.g. 'G.J.', stays a line
    of its own); otherwise prose: an indented line starts a new paragraph, hard-wrapped lines are
    joined (a line ending in 'word-' joins the next without a space), runs of spaces collapse;
  - '_italic_' and '{CROSSREF}' markup is dropped (the words stay); '[Latin]' tags are kept;
  - entries whose whole definition is a cross-reference ('See HUSBAND.') are left out of the
    demo set (counted and reported): 'Define BRUTE.' -> ' See HUSBAND.' teaches nothing;
  - several index words can point at one entry (BABE/BABY): one example per entry; entries the
    package carries twice (PRECEDENT, PRECIPITATE) count once; a headword with two entries of
    different senses (REASON, v.i. / n.) gives one example with both, a blank line between.

Split: an entry goes to val when sha256(f"{SEED}:{HEADWORD}") as an integer, mod 1000, is below
VAL_PER_MILLE (100, i.e. ~10%); deterministic, independent of order and Python version.
"""
import argparse
import gzip
import hashlib
import json
import os
import re
import sys
import unicodedata

SEED = "devil-v1"
VAL_PER_MILLE = 100

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

POS = r"(?:n\.\s?pl|n|adj|adv|v\.\s?t|v\.\s?i|v|pp|p\.\s?p|pro|pron|x|prep|conj|interj)\."
HEAD = r"[A-Z][A-Z0-9'\-\.]*(?: [A-Z][A-Z0-9'\-\.]*)*"
HEADER = re.compile(
    r"^(?P<head>" + HEAD + r"(?:(?:, | or | \(or )" + HEAD + r"\)?)*(?: " + HEAD + r")*)"
    r"(?:(?:,\s*|\s+)(?P<pos>" + POS + r"(?: and " + POS + r")?)|(?P<punct>[.?]))"
    r"(?:[ \t]+(?P<lang>\[[A-Za-z]+\]))?[ \t]*(?P<rest>.*)$",
    re.S,
)
# Letter entries: 'I is the first letter', 'T, the twentieth letter', 'W (double U) has'.
LETTER = re.compile(r"^(?P<head>[A-Z])(?=[ ,])(?P<rest>.*)$", re.S)
XREF = re.compile(r"^See (?:also )?[A-Z][A-Z ,\-'.]*\.?$")


def _b64(s):
    v = 0
    for ch in s:
        v = v * 64 + B64.index(ch)
    return v


def read_entries(index_path, dict_path):
    """(index words, raw text) per entry, in file order, dictd metadata entries left out."""
    data = gzip.open(dict_path).read()
    ranges = {}
    with open(index_path, encoding="utf-8") as f:
        for line in f:
            word, off, size = line.rstrip("\n").split("\t")
            if word.startswith("00database"):
                continue
            ranges.setdefault((_b64(off), _b64(size)), []).append(word)
    out = []
    for (off, size), words in sorted(ranges.items()):
        text = data[off:off + size].decode("utf-8")
        out.append((words, unicodedata.normalize("NFC", text)))
    return out


def _prose(lines):
    paras, cur = [], []
    for ln in lines:
        if ln.startswith("  ") and cur:
            paras.append(cur)
            cur = []
        cur.append(ln.strip())
    if cur:
        paras.append(cur)
    out = []
    for p in paras:
        text = ""
        for ln in p:
            # 'cannon-' + 'shot': a compound broken at its hyphen (the text has no soft
            # hyphenation); a '--' dash at the end of a line keeps its space.
            glue = "" if re.search(r"[A-Za-z]-$", text) and not text.endswith("--") else " "
            text = ln if not text else text + glue + ln
        out.append(re.sub(r"\s+", " ", text).strip())
    return out


def _body(text):
    blocks = re.split(r"\n[ \t]*\n", text.strip("\n"))
    out = []
    for b in blocks:
        lines = [ln.rstrip() for ln in b.split("\n") if ln.strip()]
        if not lines:
            continue
        if len(lines) > 1 and all(ln.startswith("  ") for ln in lines):
            out.append("\n".join(re.sub(r"\s+", " ", ln.strip()) for ln in lines))
        else:
            out.extend(_prose(lines))
    s = "\n\n".join(out)
    s = re.sub(r"_([^_\n]+?)_", r"\1", s)  # _italic_ markup
    s = re.sub(r"\{([^{}\n]+)\}", r"\1", s)  # dictfmt cross-reference markup {HUSBAND}
    return s.replace("_", "")


def parse_entry(words, text):
    """dict(headword, pos, definition) of one raw dictd entry; raises ValueError if unparsable."""
    first_nl = text.find("\n")
    m = HEADER.match(text)
    line_end = first_nl if first_nl >= 0 else len(text)
    if m and max(m.end("pos"), m.end("punct")) <= line_end:
        head = re.sub(r"\s+", " ", m.group("head")).strip()
        pos = m.group("pos") or ""
        rest = m.group("rest")
        if m.group("lang"):
            rest = m.group("lang") + " " + rest
        if not pos and m.group("punct") == "?":
            head += "?"
        elif not pos and head.endswith("."):
            pass  # R.I.P., LL.D.
        definition = _body(rest)
    else:
        m = LETTER.match(text)
        if not m:
            raise ValueError(f"unparsable entry {words}: {text[:60]!r}")
        head, pos = m.group("head"), ""
        definition = _body(text)  # the letter entries are whole sentences about the letter
    if not definition:
        raise ValueError(f"empty definition for {words}")
    return {"headword": head, "pos": pos.replace(" ", ""), "definition": definition, "index": words}


def parse(index_path, dict_path):
    entries, errors = [], []
    for words, text in read_entries(index_path, dict_path):
        try:
            entries.append(parse_entry(words, text))
        except ValueError as e:
            errors.append(str(e))
    return entries, errors


def prompt_for(head):
    return f"Define {head}" + ("" if head.endswith((".", "?")) else ".")


def is_val(head):
    h = int(hashlib.sha256(f"{SEED}:{head}".encode()).hexdigest(), 16)
    return h % 1000 < VAL_PER_MILLE


def main():
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", default=os.path.join(root, "target/corpus/cache/src/dict-devil"))
    ap.add_argument("--out", default=os.path.join(root, "data/devil"))
    args = ap.parse_args()
    d = os.path.join(args.src, "usr/share/dictd")
    entries, errors = parse(os.path.join(d, "devil.index"), os.path.join(d, "devil.dict.dz"))
    if errors:
        sys.exit("devil.py: could not parse:\n  " + "\n  ".join(errors))
    xrefs = [e for e in entries if XREF.match(e["definition"])]
    keep, by_head, repeats, merged = [], {}, 0, []
    for e in entries:
        if XREF.match(e["definition"]):
            continue
        prev = by_head.get(e["headword"])
        if prev is None:
            by_head[e["headword"]] = e
            keep.append(e)
        elif prev["definition"] == e["definition"]:
            repeats += 1  # the package carries a few entries twice
        else:  # one headword, two senses (REASON, v.i. and n.): one example with both
            prev["definition"] += "\n\n" + e["definition"]
            merged.append(e["headword"])
    os.makedirs(args.out, exist_ok=True)
    n = {"train": 0, "val": 0}
    files = {k: open(os.path.join(args.out, f"{k}.jsonl"), "w", encoding="utf-8", newline="\n") for k in n}
    for e in keep:
        split = "val" if is_val(e["headword"]) else "train"
        rec = {"prompt": prompt_for(e["headword"]), "completion": " " + e["definition"]}
        files[split].write(json.dumps(rec, ensure_ascii=False) + "\n")
        n[split] += 1
    for f in files.values():
        f.close()
    print(f"devil: {len(entries)} entries parsed, {repeats} exact repeats dropped, "
          f"senses merged for {merged}, {len(xrefs)} pure cross-references left out "
          f"({', '.join(e['headword'] for e in xrefs)}); train {n['train']}, val {n['val']} "
          f"(seed {SEED!r}, {VAL_PER_MILLE / 10:g}% by headword hash) -> {args.out}")


if __name__ == "__main__":
    main()
