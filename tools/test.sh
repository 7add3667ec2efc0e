#!/usr/bin/env bash
# The whole test suite: installs what it needs (idempotently), then runs
#   1. the Rust tests of every crate (CPU reference, GPU kernels on Mesa lavapipe, the CLI),
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

echo "== Rust tests (CPU reference, GPU kernels on lavapipe, CLI) =="
# --show-output: passing tests print their max diffs and the GPU adapter they ran on.
cargo test --workspace --exclude bitlora-web -- --show-output 2>&1 | grep -v '^\s*$'
echo "== wasm build =="
tools/build-web.sh
cargo build -p bitlora
echo "== Type check of web/ (tsc --noEmit: the page, and the worker) =="
tests/browser/node_modules/.bin/tsc --noEmit -p web/tsconfig.json
tests/browser/node_modules/.bin/tsc --noEmit -p web/tsconfig.worker.json
echo "tsc: no type errors"
echo "== Browser tests (headless Chromium) =="
cd tests/browser
BITLORA_BIN="$PWD/../../target/debug/bitlora" npm test
