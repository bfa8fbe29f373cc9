"""Reading, classifying, converting and writing LoRA adapters of every layout KT training writes. No model code.

`read_adapter` reads any layout into one normalized form; `split_channels` splits it, for one architecture, into
PEFT-channel modules and stacked routed-expert LoRA per (layer, projection); `check_channels` checks both
against a base model's shapes.
"""

from .config import AdapterConfig, read_adapter_config
from .core import (
    GENERIC_EXPERTS,
    KT_CHANNEL,
    PEFT_CHANNEL,
    PROJS,
    ExpertLoRA,
    ExpertPath,
    LoraModule,
    Problems,
    StackedLoRA,
    merge_lora,
)
from .plan import BaseShapes, check_channels, split_channels
from .reader import Adapter, ParamLoRA, read_adapter

__all__ = [
    "GENERIC_EXPERTS",
    "KT_CHANNEL",
    "PEFT_CHANNEL",
    "PROJS",
    "Adapter",
    "AdapterConfig",
    "BaseShapes",
    "ExpertLoRA",
    "ExpertPath",
    "LoraModule",
    "ParamLoRA",
    "Problems",
    "StackedLoRA",
    "check_channels",
    "merge_lora",
    "read_adapter",
    "read_adapter_config",
    "split_channels",
]
