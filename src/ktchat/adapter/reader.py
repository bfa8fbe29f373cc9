"""Reading an adapter folder, whatever its layout, into PEFT-layout modules, parameter LoRA and KT fused groups.

Reads config and tensor headers only (no tensor data), pairs every A with its B and checks ranks, so a bad
adapter is refused before any weight moves. Which modules are routed experts is decided later, per
architecture, by `split_channels`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..formats.checkpoint import LORA_DTYPES
from ..errors import KTChatError
from .config import AdapterConfig, read_adapter_config
from .core import LoraModule, Problems
from .keys import parse_peft_key, split_nested, unsupported_reason
from .kt import FUSED_NAME, MANIFEST_NAME, KTManifest, read_fused, read_manifest
from .weights import WEIGHT_NAMES, AdapterWeights

FUSED_PARAMS = ("gate_up_proj", "down_proj")  # transformers 5's fused expert parameters


@dataclass(frozen=True)
class ParamLoRA:
    """PEFT's LoRA on one fused expert parameter (transformers 5, `target_parameters`): A [E*r, in], B [out, r*E]."""

    container: str  # the fused experts module, e.g. model.layers.1.mlp.experts
    param: str  # gate_up_proj or down_proj
    a_key: str
    b_key: str
    num_experts: int
    rank: int
    in_features: int
    out_features: int
    scale: float
    dtype: str


@dataclass(frozen=True)
class Adapter:
    path: Path
    config: AdapterConfig
    weights: AdapterWeights | None  # adapter_model.*; None only for a KT adapter without non-expert LoRA
    modules: dict  # {module path: LoraModule}: PEFT layout, non-expert and per-expert alike
    params: tuple = ()  # ParamLoRA, PEFT's transformers-5 layout
    fused: dict = field(default_factory=dict)  # {(layer, proj): ExpertLoRA} from KT's fused file
    manifest: KTManifest | None = None

    @property
    def layout(self) -> str:
        if self.manifest is not None:
            return "KT fused (fused_expert_lora.safetensors + kt_adapter_manifest.json)"
        if self.params:
            return "PEFT on transformers-5 fused experts (target_parameters)"
        keys = [parse_peft_key(m.a_key) for m in self.modules.values()]
        if any(k.renamed for k in keys):
            return "PEFT with KT wrapper segments (.orig_module. / .original_moe.)"
        if keys and not any(k.prefixed for k in keys):
            return "SGLang composite (PEFT keys without base_model.model.)"
        return "PEFT per-expert"


def read_adapter(adapter_dir: str | Path, problems: Problems | None = None) -> Adapter:
    """Reads config and tensor headers of any supported layout; loads no tensor data."""
    problems = problems or Problems()
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise KTChatError(f"{adapter_dir}: adapter folder not found")
    config = read_adapter_config(adapter_dir)
    kt = (adapter_dir / MANIFEST_NAME).exists() or (adapter_dir / FUSED_NAME).exists()
    manifest = _read_kt_manifest(adapter_dir, problems) if kt else None
    weights = _standard_weights(adapter_dir, required=not kt)
    modules, params = read_peft_file(weights, config, problems) if weights else ({}, ())
    fused = read_fused(adapter_dir, manifest, problems) if manifest else {}
    if not modules and not params and not fused:
        problems.add(f"{weights.path if weights else adapter_dir}: the adapter holds no LoRA tensors")
    return Adapter(adapter_dir, config, weights, modules, params, fused, manifest)


def _read_kt_manifest(adapter_dir: Path, problems: Problems) -> KTManifest | None:
    if not (adapter_dir / MANIFEST_NAME).exists():
        raise KTChatError(f"{adapter_dir / FUSED_NAME}: KT fused expert LoRA without {MANIFEST_NAME}, which holds "
                          "its rank and alpha: the adapter is incomplete")
    if not (adapter_dir / FUSED_NAME).is_file():
        raise KTChatError(f"{adapter_dir / MANIFEST_NAME}: lists {FUSED_NAME}, which is missing")
    return read_manifest(adapter_dir, problems)


def _standard_weights(adapter_dir: Path, required: bool) -> AdapterWeights | None:
    for name in WEIGHT_NAMES:
        if (adapter_dir / name).is_file():
            return AdapterWeights(adapter_dir / name)
    if required:
        raise KTChatError(f"{adapter_dir}: no adapter weights found (expected one of {', '.join(WEIGHT_NAMES)})")
    return None


def read_peft_file(weights: AdapterWeights, config: AdapterConfig, problems: Problems):
    """(LoRA modules, parameter LoRA) of a PEFT-layout file."""
    pairs = _pair_keys(weights, problems)
    wrapped = _pop_param_wrappers(pairs, config)
    modules = {}
    for name, keys in sorted(pairs.items()):
        module = _lora_module(name, keys, weights, config, problems)
        if module is not None:
            modules[name] = module
    params = tuple(p for container, nest in sorted(wrapped.items())
                   for p in _param_loras(container, nest, weights, config, problems))
    return modules, params


def _pair_keys(weights: AdapterWeights, problems: Problems) -> dict[str, dict[str, str]]:
    pairs: dict[str, dict[str, str]] = {}
    for key in weights.shapes:
        parsed = parse_peft_key(key)
        if parsed is None:
            problems.add(f"{weights.path}: unknown adapter key {key!r} ({unsupported_reason(key)})")
            continue
        side = pairs.setdefault(parsed.module, {})
        if parsed.side in side:
            problems.add(f"{weights.path}: duplicate LoRA {parsed.side} tensors for {parsed.module}: "
                         f"{side[parsed.side]}, {key}")
            continue
        side[parsed.side] = key
    return pairs


def _pop_param_wrappers(pairs: dict, config: AdapterConfig) -> dict[str, dict[int, dict[str, str]]]:
    """Takes PEFT's parameter wrappers of fused `experts` modules out of `pairs`: {container: {depth: keys}}."""
    if not config.target_parameters:
        return {}
    wrapped: dict[str, dict[int, dict[str, str]]] = {}
    for name in list(pairs):
        container, depth = split_nested(name)
        if container.rsplit(".", 1)[-1] == "experts":
            wrapped.setdefault(container, {})[depth] = pairs.pop(name)
    return wrapped


def _lora_module(name: str, keys: dict, weights: AdapterWeights, config: AdapterConfig, problems: Problems):
    shapes = _pair_shapes(name, keys, weights, problems)
    if shapes is None:
        return None
    (rank, in_f), (out_f, _) = shapes
    expected = config.rank_for(name)
    if rank != expected:
        problems.add(f"{weights.path}: {keys['A']} has rank {rank} but {config.path.name} gives r={expected} for {name}")
        return None
    return LoraModule(name, keys["A"], keys["B"], rank, in_f, out_f, config.scale_for(name), weights.dtypes[keys["A"]])


def _pair_shapes(name: str, keys: dict, weights: AdapterWeights, problems: Problems):
    """((rank, in), (out, rank)) of a 2-D, floating, rank-consistent A/B pair, else None (reported)."""
    for side in "AB":
        if side not in keys:
            problems.add(f"{weights.path}: {name} has lora_{'BA'[side == 'B']} but no lora_{side}")
            return None
    a, b = weights.shapes[keys["A"]], weights.shapes[keys["B"]]
    if len(a) != 2 or len(b) != 2:
        problems.add(f"{weights.path}: {keys['A']} {list(a)} / {keys['B']} {list(b)}: LoRA tensors must be 2-D")
        return None
    if a[0] != b[1]:
        problems.add(f"{weights.path}: rank mismatch for {name}: lora_A has {a[0]} rows, lora_B {b[1]} columns")
        return None
    bad = [k for k in keys.values() if weights.dtypes[k] not in LORA_DTYPES]
    if bad:
        problems.add(f"{weights.path}: {bad[0]} has dtype {weights.dtypes[bad[0]]}; LoRA tensors must be floating point")
        return None
    return a, b


def _param_loras(container: str, nest: dict, weights: AdapterWeights, config: AdapterConfig, problems: Problems):
    """Which wrapper holds which fused parameter: by the config's target_parameters, and by shape when both are
    wrapped (gate_up maps H -> 2I, down maps I -> H: only one assignment fits)."""
    targets = [p for p in FUSED_PARAMS if _peft_targets(f"{container}.{p}", config.target_parameters)]
    where = f"{weights.path}: {container}"
    if len(nest) != len(targets):
        problems.add(f"{where} has {len(nest)} parameter LoRA wrapper(s) but target_parameters names {targets} for it")
        return []
    shapes = {d: _pair_shapes(container, keys, weights, problems) for d, keys in nest.items()}
    if any(s is None for s in shapes.values()):
        return []
    order = sorted(nest)
    if len(order) == 2:
        (x, y) = order
        (_, xin), (xout, _) = shapes[x]
        (_, yin), (yout, _) = shapes[y]
        if xin == yout and xout == 2 * yin:
            order = [x, y]
        elif yin == xout and yout == 2 * xin:
            order = [y, x]
        else:
            problems.add(f"{where}: the two parameter LoRA wrappers do not fit gate_up_proj [2I, H] and down_proj [H, I]")
            return []
    out = [_param_lora(container, param, nest[d], shapes[d], weights, config, problems) for param, d in zip(targets, order)]
    return [p for p in out if p is not None]


def _param_lora(container, param, keys, shapes, weights, config: AdapterConfig, problems: Problems):
    (rows, in_f), (out_f, _) = shapes
    rank = config.rank_for(f"{container}.{param}")
    if rows % rank or (param == "gate_up_proj" and out_f % 2):
        problems.add(f"{weights.path}: {keys['A']} {[rows, in_f]} / {keys['B']} {[out_f, rows]} do not fit LoRA of "
                     f"rank {rank} on {container}.{param} (rows must be experts x rank)")
        return None
    return ParamLoRA(container, param, keys["A"], keys["B"], rows // rank, rank, in_f, out_f,
                     config.scale_for(f"{container}.{param}"), weights.dtypes[keys["A"]])


def _peft_targets(key: str, targets) -> bool:
    """PEFT's rule for target_parameters: the full name, or a dotted suffix of it."""
    return any(key == t or key.endswith(f".{t}") for t in targets)

