"""load_config reads LLaMA-Factory inference YAML: used keys, ignored keys, and errors that name the key."""

import logging
import re

import pytest

from ktchat.config import (ChatConfig, GenerationArgs, ModelArgs, PredictArgs, config_from_mapping, load_config,
                           parse_overrides)
from ktchat.errors import KTChatError


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_valid_yaml(tmp_path):
    path = write(tmp_path, """
model_name_or_path: /models/DeepSeek-V2-Lite-Chat
adapter_name_or_path: saves/kt-lora
template: deepseek
infer_backend: huggingface
use_kt: true
trust_remote_code: true
experts_backend: torch
device: cpu
infer_dtype: bfloat16
kt_num_threads: 8
moe_lora: exact
max_new_tokens: 40
temperature: 1
top_p: 0.9
top_k: 20
do_sample: false
repetition_penalty: 1.1
default_system: You are helpful.
""")
    config = load_config(path)
    assert config.model == ModelArgs(
        model_name_or_path="/models/DeepSeek-V2-Lite-Chat", adapter_name_or_path="saves/kt-lora", template="deepseek",
        infer_backend="huggingface", use_kt=True, trust_remote_code=True, experts_backend="torch", device="cpu",
        infer_dtype="bfloat16", kt_num_threads=8, moe_lora="exact")
    assert config.generation == GenerationArgs(max_new_tokens=40, temperature=1.0, top_p=0.9, top_k=20,
                                               do_sample=False, repetition_penalty=1.1,
                                               default_system="You are helpful.")
    assert config.model.dtype == "bfloat16" and config.model.resolved_experts_backend == "torch"
    assert config.generation.greedy


def test_defaults_mirror_llamafactory(tmp_path):
    config = load_config(write(tmp_path, "model_name_or_path: m\n"))
    assert config == ChatConfig(model=ModelArgs(model_name_or_path="m"), generation=GenerationArgs())
    g = config.generation
    assert (g.max_new_tokens, g.temperature, g.top_p, g.top_k, g.do_sample, g.repetition_penalty) == (
        1024, 0.95, 0.7, 50, True, 1.0)
    assert config.model.dtype is None and config.model.infer_backend == "huggingface"
    assert config.model.resolved_experts_backend == "torch"  # use_kt: false keeps the experts in torch


def test_temperature_zero_is_greedy():
    assert GenerationArgs(temperature=0).greedy
    assert not GenerationArgs().greedy


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path, "model_name_or_path: m\nmax_new_token: 3\nfoo: 1\n")
    hint = r": unknown keys: foo, max_new_token \(did you mean max_new_tokens\?\)$"
    with pytest.raises(KTChatError, match=hint) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and "foo" in message and "max_new_token " in message
    assert "did you mean max_new_tokens" in message and "\n" not in message


@pytest.mark.parametrize("backend", ["vllm", "sglang"])
def test_use_kt_needs_huggingface(tmp_path, backend):
    path = write(tmp_path, f"model_name_or_path: m\nuse_kt: true\ninfer_backend: {backend}\n")
    with pytest.raises(KTChatError, match=f"use_kt: true needs infer_backend: huggingface \\(got '{backend}'\\)"):
        load_config(path)


def test_other_backend_without_kt_is_logged(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="ktchat"):
        config = load_config(write(tmp_path, "model_name_or_path: m\ninfer_backend: vllm\n"))
    assert config.model.infer_backend == "vllm"
    assert "ignored: infer_backend: vllm" in caplog.text


def test_experts_backend_kt_needs_use_kt():
    with pytest.raises(KTChatError, match="experts_backend: kt needs use_kt: true"):
        config_from_mapping({"model_name_or_path": "m", "experts_backend": "kt"})


@pytest.mark.parametrize("key, value", [
    ("max_new_tokens", "'abc'"), ("max_new_tokens", "-5"), ("max_new_tokens", "0"), ("max_new_tokens", "2.5"),
    ("max_new_tokens", "true"), ("temperature", "-0.1"), ("temperature", "hot"), ("top_p", "0"),
    ("top_p", "1.5"), ("top_k", "-1"), ("do_sample", "'yes please'"), ("repetition_penalty", "0"),
    ("use_kt", "1"), ("infer_backend", "tensorrt"), ("experts_backend", "gpu"), ("infer_dtype", "int8"),
    ("kt_num_threads", "0"), ("moe_lora", "fused"), ("model_name_or_path", "''"), ("model_name_or_path", "[a]"),
    ("cuda_graphs", "'on'"), ("merge_peft_lora", "null"), ("temperature", ".inf"), ("repetition_penalty", ".nan"),
    ("device", "gpu0"), ("device", "cuda:x"), ("device", "mps"), ("device", "3"), ("device", "''"),
])
def test_bad_values_name_key_and_value(tmp_path, key, value):
    path = write(tmp_path, f"model_name_or_path: m\n{key}: {value}\n")
    with pytest.raises(KTChatError, match=rf"^{re.escape(str(path))}: {key} must be .* \(got .*\)$") as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {key} must be"), message
    assert "(got " in message and "\n" not in message


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_spellings(device):
    """Only the spelling is checked here (no torch); load_model checks that the GPU exists, still before loading."""
    assert ModelArgs(model_name_or_path="m", device=device).device == device


def test_cuda_graphs_on_cpu_is_refused_at_the_edge():
    with pytest.raises(KTChatError, match="^cuda_graphs: true needs a CUDA device, but device is cpu"):
        ModelArgs(model_name_or_path="m", device="cpu", cuda_graphs=True)
    assert ModelArgs(model_name_or_path="m", device="cpu", cuda_graphs=False).cuda_graphs is False


def test_valid_edges():
    g = GenerationArgs(temperature=0, top_p=1, top_k=0, max_new_tokens=1)
    assert (g.top_p, g.top_k) == (1, 0)


def test_missing_model_name(tmp_path):
    with pytest.raises(KTChatError, match="model_name_or_path is missing"):
        load_config(write(tmp_path, "adapter_name_or_path: a\n"))


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("just text\n", "str"), ("", "NoneType")])
def test_yaml_must_be_mapping(tmp_path, text, kind):
    path = write(tmp_path, text)
    with pytest.raises(KTChatError, match=f"expected a mapping .*got {kind}") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(KTChatError, match="invalid YAML at line"):
        load_config(write(tmp_path, "model_name_or_path: [m\n"))
    with pytest.raises(KTChatError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_llamafactory_keys_are_ignored_with_reason(tmp_path, caplog):
    path = write(tmp_path, """
model_name_or_path: m
adapter_name_or_path: a
stage: sft
finetuning_type: lora
lora_rank: 8
lora_alpha: 16
lora_target: all
cutoff_len: 2048
kt_optimize_rule: examples/kt_optimize_rules/DeepSeek-V2-Lite-Chat-sft-amx.yaml
chunk_size: 8192
kt_backend: AMXBF16
export_dir: out
flash_attn: fa2
""")
    with caplog.at_level(logging.INFO, logger="ktchat"):
        config = load_config(path)
    assert config.model.adapter_name_or_path == "a"
    assert "ignored: lora_alpha, lora_rank (taken from the adapter's own config)" in caplog.text
    for key in ("stage", "finetuning_type", "lora_target", "cutoff_len", "kt_optimize_rule", "chunk_size",
                "kt_backend", "export_dir", "flash_attn"):
        assert f"{key}" in caplog.text


def test_cpu_infer_alias(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="ktchat"):
        config = load_config(write(tmp_path, "model_name_or_path: m\nuse_kt: true\ncpu_infer: 12\n"))
    assert config.model.kt_num_threads == 12
    assert "cpu_infer is read as kt_num_threads" in caplog.text
    same = load_config(write(tmp_path, "model_name_or_path: m\ncpu_infer: 4\nkt_num_threads: 4\n"))
    assert same.model.kt_num_threads == 4
    with pytest.raises(KTChatError, match="cpu_infer: 4 and kt_num_threads: 8 disagree"):
        load_config(write(tmp_path, "model_name_or_path: m\ncpu_infer: 4\nkt_num_threads: 8\n"))
    with pytest.raises(KTChatError, match="kt_num_threads must be an integer >= 1 \\(got 'many'\\)"):
        load_config(write(tmp_path, "model_name_or_path: m\ncpu_infer: many\n"))


def test_adapter_list(tmp_path):
    config = load_config(write(tmp_path, "model_name_or_path: m\nadapter_name_or_path: ' saves/a , '\n"))
    assert config.model.adapter_name_or_path == "saves/a"
    with pytest.raises(KTChatError, match="lists 2 adapters \\(saves/a, saves/b\\)"):
        load_config(write(tmp_path, "model_name_or_path: m\nadapter_name_or_path: saves/a,saves/b\n"))


def test_overrides_win_and_are_validated(tmp_path):
    path = write(tmp_path, "model_name_or_path: m\nmax_new_tokens: 10\n")
    overrides = parse_overrides(["max_new_tokens=40", "do_sample=false", "default_system=Be brief.", "top_p=0.5"])
    assert overrides == {"max_new_tokens": 40, "do_sample": False, "default_system": "Be brief.", "top_p": 0.5}
    config = load_config(path, overrides=overrides)
    assert (config.generation.max_new_tokens, config.generation.do_sample) == (40, False)
    with pytest.raises(KTChatError, match="max_new_tokens must be an integer >= 1 \\(got 'abc'\\)"):
        load_config(path, overrides=parse_overrides(["max_new_tokens=abc"]))
    with pytest.raises(KTChatError, match="--set expects key=value"):
        parse_overrides(["max_new_tokens"])


def test_dataclasses_are_frozen_and_self_validating():
    args = ModelArgs(model_name_or_path="m")
    with pytest.raises(AttributeError):
        args.use_kt = True
    with pytest.raises(KTChatError, match="top_p must be"):
        GenerationArgs(top_p=0)


# ---------------------------------------------------------------------------------------------------------------
# `ktchat predict`'s keys: read by predict, accepted and ignored by the other commands


PREDICT_YAML = """
model_name_or_path: m
dataset: alpaca_en_demo
dataset_dir: data
cutoff_len: 1024
max_samples: 10
save_name: out/preds.jsonl
skip_special_tokens: false
seed: 7
batch_size: 2
enable_thinking: false
preprocessing_num_workers: 2
"""


def test_predict_reads_its_keys(tmp_path):
    config = load_config(write(tmp_path, PREDICT_YAML), predict=True)
    assert config.predict == PredictArgs(dataset="alpaca_en_demo", dataset_dir="data", cutoff_len=1024, max_samples=10,
                                         save_name="out/preds.jsonl", skip_special_tokens=False, seed=7, batch_size=2,
                                         enable_thinking=False, preprocessing_num_workers=2)
    defaults = load_config(write(tmp_path, "model_name_or_path: m\ndataset: d.jsonl\n"), predict=True).predict
    assert (defaults.dataset_dir, defaults.cutoff_len, defaults.save_name, defaults.batch_size, defaults.seed) == (
        "data", 2048, "generated_predictions.jsonl", 4, None)  # hf_infer.py's defaults


def test_chat_accepts_and_ignores_the_predict_keys(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="ktchat"):
        config = load_config(write(tmp_path, PREDICT_YAML))
    assert config.predict is None
    assert ("ignored: batch_size, cutoff_len, dataset, dataset_dir, max_samples, preprocessing_num_workers, save_name, "
            "seed (only used by `ktchat predict` and in training)") in caplog.text
    assert "ignored: skip_special_tokens (special tokens are always removed from replies)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ktchat"):
        load_config(write(tmp_path, PREDICT_YAML), predict=True)
    assert "ignored: " not in caplog.text


def test_predict_needs_a_dataset(tmp_path):
    with pytest.raises(KTChatError, match="dataset is missing: set it to a dataset name of dataset_info.json or a "):
        load_config(write(tmp_path, "model_name_or_path: m\n"), predict=True)


@pytest.mark.parametrize("key, value", [
    ("dataset", "''"), ("dataset", "[a, b]"), ("dataset_dir", "''"), ("cutoff_len", "0"), ("max_samples", "0"),
    ("max_samples", "'all'"), ("save_name", "''"), ("skip_special_tokens", "'no'"), ("seed", "-1"), ("seed", "1.5"),
    ("batch_size", "0"), ("enable_thinking", "1"), ("preprocessing_num_workers", "0"),
])
def test_bad_predict_values_name_key_and_value(tmp_path, key, value):
    path = write(tmp_path, f"model_name_or_path: m\ndataset: d.jsonl\n{key}: {value}\n")
    with pytest.raises(KTChatError, match=rf"^{re.escape(str(path))}: {key} must be .* \(got .*\)$"):
        load_config(path, predict=True)
