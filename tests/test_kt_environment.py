"""ktchat inside the environment KT users train in (.venv-lfkt, made by scripts/install_lfkt.sh): llamafactory-kt
with transformers-kt, peft-kt and accelerate-kt. ktchat's packaging must leave every fork in place, and `ktchat
chat` / `ktchat api` must answer there. The first tests (ktchat's import-time check of the libraries) run anywhere.
"""

import importlib.metadata
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from ktchat import runtime
from ktchat.errors import KTChatError

REPO = Path(__file__).resolve().parents[1]
FORKS = {"transformers": "transformers-kt", "peft": "peft-kt", "accelerate": "accelerate-kt"}


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


IN_KT_ENV = _installed("transformers-kt")
needs_kt_env = pytest.mark.skipif(not IN_KT_ENV, reason="the KT forks are not installed here (scripts/install_lfkt.sh "
                                  "makes .venv-lfkt; scripts/test.sh runs this file there)")


def test_a_missing_or_too_old_module_is_one_line_naming_it(monkeypatch):
    wanted = [Requirement('no_such_module_ktchat>=1; extra == "hf"'), Requirement('pytest>=999; extra == "hf"')]
    monkeypatch.setattr(runtime, "_library_requirements", lambda: wanted)
    problems = runtime.library_problems()
    assert problems[0] == "the no_such_module_ktchat module is missing"
    assert problems[1].startswith("pytest ") and problems[1].endswith("ktchat needs pytest>=999")
    with pytest.raises(KTChatError, match=r"pip install 'ktchat\[hf\]'.*transformers-kt, peft-kt, accelerate-kt"):
        runtime.check_libraries()


def test_the_checked_modules_are_the_hf_extra_of_the_installed_metadata():
    """Where ktchat is installed (every venv scripts/ makes), the check reads pyproject's `hf` extra, not a copy."""
    if not _installed("ktchat"):
        pytest.skip("ktchat runs from a source tree here: no installed metadata to read")
    import tomllib

    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["hf"]
    assert sorted(str(r).split(";")[0] for r in runtime._library_requirements()) == sorted(
        str(Requirement(line)) for line in extra)
    assert runtime.library_problems() == []


@needs_kt_env
def test_ktchat_left_every_fork_in_place():
    listed = subprocess.run([sys.executable, "-m", "pip", "list", "--format=json"], capture_output=True, text=True,
                            check=True, timeout=120)
    names = {row["name"].lower().replace("_", "-") for row in json.loads(listed.stdout)}
    assert "ktchat" in names and "llamafactory-kt" in names
    assert set(FORKS.values()) <= names, names
    assert not set(FORKS) & names, f"upstream packages beside the forks: {sorted(set(FORKS) & names)}"
    for module, fork in FORKS.items():  # the modules ktchat imports are the forks'
        files = importlib.metadata.files(fork)
        origin = __import__(module).__file__
        assert any(str(f.locate()) == origin for f in files), (module, origin)


def _config(tiny, tmp_path) -> Path:
    path = tmp_path / "chat.yaml"
    path.write_text(yaml.safe_dump({
        "model_name_or_path": str(tiny.model), "adapter_name_or_path": str(tiny.adapter), "use_kt": True,
        "do_sample": False, "max_new_tokens": 32}))
    return path


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONIOENCODING": "utf-8"}


@needs_kt_env
def test_ktchat_chat_answers_in_the_kt_environment(tiny, tmp_path):
    from ktchat.tinymodels import TRAINED_QA

    ktchat = Path(sys.executable).parent / "ktchat"
    stdin = "".join(f"{q}\nclear\n" for q, _ in TRAINED_QA) + "exit\n"
    out = subprocess.run([str(ktchat), "chat", str(_config(tiny, tmp_path))], input=stdin, capture_output=True,
                         text=True, timeout=300, env=ENV)
    assert out.returncode == 0, out.stderr[-3000:]
    replies = [part.split("\n", 1)[0].strip() for part in out.stdout.split("Assistant: ")[1:]]
    assert replies == [answer for _, answer in TRAINED_QA], out.stdout[-3000:]


@needs_kt_env
def test_ktchat_api_answers_in_the_kt_environment(tiny, tmp_path):
    from ktchat.tinymodels import TRAINED_QA

    from servers import start_server

    server, url = start_server(_config(tiny, tmp_path), tmp_path / "api.log", "--model-name", "tiny",
                               command=[str(Path(sys.executable).parent / "ktchat"), "api"], timeout=300)
    try:
        for question, answer in TRAINED_QA:
            body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": question}]}).encode()
            request = urllib.request.Request(f"{url}/v1/chat/completions", data=body,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as response:
                reply = json.loads(response.read())
            assert reply["choices"][0]["message"]["content"].strip() == answer
    finally:
        server.terminate()
        server.wait(60)
