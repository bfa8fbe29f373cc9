"""The conversation's KV cache, kept from one turn to the next so a turn prefills only what is new.

After a reply, the cache holds the prompt and every reply token but the last. The next turn's prompt starts with
those same tokens when the template renders the history as a prefix of the new prompt (most do); then generate
gets the cache and computes only the rest. Where the prompts share less (a template that rewrites earlier turns,
an edited history), the cache is cut back to the common prefix if its layers allow it (attention KV can be cut;
a linear-attention state cannot), else the turn starts afresh. Either way the tokens equal a fresh prefill's:
the cache holds exactly the KV of the tokens it is handed with.
"""

from __future__ import annotations

import inspect
import logging

from ..model.decode import common_prefix, static_decode_of

logger = logging.getLogger(__name__)


def _new_cache(model):
    """An empty cache of the kind transformers' generate would make for the model (hybrid layers included)."""
    from transformers import DynamicCache

    config = getattr(model, "config", None)
    if config is not None and "config" in inspect.signature(DynamicCache.__init__).parameters:
        return DynamicCache(config=config.get_text_config(decoder=True))
    return DynamicCache()


def cache_kwarg() -> str:
    """generate's name for a cache it is handed: transformers 5 renamed past_key_values to cache."""
    from transformers.generation import utils

    return "cache" if "cache" in getattr(utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


def _static_decode(model):
    """The model's StaticDecode where it decodes on a static cache (which then keeps the conversation), else None."""
    static = static_decode_of(model)
    return static if static is not None and static.eager_reason is None else None


class PrefixCache:
    """One conversation's cache and the token ids it holds; `for_prompt` gives generate what it can reuse.

    Where the model decodes on a static cache (ktchat.model.decode, CUDA graphs), that cache keeps the last
    conversation the same way and this one stands aside."""

    def __init__(self, model):
        self.model = model
        self.cache, self.ids = None, []
        self.reused = 0  # tokens of the last prompt that were not prefilled again
        self._static = None
        self._told: set[str] = set()

    def clear(self) -> None:
        self.cache, self.ids, self.reused = None, [], 0
        if self._static is not None:
            self._static.held = []

    def for_prompt(self, prompt: list[int]) -> dict:
        """generate's keyword arguments for `prompt`: the cache to continue, or none where static decode keeps it."""
        self._static = _static_decode(self.model)
        if self._static is not None:
            self.cache, self.ids = None, []
            return {}
        keep = min(common_prefix(self.ids, prompt), len(prompt) - 1)  # generate needs one new token at least
        if self.cache is not None and 0 < keep < len(self.ids) and not self._crop(keep):
            keep = 0
        if self.cache is None or keep <= 0:
            if self.ids:
                self._say_once("fresh", "kept KV cache: the new prompt does not start with the conversation so far; "
                                        "this turn prefills it all")
            self.cache, self.ids = _new_cache(self.model), []
            keep = 0
        self.reused = keep
        return {cache_kwarg(): self.cache}

    def after(self, sequence: list[int]) -> None:
        """Records what the cache holds once generate returned `sequence` (prompt + reply ids)."""
        if self._static is not None:
            self.reused = self._static.reused
            return
        held = self.cache.get_seq_length() if self.cache is not None else 0
        self.ids = list(sequence[:held])

    def _crop(self, keep: int) -> bool:
        croppable = getattr(self.cache, "is_croppable", True)
        if not croppable:
            self._say_once("crop", "kept KV cache: this model's cache (linear-attention state) cannot be cut back "
                                   "to the common prefix; such turns prefill it all")
            return False
        self.cache.crop(keep - self.cache.get_seq_length())  # negative: drop that many (4.57 and 5.x alike)
        self.ids = self.ids[:keep]
        return True

    def _say_once(self, key: str, message: str) -> None:
        if key not in self._told:
            self._told.add(key)
            logger.info(message)


def cache_nbytes(cache) -> int:
    """Bytes a cache holds: every tensor of its layers (KV, and a linear-attention layer's states)."""
    import torch

    if cache is None:
        return 0
    seen, total = set(), 0
    for layer in getattr(cache, "layers", None) or [cache]:
        for value in vars(layer).values():
            for t in value if isinstance(value, (list, tuple)) else [value]:
                if torch.is_tensor(t) and t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    total += t.numel() * t.element_size()
    return total


class PrefixPool:
    """The last conversations' caches, for a server: a request continues the cache that shares the longest prefix
    with its prompt, if that prefix is at least half of what the cache holds (a continuation, or a regenerated
    last reply); else it starts a cache of its own. Least recently used caches go first once there are more than
    `size` or they hold more than `max_bytes`."""

    def __init__(self, model, size: int, max_bytes: int):
        self.model, self.size, self.max_bytes = model, size, max_bytes
        self._entries: list[PrefixCache] = []  # least recently used first

    def take(self, prompt: list[int]) -> PrefixCache:
        """The cache for this prompt, out of the pool until `give_back`."""
        best = max(self._entries, key=lambda e: common_prefix(e.ids, prompt), default=None)
        if best is not None and 2 * common_prefix(best.ids, prompt) >= len(best.ids) > 0:
            self._entries.remove(best)
            return best
        return PrefixCache(self.model)

    def give_back(self, entry: PrefixCache) -> None:
        if entry.cache is None:  # static decode keeps it (or nothing to keep)
            return
        self._entries.append(entry)
        while len(self._entries) > self.size or (
                len(self._entries) > 1 and sum(cache_nbytes(e.cache) for e in self._entries) > self.max_bytes):
            self._entries.pop(0)
        if self._entries and cache_nbytes(self._entries[0].cache) > self.max_bytes:
            self._entries.pop(0)  # one conversation larger than the whole budget is not kept

    def __len__(self) -> int:
        return len(self._entries)
