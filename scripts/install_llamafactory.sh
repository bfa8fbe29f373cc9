#!/usr/bin/env bash
# Creates .venv-lf: upstream LLaMA-Factory 0.9.5 (with the transformers/peft/accelerate it accepts) and ktchat
# next to it, with ktchat's LLaMA-Factory hook enabled, so tests can run the real `llamafactory-cli`.
#   scripts/install_llamafactory.sh [VENV]   (default: .venv-lf)
# Idempotent: a venv whose recorded inputs match is left as it is.
#
# As light as the chat path allows (docs/llamafactory.md, "Test environment"):
# - the CPU torch the other environments use; LLaMA-Factory only asks for torch>=2.4;
# - llamafactory itself with --no-deps, plus what its chat/api path imports (requirements/llamafactory.txt):
#   no gradio, vllm, matplotlib, modelscope, bitsandbytes, deepspeed;
# - torchaudio with --no-deps and without its native extension (scripts/venv_steps.sh says why);
# - kt-kernel with --no-deps (its metadata pins torch==2.9.1; its native code does not link torch).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-lf}
req=requirements/llamafactory.txt
source scripts/venv_steps.sh
if venv_is_current; then exit 0; fi
venv_create
$pip install -q --no-deps llamafactory==0.9.5 kt-kernel==0.7.2
torchaudio_pure_python 2.11.0
$pip install -q --no-deps -e .
venv_done hook
