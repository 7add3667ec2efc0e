#!/usr/bin/env bash
# The demo: installs what it needs (idempotently), builds the wasm and the CLI, and serves the
# page with the bundled model. Prints the URL to open. Extra arguments go to `bitlora serve`
# (e.g. --port 9000). Only the demo's tools are installed (not the test suite's Chromium,
# Mesa or npm packages), and each step says where it is and about how long it takes.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { echo; echo "[demo $1/3] $2"; }
first() { [ -e "$1" ] && echo "seconds: already built" || echo "$2 the first time, on 2 cores"; }

step 1 "build tools: the wasm32 target and wasm-bindgen-cli ($(command -v wasm-bindgen >/dev/null && echo "seconds: present" || echo "2-3 min the first time"))"
tools/install-deps.sh --demo
step 2 "the page's wasm, crates/web -> web/pkg ($(first target/wasm/wasm32-unknown-unknown/release/bitlora_web.wasm "about 5 min"))"
tools/build-web.sh
step 3 "the server, the bitlora CLI ($(first target/debug/bitlora "about 8 min"))"
cargo build -p bitlora
echo
echo "[demo] ready: open the URL below (Ctrl-C stops the server)"
exec target/debug/bitlora serve --root . "$@"
