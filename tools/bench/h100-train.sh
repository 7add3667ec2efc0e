#!/usr/bin/env bash
# train-125m / train-1b on the lent H100 through Vulkan, the ternary kernels alone, and the
# PyTorch + PEFT baseline in the same run (tools/bench/peft_baseline.py). From the repo root on
# the device machine, with .gl/ (the libvulkan1 .deb) and the bitlora binary carried (B=path,
# default .devbin/bitlora, else target/release/bitlora); writes $OUT/*.txt.
# The stock NVIDIA ICD json names libGLX_nvidia, which fails headless: point it at libEGL_nvidia.
set -u
for f in .gl/*.deb; do dpkg -x $f /; done; ldconfig
f=$(ls /usr/local/nvidia/share/vulkan/icd.d/*.json /usr/share/vulkan/icd.d/nvidia*.json /etc/vulkan/icd.d/nvidia*.json 2>/dev/null | head -1)
echo "stock ICD: $f"; sed 's/libGLX_nvidia.so.0/libEGL_nvidia.so.0/' "$f" > /tmp/nv.json; export VK_DRIVER_FILES=/tmp/nv.json
nvidia-smi --query-gpu=name,memory.used --format=csv
B=${B:-.devbin/bitlora}; [ -x "$B" ] || B=target/release/bitlora
$B random-model --shape 125m --out /tmp/m125 2>&1 | tail -1
BITLORA_BENCH_SWEEP=1 timeout 60 $B bench ternary --shape 125m --backend gpu --gen-len 20 > $OUT/ternary-125m.json 2> $OUT/ternary-125m.txt; tail -4 $OUT/ternary-125m.txt
timeout 60 $B bench ternary --shape 1b --backend gpu --gen-len 20 > $OUT/ternary-1b.json 2> $OUT/ternary-1b.txt; tail -4 $OUT/ternary-1b.txt
timeout 100 $B bench train --shape 125m --backend gpu --gen-len 20 2>&1 | tail -2 | tee $OUT/ours-125m.txt
BITLORA_BENCH_CPU_ADAMW=1 timeout 100 $B bench train --shape 125m --backend gpu --gen-len 20 2>&1 | tail -2 | tee $OUT/ours-125m-cpu-adamw.txt
timeout 150 $B bench train --shape 1b --backend gpu --gen-len 20 2>&1 | tail -2 | tee $OUT/ours-1b.txt
timeout 100 python3 tools/bench/peft_baseline.py /tmp/m125 2>&1 | tail -1 | tee $OUT/peft-125m.txt
$B random-model --shape 1b --out /tmp/m1b 2>&1 | tail -1
timeout 100 python3 tools/bench/peft_baseline.py /tmp/m1b 2>&1 | tail -1 | tee $OUT/peft-1b.txt
