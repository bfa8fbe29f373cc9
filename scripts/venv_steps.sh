# The steps every install script shares (sourced, with $venv and $req set): a venv recorded by a stamp of its
# inputs, the pinned CPU torch first, then the requirements file.

# True where $venv was installed from these inputs ($req, pyproject.toml, the calling script and this file).
venv_is_current() {
  stamp="$venv/.ktchat-installed"
  want="$(cat "$req" pyproject.toml "scripts/$(basename "$0")" scripts/venv_steps.sh | sha256sum | cut -d' ' -f1)"
  [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]
}

# Creates $venv with torch and $req; sets $py and $pip.
venv_create() {
  venv_started=$SECONDS
  python3 -m venv "$venv"
  py="$venv/bin/python"
  pip="$py -m pip"
  export PIP_DISABLE_PIP_VERSION_CHECK=1
  # torch first and pinned: a bare 'torch' requirement would otherwise pull a CUDA build.
  $pip install -q "$(grep -E '^torch==' "$req")"
  $pip install -q -r "$req"
}

# torchaudio without its native extension: PyPI only has builds linked to CUDA torch, and without the extension it
# imports as pure Python (torchaudio's own fallback). LLaMA-Factory imports it at chat start and calls it only for
# audio inputs, which text chat never has.
torchaudio_pure_python() {
  $pip install -q --no-deps "torchaudio==$1"
  local lib
  lib="$($py -c 'import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec("torchaudio").origin).parent / "lib")')"
  rm -f "$lib"/*.so
}

# Records the stamp; with an argument, also enables ktchat's LLaMA-Factory hook first.
venv_done() {
  if [ "${1:-}" = hook ]; then "$py" -m ktchat.integrations.llamafactory enable; fi
  echo "$want" > "$stamp"
  echo "$venv ready in $((SECONDS - venv_started)) s ($(du -sh "$venv" | cut -f1))"
}
