#!/usr/bin/env bash
# Creates .venv-lfkt: the environment KT users train in (llamafactory-kt 0.9.6.dev0 with transformers-kt,
# peft-kt, accelerate-kt and trl-kt, as `ktransformers[sft]` installs them) and ktchat installed into it the way a
# user adds it (`pip install -e .`, dependencies included), with the LLaMA-Factory hook enabled.
#   scripts/install_lfkt.sh [VENV]   (default: .venv-lfkt)
# Idempotent: a venv whose recorded inputs match is left as it is.
#
# - the CPU torch the other environments use (accelerate-kt pins torch==2.9.1 and llamafactory-kt pulls
#   torchaudio/torchvision, which pin CUDA torch builds): the forks and llamafactory-kt go in with --no-deps, their
#   own requirements from requirements/lfkt.txt;
# - torchaudio with --no-deps and without its native extension (scripts/venv_steps.sh says why);
# - Debian's chromium and chromium-driver for the webchat browser test (apt, as root; skipped where present or
#   where KTCHAT_NO_BROWSER=1).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-lfkt}
req=requirements/lfkt.txt
source scripts/venv_steps.sh
start=$SECONDS
if [ "${KTCHAT_NO_BROWSER:-0}" != 1 ] && ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      chromium chromium-driver >/dev/null
    echo "chromium + chromium-driver installed in $((SECONDS - start)) s"
  else
    echo "chromedriver is missing and apt-get cannot run here: the webchat browser test will be skipped" >&2
  fi
fi
if venv_is_current; then exit 0; fi
venv_create
$pip install -q --no-deps transformers-kt==5.6.0.post6 peft-kt==0.18.1 accelerate-kt==1.14.0.post4 trl-kt==0.24.0 \
  llamafactory-kt==0.9.6.dev0 kt-kernel==0.7.2
torchaudio_pure_python 2.11.0
# As a user adds ktchat to this environment (README): its dependencies are the modules, not the upstream packages.
$pip install -q -e ".[serve]"
venv_done hook
