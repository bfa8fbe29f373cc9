"""The `ktchat` console script, run as users run it: in a subprocess, on the real tiny model and adapter."""

import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ktchat.cli import main
from ktchat.cli.chat import WELCOME
from ktchat.config import GenerationArgs

KTCHAT = Path(sys.executable).parent / "ktchat"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}


def run(*args, stdin="", env=None, timeout=600):
    return subprocess.run([str(KTCHAT), *args], input=stdin, capture_output=True, text=True,
                          env={**ENV, **(env or {})}, timeout=timeout)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ktchat: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def imported_modules(importtime_log: str) -> set[str]:
    """The modules named in a `-X importtime` log (probes that failed too, e.g. copy's Jython `org.python.core`)."""
    return {line.split("|")[-1].strip() for line in importtime_log.splitlines() if "|" in line}


def test_help_imports_only_the_standard_library_yaml_and_ktchat():
    """What keeps `ktchat --help` fast: beyond what this interpreter imports at startup, only the standard library,
    PyYAML and ktchat's CLI and config modules load (no torch, transformers, numpy, ...)."""
    result = run("--help", env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert result.returncode == 0 and "chat" in result.stdout and "demo" in result.stdout
    imported = imported_modules(result.stderr)
    assert "ktchat.cli" in imported
    assert not {"torch", "transformers", "ktchat.model", "ktchat.generate.session"} & imported
    bare = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True, text=True,
                          env=ENV, timeout=60)
    added = {name.split(".")[0] for name in imported - imported_modules(bare.stderr)}
    third_party = {name for name in added - set(sys.stdlib_module_names) if importlib.util.find_spec(name)}
    assert third_party == {"ktchat", "yaml"}, sorted(third_party)


@pytest.mark.parametrize("command", ["chat", "api", "predict"])
def test_missing_model_folder_is_said_before_torch_loads(tmp_path, command):
    """A YAML naming a folder that is not there, or a corrupt JSON file in it, is one line before torch and
    transformers are imported (the slow part of a command's start)."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json", encoding="utf-8")
    (tmp_path / "d.jsonl").write_text('{"instruction": "Q"}\n', encoding="utf-8")
    for model, fragment in ((tmp_path / "nope", "is not a local folder"), (broken, "config.json: not valid JSON")):
        config = tmp_path / "cfg.yaml"
        extra = f"dataset: {tmp_path / 'd.jsonl'}\n" if command == "predict" else ""
        config.write_text(f"model_name_or_path: {model}\n{extra}", encoding="utf-8")
        result = run(command, str(config), env={"PYTHONPROFILEIMPORTTIME": "1"})
        assert result.returncode == 2, result
        error = [line for line in result.stderr.splitlines() if "|" not in line]
        assert len(error) == 1 and fragment in error[0] and str(model) in error[0], result.stderr
        assert not {"torch", "transformers"} & imported_modules(result.stderr)


def test_version():
    result = run("--version")
    assert result.returncode == 0 and result.stdout.startswith("ktchat ")


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert_one_line_error(run("chat", str(missing)), "config file not found", str(missing))


@pytest.mark.parametrize("text, fragment", [
    ("model_name_or_path: [unclosed\n", "invalid YAML at line"),
    ("- a list\n", "expected a mapping"),
    ("model_name_or_path: m\nmax_new_tokens: abc\n", "max_new_tokens must be an integer >= 1 (got 'abc')"),
    ("model_name_or_path: m\nfoo: 1\n", "unknown key: foo"),
    ("model_name_or_path: m\nuse_kt: true\ninfer_backend: vllm\n", "use_kt: true needs infer_backend: huggingface"),
])
def test_bad_config_is_one_line_exit_2(tmp_path, text, fragment):
    path = tmp_path / "cfg.yaml"
    path.write_text(text, encoding="utf-8")
    assert_one_line_error(run("chat", str(path)), str(path), fragment)


def test_main_returns_2_for_missing_model_dir(tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    path.write_text(f"model_name_or_path: {tmp_path / 'no-model'}\n", encoding="utf-8")
    assert main(["chat", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ktchat: error: model_name_or_path: ")


def test_os_error_is_one_line_naming_the_path(tmp_path, capsys):
    """An OSError (here: the demo folder under a regular file) leaves as `PATH: strerror`, as the shell says it."""
    blocker = tmp_path / "a-file"
    blocker.write_text("", encoding="utf-8")
    assert main(["demo", "--cache", str(blocker / "demo")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ktchat: error: {blocker / 'demo'}: Not a directory"], err


def write_chat_config(tmp_path, tiny) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({
        "model_name_or_path": str(tiny.model), "adapter_name_or_path": str(tiny.adapter), "template": "default",
        "infer_backend": "huggingface", "use_kt": True, "experts_backend": "torch", "do_sample": False,
        "max_new_tokens": 40, "lora_rank": 8, "stage": "sft",
    }), encoding="utf-8")
    return path


def test_chat_answers_trained_questions(tmp_path, tiny):
    from ktchat.tinymodels import TRAINED_QA

    (q1, a1), (q2, a2), (q3, a3) = TRAINED_QA
    result = run("chat", str(write_chat_config(tmp_path, tiny)), stdin=f"{q1}\n{q2}\nclear\n{q3}\nexit\n")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith(WELCOME)
    assert out.count("User: ") == 5 and out.count("Assistant: ") == 3
    for answer in (a1, a2, a3):
        assert answer in out, out
    assert out.index(a2) < out.index("History has been removed.") < out.index(a3)
    assert "ignored: lora_rank (taken from the adapter's own config)" in result.stderr
    assert "template: default needs LLaMA-Factory, which is not installed" in result.stderr


def test_chat_on_the_qwen3_5_vlm_checkpoint_with_a_kt_fused_adapter(tmp_path, tiny_family):
    """The checkpoint Qwen ships (Qwen3_5MoeForConditionalGeneration) with its adapter converted to KT's fused
    layout by `ktchat convert`: text chat answers the trained questions and says the vision tower is out."""
    from ktchat.tinymodels import TRAINED_QA

    paths = tiny_family("qwen3_5_moe")
    fused = tmp_path / "kt-fused"
    converted = run("convert", str(paths.adapter), str(fused), "--to", "kt")
    assert converted.returncode == 0, converted.stderr
    assert (fused / "fused_expert_lora.safetensors").is_file()
    cfg = write_chat_config(tmp_path, dataclasses.replace(paths, adapter=fused))
    result = run("chat", str(cfg), stdin="".join(f"{q}\n" for q, _ in TRAINED_QA) + "exit\n")
    assert result.returncode == 0, result.stderr
    for _, answer in TRAINED_QA:
        assert answer in result.stdout, result.stdout
    assert "vision modules, not allocated for text chat" in result.stderr


def test_chat_exits_0_at_end_of_input(tmp_path, tiny):
    result = run("chat", str(write_chat_config(tmp_path, tiny)), stdin="")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(WELCOME) and "User: " in result.stdout


def test_demo_reuses_cache_and_answers(tiny):
    from ktchat.tinymodels import TRAINED_QA

    question, answer = TRAINED_QA[0]
    result = run("demo", "--cache", str(tiny.root), stdin=f"{question}\nexit\n")
    assert result.returncode == 0, result.stderr
    for q, _ in TRAINED_QA:
        assert q in result.stdout
    assert answer in result.stdout.split(WELCOME, 1)[1]
    demo = yaml.safe_load((tiny.root / "demo.yaml").read_text())
    assert demo["use_kt"] is True and "template" not in demo and demo["max_new_tokens"] == 64


SLOW_ENGINE_SCRIPT = """
import sys, time
from ktchat.engine import sequence

ended = sequence.Sequence.end
def end(self, *args, **kwargs):
    ended(self, *args, **kwargs)
    time.sleep(3)  # the chat has its reply and reads `exit` while the engine's step is still returning
    print("ENGINE STEP RETURNED", file=sys.stderr, flush=True)
sequence.Sequence.end = end
from ktchat.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_the_exit_waits_for_the_engine_thread(tiny):
    """The chat exits as soon as a reply ended, while the engine's worker still returns from its step and frees
    its tensors. The interpreter finalizing under a daemon thread inside torch aborted the process ("terminate called
    without an active exception"; engine.generator._close_at_exit); the exit waits for the worker."""
    from ktchat.tinymodels import TRAINED_QA

    result = subprocess.run([sys.executable, "-c", SLOW_ENGINE_SCRIPT, "demo", "--cache", str(tiny.root)],
                            input=f"{TRAINED_QA[0][0]}\nexit\n", capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("ENGINE STEP RETURNED") == 1, result.stderr


def test_chat_session_keeps_history_and_reraises(tiny):
    """ChatSession in-process: history grows by turn, clear empties it, generate's errors reach the caller."""
    from ktchat.generate import ChatSession, Prompts
    from ktchat.model import load_model
    from ktchat.tinymodels import TRAINED_QA

    model, tokenizer = load_model(tiny.model, tiny.adapter, experts_backend="torch", device="cpu")
    session = ChatSession(model, tokenizer, GenerationArgs(do_sample=False, max_new_tokens=40), Prompts(model, tokenizer))
    (q1, a1), (q2, a2), _ = TRAINED_QA
    pieces = list(session.stream(q1))
    assert len(pieces) > 1 and a1 in "".join(pieces)
    assert a2 in session.reply(q2)
    assert [m["role"] for m in session.history] == ["user", "assistant"] * 2
    assert session.history[1]["content"] == "".join(pieces)
    session.clear()
    assert session.history == []
    def fails(ids, scores):
        raise ValueError("a logits processor that fails")

    session._params = dataclasses.replace(session._params, processors=(fails,))
    with pytest.raises(ValueError, match="a logits processor that fails"):
        session.reply(q1)
    assert session.history == []
