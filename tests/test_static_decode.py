"""Decoding on a static KV cache (ktchat.model.decode): the same tokens and scores as eager decoding and the
reference. On CUDA (KTCHAT_TEST_DEVICE=cuda) each token is one replayed CUDA graph with the kt experts inside;
on the CPU the same step runs eagerly on the same fixed buffers."""

from __future__ import annotations

import pytest
import torch

from ktchat import KTChatError, load_model
from ktchat.model.decode import enable_static_decode
from ktchat.tinymodels import TRAINED_QA

from reference import DEVICE, greedy, rel_err

NEW_TOKENS = 16


def scored(model, ids, n=NEW_TOKENS, **kwargs):
    ids = ids.to(model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                         do_sample=False, output_scores=True, return_dict_in_generate=True, **kwargs)
    return out.sequences[0, ids.shape[1]:].tolist(), torch.stack(out.scores).float().cpu()


def static(model):
    """The model's static decode: installed by load_model on one GPU, installed here (no graphs) on the CPU."""
    inner = model.get_base_model()
    return inner.static_decode if DEVICE == "cuda" else enable_static_decode(model, cuda_graphs=False)


def eager_then_static(model, prompts, **kwargs):
    inner = model.get_base_model()
    installed = getattr(inner, "static_decode", None)
    if installed is not None:  # compare against the unwrapped methods
        inner.generate, inner.forward = installed._generate, installed._forward
        del inner.static_decode
    eager = [scored(model, ids, **kwargs) for ids in prompts]
    if installed is not None:
        inner.generate, inner.forward, inner.static_decode = installed.generate, installed.forward, installed
    sd = static(model)
    return eager, [scored(model, ids, **kwargs) for ids in prompts], sd


def test_static_cache_decode_equals_eager_and_reference(tiny, reference, chat_prompts, static_decode_capable):
    """torch experts in fp32: the static cache, the device-side mask and the position bookkeeping are exact."""
    model, _ = load_model(tiny.model, tiny.adapter, experts_backend="torch", dtype="float32", device=DEVICE)
    eager, stat, sd = eager_then_static(model, chat_prompts)
    assert sd._signature is not None, "no decode step went through the static path"
    for ids, (eager_tokens, eager_scores), (tokens, scores) in zip(chat_prompts, eager, stat):
        assert tokens == eager_tokens == greedy(reference, ids, NEW_TOKENS)
        assert rel_err(scores, eager_scores) < 1e-5


def test_kt_experts_bound_in_the_decode_step(tiny, reference, chat_prompts, static_decode_capable):
    """kt experts on fixed buffers, queued from the step (inside the CUDA graph on a GPU): same replies."""
    pytest.importorskip("kt_kernel")
    model, tok = load_model(tiny.model, tiny.adapter, experts_backend="kt", dtype="float32", device=DEVICE)
    eager, stat, sd = eager_then_static(model, chat_prompts)
    assert sd._signature is not None
    assert all(e._bound is not None for e in sd._experts), "the kt experts were not bound"
    if DEVICE == "cuda":
        assert sd._graph is not None, "the decode step was not captured"
    for (eager_tokens, eager_scores), (tokens, scores) in zip(eager, stat):
        assert tokens == eager_tokens
        assert rel_err(scores, eager_scores) < 1e-3  # bf16 experts: fp32 rounding elsewhere can flip a bf16 ulp
    for (tokens, _), (_, answer) in zip(stat, TRAINED_QA):
        assert answer in tok.decode(tokens, skip_special_tokens=True)


def test_cache_regrows_and_other_calls_pass_through(tiny, chat_prompts, static_decode_capable, monkeypatch):
    """A longer request gets a longer cache; beams and batches take transformers' own path."""
    from ktchat.model import decode

    monkeypatch.setattr(decode, "_MIN_CACHE_ABSORBED", decode._MIN_CACHE)  # absorbed MLA starts at 4,096 tokens
    model, _ = load_model(tiny.model, tiny.adapter, experts_backend="torch", dtype="float32", device=DEVICE)
    sd = static(model)
    ids = chat_prompts[0]
    short = scored(model, ids, n=4)
    first_len = sd.cache_len
    long_tokens, _ = scored(model, ids, n=first_len)  # needs more than the first cache holds
    assert sd.cache_len > first_len
    assert long_tokens[:len(short[0])] == short[0]
    beams = model.generate(ids.to(model.device), attention_mask=torch.ones_like(ids).to(model.device),
                           max_new_tokens=4, num_beams=2, do_sample=False)
    assert beams.shape == (1, ids.shape[1] + 4)


def test_cuda_graphs_need_one_gpu(tiny):
    if DEVICE == "cuda":
        pytest.skip("checks the CPU-only refusal")
    with pytest.raises(KTChatError, match="cuda_graphs: true needs every non-expert weight on one CUDA device"):
        load_model(tiny.model, tiny.adapter, experts_backend="torch", dtype="float32", device="cpu", cuda_graphs=True)


def test_prompt_longer_than_the_kt_chunk_is_split_exactly(tiny, reference, chat_prompts, monkeypatch):
    """kt's kernel buffers hold chunk_size tokens (KTExperts.chunk_size, the SFT kernel's max_len): a longer prompt
    goes through in chunks, with the logits of one unchunked call, then decodes on the static cache."""
    pytest.importorskip("kt_kernel")
    from ktchat.experts import kt_backend
    from ktchat.model.moe import CPUExperts

    from reference import logits

    model, _ = load_model(tiny.model, tiny.adapter, experts_backend="kt", dtype="float32", device=DEVICE)
    experts = [m.backend for m in model.modules() if isinstance(m, CPUExperts)]
    ids = chat_prompts[-1]  # the 172-token chat
    whole = logits(model, ids)
    calls = []
    run = kt_backend._run
    monkeypatch.setattr(kt_backend, "_run", lambda pool, task: (calls.append(1), run(pool, task))[1])
    for backend in experts:
        backend.chunk_size = 64  # below the kernel's buffers (sized at load for the default chunk): safe to shrink
    chunked = logits(model, ids)
    assert len(calls) == len(experts) * 3, len(calls)  # 172 tokens: 64 + 64 + 44 per layer
    assert rel_err(chunked, whole) < 1e-6
    assert greedy(reference, ids, 4) == chunked[0, -1:].argmax(-1).tolist() + greedy(reference, ids, 4)[1:]
    sd = static(model)
    assert scored(model, ids, n=4)[0] == greedy(reference, ids, 4)
    assert sd._signature is not None or sd.eager_reason  # transformers 4.57: MLA decodes eagerly, saying why


def test_conversation_outgrowing_the_static_cache_is_carried_over(tiny, reference, chat_prompts, monkeypatch,
                                                                  static_decode_capable):
    """A follow-up longer than the static cache: a bigger cache holds the kept tokens (copied, not prefilled again),
    and the reply equals the reference's."""
    from ktchat.model import decode

    monkeypatch.setattr(decode, "_MIN_CACHE", 16)
    monkeypatch.setattr(decode, "_MIN_CACHE_ABSORBED", 16)
    model, _ = load_model(tiny.model, tiny.adapter, experts_backend="torch", dtype="float32", device=DEVICE)
    sd = static(model)
    first = chat_prompts[0]
    tokens, _ = scored(model, first, n=4)
    small = sd.cache_len
    follow = torch.cat([first, torch.tensor([tokens]), chat_prompts[-1]], dim=1)  # the chat goes on, past the cache
    assert follow.shape[1] + 4 > small
    got, _ = scored(model, follow, n=4)
    assert sd.cache_len > small and sd.reused == first.shape[1] + len(tokens) - 1
    assert got == greedy(reference, follow, 4)
