"""Many sequences at once on the engine (continuous batching, ktchat.engine): with fp32 torch experts every reply
equals the same request's reply alone, token for token, whoever joins or leaves; prompts joining beside running
sequences go in chunks; per-sequence settings (seeds, budgets, stop checks) stay per sequence."""

from __future__ import annotations

import threading

import pytest
import torch

from ktchat import load_model
from ktchat.engine import SamplingParams
from ktchat.model import engine_of
from ktchat.tinymodels import TRAINED_QA

from reference import DEVICE, chat_prompt_ids, greedy

FAMILIES = ("deepseek_v2", "qwen3_moe", "qwen3_5_moe_text")  # MLA absorbed, GQA, hybrid linear attention


def engine_for(paths, backend="torch", **keep):
    model, tok = load_model(paths.model, paths.adapter, experts_backend=backend, dtype="float32", device=DEVICE)
    engine = engine_of(model)
    engine.keep(**{"conversations": 0, "max_batch": 4, **keep})
    return model, tok, engine


def requests(tok) -> list[list[int]]:
    """The trained questions, the 172-token chat, and a continuation of the first question's conversation."""
    prompts = [p[0].tolist() for p in chat_prompt_ids(tok)]
    return prompts + [prompts[0] + [5, 6, 7] + prompts[1]]


def solo(engine, prompts, params) -> list[list[int]]:
    return [engine.generate(p, params).tokens for p in prompts]


@pytest.mark.parametrize("name", FAMILIES)
def test_batched_replies_equal_solo_replies_whoever_joins_or_leaves(tiny_family, name):
    """Six requests through 4 places: two wait, join as others leave (budgets of 3 to 24 tokens), and the long
    prompts compute in 16-token chunks between the running ones' steps."""
    paths = tiny_family(name)
    model, tok, engine = engine_for(paths)
    engine.prefill_chunk = 16
    prompts = requests(tok)
    budgets = [24, 3, 12, 24, 7, 24][:len(prompts)]
    alone = [engine.generate(p, SamplingParams(max_new_tokens=n)).tokens for p, n in zip(prompts, budgets)]
    steps = engine.runner.steps
    sequences = [engine.submit(p, SamplingParams(max_new_tokens=n)) for p, n in zip(prompts, budgets)]
    together = [s.wait().tokens for s in sequences]
    assert together == alone
    assert engine.runner.steps - steps < sum(len(t) for t in alone) - len(alone)  # steps were shared
    for (question, answer), tokens in zip(TRAINED_QA, together):
        assert answer.startswith(tok.decode(tokens, skip_special_tokens=True)[:8])


def test_a_sequence_joining_mid_stream_and_one_cancelled(tiny, reference):
    """A request submitted while another decodes joins at the next step; a cancelled one leaves at its next step and
    frees its place; the others' replies are their replies alone, and equal the reference's."""
    model, tok, engine = engine_for(tiny)
    prompts = requests(tok)
    params = SamplingParams(max_new_tokens=20, stop_ids=(tok.eos_token_id,))
    alone = solo(engine, prompts[:3], params)
    joined: list = []

    def join_after_three(token, counter=[0]):  # noqa: B006 - the first sequence's own counter
        counter[0] += 1
        if counter[0] == 3:
            joined.append(engine.submit(prompts[1], params))

    first = engine.submit(prompts[0], params, on_token=join_after_three)
    doomed = engine.submit(prompts[2], SamplingParams(max_new_tokens=200, stop_ids=()))
    doomed.cancel()
    assert first.wait().tokens == alone[0] and joined[0].wait().tokens == alone[1]
    assert doomed.wait().finish_reason == "cancelled" and len(doomed.out.tokens) < 200
    assert engine.stats() == {"running": 0, "waiting": 0, "max_batch": 4}
    assert alone[0] == greedy(reference, torch.tensor([prompts[0]]), 20)


def test_seeded_sampling_per_sequence_in_a_batch(tiny):
    """Each sequence samples from its own seeded generator: batched or alone, the same seed gives the same reply."""
    model, tok, engine = engine_for(tiny)
    prompts = requests(tok)[:3]
    sampled = [SamplingParams(max_new_tokens=16, do_sample=True, temperature=1.5, top_k=40, seed=s) for s in (1, 2, 3)]
    alone = [engine.generate(p, s).tokens for p, s in zip(prompts, sampled)]
    together = [s.wait().tokens for s in [engine.submit(p, s) for p, s in zip(prompts, sampled)]]
    assert together == alone


def test_kt_experts_take_the_whole_batch_in_one_call(tiny, monkeypatch):
    """kt experts bound per batch size: each decode step of a batch runs one kernel task per layer for all its
    rows (counted), and the replies are those of the requests alone."""
    pytest.importorskip("kt_kernel")
    from ktchat.experts import kt_backend

    model, tok, engine = engine_for(tiny, backend="kt")
    prompts = requests(tok)[:3]
    params = SamplingParams(max_new_tokens=12)
    alone = solo(engine, prompts, params)
    submits = []
    submit = kt_backend._BoundKT.submit
    monkeypatch.setattr(kt_backend._BoundKT, "submit", lambda self, stream=None: (submits.append(self), submit(self, stream))[1])
    steps = engine.runner.steps
    together = [s.wait().tokens for s in [engine.submit(p, params) for p in prompts]]
    assert together == alone
    layers = sum(1 for m in model.modules() if getattr(m, "_bound", None) is not None)
    assert len(submits) == (engine.runner.steps - steps) * layers  # one task per layer per step, all rows in it
    assert max(int(b._bsz[0]) for b in submits) == len(prompts)


def test_engine_threads_end_with_close(tiny):
    model, tok, engine = engine_for(tiny)
    sequence = engine.submit(requests(tok)[0], SamplingParams(max_new_tokens=500, stop_ids=()))
    engine.close()
    assert sequence.wait().finish_reason == "cancelled"
    assert not any(t.name == "ktchat-engine" and t.is_alive() for t in threading.enumerate() if t is engine._thread)
