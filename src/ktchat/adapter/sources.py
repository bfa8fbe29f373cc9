"""Where a layer's stacked expert LoRA comes from, per layout: loaders that return (a [E, r, in], b [E, out, r]).

Each returns tensors in the stored dtype, exactly as stored (stacking, slicing and permuting only), so every
layout reaches the CPU experts bit for bit as trained.
"""

from __future__ import annotations

import torch

from .core import LoraModule
from .weights import AdapterWeights


def load_pair(weights: AdapterWeights, a_key: str, b_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """KT's fused file: the stacked tensors are stored as they are used."""
    t = weights.load([a_key, b_key])
    return t[a_key], t[b_key]


def load_per_expert(weights: AdapterWeights, modules: tuple[LoraModule, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's per-expert layout: one A/B pair per expert, stacked by expert id (modules are in expert order)."""
    t = weights.load([k for m in modules for k in (m.a_key, m.b_key)])
    return torch.stack([t[m.a_key] for m in modules]), torch.stack([t[m.b_key] for m in modules])


def load_param_lora(
    weights: AdapterWeights, a_key: str, b_key: str, num_experts: int, part: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's LoRA on a fused expert parameter (`ParamWrapper`), as stacked per-expert LoRA.

    A [E*r, in] holds rows expert-major (A.reshape(E, r, in)); B [out, r*E] holds columns rank-major
    (B.reshape(out, r, E)), so expert e's update is B[:, :, e] @ A[e]. `part` is "down", or "gate"/"up" for the
    two halves of gate_up_proj's output rows (gate first, as transformers concatenates them).
    """
    t = weights.load([a_key, b_key])
    a = t[a_key].reshape(num_experts, -1, t[a_key].shape[-1])
    b = t[b_key].reshape(t[b_key].shape[0], -1, num_experts).permute(2, 0, 1)
    if part == "down":
        return a, b.contiguous()
    half = b.shape[1] // 2
    b = b[:, :half] if part == "gate" else b[:, half:]
    return _drop_zero_rank_half(a, b.contiguous(), keep_first=part == "gate")


def _drop_zero_rank_half(a: torch.Tensor, b: torch.Tensor, keep_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's v4->v5 conversion stacks gate and up LoRA block-diagonally (rank 2r, half of each B zero): keeping
    only the live half gives the same product exactly at the rank that was trained, so all three projections of a
    layer share one rank again (what kt_kernel's kernel wants)."""
    r = a.shape[1]
    if r % 2:
        return a, b
    live, dead = (slice(0, r // 2), slice(r // 2, r)) if keep_first else (slice(r // 2, r), slice(0, r // 2))
    if torch.count_nonzero(b[:, :, dead]):
        return a, b
    return a[:, live].contiguous(), b[:, :, live].contiguous()
