#!/usr/bin/env bash
# Creates a virtual environment and installs ktchat with every runtime and test dependency.
#   scripts/install.sh [VENV] [REQUIREMENTS]   (defaults: .venv requirements/tf5.txt)
# Idempotent: a venv whose recorded requirements match is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv}
req=${2:-requirements/tf5.txt}
stamp="$venv/.ktchat-installed"
want="$(cat "$req" pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
python3 -m venv "$venv"
pip="$venv/bin/python -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first and pinned: a bare 'torch' requirement would otherwise pull a CUDA build.
$pip install -q "$(grep -E '^torch==' "$req")"
$pip install -q -r "$req"
# kt-kernel pins torch==2.9.1 in its metadata but does not link libtorch: install it without deps.
$pip install -q --no-deps kt-kernel==0.7.2
$pip install -q --no-deps -e .
echo "$want" > "$stamp"
