#!/usr/bin/env bash
# Builds the page's wasm, twice: crates/web ->
#   web/pkg/bitlora_web{.js,_bg.wasm,.d.ts}          single-thread (stable toolchain)
#   web/pkg-threads/bitlora_web{.js,_bg.wasm,.d.ts}  threaded CPU fallback (nightly, see below)
# The page's worker takes the threaded one where the page is cross-origin isolated and it starts,
# else the single-thread one (web/worker.js loadWasm). Idempotent and incremental: a second run
# with no changes takes a few seconds.
#
#   tools/build-web.sh            release builds (what the page and the browser tests use)
#
# Why these choices:
# - `+simd128`: the CPU fallback's inner loops vectorise to WASM SIMD128, which every browser
#   with WebGPU also supports. The page labels the backend "CPU (SIMD128)" only when this flag
#   was on (crates/web checks cfg!(target_feature = "simd128")).
# - A separate target dir (target/wasm): RUSTFLAGS is part of cargo's cache key, so sharing
#   target/ with the native build would make each rebuild the other from scratch.
# - Plain cargo + wasm-bindgen, no wasm-pack: nothing is downloaded (TOOLCHAIN.md).
# - No wasm-opt yet: Debian's binaryen miscompiles; npm's works but is an extra dependency.
# - The threaded build (cargo feature `threads`: wasm-bindgen-rayon) needs threads in std, which
#   the shipped wasm32 std lacks: nightly rebuilds std with `-Z build-std` (hence rust-src) and
#   `+atomics,+bulk-memory,+mutable-globals`, which makes the module import a shared memory.
#   rustc caps a shared memory at 1 GiB unless told; `--max-memory` gives it wasm32's 4 GiB, the
#   CPU backend's limit (crates/web/src/train.rs WASM_MEMORY_LIMIT). Its own target dir again.
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

rustup run nightly rustc --version >/dev/null 2>&1 \
  || die "the nightly toolchain is missing (the threaded build needs it): rustup toolchain install nightly --profile minimal --component rust-src"
if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
  say "installing rust-src for nightly (the threaded build rebuilds std from it)"
  rustup component add rust-src --toolchain nightly \
    || die "rust-src for nightly is missing and could not be installed: rustup component add rust-src --toolchain nightly"
fi

# wasm-bindgen IN OUT_DIR: the JS glue, unless OUT_DIR already holds this wasm's output.
bindgen() {
  if [ "$2/bitlora_web_bg.wasm" -nt "$1" ] && [ "$2/bitlora_web.js" -nt "$1" ]; then
    say "$2 is up to date"
  else
    say "wasm-bindgen --target web --out-dir $2"
    # wasm-bindgen adds to OUT_DIR; snippets of a former build (another crate's) would linger.
    rm -rf "$2/snippets"
    wasm-bindgen --target web --out-dir "$2" "$1"
  fi
}

target_dir=target/wasm
say "cargo build -p bitlora-web --target wasm32-unknown-unknown --release (+simd128)"
CARGO_TARGET_DIR=$target_dir \
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+simd128" \
  cargo build -p bitlora-web --target wasm32-unknown-unknown --release
bindgen "$target_dir/wasm32-unknown-unknown/release/bitlora_web.wasm" web/pkg

threads_dir=target/wasm-threads
# The final link only (`cargo rustc ... -- ARGS` passes ARGS to crates/web alone, so the
# dependencies' cache keys stay as they are): a shared memory imported from JS, so every thread
# instantiates the module on the same one, and the TLS symbols wasm-bindgen's thread start-up
# calls. This nightly's rustc no longer adds them for +atomics by itself (without them the module
# exports a plain memory and the workers cannot be given it: "#<Memory> could not be cloned").
link_threads=(-C link-arg=--shared-memory -C link-arg=--import-memory -C link-arg=--max-memory=4294967296
  -C link-arg=--export=__wasm_init_tls -C link-arg=--export=__tls_size -C link-arg=--export=__tls_align
  -C link-arg=--export=__tls_base)
say "cargo +nightly rustc -p bitlora-web --features threads -Z build-std (+simd128,+atomics, shared memory)"
CARGO_TARGET_DIR=$threads_dir \
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+simd128,+atomics,+bulk-memory,+mutable-globals -C link-arg=--max-memory=4294967296" \
  cargo +nightly rustc -p bitlora-web --lib --target wasm32-unknown-unknown --release --features threads \
    -Z build-std=panic_abort,std -- "${link_threads[@]}"
bindgen "$threads_dir/wasm32-unknown-unknown/release/bitlora_web.wasm" web/pkg-threads

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
say "done: $(du -h web/pkg/bitlora_web_bg.wasm | cut -f1) web/pkg/bitlora_web_bg.wasm, $(du -h web/pkg-threads/bitlora_web_bg.wasm | cut -f1) web/pkg-threads/bitlora_web_bg.wasm"
