#!/usr/bin/env bash
# Issue 17's memory rows and issue 14's decode switches on the lent GPU through Vulkan, in one
# call: `bench train` (T = 128, r 8 on all seven) with nvidia-smi's memory.used sampled every
# 100 ms through each run (its peak beside gpu_bytes), for two binaries, then `bench decode`
# with each decode switch run twice (the first run of a shader variant in a fresh machine pays
# its compilation inside the timed tokens; keep the second). From the repo root on the device
# machine with .gl/ (the libvulkan1 .deb) and .devbin/ carried:
#   DL=300 AFTER=.devbin/bitlora BEFORE=.devbin/bitlora-before bash tools/bench/gpu-memory.sh
# DL: seconds before the deadline (runs that would not fit are skipped, and said so).
# Writes one JSON line per run to $OUT/train.jsonl and $OUT/decode.jsonl.
set -u
T0=$(date +%s); DL=${DL:-300}
left() { echo $(( DL - ($(date +%s) - T0) )); }
for f in .gl/*.deb; do dpkg -x $f /; done; ldconfig
f=$(ls /usr/local/nvidia/share/vulkan/icd.d/*.json /usr/share/vulkan/icd.d/nvidia*.json /etc/vulkan/icd.d/nvidia*.json 2>/dev/null | head -1)
sed 's/libGLX_nvidia.so.0/libEGL_nvidia.so.0/' "$f" > /tmp/nv.json; export VK_DRIVER_FILES=/tmp/nv.json
nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv,noheader | tee $OUT/info.txt
AFTER=${AFTER:-.devbin/bitlora}
BEFORE=${BEFORE:-.devbin/bitlora-before}
BASE=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
smi_start() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > /tmp/smi.txt 2>/dev/null & SMI=$!; }
smi_stop() { kill $SMI 2>/dev/null; wait $SMI 2>/dev/null; sort -n /tmp/smi.txt | tail -1; }
tr() { # label binary shape env...
  local lab=$1 bin=$2 shape=$3; shift 3
  [ "$(left)" -lt 40 ] && { echo "skip $lab $shape (deadline)" | tee -a $OUT/log.txt; return; }
  [ -x "$bin" ] || { echo "skip $lab: no $bin" | tee -a $OUT/log.txt; return; }
  smi_start
  local out; out=$(env "$@" timeout $(( $(left) - 10 )) "$bin" bench train --shape "$shape" --backend gpu --gen-len 20 2>>$OUT/err.txt | tail -1)
  local pk; pk=$(smi_stop)
  echo "{\"label\":\"$lab\",\"shape\":\"$shape\",\"smi_peak_mib\":${pk:-null},\"smi_base_mib\":$BASE,\"report\":${out:-null}}" | tee -a $OUT/train.jsonl
}
de() { # label shape env...
  local lab=$1 shape=$2; shift 2
  [ "$(left)" -lt 30 ] && { echo "skip $lab $shape (deadline)" | tee -a $OUT/log.txt; return; }
  local out; out=$(env "$@" timeout $(( $(left) - 10 )) "$AFTER" bench decode --shape "$shape" --backend gpu --prompt-len 128 --gen-len 128 2>>$OUT/err.txt | tail -1)
  echo "{\"label\":\"$lab\",\"shape\":\"$shape\",\"report\":${out:-null}}" | tee -a $OUT/decode.jsonl
}
for shape in 1b 125m; do
  tr "after recompute on" "$AFTER" $shape BITLORA_BENCH_RECOMPUTE=on
  tr "before recompute on" "$BEFORE" $shape BITLORA_BENCH_RECOMPUTE=on
  tr "after recompute off" "$AFTER" $shape BITLORA_BENCH_RECOMPUTE=off
done
tr "after recompute on" "$AFTER" 2b4t BITLORA_BENCH_RECOMPUTE=on
for round in 1 2; do
  de "default (round $round)" 1b X=1
  de "BITLORA_DECODE_ATOMIC=1 (round $round)" 1b BITLORA_DECODE_ATOMIC=1
  de "BITLORA_HEAD_SCALAR=1 (round $round)" 1b BITLORA_HEAD_SCALAR=1
  de "BITLORA_DECODE_NOATT=1 (round $round)" 1b BITLORA_DECODE_NOATT=1
done
de "default" 2b4t X=1
de "default" 2b4t X=1
echo "done at $(( $(date +%s)-T0 )) s" | tee -a $OUT/log.txt
