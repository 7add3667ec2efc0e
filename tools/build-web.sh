#!/usr/bin/env bash
# Builds the page's wasm: crates/web -> web/pkg/bitlora_web{.js,_bg.wasm,.d.ts}.
# Idempotent and incremental: a second run with no changes takes a second or two.
#
#   tools/build-web.sh            release build (what the page and the browser tests use)
#
# Why these choices:
# - `+simd128`: the CPU fallback's inner loops vectorise to WASM SIMD128, which every browser
#   with WebGPU also supports. The page labels the backend "CPU (SIMD128)" only when this flag
#   was on (crates/web checks cfg!(target_feature = "simd128")).
# - A separate target dir (target/wasm): RUSTFLAGS is part of cargo's cache key, so sharing
#   target/ with the native build would make each rebuild the other from scratch.
# - Plain cargo + wasm-bindgen, no wasm-pack: nothing is downloaded (TOOLCHAIN.md).
# - No wasm-opt yet: Debian's binaryen miscompiles; npm's works but is an extra dependency.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "[build-web] $*"; }
die() { echo "[build-web] error: $*" >&2; exit 1; }

want=$(sed -n 's/^wasm-bindgen = "=\([0-9.]*\)".*/\1/p' Cargo.toml)
command -v wasm-bindgen >/dev/null || die "wasm-bindgen not found; run tools/install-deps.sh"
have=$(wasm-bindgen --version | awk '{print $2}')
[ "$have" = "$want" ] || die "wasm-bindgen CLI is $have but the crate is pinned to $want; run tools/install-deps.sh"
rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown \
  || die "rustc target wasm32-unknown-unknown missing; run tools/install-deps.sh"

target_dir=target/wasm
say "cargo build -p bitlora-web --target wasm32-unknown-unknown --release (+simd128)"
CARGO_TARGET_DIR=$target_dir \
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+simd128" \
  cargo build -p bitlora-web --target wasm32-unknown-unknown --release

say "wasm-bindgen --target web --out-dir web/pkg"
wasm-bindgen --target web --out-dir web/pkg \
  "$target_dir/wasm32-unknown-unknown/release/bitlora_web.wasm"

# The bundled models' index: each file's size and sha256. The page's worker reads it before a
# download (the total for the storage check and the progress bar's ETA; `bitlora serve` sends
# large files chunked, without Content-Length), checks each downloaded file against it, and
# notices when the stored copy in IndexedDB is of an older version of the model.
say "web/pkg/models.json (sizes and sha256 of web/models/*)"
{
  echo '{'
  first_model=1
  for dir in web/models/*/; do
    name=$(basename "$dir")
    [ "$first_model" = 1 ] || echo ','
    first_model=0
    printf '  "%s": [' "$name"
    first_file=1
    for f in "$dir"*; do
      [ -f "$f" ] || continue
      [ "$first_file" = 1 ] || printf ','
      first_file=0
      printf '\n    {"name": "%s", "size": %s, "sha256": "%s"}' \
        "$(basename "$f")" "$(stat -c %s "$f")" "$(sha256sum "$f" | cut -d' ' -f1)"
    done
    printf '\n  ]'
  done
  printf '\n}\n'
} > web/pkg/models.json.tmp
mv web/pkg/models.json.tmp web/pkg/models.json
# The demo data the page offers ("Try the demo data"): the Devil's Dictionary training set.
mkdir -p web/pkg/demo && cp data/devil/train.jsonl web/pkg/demo/devil.jsonl
say "done: $(du -h web/pkg/bitlora_web_bg.wasm | cut -f1) web/pkg/bitlora_web_bg.wasm"
