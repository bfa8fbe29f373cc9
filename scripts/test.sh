#!/usr/bin/env bash
# Runs the whole test suite under transformers 5.x (.venv) and transformers 4.57 (.venv-tf4), then
# tests/test_llamafactory.py and tests/test_predict.py under upstream LLaMA-Factory 0.9.5 (.venv-lf), and
# tests/test_llamafactory.py, the KT-environment tests, the webchat browser test and train-then-chat
# (`llamafactory-cli train` with use_kt, then ktchat on what it wrote) under llamafactory-kt with the KT forks
# (.venv-lfkt), installing the environments first if needed. Extra arguments go to pytest. Ends with the time each
# phase took.
set -euo pipefail
cd "$(dirname "$0")/.."
lap_start=$SECONDS
laps=()
lap() { laps+=("$(printf '%5d s  %s' $((SECONDS - lap_start)) "$1")"); lap_start=$SECONDS; }
bash scripts/install.sh .venv requirements/tf5.txt; lap "install .venv"
bash scripts/install.sh .venv-tf4 requirements/tf4.txt; lap "install .venv-tf4"
bash scripts/install_llamafactory.sh .venv-lf; lap "install .venv-lf"
bash scripts/install_lfkt.sh .venv-lfkt; lap "install .venv-lfkt"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE
status=0
for venv in .venv .venv-tf4; do
  echo "== pytest under $("$venv/bin/python" -c 'import transformers; print("transformers", transformers.__version__)')"
  "$venv/bin/python" -m pytest "$@" || status=$?
  lap "pytest $venv"
done
# The real llamafactory-cli chat/api, and `ktchat predict` on LLaMA-Factory's own dataset pipeline, on the tiny model
# that the .venv run above has built (.cache/tiny).
lf_tests=(tests/test_llamafactory.py tests/test_predict.py)
echo "== pytest ${lf_tests[*]} under LLaMA-Factory $(.venv-lf/bin/python -c 'import importlib.metadata as m; print(m.version("llamafactory"), "+ transformers", m.version("transformers"))')"
.venv-lf/bin/python -m pytest "${lf_tests[@]}" "$@" || status=$?
lap "pytest .venv-lf"
lfkt_tests=(tests/test_llamafactory.py tests/test_kt_environment.py tests/test_webchat_browser.py tests/test_train_then_chat.py)
echo "== pytest ${lfkt_tests[*]} under $(.venv-lfkt/bin/python -c 'import importlib.metadata as m; print("llamafactory-kt", m.version("llamafactory-kt"), "+ transformers-kt", m.version("transformers-kt"))')"
.venv-lfkt/bin/python -m pytest "${lfkt_tests[@]}" "$@" || status=$?
lap "pytest .venv-lfkt"
echo "== time per phase"
printf '%s\n' "${laps[@]}"
exit $status
