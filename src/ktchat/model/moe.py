"""The MoE block that replaces a family's own: router and shared experts on the compute device, routed
experts handed to a CPU backend, so no tensor ever meets a weight on another device."""

from __future__ import annotations

import torch
from torch import nn

from ..experts import ExpertsBackend


class Router(nn.Linear):
    """The expert router, kept in fp32 as the families compute it; an nn.Linear so PEFT can target it."""


class CPUExperts(nn.Module):
    """Moves hidden states to the CPU backend and the result back; holds no parameters of its own."""

    def __init__(self, backend: ExpertsBackend):
        super().__init__()
        self.backend = backend

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        cpu = torch.device("cpu")
        out = self.backend.forward(
            x.to(cpu, self.backend.spec.dtype), topk_ids.to(cpu, torch.int64), topk_weights.to(cpu, torch.float32)
        )
        return out.to(x.device, x.dtype)

    def extra_repr(self) -> str:
        s = self.backend.spec
        return f"backend={self.backend.name}, experts={s.num_experts}, top_k={s.top_k}, dtype={s.dtype}"


class OffloadedMoE(nn.Module):
    """gate (router) -> top-k -> CPU experts, plus shared experts; keeps the family's submodule names."""

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
        out = self.experts(x, ids, weights)
        if hasattr(self, "shared_experts"):
            out = out + self.shared_experts(x)
        return out.view(shape)
