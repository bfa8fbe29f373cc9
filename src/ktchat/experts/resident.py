"""Some of a layer's routed experts kept on the GPU, with their LoRA, computed there while the CPU computes the rest.

A decode step reads each routed expert's weights once, so a token's time is set by the bytes of its experts: those
on the GPU cost the GPU's bandwidth (3 TB/s and more), the rest the CPU's (about 100 GB/s). `ResidentExperts` holds
one layer's chosen experts as the CPU backend computes them (its weights, or their exact dequantization) and their
LoRA: unmerged (x W^T + s (x A^T) B^T, as training computed it) or, for a merged backend, folded in once
(W + s B A in fp32, rounded once). `forward` sums w_k expert_k(x) over the (token, k) pairs whose expert is here and
leaves the others to the CPU; it never waits on the host, so a CUDA graph can hold it. The same code runs on the CPU
(device "cpu"), which is how CI checks it against the fp32 reference.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ..adapter import PROJS, merge_lora
from .base import HostExperts

logger = logging.getLogger(__name__)


class ResidentExperts:
    """Experts `experts` of layer `layer_idx` (of `num_experts`) on `device`, from `host` (HostExperts of just those
    experts, in that order)."""

    def __init__(self, layer_idx: int, num_experts: int, experts: list[int], host: HostExperts, device):
        self.layer_idx, self.experts, self.device = layer_idx, list(experts), torch.device(device)
        n = len(self.experts)
        index = torch.tensor(self.experts, dtype=torch.long)
        self.local = torch.full((num_experts,), -1, dtype=torch.long).index_put_((index,), torch.arange(n))
        self.local = self.local.to(self.device)
        self.mask = (self.local >= 0)  # [E] on the device: which experts are here
        self.weights = {p: host.weights[p].to(self.device) for p in PROJS}
        self.lora: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        for p, s in host.lora.items():
            a, b = s.a.to(self.device), s.b.to(self.device)
            if host.merge:  # folded once, as the CPU backends fold a merged LoRA
                self.weights[p] = merge_lora(self.weights[p], a, b, s.scale)
            else:
                self.lora[p] = (a.to(self.weights[p].dtype), b.to(self.weights[p].dtype), s.scale)
        self.grouped = None if hasattr(torch, "_grouped_mm") and self.device.type == "cuda" else False

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.weights.values()) + sum(a.nbytes + b.nbytes for a, b, _ in self.lora.values())

    @torch.no_grad()
    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """sum over k of topk_weights * expert(x) for the pairs whose expert is here, in x's dtype: x [T, H] on the
        device. One grouped matmul per projection where the device has it (bf16 on a GPU), else every pair's expert
        gathered (a few pairs a step in decode)."""
        local = self.local[topk_ids.reshape(-1)]
        rows = local >= 0
        w = topk_weights.reshape(-1).float() * rows
        token = torch.arange(x.shape[0], device=x.device).repeat_interleave(topk_ids.shape[1])
        xs = x.to(self.weights["gate"].dtype)[token]
        if self.grouped is not False:
            try:
                ys = self._grouped(xs, local, rows)
                self.grouped = True
            except (RuntimeError, NotImplementedError) as exc:  # no kernel for this device / dtype / layout here
                if self.grouped:
                    raise
                logger.info("GPU experts: computed pair by pair (no grouped matmul here: %s)", str(exc).splitlines()[0])
                self.grouped = False
        if self.grouped is False:
            ys = self._gathered(xs, local.clamp(min=0))
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        out.index_add_(0, token, torch.where(rows[:, None], ys.float(), 0.0) * w[:, None])
        return out.to(x.dtype)

    def _gathered(self, xs: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """Each pair's expert gathered and applied: [P, H] rows, one batched matmul per projection."""
        def project(p, h):
            y = torch.bmm(self.weights[p][local], h[:, :, None])[:, :, 0]
            if p in self.lora:
                a, b, scale = self.lora[p]
                y = y + torch.bmm(b[local], torch.bmm(a[local], h[:, :, None]))[:, :, 0] * scale
            return y

        return project("down", F.silu(project("gate", xs)) * project("up", xs))

    def _grouped(self, xs: torch.Tensor, local: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The pairs sorted by expert (the others last, past every group), one grouped matmul per projection; the
        group sizes are counted on the device (no host sync)."""
        n = len(self.experts)
        key = torch.where(rows, local, n)
        order = torch.argsort(key, stable=True)
        counts = torch.zeros(n + 1, dtype=torch.int32, device=xs.device).scatter_add_(
            0, key, torch.ones_like(key, dtype=torch.int32))
        offs = counts[:n].cumsum(0, dtype=torch.int32)

        def mm(h, w):
            return torch._grouped_mm(h, w.transpose(-2, -1), offs=offs)

        def project(p, h):
            y = mm(h, self.weights[p])
            if p in self.lora:
                a, b, scale = self.lora[p]
                y = y + mm(mm(h, a), b) * scale
            return y

        hs = xs[order]
        ys = project("down", F.silu(project("gate", hs)) * project("up", hs))
        return torch.empty_like(ys).index_copy_(0, order, ys)  # back to the pairs' order
