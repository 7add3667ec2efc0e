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
run() { # label, binary, shape, env
  local out; out=$(env $4 timeout 200 "$2" bench train --shape "$3" --backend gpu --gen-len 20 2>/dev/null | tail -1)
  echo "$1 $3: $(echo "$out" | python3 -c 'import json,sys; r=json.load(sys.stdin); print(f"{r[\"tokens_per_s_median\"]:.0f} tok/s, gpu_bytes {r[\"gpu_bytes\"]/2**20:.0f} MiB, rss {r[\"peak_rss_mib\"]:.0f} MiB")' 2>&1)" | tee -a $OUT/loop.txt
}
for shape in 125m 1b; do
  for round in 1 2; do
    run "before (769bffe) resident" .devbin/bitlora-before $shape X=1
    run "after  (one loop) resident" .devbin/bitlora $shape X=1
  done
  run "before (769bffe) host AdamW" .devbin/bitlora-before $shape BITLORA_BENCH_CPU_ADAMW=1
  run "after  (one loop) host AdamW" .devbin/bitlora $shape BITLORA_BENCH_CPU_ADAMW=1
done
