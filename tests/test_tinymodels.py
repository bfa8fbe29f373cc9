"""Tests of ktchat.tinymodels: the offline tiny DeepSeek-V2 checkpoint, tokenizer and per-expert LoRA adapter."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import ktchat.tinymodels as tiny  # noqa: E402
from ktchat.tinymodels import TRAINED_QA, TinyPaths, build_tiny  # noqa: E402

torch = pytest.importorskip("torch")

N_LAYERS, FIRST_DENSE, N_EXPERTS = 3, 1, 8


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory) -> TinyPaths:
    return build_tiny(tmp_path_factory.mktemp("tiny"))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _expected_adapter_keys() -> set[str]:
    keys = set()
    for li in range(N_LAYERS):
        p = f"base_model.model.model.layers.{li}"
        mods = [f"{p}.self_attn.{m}" for m in ("q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")]
        subs = [f"{p}.mlp"] if li < FIRST_DENSE else (
            [f"{p}.mlp.shared_experts"] + [f"{p}.mlp.experts.{e}" for e in range(N_EXPERTS)])
        mods += [f"{s}.{m}" for s in subs for m in ("gate_proj", "up_proj", "down_proj")]
        keys |= {f"{m}.lora_{ab}.weight" for m in mods for ab in "AB"}
    return keys


def test_files_and_config(tiny_paths):
    model, adapter = tiny_paths.model, tiny_paths.adapter
    assert tiny_paths.root / "model" == model and tiny_paths.root / "adapter" == adapter
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "model.safetensors.index.json", "model-00001-of-00002.safetensors",
                 "model-00002-of-00002.safetensors"):
        assert (model / name).is_file(), name
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not list(tiny_paths.root.glob(".build-*"))
    cfg = json.loads((model / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v2" and cfg["architectures"] == ["DeepseekV2ForCausalLM"]
    assert cfg["q_lora_rank"] is None and cfg["kv_lora_rank"] == 64 and cfg["n_routed_experts"] == N_EXPERTS
    assert cfg["vocab_size"] % 64 == 0 and cfg["torch_dtype"] == "bfloat16"
    index = json.loads((model / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00002.safetensors",
                                                 "model-00002-of-00002.safetensors"}
    keys = set(index["weight_map"])
    assert "model.layers.0.mlp.gate_proj.weight" in keys and "lm_head.weight" in keys
    for li in range(FIRST_DENSE, N_LAYERS):
        assert f"model.layers.{li}.mlp.gate.weight" in keys
        assert f"model.layers.{li}.mlp.shared_experts.down_proj.weight" in keys
        for e in range(N_EXPERTS):
            assert f"model.layers.{li}.mlp.experts.{e}.up_proj.weight" in keys
    gen = json.loads((model / "generation_config.json").read_text())
    assert gen["eos_token_id"] == cfg["eos_token_id"] and gen["do_sample"] is False


def _mtimes(root: Path) -> dict[str, int]:
    """Every file and folder under root, hidden ones (the lock file) included, with its modification time."""
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*")}


def test_cached_build_returns_at_once(tiny_paths, caplog):
    """A complete build is returned as it is: nothing is built and nothing under its root is written, not even the
    lock file, which a build takes by opening it for writing (the cached path returns before it)."""
    before = _mtimes(tiny_paths.root)
    assert ".tiny.lock" in before and tiny.STAMP in before
    with caplog.at_level(logging.INFO, logger="ktchat.tinymodels"):
        again = build_tiny(tiny_paths.root)
    assert again == tiny_paths
    assert _mtimes(tiny_paths.root) == before
    assert not [r for r in caplog.records if r.name.startswith("ktchat.tinymodels")], caplog.text


def test_transformers_loads_with_no_missing_keys(tiny_paths):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(tiny_paths.model, dtype=torch.float32,
                                                       output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 4, 50, 60, 2, 5]])).logits
    assert logits.shape == (1, 6, model.config.vocab_size)
    assert torch.isfinite(logits).all() and logits[0, -1].std() > 0.1


def test_tokenizer_and_chat_template(tiny_paths):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_paths.model)
    cfg = json.loads((tiny_paths.model / "config.json").read_text())
    assert len(tok) <= cfg["vocab_size"] and 400 <= len(tok) <= 600
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"])
    assert tok.eos_token == "<|end|>"
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Ünïcödé ✓ 42"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == ("<|begin|><|system|>Be brief.<|end|><|user|>Hi there<|end|>"
                    "<|assistant|>Hello!<|end|><|user|>Ünïcödé ✓ 42<|end|><|assistant|>")
    no_prompt = tok.apply_chat_template(msgs[:3], tokenize=False)
    assert no_prompt.endswith("<|assistant|>Hello!<|end|>")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.convert_tokens_to_ids("<|assistant|>")
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == "Be brief.Hi thereHello!Ünïcödé ✓ 42"


def test_adapter_is_per_expert_layout(tiny_paths):
    from safetensors.torch import load_file

    sd = load_file(str(tiny_paths.adapter / "adapter_model.safetensors"))
    assert set(sd) == _expected_adapter_keys()
    assert not [k for k in sd if ".default." in k or "base_layer" in k or ".mlp.gate." in k or "lm_head" in k]
    for li in range(FIRST_DENSE, N_LAYERS):
        experts = {int(m.group(1)) for k in sd if (m := re.search(rf"layers\.{li}\.mlp\.experts\.(\d+)\.", k))}
        assert experts == set(range(N_EXPERTS))
    assert all(sd[k].abs().sum() > 0 for k in sd if ".mlp.experts." in k and "lora_B" in k)
    acfg = json.loads((tiny_paths.adapter / "adapter_config.json").read_text())
    assert acfg["target_modules"] == ["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                                      "gate_proj", "up_proj", "down_proj"]
    assert (acfg["r"], acfg["lora_alpha"], acfg["task_type"], acfg["peft_type"]) == (8, 16, "CAUSAL_LM", "LORA")
    assert acfg["lora_dropout"] == 0.0 and acfg["bias"] == "none" and not acfg.get("use_rslora")
    assert acfg["base_model_name_or_path"] == str(tiny_paths.model)
    assert sd["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (8, 256)


def _hand_merged(paths: TinyPaths, out: Path, *, skip_experts: bool = False) -> Path:
    """W + alpha/r * B @ A into an fp32 copy of the checkpoint (PEFT on transformers 5 is not exact)."""
    from safetensors.torch import load_file, save_file

    weights = {}
    for shard in sorted(paths.model.glob("model-*.safetensors")):
        weights.update({k: v.float() for k, v in load_file(str(shard)).items()})
    lora = load_file(str(paths.adapter / "adapter_model.safetensors"))
    acfg = json.loads((paths.adapter / "adapter_config.json").read_text())
    scale = acfg["lora_alpha"] / acfg["r"]
    for key in lora:
        if key.endswith(".lora_A.weight") and not (skip_experts and ".mlp.experts." in key):
            mod = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = lora[key.replace("lora_A", "lora_B")].double()
            weights[f"{mod}.weight"] = (weights[f"{mod}.weight"].double() + scale * b @ lora[key].double()).float()
    out.mkdir()
    for f in paths.model.glob("*.json"):
        if f.name != "model.safetensors.index.json":
            shutil.copy(f, out / f.name)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _answers(model_dir: Path) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for question, _ in TRAINED_QA:
        enc = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        gen = model.generate(**enc, max_new_tokens=24)
        out.append(tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


def test_trained_answers_and_expert_channel_live(tiny_paths, tmp_path):
    """The hand-merged adapter answers every TRAINED_QA in plain transformers; without expert LoRA it does not."""
    assert len(TRAINED_QA) == 3
    assert _answers(_hand_merged(tiny_paths, tmp_path / "merged")) == [a for _, a in TRAINED_QA]
    no_experts = _answers(_hand_merged(tiny_paths, tmp_path / "no_experts", skip_experts=True))
    assert no_experts != [a for _, a in TRAINED_QA]


def test_build_is_deterministic(tiny_paths, tmp_path):
    second = build_tiny(tmp_path / "again")
    for a in sorted(tiny_paths.root.rglob("*")):
        rel = a.relative_to(tiny_paths.root)
        if a.is_file() and rel.parts[0] in ("model", "adapter") and rel.name != "adapter_config.json":
            assert _sha(a) == _sha(second.root / rel), rel
    cfg_a = json.loads((tiny_paths.adapter / "adapter_config.json").read_text())
    cfg_b = json.loads((second.adapter / "adapter_config.json").read_text())
    assert cfg_b.pop("base_model_name_or_path") == str(second.model)
    cfg_a.pop("base_model_name_or_path")
    assert cfg_a == cfg_b


def test_cache_stamp_force_and_failed_build(tmp_path, monkeypatch):
    """The caching logic with a fake (instant) builder: stamp, force, stale temp dirs, killed builds."""
    calls = []

    def fake_build(tmp: Path, final_root: Path, recipe) -> None:
        calls.append(recipe.name)
        for part in ("model", "adapter"):
            (tmp / part).mkdir()
            (tmp / part / "f.json").write_text(str(len(calls)))

    monkeypatch.setattr(tiny, "_build_into", fake_build)
    root = tmp_path / "r"
    paths = build_tiny(root)
    assert len(calls) == 1 and (paths.model / "f.json").read_text() == "1"
    assert build_tiny(root) == paths and len(calls) == 1
    build_tiny(root, force=True)
    assert len(calls) == 2 and (paths.adapter / "f.json").read_text() == "2"
    (root / ".build-stale").mkdir()  # left by a killed build
    (paths.model / "f.json").write_text("tampered!")  # size changes: no longer matches the stamp
    build_tiny(root)
    assert len(calls) == 3 and not (root / ".build-stale").exists()
    assert calls == ["deepseek_v2"] * 3
    qwen = build_tiny(tmp_path / "qwen", family="qwen3_moe")  # every family's recipe reaches the builder
    assert calls[-1] == "qwen3_moe" and json.loads((qwen.root / tiny.STAMP).read_text())["recipe"] == "tiny-qwen3_moe-1"
    with pytest.raises(ValueError, match="no tiny recipe for 'nope'"):
        build_tiny(tmp_path / "nope", family="nope")
    assert len(calls) == 4 and not (tmp_path / "nope").exists()

    def failing_build(tmp: Path, final_root: Path, recipe) -> None:
        (tmp / "model").mkdir()
        raise RuntimeError("killed")

    monkeypatch.setattr(tiny, "_build_into", failing_build)
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError, match="killed"):
        build_tiny(fresh)
    assert not (fresh / "model").exists() and not list(fresh.glob(".build-*"))
    assert (paths.model / "f.json").read_text() == "3"  # the old root is untouched
