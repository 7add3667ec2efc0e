#!/usr/bin/env bash
# Before/after on the lent GPU through Vulkan: `bench train` (train-125m, train-1b, T = 128, 20
# timed steps) with two release binaries interleaved in one run (two pairs each), plus, with
# HOST=1, the after binary's host-AdamW path (BITLORA_BENCH_CPU_ADAMW=1: every gradient read back
# each step, AdamW on the CPU: what the page ran before issue 12). From the repo root on the
# device machine with .gl/ (the libvulkan1 .deb) and .devbin/ carried:
#   BEFORE=.devbin/bitlora-before AFTER=.devbin/bitlora bash tools/bench/h200-loop.sh
# (those are the defaults). Writes $OUT/loop.txt and one JSON line per run to $OUT/loop.jsonl.
set -u
for f in .gl/*.deb; do dpkg -x $f /; done; ldconfig
f=$(ls /usr/local/nvidia/share/vulkan/icd.d/*.json /usr/share/vulkan/icd.d/nvidia*.json /etc/vulkan/icd.d/nvidia*.json 2>/dev/null | head -1)
sed 's/libGLX_nvidia.so.0/libEGL_nvidia.so.0/' "$f" > /tmp/nv.json; export VK_DRIVER_FILES=/tmp/nv.json
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/loop.txt
run() { # label, binary, shape, env: one bench train, its JSON line kept in $OUT/loop.jsonl
  local out; out=$(env $4 timeout 200 "$2" bench train --shape "$3" --backend gpu --gen-len 20 2>/dev/null | tail -1)
  echo "{\"label\": \"$1\", \"shape\": \"$3\", \"report\": ${out:-null}}" >> $OUT/loop.jsonl
  echo "$1 $3: $out" | tee -a $OUT/loop.txt
}
BEFORE=${BEFORE:-.devbin/bitlora-before}
AFTER=${AFTER:-.devbin/bitlora}
for shape in ${SHAPES:-125m 1b}; do
  for pair in 1 2; do
    run "before ($BEFORE) resident" "$BEFORE" $shape X=1
    run "after  ($AFTER) resident" "$AFTER" $shape X=1
  done
  [ "${HOST:-0}" = 1 ] && run "after  ($AFTER) host AdamW" "$AFTER" $shape BITLORA_BENCH_CPU_ADAMW=1
done
