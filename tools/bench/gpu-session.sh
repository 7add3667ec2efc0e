#!/usr/bin/env bash
# Issues 14 and 17 on the lent GPU through Vulkan, in one or two calls (PART=1: bitlora; PART=2:
# the PyTorch baselines). From the repo root on the device machine with .gl/ (the libvulkan1
# .deb) and .devbin/ (a stripped release binary) carried:
#   PART=1 DL=420 bash tools/bench/gpu-session.sh     # bench train + bench decode
#   PART=1 BEFORE=.devbin/bitlora-before ...          # + the memory rows of an older binary
#   PART=2 DL=500 bash tools/bench/gpu-session.sh     # transformers decode, PEFT on 2b4t
# PART=1: `bench train` (T = 128, r 8 on all seven) for 125m / 1b / 2b4t with nvidia-smi's
# memory.used sampled every 100 ms through each run (its peak beside gpu_bytes), one profiled
# train-1b step table, then `bench decode` (128-token prompt, 128 greedy tokens) with each decode
# switch run twice: the first run of a shader variant in a fresh machine pays its compilation
# inside the timed tokens, so keep the second.
# PART=2: transformers' BitNet greedy decoding (bf16, KV cache, eager) on the same random
# weights for 125m, 1b and 2b4t, then PyTorch + PEFT eager and compiled on 2b4t.
# DL: seconds before the deadline (runs that would not fit are skipped, and said so).
# Writes one JSON line per run to $OUT/train.jsonl, $OUT/decode.jsonl, $OUT/hf.jsonl.
set -u
T0=$(date +%s); DL=${DL:-420}; PART=${PART:-1}
left() { echo $(( DL - ($(date +%s) - T0) )); }
for f in .gl/*.deb; do dpkg -x $f /; done; ldconfig
f=$(ls /usr/local/nvidia/share/vulkan/icd.d/*.json /usr/share/vulkan/icd.d/nvidia*.json /etc/vulkan/icd.d/nvidia*.json 2>/dev/null | head -1)
sed 's/libGLX_nvidia.so.0/libEGL_nvidia.so.0/' "$f" > /tmp/nv.json; export VK_DRIVER_FILES=/tmp/nv.json
nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv,noheader | tee -a $OUT/info.txt
B=${B:-.devbin/bitlora}
BASE=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
smi_start() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > /tmp/smi.txt 2>/dev/null & SMI=$!; }
smi_stop() { kill $SMI 2>/dev/null; wait $SMI 2>/dev/null; sort -n /tmp/smi.txt | tail -1; }
tr() { # label shape extra-args env...
  local lab=$1 shape=$2 extra=$3; shift 3
  [ "$(left)" -lt 40 ] && { echo "skip $lab $shape (deadline)" | tee -a $OUT/log.txt; return; }
  [ -x "$B" ] || { echo "skip $lab: no $B" | tee -a $OUT/log.txt; return; }
  smi_start; local t0; t0=$(date +%s)
  local out; out=$(env "$@" timeout $(( $(left) - 10 )) "$B" bench train --shape "$shape" --backend gpu --gen-len 20 $extra 2>>$OUT/err.txt | tail -1)
  local pk; pk=$(smi_stop)
  echo "{\"label\":\"$lab\",\"shape\":\"$shape\",\"wall_s\":$(( $(date +%s) - t0 )),\"smi_peak_mib\":${pk:-null},\"smi_base_mib\":$BASE,\"report\":${out:-null}}" | tee -a $OUT/train.jsonl
}
de() { # label shape env...
  local lab=$1 shape=$2; shift 2
  [ "$(left)" -lt 30 ] && { echo "skip $lab $shape (deadline)" | tee -a $OUT/log.txt; return; }
  local out; out=$(env "$@" timeout $(( $(left) - 10 )) "$B" bench decode --shape "$shape" --backend gpu --prompt-len 128 --gen-len 128 2>>$OUT/err.txt | tail -1)
  echo "{\"label\":\"$lab\",\"shape\":\"$shape\",\"report\":${out:-null}}" | tee -a $OUT/decode.jsonl
}
model() { # shape -> /tmp/m-shape (bitlora's random weights, bf16 masters)
  [ -d /tmp/m-$1 ] || timeout $(( $(left) - 20 )) "$B" random-model --shape "$1" --out /tmp/m-$1 >/dev/null 2>>$OUT/err.txt
}
if [ "$PART" = 1 ]; then
  tr "recompute on" 1b "" BITLORA_BENCH_RECOMPUTE=on
  tr "recompute off" 1b "" BITLORA_BENCH_RECOMPUTE=off
  tr "recompute off" 125m "" BITLORA_BENCH_RECOMPUTE=off
  tr "recompute on" 125m "" BITLORA_BENCH_RECOMPUTE=on
  tr "recompute on" 2b4t "" BITLORA_BENCH_RECOMPUTE=on
  if [ -n "${BEFORE:-}" ]; then # the same memory rows with an older binary, beside these
    for s in 1b 125m; do B=$BEFORE tr "before ($BEFORE), recompute on" $s "" BITLORA_BENCH_RECOMPUTE=on; done
  fi
  for round in 1 2; do
    de "default (round $round)" 1b X=1
    de "BITLORA_DECODE_ATOMIC=1 (round $round)" 1b BITLORA_DECODE_ATOMIC=1
    de "BITLORA_HEAD_SCALAR=1 (round $round)" 1b BITLORA_HEAD_SCALAR=1
    de "BITLORA_DECODE_NOATT=1 (round $round)" 1b BITLORA_DECODE_NOATT=1
    de "BITLORA_DECODE_NOPREX=1 (round $round)" 1b BITLORA_DECODE_NOPREX=1
    de "default (round $round)" 125m X=1
    de "default (round $round)" 2b4t X=1
  done
  tr "recompute off, profiled" 1b --profile BITLORA_BENCH_RECOMPUTE=off
fi
if [ "$PART" = 2 ]; then
  for s in 125m 1b 2b4t; do
    [ "$(left)" -lt 60 ] && break
    model $s
    echo "{\"shape\":\"$s\",\"hf\":$(timeout $(( $(left) - 10 )) python3 tools/bench/hf_decode.py /tmp/m-$s 2>>$OUT/err.txt | tail -1)}" | tee -a $OUT/hf.jsonl
  done
  for c in "" --compile; do
    [ "$(left)" -lt 90 ] && { echo "skip peft 2b4t $c (deadline)" | tee -a $OUT/log.txt; break; }
    smi_start
    out=$(timeout $(( $(left) - 10 )) python3 tools/bench/peft_baseline.py /tmp/m-2b4t $c 2>>$OUT/err.txt | tail -1)
    echo "{\"peft\":\"2b4t $c\",\"smi_peak_mib\":$(smi_stop),\"report\":${out:-null}}" | tee -a $OUT/hf.jsonl
  done
fi
echo "done at $(( $(date +%s) - T0 )) s" | tee -a $OUT/log.txt
