"""Malformed adapters, many of them: a seeded random mutator breaks adapters of every layout (truncated or corrupt
files, wrong shapes, NaN/Inf, missing or junk config keys, rank mismatches, duplicate, missing or renamed experts,
bad manifests, stale checksums) and feeds each through read + plan + tensor loading. Each must load cleanly or
raise one KTChatError whose single line names a file of the adapter; any other exception is a bug."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ktchat import KTChatError, load_model
from ktchat.adapter import read_adapter
from ktchat.adapter.writer import convert
from ktchat.model.channels import plan_adapter
from ktchat.model.registry import ARCHS

from test_layouts import moe_segment, peft_v5_by_hand, rewrite

CASES = int(os.environ.get("KTCHAT_FUZZ_CASES", "400"))
MANIFEST = "kt_adapter_manifest.json"
JUNK = [0, -1, 3, 2.5, "x", None, [], {}, True, float("inf"), {"(": 4}, {".*": 0}, ["gate_up_proj"], {"q_proj": 16}]


@pytest.fixture(scope="module")
def seeds(tiny, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("seeds")
    convert(tiny.adapter, root / "kt", "kt")
    return {"peft": rewrite(tiny.adapter, root / "peft"), "bin": rewrite(tiny.adapter, root / "bin", fmt="bin"),
            "orig": rewrite(tiny.adapter, root / "orig", rename=moe_segment("orig_module")),
            "v5": peft_v5_by_hand(tiny, root / "v5"), "kt": root / "kt"}


@pytest.fixture(scope="module")
def kt_model(tiny):
    model, _ = load_model(tiny.model, None, experts_backend="torch", dtype="float32", device="cpu")
    return model


def materialize(adapter_dir: Path, model) -> None:
    """Everything loading does short of PEFT's injection: read, plan against the model, load every tensor."""
    adapter = read_adapter(adapter_dir)
    peft, routed = plan_adapter(adapter, model, ARCHS["deepseek_v2"])
    if peft:
        adapter.weights.load(k for m in peft.values() for k in (m.a_key, m.b_key))
    for lora in routed.values():
        lora.stack(torch.float32)


# ---- the mutator: each takes (rng, adapter folder) and returns what it did ----

def tensor_files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.suffix in (".safetensors", ".bin"))


def edit_tensors(path: Path, fn) -> None:
    try:
        t = torch.load(path, weights_only=True) if path.suffix == ".bin" else load_file(str(path))
    except Exception:  # an earlier mutation already broke the file; leave it broken
        return
    if not t:
        return
    fn(t)
    torch.save(t, path) if path.suffix == ".bin" else save_file({k: v.contiguous() for k, v in t.items()}, str(path))


def truncate(rng, d):
    f = rng.choice(sorted(d.iterdir()))
    data = f.read_bytes()
    f.write_bytes(data[: rng.randrange(max(1, len(data)))])
    return f"truncate {f.name}"


def flip_bytes(rng, d):
    f = rng.choice(sorted(d.iterdir()))
    data = bytearray(f.read_bytes())
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(min(len(data), 400)) if rng.random() < 0.7 else rng.randrange(len(data))
        data[i] ^= rng.randint(1, 255)
    f.write_bytes(bytes(data))
    return f"flip bytes of {f.name}"


def on_tensor(fn, label):
    def mutate(rng, d):
        files = tensor_files(d)
        if not files:
            return f"{label}: no tensor file left"
        f = rng.choice(files)
        picked = []

        def apply(t):
            key = rng.choice(sorted(t))
            picked.append(key)
            fn(rng, t, key)

        edit_tensors(f, apply)
        return f"{label} {picked[0] if picked else '-'} in {f.name}"

    return mutate


def _drop(rng, t, key):
    del t[key]


def _slice(rng, t, key):
    dim = rng.randrange(t[key].dim())
    if t[key].shape[dim] > 1:
        t[key] = t[key].narrow(dim, 0, rng.randrange(1, t[key].shape[dim]))


def _poison(rng, t, key):
    flat = t[key].view(-1)
    flat[rng.randrange(flat.numel())] = rng.choice([float("nan"), float("inf"), float("-inf")])


def _retype(rng, t, key):
    t[key] = t[key].to(rng.choice([torch.float16, torch.bfloat16, torch.int8, torch.float64]))


def _transpose(rng, t, key):
    t[key] = t[key].transpose(-1, -2).contiguous()


def _junk_key(rng, t, key):
    t[rng.choice(["foo.bar", key.replace("lora_A", "lora_C"), key + ".extra", "base_model.model.x.lora_A.weight",
                  "layers.9.experts.gate_lora_a"])] = torch.zeros(2, 2)


def _duplicate(rng, t, key):
    t[re.sub(r"\.lora_([AB])\.weight$", r".lora_\1.default.weight", key) if ".lora_" in key
      else key.replace("layers.", "layers.0", 1)] = t[key].clone()


def _renumber(rng, t, key):
    new = re.sub(r"(experts\.|layers\.)(\d+)", lambda m: m[1] + str(rng.choice([0, 3, 7, 8, 11])), key, count=1)
    t[new] = t.pop(key)


def config_key(rng, d):
    path = d / "adapter_config.json"
    cfg = json.loads(path.read_text())
    key = rng.choice(["r", "lora_alpha", "peft_type", "rank_pattern", "alpha_pattern", "target_parameters",
                      "use_dora", "bias", "use_rslora", "lora_bias"])
    if rng.random() < 0.3:
        cfg.pop(key, None)
    else:
        cfg[key] = rng.choice(JUNK)
    path.write_text(json.dumps(cfg))
    return f"config {key}"


def manifest_field(rng, d):
    path = d / MANIFEST
    if not path.exists():
        return config_key(rng, d)
    m = json.loads(path.read_text())
    target, key = rng.choice([(m, "version"), (m, "status"), (m["lora"], "rank"), (m["lora"], "alpha"),
                              (m, "artifacts"), (m["base"], "model_name_or_path"), (m, "lora")])
    if rng.random() < 0.3:
        target.pop(key, None)
    else:
        target[key] = rng.choice(JUNK + ["/some/other/base/path"])
    path.write_text(json.dumps(m))
    return f"manifest {key}"


def remove_file(rng, d):
    f = rng.choice(sorted(d.iterdir()))
    f.unlink()
    return f"remove {f.name}"


def restamp(d: Path) -> None:
    """Brings the manifest's checksums up to date, so checks behind the checksum check get exercised too."""
    path = d / MANIFEST
    try:
        m = json.loads(path.read_text())
        for name, record in m["artifacts"].items():
            data = (d / name).read_bytes()
            record.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
        path.write_text(json.dumps(m))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass


MUTATIONS = [truncate, flip_bytes, config_key, manifest_field, remove_file] + [
    on_tensor(fn, fn.__name__.strip("_")) for fn in (_drop, _slice, _poison, _retype, _transpose, _junk_key,
                                                     _duplicate, _renumber)]


def test_every_malformed_adapter_loads_cleanly_or_gets_one_error_line(seeds, kt_model, tmp_path):
    rng = random.Random(20251126)
    outcomes = Counter()
    for i in range(CASES):
        layout = rng.choice(sorted(seeds))
        adapter = tmp_path / f"{layout}-{i}"
        shutil.copytree(seeds[layout], adapter)
        did = [rng.choice(MUTATIONS)(rng, adapter) for _ in range(rng.choice([1, 1, 1, 2]))]
        if layout == "kt" and rng.random() < 0.5:
            restamp(adapter)
        try:
            materialize(adapter, kt_model)
            outcomes["loaded"] += 1
        except KTChatError as exc:
            message = str(exc)
            assert "\n" not in message and str(adapter) in message, (layout, did, message)
            outcomes["refused"] += 1
        shutil.rmtree(adapter)
    assert outcomes["refused"] > CASES // 2, outcomes


@pytest.mark.parametrize("layout", ["peft", "bin", "orig", "v5", "kt"])
def test_unmutated_seeds_load(layout, seeds, kt_model):
    materialize(seeds[layout], kt_model)


# ---- the issue's list, for the new layouts, one by one ----

def _fused(d: Path, fn) -> None:
    edit_tensors(d / "fused_expert_lora.safetensors", fn)


def _manifest(d: Path, fn) -> None:
    m = json.loads((d / MANIFEST).read_text())
    fn(m)
    (d / MANIFEST).write_text(json.dumps(m))


def _set_value(t):
    t["layers.1.experts.gate_lora_b"][0, 0, 0] += 1.0


def _nan(t):
    t["layers.2.experts.down_lora_a"][3, 0, 0] = float("nan")


def _seven_experts(t):
    for side in "ab":
        t[f"layers.1.experts.up_lora_{side}"] = t[f"layers.1.experts.up_lora_{side}"][:7].contiguous()


def _per_expert_copy_of_layer_1(d: Path) -> None:
    peft = load_file(str(d.parent / "src" / "adapter_model.safetensors"))
    edit_tensors(d / "adapter_model.safetensors", lambda t: t.update({k: v for k, v in peft.items() if ".layers.1.mlp.experts." in k}))


KT_CASES = {
    "checksum mismatch": (lambda d: _fused(d, _set_value), False, "files differ from the manifest: fused_expert_lora.safetensors"),
    "bad manifest version": (lambda d: _manifest(d, lambda m: m.update(version=2)), False, "expected version 1"),
    "manifest not json": (lambda d: (d / MANIFEST).write_text("{"), False, "cannot read the KT adapter manifest"),
    "manifest rank disagrees": (lambda d: _manifest(d, lambda m: m["lora"].update(rank=4)), False, "lora.rank=4"),
    "manifest without alpha": (lambda d: _manifest(d, lambda m: m["lora"].pop("alpha")), False, "lora.alpha"),
    "contract disagrees": (lambda d: _fused(d, _seven_experts), True, "fused tensors differ from the manifest"),
    "missing experts": (lambda d: (_fused(d, _seven_experts), _manifest(d, lambda m: m["artifacts"][
        "fused_expert_lora.safetensors"].pop("tensors"))), True, "missing experts [7]"),
    "nan": (lambda d: _fused(d, _nan), True, "holds NaN or Inf"),
    "no manifest": (lambda d: (d / MANIFEST).unlink(), False, "without kt_adapter_manifest.json"),
    "fused and per-expert": (_per_expert_copy_of_layer_1, True, "duplicate expert LoRA"),
}


@pytest.mark.parametrize("case", sorted(KT_CASES))
def test_bad_kt_adapter_is_one_clear_error(case, tiny, kt_model, tmp_path):
    breaker, restamped, must_name = KT_CASES[case]
    shutil.copytree(tiny.adapter, tmp_path / "src")
    convert(tiny.adapter, tmp_path / "kt", "kt")
    breaker(tmp_path / "kt")
    if restamped:
        restamp(tmp_path / "kt")
    with pytest.raises(KTChatError) as err:
        materialize(tmp_path / "kt", kt_model)
    assert must_name in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_kt_adapter_moved_and_edited_still_loads(tiny, kt_model, tmp_path, caplog):
    """Another base path in the manifest and an edited adapter_config.json (the usual move) do not block loading."""
    convert(tiny.adapter, tmp_path / "kt", "kt")
    _manifest(tmp_path / "kt", lambda m: m["base"].update(model_name_or_path="/data/DeepSeek-V2-Lite"))
    cfg = json.loads((tmp_path / "kt/adapter_config.json").read_text())
    (tmp_path / "kt/adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "/models/x"}))
    materialize(tmp_path / "kt", kt_model)
    assert "adapter_config.json differs from the checksum" in caplog.text


def test_bad_peft_v5_adapter_is_one_clear_error(tiny, kt_model, tmp_path):
    adapter = peft_v5_by_hand(tiny, tmp_path / "v5")
    key = "base_model.model.model.layers.2.mlp.experts.lora_A.weight"
    edit_tensors(adapter / "adapter_model.safetensors", lambda t: t.update({key: t[key][:-3].contiguous()}))
    with pytest.raises(KTChatError, match="rank mismatch for model.layers.2.mlp.experts: lora_A has 61 rows") as err:
        materialize(adapter, kt_model)
    assert str(adapter) in str(err.value)
