"""PEFT adapter keys -> LoRA modules -> two channels (PEFT on the compute device, routed experts on the CPU).

Pure functions over key names and tensors: no model code. The model layer says what a routed expert's
path looks like (an `ExpertPath`) and what shapes the base model has.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import KTChatError
from .config import AdapterConfig, read_adapter_config
from .weights import AdapterWeights, find_weight_file

# base_model.model.<module>.lora_A[.<adapter name>].weight
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")
_KNOWN_UNSUPPORTED = {
    "lora_magnitude_vector": "a DoRA tensor (DoRA is not supported yet)",
    "lora_embedding_": "LoRA on embeddings is not supported",
    "modules_to_save": "modules_to_save (fully trained extra modules) are not supported",
}

PROJS = ("gate", "up", "down")


@dataclass(frozen=True)
class LoraModule:
    """One LoRA'd module of the base model, as stored: A [r, in], B [out, r]."""

    name: str
    a_key: str
    b_key: str
    rank: int
    in_features: int
    out_features: int


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


@dataclass(frozen=True)
class Adapter:
    path: Path
    config: AdapterConfig
    weights: AdapterWeights
    modules: dict[str, LoraModule]


def read_adapter(adapter_dir: str | Path) -> Adapter:
    """Reads config and tensor headers, pairs every A with its B, checks ranks; loads no tensor data."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise KTChatError(f"{adapter_dir}: adapter folder not found")
    config = read_adapter_config(adapter_dir)
    weights = AdapterWeights(find_weight_file(adapter_dir))
    pairs: dict[str, dict[str, str]] = {}
    for key in weights.shapes:
        m = _KEY.match(key)
        if m is None:
            raise KTChatError(f"{weights.path}: unknown adapter key {key!r} ({_unsupported_reason(key)})")
        side = pairs.setdefault(m["module"], {})
        if m["ab"] in side:
            raise KTChatError(f"{weights.path}: duplicate LoRA {m['ab']} tensors for {m['module']}: {side[m['ab']]}, {key}")
        side[m["ab"]] = key
    if not pairs:
        raise KTChatError(f"{weights.path}: the adapter holds no LoRA tensors")
    modules = {name: _lora_module(name, keys, weights, config) for name, keys in sorted(pairs.items())}
    return Adapter(adapter_dir, config, weights, modules)


def _unsupported_reason(key: str) -> str:
    for marker, why in _KNOWN_UNSUPPORTED.items():
        if marker in key:
            return why
    return "not a PEFT LoRA A/B weight"


def _lora_module(name: str, keys: dict[str, str], weights: AdapterWeights, config: AdapterConfig) -> LoraModule:
    for side in "AB":
        if side not in keys:
            raise KTChatError(f"{weights.path}: {name} has lora_{'BA'[side == 'B']} but no lora_{side}")
    a, b = weights.shapes[keys["A"]], weights.shapes[keys["B"]]
    if len(a) != 2 or len(b) != 2:
        raise KTChatError(f"{weights.path}: {keys['A']} {list(a)} / {keys['B']} {list(b)}: LoRA tensors must be 2-D")
    if a[0] != b[1]:
        raise KTChatError(f"{weights.path}: rank mismatch for {name}: lora_A has {a[0]} rows, lora_B {b[1]} columns")
    expected = config.rank_for(name)
    if a[0] != expected:
        raise KTChatError(
            f"{weights.path}: {keys['A']} has rank {a[0]} but {config.path.name} gives r={expected} for {name}"
        )
    return LoraModule(name, keys["A"], keys["B"], rank=a[0], in_features=a[1], out_features=b[0])


def split_channels(adapter: Adapter, experts: ExpertPath):
    """Returns (modules for PEFT, {(layer, expert, proj): module} for the CPU experts)."""
    peft, routed = {}, {}
    for name, module in adapter.modules.items():
        where = experts.parse(name)
        if where is None:
            peft[name] = module
        else:
            routed[where] = module
    return peft, routed


@dataclass
class StackedLoRA:
    """One projection's LoRA for every expert of a layer, in kt_kernel's layout: a [E, r, in], b [E, out, r]."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float


def stack_layer(
    adapter: Adapter, layer: int, modules: dict[tuple[int, int, str], LoraModule], num_experts: int, dtype: torch.dtype
) -> dict[str, StackedLoRA]:
    """Stacks one MoE layer's per-expert LoRA (PEFT layout) into the KT layout, one entry per projection."""
    out = {}
    for proj in PROJS:
        present = {e: m for (lyr, e, p), m in modules.items() if lyr == layer and p == proj}
        if not present:
            continue
        missing = sorted(set(range(num_experts)) - set(present))
        if missing:
            raise KTChatError(
                f"{adapter.weights.path}: layer {layer} {proj} LoRA covers {len(present)} of {num_experts} routed "
                f"experts; missing experts {missing[:8]}"
            )
        mods = [present[e] for e in range(num_experts)]
        scales = {adapter.config.scale_for(m.name) for m in mods}
        ranks = {m.rank for m in mods}
        if len(scales) > 1 or len(ranks) > 1:
            raise KTChatError(
                f"{adapter.config.path}: layer {layer} {proj}: rank/alpha differ between routed experts "
                f"(ranks {sorted(ranks)}), which the stacked expert layout cannot hold"
            )
        tensors = adapter.weights.load([k for m in mods for k in (m.a_key, m.b_key)])
        a = torch.stack([tensors[m.a_key] for m in mods]).to(dtype).contiguous()
        b = torch.stack([tensors[m.b_key] for m in mods]).to(dtype).contiguous()
        out[proj] = StackedLoRA(a, b, scales.pop())
    return out
