#!/usr/bin/env bash
# Installs what building the page and running the tests need. Idempotent: every step checks
# first and skips what is already present, so a second run takes seconds.
#   - wasm32 target for rustc, and wasm-bindgen-cli pinned to the crate's exact version
#   - Debian: Mesa lavapipe (Vulkan on the CPU, for native GPU tests), Chromium (WebGPU tests)
#   - npm: playwright-core (drives Debian's Chromium; never downloads a browser), typescript
#     (tsc checks web/'s JSDoc types; tools/test.sh), and the
#     LLaMA-3 tokenizer.json for the tokenizer parity test (tools/fetch-tokenizers.sh)
# With --demo, only what building and serving the page needs (the wasm32 target and
# wasm-bindgen-cli): tools/demo.sh skips the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
demo=0
[ "${1:-}" = --demo ] && demo=1

WASM_BINDGEN_VERSION=$(sed -n 's/^wasm-bindgen = "=\([0-9.]*\)".*/\1/p' Cargo.toml)
[ -n "$WASM_BINDGEN_VERSION" ] || { echo "install-deps: cannot read the wasm-bindgen pin from Cargo.toml" >&2; exit 1; }

say() { echo "[install-deps] $*"; }

if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
  say "adding rustc target wasm32-unknown-unknown"
  rustup target add wasm32-unknown-unknown
fi

# The threaded wasm (tools/build-web.sh) rebuilds std with nightly's -Z build-std, from rust-src.
if rustup run nightly rustc --version >/dev/null 2>&1 \
  && ! rustup component list --toolchain nightly --installed | grep -q '^rust-src'; then
  say "adding rust-src to the nightly toolchain"
  rustup component add rust-src --toolchain nightly
fi

if ! command -v wasm-bindgen >/dev/null || [ "$(wasm-bindgen --version | awk '{print $2}')" != "$WASM_BINDGEN_VERSION" ]; then
  say "installing wasm-bindgen-cli $WASM_BINDGEN_VERSION (2-3 min)"
  # no --locked: its lockfile pins a crate version the registry mirror lacks (TOOLCHAIN.md)
  cargo install wasm-bindgen-cli --version "$WASM_BINDGEN_VERSION" --force
fi

if [ $demo = 1 ]; then
  say "all present (the demo's build tools)"
  exit 0
fi

need_apt=()
dpkg -s mesa-vulkan-drivers >/dev/null 2>&1 || need_apt+=(mesa-vulkan-drivers)
dpkg -s libvulkan1 >/dev/null 2>&1 || need_apt+=(libvulkan1)
dpkg -s chromium >/dev/null 2>&1 || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
  say "apt-get install ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  # --no-install-recommends: recommends once pulled a systemd upgrade that failed to unpack
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

if [ ! -d tests/browser/node_modules/playwright-core ] || [ ! -d tests/browser/node_modules/typescript ]; then
  say "npm ci in tests/browser (playwright-core and typescript; no browser download)"
  (cd tests/browser && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --silent)
fi
tools/fetch-tokenizers.sh
say "all present"
