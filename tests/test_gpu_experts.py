"""Routed experts kept on the GPU with their LoRA (ktchat.model.gpu_experts, experts/resident.py), in their CPU variant
(device "cpu": the same split, placement and LoRA code CI can run): each MoE layer's top-k split between the kept
experts and the CPU backend, summed, against the fp32 hand-merged reference; exact and merged; dropping the kept
experts' LoRA breaks the match; placements chosen, saved and read back."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch

from ktchat import KTChatError, load_model
from ktchat.engine import SamplingParams
from ktchat.model import engine_of, offloaded_blocks
from ktchat.model.gpu_experts import Placement, choose, expert_bytes
from ktchat.tinymodels import TRAINED_QA

from reference import DEVICE, chat_prompt_ids, greedy, load_reference, logits, merge_by_hand, rel_err
from tolerances import FP32_BOUND, KT_BF16_BOUND

FAMILIES = ("deepseek_v2", "qwen3_5_moe_text", "glm4_moe")  # shared experts; a gated shared expert; biased routing


def reference_of(paths):
    digest = hashlib.sha256((paths.adapter / "adapter_model.safetensors").read_bytes()).hexdigest()[:12]
    return load_reference(merge_by_hand(paths.model, paths.adapter, paths.root / f"merged-all-{digest}"))


def some_experts(paths, share: float = 0.5, **kwargs):
    """The model with about `share` of its routed experts kept "on the GPU" (the model's device)."""
    model, tok = load_model(paths.model, paths.adapter, experts_backend="torch", dtype="float32", device=DEVICE,
                            **kwargs, gpu_experts_gib=1e-9)  # sized below: one expert's bytes, for the unit
    block = next(iter(offloaded_blocks(model).values()))
    total = sum(b.experts.backend.spec.num_experts for b in offloaded_blocks(model).values())
    gib = int(share * total) * expert_bytes(block) / 2**30
    return load_model(paths.model, paths.adapter, experts_backend="torch", dtype="float32", device=DEVICE, **kwargs,
                      gpu_experts_gib=gib)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("moe_lora", ["exact", "merged"])
def test_split_between_kept_and_cpu_experts_equals_the_reference(tiny_family, name, moe_lora):
    paths = tiny_family(name)
    reference = reference_of(paths)
    model, tok = some_experts(paths, moe_lora=moe_lora)
    blocks = offloaded_blocks(model).values()
    kept = [b.plan.resident for b in blocks if b.plan.resident is not None]
    assert kept and all(b.experts.backend.resident.sum() == len(b.plan.resident.experts) for b in blocks
                        if b.plan.resident is not None)
    assert 0 < sum(len(k.experts) for k in kept) < sum(b.experts.backend.spec.num_experts for b in blocks)
    for ids in chat_prompt_ids(tok):
        assert rel_err(logits(model, ids), logits(reference, ids)) < FP32_BOUND
    for ids, (_, answer) in zip(chat_prompt_ids(tok), TRAINED_QA):
        got = greedy(model, ids)  # on the engine: decode steps split too
        assert got == greedy(reference, ids) and answer in tok.decode(got, skip_special_tokens=True)


def test_the_kept_experts_lora_is_live(tiny_family):
    """The kept experts without their LoRA: far outside the bound (the CPU's experts kept theirs)."""
    paths = tiny_family("deepseek_v2")
    reference = reference_of(paths)
    model, tok = some_experts(paths, moe_lora="exact")
    ids = chat_prompt_ids(tok)[-1]
    assert rel_err(logits(model, ids), logits(reference, ids)) < FP32_BOUND
    for block in offloaded_blocks(model).values():
        if block.plan.resident is not None:
            block.plan.resident.lora = {}
    assert rel_err(logits(model, ids), logits(reference, ids)) > 100 * FP32_BOUND


def test_every_expert_kept_leaves_the_cpu_nothing(tiny, reference, chat_prompts, monkeypatch):
    """A budget for all experts: the CPU backend computes no routed expert at all, and the logits are the
    reference's."""
    model, tok = some_experts(tiny, share=1.0)
    blocks = offloaded_blocks(model).values()
    assert all(b.experts.backend.resident.all() for b in blocks)
    computed = []
    for block in blocks:
        backend = block.experts.backend
        monkeypatch.setattr(backend, "_project", lambda *a, b=backend: computed.append(1) or b.__class__._project(b, *a))
    ids = chat_prompts[0]
    assert rel_err(logits(model, ids), logits(reference, ids)) < FP32_BOUND and not computed


def test_kt_experts_leave_out_the_kept_ones(tiny, reference, chat_prompts):
    """kt's kernel skips the kept experts (its gpu mask): the split equals the kt model without a split, within the
    kt bound of the reference, and the trained answers come out; batched decode equals decode alone."""
    pytest.importorskip("kt_kernel")
    from ktchat.experts.kt_backend import unavailable_reason

    moe_lora = "exact" if unavailable_reason("exact", "bf16") is None else "merged"
    model, tok = load_model(tiny.model, tiny.adapter, experts_backend="kt", moe_lora=moe_lora, dtype="float32",
                            device=DEVICE, gpu_experts_gib=0.002)
    assert any(b.plan.resident is not None for b in offloaded_blocks(model).values())
    assert all(int(b.experts.backend._gpu_mask.sum()) == (len(b.plan.resident.experts) if b.plan.resident else 0)
               for b in offloaded_blocks(model).values())
    for ids, (_, answer) in zip(chat_prompts, TRAINED_QA):
        assert rel_err(logits(model, ids), logits(reference, ids)) < KT_BF16_BOUND
        assert answer in tok.decode(greedy(model, ids), skip_special_tokens=True)
    engine = engine_of(model)
    engine.keep(0, max_batch=4)
    prompts = [ids[0].tolist() for ids in chat_prompts]
    params = SamplingParams(max_new_tokens=10)
    alone = [engine.generate(p, params).tokens for p in prompts]
    assert [s.wait().tokens for s in [engine.submit(p, params) for p in prompts]] == alone


def test_placements_chosen_saved_and_read_back(tiny, tmp_path, caplog):
    """frequency ranks every layer's experts together; uniform keeps as many per layer; front the first ones; a
    placement file written by one load is read by the next (and the same experts kept)."""
    counts = {1: torch.tensor([5.0, 0, 1, 9]), 2: torch.tensor([2.0, 8, 0, 0])}
    layers = {1: 4, 2: 4}
    assert choose("frequency", counts, layers, 3).experts == {1: [0, 3], 2: [1]}
    assert choose("frequency", counts, layers, 3).covered == pytest.approx((9 + 8 + 5) / 25)
    assert choose("uniform", counts, layers, 3).experts == {1: [3], 2: [1]}
    assert choose("front", {}, layers, 4).experts == {1: [0, 1], 2: [0, 1]}
    path = tmp_path / "placement.json"
    first, _ = load_model(tiny.model, tiny.adapter, experts_backend="torch", dtype="float32", device=DEVICE,
                          gpu_experts_gib=0.002, gpu_experts_placement=str(path))
    saved = json.loads(path.read_text())
    assert saved["strategy"] == "frequency" and saved["layers"]
    again, _ = load_model(tiny.model, tiny.adapter, experts_backend="torch", dtype="float32", device=DEVICE,
                          gpu_experts_gib=0.002, gpu_experts_placement=str(path))
    kept = lambda m: {b.layer_idx: b.plan.resident.experts for b in offloaded_blocks(m).values()  # noqa: E731
                      if b.plan.resident is not None}
    assert kept(again) == kept(first) == {int(k): v for k, v in saved["layers"].items()}


@pytest.mark.parametrize("content, message", [
    ("not json", "is not a placement ktchat wrote"),
    ('{"layers": {"9": [0]}}', "names layer 9, which has no routed experts"),
    ('{"layers": {"1": [0, 0, 77]}}', r"layer 1 names experts \[77\]"),
])
def test_a_bad_placement_file_is_one_line(tmp_path, content, message):
    path = tmp_path / "p.json"
    path.write_text(content)
    with pytest.raises(KTChatError, match=message):
        Placement.load(path, {1: 8, 2: 8})


@pytest.mark.parametrize("settings, message", [
    (dict(gpu_experts_gib=-1), "gpu_experts_gib must be a finite number > 0"),
    (dict(gpu_experts_gib=1, gpu_experts_placement="random"), "gpu_experts_placement must be one of frequency"),
    (dict(gpu_experts_gib=1, gpu_experts_calibration="/no/such/file"), "gpu_experts_calibration must be a file"),
])
def test_bad_settings_are_one_line_before_the_load(tiny, settings, message, monkeypatch):
    from ktchat.model import loader

    monkeypatch.setattr(loader, "load_checkpoint", lambda *a, **k: pytest.fail("loaded before the check"))
    with pytest.raises(KTChatError, match=re.escape(message) if "[" not in message else message):
        load_model(tiny.model, tiny.adapter, experts_backend="torch", device="cpu", **settings)
    if DEVICE == "cpu":
        with pytest.raises(KTChatError, match="gpu_experts_gib: auto reads the GPU's free memory"):
            load_model(tiny.model, tiny.adapter, experts_backend="torch", device="cpu", gpu_experts_gib="auto")
