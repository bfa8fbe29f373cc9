"""The normalized form every adapter layout is read into: PEFT-channel modules and per-layer routed-expert LoRA.

Whatever the files look like (per-expert PEFT keys, KT's fused file, PEFT's transformers-5 parameter LoRA,
renamed keys), the rest of ktchat sees only these types, so loading, inspecting, converting and exporting
share one reading of the adapter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import KTChatError
from ..formats import PROJS  # noqa: F401 - the projections, re-exported beside StackedLoRA
PEFT_CHANNEL, KT_CHANNEL = "PEFT (GPU)", "KT (CPU)"


class Problems:
    """Where validation findings go: raised at once when loading, collected (all of them) by `inspect`."""

    def __init__(self, collect: bool = False):
        self.collect = collect
        self.found: list[str] = []

    def add(self, message: str) -> None:
        message = " ".join(message.split())  # one line, always
        if not self.collect:
            raise KTChatError(message)
        if message not in self.found:
            self.found.append(message)


@dataclass(frozen=True)
class LoraModule:
    """One LoRA'd module as PEFT stores it: A [r, in], B [out, r] under two keys of the adapter file."""

    name: str  # the module's path in the base model (prefixes, adapter names and KT wrapper segments removed)
    a_key: str
    b_key: str
    rank: int
    in_features: int
    out_features: int
    scale: float = 1.0
    dtype: str = "float32"

    @property
    def params(self) -> int:
        return self.rank * (self.in_features + self.out_features)


@dataclass
class StackedLoRA:
    """One projection's LoRA for every expert of a layer, in kt_kernel's layout: a [E, r, in], b [E, out, r]."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float


def merge_lora(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """W + scale * B @ A, accumulated in fp32 and rounded once to `dtype` (default: W's): one weight [out, in] with
    A [r, in] and B [out, r], or a stack of experts [E, out, in] with A [E, r, in] and B [E, out, r]. Every merge
    of ktchat goes through here: the CPU experts, GPU prefill and export."""
    mm = torch.baddbmm if w.dim() == 3 else torch.addmm
    return mm(w.float(), b.float(), a.float(), alpha=scale).to(dtype or w.dtype)


@dataclass(frozen=True)
class ExpertLoRA:
    """All routed experts' LoRA for one projection of one MoE layer: what a CPU experts backend takes at once.

    `load` returns (a [E, r, in], b [E, out, r]) in the stored dtype. `rank` is the stored rank; for PEFT's fused
    gate_up LoRA, whose B is block-diagonal after PEFT's own conversion, `load` drops the all-zero half (exact).
    """

    layer: int
    proj: str
    num_experts: int
    rank: int
    in_features: int
    out_features: int
    scale: float
    dtype: str
    where: str  # "file: key(s)" for messages
    name_template: str  # the per-expert module path with "{expert}" in place of the expert id
    load: Callable[[], tuple[torch.Tensor, torch.Tensor]] = field(compare=False, repr=False)

    def module_name(self, expert: int) -> str:
        return self.name_template.replace("{expert}", str(expert))

    def stack(self, dtype: torch.dtype) -> StackedLoRA:
        a, b = self.load()
        return StackedLoRA(a.to(dtype).contiguous(), b.to(dtype).contiguous(), self.scale)

    @property
    def params(self) -> int:
        return self.num_experts * self.rank * (self.in_features + self.out_features)


@dataclass(frozen=True)
class ExpertPath:
    """How an architecture names a routed expert's projection; proj_names maps its names to gate/up/down."""

    pattern: re.Pattern  # groups: layer, expert, proj
    proj_names: dict[str, str]

    def parse(self, module: str) -> tuple[int, int, str] | None:
        m = self.pattern.fullmatch(module)
        if m is None or m["proj"] not in self.proj_names:
            return None
        return int(m["layer"]), int(m["expert"]), self.proj_names[m["proj"]]

    def template(self, module: str) -> str:
        """`module` with its expert id replaced by "{expert}" (module must parse)."""
        m = self.pattern.fullmatch(module)
        start, end = m.span("expert")
        return module[:start] + "{expert}" + module[end:]

    def container_layer(self, container: str) -> int | None:
        """The layer of a fused-experts module path (e.g. `model.layers.3.mlp.experts`), or None if it is not one.

        Asks whether the container's expert 0 would parse, so one ExpertPath serves both layouts exactly.
        """
        where = self.parse(f"{container}.0.{next(iter(self.proj_names))}")
        return where[0] if where else None

    def proj_name(self, proj: str) -> str:
        return next(name for name, canon in self.proj_names.items() if canon == proj)


# For work without a base model (inspect, convert): DeepSeek/Qwen/Llama-MoE and Mixtral expert names.
GENERIC_EXPERTS = ExpertPath(
    re.compile(
        r"(?:.*\.)?layers\.(?P<layer>\d+)\.[A-Za-z_]+\.experts\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w3|w2)"
    ),
    {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down"},
)
