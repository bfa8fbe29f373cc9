"""Everything that can be checked before the (slow) model load is checked before it (issue 13).

Each problem is one line, `ktchat: error: ...` naming the key or file, exit status 2, no traceback, and no model
load first. The CLI cases run the `ktchat` console script in a subprocess, as users run it; "no load first" is the
absence of load_model's `[ktchat] loaded ...` line there, and, in process, a spy on the checkpoint loader that fails
the test if any weight is read. The pure checks (adapter_config.json fields, devices) are fast unit tests.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ktchat.errors import KTChatError

KTCHAT = Path(sys.executable).parent / "ktchat"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}


def run(*args, env=None, command=KTCHAT, timeout=300):
    return subprocess.run([str(command), *map(str, args)], input="exit\n", capture_output=True, text=True,
                          env={**ENV, **(env or {})}, timeout=timeout)


def assert_refused_before_load(result, *fragments) -> str:
    """Exit 2, stderr exactly one `ktchat: error: ` line holding every fragment, no traceback, no model loaded."""
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ktchat: error: "), result.stderr
    assert "Traceback" not in result.stderr
    assert "loaded" not in result.stderr + result.stdout, result  # load_model's "[ktchat] loaded ..." line
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def write_config(tmp_path, tiny, name="cfg.yaml", **changes) -> Path:
    settings = {"model_name_or_path": str(tiny.model), "adapter_name_or_path": str(tiny.adapter), "use_kt": True,
                "experts_backend": "torch", "do_sample": False, "max_new_tokens": 4, **changes}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(settings), encoding="utf-8")
    return path


def model_with(tmp_path, tiny, name: str, text: str) -> Path:
    """The tiny model folder with one file replaced (the others linked, so the copy is instant)."""
    model = tmp_path / "model"
    model.mkdir()
    for f in tiny.model.iterdir():
        (model / f.name).symlink_to(f)
    (model / name).unlink(missing_ok=True)
    (model / name).write_text(text, encoding="utf-8")
    return model


def adapter_with(tmp_path, tiny, **changes) -> Path:
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny.adapter, adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg.update(changes)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    return adapter


@pytest.fixture
def no_weights_read(monkeypatch):
    """Fails the test the moment load_model starts reading the checkpoint."""
    import ktchat.model.loader

    def spy(*args, **kwargs):
        pytest.fail("the checkpoint was read before the error")

    monkeypatch.setattr(ktchat.model.loader, "load_checkpoint", spy)


def shim(tmp_path, files: dict[str, str]) -> dict:
    """A PYTHONPATH folder whose modules shadow installed ones, for the environment of a subprocess."""
    root = tmp_path / "shim"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return {"PYTHONPATH": os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])])}


# --- ktchat api: optional dependencies and the port --------------------------------------------------------------

@pytest.mark.parametrize("module", ["starlette", "uvicorn"])
def test_api_without_serve_extra(tmp_path, tiny, module):
    """A module on PYTHONPATH that raises what Python raises for a missing module stands in for the uninstalled
    package (PYTHONPATH comes before site-packages), so the real import machinery meets a missing dependency."""
    missing = f"raise ModuleNotFoundError(\"No module named '{module}'\", name={module!r})\n"
    result = run("api", write_config(tmp_path, tiny), env=shim(tmp_path, {f"{module}.py": missing}))
    assert_refused_before_load(result, "ktchat api needs starlette and uvicorn", f"No module named '{module}'",
                               "pip install 'ktchat[serve]'")


def test_api_port_in_use(tmp_path, tiny):
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        result = run("api", write_config(tmp_path, tiny), "--port", port)
    assert_refused_before_load(result, f"port {port} on 127.0.0.1 is already in use", "--port")


def test_api_refuses_before_reading_weights(tmp_path, tiny, no_weights_read, monkeypatch, capsys):
    """In process, with the spy: a missing starlette (None in sys.modules is Python's own way to make an import
    fail) and a port in use are both refused before load_model reads a weight."""
    pytest.importorskip("uvicorn")
    from ktchat.cli import main

    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # so main() leaves this process's environment as it is
    monkeypatch.setenv("KTCHAT_HUGE_PAGES", "0")
    config = str(write_config(tmp_path, tiny))
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        assert main(["api", config, "--port", str(held.getsockname()[1])]) == 2
    monkeypatch.setitem(sys.modules, "starlette.applications", None)
    assert main(["api", config]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and "is already in use" in errors[0] and "pip install 'ktchat[serve]'" in errors[1]


# --- template ----------------------------------------------------------------------------------------------------

def test_template_with_broken_llamafactory(tmp_path, tiny):
    """An install whose import fails (here a package that raises as a half-installed one would) is an error, not a
    silent fallback: the user asked for LLaMA-Factory's template."""
    broken = {"llamafactory/__init__.py": "raise ImportError(\"cannot import name 'x' from 'transformers'\")\n"}
    result = run("chat", write_config(tmp_path, tiny, template="deepseek"), env=shim(tmp_path, broken))
    assert_refused_before_load(result, "template: 'deepseek' needs LLaMA-Factory, whose import fails here",
                               "cannot import name 'x'")


def test_template_unknown_to_llamafactory_stand_in(tmp_path, tiny):
    """check_template reads llamafactory.data.template.TEMPLATES; a stand-in package holding just that table (the
    real LLaMA-Factory is the next test's, where .venv-lf is installed)."""
    fake = {"llamafactory/__init__.py": "", "llamafactory/data/__init__.py": "",
            "llamafactory/data/template.py": "TEMPLATES = {'default': None, 'deepseek': None, 'qwen': None}\n"}
    result = run("chat", write_config(tmp_path, tiny, template="deepsek"), env=shim(tmp_path, fake))
    assert_refused_before_load(result, "template: 'deepsek' is not one of LLaMA-Factory's templates",
                               "did you mean deepseek?")


def test_template_is_checked_before_load_model_starts(tmp_path, tiny, monkeypatch):
    import ktchat.model
    from ktchat.config import load_config
    from ktchat.generate import open_session

    root = tmp_path / "lf"
    (root / "llamafactory" / "data").mkdir(parents=True)
    for name in ("llamafactory/__init__.py", "llamafactory/data/__init__.py"):
        (root / name).write_text("", encoding="utf-8")
    (root / "llamafactory/data/template.py").write_text("TEMPLATES = {'qwen': None}\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(root))
    for name in ("llamafactory", "llamafactory.data", "llamafactory.data.template"):
        monkeypatch.setitem(sys.modules, name, None)  # undone last: the stand-in leaves sys.modules as it was
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(ktchat.model, "load_model", lambda *a, **k: pytest.fail("load_model ran before the check"))
    with pytest.raises(KTChatError, match="^template: 'qwen3' is not one of LLaMA-Factory's templates"):
        open_session(load_config(write_config(tmp_path, tiny, template="qwen3")))


def test_template_without_llamafactory_stays_a_fallback():
    """Not installed at all: no error before the load; Prompts.named logs that the tokenizer's template is used
    (tests/test_cli.py sees that line)."""
    import importlib.util

    from ktchat.generate import check_template

    if importlib.util.find_spec("llamafactory") is not None:
        pytest.skip("LLaMA-Factory is installed here")
    assert check_template("no_such_template") is False


# --- devices and cuda_graphs -------------------------------------------------------------------------------------

def _no_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the refusal on a machine without a GPU")


def test_cuda_graphs_without_a_gpu(tmp_path, tiny):
    _no_gpu()
    result = run("chat", write_config(tmp_path, tiny, cuda_graphs=True))
    assert_refused_before_load(result, "cuda_graphs: true needs every non-expert weight on one CUDA device",
                               "no CUDA device is visible")


def test_cuda_graphs_on_cpu_is_a_config_error(tmp_path, tiny):
    path = write_config(tmp_path, tiny, cuda_graphs=True, device="cpu")
    assert_refused_before_load(run("chat", path), str(path), "cuda_graphs: true needs a CUDA device, but device is cpu")


@pytest.mark.parametrize("device, fragment", [
    ("cuda:99", "device: cuda:99"),
    ("cuda", "device: cuda"),
    ("gpu0", "device must be auto, cpu, cuda or cuda:N"),
])
def test_bad_device(tmp_path, tiny, device, fragment):
    if device.startswith("cuda"):
        _no_gpu()
    line = assert_refused_before_load(run("chat", write_config(tmp_path, tiny, device=device)), fragment)
    assert device == "gpu0" or "no CUDA device is visible" in line


def test_device_checked_before_anything_is_read(tiny, no_weights_read):
    from ktchat import load_model

    _no_gpu()
    with pytest.raises(KTChatError, match=r"^device: cuda:1: no CUDA device is visible"):
        load_model(tiny.model, tiny.adapter, experts_backend="torch", device="cuda:1")
    with pytest.raises(KTChatError, match=r"^cuda_graphs: true needs every non-expert weight on one CUDA device"):
        load_model(tiny.model, tiny.adapter, experts_backend="torch", cuda_graphs=True)


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this process sees n GPUs: check_devices only asks torch.cuda how many there are."""
    import torch

    def see(n: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    return see


@pytest.mark.parametrize("n, kwargs, message", [
    (1, dict(device="cuda:3"), "device: cuda:3 is not a visible CUDA device (1 visible: cuda:0)"),
    (2, dict(device="cuda:2"), "device: cuda:2 is not a visible CUDA device (2 visible: cuda:0 to cuda:1)"),
    (0, dict(device="cuda"), "device: cuda: no CUDA device is visible"),
    (1, dict(device="mps"), "device: 'mps': only cpu and cuda devices are supported"),
    (1, dict(device="gpu:0"), "device: 'gpu:0' is not a device (use cpu, cuda, cuda:N or auto)"),
    (1, dict(device="cuda", device_map={"": "cuda"}), "give device or device_map, not both"),
    (1, dict(device_map={"model": 1}), "device_map['model']: cuda:1 is not a visible CUDA device"),
    (0, dict(cuda_graphs=True), "one CUDA device (no CUDA device is visible)"),
    (1, dict(device="cpu", cuda_graphs=True), "one CUDA device (device is cpu)"),
    (2, dict(device="auto", cuda_graphs=True), "(device: auto spreads the layers over the 2 visible GPUs)"),
    (2, dict(device_map="auto", cuda_graphs=True), "(device_map='auto' spreads them over 2 GPUs)"),
    (2, dict(device_map={"a": 0, "b": "cpu"}, cuda_graphs=True), "(device_map puts them on cpu, cuda:0)"),
    (1, dict(device_map="everywhere"), "device_map must be 'auto', 'balanced' or a dict of module -> device"),
    (0, dict(device_map="auto"), "device_map='auto' spreads layers over GPUs, but no CUDA device is visible"),
])
def test_check_devices_refuses(gpus, n, kwargs, message):
    from ktchat.model.placement import check_devices

    gpus(n)
    with pytest.raises(KTChatError) as err:
        check_devices(kwargs.get("device"), kwargs.get("device_map"), kwargs.get("cuda_graphs"))
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("n, kwargs", [
    (1, dict(device="cuda:0", cuda_graphs=True)), (1, dict(cuda_graphs=True)),
    (1, dict(device="auto", cuda_graphs=True)),
    (2, dict(device="cuda:1", cuda_graphs=True)), (2, dict(device_map={"a": 1, "b": "cuda:1"}, cuda_graphs=True)),
    (1, dict(device_map="auto", cuda_graphs=True)), (0, dict(device="cpu")), (0, dict()), (2, dict(device="auto")),
])
def test_check_devices_accepts(gpus, n, kwargs):
    from ktchat.model.placement import check_devices

    gpus(n)
    check_devices(kwargs.get("device"), kwargs.get("device_map"), kwargs.get("cuda_graphs"))


@pytest.mark.parametrize("n, kwargs, devices", [
    (2, dict(device="auto"), (None, "auto")), (1, dict(device="auto"), ("cuda", None)), (0, dict(), ("cpu", None)),
    (2, dict(device_map={"model": 1}), (None, {"model": 1})), (2, dict(device_map="balanced"), (None, "balanced")),
])
def test_check_devices_resolves_what_placement_takes(gpus, n, kwargs, devices):
    """(device, device_map), decided once: device "auto" spreads over two GPUs as device_map "auto" does."""
    import torch

    from ktchat.model.placement import check_devices

    gpus(n)
    device, device_map = check_devices(kwargs.get("device"), kwargs.get("device_map"))
    assert (device, device_map) == (devices[0] and torch.device(devices[0]), devices[1])


# --- model folder files ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, text, fragment", [
    ("generation_config.json", "{not json", "generation_config.json: not valid JSON"),
    ("generation_config.json", '{"eos_token_id": "end"}', "generation_config.json: eos_token_id must be a token id"),
    ("config.json", "{not json", "config.json: not valid JSON"),
    ("config.json", '{"model_type": "no_such_family"}', "config.json: cannot read the model config"),
    ("tokenizer.json", "{not json", "tokenizer.json: not valid JSON"),
    ("tokenizer_config.json", "[1, 2", "tokenizer_config.json: not valid JSON"),
])
def test_bad_model_file(tmp_path, tiny, name, text, fragment):
    model = model_with(tmp_path, tiny, name, text)
    line = assert_refused_before_load(run("chat", write_config(tmp_path, tiny, model_name_or_path=str(model))),
                                      fragment)
    assert str(model / name) in line


def test_bad_model_files_are_found_before_the_weights(tmp_path, tiny, no_weights_read):
    from ktchat import load_model

    for name, text in [("generation_config.json", "{not json"), ("tokenizer.json", '{"model": 1}')]:
        where = tmp_path / name
        where.mkdir()
        model = model_with(where, tiny, name, text)
        with pytest.raises(KTChatError, match=f"^{model}"):
            load_model(model, tiny.adapter, experts_backend="torch", device="cpu")


# --- adapter_config.json -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("changes, fragment", [
    (dict(use_rslora="false"), "use_rslora must be true or false, got 'false'"),
    (dict(lora_dropout=2), "lora_dropout must be a number from 0 to 1, got 2"),
    (dict(init_lora_weights="pissa_niter_4"), "init_lora_weights: 'pissa_niter_4' makes PEFT rewrite the base weights"),
])
def test_bad_adapter_config_value(tmp_path, tiny, changes, fragment):
    adapter = adapter_with(tmp_path, tiny, **changes)
    line = assert_refused_before_load(run("chat", write_config(tmp_path, tiny, adapter_name_or_path=str(adapter))),
                                      fragment)
    assert str(adapter / "adapter_config.json") in line


@pytest.fixture(scope="module")
def peft_config(tiny) -> dict:
    return json.loads((tiny.adapter / "adapter_config.json").read_text())


def read_config_with(tmp_path, base: dict, **changes):
    from ktchat.adapter import read_adapter_config

    (tmp_path / "adapter_config.json").write_text(json.dumps({**base, **changes}))
    return read_adapter_config(tmp_path)


@pytest.mark.parametrize("changes, message", [
    (dict(use_rslora="false"), "use_rslora must be true or false, got 'false'"),
    (dict(use_rslora=1), "use_rslora must be true or false, got 1"),
    (dict(use_dora="no"), "use_dora must be true or false, got 'no'"),
    (dict(use_dora=True), "use_dora: DoRA adapters are not supported yet"),
    (dict(fan_in_fan_out="false"), "fan_in_fan_out must be true or false"),
    (dict(fan_in_fan_out=True), "fan_in_fan_out: fan_in_fan_out adapters (Conv1D layers) are not supported"),
    (dict(lora_bias=True), "lora_bias: LoRA bias terms"),
    (dict(r="8"), "r must be a positive int, got '8'"),
    (dict(r=0), "r must be a positive int, got 0"),
    (dict(r=8.5), "r must be a positive int, got 8.5"),
    (dict(lora_alpha=-16), "lora_alpha must be a positive float, got -16"),
    (dict(lora_alpha=True), "lora_alpha must be a positive float, got True"),
    (dict(rank_pattern={"q_proj": 0}), "rank_pattern: q_proj must be a positive int, got 0"),
    (dict(rank_pattern=[1]), "rank_pattern must be a mapping of module patterns, got list"),
    (dict(alpha_pattern={"(": 4}), "alpha_pattern: '(' is not a valid regular expression"),
    (dict(alpha_pattern={"o_proj": "x"}), "alpha_pattern: o_proj must be a positive float, got 'x'"),
    (dict(lora_dropout=-0.1), "lora_dropout must be a number from 0 to 1, got -0.1"),
    (dict(lora_dropout="0.1"), "lora_dropout must be a number from 0 to 1, got '0.1'"),
    (dict(lora_dropout=None), "lora_dropout must be a number from 0 to 1, got None"),
    (dict(bias="some"), "bias must be 'none', 'all' or 'lora_only', got 'some'"),
    (dict(bias="all"), "bias: 'all' is not supported, only 'none'"),
    (dict(target_modules=5), "target_modules must be a module name pattern or a list of module names, got 5"),
    (dict(target_modules=["q_proj", 3]), "target_modules must be a module name pattern or a list of module names"),
    (dict(exclude_modules={"a": 1}), "exclude_modules must be a module name pattern or a list of module names"),
    (dict(modules_to_save="lm_head"), "modules_to_save must be a list of names, got 'lm_head'"),
    (dict(target_parameters="gate_up_proj"), "target_parameters must be a list of names, got 'gate_up_proj'"),
    (dict(layers_to_transform=[0, -1]), "layers_to_transform must be a layer index >= 0 or a list of them"),
    (dict(layers_to_transform="0"), "layers_to_transform must be a layer index >= 0 or a list of them"),
    (dict(layers_pattern=0), "layers_pattern must be a module name pattern or a list of module names"),
    (dict(init_lora_weights="yes"), "init_lora_weights must be true, false or one of 'gaussian', 'eva'"),
    (dict(init_lora_weights=[]), "init_lora_weights must be true, false or one of"),
    (dict(init_lora_weights="pissa"), "init_lora_weights: 'pissa' makes PEFT rewrite the base weights"),
    (dict(init_lora_weights="olora"), "init_lora_weights: 'olora' makes PEFT rewrite the base weights"),
    (dict(init_lora_weights="loftq"), "init_lora_weights: 'loftq' makes PEFT rewrite the base weights"),
    (dict(init_lora_weights="mica"), "init_lora_weights: MiCA adapters are not supported"),
    (dict(init_lora_weights="orthogonal", r=7), "init_lora_weights: 'orthogonal' needs even ranks"),
    (dict(task_type=["CAUSAL_LM"]), "task_type must be a string, got ['CAUSAL_LM']"),
    (dict(base_model_name_or_path=3), "base_model_name_or_path must be a string, got 3"),
    (dict(loftq_config=[]), "loftq_config must be a JSON object, got []"),
    (dict(trainable_token_indices=[1, "a"]), "trainable_token_indices must be a list of token ids >= 0"),
    (dict(qalora_group_size=0), "qalora_group_size must be an integer >= 1, got 0"),
    (dict(use_qalora=True), "use_qalora: QA-LoRA adapters"),
    (dict(layer_replication=[[0, 2]]), "layer_replication: adapters that replicate base layers"),
    (dict(megatron_config={"tensor_model_parallel_size": 2}), "megatron_config: Megatron-LM parallel layers"),
    (dict(alora_invocation_tokens=[5, 6]), "alora_invocation_tokens: activated LoRA (aLoRA) adapters"),
    (dict(arrow_config={"top_k": 2}), "arrow_config: Arrow adapters are not supported"),
    (dict(peft_type="IA3"), "peft_type 'IA3' is not supported, only LORA"),
])
def test_adapter_config_refuses(tmp_path, peft_config, changes, message):
    with pytest.raises(KTChatError) as err:
        read_config_with(tmp_path, peft_config, **changes)
    text = str(err.value)
    assert text.startswith(f"{tmp_path / 'adapter_config.json'}: ") and message in text and "\n" not in text, text


@pytest.mark.parametrize("changes", [
    {}, dict(use_rslora=None), dict(use_rslora=True), dict(init_lora_weights=False), dict(init_lora_weights="gaussian"),
    dict(init_lora_weights="eva"), dict(init_lora_weights="orthogonal"), dict(lora_dropout=0.05), dict(lora_dropout=1),
    dict(target_modules="(q|o)_proj"), dict(layers_to_transform=3), dict(layers_to_transform=[0, 1]),
    dict(rank_pattern={"q_proj": 16}, alpha_pattern={"q_proj": 8.5}), dict(trainable_token_indices={"embed": [1]}),
    dict(use_dora=False, megatron_config=None, layer_replication=None, loftq_config={}, use_bdlora=None),
])
def test_adapter_config_accepts(tmp_path, peft_config, changes):
    config = read_config_with(tmp_path, peft_config, **changes)
    assert config.use_rslora is bool(changes.get("use_rslora"))


def test_adapter_config_from_peft_itself_is_accepted(tmp_path):
    """What this PEFT writes for a plain LoRA passes every check."""
    from peft import LoraConfig

    from ktchat.adapter import read_adapter_config

    LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj"], task_type="CAUSAL_LM",
               use_rslora=True).save_pretrained(tmp_path)
    config = read_adapter_config(tmp_path)
    assert (config.r, config.lora_alpha, config.use_rslora) == (8, 16.0, True)


def test_every_lora_config_field_is_checked():
    """A PEFT upgrade that adds a LoraConfig field fails here until adapter/config.py knows it (checked, or a
    variant refused); PEFT's own list of LoRA variants (fields tagged is_lora_variant) must all be refused."""
    from peft import LoraConfig

    from ktchat.adapter.config import CHECKED_KEYS, VARIANTS

    fields = dataclasses.fields(LoraConfig)
    assert {f.name for f in fields} - CHECKED_KEYS == set()
    assert {f.name for f in fields if f.metadata.get("is_lora_variant")} <= set(VARIANTS)


def test_adapter_config_is_checked_before_the_weights(tmp_path, tiny, no_weights_read):
    from ktchat import load_model

    adapter = adapter_with(tmp_path, tiny, use_rslora="false")
    with pytest.raises(KTChatError, match="use_rslora must be true or false, got 'false'"):
        load_model(tiny.model, adapter, experts_backend="torch", device="cpu")


# --- unwritable output paths -------------------------------------------------------------------------------------

@pytest.fixture
def unwritable(tmp_path):
    """A folder this process cannot create anything in: a read-only folder, or under /sys where even root cannot."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o500)
        yield folder
        folder.chmod(0o700)
        return
    try:
        os.mkdir("/sys/ktchat-probe")
    except PermissionError:
        yield Path("/sys")
        return
    except OSError:
        pass
    else:
        os.rmdir("/sys/ktchat-probe")
    pytest.skip("running as root, with no folder root cannot write")


@pytest.mark.parametrize("command", ["convert", "export", "demo"])
def test_unwritable_output_is_one_line(tiny, unwritable, command):
    out = unwritable / f"ktchat-test-{command}"
    args = {"convert": ["convert", tiny.adapter, out, "--to", "kt"],
            "export": ["export", "--model", tiny.model, "--adapter", tiny.adapter, "--out", out],
            "demo": ["demo", "--cache", out]}[command]
    result = run(*args)
    line = assert_refused_before_load(result, str(unwritable), out.name)
    assert "Permission denied" in line or "Operation not permitted" in line, line
    if command != "demo":  # the output folder itself, not a temporary one beside it
        assert f"{out}: cannot write the output folder there" in line, line
