#!/usr/bin/env bash
# Every GPU figure the open issues ask for, one stage per device call (each stays under the 10-minute call limit):
#   bench/device_figures.sh tests    the device tests and their record (docs/device-tests.md), scripts/device_tests.sh
#   bench/device_figures.sh qwen     Qwen3.5-MoE text: decode graphed / eager / transformers+PEFT, the 10-turn chat
#   bench/device_figures.sh v2       V2-Lite: decode graphed / eager, 20 GiB and all experts on the GPU,
#                                    transformers+PEFT
#   bench/device_figures.sh batch    V2-Lite: aggregate decode at B = 1, 4, 16, 64, 256
#   bench/device_figures.sh glm      GLM-4-MoE: decode graphed / eager
# Run as: run(command="KTCHAT_COMMIT=<sha> bash bench/device_figures.sh STAGE", carry=[".devkt"]). Results land
# under $OUT (see the two scripts it calls); kt_kernel comes from .devkt/ (scripts/device_kit.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  tests) exec bash scripts/device_tests.sh ;;
  qwen) exec bash bench/device_decode.sh qwen3_5_moe_text:kt-exact,kt-exact-eager,hf-peft:turns ;;
  v2) exec bash bench/device_decode.sh deepseek_v2:kt-exact,kt-exact-eager,kt-exact@20,kt-exact@all,hf-peft ;;
  batch) exec bash bench/device_decode.sh deepseek_v2::batch ;;
  glm) exec bash bench/device_decode.sh glm4_moe:kt-exact,kt-exact-eager ;;
  *) echo "usage: bench/device_figures.sh tests|qwen|v2|batch|glm" >&2; exit 2 ;;
esac
