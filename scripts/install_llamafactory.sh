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
# - torchaudio with --no-deps and without its native extension: LLaMA-Factory imports it at chat start, PyPI only
#   has builds linked to CUDA torch, and without the extension it imports as pure Python (torchaudio's own
#   fallback); LLaMA-Factory only calls torchaudio for audio inputs, which text chat never has;
# - kt-kernel with --no-deps (its metadata pins torch==2.9.1; its native code does not link torch).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-lf}
req=requirements/llamafactory.txt
stamp="$venv/.ktchat-installed"
want="$(cat "$req" pyproject.toml "$0" | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
start=$SECONDS
python3 -m venv "$venv"
py="$venv/bin/python"
pip="$py -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first and pinned: a bare 'torch' requirement would otherwise pull a CUDA build.
$pip install -q "$(grep -E '^torch==' "$req")"
$pip install -q -r "$req"
$pip install -q --no-deps llamafactory==0.9.5 torchaudio==2.11.0 kt-kernel==0.7.2
ta_lib="$($py -c 'import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec("torchaudio").origin).parent / "lib")')"
rm -f "$ta_lib"/*.so
$pip install -q --no-deps -e .
"$py" -m ktchat.integrations.llamafactory enable
echo "$want" > "$stamp"
echo "$venv ready in $((SECONDS - start)) s ($(du -sh "$venv" | cut -f1))"
