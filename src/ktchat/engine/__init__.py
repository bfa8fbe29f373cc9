"""ktchat's generation engine: its own loop (prefill, one decode step, generate) on a cache it allocates itself,
below the model layer (model/ builds its layers and its `generate` on it)."""

from .generator import MIN_CACHE_TOKENS, Engine, Generation
from .sampling import SamplingParams

__all__ = ["MIN_CACHE_TOKENS", "Engine", "Generation", "SamplingParams"]
