#!/usr/bin/env bash
# Decode tables on the GPU machine, family by family, in one run of this script: each family's random-weight
# checkpoint is written, measured by bench/model_bench.py (medians; the CPU read bandwidth, hence the floor, measured
# in the same process), optionally followed by a 10-turn chat (bench/chat_turns.py), then deleted (the machine's disk
# holds one ~32 GB checkpoint at a time).
#   bench/device_decode.sh FAMILY:[VARIANT,VARIANT][:turns,batch] ...   (no variants: the extras alone)
#   bench/device_decode.sh qwen3_5_moe_text:kt-exact,kt-exact-eager,hf-peft:turns glm4_moe:kt-exact deepseek_v2:kt-exact
# Extras: turns, a 10-turn chat whose template rewrites the last prompt's end (bench/chat_turns.py --thinking); batch,
# aggregate decode at B = 1, 4, 16, 64, 256 (bench/batch_bench.py). Variants take model_bench's suffixes (":tN" kt
# threads, "@GiB" routed experts kept on the GPU).
# Results: $OUT/decode-FAMILY.json, turns-FAMILY.json, batch-FAMILY.json and the logs beside them. kt_kernel comes from .devkt/
# (scripts/device_kit.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/ktchat-device}
work=${KTCHAT_BENCH_DIR:-/tmp/ktchat-bench}
mkdir -p "$out"
export PYTHONPATH="$PWD/src:$PWD/.devkt${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
status=0
for spec in "$@"; do
  IFS=: read -r family variants extras <<< "$spec"
  if [[ -n $variants ]]; then
    python3 bench/model_bench.py --out "$work" --family "$family" --prompt 512 --new-tokens 64 --repeats 3 \
      --variants ${variants//,/ } --json "$out/decode-$family.json" 2>&1 | tee "$out/decode-$family.log" || status=1
  fi
  if [[ ",$extras," == *,turns,* ]]; then
    python3 bench/chat_turns.py --out "$work" --family "$family" --turns 10 --turn-tokens 300 --new-tokens 16 \
      --thinking --variants kt-exact --json "$out/turns-$family.json" 2>&1 | tee "$out/turns-$family.log" || status=1
  fi
  if [[ ",$extras," == *,batch,* ]]; then
    python3 bench/batch_bench.py --out "$work" --family "$family" --batches 1 4 16 64 256 --variant kt-exact \
      --json "$out/batch-$family.json" 2>&1 | tee "$out/batch-$family.log" || status=1
  fi
  rm -rf "$work"
done
exit $status
