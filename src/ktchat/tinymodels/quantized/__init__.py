"""Tiny checkpoints in the quantized layouts big MoE models ship in, made offline from a tiny family's base.

`build_quantized(root, variant, base)` quantizes the base's tensors the way the real checkpoints are made
(ktchat.formats.quant, round to nearest, scale from each block's max) and writes them under the real names, with
config.json's quantization_config as the real ones have it; the base's trained adapter is copied beside it. The
reference for a variant is its dequantized base with every LoRA merged by hand (tests/reference.py).

- deepseek_v3-fp8: DeepSeek-V3's block FP8, blocks [128, 128]: every Linear but the router in FP8 (embeddings, norms,
  router, lm_head stay bf16), with partial edge blocks where the tiny dims are not multiples of 128
  (kv_a_proj_with_mqa's 80 rows, q_b_proj's 192 rows and 64 columns).
- deepseek_v3-fp8-edge: the same with blocks [48, 80], so every weight, the routed experts included, ends in
  partial blocks on both sides.
- kimi_k2-int4: Kimi-K2-Thinking's compressed-tensors "pack-quantized" INT4, group 32, routed experts only (its
  `ignore` list), under Kimi's config.json (model_type kimi_k2, DeepSeek-V3's architecture).
- kimi_k25-int4: the same on the tiny Kimi-K2.5 VLM (model.language_model.*, a vision tower and projector, which
  its `ignore` list leaves unquantized as K2.5's does).

A sub-package of tinymodels so its sources do not enter the families' cache stamps (their hash covers
tinymodels/*.py): editing this file rebuilds the variants, not the trained families.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .. import TinyPaths

STAMP = "quant-stamp.json"
ROUTER = re.compile(r".*\.mlp\.gate\.weight")
ROUTED_EXPERT = re.compile(r".*\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight")

_KIMI_IGNORE = ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", r"re:.*mlp\.(gate|up|gate_up|down)_proj.*"]


@dataclass(frozen=True)
class Variant:
    name: str
    family: str  # the tiny family whose base and adapter it starts from
    format: str  # ktchat.formats.quant format
    block: tuple[int, int]
    only_routed: bool  # quantize the routed experts only (Kimi), else every Linear but the router (DeepSeek-V3)
    config: dict  # merged into config.json (quantization_config and the rest)

    def quantizes(self, key: str, kind: str) -> bool:
        if self.only_routed:
            return ROUTED_EXPERT.fullmatch(key) is not None
        return kind == "linear" and ROUTER.fullmatch(key) is None


def _fp8_config(block) -> dict:
    return {"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                    "weight_block_size": list(block)}}


def _compressed_tensors(group: int, ignore: list[str]) -> dict:
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": group,
               "dynamic": False, "actorder": None, "block_structure": None, "observer": "minmax", "observer_kwargs": {}}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "kv_cache_scheme": None, "ignore": list(ignore),
            "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None, "output_activations": None,
                                          "weights": weights}}}


def _kimi_config(group: int) -> dict:
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "kimi_k2",
        "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                     "AutoModel": "modeling_deepseek.DeepseekV3Model",
                     "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
        "quantization_config": _compressed_tensors(group, _KIMI_IGNORE),
    }


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("deepseek_v3-fp8", "deepseek_v3", "fp8", (128, 128), False, _fp8_config((128, 128))),
    Variant("deepseek_v3-fp8-edge", "deepseek_v3", "fp8", (48, 80), False, _fp8_config((48, 80))),
    Variant("kimi_k2-int4", "deepseek_v3", "int4", (1, 32), True, _kimi_config(32)),
    Variant("kimi_k25-int4", "kimi_k25", "int4", (1, 32), True,
            {"quantization_config": _compressed_tensors(32, _KIMI_IGNORE + ["re:.*vision_tower.*", "re:.*mm_projector.*"])}),
)}


def _stamp(variant: Variant, base: TinyPaths) -> str:
    from ...formats import quant

    h = hashlib.sha256(repr(variant).encode())
    h.update((base.root / "tiny-stamp.json").read_bytes())
    for src in (Path(__file__), Path(quant.__file__)):
        h.update(src.read_bytes())
    return h.hexdigest()


def build_quantized(root, variant: str, base: TinyPaths, *, force: bool = False) -> TinyPaths:
    """Writes (or reuses) `variant` of `base` (a built tiny family, VARIANTS[variant].family) under `root`."""
    v = VARIANTS.get(variant)
    if v is None:
        raise ValueError(f"no quantized tiny variant {variant!r} (have: {', '.join(VARIANTS)})")
    root = Path(root).resolve()
    paths = TinyPaths(root=root, model=root / "model", adapter=root / "adapter")
    stamp = _stamp(v, base)
    stamp_file = root / STAMP
    if not force and stamp_file.is_file() and stamp_file.read_text() == stamp:
        return paths
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".tiny.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and stamp_file.is_file() and stamp_file.read_text() == stamp:
            return paths
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
        try:
            _write_model(v, base.model, tmp / "model")
            shutil.copytree(base.adapter, tmp / "adapter")
            acfg = json.loads((tmp / "adapter" / "adapter_config.json").read_text())
            acfg["base_model_name_or_path"] = str(paths.model)
            (tmp / "adapter" / "adapter_config.json").write_text(json.dumps(acfg, indent=2, sort_keys=True) + "\n")
            stamp_file.unlink(missing_ok=True)
            for old in [*(root / p for p in ("model", "adapter")), *root.glob("merged-*")]:
                shutil.rmtree(old, ignore_errors=True)
            for part in ("model", "adapter"):
                (tmp / part).rename(root / part)
            stamp_file.write_text(stamp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return paths


def _write_model(v: Variant, base_dir: Path, out: Path) -> None:
    """The base folder with its weights quantized: same shards, each quantized weight replaced by its format's
    tensors in place; config.json with the variant's fields."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ...formats import quant
    from ...formats.checkpoint import SHARD_INDEX
    from ..families import family

    out.mkdir(parents=True)
    cfg = json.loads((base_dir / "config.json").read_text())
    kinds = {key: kind for key, _, kind in family(v.family).weight_specs(cfg)}
    index = json.loads((base_dir / SHARD_INDEX).read_text())
    weight_map, total = {}, 0
    for shard in sorted(set(index["weight_map"].values())):
        tensors = {}
        with safe_open(str(base_dir / shard), framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                if v.quantizes(key, kinds.get(key, "")):
                    tensors.update(quant.quantize(v.format, t.float(), v.block).tensors(key.removesuffix(".weight")))
                else:
                    tensors[key] = t
        tensors = {k: t.contiguous() for k, t in tensors.items()}
        save_file(tensors, str(out / shard), metadata={"format": "pt"})
        for k, t in tensors.items():
            weight_map[k] = shard
            total += t.numel() * t.element_size()
    (out / SHARD_INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                               "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    for f in base_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in (SHARD_INDEX, "config.json"):
            shutil.copy2(f, out / f.name)
    (out / "config.json").write_text(json.dumps({**cfg, **v.config}, indent=2) + "\n")
