"""ktchat's generation engine (ktchat.engine) behind `model.generate`: the same tokens and scores as transformers' own
generate on the same model, and as the reference; its cache grows and carries a conversation over; what it does not
run goes to transformers' generate. On CUDA (KTCHAT_TEST_DEVICE=cuda) each token is one replayed CUDA graph with the
kt experts inside; on the CPU the same step runs eagerly on the same fixed buffers."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationMixin, LogitsProcessor, StoppingCriteria, TextIteratorStreamer

from ktchat import KTChatError, load_model
from ktchat.model import engine_of
from ktchat.model.moe import CPUExperts
from ktchat.tinymodels import TRAINED_QA

from reference import DEVICE, greedy, rel_err

NEW_TOKENS = 16


def run(generate, model, ids, n=NEW_TOKENS, **kwargs):
    """(new tokens, scores) of one generate call, engine or transformers'."""
    ids = ids.to(model.device)
    out = generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, output_scores=True,
                   return_dict_in_generate=True, **{"do_sample": False, **kwargs})
    return out.sequences[0, ids.shape[1]:].tolist(), torch.stack(out.scores).float().cpu()


def transformers_generate(model):
    """transformers' own generate on the very same model (its PEFT layers in place): the loop ktchat replaces."""
    inner = model.get_base_model()
    return lambda *args, **kwargs: GenerationMixin.generate(inner, *args, **kwargs)


def torch_model(tiny, **kwargs):
    return load_model(tiny.model, tiny.adapter, experts_backend="torch", dtype="float32", device=DEVICE, **kwargs)[0]


def test_engine_equals_transformers_generate_and_reference(tiny, reference, chat_prompts):
    """torch experts in fp32: the slot cache, the device-side mask and the positions are exact."""
    model = torch_model(tiny)
    engine = engine_of(model)
    for ids in chat_prompts:
        steps = engine.runner.steps
        tokens, scores = run(model.generate, model, ids)
        assert engine.runner.steps - steps == len(tokens) - 1, "the engine did not decode"
        want_tokens, want_scores = run(transformers_generate(model), model, ids)
        assert tokens == want_tokens == greedy(reference, ids, NEW_TOKENS)
        assert rel_err(scores, want_scores) < 1e-5


def test_sampling_settings_processors_criteria_and_streamer_as_transformers(tiny, chat_prompts):
    """Sampling draws from torch's generator as transformers does (same seed, same tokens); a caller's logits
    processor, stopping criteria and streamer work as they do in transformers' generate."""
    model = torch_model(tiny)
    ids = chat_prompts[0]
    sampled = dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.3)
    torch.manual_seed(7)
    got = run(model.generate, model, ids, **sampled)
    torch.manual_seed(7)
    want = run(transformers_generate(model), model, ids, **sampled)
    assert got[0] == want[0] and rel_err(got[1].nan_to_num(posinf=0, neginf=0), want[1].nan_to_num(posinf=0, neginf=0)) < 1e-5

    first = greedy(model, ids, 1)[0]

    class Ban(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores[:, first] = float("-inf")
            return scores

    class ThreeTokens(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((1,), input_ids.shape[1] >= ids.shape[1] + 3, dtype=torch.bool, device=input_ids.device)

    tok = __import__("transformers").AutoTokenizer.from_pretrained(tiny.model)
    extras = lambda: dict(logits_processor=[Ban()], stopping_criteria=[ThreeTokens()])  # noqa: E731
    streamer = TextIteratorStreamer(tok, skip_prompt=True)
    tokens, _ = run(model.generate, model, ids, streamer=streamer, **extras())
    assert tokens == run(transformers_generate(model), model, ids, **extras())[0]
    assert len(tokens) == 3 and tokens[0] != first
    assert "".join(streamer) == tok.decode(tokens)


def test_kt_experts_bound_in_the_decode_step(tiny, chat_prompts):
    """kt experts on fixed buffers, queued from the step (inside the CUDA graph on a GPU): transformers' replies."""
    pytest.importorskip("kt_kernel")
    model, tok = load_model(tiny.model, tiny.adapter, experts_backend="kt", dtype="float32", device=DEVICE)
    engine = engine_of(model)
    results = [(run(model.generate, model, ids), run(transformers_generate(model), model, ids)) for ids in chat_prompts]
    assert all(m._bound is not None for m in model.modules() if isinstance(m, CPUExperts)), "the kt experts were not bound"
    if DEVICE == "cuda":
        assert engine.runner._captured, "the decode step was not captured"
    for (tokens, scores), (want_tokens, want_scores) in results:
        assert tokens == want_tokens
        assert rel_err(scores, want_scores) < 1e-3  # bf16 experts: fp32 rounding elsewhere can flip a bf16 ulp
    for ((tokens, _), _), (_, answer) in zip(results, TRAINED_QA):
        assert answer in tok.decode(tokens, skip_special_tokens=True)


def test_cache_grows_and_other_calls_take_transformers_generate(tiny, chat_prompts, caplog):
    """A longer request gets a longer cache; beams, batches and padding run transformers' own generate."""
    model = torch_model(tiny)
    engine = engine_of(model)
    engine.min_cache_tokens = 16
    ids = chat_prompts[0]
    short = run(model.generate, model, ids, n=4)
    first_len = engine.cache.length
    long_tokens, _ = run(model.generate, model, ids, n=first_len)  # needs more than the first cache holds
    assert engine.cache.length > first_len
    assert long_tokens[:len(short[0])] == short[0]
    steps = engine.runner.steps
    with caplog.at_level("DEBUG", logger="ktchat.engine.hf"):
        beams = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, num_beams=2, do_sample=False)
        pair = torch.cat([ids, ids])
        batch = model.generate(pair, attention_mask=torch.ones_like(pair), max_new_tokens=4, do_sample=False)
    assert beams.shape == (1, ids.shape[1] + 4) and batch.shape == (2, ids.shape[1] + 4)
    assert engine.runner.steps == steps  # neither reached the engine
    reasons = " | ".join(r.getMessage() for r in caplog.records)
    assert "settings ['num_beams']" in reasons and "not one sequence" in reasons


def test_cuda_graphs_need_one_gpu(tiny):
    if DEVICE == "cuda":
        pytest.skip("checks the CPU-only refusal")
    with pytest.raises(KTChatError, match="cuda_graphs: true needs every non-expert weight on one CUDA device"):
        load_model(tiny.model, tiny.adapter, experts_backend="torch", dtype="float32", device="cpu", cuda_graphs=True)


def test_prompt_longer_than_the_kt_chunk_is_split_exactly(tiny, reference, chat_prompts, monkeypatch):
    """kt's kernel buffers hold chunk_size tokens (KTExperts.chunk_size, the SFT kernel's max_len): a longer prompt
    goes through in chunks, with the logits of one unchunked call, then decodes on the engine's cache."""
    pytest.importorskip("kt_kernel")
    from ktchat.experts import kt_backend

    from reference import logits

    model, _ = load_model(tiny.model, tiny.adapter, experts_backend="kt", dtype="float32", device=DEVICE)
    experts = [m.backend for m in model.modules() if isinstance(m, CPUExperts)]
    ids = chat_prompts[-1]  # the 172-token chat
    whole = logits(model, ids)
    calls = []
    kt_run = kt_backend._run
    monkeypatch.setattr(kt_backend, "_run", lambda pool, task: (calls.append(1), kt_run(pool, task))[1])
    for backend in experts:
        backend.chunk_size = 64  # below the kernel's buffers (sized at load for the default chunk): safe to shrink
    chunked = logits(model, ids)
    assert len(calls) == len(experts) * 3, len(calls)  # 172 tokens: 64 + 64 + 44 per layer
    assert rel_err(chunked, whole) < 1e-6
    assert greedy(reference, ids, 4) == chunked[0, -1:].argmax(-1).tolist() + greedy(reference, ids, 4)[1:]
    assert greedy(model, ids, 4) == greedy(reference, ids, 4)


def test_conversation_outgrowing_the_cache_is_carried_over(tiny, reference, chat_prompts):
    """A follow-up longer than the cache: a bigger cache holds the kept tokens (copied, not computed again), and the
    reply equals the reference's."""
    model = torch_model(tiny)
    engine = engine_of(model)
    engine.min_cache_tokens = 16
    first = chat_prompts[0]
    tokens, _ = run(model.generate, model, first, n=4)
    small = engine.cache.length
    follow = torch.cat([first, torch.tensor([tokens]), chat_prompts[-1]], dim=1)  # the chat goes on, past the cache
    assert follow.shape[1] + 4 > small
    got, _ = run(model.generate, model, follow, n=4)
    assert engine.cache.length > small and engine.last_reused == first.shape[1] + len(tokens) - 1
    assert got == greedy(reference, follow, 4)
