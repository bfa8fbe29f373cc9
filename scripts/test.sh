#!/usr/bin/env bash
# Runs the whole test suite under transformers 5.x (.venv) and transformers 4.57 (.venv-tf4), then
# tests/test_llamafactory.py under upstream LLaMA-Factory 0.9.5 (.venv-lf), installing the environments first if
# needed. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh .venv requirements/tf5.txt
bash scripts/install.sh .venv-tf4 requirements/tf4.txt
bash scripts/install_llamafactory.sh .venv-lf
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE
status=0
for venv in .venv .venv-tf4; do
  echo "== pytest under $("$venv/bin/python" -c 'import transformers; print("transformers", transformers.__version__)')"
  "$venv/bin/python" -m pytest "$@" || status=$?
done
# The real llamafactory-cli chat/api on the tiny model that the .venv run above has built (.cache/tiny).
echo "== pytest tests/test_llamafactory.py under LLaMA-Factory $(.venv-lf/bin/python -c 'import importlib.metadata as m; print(m.version("llamafactory"), "+ transformers", m.version("transformers"))')"
.venv-lf/bin/python -m pytest tests/test_llamafactory.py "$@" || status=$?
exit $status
