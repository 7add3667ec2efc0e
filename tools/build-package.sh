#!/usr/bin/env bash
# Assembles the npm package `bitlora` (packages/bitlora/) from the page's files, and packs it.
#
#   tools/build-package.sh              -> packages/bitlora/dist/ (what the package ships)
#   tools/build-package.sh --pack DIR   -> also `npm pack` into DIR; prints the tarball's path last
#
# What dist/ holds and why (packages/bitlora/README.md says how an app uses it):
# - the client API web/bitlora.js with its types (bitlora.d.ts, protocol.d.ts);
# - the module Web Worker web/worker.js and the modules it imports (store.js, hub.js,
#   training.js, training-store.js, sha256.js): it is started from the URL next to bitlora.js;
# - the wasm (web/pkg/bitlora_web.js + bitlora_web_bg.wasm, built by tools/build-web.sh; not
#   rebuilt here) and pkg/models.json, the sizes and sha256 of the bundled model's files; the
#   threaded CPU build (web/pkg-threads: its glue, wasm and wasm-bindgen-rayon's worker snippet),
#   which the worker takes on a cross-origin isolated page;
# - the default model (web/models/default: 9.2 MB, 6.9 MB gzipped, bitlora-default-12m,
#   MODEL_CARD.md), so `loadModel({ bundled: 'default' })` works with no other download. The
#   browser fetches it only when an app asks for it (then keeps it in IndexedDB); an app that
#   brings its own model need not serve dist/models/. The tiny random test model is left out.
# The package's version is packages/bitlora/package.json's; it must equal the workspace's
# (Cargo.toml), which this script checks.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "[build-package] $*"; }
die() { echo "[build-package] error: $*" >&2; exit 1; }

pack_dir=""
while [ $# -gt 0 ]; do
  case "$1" in
    --pack) [ $# -ge 2 ] || die "--pack needs a directory"; pack_dir=$2; shift 2 ;;
    *) die "unknown argument $1 (usage: tools/build-package.sh [--pack DIR])" ;;
  esac
done

pkg=packages/bitlora
dist=$pkg/dist
[ -f web/pkg/bitlora_web_bg.wasm ] || die "web/pkg/bitlora_web_bg.wasm is missing: run tools/build-web.sh first"
[ -f web/pkg/models.json ] || die "web/pkg/models.json is missing: run tools/build-web.sh first"
cargo_version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
pkg_version=$(node -p "require('./$pkg/package.json').version")
[ "$cargo_version" = "$pkg_version" ] \
  || die "$pkg/package.json has version $pkg_version but Cargo.toml has $cargo_version: make them equal"

rm -rf "$dist"
mkdir -p "$dist/pkg" "$dist/models/default"
cp web/bitlora.js web/bitlora.d.ts web/protocol.d.ts \
   web/worker.js web/store.js web/hub.js web/training.js web/training-store.js web/sha256.js "$dist/"
cp web/pkg/bitlora_web.js web/pkg/bitlora_web_bg.wasm web/pkg/bitlora_web.d.ts "$dist/pkg/"
[ -f web/pkg-threads/bitlora_web_bg.wasm ] || die "web/pkg-threads/bitlora_web_bg.wasm is missing: run tools/build-web.sh first"
mkdir -p "$dist/pkg-threads"
cp -r web/pkg-threads/bitlora_web.js web/pkg-threads/bitlora_web_bg.wasm web/pkg-threads/snippets "$dist/pkg-threads/"
cp web/models/default/* "$dist/models/default/"
# The index of the bundled models, with the default model only (the one the package ships).
node -e '
  const fs = require("fs");
  const all = JSON.parse(fs.readFileSync("web/pkg/models.json", "utf8"));
  if (!all.default) throw new Error("web/pkg/models.json has no default model: run tools/build-web.sh");
  fs.writeFileSync(process.argv[1], JSON.stringify({ default: all.default }, null, 2) + "\n");
' "$dist/pkg/models.json"
# The index must describe the files shipped (a model changed since the last wasm build would
# fail its sha256 check in the browser).
(cd "$dist/models/default" && node -e '
  const fs = require("fs"), crypto = require("crypto");
  for (const f of JSON.parse(fs.readFileSync("../../pkg/models.json", "utf8")).default) {
    const sha = crypto.createHash("sha256").update(fs.readFileSync(f.name)).digest("hex");
    if (sha !== f.sha256) throw new Error(`${f.name}: sha256 ${sha} but web/pkg/models.json says ${f.sha256}: run tools/build-web.sh`);
  }')
say "dist: $(du -sh "$dist" | cut -f1) in $(find "$dist" -type f | wc -l) files (version $pkg_version)"

if [ -n "$pack_dir" ]; then
  mkdir -p "$pack_dir"
  pack_dir=$(cd "$pack_dir" && pwd)
  name=$(cd "$pkg" && npm pack --silent --pack-destination "$pack_dir" | tail -1)
  say "packed $(du -h "$pack_dir/$name" | cut -f1)"
  echo "$pack_dir/$name"
fi
