#!/usr/bin/env bash
# Creates a virtual environment and installs ktchat with every runtime and test dependency.
#   scripts/install.sh [VENV] [REQUIREMENTS]   (defaults: .venv requirements/tf5.txt)
# Idempotent: a venv whose recorded requirements match is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv}
req=${2:-requirements/tf5.txt}
source scripts/venv_steps.sh
if venv_is_current; then exit 0; fi
venv_create
# kt-kernel pins torch==2.9.1 in its metadata but does not link libtorch: install it without deps.
$pip install -q --no-deps kt-kernel==0.7.2
$pip install -q --no-deps -e .
venv_done
