#!/usr/bin/env bash
# Assembles the page as a static site for any static host (README: "Host the page yourself").
#
#   tools/build-site.sh [OUT]        default OUT: target/site (replaced)
#
# OUT gets what `bitlora serve` serves (crates/cli/src/serve.rs): index.html and web/, less what
# only development and tests use: type declarations (*.d.ts), tsconfig*.json, web/examples/
# (the API example, served by `bitlora serve` for the tests), the tiny random test model
# (web/models/tiny) and its entry in web/pkg/models.json; plus deploy/_headers at the root, the
# headers Netlify and Cloudflare Pages apply (deploy/nginx.conf has them for nginx). The wasm in
# web/pkg/ is taken as built (tools/build-web.sh), not rebuilt. Try the result locally with
#   node tools/serve-static.mjs target/site
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "[build-site] $*"; }
die() { echo "[build-site] error: $*" >&2; exit 1; }

out=${1:-target/site}
[ -f web/pkg/bitlora_web_bg.wasm ] || die "web/pkg/bitlora_web_bg.wasm is missing: run tools/build-web.sh first"
[ -f web/models/default/model.safetensors ] || die "web/models/default is missing"
case "$out" in /|.|..|"$PWD"|"$PWD/") die "refusing to replace $out" ;; esac

rm -rf "$out"
mkdir -p "$out"
cp index.html "$out/"
# Every file under web/ but the development ones (new modules of the page are taken as they come).
(cd web && find . -type f \
    ! -name '*.d.ts' ! -name 'tsconfig*.json' ! -name '*.md' \
    ! -path './examples/*' ! -path './models/tiny/*' -print0) |
  while IFS= read -r -d '' f; do
    mkdir -p "$out/web/$(dirname "$f")"
    cp "web/$f" "$out/web/$f"
  done
# The bundled models' index, for the models shipped.
node -e '
  const fs = require("fs");
  const [file, modelsDir] = process.argv.slice(1);
  const all = JSON.parse(fs.readFileSync(file, "utf8"));
  const kept = Object.fromEntries(Object.entries(all).filter(([name]) => fs.existsSync(`${modelsDir}/${name}`)));
  fs.writeFileSync(file, JSON.stringify(kept, null, 2) + "\n");
' "$out/web/pkg/models.json" "$out/web/models"
cp deploy/_headers "$out/_headers"
say "$out: $(du -sh "$out" | cut -f1) in $(find "$out" -type f | wc -l) files; serve it with the headers of $out/_headers"
