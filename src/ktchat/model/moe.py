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
    """Moves hidden states to the CPU backend and the result back; holds no parameters of its own.

    From CUDA, the copies go through pinned buffers reused from token to token (decode calls every layer
    once per token, so allocation and synchronisation cost is per-token latency).
    """

    def __init__(self, backend: ExpertsBackend):
        super().__init__()
        self.backend = backend
        self._pinned: dict[str, torch.Tensor] = {}
        self._event = None

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        return self.finish(self.stage(x, topk_ids, topk_weights), x)

    def stage(self, x, topk_ids, topk_weights):
        """Starts the copies to the CPU; from CUDA they are asynchronous, so GPU work queued next overlaps."""
        x = x.to(self.backend.spec.dtype)
        topk_ids, topk_weights = topk_ids.to(torch.int64), topk_weights.to(torch.float32)
        if x.device.type != "cuda":
            return (x.to(_CPU), topk_ids.to(_CPU), topk_weights.to(_CPU)), None
        staged = tuple(self._buffer(name, t).copy_(t, non_blocking=True)
                       for name, t in (("x", x), ("ids", topk_ids), ("weights", topk_weights)))
        if self._event is None:
            self._event = torch.cuda.Event()
        self._event.record()
        return staged, self._event

    def finish(self, staged, like: torch.Tensor) -> torch.Tensor:
        """Waits for the copies only (not for later GPU work), runs the experts, sends the result back."""
        (x, ids, weights), event = staged
        if event is None:
            return self.backend.forward(x, ids, weights).to(like.device, like.dtype)
        event.synchronize()
        out = self._buffer("out", x).copy_(self.backend.forward(x, ids, weights))
        return out.to(like.device, non_blocking=True).to(like.dtype)

    def _buffer(self, name: str, like: torch.Tensor) -> torch.Tensor:
        buf = self._pinned.get(name)
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype:
            buf = self._pinned[name] = torch.empty(like.shape, dtype=like.dtype, device=_CPU, pin_memory=True)
        return buf

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
