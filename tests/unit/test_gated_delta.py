"""The gated delta rule ktchat runs for Gated DeltaNet layers (ktchat.model.linear_attention): the chunked form for
prompts equals the token-by-token recurrence, continues exactly from a state, and equals transformers' own."""

import importlib

import pytest
import torch

from ktchat.model.linear_attention import gated_delta_rule


def inputs(t, b=2, h=3, dk=8, dv=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, t, h, dk, generator=g) for _ in range(2))
    v = torch.randn(b, t, h, dv, generator=g)
    decay = -torch.rand(b, t, h, generator=g) * 2  # log decay <= 0
    beta = torch.rand(b, t, h, generator=g)
    return q, k, v, decay, beta, torch.randn(b, h, dk, dv, generator=g)


def token_by_token(q, k, v, decay, beta, state):
    outs = []
    for i in range(q.shape[1]):
        out, state = gated_delta_rule(*(x[:, i:i + 1] for x in (q, k, v, decay, beta)), state)
        outs.append(out)
    return torch.cat(outs, dim=1), state


@pytest.mark.parametrize("t, chunk", [(5, 64), (64, 64), (150, 64), (37, 8)])
def test_chunked_equals_the_recurrence(t, chunk):
    q, k, v, decay, beta, state = inputs(t)
    out, end = gated_delta_rule(q, k, v, decay, beta, state, chunk=chunk)
    want, want_end = token_by_token(q, k, v, decay, beta, state)
    assert torch.allclose(out, want, atol=1e-4, rtol=1e-4) and torch.allclose(end, want_end, atol=1e-4, rtol=1e-4)


def test_a_prompt_split_anywhere_continues_from_the_state():
    q, k, v, decay, beta, state = inputs(100, seed=1)
    out, end = gated_delta_rule(q, k, v, decay, beta, state)
    first, mid = gated_delta_rule(*(x[:, :41] for x in (q, k, v, decay, beta)), state)
    second, end2 = gated_delta_rule(*(x[:, 41:] for x in (q, k, v, decay, beta)), mid)
    assert torch.allclose(torch.cat([first, second], dim=1), out, atol=1e-4) and torch.allclose(end2, end, atol=1e-4)


def test_equals_transformers_own_gated_delta_rule():
    try:
        module = importlib.import_module("transformers.models.qwen3_5_moe.modeling_qwen3_5_moe")
    except ImportError:
        pytest.skip("this transformers has no Qwen3.5-MoE")
    q, k, v, decay, beta, state = inputs(90, seed=2)
    for theirs in (module.torch_chunk_gated_delta_rule, module.torch_recurrent_gated_delta_rule):
        want, want_end = theirs(q, k, v, g=decay, beta=beta, initial_state=state, output_final_state=True,
                                use_qk_l2norm_in_kernel=True)
        out, end = gated_delta_rule(q, k, v, decay, beta, state)
        assert torch.allclose(out, want, atol=1e-4) and torch.allclose(end, want_end, atol=1e-4)
