"""Quantized expert weights handed to kt_kernel's kernels as they are: FP8 blocks, K2 INT4 groups, KT INT8 tiles.

kt_kernel's native kernels take the checkpoint's own bytes through per-expert pointer lists (`gate_projs` /
`gate_scales`, one NUMA pool: [[ptr] * E]) or, for the K2 INT4 SFT kernel, one stacked tensor per projection
(`gate_proj` / `gate_scale`); `quant_config` tells them the block. What each method takes (read in kt_kernel
0.7.2's utils/amx.py and sft/amx.py; checked against the torch reference in tests/test_kt_formats.py):

- fp8: float8_e4m3fn [out, in] + fp32 scale_inv [out/128, in/128] (bits 8, group 128; whole blocks only);
- rawint4: the compressed-tensors int32 words seen as bytes, uint8 [out, in/2] + bf16 scale [out, in/32]
  (bits 4, group 32, no zero point);
- int8: KT's tile order (ktchat.formats.kt_weights.pack) int8 + fp32 scale per row: what its .kt files hold.

CPU memory is then those bytes (plus the kernel's packed copy while it builds), not bf16's.
"""

from __future__ import annotations

import torch

from ..errors import KTChatError
from ..formats import PROJS
from ..formats.quant import QuantizedWeight
from .base import ExpertsSpec

# kt method -> the QuantizedWeight format its kernels run natively, and the block that format must have
NATIVE_FORMAT = {"fp8": "fp8", "rawint4": "int4", "int8": "int8"}
BLOCK = {"fp8": lambda spec, proj: (128, 128), "rawint4": lambda spec, proj: (1, 32),
         "int8": lambda spec, proj: (1, spec.weight_shape(proj)[1])}
_QUANT_CONFIG = {"fp8": (8, 128), "rawint4": (4, 32)}  # bits, group size


class NativeWeights:
    """One layer's experts in a native format, as the kernel reads them (kept alive while the kernel lives)."""

    def __init__(self, spec: ExpertsSpec, method: str):
        self.spec, self.method = spec, method
        self.weights: dict[str, list[QuantizedWeight | None]] = {p: [None] * spec.num_experts for p in PROJS}
        self._buffers: dict[str, list[torch.Tensor]] = {}

    def accepts(self, q: QuantizedWeight, proj: str) -> str | None:
        """Why this weight cannot run natively (one phrase), or None."""
        want = NATIVE_FORMAT[self.method]
        if q.format != want:
            return f"a {q.format} weight, but kt_method {self.method} runs {want} weights"
        block = BLOCK[self.method](self.spec, proj)
        if tuple(q.block) != block:
            return f"{q.format} block {list(q.block)}, but kt_kernel's {self.method} kernels take {list(block)}"
        return None

    def store(self, proj: str, expert: int, q: QuantizedWeight) -> None:
        self.weights[proj][expert] = q

    @property
    def nbytes(self) -> int:
        return sum(q.nbytes for ws in self.weights.values() for q in ws if q is not None)

    @property
    def complete(self) -> bool:
        return all(q is not None for ws in self.weights.values() for q in ws)

    def dequantized(self) -> dict[str, torch.Tensor]:
        """bf16 [E, out, in] per projection (for merged LoRA, or a kernel that wants bf16)."""
        return {p: torch.stack([q.dequantize(torch.float32) for q in ws]).to(torch.bfloat16)
                for p, ws in self.weights.items()}

    def configure(self, cfg, *, stacked: bool = False) -> None:
        """Points a kernel config at the bytes: per-expert pointer lists, or stacked tensors (`stacked`)."""
        if stacked:
            for proj in PROJS:
                data, scale = zip(*(_data_scale(self.method, q) for q in self.weights[proj]))
                d, s = torch.stack(data).contiguous(), torch.stack(scale).contiguous()
                self._buffers[proj] = [d, s]
                setattr(cfg, f"{proj}_proj", d.data_ptr())
                setattr(cfg, f"{proj}_scale", s.data_ptr())
        else:
            for proj in PROJS:
                pairs = [_data_scale(self.method, q) for q in self.weights[proj]]
                self._buffers[proj] = [t for pair in pairs for t in pair]
                setattr(cfg, f"{proj}_projs", [[d.data_ptr() for d, _ in pairs]])
                setattr(cfg, f"{proj}_scales", [[s.data_ptr() for _, s in pairs]])
        if self.method in _QUANT_CONFIG:
            bits, group = _QUANT_CONFIG[self.method]
            cfg.quant_config.bits, cfg.quant_config.group_size, cfg.quant_config.zero_point = bits, group, False

    def release_sources(self) -> None:
        """Drops the per-expert QuantizedWeights once the kernel holds its copy (the buffers stay alive)."""
        self.weights = {p: [None] * self.spec.num_experts for p in PROJS}


def _data_scale(method: str, q: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """The two contiguous CPU tensors a kernel reads for one expert projection."""
    if method == "fp8":
        return q.data.contiguous(), q.scale.to(torch.float32).contiguous()
    if method == "rawint4":
        packed = q.data.contiguous().view(torch.uint8).reshape(q.shape[0], -1)[:, : q.shape[1] // 2]
        return packed.contiguous(), q.scale.to(torch.bfloat16).contiguous()
    if method == "int8":
        from ..formats.kt_weights import pack

        if q.scale.shape[1] != 1:
            raise KTChatError(f"int8 weight with {q.scale.shape[1]} scales per row (written for "
                              f"{q.scale.shape[1]} NUMA pools): kt_kernel here runs one pool; use experts_backend "
                              "torch, or write the INT8 set with threadpool_count 1")
        return pack(q.data).contiguous(), q.scale.reshape(-1).contiguous()
    raise AssertionError(method)
