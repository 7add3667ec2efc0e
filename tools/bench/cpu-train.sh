#!/usr/bin/env bash
# Issue 16, CPU acceptance: train-125m on bitlora's native CPU backend beside PyTorch + PEFT
# (f32, eager, on the CPU) on the same random weights and the same workload, interleaved in one
# run; prints each round's tokens/s and peak RSS for both, and the ratio bitlora / PyTorch.
#
#   tools/bench/cpu-train.sh    # ROUNDS=3 STEPS=20 THREADS=$(nproc) SEED=42
#
# Workload (shared/BENCHMARKS-TARGETS.md, train-125m): the 125m shape's random model (seed
# SEED), LoRA r 8 / alpha 16 on all seven projections, one sequence of 128 tokens per optimizer
# step, AdamW lr 1e-4 with a cosine decay and the gradient norm clipped at 1.0; 2 warm-up steps,
# then STEPS timed steps (the targets file's >= 20), the median step reported; the whole run
# takes ~10 min on a 2-core machine (STEPS=10 ROUNDS=2 for a quicker look).
# - bitlora: `bitlora bench train --shape 125m --backend cpu --seed SEED --gen-len STEPS` (it
#   builds the same random model in memory), RAYON_NUM_THREADS=THREADS.
# - PyTorch: tools/bench/peft_baseline.py on the model that `bitlora random-model --shape 125m
#   --seed SEED` writes (the same values, bf16 on disk, loaded as f32), transformers' BitNet
#   (AutoBitLinear, online ternary weights and int8 activations) + PEFT, `--device cpu --dtype
#   f32 --bitlora-seed SEED`: bitlora's own token sequences in its trainer's order, the loss over
#   all 128 targets, the same AdamW, clipping and schedule; torch.set_num_threads(THREADS).
# Same work check: bitlora's step-0 loss (its CPU logits of step 0's sequence; the adapter's B
# is zero at step 0 on both sides) beside PyTorch's step-0 training loss.
# Peak RSS: VmHWM of each process (bitlora's includes building the random model; PyTorch's
# includes loading the model and the import of torch + transformers).
# Rounds alternate which side runs first; the load average (uptime's) is recorded before and
# after each round.
#
# Idempotent: a venv with torch, transformers >= 5 and peft at $TORCH_VENV (default
# /work/.venv-torch, outside the repository; PyPI's torch is the CUDA build, ~5.6 GB, and runs
# on the CPU; ~2-3 min to install) unless it already imports them; the release CLI
# (`cargo build --release -p bitlora`, cargo's no-op when up to date) unless BITLORA names a
# binary; the random model is written afresh into $MODEL_DIR each run (a few seconds) so that it
# always matches the binary's generator. Raw outputs go to $LOGS.
set -euo pipefail
cd "$(dirname "$0")/../.."

ROUNDS=${ROUNDS:-3}
STEPS=${STEPS:-20}
THREADS=${THREADS:-$(nproc)}
SEED=${SEED:-42}
SHAPE=125m
WARMUP=2 # bench train's fixed warm-up
TORCH_VENV=${TORCH_VENV:-/work/.venv-torch}
TORCH_PIP=${TORCH_PIP:-torch transformers>=5 peft safetensors}
MODEL_DIR=${MODEL_DIR:-target/bench-models/train-$SHAPE-seed$SEED}
LOGS=${LOGS:-target/bench-cpu-train}

PY=$TORCH_VENV/bin/python
if ! [[ -x $PY ]] || ! "$PY" -c 'import torch, peft; from transformers import BitNetForCausalLM' 2>/dev/null; then
  echo "# installing $TORCH_PIP into $TORCH_VENV" >&2
  [[ -x $PY ]] || python3 -m venv "$TORCH_VENV"
  # shellcheck disable=SC2086 # TORCH_PIP is a list of requirement specs
  "$PY" -m pip install -q $TORCH_PIP
fi

if [[ -z ${BITLORA:-} ]]; then
  cargo build --release -p bitlora -q
  BITLORA=target/release/bitlora
  built="built here from $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- crates shaders Cargo.lock || echo ' + uncommitted changes in crates/shaders')"
else
  built="given, $(date -u -r "$BITLORA" +%FT%TZ)"
fi

mkdir -p "$LOGS" "$MODEL_DIR"
"$BITLORA" random-model --shape $SHAPE --seed "$SEED" --out "$MODEL_DIR" 2>/dev/null

# One JSON field of the last JSON line of a file.
field() { python3 -c 'import json,sys; print(json.loads([l for l in open(sys.argv[2]) if l.startswith("{")][-1])[sys.argv[1]])' "$1" "$2"; }
f1() { python3 -c 'import sys; print(f"{float(sys.argv[1]):.1f}")' "$1"; }
f0() { python3 -c 'import sys; print(f"{float(sys.argv[1]):.0f}")' "$1"; }
ratio() { python3 -c 'import sys; print(f"{float(sys.argv[1])/float(sys.argv[2]):.2f}")' "$1" "$2"; }
median() { python3 -c 'import statistics,sys; print(statistics.median(map(float, sys.argv[1:])))' "$@"; }
load() { cut -d' ' -f1-3 /proc/loadavg; }

run_bitlora() {
  RAYON_NUM_THREADS=$THREADS "$BITLORA" bench train --shape $SHAPE --backend cpu --seed "$SEED" \
    --gen-len "$STEPS" > "$LOGS/bitlora-$1.json" 2> "$LOGS/bitlora-$1.txt"
}
run_torch() {
  OMP_NUM_THREADS=$THREADS "$PY" tools/bench/peft_baseline.py "$MODEL_DIR" --device cpu --dtype f32 \
    --threads "$THREADS" --bitlora-seed "$SEED" --steps "$STEPS" --warmup $WARMUP \
    > "$LOGS/torch-$1.json" 2> "$LOGS/torch-$1.txt"
}

"$PY" tools/bench/peft_baseline.py "$MODEL_DIR" --bitlora-seed "$SEED" --steps "$STEPS" \
  --warmup $WARMUP --bitlora-step0 "$BITLORA" > "$LOGS/bitlora-step0.json"
bl_loss0=$(field bitlora_loss_step0 "$LOGS/bitlora-step0.json")

versions=$("$PY" -c 'import torch, transformers, peft; print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")')
echo "# $(date -u +%FT%TZ) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores, $THREADS threads each side"
echo "# bitlora: $BITLORA ($built); PyTorch: $versions"
echo "# train-$SHAPE seed $SEED, T 128, batch 1, LoRA r 8 on all seven, $WARMUP warm-up + $STEPS timed steps, median step; $ROUNDS rounds"
printf '| round | load before | bitlora tok/s | bitlora peak RSS MiB | PyTorch tok/s | PyTorch peak RSS MiB | ratio bitlora/PyTorch | load after |\n'
printf '|---|---|---|---|---|---|---|---|\n'
bl_all=() pt_all=()
for r in $(seq 1 "$ROUNDS"); do
  before=$(load)
  if (( r % 2 )); then run_bitlora $r; run_torch $r; else run_torch $r; run_bitlora $r; fi
  after=$(load)
  bl=$(field tokens_per_s_median "$LOGS/bitlora-$r.json")
  pt=$(field tokens_per_s_median "$LOGS/torch-$r.json")
  bl_all+=("$bl") pt_all+=("$pt")
  printf '| %s%s | %s | %s | %s | %s | %s | %s | %s |\n' "$r" "$( (( r % 2 )) && echo ' (bitlora first)' || echo ' (PyTorch first)')" \
    "$before" "$(f1 "$bl")" "$(f0 "$(field peak_rss_mib "$LOGS/bitlora-$r.json")")" "$(f1 "$pt")" \
    "$(f0 "$(field peak_rss_mib "$LOGS/torch-$r.json")")" "$(ratio "$bl" "$pt")" "$after"
done
blm=$(median "${bl_all[@]}") ptm=$(median "${pt_all[@]}")
echo "# median over rounds: bitlora $(f1 "$blm") tok/s, PyTorch $(f1 "$ptm") tok/s, ratio $(ratio "$blm" "$ptm") (target >= 3)"
pt_loss0=$(field loss_step0 "$LOGS/torch-1.json")
echo "# step-0 loss: bitlora $bl_loss0, PyTorch $pt_loss0 (difference $(python3 -c 'import sys; print(f"{float(sys.argv[1])-float(sys.argv[2]):.2e}")' "$bl_loss0" "$pt_loss0"))"
