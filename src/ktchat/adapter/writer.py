"""Writing the normalized form back out: per-expert PEFT, KT fused (+ manifest), or SGLang's composite adapter.

Tensors are copied as stored (stacking and slicing only), so PEFT -> KT -> PEFT and KT -> PEFT -> KT give
bit-identical tensors. Every output is written to a temporary folder and moved into place when complete.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..formats.checkpoint import staged_output
from ..errors import KTChatError
from ..formats import ADAPTER_LAYOUTS
from .config import read_adapter_config
from .core import GENERIC_EXPERTS, ExpertLoRA, ExpertPath, Problems
from .keys import kt_fused_key, peft_key
from .kt import FUSED_NAME, write_manifest
from .plan import split_channels
from .reader import Adapter, read_adapter

logger = logging.getLogger(__name__)

FORMATS = ADAPTER_LAYOUTS
ADAPTER_FILE, CONFIG_FILE = "adapter_model.safetensors", "adapter_config.json"


@dataclass
class Tensors:
    """Everything an output needs, loaded once: PEFT modules' (A, B) and each expert group's stacked (a, b)."""

    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # name -> (A, B, scale)
    experts: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, ExpertLoRA]]


def convert(src, out, to: str, *, experts: ExpertPath = GENERIC_EXPERTS, expert_dtype: torch.dtype | None = None,
            overwrite: bool = False) -> dict:
    """Reads `src` (any layout) and writes it to `out` in layout `to`; returns a summary for the CLI."""
    if to not in FORMATS:
        raise KTChatError(f"--to must be one of {', '.join(FORMATS)}, got {to!r}")
    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents or out.resolve() in src.resolve().parents:
        raise KTChatError(f"{out}: the output folder must not be the adapter folder, inside it, or above it")
    with staged_output(out, overwrite) as tmp:
        adapter = read_adapter(src)
        tensors = load_all(adapter, experts, expert_dtype)
        {"peft": write_peft, "kt": write_kt, "sglang": write_sglang}[to](adapter, tensors, tmp)
    return {"from": adapter.layout, "to": read_adapter(out).layout, "modules": len(tensors.modules),
            "expert_groups": len(tensors.experts)}


def load_all(adapter: Adapter, experts: ExpertPath, expert_dtype: torch.dtype | None) -> Tensors:
    peft, routed = split_channels(adapter, experts, Problems())
    loaded = adapter.weights.load(k for m in peft.values() for k in (m.a_key, m.b_key)) if peft else {}
    modules = {name: (loaded[m.a_key], loaded[m.b_key], m.scale) for name, m in peft.items()}
    stacked = {}
    for key, g in routed.items():
        a, b = g.load()
        stacked[key] = (a.to(expert_dtype or a.dtype), b.to(expert_dtype or b.dtype), g)
    return Tensors(modules, stacked)


def _per_expert(tensors: Tensors):
    """(module name, A, B, scale) of every expert, from the stacked groups."""
    for a, b, g in tensors.experts.values():
        for e in range(a.shape[0]):
            yield g.module_name(e), a[e].clone(), b[e].clone(), g.scale


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def write_peft(adapter: Adapter, tensors: Tensors, out: Path) -> None:
    """Per-expert PEFT: every module under base_model.model.<module>.lora_{A,B}.weight, as PEFT 4.x saves it."""
    flat = {}
    items = [(n, a, b, s) for n, (a, b, s) in tensors.modules.items()] + list(_per_expert(tensors))
    for name, a, b, _ in items:
        flat[peft_key(name, "A")], flat[peft_key(name, "B")] = a, b
    _save(flat, out / ADAPTER_FILE)
    config = _without(adapter.config.raw, "target_parameters")
    _write_config(_target_all(config, [n for n, *_ in items]), _checks(tensors), out)


def write_kt(adapter: Adapter, tensors: Tensors, out: Path) -> None:
    """KT fused: non-expert LoRA in adapter_model.safetensors, stacked expert LoRA in fused_expert_lora.safetensors,
    rank and alpha (one of each, as kt_kernel keeps them) in kt_adapter_manifest.json."""
    if not tensors.experts:
        raise KTChatError(f"{adapter.path}: the adapter has no routed-expert LoRA to fuse; it is a plain PEFT adapter")
    rank, scale = _one_rank_and_scale([(a.shape[1], g.scale) for a, _, g in tensors.experts.values()], "KT fused")
    flat = {}
    for name, (a, b, _) in tensors.modules.items():
        flat[peft_key(name, "A")], flat[peft_key(name, "B")] = a, b
    _save(flat, out / ADAPTER_FILE)
    _save({kt_fused_key(layer, proj, side): t for (layer, proj), (a, b, _) in tensors.experts.items()
           for side, t in (("A", a), ("B", b))}, out / FUSED_NAME)
    config = _without(adapter.config.raw, "target_parameters")
    patterns = sorted({re.escape(g.name_template).replace(re.escape("{expert}"), r"\d+") for *_, g in tensors.experts.values()})
    if patterns:  # as kt_kernel's own fused adapters: PEFT must leave the routed experts alone
        config["exclude_modules"] = f"(?:{'|'.join(patterns)})"
    _write_config(config, _checks(tensors, experts=False), out)
    old = adapter.manifest
    write_manifest(out, rank=rank, alpha=scale * rank, weight_format=old.expert_weight_format if old else "bf16",
                   base_model=(old.base_model if old else None) or adapter.config.raw.get("base_model_name_or_path"),
                   standard_file=ADAPTER_FILE, expert_modules=_module_templates(tensors),
                   provenance=old.provenance if old else None)


def write_sglang(adapter: Adapter, tensors: Tensors, out: Path) -> None:
    """SGLang-KT's composite adapter: one file, keys without base_model.model., one rank and alpha overall."""
    items = [(n, a, b, s) for n, (a, b, s) in tensors.modules.items()] + list(_per_expert(tensors))
    rank, scale = _one_rank_and_scale([(a.shape[0], s) for _, a, _, s in items], "SGLang")
    flat = {}
    for name, a, b, _ in items:
        flat[peft_key(name, "A", prefix=False)], flat[peft_key(name, "B", prefix=False)] = a, b
    _save(flat, out / ADAPTER_FILE)
    config = _without(adapter.config.raw, "target_parameters", "rank_pattern", "alpha_pattern", "exclude_modules")
    config.update(r=rank, lora_alpha=scale * rank, use_rslora=False, peft_type="LORA",
                  target_modules=sorted({n.rsplit(".", 1)[-1] for n, *_ in items}))
    _write_config(config, _checks(tensors), out)


def _one_rank_and_scale(pairs, layout: str) -> tuple[int, float]:
    found = sorted(set(pairs))
    if len(found) > 1:
        raise KTChatError(f"the {layout} layout holds one LoRA rank and alpha, but this adapter has (rank, scale) "
                          f"{found}: use --to peft")
    return found[0] if found else (0, 0.0)


def _module_templates(tensors: Tensors) -> dict[str, str]:
    """proj -> per-expert module path with {layer} and {expert}, when one template fits every layer."""
    found: dict[str, set[str]] = {}
    for (layer, proj), (*_, g) in tensors.experts.items():
        found.setdefault(proj, set()).add(g.name_template.replace(f".{layer}.", ".{layer}.", 1))
    return {proj: t.pop() for proj, t in found.items() if len(t) == 1}


def _without(raw: dict, *keys: str) -> dict:
    """The config with these settings cleared (None, as PEFT writes unset ones)."""
    return {k: (None if k in keys else v) for k, v in raw.items()}


def _target_all(config: dict, names: list[str]) -> dict:
    """target_modules (and exclude_modules) that let plain PEFT find every module written."""
    target, exclude = config.get("target_modules"), config.get("exclude_modules")
    leaves = {n.rsplit(".", 1)[-1] for n in names}
    if isinstance(target, list) and not leaves <= set(target):
        config["target_modules"] = target + sorted(leaves - set(target))
    elif not isinstance(target, list) and not (isinstance(target, str) and all(re.fullmatch(target, n) for n in names)):
        config["target_modules"] = sorted(leaves)
    if isinstance(exclude, str) and any(re.fullmatch(exclude, n) for n in names):
        config["exclude_modules"] = None
    return config


def _checks(tensors: Tensors, *, modules: bool = True, experts: bool = True) -> list[tuple[str, str, int, float]]:
    """(pattern, a module it must match, rank, scale) for every module and expert group an output holds."""
    out = [(re.escape(n), n, a.shape[0], s) for n, (a, _, s) in tensors.modules.items()] if modules else []
    if experts:
        out += [(re.escape(g.name_template).replace(re.escape("{expert}"), r"\d+"), g.module_name(0), a.shape[1], g.scale)
                for a, _, g in tensors.experts.values()]
    return out


def _write_config(config: dict, checks: list[tuple[str, str, int, float]], out: Path) -> None:
    """Writes adapter_config.json, adding rank/alpha patterns (first, so they win) where a module's rank or scale
    differs from what the config gives it (KT's manifest alpha, PEFT's doubled gate_up rank after dropping its zero
    half, ...). Key order is kept: PEFT takes the first pattern that matches."""
    path = out / CONFIG_FILE
    extra_r, extra_a = {}, {}
    for _ in range(2):
        config["rank_pattern"] = {**extra_r, **(config.get("rank_pattern") or {})}
        config["alpha_pattern"] = {**extra_a, **(config.get("alpha_pattern") or {})}
        path.write_text(json.dumps(config, indent=2) + "\n")
        parsed = read_adapter_config(out)
        wrong = [(p, n, r, s) for p, n, r, s in checks
                 if parsed.rank_for(n) != r or not math.isclose(parsed.scale_for(n), s, rel_tol=1e-12)]
        if not wrong:
            return
        for pattern, _, r, s in wrong:
            extra_r[pattern] = r
            extra_a[pattern] = s * (math.sqrt(r) if parsed.use_rslora else r)
    raise KTChatError(f"{path}: cannot express the rank and scale of {wrong[0][1]} in adapter_config.json")
