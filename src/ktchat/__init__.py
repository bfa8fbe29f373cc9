"""ktchat: chat with, serve and export MoE models fine-tuned with LoRA on LLaMA-Factory's KTransformers backend."""

__version__ = "0.1.0"

__all__ = ["KTChatError", "load_model", "load_moe_lora_from_adapter", "__version__"]

from .errors import KTChatError


def __getattr__(name):
    # Lazy: `ktchat --help` must not import torch.
    if name in ("load_model", "load_moe_lora_from_adapter"):
        from . import model

        return getattr(model, name)
    raise AttributeError(name)
