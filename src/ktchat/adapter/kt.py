"""KT's fused adapter layout: `fused_expert_lora.safetensors` + `kt_adapter_manifest.json` (kt_kernel.sft).

The fused file holds `layers.<L>.experts.<gate|up|down>_lora_<a|b>` already stacked ([E, r, in] / [E, out, r]);
its rank and alpha live only in the manifest, which also records size and sha256 of every adapter file.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from .core import ExpertLoRA, Problems
from .keys import kt_fused_key, parse_kt_fused_key
from .kt_provenance import Provenance, read_provenance
from .sources import load_pair
from ..formats.checkpoint import LORA_DTYPES, sha256_file, st_name
from .weights import AdapterWeights

logger = logging.getLogger(__name__)

MANIFEST_NAME = "kt_adapter_manifest.json"
FUSED_NAME = "fused_expert_lora.safetensors"
MANIFEST_VERSION = 1
# How KT's own SGLang converter names per-expert modules; a manifest written by ktchat records the real names.
DEFAULT_EXPERT_MODULE = "model.layers.{layer}.mlp.experts.{expert}.{proj}_proj"


@dataclass(frozen=True)
class KTManifest:
    path: Path
    rank: int
    alpha: float
    base_model: str | None
    expert_weight_format: str | None
    tensors: dict = field(default_factory=dict)  # the fused file's tensor contract: key -> {shape, dtype}
    expert_modules: dict = field(default_factory=dict)  # proj -> per-expert module template (ktchat's hint)
    provenance: Provenance | None = None  # training's base and routed-expert weights (kt_provenance)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank  # kt_kernel's scaling: no rsLoRA

    def name_template(self, layer: int, proj: str) -> str:
        template = self.expert_modules.get(proj, DEFAULT_EXPERT_MODULE)
        return template.replace("{layer}", str(layer)).replace("{proj}", proj)


def read_manifest(adapter_dir: Path, problems: Problems) -> KTManifest | None:
    """Parses and checks the manifest, then checks every file it lists against its size and sha256."""
    path = adapter_dir / MANIFEST_NAME
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        problems.add(f"{path}: cannot read the KT adapter manifest ({exc})")
        return None
    if not isinstance(raw, dict):
        problems.add(f"{path}: the KT adapter manifest must be a JSON object")
        return None
    if raw.get("version") != MANIFEST_VERSION or raw.get("status") != "ready":
        problems.add(f"{path}: version {raw.get('version')!r} / status {raw.get('status')!r}: expected version "
                     f"{MANIFEST_VERSION} and status 'ready' (an unfinished or newer KT save)")
    lora = raw.get("lora") if isinstance(raw.get("lora"), dict) else {}
    rank, alpha = lora.get("rank"), lora.get("alpha")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        problems.add(f"{path}: lora.rank must be a positive integer, got {rank!r}")
        return None
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        problems.add(f"{path}: lora.alpha must be a positive number, got {alpha!r}")
        return None
    artifacts = raw.get("artifacts")
    if not isinstance(artifacts, dict) or not isinstance(artifacts.get(FUSED_NAME), dict):
        problems.add(f"{path}: artifacts must list {FUSED_NAME}")
        return None
    verify_artifacts(path, adapter_dir, artifacts, problems)
    provenance = read_provenance(path, raw, problems)
    fused = artifacts[FUSED_NAME]
    tensors = fused.get("tensors") or {}
    if not isinstance(tensors, dict):
        problems.add(f"{path}: artifacts.{FUSED_NAME}.tensors must be an object {{key: {{shape, dtype}}}}")
        tensors = {}
    if "tensor_count" in fused and "tensors" in fused and fused["tensor_count"] != len(tensors):
        problems.add(f"{path}: artifacts.{FUSED_NAME}.tensor_count {fused['tensor_count']!r} but tensors lists "
                     f"{len(tensors)}")
    return KTManifest(path, rank, float(alpha), provenance.base.get("model_name_or_path"), provenance.weight_format,
                      tensors, _module_hint(raw), provenance)


def _module_hint(raw: dict) -> dict[str, str]:
    """ktchat's record of the per-expert module names ({proj: template}); ignored unless well formed."""
    hint = raw.get("ktchat", {}).get("expert_modules") if isinstance(raw.get("ktchat"), dict) else None
    if not isinstance(hint, dict):
        return {}
    return {p: t for p, t in hint.items() if p in ("gate", "up", "down") and isinstance(t, str)
            and "{layer}" in t and "{expert}" in t}


def verify_artifacts(path: Path, adapter_dir: Path, artifacts: dict, problems: Problems) -> None:
    """Reports every listed file whose size or sha256 differs, in one message.

    adapter_config.json only warns: users routinely edit its base_model_name_or_path when they move an adapter,
    and its values are checked against the tensors anyway. (The manifest's own base path is never compared.)
    """
    differ, config_differs = [], False
    for name, record in sorted(artifacts.items()):
        if not isinstance(record, dict) or Path(name).name != name:
            problems.add(f"{path}: invalid artifact record {name!r}")
            continue
        found = _differences(adapter_dir / name, record)
        if found and name == "adapter_config.json":
            config_differs = True
        elif found:
            differ.append(f"{name} ({found})")
    if config_differs:
        logger.warning("%s: adapter_config.json differs from the checksum recorded at training time (edited?); "
                       "loading it anyway", path)
    if differ:
        problems.add(f"{path}: files differ from the manifest: {'; '.join(differ)}")


def _differences(file: Path, record: dict) -> str:
    if not file.is_file():
        return "missing"
    size, digest = file.stat().st_size, sha256_file(file)
    found = []
    if record.get("size") != size:
        found.append(f"size {size} bytes, manifest says {record.get('size')!r}")
    if record.get("sha256") != digest:
        found.append(f"sha256 {digest[:12]}..., manifest says {str(record.get('sha256'))[:12]}...")
    return ", ".join(found)


def read_fused(adapter_dir: Path, manifest: KTManifest, problems: Problems) -> dict[tuple[int, str], ExpertLoRA]:
    """The fused file's tensors as one ExpertLoRA per (layer, projection), checked against the manifest."""
    weights = AdapterWeights(adapter_dir / FUSED_NAME)
    pairs: dict[tuple[int, str], dict[str, str]] = {}
    for key in weights.shapes:
        parsed = parse_kt_fused_key(key)
        if parsed is None:
            problems.add(f"{weights.path}: unknown key {key!r} (expected layers.<L>.experts.<gate|up|down>_lora_<a|b>)")
            continue
        pairs.setdefault(parsed[:2], {})[parsed[2]] = key
    _check_contract(weights, manifest, problems)
    out = {}
    for (layer, proj), keys in sorted(pairs.items()):
        lora = _fused_group(weights, manifest, layer, proj, keys, problems)
        if lora is not None:
            out[(layer, proj)] = lora
    return out


def _fused_group(weights, manifest: KTManifest, layer: int, proj: str, keys: dict, problems: Problems):
    where = weights.path
    if set(keys) != {"A", "B"}:
        have = next(iter(keys.values()))
        problems.add(f"{where}: {have} has no {kt_fused_key(layer, proj, 'B' if 'A' in keys else 'A')} partner")
        return None
    a, b = weights.shapes[keys["A"]], weights.shapes[keys["B"]]
    if len(a) != 3 or len(b) != 3:
        problems.add(f"{where}: {keys['A']} {list(a)} / {keys['B']} {list(b)}: fused expert LoRA must be 3-D [E, ...]")
        return None
    if a[0] != b[0] or a[1] != b[2]:
        problems.add(f"{where}: {keys['A']} {list(a)} and {keys['B']} {list(b)} disagree on experts or rank "
                     "(expected a [E, r, in], b [E, out, r])")
        return None
    dtype = weights.dtypes[keys["A"]]
    if dtype not in LORA_DTYPES or weights.dtypes[keys["B"]] != dtype:
        problems.add(f"{where}: {keys['A']} / {keys['B']} are {dtype} / {weights.dtypes[keys['B']]}; fused expert "
                     "LoRA must be one floating-point dtype")
        return None
    if a[1] != manifest.rank:
        problems.add(f"{where}: {keys['A']} has rank {a[1]} but {manifest.path.name} says lora.rank={manifest.rank}")
        return None
    return ExpertLoRA(layer, proj, a[0], a[1], a[2], b[1], manifest.scale, dtype,
                      f"{where}: {keys['A']} / {keys['B']}", manifest.name_template(layer, proj),
                      partial(load_pair, weights, keys["A"], keys["B"]))


def _check_contract(weights: AdapterWeights, manifest: KTManifest, problems: Problems) -> None:
    """The manifest lists every fused tensor's shape and dtype; report every one that differs from the file."""
    if not manifest.tensors:
        return
    actual = {k: {"shape": list(s), "dtype": st_name(weights.dtypes[k]) or weights.dtypes[k]}
              for k, s in weights.shapes.items()}
    differ = [k for k in sorted(set(actual) | set(manifest.tensors)) if actual.get(k) != manifest.tensors.get(k)]
    if differ:
        shown = [f"{k} (file {actual.get(k)}, manifest {manifest.tensors.get(k)})" for k in differ[:4]]
        more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
        problems.add(f"{manifest.path}: fused tensors differ from the manifest: {'; '.join(shown)}{more}")


def write_manifest(out_dir: Path, *, rank: int, alpha: float, base_model: str | None, weight_format: str,
                   standard_file: str, expert_modules: dict[str, str], provenance: Provenance | None = None) -> Path:
    """A manifest kt_kernel's loader accepts (version 1, ready, sizes, sha256, fused tensor contract); with
    `provenance` (an adapter being converted) its base record and routed-weight fields are kept."""
    fused = AdapterWeights(out_dir / FUSED_NAME)
    contract = {k: {"shape": list(s), "dtype": st_name(fused.dtypes[k])} for k, s in sorted(fused.shapes.items())}
    artifacts = {name: {"size": (out_dir / name).stat().st_size, "sha256": sha256_file(out_dir / name)}
                 for name in ("adapter_config.json", standard_file, FUSED_NAME)}
    artifacts[FUSED_NAME].update(tensor_count=len(contract), tensors=contract)
    payload = {"version": MANIFEST_VERSION, "status": "ready", "expert_weight_format": weight_format,
               "base": {"model_name_or_path": base_model}, "lora": {"rank": rank, "alpha": float(alpha)},
               "artifacts": artifacts, "ktchat": {"expert_modules": expert_modules}}
    if provenance is not None:
        payload["base"] = dict(provenance.base) or payload["base"]
        for key, value in (("non_expert_cache", provenance.non_expert_cache),
                           (provenance.routed_key, provenance.routed),
                           ("expert_quantization", provenance.expert_quantization)):
            if key and value is not None:
                payload[key] = value
    path = out_dir / MANIFEST_NAME
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return path
