#!/usr/bin/env bash
# Decode before/after on the lent GPU through Vulkan: `bench decode` (128-token prompt, 128 greedy
# tokens) for each shape with two release binaries interleaved (two pairs each), then the after
# binary once more with --profile (per-token host record time, wait for the logits, and each
# kernel's GPU time). From the repo root on the device machine with .gl/ (the libvulkan1 .deb)
# and .devbin/ carried:
#   BEFORE=.devbin/bitlora-before AFTER=.devbin/bitlora SHAPES="125m 1b" bash tools/bench/decode-loop.sh
# Writes $OUT/decode.txt, one JSON line per run to $OUT/decode.jsonl, the profiles' tables to
# $OUT/decode-profile.txt.
set -u
for f in .gl/*.deb; do dpkg -x $f /; done; ldconfig
f=$(ls /usr/local/nvidia/share/vulkan/icd.d/*.json /usr/share/vulkan/icd.d/nvidia*.json /etc/vulkan/icd.d/nvidia*.json 2>/dev/null | head -1)
sed 's/libGLX_nvidia.so.0/libEGL_nvidia.so.0/' "$f" > /tmp/nv.json; export VK_DRIVER_FILES=/tmp/nv.json
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/decode.txt
run() { # label, binary, shape, extra flags
  local t0 out; t0=$(date +%s.%N)
  out=$(timeout 300 "$2" bench decode --shape "$3" --backend gpu --prompt-len 128 --gen-len 128 $4 2>>$OUT/decode-profile.txt | tail -1)
  local wall; wall=$(awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $t0}")
  echo "{\"label\": \"$1\", \"shape\": \"$3\", \"wall_s\": $wall, \"report\": ${out:-null}}" >> $OUT/decode.jsonl
  echo "$1 $3 (${wall} s in all, model build included): $(echo "$out" | head -c 400)" | tee -a $OUT/decode.txt
}
BEFORE=${BEFORE:-.devbin/bitlora-before}
AFTER=${AFTER:-.devbin/bitlora}
for shape in ${SHAPES:-125m 1b}; do
  for pair in 1 2; do
    run "before ($BEFORE)" "$BEFORE" $shape ""
    run "after  ($AFTER)" "$AFTER" $shape ""
  done
  echo "== $shape profile ($AFTER) ==" >> $OUT/decode-profile.txt
  run "after  ($AFTER) --profile" "$AFTER" $shape --profile
done
