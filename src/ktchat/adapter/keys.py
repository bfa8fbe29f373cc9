"""Adapter key names: pure functions from stored keys to module paths and back, one place for every layout.

PEFT writes `base_model.model.<module>.lora_A[.<adapter name>].weight`; SGLang drops the `base_model.model.`
prefix; older KT integrations wrapped the MoE block, leaving `.orig_module.` or `.original_moe.` inside the path;
KT's fused file uses `layers.<L>.experts.<proj>_lora_<a|b>`; PEFT's parameter LoRA on transformers-5 fused
experts nests one wrapper per parameter (`...experts.lora_A`, `...experts.base_layer.lora_A`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PEFT_PREFIX = "base_model.model."
_WRAPPED = re.compile(r"\.(?:orig_module|original_moe)(?=\.)")
_PEFT_KEY = re.compile(
    r"^(?P<prefix>base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[A-Za-z0-9_-]+))?\.weight$"
)
_KT_FUSED_KEY = re.compile(r"^layers\.(?P<layer>\d+)\.experts\.(?P<proj>gate|up|down)_lora_(?P<ab>[ab])$")
_NESTED = re.compile(r"^(?P<container>.+?)(?P<nest>(?:\.base_layer)*)$")
_UNSUPPORTED = {
    "lora_magnitude_vector": "a DoRA tensor (DoRA is not supported yet)",
    "lora_embedding_": "LoRA on embeddings is not supported",
    "modules_to_save": "modules_to_save (fully trained extra modules) are not supported",
    ".lora_experts.": "KT 'LoRA Experts' (extra trained experts) are not supported",
}


@dataclass(frozen=True)
class PeftKey:
    module: str  # normalized module path
    side: str  # "A" or "B"
    prefixed: bool  # had `base_model.model.`
    renamed: bool  # had KT wrapper segments, now removed


def parse_peft_key(key: str) -> PeftKey | None:
    """A PEFT-layout LoRA key -> (module path, side), or None if it is not one."""
    m = _PEFT_KEY.match(key)
    if m is None:
        return None
    module, renamed = _WRAPPED.subn("", m["module"])
    return PeftKey(module, m["ab"], m["prefix"] is not None, renamed > 0)


def peft_key(module: str, side: str, *, prefix: bool = True) -> str:
    return f"{PEFT_PREFIX if prefix else ''}{module}.lora_{side}.weight"


def kt_fused_key(layer: int, proj: str, side: str) -> str:
    return f"layers.{layer}.experts.{proj}_lora_{side.lower()}"


def parse_kt_fused_key(key: str) -> tuple[int, str, str] | None:
    """`layers.3.experts.gate_lora_a` -> (3, "gate", "A")."""
    m = _KT_FUSED_KEY.match(key)
    return (int(m["layer"]), m["proj"], m["ab"].upper()) if m else None


def split_nested(module: str) -> tuple[str, int]:
    """`...experts.base_layer.base_layer` -> (`...experts`, 2): the wrapped module and how deep PEFT nested."""
    m = _NESTED.match(module)
    return m["container"], m["nest"].count(".base_layer")


def unsupported_reason(key: str) -> str:
    for marker, why in _UNSUPPORTED.items():
        if marker in key:
            return why
    return "not a PEFT LoRA A/B weight"


# Key renaming PEFT applies while loading (peft >= 0.17 `key_mapping`, after it strips `base_model.model.`).
PEFT_KEY_MAPPING = {_WRAPPED.pattern: ""}
