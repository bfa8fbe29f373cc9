"""The adapter's own LoRA settings: rank and alpha per module come from here, never from a user's YAML."""

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
    "use_dora": "DoRA adapters are not supported yet",
    "fan_in_fan_out": "fan_in_fan_out adapters (Conv1D layers) are not supported",
    "lora_bias": "LoRA bias terms (lora_bias: true) are not supported",
}


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
    for key, why in _UNSUPPORTED.items():
        if raw.get(key):
            raise KTChatError(f"{path}: {key}: {why}")
    if raw.get("bias", "none") != "none":
        raise KTChatError(f"{path}: bias: {raw['bias']!r} is not supported, only 'none'")
    return AdapterConfig(
        path=path,
        r=_positive(raw, "r", path, int),
        lora_alpha=_positive(raw, "lora_alpha", path, float),
        use_rslora=bool(raw.get("use_rslora", False)),
        rank_pattern=_pattern_dict(raw, "rank_pattern", path, int),
        alpha_pattern=_pattern_dict(raw, "alpha_pattern", path, float),
        target_parameters=_names(raw, "target_parameters", path),
        raw=raw,
    )


def _positive(raw: dict, key: str, path: Path, kind):
    if key not in raw:
        raise KTChatError(f"{path}: missing key {key!r}")
    value = raw[key]
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0
            or kind(value) != value):
        raise KTChatError(f"{path}: {key} must be a positive {kind.__name__}, got {value!r}")
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
    return {str(k): _positive(value, k, path, kind) for k in value}


def _names(raw: dict, key: str, path: Path) -> tuple[str, ...]:
    value = raw.get(key) or ()
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise KTChatError(f"{path}: {key} must be a list of parameter names, got {value!r}")
    return tuple(value)
