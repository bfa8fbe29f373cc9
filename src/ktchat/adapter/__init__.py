"""Reading, classifying and converting LoRA adapters. No model code lives here."""

from .config import AdapterConfig, read_adapter_config
from .lora import PROJS, Adapter, ExpertPath, LoraModule, StackedLoRA, read_adapter, split_channels, stack_layer

__all__ = [
    "PROJS",
    "Adapter",
    "AdapterConfig",
    "ExpertPath",
    "LoraModule",
    "StackedLoRA",
    "read_adapter",
    "read_adapter_config",
    "split_channels",
    "stack_layer",
]
