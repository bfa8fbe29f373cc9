#!/usr/bin/env bash
# Runs the whole test suite under transformers 5.x (.venv); then the transformers-dependent part of it under
# transformers 4.57 (.venv-tf4) beside tests/test_llamafactory.py, the KT-environment tests, the webchat browser test
# and train-then-chat (`llamafactory-cli train` with use_kt, then ktchat on what it wrote) under llamafactory-kt with
# the KT forks (.venv-lfkt); then tests/test_llamafactory.py and tests/test_predict.py under upstream LLaMA-Factory
# 0.9.5 (.venv-lf). It installs the environments first if needed: .venv before anything, the others while its tests
# run.
# Extra arguments go to pytest. Ends with the time each phase took.
set -euo pipefail
cd "$(dirname "$0")/.."
lap_start=$SECONDS
laps=()
lap() { laps+=("$(printf '%5d s  %s' $((SECONDS - lap_start)) "$1")"); lap_start=$SECONDS; }
bash scripts/install.sh .venv requirements/tf5.txt; lap "install .venv"
# The other environments install beside the .venv tests (downloads and unpacking, mostly); their output is shown once
# they are needed.
mkdir -p .cache
others_log=.cache/install-others.log
( start=$SECONDS
  bash scripts/install.sh .venv-tf4 requirements/tf4.txt
  bash scripts/install_llamafactory.sh .venv-lf
  bash scripts/install_lfkt.sh .venv-lfkt
  echo "installed .venv-tf4, .venv-lf and .venv-lfkt in $((SECONDS - start)) s" ) > "$others_log" 2>&1 &
others=$!
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE
status=0
echo "== pytest under $(.venv/bin/python -c 'import transformers; print("transformers", transformers.__version__)')"
.venv/bin/python -m pytest "$@" || status=$?
lap "pytest .venv (the installs beside it)"
others_status=0
wait $others || others_status=$?
cat "$others_log"
lap "install .venv-tf4, .venv-lf, .venv-lfkt (what was left of it)"
if [ $others_status != 0 ]; then echo "installing the other environments failed (above)" >&2; exit $others_status; fi
# Under transformers 4.x, what can depend on its version: the models, PEFT, the chat templates, the loader's errors.
# Left out, as version-independent and run above: the HTTP server, log output, the checks made before torch loads,
# `ktchat predict`'s files (LLaMA-Factory's datasets run in .venv-lf), the layer graph and the pure unit tests. None
# of what is left opens a port, so it runs beside the .venv-lfkt tests (one process each, mostly one core each).
tf4_left_out=(tests/test_serve.py tests/test_quiet.py tests/test_preload.py tests/test_predict.py tests/test_layers.py
              tests/unit)
# The KT users' environment: the hook under llamafactory-kt and the forks, webchat in chromium, train-then-chat.
lfkt_tests=(tests/test_llamafactory.py tests/test_kt_environment.py tests/test_webchat_browser.py tests/test_train_then_chat.py)
lfkt_log=.cache/pytest-lfkt.log
echo "== pytest ${lfkt_tests[*]} under $(.venv-lfkt/bin/python -c 'import importlib.metadata as m; print("llamafactory-kt", m.version("llamafactory-kt"), "+ transformers-kt", m.version("transformers-kt"))') (beside the next; its output follows it)"
.venv-lfkt/bin/python -m pytest "${lfkt_tests[@]}" "$@" > "$lfkt_log" 2>&1 &
lfkt=$!
echo "== pytest under $(.venv-tf4/bin/python -c 'import transformers; print("transformers", transformers.__version__)'), without ${tf4_left_out[*]}"
.venv-tf4/bin/python -m pytest "${tf4_left_out[@]/#/--ignore=}" "$@" || status=$?
lap "pytest .venv-tf4 (.venv-lfkt beside it)"
wait $lfkt || status=$?
echo "== pytest ${lfkt_tests[*]} (.venv-lfkt)"
cat "$lfkt_log"
lap "pytest .venv-lfkt (what was left of it)"
# The real llamafactory-cli chat/api, and `ktchat predict` on LLaMA-Factory's own dataset pipeline, on the tiny model
# that the .venv run above has built (.cache/tiny).
lf_tests=(tests/test_llamafactory.py tests/test_predict.py)
echo "== pytest ${lf_tests[*]} under LLaMA-Factory $(.venv-lf/bin/python -c 'import importlib.metadata as m; print(m.version("llamafactory"), "+ transformers", m.version("transformers"))')"
.venv-lf/bin/python -m pytest "${lf_tests[@]}" "$@" || status=$?
lap "pytest .venv-lf"
echo "== time per phase"
printf '%s\n' "${laps[@]}"
exit $status
