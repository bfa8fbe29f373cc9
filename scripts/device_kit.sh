#!/usr/bin/env bash
# Makes .devkt/ (git-ignored): what the GPU machine lacks for ktchat's device runs, for its Python 3.12 -- kt_kernel
# 0.7.2 trimmed to its amx, avx512_bf16 and avx2 builds (the wheel is over what may travel), gguf, and pytest with
# pytest-timeout. scripts/device_tests.sh and the bench commands in docs/performance.md put it on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
kit=.devkt
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_35_x86_64 -d "$tmp/kt" kt-kernel==0.7.2
pip download -q --no-deps -d "$tmp/py" gguf pytest==9.2.0 pluggy iniconfig pygments pytest-timeout==2.4.0
rm -rf "$kit" && mkdir -p "$kit"
# the kt-kernel wheel also drops unrelated top-level packages (sgl_kernel, deep_gemm, ...): only its own two folders
unzip -q -o "$tmp"/kt/*.whl 'kt_kernel/*' 'kt_kernel.libs/*' -d "$kit"
for wheel in "$tmp"/py/*.whl; do unzip -q -o "$wheel" -d "$kit"; done
rm -rf "$kit"/kt_kernel/cli "$kit"/kt_kernel/_kt_kernel_ext_avx512_{base,vbmi,vnni}* "$kit"/*.dist-info/RECORD
grep -qx "/$kit/" .git/info/exclude 2>/dev/null || echo "/$kit/" >> .git/info/exclude
du -sh "$kit"
