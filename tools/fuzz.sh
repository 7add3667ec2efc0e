#!/usr/bin/env bash
# Runs the coverage-guided fuzz targets of fuzz/ (cargo-fuzz, libFuzzer, nightly Rust) for a
# budget and prints, per target, the executions done and the crashes found, then the totals.
#
#   tools/fuzz.sh 60                     # 60 s per target, every target
#   tools/fuzz.sh 300 model checkpoint   # 300 s each, these targets only
#   tools/fuzz.sh merge [targets]        # only merge corpus-new/ into the committed corpus
#   FUZZ_RUNS=1500000 tools/fuzz.sh      # 1.5 M executions in all, split evenly by target
#   FUZZ_RUNS=400000 tools/fuzz.sh model # 400 k executions of one target
#
# Environment:
#   FUZZ_RUNS       total executions instead of seconds (split evenly over the targets given)
#   FUZZ_JOBS       targets run at once (default 1; 2 on a 2-core machine)
#   FUZZ_SANITIZER  cargo fuzz --sanitizer (default none: all the code is Rust, and libFuzzer
#                   still checks RSS and per-input time; -malloc_limit_mb only acts with a
#                   sanitizer; use address for unsafe code paths)
#   FUZZ_MERGE=1    after the run, merge the inputs that add coverage into fuzz/corpus/<t>/
#                   (committed, replayed by crates/core/tests/fuzz_corpus.rs on stable)
#   FUZZ_CORPUS_KB  what a merge keeps of each fuzz/corpus/<t>/ (default 400 KB): seeds and
#                   regress-* inputs, then the smallest merged inputs
#
# New inputs go to fuzz/corpus-new/<target>/ (ignored by git), logs to fuzz/logs/, crash
# inputs to fuzz/artifacts/<target>/. A crash found: copy it into fuzz/corpus/<target>/ once
# fixed, so `cargo test` replays it. Exit status 1 when any target crashed.
set -euo pipefail
cd "$(dirname "$0")/.."

ALL=(safetensors gguf shard_index model tokenizer chat_template data peft_adapter checkpoint train_options)
# Longest input per target (bytes): room for the seeds a target gets far with.
declare -A MAXLEN=(
  [safetensors]=65536 [gguf]=65536 [shard_index]=8192 [model]=65536 [tokenizer]=16384
  [chat_template]=4096 [data]=8192 [peft_adapter]=65536 [checkpoint]=65536
  [train_options]=2048
)

SECONDS_PER_TARGET=60 MERGE_ONLY=0
if [[ $# -gt 0 && $1 == merge ]]; then MERGE_ONLY=1; shift; fi
if [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]]; then SECONDS_PER_TARGET=$1; shift; fi
TARGETS=("$@")
[[ ${#TARGETS[@]} -eq 0 ]] && TARGETS=("${ALL[@]}")
for t in "${TARGETS[@]}"; do
  [[ -n ${MAXLEN[$t]:-} ]] || { echo "unknown target $t (targets: ${ALL[*]})" >&2; exit 2; }
done
JOBS=${FUZZ_JOBS:-1}
SANITIZER=${FUZZ_SANITIZER:-none}

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked
fi

# Keeps in fuzz/corpus/<t>/ the smallest set of its inputs and fuzz/corpus-new/<t>/'s that
# covers what they all cover (libFuzzer -merge=1): what gets committed.
merge() {
  for t in "${TARGETS[@]}"; do
    (cd fuzz && cargo +nightly fuzz run -s "$SANITIZER" "$t" "corpus/$t" "corpus-new/$t" -- \
      -merge=1 -max_len="${MAXLEN[$t]}" -rss_limit_mb=2048 -timeout=10 >"logs/$t.merge.log" 2>&1) || true
    # Committed size bound: seeds (seed-*) and crash regressions (regress-*) stay, then the
    # smallest merged inputs while the directory stays under FUZZ_CORPUS_KB (default 400).
    local budget=$(( ${FUZZ_CORPUS_KB:-400} * 1024 )) used=0 size f
    used=$(find "fuzz/corpus/$t" -type f \( -name 'seed-*' -o -name 'regress-*' \) -printf '%s\n' |
      awk '{s += $1} END {print s + 0}')
    while read -r size f; do
      if (( used + size <= budget )); then used=$(( used + size )); else rm -f "$f"; fi
    done < <(find "fuzz/corpus/$t" -type f ! -name 'seed-*' ! -name 'regress-*' -printf '%s %p\n' | sort -n -k1,1 -k2)
    echo "$t: corpus now $(find "fuzz/corpus/$t" -type f | wc -l) files, $(( used / 1024 )) KB"
  done
}
if [[ $MERGE_ONLY == 1 ]]; then
  (cd fuzz && cargo +nightly fuzz build -s "$SANITIZER")
  mkdir -p fuzz/logs
  merge
  exit 0
fi

if [[ -n ${FUZZ_RUNS:-} ]]; then
  PER_TARGET_RUNS=$(( FUZZ_RUNS / ${#TARGETS[@]} ))
  BUDGET=(-runs="$PER_TARGET_RUNS")
  echo "budget: $PER_TARGET_RUNS executions per target"
else
  BUDGET=(-max_total_time="$SECONDS_PER_TARGET")
  echo "budget: ${SECONDS_PER_TARGET} s per target"
fi

(cd fuzz && cargo +nightly fuzz build -s "$SANITIZER")
mkdir -p fuzz/logs

run_one() {
  local t=$1
  mkdir -p "fuzz/corpus-new/$t" "fuzz/artifacts/$t"
  local start=$SECONDS
  # The first corpus directory receives new inputs; the committed one is only read.
  (cd fuzz && cargo +nightly fuzz run -s "$SANITIZER" "$t" "corpus-new/$t" "corpus/$t" -- \
    "${BUDGET[@]}" -rss_limit_mb=2048 -malloc_limit_mb=2048 -max_len="${MAXLEN[$t]}" \
    -timeout=10 -print_final_stats=1 -artifact_prefix="artifacts/$t/") \
    >"fuzz/logs/$t.log" 2>&1 || true
  echo $(( SECONDS - start )) >"fuzz/logs/$t.seconds"
}

pids=()
for t in "${TARGETS[@]}"; do
  rm -f "fuzz/logs/$t.log" "fuzz/logs/$t.seconds"
  # Crash inputs already there are not this run's.
  find "fuzz/artifacts/$t" -type f 2>/dev/null >"fuzz/logs/$t.before" || true
  run_one "$t" &
  pids+=($!)
  while [[ $(jobs -rp | wc -l) -ge $JOBS ]]; do wait -n || true; done
done
wait

total_execs=0 total_crashes=0
printf '%-15s %8s %12s %8s %8s\n' target seconds executions crashes corpus
for t in "${TARGETS[@]}"; do
  log="fuzz/logs/$t.log"
  execs=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || true)
  if [[ -z $execs ]]; then # no final stats (a crash): the last progress line
    execs=$(grep -oE '^#[0-9]+' "$log" | tail -1 | tr -d '#' || true)
  fi
  execs=${execs:-0}
  crashes=$(find "fuzz/artifacts/$t" -type f \( -name 'crash-*' -o -name 'oom-*' -o -name 'timeout-*' -o -name 'leak-*' \) 2>/dev/null |
    grep -vxFf "fuzz/logs/$t.before" | wc -l || true)
  if grep -qE '^==[0-9]+== ERROR: libFuzzer|panicked at|deadly signal' "$log" && [[ $crashes -eq 0 ]]; then
    crashes=1
  fi
  corpus=$(( $(find "fuzz/corpus/$t" -type f | wc -l) + $(find "fuzz/corpus-new/$t" -type f | wc -l) ))
  printf '%-15s %8s %12s %8s %8s\n' "$t" "$(cat "fuzz/logs/$t.seconds")" "$execs" "$crashes" "$corpus"
  total_execs=$(( total_execs + execs ))
  total_crashes=$(( total_crashes + crashes ))
done
printf '%-15s %8s %12s %8s\n' total "" "$total_execs" "$total_crashes"

[[ ${FUZZ_MERGE:-0} == 1 ]] && merge
[[ $total_crashes -eq 0 ]]
