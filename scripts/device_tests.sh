#!/usr/bin/env bash
# The tests CI cannot run, on the GPU machine (one H100/H200 + an AMX Xeon): the same suite with the non-expert
# weights on CUDA (KTCHAT_TEST_DEVICE=cuda), where the decode step is one CUDA graph with the kt experts inside, GPU
# prefill streams the experts, and kt_kernel loads its amx build (the exact SFT kernels for every weight format).
#   scripts/device_tests.sh [PYTEST ARGS]     (default: the files that hold the GPU and AMX paths)
# It runs from a copy of the repo with the machine's own torch/transformers/peft; kt_kernel (its amx, avx512_bf16
# and avx2 builds, trimmed), gguf and pytest come from .devkt/ (git-ignored; scripts/device_kit.sh makes it here).
# Writes $OUT/device-tests.log and $OUT/device-record.md: the record committed as docs/device-tests.md.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/ktchat-device}
mkdir -p "$out"
export PYTHONPATH="$PWD/src:$PWD/.devkt${PYTHONPATH:+:$PYTHONPATH}" KTCHAT_TEST_DEVICE=cuda HF_HUB_OFFLINE=1 \
  TRANSFORMERS_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1 KTCHAT_TEST_CACHE=/tmp/ktchat-tiny/tiny
files=(tests/test_engine.py tests/test_batching.py tests/test_families.py tests/test_gpu_experts.py tests/test_mla.py
       tests/test_kept_cache.py tests/test_gpu_prefill.py tests/test_kt_backend.py tests/test_kt_formats.py
       tests/test_quantized.py tests/test_exactness.py)
start=$SECONDS
limit=${KTCHAT_DEVICE_TEST_LIMIT:-480}  # inside the device call's 10 minutes, so the record below is always written
timeout "$limit" python3 -m pytest -q -p no:cacheprovider -o addopts="" -rfE "${@:-${files[@]}}" 2>&1 \
  | tee "$out/device-tests.log"
status=${PIPESTATUS[0]}
summary=$(grep -E "^[0-9]+ (passed|failed)|^=+ .*(passed|failed|error).* =+$" "$out/device-tests.log" | tail -1)
[[ $status == 124 ]] && summary="stopped at the ${limit} s limit (device-tests.log has what ran)"
{
  echo "| commit | date | machine | result | seconds |"
  echo "|---|---|---|---|---|"
  echo "| ${KTCHAT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo '?')} | $(date -u +%Y-%m-%d) |" \
       "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $(nproc) cores," \
       "kt_kernel $(python3 -c 'from ktchat.experts.kt_backend import cpu_variant; print(cpu_variant())' 2>/dev/null)," \
       "torch $(python3 -c 'import torch; print(torch.__version__)'), transformers $(python3 -c 'import transformers; print(transformers.__version__)')" \
       "| ${summary//=/} | $((SECONDS - start)) |"
} > "$out/device-record.md"
cat "$out/device-record.md"
exit "$status"
