"""GPU prefill's streamed-expert math (ktchat.experts.gpu_prefill), run on the CPU as CI has no GPU: the same slots,
expert groups, LoRA application and routing combination the GPU runs, against the hand-merged fp32 reference."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ktchat import load_model
from ktchat.errors import KTChatError
from ktchat.experts.base import HostExperts
from ktchat.experts.gpu_prefill import StreamedExperts
from ktchat.model import offloaded_blocks
from ktchat.model.moe import enable_gpu_prefill

from reference import greedy, logits, rel_err
from tolerances import FP32_BOUND


# On a machine with CUDA the same tests run the real thing too: host weights pinned in place, copy stream, events.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def load_fp32(tiny, device="cpu", **kwargs):
    return load_model(tiny.model, tiny.adapter, experts_backend="torch", dtype="float32", device=device,
                      cuda_graphs=False, **kwargs)[0]


def count_streamed(model, monkeypatch) -> dict:
    """How many layer calls went through the streamed experts and through the CPU backends."""
    calls = {"streamed": 0, "cpu": 0}
    streamer = next(iter(offloaded_blocks(model).values())).plan.streamed
    forward = streamer.forward

    def streamed(*args):
        calls["streamed"] += 1
        return forward(*args)

    monkeypatch.setattr(streamer, "forward", streamed)
    for block in offloaded_blocks(model).values():
        backend = block.cpu_experts.backend
        cpu = backend.forward
        monkeypatch.setattr(backend, "forward", lambda *a, _f=cpu: (calls.__setitem__("cpu", calls["cpu"] + 1), _f(*a))[1])
    return calls


def one_expert_gib(model) -> float:
    spec = next(iter(offloaded_blocks(model).values())).cpu_experts.backend.spec
    return 3 * spec.hidden_size * spec.intermediate_size * spec.dtype.itemsize / 2**30


@pytest.fixture(scope="module", params=DEVICES)
def streamed_fp32(tiny, request):
    """GPU prefill from 2 tokens (its CPU variant on cpu), one group a layer (the default bound holds a tiny layer)."""
    model = load_fp32(tiny, request.param, gpu_prefill_tokens=2)
    streamer = next(iter(offloaded_blocks(model).values())).plan.streamed
    assert streamer.group == streamer.num_experts
    return model


def test_streamed_prefill_equals_reference(streamed_fp32, reference, prompts, monkeypatch):
    calls = count_streamed(streamed_fp32, monkeypatch)
    for ids in prompts:
        assert rel_err(logits(streamed_fp32, ids), logits(reference, ids)) < FP32_BOUND
    layers = len(offloaded_blocks(streamed_fp32))
    assert calls == {"streamed": layers * len(prompts), "cpu": 0}  # every prompt's every MoE layer streamed


def test_streamed_prefill_greedy_equals_reference_and_decode_stays_on_cpu(streamed_fp32, reference, prompts,
                                                                         monkeypatch):
    calls = count_streamed(streamed_fp32, monkeypatch)
    ids = prompts[0]
    assert greedy(streamed_fp32, ids) == greedy(reference, ids)
    assert calls["streamed"] > 0 and calls["cpu"] > 0  # the prompt streamed, one-token steps on the CPU experts


def test_short_prompts_stay_on_the_cpu_experts(tiny, reference, prompts, monkeypatch):
    model = load_fp32(tiny)
    enable_gpu_prefill(model, tokens=10_000)  # (on cpu: the CPU variant, never reached here)
    calls = count_streamed(model, monkeypatch)
    assert rel_err(logits(model, prompts[0]), logits(reference, prompts[0])) < FP32_BOUND
    assert calls["streamed"] == 0 and calls["cpu"] == len(offloaded_blocks(model))


def test_expert_groups_give_the_same_result(tiny, streamed_fp32, reference, prompts):
    """A memory bound of three experts' two slots: each layer streams in several groups, same logits."""
    model = load_fp32(tiny, str(streamed_fp32.device))
    streamer = enable_gpu_prefill(model, tokens=2, gib=2 * 3 * one_expert_gib(model))
    assert streamer.group == 3 and len(streamer.chunks) == len(streamer.order) * -(-streamer.num_experts // 3)
    for ids in prompts:
        got = logits(model, ids)
        assert rel_err(got, logits(reference, ids)) < FP32_BOUND
        assert rel_err(got, logits(streamed_fp32, ids)) < 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_merged_on_the_device_equals_reference(tiny, reference, prompts, device):
    """The merged mode's math (kt merged: base weights + LoRA folded in the slot once they arrive), in groups."""
    model = load_fp32(tiny, device)
    blocks = offloaded_blocks(model)
    hosts = {i: b.cpu_experts.backend.host_experts() for i, b in blocks.items()}
    bases = {i: HostExperts({p: w.clone() for p, w in h.weights.items()}, h.lora, merge=True) for i, h in hosts.items()}
    streamer = StreamedExperts(bases, device, int(2 * 5 * one_expert_gib(model) * 2**30))
    assert streamer.group == 5
    for block in blocks.values():
        block.plan = dataclasses.replace(block.plan, streamed=streamer, stream_from=2)
    for _ in range(2):  # merged in the slot, never twice into the same weights
        for ids in prompts:
            assert rel_err(logits(model, ids), logits(reference, ids)) < FP32_BOUND


def test_dropping_expert_lora_breaks_the_match(tiny, reference, reference_without_expert_lora, prompts):
    model = load_fp32(tiny)
    for block in offloaded_blocks(model).values():
        block.cpu_experts.backend.set_lora({})
    enable_gpu_prefill(model, tokens=2)
    for ids in prompts:
        got = logits(model, ids)
        assert rel_err(got, logits(reference, ids)) > 100 * FP32_BOUND
        assert rel_err(got, logits(reference_without_expert_lora, ids)) < FP32_BOUND


@pytest.mark.parametrize("kwargs, message", [
    ({"gpu_prefill_tokens": 0}, "gpu_prefill_tokens must be auto, off or an integer >= 1 (got 0)"),
    ({"gpu_prefill_tokens": "fast"}, "gpu_prefill_tokens must be auto, off or an integer >= 1 (got 'fast')"),
    ({"gpu_prefill_gib": -1}, "gpu_prefill_gib must be a finite number > 0 (got -1)"),
    ({"gpu_prefill_tokens": "auto"}, "gpu_prefill_tokens: auto measures the host-to-GPU link, but the model is on cpu"),
])
def test_bad_settings_are_one_line(tiny, kwargs, message):
    with pytest.raises(KTChatError, match="^" + message.replace("(", r"\(").replace(")", r"\)") + "$"):
        load_fp32(tiny, **kwargs)


def test_a_bound_below_two_experts_is_refused(tiny):
    model = load_fp32(tiny)
    with pytest.raises(KTChatError, match="gpu_prefill_gib: .* cannot hold two experts"):
        enable_gpu_prefill(model, tokens=2, gib=one_expert_gib(model))


def test_grouped_matmuls_and_expert_by_expert_agree(tiny, reference, prompts):
    """The grouped path (a few kernels a group) and the per-expert fallback compute the same products."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip(f"torch {torch.__version__} has no grouped matmul: expert by expert only")
    model = load_fp32(tiny)
    streamer = enable_gpu_prefill(model, tokens=2, gib=2 * 3 * one_expert_gib(model))
    grouped = [logits(model, ids) for ids in prompts]
    assert streamer.grouped is True  # torch's CPU grouped matmul ran (CUDA fp32 falls back: the other tests)
    streamer.grouped = False
    for ids, want in zip(prompts, grouped):
        got = logits(model, ids)
        assert rel_err(got, want) < 1e-5
        assert rel_err(got, logits(reference, ids)) < FP32_BOUND


KT_MODES = [("exact", "bf16"), ("merged", "bf16"), ("merged", "int8")]


@pytest.mark.parametrize("moe_lora,method", KT_MODES, ids=[f"{m}-{k}" for m, k in KT_MODES])
def test_kt_experts_stream_their_kept_bf16_weights(tiny, reference, chat_prompts, moe_lora, method, monkeypatch):
    """kt keeps its bf16 weights for GPU prefill only when asked (a second host copy); streamed, they meet the
    reference as the kt kernels do (bf16 weights; merged int8 streams the bf16 weights, merged there)."""
    pytest.importorskip("kt_kernel")
    from ktchat.experts.kt_backend import unavailable_reason
    from tolerances import KT_BF16_BOUND

    if reason := unavailable_reason(moe_lora, method):
        pytest.skip(reason)
    kwargs = dict(experts_backend="kt", dtype="float32", device="cpu", moe_lora=moe_lora, kt_method=method)
    model = load_model(tiny.model, tiny.adapter, **kwargs)[0]
    assert all(b.plan.streamed is None and b.cpu_experts.backend.host_experts() is None
               for b in offloaded_blocks(model).values())  # by default kt holds its packed copy only
    with pytest.raises(KTChatError, match="keep no host copy to stream"):
        enable_gpu_prefill(model, tokens=2)
    model = load_model(tiny.model, tiny.adapter, gpu_prefill_tokens=2, **kwargs)[0]
    calls = count_streamed(model, monkeypatch)
    for ids in chat_prompts[:-1]:
        assert rel_err(logits(model, ids), logits(reference, ids)) < KT_BF16_BOUND
    assert calls["cpu"] == 0 and calls["streamed"] > 0
