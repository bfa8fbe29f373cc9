"""Pure-PyTorch routed experts: the reference backend, and the fallback where kt_kernel is missing."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..adapter import StackedLoRA
from .base import ExpertsBackend, ExpertsSpec


class TorchExperts(ExpertsBackend):
    """Stacked weights [E, out, in]; the expert LoRA is applied unmerged (x A^T B^T * s), as in training."""

    name = "torch"

    def __init__(self, spec: ExpertsSpec):
        super().__init__(spec)
        e = spec.num_experts
        self.weights = {p: torch.empty((e, *spec.weight_shape(p)), dtype=spec.dtype) for p in ("gate", "up", "down")}
        self._lora: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}

    def _store(self, proj, expert, tensor):
        self.weights[proj][expert].copy_(tensor)

    def _set_lora(self, lora: dict[str, StackedLoRA]) -> None:
        dtype = self.spec.dtype
        self._lora = {p: (s.a.to(dtype), s.b.to(dtype), s.scale) for p, s in lora.items()}

    def _project(self, proj: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weights[proj][expert])
        if proj in self._lora:
            a, b, scale = self._lora[proj]
            y = y + F.linear(F.linear(x, a[expert]), b[expert]) * scale
        return y

    @torch.no_grad()
    def forward(self, x, topk_ids, topk_weights):
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32)
        flat = topk_ids.reshape(-1)
        for expert in torch.unique(flat).tolist():
            token, slot = torch.nonzero(topk_ids == expert, as_tuple=True)
            xe = x[token]
            h = F.silu(self._project("gate", expert, xe)) * self._project("up", expert, xe)
            y = self._project("down", expert, h)
            out.index_add_(0, token, y.float() * topk_weights[token, slot, None])
        return out.to(x.dtype)
