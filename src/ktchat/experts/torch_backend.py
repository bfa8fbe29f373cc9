"""Pure-PyTorch routed experts: the reference backend, and the fallback where kt_kernel is missing."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..adapter import StackedLoRA, merge_lora
from ..errors import KTChatError
from ..formats import MOE_LORA_MODES, PROJS
from .base import ExpertsBackend, ExpertsSpec, HostExperts, huge_page_empty


class TorchExperts(ExpertsBackend):
    """Stacked weights [E, out, in]. moe_lora "exact" applies the expert LoRA unmerged (x A^T B^T * s), as in
    training; "merged" folds s * B @ A into the weights once at prepare (fp32 accumulation)."""

    name = "torch"

    def __init__(self, spec: ExpertsSpec, *, moe_lora: str = "exact", kt_int8: bool = False):
        super().__init__(spec)
        if moe_lora not in MOE_LORA_MODES:
            raise KTChatError(f"torch experts: moe_lora must be one of {MOE_LORA_MODES}, got {moe_lora!r}")
        self.moe_lora = moe_lora
        # kt_int8: run KT's INT8 of the loaded weights (quant.kt_int8, dequantized), the math of an adapter trained
        # on int8 experts; weights that arrive as KT's INT8 already (load_quantized) are taken as they are.
        self.kt_int8 = kt_int8
        self._as_int8: set[tuple[str, int]] = set()
        e = spec.num_experts
        self.weights = {p: huge_page_empty((e, *spec.weight_shape(p)), spec.dtype) for p in PROJS}
        self._lora: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}

    def load_quantized(self, proj, expert, q, source):
        if q.format == "int8":
            self._as_int8.add((proj, expert))
        super().load_quantized(proj, expert, q, source)

    def _store(self, proj, expert, tensor):
        self.weights[proj][expert].copy_(tensor)

    def weight_slot(self, proj, expert):
        return None if self.prepared else self.weights[proj][expert]

    def _set_lora(self, lora: dict[str, StackedLoRA]) -> None:
        if self.moe_lora == "merged" and self.prepared:
            raise KTChatError(
                f"layer {self.spec.layer_idx}: the expert LoRA is already merged into the weights; load the model "
                "again to change it (or use moe_lora: exact)"
            )
        dtype = self.spec.dtype
        self._lora = {p: (s.a.to(dtype), s.b.to(dtype), s.scale) for p, s in lora.items()}

    def _prepare(self) -> None:
        if self.kt_int8:
            from ..formats.quant import kt_int8

            for proj, w in self.weights.items():
                for e in range(w.shape[0]):
                    if (proj, e) not in self._as_int8:
                        w[e] = kt_int8(w[e]).dequantize(torch.float32).to(w.dtype)
        if self.moe_lora != "merged":
            return
        for proj, (a, b, scale) in self._lora.items():
            w = self.weights[proj]
            for e in range(w.shape[0]):
                w[e] = merge_lora(w[e], a[e], b[e], scale)
        self._lora = {}

    def host_experts(self) -> HostExperts:
        """Its own stacked weights (the one copy); merged mode has folded the LoRA into them at prepare."""
        self.prepare()
        lora = {} if self.moe_lora == "merged" else self.lora
        return HostExperts(self.weights, {p: s for p, s in lora.items() if s.a.shape[1] > 0})

    def _project(self, proj: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weights[proj][expert])
        if proj in self._lora:
            a, b, scale = self._lora[proj]
            y = y + F.linear(F.linear(x, a[expert]), b[expert]) * scale
        return y

    @torch.no_grad()
    def forward(self, x, topk_ids, topk_weights):
        self.prepare()
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32)
        for expert in torch.unique(topk_ids).tolist():
            if self.resident[expert]:
                continue  # computed on the GPU
            token, slot = torch.nonzero(topk_ids == expert, as_tuple=True)
            xe = x[token]
            h = F.silu(self._project("gate", expert, xe)) * self._project("up", expert, xe)
            y = self._project("down", expert, h)
            out.index_add_(0, token, y.float() * topk_weights[token, slot, None])
        return out.to(x.dtype)
