#!/usr/bin/env bash
# Issue 12's before/after on the lent GPU through Vulkan: `bench train` (train-125m, train-1b,
# T = 128, 20 timed steps) with the binary before the one-loop redesign (.devbin/bitlora-before,
# 769bffe) and after it (.devbin/bitlora), interleaved in one run, plus each binary's host-AdamW
# path (BITLORA_BENCH_CPU_ADAMW=1: every gradient read back each step, AdamW on the CPU: what
# the page ran before the redesign). From the repo root on the device machine with .gl/ (the
# libvulkan1 .deb) and .devbin/ carried; writes $OUT/loop.txt.
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
for shape in 125m 1b; do
  run "before (769bffe) resident" .devbin/bitlora-before $shape X=1
  run "after  (one loop) resident" .devbin/bitlora $shape X=1
  [ $shape = 125m ] && run "before (769bffe) resident" .devbin/bitlora-before $shape X=1
  [ $shape = 125m ] && run "after  (one loop) resident" .devbin/bitlora $shape X=1
  run "after  (one loop) host AdamW" .devbin/bitlora $shape BITLORA_BENCH_CPU_ADAMW=1
done
