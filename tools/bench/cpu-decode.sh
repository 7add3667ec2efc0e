#!/usr/bin/env bash
# Issue 14, CPU acceptance: bitlora's CPU decode beside llama.cpp's TQ2_0 decode of the same
# weights, interleaved in one run, for decode-125m and decode-2b4t at 2 threads and 1.
#
#   tools/bench/cpu-decode.sh    # SHAPES="125m 2b4t" GEN_125M=128 GEN_2B4T=16 REPS_125M=3 REPS_2B4T=1
#
# 2b4t's gen length and llama.cpp repetitions are small so that the whole run stays near 15
# minutes on a shared 2-core machine: bitlora builds the random 2b4t model (~2-4 min) on each
# of its two runs, and a 2b4t prefill of 128 tokens is compute-bound there.
#
# Idempotent: builds llama.cpp (CPU backend, llama-bench only, Release, GGML_NATIVE) into
# target/llamacpp once, from the llama.cpp that llama-cpp-python 0.3.36's PyPI sdist vendors
# ($LLCPP_TARBALL, else downloaded from PyPI); builds the release CLI (cargo's no-op when up to
# date); writes each shape's random bench model (seed 42, the one `bench decode` builds) as a
# TQ2_0 GGUF into target/bench-gguf once (`bitlora bench gguf`).
#
# What is timed, on both sides: a 128-token prompt's prefill, then decoding at a KV depth of
# 128 tokens. bitlora: `bench decode --backend cpu` (prefill = Model::forward of the prompt;
# decode = generate()'s greedy tokens; RAYON_NUM_THREADS sets the threads). llama.cpp:
# `llama-bench -p 128 -n 0` (prefill) and `-p 0 -d 128 -n GEN` (GEN tokens after a 128-token
# context), each the mean of REPS_<shape> runs after llama-bench's warm-up run.
set -euo pipefail
cd "$(dirname "$0")/../.."

GEN_125M=${GEN_125M:-128}
GEN_2B4T=${GEN_2B4T:-16}
REPS_125M=${REPS_125M:-3}
REPS_2B4T=${REPS_2B4T:-1}
SHAPES=${SHAPES:-125m 2b4t}
PROMPT=128
SEED=42
LL=target/llamacpp
LLAMA_BENCH=$LL/build/bin/llama-bench
LLCPP_TARBALL=${LLCPP_TARBALL:-/tmp/llcpp.tar.gz}
LLCPP_URL=https://pypi.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/llama_cpp_python-0.3.36.tar.gz

if [[ ! -x $LLAMA_BENCH ]]; then
  mkdir -p "$LL"
  if [[ ! -f $LL/src/CMakeLists.txt ]]; then
    [[ -f $LLCPP_TARBALL ]] || curl -sSfL -o "$LLCPP_TARBALL" "$LLCPP_URL"
    rm -rf "$LL/src" "$LL/unpack" && mkdir -p "$LL/unpack"
    tar xzf "$LLCPP_TARBALL" -C "$LL/unpack"
    mv "$LL"/unpack/llama_cpp_python-*/vendor/llama.cpp "$LL/src" && rm -rf "$LL/unpack"
  fi
  command -v cmake >/dev/null || python3 -m pip install -q cmake
  cmake -S "$LL/src" -B "$LL/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TOOLS=ON -DGGML_OPENMP=OFF
  cmake --build "$LL/build" -j2 --target llama-bench
fi

cargo build --release -p bitlora -q
BITLORA=target/release/bitlora

mkdir -p target/bench-gguf
gguf() { echo "target/bench-gguf/decode-$1-seed$SEED-tq2_0.gguf"; }
for shape in $SHAPES; do
  [[ -f $(gguf $shape) ]] || $BITLORA bench gguf --shape $shape --seed $SEED --out "$(gguf $shape)"
done

# One JSON field of the last JSON line on stdin.
field() { python3 -c 'import json,sys; print(json.loads([l for l in sys.stdin if l.startswith("{")][-1])[sys.argv[1]])' "$1"; }
fmt() { python3 -c 'import sys; print(f"{float(sys.argv[1]):.2f}")' "$1"; }
ratio() { python3 -c 'import sys; print(f"{float(sys.argv[1])/float(sys.argv[2]):.2f}")' "$1" "$2"; }

echo "# $(date -u +%FT%TZ) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; load average: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# llama.cpp: llama-cpp-python 0.3.36 sdist snapshot, CPU, GGML_NATIVE; GEN_125M=$GEN_125M GEN_2B4T=$GEN_2B4T REPS_125M=$REPS_125M REPS_2B4T=$REPS_2B4T"
printf '| shape | threads | gen | bitlora prefill tok/s | llama.cpp prefill tok/s | bitlora decode tok/s | llama.cpp decode tok/s | decode ratio bitlora/llama.cpp |\n'
printf '|---|---|---|---|---|---|---|---|\n'
for shape in $SHAPES; do
  gen=$GEN_125M reps=$REPS_125M
  [[ $shape == 2b4t ]] && gen=$GEN_2B4T reps=$REPS_2B4T
  for t in 2 1; do
    bl=$(RAYON_NUM_THREADS=$t $BITLORA bench decode --shape $shape --backend cpu --seed $SEED \
      --prompt-len $PROMPT --gen-len "$gen" 2>/dev/null)
    bl_pp=$(field prefill_tokens_per_s <<<"$bl")
    bl_tg=$(field decode_tokens_per_s <<<"$bl")
    ll_pp=$($LLAMA_BENCH -m "$(gguf $shape)" -t $t -r "$reps" -p $PROMPT -n 0 -o jsonl 2>/dev/null | field avg_ts)
    ll_tg=$($LLAMA_BENCH -m "$(gguf $shape)" -t $t -r "$reps" -p 0 -d $PROMPT -n "$gen" -o jsonl 2>/dev/null | field avg_ts)
    printf '| %s | %s | %s | %s | %s | %s | %s | %s |\n' "$shape" $t "$gen" "$(fmt "$bl_pp")" "$(fmt "$ll_pp")" \
      "$(fmt "$bl_tg")" "$(fmt "$ll_tg")" "$(ratio "$bl_tg" "$ll_tg")"
  done
done
echo "# load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
