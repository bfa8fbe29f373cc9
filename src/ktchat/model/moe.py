"""The MoE block that replaces a family's own: router and shared experts on the compute device, routed
experts handed to a CPU backend, so no tensor ever meets a weight on another device."""

from __future__ import annotations

import torch
from torch import nn

from ..experts import ExpertsBackend

_CPU = torch.device("cpu")


class Router(nn.Linear):
    """The expert router, kept in fp32 as the families compute it; an nn.Linear so PEFT can target it."""


class CPUExperts(nn.Module):
    """Moves hidden states to the CPU backend and the result back; holds no parameters of its own."""

    def __init__(self, backend: ExpertsBackend):
        super().__init__()
        self.backend = backend

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        return self.finish(self.stage(x, topk_ids, topk_weights), x)

    def stage(self, x, topk_ids, topk_weights):
        """Starts the copies to the CPU; on CUDA they are asynchronous, so GPU work queued next overlaps."""
        non_blocking = x.device.type == "cuda"
        staged = (
            x.to(_CPU, self.backend.spec.dtype, non_blocking=non_blocking),
            topk_ids.to(_CPU, torch.int64, non_blocking=non_blocking),
            topk_weights.to(_CPU, torch.float32, non_blocking=non_blocking),
        )
        event = None
        if non_blocking:
            event = torch.cuda.Event()
            event.record()
        return staged, event

    def finish(self, staged, like: torch.Tensor) -> torch.Tensor:
        """Waits for the copies only (not for later GPU work), runs the experts, sends the result back."""
        (x, ids, weights), event = staged
        if event is not None:
            event.synchronize()
        return self.backend.forward(x, ids, weights).to(like.device, like.dtype)

    def extra_repr(self) -> str:
        s = self.backend.spec
        return f"backend={self.backend.name}, experts={s.num_experts}, top_k={s.top_k}, dtype={s.dtype}"


class OffloadedMoE(nn.Module):
    """gate (router) -> top-k -> CPU experts, plus shared experts; keeps the family's submodule names.

    With `overlap` (the default), the shared experts are queued on the GPU after the copies to the CPU, so
    they run while the CPU computes the routed experts.
    """

    overlap = True

    def __init__(self, layer_idx: int, gate: Router, shared_experts: nn.Module | None, experts: CPUExperts, route, config):
        super().__init__()
        self.layer_idx = layer_idx
        self.gate = gate
        self.experts = experts
        if shared_experts is not None:
            self.shared_experts = shared_experts
        self._route = route
        self._config = config

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        weights, ids = self._route(self.gate(x.float()), self._config)
        shared = getattr(self, "shared_experts", None)
        if shared is None:
            return self.experts(x, ids, weights).view(shape)
        if self.overlap:
            staged = self.experts.stage(x, ids, weights)
            shared_out = shared(x)
            return (self.experts.finish(staged, x) + shared_out).view(shape)
        return (self.experts(x, ids, weights) + shared(x)).view(shape)
