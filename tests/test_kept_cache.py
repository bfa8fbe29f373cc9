"""The conversation's KV cache kept across turns (ktchat.generate.prefix): a turn prefills only what is new, and
its replies equal a fresh prefill's, token for token, for attention-only and hybrid linear-attention families."""

from __future__ import annotations

import logging

import pytest
import torch

from ktchat.config import GenerationArgs
from ktchat.generate import ChatSession, Prompts
from ktchat.model import load_model
from ktchat.tinymodels import TRAINED_QA

from reference import DEVICE

TURNS = [q for q, _ in TRAINED_QA] + [TRAINED_QA[0][0], "And once more: " + TRAINED_QA[1][0]]


class PrefillCounter:
    """Token counts of every forward through the model's embedding: the first of a turn is its prefill."""

    def __init__(self, model):
        embed = model.get_input_embeddings()
        self.calls: list[int] = []
        self.handle = embed.register_forward_pre_hook(lambda _, args: self.calls.append(args[0].shape[-1]))

    def turn(self, session: ChatSession, text: str) -> tuple[str, int]:
        self.calls.clear()
        reply = session.reply(text)
        return reply, self.calls[0]


def sessions(paths, static: bool = False):
    """(model, a session keeping its cache, a session on its own model prefilling every turn whole)."""
    def load():
        return load_model(paths.model, paths.adapter, experts_backend="torch", dtype="float32", device=DEVICE)

    model, tok = load()
    if static:  # the static-cache decode CUDA graphs use, run eagerly (it is the same cache)
        from ktchat.model.decode import enable_static_decode

        enable_static_decode(model, cuda_graphs=False)
    generation = GenerationArgs(do_sample=False, max_new_tokens=24)
    kept = ChatSession(model, tok, generation, Prompts(model, tok))
    other = load()[0] if static else model  # the static cache is the model's: a fresh session needs its own
    fresh = ChatSession(other, tok, generation, Prompts(other, tok))
    fresh.kept = None  # every turn prefills the whole conversation, as before
    return model, kept, fresh


@pytest.mark.parametrize("name, static", [("deepseek_v2", False), ("qwen3_5_moe_text", False), ("deepseek_v2", True),
                                          ("qwen3_moe", True), ("qwen3_moe", "grow"),
                                          ("deepseek_v2", "grow")])
def test_late_turns_prefill_only_the_new_turn_and_answer_as_a_fresh_prefill(tiny_family, name, static, monkeypatch):
    """On a DynamicCache the session keeps; on the static cache (static decode keeps the last conversation), also
    where each turn outgrows it (a 16-token minimum: the tokens held are copied into the bigger cache)."""
    if static == "grow":
        from ktchat.model import decode

        monkeypatch.setattr(decode, "_MIN_CACHE", 16)
        monkeypatch.setattr(decode, "_MIN_CACHE_ABSORBED", 16)
    model, kept, fresh = sessions(tiny_family(name), bool(static))
    counter, fresh_counter = PrefillCounter(model), PrefillCounter(fresh.model)
    if static:
        counter.turn(kept, "hello")  # static decode finds out whether this transformers can hold a static cache
        inner = model.get_base_model()
        if inner.static_decode.eager_reason:
            pytest.skip(inner.static_decode.eager_reason)
        kept.clear()
    for i, text in enumerate(TURNS):
        history = len(kept.input_ids(text)[0])
        held = len(model.get_base_model().static_decode.held) if static else len(kept.kept.ids)
        reply, prefilled = counter.turn(kept, text)
        want, fresh_prefill = fresh_counter.turn(fresh, text)
        assert reply == want
        assert fresh_prefill == history  # the fresh session prefills everything, every turn
        if i:  # the whole kept cache reused: only the last reply token and the new turn are prefilled
            assert held > 0 and kept.kept.reused == held and prefilled == history - held
    assert prefilled < history / 4, (prefilled, history)  # the last turn: a fraction of the conversation
    assert [m["content"] for m in kept.history] == [m["content"] for m in fresh.history]


def test_cache_cut_back_when_the_history_changes(tiny_family, caplog):
    """An edited history (the last reply replaced) shares only a prefix: the cache is cut back to it, and the reply
    still equals a fresh prefill's."""
    model, kept, fresh = sessions(tiny_family("deepseek_v2"))
    counter = PrefillCounter(model)
    for session in (kept, fresh):
        session.reply(TURNS[0])
        session.reply(TURNS[1])
        session.history[-1]["content"] = "Something else entirely."
    held, prompt = len(kept.kept.ids), len(kept.input_ids(TURNS[2])[0])
    with caplog.at_level(logging.INFO, logger="ktchat.generate.prefix"):
        reply, prefilled = counter.turn(kept, TURNS[2])
    assert reply == fresh.reply(TURNS[2])
    assert 0 < kept.kept.reused < held and prefilled == prompt - kept.kept.reused
    assert not caplog.messages  # cut back, not started afresh
    counter.handle.remove()


def test_clear_and_a_failed_turn_drop_the_cache(tiny):
    model, kept, _ = sessions(tiny)
    kept.reply(TURNS[0])
    assert kept.kept.ids
    kept.clear()
    assert kept.kept.ids == [] and kept.kept.cache is None
    kept.reply(TURNS[0])
    kept._generate_kwargs["no_such_generate_arg"] = 1
    with pytest.raises(ValueError):
        kept.reply(TURNS[1])
    assert kept.kept.ids == [] and kept.kept.cache is None
