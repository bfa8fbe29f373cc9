"""The adapter's own LoRA settings: rank and alpha per module come from here, never from a user's YAML.

Every adapter_config.json key that ktchat or PEFT's LoraConfig reads is checked here, for type and range, when the
adapter is read: before any weight loads, and before PEFT sees the file (a bad value used to come out of PEFT as a
traceback after the checkpoint had loaded). Keys a newer PEFT adds pass through unchecked;
tests/test_preload.py fails when the installed PEFT has a LoraConfig field these tables do not know.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import KTChatError

CONFIG_NAME = "adapter_config.json"

# Options whose effect ktchat does not reproduce: refusing them beats a silently wrong model.
_UNSUPPORTED = {
    "fan_in_fan_out": "fan_in_fan_out adapters (Conv1D layers) are not supported",
    "lora_bias": "LoRA bias terms (lora_bias: true) are not supported",
    "use_qalora": "QA-LoRA adapters (GPTQ base layers) are not supported",
    "layer_replication": "adapters that replicate base layers (layer_replication) are not supported",
    "megatron_config": "Megatron-LM parallel layers (megatron_config) are not supported",
}
# PEFT builds another kind of layer for these (its LoraConfig fields tagged is_lora_variant); ktchat's CPU experts
# and its check of what PEFT loaded know plain LoRA only.
VARIANTS = {
    "use_dora": "DoRA adapters are not supported yet",
    "velora_config": "VeLoRA adapters are not supported",
    "alora_invocation_tokens": "activated LoRA (aLoRA) adapters are not supported",
    "monteclora_config": "MonteCLoRA adapters are not supported",
    "use_bdlora": "block-diagonal LoRA (BD-LoRA) adapters are not supported",
    "arrow_config": "Arrow adapters are not supported",
    "kasa_config": "KaSA adapters are not supported",
}
# init_lora_weights: these only set the initial LoRA, which the stored tensors replace (true/false/null too)...
INITS = ("gaussian", "eva", "orthogonal", "lora_ga")
# ...these make PEFT rewrite the base weights when it loads the adapter (residual inits: PiSSA, CorDA, OLoRA, LoftQ),
# which the CPU experts would not; MiCA is a variant. PEFT reads "pissa" and "corda" as prefixes (pissa_niter_16).
_RESIDUAL_INITS = ("pissa", "corda", "olora", "loftq")
_VARIANT_INITS = {"mica": "MiCA adapters are not supported"}


def _is_index(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_str_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _is_token_indices(v) -> bool:
    as_list = isinstance(v, list) and all(map(_is_index, v))
    return as_list or (isinstance(v, dict) and all(isinstance(x, list) and all(map(_is_index, x)) for x in v.values()))


# key -> (what is allowed, test); every key may also be null or left out, which means PEFT's default.
_TYPES = {
    **{k: ("true or false", lambda v: isinstance(v, bool)) for k in (
        "use_rslora", "use_dora", "fan_in_fan_out", "lora_bias", "use_qalora", "inference_mode",
        "ensure_weight_tying")},
    **{k: ("a string", lambda v: isinstance(v, str)) for k in (
        "task_type", "base_model_name_or_path", "revision", "peft_version", "megatron_core")},
    **{k: ("a module name pattern or a list of module names", lambda v: isinstance(v, str) or _is_str_list(v))
       for k in ("target_modules", "exclude_modules", "layers_pattern")},
    **{k: ("a list of names", _is_str_list) for k in ("modules_to_save", "target_parameters")},
    **{k: ("a JSON object", lambda v: isinstance(v, dict)) for k in (
        "auto_mapping", "loftq_config", "eva_config", "corda_config", "lora_ga_config", "runtime_config")},
    "layers_to_transform": ("a layer index >= 0 or a list of them",
                            lambda v: _is_index(v) or (isinstance(v, list) and all(map(_is_index, v)))),
    "trainable_token_indices": ("a list of token ids >= 0, or a mapping of module name to such a list",
                                _is_token_indices),
    "qalora_group_size": ("an integer >= 1", lambda v: _is_index(v) and v >= 1),
}

# Every key checked here (tests/test_preload.py holds this against the installed PEFT's LoraConfig fields).
CHECKED_KEYS = frozenset({*_TYPES, *_UNSUPPORTED, *VARIANTS, "peft_type", "r", "lora_alpha", "lora_dropout", "bias",
                          "init_lora_weights", "rank_pattern", "alpha_pattern"})


@dataclass(frozen=True)
class AdapterConfig:
    path: Path
    r: int
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    target_parameters: tuple[str, ...] = ()  # PEFT's LoRA on nn.Parameters (transformers-5 fused experts)
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    def rank_for(self, module: str) -> int:
        return int(_pattern_value(self.rank_pattern, module, self.r))

    def alpha_for(self, module: str) -> float:
        return float(_pattern_value(self.alpha_pattern, module, self.lora_alpha))

    def scale_for(self, module: str) -> float:
        """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA, per module through the patterns."""
        r = self.rank_for(module)
        return self.alpha_for(module) / (math.sqrt(r) if self.use_rslora else r)


def _pattern_value(patterns: dict, module: str, default):
    # Same rule as PEFT: the first pattern that matches a dotted suffix of the module path wins.
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def read_adapter_config(adapter_dir: Path) -> AdapterConfig:
    path = Path(adapter_dir) / CONFIG_NAME
    if not path.is_file():
        raise KTChatError(f"{path}: adapter config not found (is {adapter_dir} a LoRA adapter folder?)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KTChatError(f"{path}: cannot read adapter config: {exc}") from None
    if not isinstance(raw, dict):
        raise KTChatError(f"{path}: adapter config must be a JSON object")
    peft_type = str(raw.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise KTChatError(f"{path}: peft_type {peft_type!r} is not supported, only LORA")
    _check_types(raw, path)
    config = AdapterConfig(
        path=path,
        r=_positive(raw, "r", path, int),
        lora_alpha=_positive(raw, "lora_alpha", path, float),
        use_rslora=bool(raw.get("use_rslora")),
        rank_pattern=_pattern_dict(raw, "rank_pattern", path, int),
        alpha_pattern=_pattern_dict(raw, "alpha_pattern", path, float),
        target_parameters=tuple(raw.get("target_parameters") or ()),
        raw=raw,
    )
    _check_supported(raw, path, config)
    return config


def _check_types(raw: dict, path: Path) -> None:
    """Type and range of every key ktchat or PEFT reads; null stands for PEFT's default, as PEFT reads it."""
    for key, (allowed, ok) in _TYPES.items():
        if raw.get(key) is not None and not ok(raw[key]):
            raise KTChatError(f"{path}: {key} must be {allowed}, got {raw[key]!r}")
    dropout = raw.get("lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout <= 1:
        raise KTChatError(f"{path}: lora_dropout must be a number from 0 to 1, got {dropout!r}")
    bias = raw.get("bias", "none")
    if bias not in ("none", "all", "lora_only"):
        raise KTChatError(f"{path}: bias must be 'none', 'all' or 'lora_only', got {bias!r}")
    init = raw.get("init_lora_weights")
    named = isinstance(init, str) and (init in INITS or init in _VARIANT_INITS or init.startswith(_RESIDUAL_INITS))
    if not (init is None or isinstance(init, bool) or named):
        allowed = ", ".join(repr(i) for i in (*INITS, *_RESIDUAL_INITS, *_VARIANT_INITS))
        raise KTChatError(f"{path}: init_lora_weights must be true, false or one of {allowed}, got {init!r}")


def _check_supported(raw: dict, path: Path, config: AdapterConfig) -> None:
    """Well-typed settings whose effect ktchat does not reproduce."""
    for key, why in {**VARIANTS, **_UNSUPPORTED}.items():
        if raw.get(key):
            raise KTChatError(f"{path}: {key}: {why}")
    if raw.get("bias", "none") != "none":
        raise KTChatError(f"{path}: bias: {raw['bias']!r} is not supported, only 'none'")
    init = raw.get("init_lora_weights")
    if isinstance(init, str) and init in _VARIANT_INITS:
        raise KTChatError(f"{path}: init_lora_weights: {_VARIANT_INITS[init]}")
    if isinstance(init, str) and init.startswith(_RESIDUAL_INITS):
        raise KTChatError(f"{path}: init_lora_weights: {init!r} makes PEFT rewrite the base weights when it loads the "
                          "adapter, which the CPU experts would not: convert it to plain LoRA first (LLaMA-Factory: "
                          "pissa_convert: true)")
    odd = sorted({r for r in (config.r, *config.rank_pattern.values()) if r % 2})
    if init == "orthogonal" and odd:
        raise KTChatError(f"{path}: init_lora_weights: 'orthogonal' needs even ranks (PEFT refuses to build it "
                          f"otherwise), got r={odd[0]}; set init_lora_weights: true (the stored weights replace it)")


def _positive(raw: dict, key: str, path: Path, kind, within: str = ""):
    if key not in raw:
        raise KTChatError(f"{path}: missing key {key!r}")
    value = raw[key]
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0
            or kind(value) != value):
        raise KTChatError(f"{path}: {within}{key} must be a positive {kind.__name__}, got {value!r}")
    return kind(value)


def _pattern_dict(raw: dict, key: str, path: Path, kind) -> dict:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise KTChatError(f"{path}: {key} must be a mapping of module patterns, got {type(value).__name__}")
    for pattern in value:
        try:
            re.compile(str(pattern))
        except re.error as exc:
            raise KTChatError(f"{path}: {key}: {pattern!r} is not a valid regular expression ({exc})") from None
    return {str(k): _positive(value, k, path, kind, within=f"{key}: ") for k in value}
