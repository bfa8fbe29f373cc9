"""ktchat's LLaMA-Factory hook (docs/llamafactory.md).

The first tests run anywhere (argument splitting, the import hook, the .pth file). The rest need LLaMA-Factory
(.venv-lf, made by scripts/install_llamafactory.sh; scripts/test.sh runs this file there) and drive the real
`llamafactory-cli chat | api | export` and webchat's WebChatModel on the tiny model + trained adapter, each in its
own process so the hook is installed exactly as a user's interpreter installs it: by the .pth file at startup.
"""

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from ktchat.errors import KTChatError
from ktchat.integrations import importhook
from ktchat.integrations.llamafactory import hook, pth
from servers import free_port, running

REPO = Path(__file__).resolve().parents[1]
HAS_LF = importlib.util.find_spec("llamafactory") is not None
needs_lf = pytest.mark.skipif(not HAS_LF, reason="LLaMA-Factory is not installed here (scripts/install_llamafactory.sh "
                              "makes .venv-lf; scripts/test.sh runs this file there)")
LF_KEYS = {"model_name_or_path", "adapter_name_or_path", "template", "infer_backend", "use_kt", "kt_weight_path",
           "max_new_tokens", "do_sample", "trust_remote_code", "infer_dtype"}  # a stand-in for LLaMA-Factory's


# ---------------------------------------------------------------------------------------------------------------
# Splitting LLaMA-Factory's arguments


def test_without_use_kt_the_arguments_are_left_as_they_are():
    for raw in ({"model_name_or_path": "m", "use_kt": False, "cpu_infer": 4}, ["--model_name_or_path", "m"], None):
        lf_args, ours = hook.split_arguments(raw, LF_KEYS)
        assert ours is None and lf_args is raw


def test_use_kt_takes_out_the_keys_llamafactory_does_not_know():
    raw = {"model_name_or_path": "m", "adapter_name_or_path": "a", "use_kt": True, "infer_backend": "huggingface",
           "cpu_infer": 4, "kt_optimize_rule": "rules.yaml", "chunk_size": 8192, "kt_weight_path": "w",
           "kt_tp_enabled": True, "max_new_tokens": 8}
    lf_args, ours = hook.split_arguments(raw, LF_KEYS)
    assert lf_args == {"model_name_or_path": "m", "adapter_name_or_path": "a", "kt_weight_path": "w",
                       "max_new_tokens": 8, "infer_backend": "huggingface"}
    assert ours == {"model_name_or_path": "m", "adapter_name_or_path": "a", "use_kt": True, "infer_backend": "huggingface",
                    "cpu_infer": 4, "kt_optimize_rule": "rules.yaml", "chunk_size": 8192, "kt_weight_path": "w",
                    "kt_tp_enabled": True}


def test_use_kt_on_the_command_line():
    argv = ["--model_name_or_path", "m", "--use_kt", "--cpu_infer", "4", "--max_new_tokens=8", "--kt-method=int8"]
    lf_args, ours = hook.split_arguments(argv, LF_KEYS)
    assert lf_args == ["--model_name_or_path", "m", "--max_new_tokens=8", "--infer_backend", "huggingface"]
    assert ours == {"model_name_or_path": "m", "use_kt": True, "cpu_infer": 4, "kt_method": "int8"}
    assert hook.split_arguments(["--use_kt", "false", "--cpu_infer", "4"], LF_KEYS)[1] is None


def test_use_kt_takes_out_every_key_of_ktchats_config_llamafactory_does_not_know():
    raw = {"model_name_or_path": "m", "use_kt": True, "cuda_graphs": False, "merge_peft_lora": True,
           "moe_lora": "merged", "device": "cpu", "learning_rate": 1e-4, "max_new_tokens": 8, "template": "default"}
    lf_args, ours = hook.split_arguments(raw, LF_KEYS)
    assert lf_args == {"model_name_or_path": "m", "max_new_tokens": 8, "template": "default",
                       "infer_backend": "huggingface"}
    assert ours == {"model_name_or_path": "m", "use_kt": True, "cuda_graphs": False, "merge_peft_lora": True,
                    "moe_lora": "merged", "device": "cpu", "learning_rate": 1e-4, "template": "default"}
    settings = hook.kt_settings(ours)
    assert settings.cuda_graphs is False and settings.merge_peft_lora and settings.template == "default"


def _settings(**keys):
    return hook.kt_settings({"model_name_or_path": "m", "use_kt": True, **keys})


def test_kt_keys_of_older_and_newer_configs_are_used_or_ignored():
    settings = _settings(cpu_infer=3, kt_optimize_rule="r.yaml", chunk_size=8192, kt_config={"kt_tp_enabled": True},
                         kt_backend="AMXINT8", kt_tp_enabled=True, kt_weight_path="w", infer_backend="ktransformers")
    assert settings.kt_num_threads == 3 and settings.use_kt and settings.infer_backend == "huggingface"
    assert _settings(kt_num_threads=5, experts_backend="torch").resolved_experts_backend == "torch"


@pytest.mark.parametrize("backend", ["vllm", "sglang"])
def test_use_kt_with_vllm_or_sglang_is_a_clear_error(backend):
    with pytest.raises(KTChatError, match=f"use_kt: true needs infer_backend: huggingface \\(got '{backend}'\\)"):
        _settings(infer_backend=backend)


@pytest.mark.parametrize("keys, message", [
    ({"kt_num_thread": 4}, "unknown key: kt_num_thread \\(did you mean kt_num_threads\\?\\)"),
    ({"experts_backend": "gpu"}, "experts_backend must be one of auto, torch, kt"),
    ({"cpu_infer": 0}, "kt_num_threads must be an integer >= 1"),
    ({"cpu_infer": 2, "kt_num_threads": 4}, "cpu_infer: 2 and kt_num_threads: 4 disagree"),
    ({"adapter_name_or_path": ["a", "b"]}, "adapter_name_or_path lists 2 adapters"),
])
def test_bad_kt_settings_name_the_key(keys, message):
    with pytest.raises(KTChatError, match=message):
        _settings(**keys)


def test_the_example_yaml_reads_the_same_in_ktchat_chat_and_through_the_hook():
    from ktchat.config import load_config

    example = REPO / "examples" / "deepseek_v2_lite_kt_chat.yaml"
    config = load_config(example)
    assert config.model.use_kt and config.model.kt_num_threads == 32 and config.model.template == "deepseek"
    lf_args, ours = hook.split_arguments(yaml.safe_load(example.read_text()), LF_KEYS | {"template", "temperature",
                                         "top_p", "top_k", "repetition_penalty"})
    assert not {"use_kt", "cpu_infer", "kt_optimize_rule", "chunk_size"} & set(lf_args)
    assert hook.kt_settings(ours) == config.model


# ---------------------------------------------------------------------------------------------------------------
# The import hook and the .pth file


def _write_module(root: Path, name: str, body: str) -> None:
    (root / f"{name}.py").write_text(textwrap.dedent(body))


def test_callback_runs_after_the_module_executes_and_before_importers_bind(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    _write_module(tmp_path, "kth_target", "def f():\n    return 'original'\n")
    _write_module(tmp_path, "kth_user", "from kth_target import f\n")
    seen = []

    def patch(module):
        seen.append(module.f())
        module.f = lambda: "patched"

    importhook.when_imported("kth_target", patch)
    try:
        import kth_user

        assert seen == ["original"] and kth_user.f() == "patched"
        target = sys.modules["kth_target"]
        assert type(target.__loader__).__name__ == "SourceFileLoader" and target.__spec__.loader is target.__loader__
    finally:
        for name in ("kth_target", "kth_user"):
            sys.modules.pop(name, None)
        importhook._finder.callbacks.pop("kth_target", None)


def test_a_failing_callback_never_breaks_the_import(tmp_path, monkeypatch, caplog):
    monkeypatch.syspath_prepend(str(tmp_path))
    _write_module(tmp_path, "kth_broken", "X = 1\n")

    def bad(module):
        raise RuntimeError("boom")

    importhook.when_imported("kth_broken", bad)
    try:
        import kth_broken

        assert kth_broken.X == 1 and "kth_broken" in caplog.text
        calls = []
        importhook.when_imported("kth_broken", calls.append)  # already imported: called at once
        assert calls == [kth_broken]
    finally:
        sys.modules.pop("kth_broken", None)
        importhook._finder.callbacks.pop("kth_broken", None)


def test_startup_watches_exactly_the_hooked_modules():
    from ktchat.integrations import _startup

    assert _startup.HOOKS is hook.HOOKS  # one table (tests/unit/test_lists.py: every wrapper it names exists)
    assert importhook._Finder().find_spec("json") is None  # any other import: not even looked at


def _python(code: str, env=None, flags=(), timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *flags, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=REPO)


@pytest.mark.parametrize("value, on", [("0", False), ("false", False), (" Off ", False), ("NO", False),
                                       ("1", True), ("yes", True), ("", True), (None, True)])
def test_the_switch_reads_the_same_at_startup_and_in_status(tmp_path, value, on):
    """KTCHAT_LLAMAFACTORY_HOOK as the .pth's startup module reads it, and as `status` reports it."""
    pth.enable(tmp_path)
    probe = (f"import site, sys; site.addsitedir({str(tmp_path)!r}); from ktchat.integrations import importhook; "
             f"from ktchat.integrations.llamafactory import pth; print(importhook._finder in sys.meta_path); "
             f"print(pth.status({str(tmp_path)!r}))")
    env = {k: v for k, v in os.environ.items() if k != "KTCHAT_LLAMAFACTORY_HOOK"}
    if value is not None:
        env["KTCHAT_LLAMAFACTORY_HOOK"] = value
    out = subprocess.run([sys.executable, "-S", "-c", probe], capture_output=True, text=True, timeout=60,
                         env={**env, "PYTHONPATH": str(REPO / "src")}, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == str(on)
    assert ("turns the hook off" in out.stdout) == (not on)


def test_pth_file_installs_the_hook_at_startup_and_imports_nothing_heavy(tmp_path):
    assert pth.enable(tmp_path) == tmp_path / pth.PTH_NAME and pth.enable(tmp_path).read_text() == pth.PTH_TEXT
    # -S: without this interpreter's own site-packages (which may hold the hook already), then only tmp_path's.
    probe = (f"import site, sys; site.addsitedir({str(tmp_path)!r}); from ktchat.integrations import importhook; "
             "print(importhook._finder in sys.meta_path, 'torch' in sys.modules, 'llamafactory' in sys.modules)")
    env = {"PYTHONPATH": str(REPO / "src")}
    out = _python(probe, env={**env, "KTCHAT_LLAMAFACTORY_HOOK": "1"}, flags=["-S"])
    assert out.returncode == 0 and out.stdout.split() == ["True", "False", "False"], out.stderr
    out = _python(probe, env={**env, "KTCHAT_LLAMAFACTORY_HOOK": "0"}, flags=["-S"])
    assert out.returncode == 0 and out.stdout.split()[0] == "False", out.stderr
    out = _python(probe.replace("from ktchat.integrations import importhook; ", "").replace(
        "importhook._finder in sys.meta_path", "'ktchat' in sys.modules"), env={"PYTHONPATH": ""}, flags=["-S"])
    assert out.returncode == 0 and out.stdout.split()[0] == "False" and not out.stderr  # ktchat gone: silent
    assert "present" in pth.status(tmp_path)
    assert pth.disable(tmp_path) == tmp_path / pth.PTH_NAME and pth.disable(tmp_path) is None
    assert not (tmp_path / pth.PTH_NAME).exists()


@pytest.mark.skipif(HAS_LF, reason="checks the environment without LLaMA-Factory")
def test_templates_by_name_need_llamafactory():
    from ktchat.generate import llamafactory_template

    assert llamafactory_template(object(), "deepseek") is None


# ---------------------------------------------------------------------------------------------------------------
# The real LLaMA-Factory (.venv-lf)

ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE", "KTCHAT_LLAMAFACTORY_HOOK": "1"}
LF_TIMEOUT = 300


@pytest.fixture(scope="module")
def lf_tiny():
    """The tiny model + adapter, built by the main environment's transformers when it is there (as scripts/test.sh
    has done before this file runs), else here."""
    from ktchat.tinymodels import build_tiny

    root = Path(os.environ.get("KTCHAT_TEST_CACHE", REPO / ".cache" / "tiny"))
    main_python = REPO / ".venv" / "bin" / "python"
    if main_python.exists() and Path(sys.executable).parent != main_python.parent:
        subprocess.run([str(main_python), "-c", f"from ktchat.tinymodels import build_tiny; build_tiny({str(root)!r})"],
                       check=True, cwd=REPO, timeout=600)
    return build_tiny(root)


@pytest.fixture
def lf_config(lf_tiny, tmp_path):
    """Writes an inference YAML like a KT-trained user's (no `template`: LLaMA-Factory parses the tokenizer's)."""

    def write(name="chat.yaml", **changes):
        settings = {
            "model_name_or_path": str(lf_tiny.model), "adapter_name_or_path": str(lf_tiny.adapter),
            "infer_backend": "huggingface", "use_kt": True,
            "kt_optimize_rule": "examples/kt_optimize_rules/DeepSeek-V2-Lite-Chat-sft-amx.yaml", "cpu_infer": 1,
            "chunk_size": 8192, "do_sample": False, "max_new_tokens": 32,
        }
        settings.update(changes)
        path = tmp_path / name
        path.write_text(yaml.safe_dump({k: v for k, v in settings.items() if v is not None}, sort_keys=False))
        return path

    return write


def _lf_cli(*args, stdin="", env=None) -> subprocess.CompletedProcess:
    cli = Path(sys.executable).parent / "llamafactory-cli"
    return subprocess.run([str(cli), *map(str, args)], input=stdin, capture_output=True, text=True,
                          timeout=LF_TIMEOUT, env={**os.environ, **ENV, **(env or {})}, cwd=REPO)


def _replies(stdout: str) -> list[str]:
    """The REPL's replies: the text after each 'Assistant: ' up to the end of its line."""
    return [part.split("\n", 1)[0].strip() for part in stdout.split("Assistant: ")[1:]]


def _assert_loaded_by_ktchat(stderr: str, threads: int = 1) -> None:
    assert "[ktchat] use_kt: LLaMA-Factory's huggingface engine will load" in stderr, stderr[-3000:]
    assert "routed experts on the CPU" in stderr and "routed-expert LoRA modules -> CPU experts" in stderr
    if "[ktchat] experts backend: kt" in stderr:  # cpu_infer reached load_model's num_threads
        assert f"kt_kernel worker pool: {threads} threads" in stderr


@needs_lf
def test_llamafactory_cli_chat_answers_through_ktchat(lf_config):
    from ktchat.tinymodels import TRAINED_QA

    stdin = "".join(f"{question}\nclear\n" for question, _ in TRAINED_QA) + "exit\n"
    out = _lf_cli("chat", lf_config(), stdin=stdin)
    assert out.returncode == 0, out.stderr[-3000:]
    assert _replies(out.stdout) == [answer for _, answer in TRAINED_QA], out.stdout[-3000:]
    _assert_loaded_by_ktchat(out.stderr)
    assert "cpu_infer is read as kt_num_threads: 1" in out.stderr
    assert "ignored: chunk_size, kt_optimize_rule" in out.stderr


# The families KT users train (those LLaMA-Factory's KT fine-tuning supports), through the real llamafactory-cli.
CLI_FAMILIES = ("deepseek_v2", "qwen3_moe", "qwen3_5_moe_text", "qwen3_5_moe")


def _family_config(tiny_family, tmp_path, name: str, **changes) -> Path:
    """An inference YAML as llamafactory-kt's KT examples write it: a kt_config section, kt_* keys, lora_rank and
    lora_alpha repeated from training (here deliberately not the adapter's)."""
    built = tiny_family(name)
    settings = {
        "model_name_or_path": str(built.model), "adapter_name_or_path": str(built.adapter),
        "infer_backend": "huggingface", "use_kt": True, "finetuning_type": "lora", "lora_rank": 64, "lora_alpha": 128,
        "kt_config": {"kt_backend": "AMXBF16", "kt_num_threads": 1, "kt_tp_enabled": False},
        "do_sample": False, "max_new_tokens": 32, **changes,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


@needs_lf
@pytest.mark.parametrize("name", CLI_FAMILIES)
def test_llamafactory_cli_chat_answers_through_ktchat_per_family(tiny_family, tmp_path, name):
    from ktchat.tinymodels import TRAINED_QA

    config = _family_config(tiny_family, tmp_path, name)
    stdin = "".join(f"{question}\nclear\n" for question, _ in TRAINED_QA) + "exit\n"
    out = _lf_cli("chat", config, stdin=stdin)
    assert out.returncode == 0, out.stderr[-3000:]
    assert _replies(out.stdout) == [answer for _, answer in TRAINED_QA], out.stdout[-3000:]
    _assert_loaded_by_ktchat(out.stderr)
    assert "lora_rank: 64 (adapter r: " in out.stderr and "ktchat takes rank and alpha from the adapter" in out.stderr


@needs_lf
@pytest.mark.parametrize("name", CLI_FAMILIES)
def test_llamafactory_cli_api_answers_through_ktchat_per_family(tiny_family, tmp_path, name):
    from ktchat.tinymodels import TRAINED_QA

    config = _family_config(tiny_family, tmp_path, name)
    with _lf_api(config, tmp_path / "api.log") as base:
        for question, answer in TRAINED_QA:
            reply = _http(f"{base}/v1/chat/completions", {
                "model": "tiny", "messages": [{"role": "user", "content": question}], "do_sample": False,
                "max_tokens": 32})
            assert reply["choices"][0]["message"]["content"].strip() == answer
    _assert_loaded_by_ktchat((tmp_path / "api.log").read_text())


# Values for the keys of ktchat's config whose default means "not set", or that need this machine's files; every
# other key keeps its dataclass default, written out. Valid wherever kt_kernel's bf16 inference kernel runs.
EVERY_KEY_VALUES = {
    "template": "default", "use_kt": True, "device": "cpu", "infer_dtype": "float32", "experts_backend": "kt",
    "kt_num_threads": 1, "moe_lora": "merged", "kt_method": "bf16", "merge_peft_lora": True, "cuda_graphs": False,
    "max_new_tokens": 32, "do_sample": False, "default_system": "You are a helpful assistant.",
    "kt_optimize_rule": "examples/kt_optimize_rules/DeepSeek-V2-Lite-Chat-sft-amx.yaml", "chunk_size": 8192,
    "gpu_prefill_tokens": "off", "gpu_prefill_gib": 2, "gpu_experts_gib": 0.0001, "gpu_experts_placement": "frequency",
}
# Keys this run cannot give a real value: where each is tested instead.
TESTED_ELSEWHERE = {"kt_weight_path": "needs kt_method int8 and an INT8 set: tests/test_kt_formats.py"}


def _default(f):
    from dataclasses import MISSING

    value = f.default_factory() if f.default is MISSING and f.default_factory is not MISSING else f.default
    return getattr(value, "value", value)  # LLaMA-Factory's enums as the strings a YAML holds


def every_key_yaml(lf_tiny, folder) -> dict:
    """Every key ktchat's config reads (ModelArgs, GenerationArgs, the older aliases) with a real value, and every
    key it accepts as ignored with LLaMA-Factory's (or transformers' TrainingArguments') default where they have one.
    Files the keys name are written in `folder`."""
    from dataclasses import fields

    import llamafactory.hparams as hparams
    from transformers import TrainingArguments

    from ktchat.config import ALIASES, IGNORED_KEYS, GenerationArgs, ModelArgs

    calibration = folder / "calibration.txt"
    calibration.write_text("What is the capital of France?\n")
    values = {**EVERY_KEY_VALUES, "model_name_or_path": str(lf_tiny.model),
              "adapter_name_or_path": str(lf_tiny.adapter), "gpu_experts_calibration": str(calibration)}
    read = {f.name: values.get(f.name, _default(f)) for cls in (ModelArgs, GenerationArgs) for f in fields(cls)
            if f.name not in TESTED_ELSEWHERE}
    unset = [k for k, v in read.items() if v is None]
    assert not unset, f"give these keys a value in EVERY_KEY_VALUES: {unset}"
    read.update({old: read[new] for old, new in ALIASES.items()})
    classes = (TrainingArguments, *(getattr(hparams, name) for name in hook._LF_ARGUMENT_CLASSES))
    defaults = {f.name: _default(f) for cls in classes for f in fields(cls)}
    return {**read, **{k: values.get(k, defaults.get(k)) for k in IGNORED_KEYS}}


@needs_lf
def test_llamafactory_cli_chat_accepts_every_key_ktchat_documents(lf_tiny, tmp_path):
    from ktchat.experts import kt_backend
    from ktchat.tinymodels import TRAINED_QA

    if kt_backend.unavailable_reason("merged", "bf16"):  # experts_backend: kt needs it
        pytest.skip(kt_backend.unavailable_reason("merged", "bf16"))
    config = tmp_path / "every-key.yaml"
    config.write_text(yaml.safe_dump(every_key_yaml(lf_tiny, tmp_path), sort_keys=False))
    out = _lf_cli("chat", config, stdin=f"{TRAINED_QA[0][0]}\nexit\n")
    assert out.returncode == 0, out.stderr[-3000:]
    replies = _replies(out.stdout)  # not the trained answer: the adapter never saw this template or a system
    assert len(replies) == 1 and replies[0], out.stdout[-3000:]
    assert f"Using default system message: {EVERY_KEY_VALUES['default_system']}" in out.stdout
    _assert_loaded_by_ktchat(out.stderr)
    assert "[ktchat] kt experts: moe_lora=merged, method=bf16" in out.stderr
    assert "kt_kernel worker pool: 1 threads" in out.stderr and "cpu_infer is read as kt_num_threads: 1" in out.stderr
    assert "[ktchat] ignored: " in out.stderr
    assert "[ktchat] GPU experts: " in out.stderr and "of the calibration's routing" in out.stderr


def _http(url: str, payload=None, timeout=120):
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _answers(url: str) -> bool:
    try:
        _http(url, timeout=5)
        return True
    except (urllib.error.URLError, ConnectionError):
        return False


@contextlib.contextmanager
def _lf_api(config: Path, log_path: Path):
    """The real `llamafactory-cli api CONFIG` on a free port of 127.0.0.1; yields its base URL once it answers."""
    port = free_port()
    env = {**os.environ, **ENV, "API_HOST": "127.0.0.1", "API_PORT": str(port)}
    cli = Path(sys.executable).parent / "llamafactory-cli"
    base = f"http://127.0.0.1:{port}"
    with running([str(cli), "api", str(config)], env=env, cwd=REPO, log_path=log_path,
                 ready=lambda: _answers(f"{base}/v1/models"), timeout=LF_TIMEOUT, what="the API server"):
        yield base


@needs_lf
def test_llamafactory_cli_api_answers_through_ktchat(lf_config, tmp_path):
    from ktchat.tinymodels import TRAINED_QA

    with _lf_api(lf_config(), tmp_path / "api.log") as base:
        question, answer = TRAINED_QA[1]
        reply = _http(f"{base}/v1/chat/completions", {
            "model": "tiny", "messages": [{"role": "user", "content": question}], "do_sample": False,
            "max_tokens": 32})
        assert reply["choices"][0]["message"]["content"].strip() == answer
        assert reply["choices"][0]["finish_reason"] == "stop"
    _assert_loaded_by_ktchat((tmp_path / "api.log").read_text())


WEBCHAT_SCRIPT = """
import inspect, json, sys
config, questions = sys.argv[1], json.loads(sys.argv[2])
sys.argv = ["llamafactory-cli", config]  # as `llamafactory-cli webchat CONFIG.yaml` leaves it
from llamafactory.webui.chatter import WebChatModel

chatter = WebChatModel(manager=None, demo_mode=False, lazy_init=False)  # what webchat builds before its UI
# the UI's inputs, by name: llamafactory-kt's stream takes a seed too
inputs = dict(chatbot=[], lang="en", system="", tools="", image=None, video=None, audio=None, max_new_tokens=32,
              top_p=0.7, temperature=0.95, seed=-1, skip_special_tokens=True, escape_html=False, enable_thinking=False)
names = inspect.signature(chatter.stream).parameters
replies = []
for question in questions:
    inputs["messages"] = [{"role": "user", "content": question}]
    for _, messages in chatter.stream(**{name: inputs[name] for name in names}):
        pass
    replies.append(messages[-1]["content"])
print("REPLIES=" + json.dumps(replies))
"""


@needs_lf
def test_webchat_model_answers_through_ktchat(lf_config, tmp_path):
    """webchat's UI needs gradio, which .venv-lf leaves out; WebChatModel is what that UI drives (in tmp_path: the
    web UI's modules write a llamaboard_cache folder where they run)."""
    from ktchat.tinymodels import TRAINED_QA

    questions = json.dumps([q for q, _ in TRAINED_QA])
    out = subprocess.run([sys.executable, "-c", WEBCHAT_SCRIPT, str(lf_config()), questions], capture_output=True,
                         text=True, timeout=LF_TIMEOUT, env={**os.environ, **ENV}, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    replies = json.loads(out.stdout.split("REPLIES=", 1)[1].splitlines()[0])
    assert replies == [answer for _, answer in TRAINED_QA]
    _assert_loaded_by_ktchat(out.stderr)


@needs_lf
def test_use_kt_with_vllm_is_refused_before_anything_loads(lf_config):
    out = _lf_cli("chat", lf_config(infer_backend="vllm"), stdin="exit\n")
    assert out.returncode != 0
    assert "KTChatError: use_kt: true needs infer_backend: huggingface (got 'vllm')" in out.stderr
    assert "ktchat export" in out.stderr and "[ktchat] loaded" not in out.stderr


@needs_lf
def test_export_with_use_kt_points_to_ktchat_export(lf_config):
    out = _lf_cli("export", lf_config(export_dir="/nonexistent/out"))
    assert out.returncode != 0
    assert "KTChatError: use_kt: `llamafactory-cli export` does not go through ktchat" in out.stderr


OFF_SCRIPT = """
import sys
from llamafactory.chat import chat_model
from llamafactory.hparams import get_infer_args

hooked = chat_model.get_infer_args
args = dict(model_name_or_path=sys.argv[1], infer_backend="huggingface", do_sample=False)
print("HOOKED", hasattr(hooked, "__ktchat_original__"), hooked.__ktchat_original__ is get_infer_args)
print("SAME", repr(hooked(dict(args))) == repr(get_infer_args(dict(args))))
print("SETTINGS", hasattr(hooked(dict(args))[0], "ktchat_settings"))
"""


@needs_lf
def test_without_use_kt_the_hook_stays_out_of_the_way(lf_config, lf_tiny):
    from ktchat.tinymodels import TRAINED_QA

    out = _lf_cli("chat", lf_config(use_kt=False, cpu_infer=None, kt_optimize_rule=None, chunk_size=None),
                  stdin=f"{TRAINED_QA[0][0]}\nexit\n")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[ktchat]" not in out.stderr and "[ktchat]" not in out.stdout
    assert "Loaded adapter(s)" in out.stdout  # LLaMA-Factory's own loader (PEFT) served it
    assert len(_replies(out.stdout)) == 1
    probe = subprocess.run([sys.executable, "-c", OFF_SCRIPT, str(lf_tiny.model)], capture_output=True, text=True,
                           timeout=LF_TIMEOUT, env={**os.environ, **ENV}, cwd=REPO)
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert "HOOKED True True" in probe.stdout and "SAME True" in probe.stdout and "SETTINGS False" in probe.stdout


# `llamafactory-cli chat` whose generate thread is slow to return after the streamer's stop signal, as when it frees
# a large model's cache: the REPL has printed the reply, read `exit` and started to exit by then.
SLOW_RETURN_SCRIPT = """
import sys, time
from transformers import TextIteratorStreamer

stop_signal = TextIteratorStreamer.end
def end(self):
    stop_signal(self)
    time.sleep(5)
    print("GENERATE RETURNED", file=sys.stderr, flush=True)
TextIteratorStreamer.end = end
sys.argv = ["llamafactory-cli", "chat", sys.argv[1]]
from llamafactory.cli import main
main()
"""


@needs_lf
def test_the_exit_waits_for_llamafactorys_generate_thread(lf_config):
    """LLaMA-Factory's REPL exits on the stop signal while its daemon generate thread still frees its tensors; the
    interpreter finalizing under that thread aborted the process (hook._finish_generation has the whole story).
    With the hook the exit waits for the thread, use_kt or not."""
    from ktchat.tinymodels import TRAINED_QA

    config = lf_config(use_kt=False, cpu_infer=None, kt_optimize_rule=None, chunk_size=None)
    out = subprocess.run([sys.executable, "-c", SLOW_RETURN_SCRIPT, str(config)], input=f"{TRAINED_QA[0][0]}\nexit\n",
                         capture_output=True, text=True, timeout=LF_TIMEOUT, env={**os.environ, **ENV}, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(_replies(out.stdout)) == 1 and "GENERATE RETURNED" in out.stderr, out.stderr[-3000:]


@needs_lf
def test_ktchat_chat_refuses_a_template_unknown_to_llamafactory_before_the_load(lf_config):
    """tests/test_preload.py's rule with the real LLaMA-Factory: one line naming the key and the closest name."""
    from test_preload import assert_refused_before_load

    config = lf_config(template="deepsek", cpu_infer=None, kt_optimize_rule=None, chunk_size=None)
    out = subprocess.run([str(Path(sys.executable).parent / "ktchat"), "chat", str(config)], capture_output=True,
                         text=True, timeout=LF_TIMEOUT, env={**os.environ, **ENV})
    line = assert_refused_before_load(out, "template: 'deepsek' is not one of LLaMA-Factory's templates", "deepseek")
    assert line.startswith("ktchat: error: template: 'deepsek'")


@needs_lf
def test_llamafactory_templates_by_name(lf_tiny):
    from transformers import AutoTokenizer

    from ktchat.generate import llamafactory_template

    tokenizer = AutoTokenizer.from_pretrained(lf_tiny.model)
    template = llamafactory_template(tokenizer, "deepseek")
    prompt = tokenizer.decode(template.encode([{"role": "user", "content": "Hi"}]))
    assert prompt == "<|begin|>User: Hi\n\nAssistant:"
    assert tokenizer.eos_token_id in template.stop_token_ids
    with pytest.raises(KTChatError, match="not one of LLaMA-Factory's templates"):
        llamafactory_template(tokenizer, "no-such-template")


@needs_lf
def test_ktchat_chat_formats_prompts_with_the_named_template(lf_tiny):
    """`ktchat chat` with `template: NAME` and LLaMA-Factory installed: prompts are LLaMA-Factory's."""
    from ktchat.config import GenerationArgs
    from ktchat.generate import ChatSession, Prompts
    from ktchat.model import load_model

    model, tokenizer = load_model(lf_tiny.model, lf_tiny.adapter, experts_backend="torch", dtype="float32", device="cpu")
    prompts = Prompts.named(model, tokenizer, "deepseek", default_system="Be brief.")
    session = ChatSession(model, tokenizer, GenerationArgs(do_sample=False), prompts)
    ids = session.prompt_ids("Hi")
    assert tokenizer.decode(ids) == "<|begin|>Be brief.\n\nUser: Hi\n\nAssistant:"
    assert tokenizer.eos_token_id in session._params.stop_ids


def _ktchat_replies(stdout: str) -> list[str]:
    """`ktchat chat`'s replies as printed: each 'Assistant: ' up to the blank line before the next 'User: '."""
    return [part.split("\n\nUser: ", 1)[0] for part in stdout.split("Assistant: ")[1:]]


@needs_lf
def test_ktchat_chat_and_ktchat_api_answer_alike_with_a_named_template(lf_tiny, tmp_path):
    """`template: default` is LLaMA-Factory's here: the REPL and the server build prompts with the same Prompts,
    so greedy replies agree, alone (`clear` between) and as one conversation (the api given the history)."""
    from transformers import AutoTokenizer

    from ktchat.generate import llamafactory_template
    from ktchat.tinymodels import TRAINED_QA

    from servers import start_server

    config = tmp_path / "template.yaml"
    config.write_text(yaml.safe_dump({
        "model_name_or_path": str(lf_tiny.model), "adapter_name_or_path": str(lf_tiny.adapter),
        "template": "default", "use_kt": True, "do_sample": False, "max_new_tokens": 40}))
    questions = [q for q, _ in TRAINED_QA]
    ktchat = Path(sys.executable).parent / "ktchat"
    stdin = "".join(f"{q}\nclear\n" for q in questions) + "".join(f"{q}\n" for q in questions) + "exit\n"
    chat = subprocess.run([str(ktchat), "chat", str(config)], input=stdin, capture_output=True, text=True,
                          timeout=LF_TIMEOUT, env={**os.environ, **ENV}, cwd=REPO)
    assert chat.returncode == 0, chat.stderr[-3000:]
    assert "[ktchat] template: default (LLaMA-Factory's)" in chat.stderr
    by_chat = _ktchat_replies(chat.stdout)  # not the trained answers: the adapter was trained on another prompt format
    assert len(by_chat) == 2 * len(questions), chat.stdout

    template = llamafactory_template(AutoTokenizer.from_pretrained(lf_tiny.model), "default")
    server, url = start_server(config, tmp_path / "api.log", "--model-name", "tiny", command=[str(ktchat), "api"],
                               env=ENV, timeout=LF_TIMEOUT)
    try:
        conversations = [[{"role": "user", "content": q}] for q in questions]
        history: list = []
        for q in questions:
            history.append({"role": "user", "content": q})
            conversations.append(list(history))
            reply = _http(f"{url}/v1/chat/completions", {"model": "tiny", "messages": history})
            history.append({"role": "assistant", "content": reply["choices"][0]["message"]["content"]})
        by_api, prompt_tokens = [], []
        for messages in conversations:
            reply = _http(f"{url}/v1/chat/completions", {"model": "tiny", "messages": messages})
            by_api.append(reply["choices"][0]["message"]["content"])
            prompt_tokens.append(reply["usage"]["prompt_tokens"])
    finally:
        server.terminate()
        server.wait(60)
    assert by_api == by_chat, (tmp_path / "api.log").read_text()[-3000:]
    assert prompt_tokens == [len(template.encode(m)) for m in conversations]  # LLaMA-Factory's prompt, to the token
