#!/usr/bin/env bash
# The demo: installs what it needs (idempotently), builds the wasm and the CLI, and serves the
# page with the bundled model. Prints the URL to open. Extra arguments go to `bitlora serve`
# (e.g. --port 9000).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install-deps.sh
tools/build-web.sh
cargo build -p bitlora
exec target/debug/bitlora serve --root . "$@"
