#!/usr/bin/env bash
# The whole test suite: installs what it needs (idempotently), then runs (in the order below)
#   1. the Rust tests of every crate (CPU reference, GPU kernels on Mesa lavapipe, the CLI),
#      and core's SIMD128 kernels against their scalar twins in wasm (node),
#   2. tsc on the page's JavaScript (web/: JSDoc types, the worker messages of
#      web/protocol.d.ts, the public API of web/bitlora.d.ts), after the wasm build whose types
#      (web/pkg/bitlora_web.d.ts) the worker's code is checked against,
#   3. the browser end-to-end tests in headless Chromium (WebGPU on SwiftShader, and the
#      SIMD128 CPU fallback with WebGPU unavailable).
# A GPU test that finds no adapter fails; nothing here is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

tools/install-deps.sh

# Mesa warns on every Vulkan start without a private runtime dir.
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp/bitlora-xdg-$(id -u)}"
mkdir -p "$XDG_RUNTIME_DIR" && chmod 0700 "$XDG_RUNTIME_DIR"

# The order, for a 2-core machine (fresh clone: ~11 min compiling the native tests, ~5 min the
# two wasm builds, ~7 min running the Rust tests, and browser tests whose WebGPU ones keep
# Chromium's GPU process (SwiftShader) busy on about one core each):
#   1. compile the native tests and the CLI while the wasm is built beside them (separate
#      target dirs, no shared lock; each fills the other's single-threaded stretches: linking,
#      the last big crate);
#   2. tsc;
#   3. the Rust tests (already compiled) beside the browser tests; the Rust tests' output is
#      printed, whole and in order, after theirs. Browser test files run two at a time, the
#      longest first, then a few whose checks are about threads and main-thread timing run
#      alone (see BROWSER_ALONE).
# Every step's failure fails the run; nothing is skipped.
logs=$(mktemp -d "${TMPDIR:-/tmp}/bitlora-test.XXXXXX")
trap 'rm -rf "$logs"' EXIT

echo "== Build: the Rust tests and the CLI (native), and the wasm (tools/build-web.sh) beside them =="
# After the wasm build, in its lane: core's SIMD128 kernels against their scalar twins, run in
# node (quant.rs simd128_tests; the runner comes with wasm-bindgen-cli). Same target dir, profile
# and flags as build-web.sh's (release, +simd128), so only core's test binary is compiled. A
# filter that matched nothing would pass: the count of passed tests is checked.
wasm_tests() {
  CARGO_TARGET_DIR=target/wasm RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+simd128" \
  CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner \
    cargo test -p bitlora-core --target wasm32-unknown-unknown --release --lib simd128 2>&1 \
    | tee "$logs/wasm-tests.log"
  grep -q 'test result: ok\. [1-9]' "$logs/wasm-tests.log"
}
{ tools/build-web.sh && wasm_tests; } >"$logs/build-web.log" 2>&1 &
web_pid=$!
if ! cargo test --workspace --exclude bitlora-web --no-run 2>&1 | grep -v '^\s*$'; then
  wait "$web_pid" || true
  echo "cargo test --no-run failed" >&2
  exit 1
fi
cargo build -p bitlora
web_rc=0
wait "$web_pid" || web_rc=$?
echo "== wasm build (tools/build-web.sh) and the SIMD128 kernel tests in node, run beside the native build =="
cat "$logs/build-web.log"
[ "$web_rc" = 0 ] || { echo "tools/build-web.sh or the wasm tests failed (exit $web_rc)" >&2; exit 1; }

echo "== Type check of web/ (tsc --noEmit: the page, and the worker) =="
tests/browser/node_modules/.bin/tsc --noEmit -p web/tsconfig.json
tests/browser/node_modules/.bin/tsc --noEmit -p web/tsconfig.worker.json
echo "tsc: no type errors"

echo "== Rust tests (CPU reference, GPU kernels on lavapipe, CLI), beside the browser tests =="
# --show-output: passing tests print their max diffs and the GPU adapter they ran on.
cargo test --workspace --exclude bitlora-web -- --show-output >"$logs/rust-tests.log" 2>&1 &
rust_pid=$!

echo "== Browser tests (headless Chromium) =="
# Longest first (measured on the 2-core machine, SwiftShader), so that the two lanes end together;
# every other *.test.mjs follows, then BROWSER_ALONE one at a time. A new test file is picked up
# by the glob: nothing is left out.
BROWSER_FIRST=(limits train-parity faults ui api journey models-hub stream-load generate-text default-model bad-input)
# Checks that another busy process could disturb: rayon's pool running a loop's blocks on every
# thread, and main-thread tasks and token timing while generating.
BROWSER_ALONE=(threads generate)
cd tests/browser
pool=()
for f in "${BROWSER_FIRST[@]}"; do pool+=("$f.test.mjs"); done
for f in *.test.mjs; do
  name=${f%.test.mjs}
  [[ " ${BROWSER_FIRST[*]} ${BROWSER_ALONE[*]} " == *" $name "* ]] || pool+=("$f")
done
alone=()
for f in "${BROWSER_ALONE[@]}"; do alone+=("$f.test.mjs"); done
for f in "${pool[@]}" "${alone[@]}"; do [ -f "$f" ] || { echo "tools/test.sh names $f, which does not exist" >&2; exit 1; }; done
export BITLORA_BIN="$PWD/../../target/debug/bitlora"
browser_rc=0
node --test --test-concurrency=2 "${pool[@]}" || browser_rc=$?
# The Rust tests (~7 min) are long done by now; waiting makes BROWSER_ALONE really alone.
rust_rc=0
wait "$rust_pid" || rust_rc=$?
node --test --test-concurrency=1 "${alone[@]}" || browser_rc=$?
cd ../..

echo "== Rust tests: output (they ran beside the browser tests) =="
grep -v '^\s*$' "$logs/rust-tests.log" || true
[ "$rust_rc" = 0 ] || echo "Rust tests failed (exit $rust_rc)" >&2
[ "$browser_rc" = 0 ] || echo "browser tests failed (exit $browser_rc)" >&2
[ "$rust_rc" = 0 ] && [ "$browser_rc" = 0 ]
