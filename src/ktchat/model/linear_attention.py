"""Gated DeltaNet (Qwen3.5-MoE's linear attention) on ktchat's cache.

transformers' Gated DeltaNet keeps its conv and recurrent state in its own cache objects, whose interface changed
in every 5.x release, and its prefill cannot start from a state it is given in some of them. Here the layer is
built as a subclass of transformers' own class (`slotted`, at load) whose forward, when handed ktchat's SlotCache,
runs the layer on the slot's state itself: the same projections, norm and output (the module's own submodules, so
PEFT's LoRA on them applies), a causal conv over the slot's last kernel-1 inputs, and the gated delta rule, chunked
for a prompt and recurrent for one token, in fp32 as transformers computes it. Every other call runs transformers'
forward. Any prompt can thus continue a slot's state (a kept conversation, a saved copy), and a decode step has no
host synchronisation, so it is captured into the CUDA graph like every other layer.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.cache import SlotCache

_FIELDS = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "conv1d", "A_log", "dt_bias", "norm", "out_proj",
           "num_v_heads", "num_k_heads", "head_k_dim", "head_v_dim", "key_dim", "value_dim", "conv_kernel_size",
           "layer_idx")
CHUNK = 64


def slotted(module: nn.Module, config) -> nn.Module | None:
    """The owned-layer builder for Gated DeltaNet (registry: MoEArch.owned_layers): the same layer (built from the
    text `config`) as a `SlottedGatedDeltaNet`, or None where the module is not the Gated DeltaNet this code knows."""
    if not all(hasattr(module, f) for f in _FIELDS):
        return None
    return _slotted_class(type(module))(config, module.layer_idx)


@functools.cache
def _slotted_class(base: type) -> type:
    return type(base.__name__, (SlottedGatedDeltaNet, base), {"__module__": base.__module__})


class SlottedGatedDeltaNet:
    """Mixed into transformers' Gated DeltaNet class: on ktchat's SlotCache the layer runs on its slot's state."""

    def forward(self, hidden_states, *args, **kwargs):
        cache = next((c for c in (kwargs.get("cache"), kwargs.get("cache_params"), *args) if isinstance(c, SlotCache)),
                     None)
        if cache is None:
            return super().forward(hidden_states, *args, **kwargs)
        return self._slot_forward(hidden_states, cache)

    def _slot_forward(self, x: torch.Tensor, cache: SlotCache) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = self.in_proj_qkv(x).transpose(1, 2)  # [b, channels, t]
        z = self.in_proj_z(x).reshape(b, t, -1, self.head_v_dim)
        beta = self.in_proj_b(x).sigmoid()
        g = -self.A_log.float().exp() * F.softplus(self.in_proj_a(x).float() + self.dt_bias)  # log-space decay <= 0
        conv, state = cache.linear_state(self.layer_idx, qkv, (qkv.shape[1], self.conv_kernel_size - 1),
                                         (self.num_v_heads, self.head_k_dim, self.head_v_dim))
        rows = cache.rows.to(conv.device)
        mixed = self._conv(qkv, conv, rows).transpose(1, 2)
        q, k, v = mixed.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q, k = (y.reshape(b, t, -1, self.head_k_dim).repeat_interleave(self.num_v_heads // self.num_k_heads, dim=2)
                for y in (q, k))
        out, new_state = gated_delta_rule(q, k, v.reshape(b, t, -1, self.head_v_dim), g, beta,
                                          state.index_select(0, rows))
        state.index_copy_(0, rows, new_state)
        out = self.norm(out.reshape(-1, self.head_v_dim), z.reshape(-1, self.head_v_dim))
        return self.out_proj(out.reshape(b, t, -1))

    def _conv(self, qkv: torch.Tensor, conv: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The depthwise causal conv over the slot's last kernel-1 inputs and these; the slot keeps the new last ones."""
        window = torch.cat([conv.index_select(0, rows), qkv.to(conv.dtype)], dim=-1)
        conv.index_copy_(0, rows, window[..., window.shape[-1] - conv.shape[-1]:])
        weight = self.conv1d.weight
        out = F.conv1d(window.to(weight.dtype), weight, self.conv1d.bias, groups=weight.shape[0])
        return _activation(self.activation)(out).to(qkv.dtype)


def _activation(name: str):
    from transformers.activations import ACT2FN

    return ACT2FN[name]


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + 1e-6)


def gated_delta_rule(q, k, v, g, beta, state, chunk: int = CHUNK):
    """The gated delta rule from `state`, in fp32: q, k [b, t, h, dk]; v [b, t, h, dv]; g (log decay), beta [b, t, h];
    state [b, h, dk, dv]. Per token: S <- S * exp(g); S <- S + k (beta (v - k^T S))^T; out = S^T q (q, k unit
    length, q scaled by dk^-1/2). Returns (out [b, t, h, dv] in v's dtype, the new state)."""
    dtype = v.dtype
    q, k, v, g, beta = (y.transpose(1, 2).float() for y in (q, k, v, g, beta))  # heads first
    q, k = _l2norm(q) * q.shape[-1] ** -0.5, _l2norm(k)
    if q.shape[2] == 1:
        out, state = _recurrent_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], g[:, :, 0], beta[:, :, 0], state.float())
        return out[:, None].to(dtype), state
    out, state = _chunked(q, k, v, g, beta, state.float(), chunk)
    return out.transpose(1, 2).to(dtype), state


def _recurrent_step(q, k, v, g, beta, state):
    """One token: q, k [b, h, dk]; v [b, h, dv]; g, beta [b, h]."""
    state = state * g.exp()[..., None, None]
    delta = (v - torch.einsum("bhk,bhkv->bhv", k, state)) * beta[..., None]
    state = state + k[..., :, None] * delta[..., None, :]
    return torch.einsum("bhk,bhkv->bhv", q, state), state


def _chunked(q, k, v, g, beta, state, chunk: int):
    """Chunks of `chunk` tokens (heads first: [b, h, t, d]). Within a chunk, with G the cumulative log decay, the
    values written to the state satisfy (I + L) u = beta v - beta exp(G) K S0, L strictly lower triangular with
    L_ij = beta_i (k_i . k_j) exp(G_i - G_j): one triangular solve instead of a loop over tokens. The output reads
    the chunk's start state and the chunk's own writes; the state moves to the chunk's end."""
    b, h, t, _ = k.shape
    pad = (-t) % chunk
    if pad:  # zero keys, values and rates with no decay leave the state as it is
        q, k, v = (F.pad(y, (0, 0, 0, pad)) for y in (q, k, v))
        g, beta = (F.pad(y, (0, pad)) for y in (g, beta))
    q, k, v = (y.reshape(b, h, -1, chunk, y.shape[-1]) for y in (q, k, v))
    g, beta = (y.reshape(b, h, -1, chunk) for y in (g, beta))
    decay_to = g.cumsum(-1)  # G
    lower = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    pairwise = (decay_to[..., :, None] - decay_to[..., None, :]).masked_fill(~lower, float("-inf")).exp()
    k_beta = k * beta[..., None]
    system = ((k_beta @ k.transpose(-1, -2)) * pairwise).tril(-1)
    writes = torch.linalg.solve_triangular(system, v * beta[..., None], upper=False, unitriangular=True)
    reads = torch.linalg.solve_triangular(system, k_beta * decay_to.exp()[..., None], upper=False, unitriangular=True)
    attn = (q @ k.transpose(-1, -2)) * pairwise
    q_decayed = q * decay_to.exp()[..., None]
    k_to_end = k * (decay_to[..., -1:] - decay_to).exp()[..., None]
    out = torch.empty_like(writes)
    for i in range(q.shape[2]):
        u = writes[:, :, i] - reads[:, :, i] @ state
        out[:, :, i] = q_decayed[:, :, i] @ state + attn[:, :, i] @ u
        state = state * decay_to[:, :, i, -1].exp()[..., None, None] + k_to_end[:, :, i].transpose(-1, -2) @ u
    return out.reshape(b, h, -1, out.shape[-1])[:, :, :t], state
