"""ktchat's generation engine: its own loop (prefill, one decode step, generate) on a cache it allocates itself, many
sequences at once, below the model layer (model/ builds its layers and its `generate` on it)."""

from .generator import MIN_CACHE_TOKENS, Engine
from .sampling import SamplingParams
from .sequence import Generation, Sequence

__all__ = ["MIN_CACHE_TOKENS", "Engine", "Generation", "SamplingParams", "Sequence"]
