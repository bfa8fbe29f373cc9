"""The conversation's cache kept across turns by the engine (ktchat.engine.slots): a turn computes only what is new,
and its replies equal a fresh prefill's, token for token, for attention-only and hybrid linear-attention families;
a hybrid model whose template rewrites the previous reply resumes from a saved copy of its state."""

from __future__ import annotations

import pytest
import torch

from ktchat.config import GenerationArgs
from ktchat.generate import ChatSession, Prompts
from ktchat.model import engine_of, load_model
from ktchat.tinymodels import TRAINED_QA

from reference import DEVICE

TURNS = [q for q, _ in TRAINED_QA] + [TRAINED_QA[0][0], "And once more: " + TRAINED_QA[1][0]]
# The tiny template with a thinking note that the history drops, as Qwen's templates drop earlier turns' reasoning:
# each prompt ends in "Let me think.<|assistant|>", which the next prompt renders as plain "<|assistant|>".
THINKING = "Let me think."
REWRITING_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>{{ message['content'] }}{{ eos_token }}"
    "{% elif message['role'] == 'user' %}<|user|>{{ message['content'] }}{{ eos_token }}"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}" + THINKING + "<|assistant|>{% endif %}"
)


class FedCounter:
    """Tokens fed through the model's embedding: a turn's prefill plus one per decode step."""

    def __init__(self, model):
        self.fed = 0
        model.get_input_embeddings().register_forward_pre_hook(lambda _, args: self.count(args[0]))

    def count(self, ids):
        self.fed += ids.shape[-1]

    def turn(self, session: ChatSession, text: str) -> tuple[str, int]:
        """(the reply, the prompt tokens computed for it)."""
        self.fed, steps = 0, session.engine.runner.steps
        reply = session.reply(text)
        return reply, self.fed - (session.engine.runner.steps - steps)


def sessions(paths, template=None):
    """(a session keeping its cache, a session on its own model computing every turn whole)."""
    def session(keep: bool):
        model, tok = load_model(paths.model, paths.adapter, experts_backend="torch", dtype="float32", device=DEVICE)
        if template:
            tok.chat_template = template
        engine_of(model).keep(1 if keep else 0)
        return ChatSession(model, tok, GenerationArgs(do_sample=False, max_new_tokens=24), Prompts(model, tok))

    return session(True), session(False)


@pytest.mark.parametrize("name, grow", [("deepseek_v2", False), ("qwen3_moe", False), ("qwen3_5_moe_text", False),
                                        ("deepseek_v2", True), ("qwen3_5_moe_text", True)])
def test_late_turns_compute_only_the_new_turn_and_answer_as_a_fresh_prefill(tiny_family, name, grow):
    """Attention KV, MLA latents and a hybrid model's recurrent state kept; also where each turn outgrows the cache
    (16 positions at least: what the slots hold is copied into the bigger cache)."""
    kept, fresh = sessions(tiny_family(name))
    if grow:
        kept.engine.min_cache_tokens = 16
    counter, fresh_counter = FedCounter(kept.model), FedCounter(fresh.model)
    lengths = set()
    for i, text in enumerate(TURNS):
        history = len(kept.prompt_ids(text))
        held = len(kept.engine.table.held[0].ids)
        reply, computed = counter.turn(kept, text)
        want, fresh_computed = fresh_counter.turn(fresh, text)
        assert reply == want
        assert fresh_computed == history and fresh.engine.last_reused == 0
        if i:  # what the slot held reused: only the last reply token and the new turn are computed
            assert held > 0 and kept.engine.last_reused == held and computed == history - held
        lengths.add(kept.engine.cache.length)
    assert computed < history / 4, (computed, history)  # the last turn: a fraction of the conversation
    assert [m["content"] for m in kept.history] == [m["content"] for m in fresh.history]
    assert len(lengths) > 1 if grow else len(lengths) == 1


def test_cache_cut_back_when_the_history_changes(tiny_family):
    """An edited history (the last reply replaced) shares only a prefix: the cache is cut back to it, and the reply
    still equals a fresh prefill's."""
    kept, fresh = sessions(tiny_family("deepseek_v2"))
    counter = FedCounter(kept.model)
    for session in (kept, fresh):
        session.reply(TURNS[0])
        session.reply(TURNS[1])
        session.history[-1]["content"] = "Something else entirely."
    held, prompt = len(kept.engine.table.held[0].ids), len(kept.prompt_ids(TURNS[2]))
    reply, computed = counter.turn(kept, TURNS[2])
    assert reply == fresh.reply(TURNS[2])
    assert 0 < kept.engine.last_reused < held and computed == prompt - kept.engine.last_reused


def test_hybrid_rewritten_history_resumes_from_the_saved_state(tiny_family):
    """Qwen3.5-MoE (Gated DeltaNet state, which cannot be cut back) under a template that renders the previous reply
    differently from the prompt it answered: once the engine has seen the rewrite, each turn resumes from the state
    it saved just before the rewritten part and computes only the tokens after it, counted, not the whole history."""
    kept, fresh = sessions(tiny_family("qwen3_5_moe_text"), REWRITING_TEMPLATE)
    rewritten = len(kept.tokenizer(THINKING + "<|assistant|>", add_special_tokens=False)["input_ids"])
    counter = FedCounter(kept.model)
    previous = None
    for i, text in enumerate(TURNS):
        prompt = kept.prompt_ids(text)
        reply, computed = counter.turn(kept, text)
        assert reply == fresh.reply(text) and reply
        assert computed == len(prompt) - kept.engine.last_reused
        if i >= 2:  # turn 1 found the rewrite; from turn 2 on a state was saved just before it
            assert kept.engine.last_reused == len(previous) - rewritten, (i, kept.engine.last_reused, len(previous))
        previous = prompt
    assert computed < len(prompt) / 2, (computed, len(prompt))  # the last reply and the new turn, not the history


def test_hybrid_without_saved_states_computes_rewritten_turns_whole(tiny_family, monkeypatch):
    """The control: with no saved states kept, the rewritten history shares a prefix the recurrent state cannot be
    cut back to, and every turn is computed from the start."""
    from ktchat.engine import generator

    monkeypatch.setattr(generator, "SAVED_PER_SLOT", 0)
    kept, _ = sessions(tiny_family("qwen3_5_moe_text"), REWRITING_TEMPLATE)
    counter = FedCounter(kept.model)
    for text in TURNS[:3]:
        prompt = kept.prompt_ids(text)
        _, computed = counter.turn(kept, text)
    assert kept.engine.last_reused == 0 and computed == len(prompt)


def test_clear_and_a_failed_turn_drop_the_cache(tiny, monkeypatch):
    kept, _ = sessions(tiny)
    kept.reply(TURNS[0])
    assert kept.engine.kept() == 1
    kept.clear()
    assert kept.engine.kept() == 0
    kept.reply(TURNS[0])
    monkeypatch.setattr(kept.engine.runner, "prefill", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        kept.reply(TURNS[1])
    assert kept.engine.kept() == 0
    assert torch.is_tensor(kept.engine.cache.rows)  # the cache itself stays for the next turn


def test_saved_states_count_in_the_memory_budget(tiny_family):
    """A hybrid model's saved states live within the kept-cache budget: with room for one copy beside the slot, the
    oldest copies go (the conversation itself is kept and continued from its live state)."""
    kept, _ = sessions(tiny_family("qwen3_5_moe_text"))
    kept.reply(TURNS[0])
    cache = kept.engine.cache
    kept.engine.keep(1, max_bytes=cache.slot_bytes() + cache.linear_bytes())
    for text in TURNS[1:4]:
        held = len(kept.engine.table.held[0].ids)
        kept.reply(text)
        assert len(kept.engine._saved) == len(kept.engine.table.held[0].saved) == 1
    assert kept.engine.last_reused == held > 0
