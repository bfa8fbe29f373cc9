"""The tiny model end to end on kt_kernel experts (fp32 everywhere else) against the fp32 hand-merged reference."""

from __future__ import annotations

import pytest

from ktchat import load_model
from ktchat.tinymodels import TRAINED_QA

from reference import DEVICE, greedy, logits, near_tie_problems, rel_err
from tolerances import KT_BOUND

# (moe_lora, kt_method): the kt expert kernels, judged on the trained questions by tolerances.KT_BOUND.
MODES = [("exact", "bf16"), ("merged", "bf16"), ("merged", "int8")]


@pytest.mark.parametrize("moe_lora,method", MODES, ids=[f"{m}-{k}" for m, k in MODES])
def test_kt_experts_match_reference_and_answer(tiny, reference, chat_prompts, moe_lora, method):
    pytest.importorskip("kt_kernel")
    from ktchat.experts.kt_backend import unavailable_reason

    reason = unavailable_reason(moe_lora, method)
    if reason:
        pytest.skip(reason)
    model, tok = load_model(
        tiny.model, tiny.adapter, experts_backend="kt", dtype="float32", device=DEVICE, moe_lora=moe_lora,
        kt_method=method,
    )
    *questions, conversation = chat_prompts
    bound = KT_BOUND[method]
    for ids in questions:
        assert rel_err(logits(model, ids), logits(reference, ids)) < bound
    # 172 positions of a long history: the rounding compounds (AMX int8 measured 7.4e-2 here), and a routing
    # near-tie may flip (avx512_bf16 exact bf16: position 137, margin 0.27 ulp, 0.57 there, 4.4e-2 overall).
    problems = near_tie_problems(model, reference, conversation, 2 * bound)
    assert not problems, problems
    for ids, (_, answer) in zip(chat_prompts, TRAINED_QA + TRAINED_QA[:1]):
        assert answer in tok.decode(greedy(model, ids), skip_special_tokens=True)



def test_the_per_position_rule_rejects_missing_expert_lora(tiny, reference, chat_prompts):
    """near_tie_problems can fail: the experts without their LoRA err beyond KT_BOUND at positions that are no
    near-ties."""
    from ktchat.model import offloaded_blocks

    model, _ = load_model(tiny.model, tiny.adapter, experts_backend="torch", dtype="float32", device=DEVICE)
    for block in offloaded_blocks(model).values():
        block.experts.backend.set_lora({})
    problems = near_tie_problems(model, reference, chat_prompts[-1], 2 * KT_BOUND["bf16"])
    assert any("no near-tie" in p for p in problems), problems

def test_experts_read_in_place_equal_converted(tiny, tmp_path, chat_prompts):
    """The tiny checkpoint is bf16: its experts are read by threads straight into the kt buffers (then each layer
    packed on a thread). An fp32 copy of it must be converted tensor by tensor instead (and packed by the caller).
    Same weights after rounding: the same logits, bit for bit."""
    pytest.importorskip("kt_kernel")
    import shutil

    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from ktchat.experts.kt_backend import unavailable_reason

    if unavailable_reason("merged", "bf16"):
        pytest.skip(unavailable_reason("merged", "bf16"))
    shard = next(tiny.model.glob("*.safetensors"))
    with safe_open(str(shard), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys() if ".experts." in k} == {"BF16"}
    fp32 = tmp_path / "model-fp32"
    shutil.copytree(tiny.model, fp32)
    for shard in fp32.glob("*.safetensors"):
        save_file({k: v.float() for k, v in load_file(shard).items()}, str(shard), metadata={"format": "pt"})
    got = {}
    for name, path in (("in place", tiny.model), ("converted", fp32)):
        model, _ = load_model(path, tiny.adapter, experts_backend="kt", moe_lora="merged", dtype="bfloat16",
                              device=DEVICE)
        got[name] = logits(model, chat_prompts[0])
        del model
    assert torch.equal(got["in place"], got["converted"])
