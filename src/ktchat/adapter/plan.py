"""The two channels of an adapter (PEFT modules; stacked routed-expert LoRA per layer and projection), and their
check against a base model's shapes, whether those come from a built model or from checkpoint headers."""

from __future__ import annotations

from collections import Counter
from functools import partial
from typing import Protocol

from .core import ExpertLoRA, ExpertPath, LoraModule, Problems
from .reader import Adapter, ParamLoRA
from .sources import load_param_lora, load_per_expert

Channels = tuple[dict[str, LoraModule], dict[tuple[int, str], ExpertLoRA]]


class BaseShapes(Protocol):
    """What the check needs to know of a base model."""

    def linear(self, name: str) -> tuple[int, int] | str:
        """(in, out) of the Linear layer `name`, or why LoRA cannot go there ("which is not a module ...")."""

    def routed(self, layer: int) -> tuple[int, int, int] | None:
        """(experts, hidden, intermediate) of the layer's routed experts, or None if it has none."""


def split_channels(adapter: Adapter, experts: ExpertPath, problems: Problems | None = None) -> Channels:
    """Returns (modules for PEFT, {(layer, proj): ExpertLoRA} for the CPU experts), from every layout at once."""
    problems = problems or Problems()
    peft, per_expert = {}, {}
    for name, module in adapter.modules.items():
        where = experts.parse(name)
        if where is None:
            peft[name] = module
        else:
            per_expert.setdefault((where[0], where[2]), {})[where[1]] = module
    groups = [_per_expert_group(adapter, layer, proj, mods, experts, problems)
              for (layer, proj), mods in sorted(per_expert.items())]
    groups += [g for p in adapter.params for g in _param_groups(adapter, p, experts, problems)]
    groups += list(adapter.fused.values())
    routed: dict[tuple[int, str], ExpertLoRA] = {}
    for g in groups:
        if g is None:
            continue
        if (g.layer, g.proj) in routed:
            problems.add(f"{g.where}: duplicate expert LoRA: layer {g.layer} {g.proj} is also in {routed[g.layer, g.proj].where}")
            continue
        routed[(g.layer, g.proj)] = g
    return peft, routed


def _per_expert_group(adapter: Adapter, layer: int, proj: str, mods: dict[int, LoraModule], experts: ExpertPath,
                      problems: Problems) -> ExpertLoRA | None:
    where = adapter.weights.path
    count = max(mods) + 1
    missing = sorted(set(range(count)) - set(mods))
    if missing:
        problems.add(f"{where}: layer {layer} {proj} LoRA covers {len(mods)} of {count} routed experts; "
                     f"missing experts {missing[:8]}")
        return None
    common = Counter(_signature(m) for m in mods.values()).most_common(1)[0][0]
    odd = next((m for m in mods.values() if _signature(m) != common), None)
    if odd is not None:
        r, i, o, s, d = _signature(odd)
        problems.add(f"{where}: {odd.a_key} / {odd.b_key}: rank {r}, {i} -> {o} features, scale {s:g}, {d}, but the "
                     f"other routed experts of layer {layer} have rank {common[0]}, {common[1]} -> {common[2]}, scale "
                     f"{common[3]:g}, {common[4]} (the stacked expert layout needs one of each per layer)")
        return None
    first = mods[0]
    ordered = tuple(mods[e] for e in range(count))
    return ExpertLoRA(layer, proj, count, first.rank, first.in_features, first.out_features, first.scale, first.dtype,
                      f"{where}: {first.a_key} ... ({count} experts)", experts.template(first.name),
                      partial(load_per_expert, adapter.weights, ordered))


def _signature(m: LoraModule) -> tuple:
    return m.rank, m.in_features, m.out_features, m.scale, m.dtype


def _param_groups(adapter: Adapter, p: ParamLoRA, experts: ExpertPath, problems: Problems) -> list[ExpertLoRA]:
    """gate_up_proj's LoRA becomes two groups (gate, up: halves of its output rows); down_proj's one."""
    where = f"{adapter.weights.path}: {p.a_key} / {p.b_key}"
    layer = experts.container_layer(p.container)
    if layer is None:
        problems.add(f"{where}: LoRA on {p.container}.{p.param}, which is not the routed experts of this architecture")
        return []
    parts = [("down", p.out_features)] if p.param == "down_proj" else [("gate", p.out_features // 2),
                                                                     ("up", p.out_features // 2)]
    return [ExpertLoRA(layer, proj, p.num_experts, p.rank, p.in_features, out_f, p.scale, p.dtype, where,
                       f"{p.container}.{{expert}}.{experts.proj_name(proj)}",
                       partial(load_param_lora, adapter.weights, p.a_key, p.b_key, p.num_experts, proj))
            for proj, out_f in parts]


def check_channels(adapter: Adapter, channels: Channels, base: BaseShapes, problems: Problems | None = None) -> None:
    """Every PEFT module must be a Linear layer of the base with the same shape; every expert group must cover the
    layer's routed experts exactly, with their shapes."""
    problems = problems or Problems()
    peft, routed = channels
    for name, lora in peft.items():
        found = base.linear(name)
        if isinstance(found, str):
            problems.add(f"{adapter.weights.path}: LoRA for {name!r}, {found}")
        elif found != (lora.in_features, lora.out_features):
            problems.add(
                f"{adapter.weights.path}: {lora.a_key} / {lora.b_key} map {lora.in_features} -> {lora.out_features} "
                f"features, but the base model's {name} maps {found[0]} -> {found[1]}: adapter and base model do not match"
            )
    for g in routed.values():
        _check_group(g, base.routed(g.layer), problems)


def _check_group(g: ExpertLoRA, dims: tuple[int, int, int] | None, problems: Problems) -> None:
    if dims is None:
        problems.add(f"{g.where}: routed-expert LoRA for layer {g.layer}, which has no routed experts")
        return
    num_experts, hidden, inter = dims
    if g.num_experts < num_experts:
        missing = list(range(g.num_experts, num_experts))
        problems.add(f"{g.where}: layer {g.layer} {g.proj} LoRA covers {g.num_experts} of {num_experts} routed "
                     f"experts; missing experts {missing[:8]}")
    elif g.num_experts > num_experts:
        problems.add(f"{g.where}: LoRA for {g.num_experts} experts in layer {g.layer}, but the model has {num_experts}")
    want = (inter, hidden) if g.proj == "down" else (hidden, inter)
    if (g.in_features, g.out_features) != want:
        problems.add(f"{g.where}: layer {g.layer} {g.proj}_proj expert LoRA maps {g.in_features} -> {g.out_features} "
                     f"features, but the base model's experts map {want[0]} -> {want[1]}: adapter and base model do not match")
