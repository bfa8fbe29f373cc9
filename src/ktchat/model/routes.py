"""Where each checkpoint tensor goes: one routing table, derived before any weight is read.

Every on-disk name is read once under the model's names (`MoEArch.module_name`) and parsed by the registry entry's
own patterns (`expert_weight`, `fused_experts`), never guessed from substrings. A tensor goes to one of:

- `param`: a parameter or persistent buffer of the model built on `meta`;
- `expert`: one routed expert's projection (layer, expert, gate | up | down), for its CPU experts backend;
- `fused`: a layer's fused expert tensor (transformers 5's gate_up_proj [E, 2I, H] / down_proj [E, H, I]), split;
- `derived`: a non-persistent buffer the model computes itself (rotary tables): never loaded;
- `skipped`: what text chat has no module for (MTP layers, a VLM's vision tower), with the registry's reason.

A quantized module's tensors (weight and scales) share one route, `quantized` naming the module on disk: its
weight is assembled from them. Anything else is one error naming the file and tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..formats.checkpoint import Checkpoint, QuantLayout
from ..errors import KTChatError

PARAM, EXPERT, FUSED, DERIVED, SKIPPED = "param", "expert", "fused", "derived", "skipped"


@dataclass(frozen=True)
class Route:
    kind: str  # one of the five above
    key: str  # under the model's names: the parameter, the expert's or the fused tensor's, the skipped tensor's
    layer: int | None = None
    expert: int | None = None
    proj: str | None = None  # gate | up | down; a fused tensor's gate_up_proj | down_proj
    quantized: str | None = None  # the module on disk whose tensors load together as one weight
    reason: str | None = None  # why a skipped tensor has no place in the model

    @property
    def order(self) -> tuple[int, int, str]:
        """Expert reads go in layer order (each layer is packed once its reads are done)."""
        return self.layer, self.expert, self.proj


@dataclass(frozen=True)
class ModelNames:
    """What the model built on `meta` holds, by name."""

    tensors: frozenset[str]  # parameters and persistent buffers: loaded from the checkpoint
    derived: frozenset[str]  # non-persistent buffers: computed
    experts: dict[int, int]  # MoE layer -> its routed experts

    @classmethod
    def of(cls, model, moe_blocks: dict) -> ModelNames:
        persistent = set(model.state_dict())
        buffers = {name for name, _ in model.named_buffers()}
        params = {name for name, _ in model.named_parameters()}
        return cls(frozenset(params | (buffers & persistent)), frozenset(buffers - persistent),
                   {layer: b.cpu_experts.backend.spec.num_experts for layer, b in moe_blocks.items()})


def route_checkpoint(arch, checkpoint: Checkpoint, layout: QuantLayout, names: ModelNames,
                     config) -> dict[str, Route]:
    """On-disk name -> Route for every tensor of the checkpoint; the first tensor that belongs nowhere is an error
    naming its file. `config` is the one the registry's skips read (a VLM's text config)."""
    routes = {}
    for name, file in checkpoint.files.items():
        module = layout.member.get(name)
        key = arch.module_name(f"{module}.weight" if module else name)
        route = _route(arch, key, names, config, module)
        if route is None:
            raise KTChatError(_nowhere(arch, file.name, name, key, module))
        routes[name] = route
    return routes


def _route(arch, key: str, names: ModelNames, config, quantized: str | None) -> Route | None:
    expert = arch.expert_weight(key)
    if expert is not None and expert[1] < names.experts.get(expert[0], 0):
        return Route(EXPERT, key, *expert, quantized=quantized)
    fused = arch.fused_experts(key)
    if fused is not None and fused[0] in names.experts and quantized is None:
        return Route(FUSED, key, fused[0], proj=fused[1])
    if key in names.tensors:
        return Route(PARAM, key, quantized=quantized)
    if key in names.derived and quantized is None:
        return Route(DERIVED, key)
    reason = arch.skip_tensor(key, config)
    return None if reason is None else Route(SKIPPED, key, quantized=quantized, reason=reason)


def _nowhere(arch, file: str, name: str, key: str, module: str | None) -> str:
    if module is None:
        return f"{file}: {name}: checkpoint tensor does not belong to the model"
    fused = " (quantized fused experts are not supported)" if arch.fused_experts(key.removesuffix(".weight")) else ""
    return f"{file}: {module}: quantized checkpoint weight does not belong to the model{fused}"
