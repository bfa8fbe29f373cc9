"""ktchat's generation loop, in gpt-fast's shape: prefill the prompt, then one decode step per token, on a cache the
engine allocates itself and keeps from one request to the next.

One generation runs at a time (a lock): every sequence shares the CPU experts. The slots of the cache hold the last
conversations (`keep`): a prompt that continues one prefills only its new tokens (engine.slots says which slot and
from where; hybrid linear-attention models resume from saved copies of their state).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .cache import SlotCache
from .runner import ModelRunner
from .sampling import Chooser, SamplingParams
from .slots import Resume, SlotTable

logger = logging.getLogger(__name__)

# A slot of this many positions at least (powers of two above), so a growing chat is rarely moved and re-captured.
MIN_CACHE_TOKENS = 512
SAVED_PER_SLOT = 4  # copies of a hybrid model's linear-attention state kept per conversation (the latest)

StopCheck = Callable[[torch.Tensor, torch.Tensor], bool]  # (ids [1, length] so far, scores [1, vocab]) -> stop now


@dataclass
class Generation:
    """What one generate produced: the new tokens (a stop id included when one ended it), why it ended ("eos",
    "length" or "stopped" by the caller's check), the prompt tokens it did not compute again, and, when asked, the
    processed scores and raw logits of each new token."""

    tokens: list[int]
    finish_reason: str
    reused: int
    scores: list[torch.Tensor] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)


class Engine:
    """Generation over one transformers causal LM (its PEFT layers included) with ktchat's runner and cache."""

    def __init__(self, model: nn.Module, *, graphs: bool, hybrid: bool, min_cache_tokens: int = MIN_CACHE_TOKENS):
        self.model = model
        self.runner = ModelRunner(model, graphs)
        self.hybrid, self.min_cache_tokens = hybrid, min_cache_tokens
        self.table = SlotTable(1, hybrid)
        self.max_bytes: int | None = None
        self.cache: SlotCache | None = None
        self._saved: dict[tuple[int, int], dict] = {}  # (slot, position) -> linear-attention state
        self._lora = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "disable_adapters")]
        self._adapters, self._epoch = None, 0
        self._lock = threading.Lock()
        self.last_reused = 0

    # --- settings -----------------------------------------------------------------------------------------------
    def keep(self, conversations: int, max_bytes: int | None = None) -> None:
        """Keep the caches of the last `conversations` (0: none; every prompt is computed whole) within
        `max_bytes` (None: no bound)."""
        if conversations < 0 or (max_bytes is not None and max_bytes < 0):
            raise ValueError(f"kept conversations and bytes must be >= 0 (got {conversations}, {max_bytes})")
        with self._lock:
            self.table = SlotTable(max(conversations, 1), self.hybrid, reuse=conversations > 0)
            self.max_bytes, self.cache, self._saved = max_bytes, None, {}
            self.runner.forget_graphs()

    def kept(self) -> int:
        """How many conversations the cache holds now."""
        return sum(1 for held in self.table.held if held.ids)

    def forget(self) -> None:
        """Drops every kept conversation (their cache stays allocated for the next)."""
        with self._lock:
            self._forget()

    # --- generation ---------------------------------------------------------------------------------------------
    @torch.no_grad()  # not inference_mode: the cache and what the caller gets back stay ordinary tensors
    def generate(self, prompt: list[int], params: SamplingParams, *, on_token: Callable[[int], None] | None = None,
                 stop: StopCheck | None = None, save_at=(), keep_scores: bool = False,
                 keep_logits: bool = False) -> Generation:
        """Generates a reply to `prompt` (token ids). on_token gets each new token as it is chosen; stop is asked
        after each one. save_at: positions after which a hybrid model's state is worth saving (where the caller's
        template may rewrite the next prompt), besides the prompt's end."""
        if not prompt:
            raise ValueError("the prompt is empty")
        with self._lock:
            self._check_adapters()
            self._fit(len(prompt) + params.max_new_tokens)
            resume = self.table.choose(prompt)
            saves = self.table.start(resume, prompt, save_at)
            self._resume(resume)
            try:
                logits = self._prefill(resume, prompt, saves)
                out = self._decode(resume.slot, prompt, logits, params, on_token, stop, keep_scores, keep_logits)
            except BaseException:
                self._forget(resume.slot)  # what the slot holds now is not known
                raise
            fed = len(out.tokens) - 1  # the last new token was never fed to the model
            self.table.finish(resume.slot, prompt + out.tokens[:fed])
            out.reused = self.last_reused = resume.position
            return out

    def _prefill(self, resume: Resume, prompt: list[int], saves: list[int]) -> torch.Tensor:
        """The prompt from the resume point, split where the linear-attention state is saved."""
        start = resume.position
        for end in sorted({*saves, len(prompt)}):
            logits = self.runner.prefill(self.cache, resume.slot, prompt[start:end], start)
            if end in saves:
                self._save(resume.slot, end)
            start = end
        return logits

    def _decode(self, slot, prompt, logits, params, on_token, stop, keep_scores, keep_logits) -> Generation:
        chooser = Chooser(params, logits.device)
        ids = torch.empty((1, len(prompt) + params.max_new_tokens), dtype=torch.long, device=logits.device)
        ids[0, :len(prompt)] = torch.tensor(prompt)
        out, length, stops = Generation([], "length", 0), len(prompt), set(params.stop_ids)
        while True:
            token, scores = chooser(ids[:, :length], logits.view(1, -1))
            ids[0, length] = token
            length += 1
            out.tokens.append(token)
            if keep_scores:
                out.scores.append(scores.clone())
            if keep_logits:
                out.logits.append(logits.view(1, -1).clone())
            if on_token is not None:
                on_token(token)
            if token in stops:
                out.finish_reason = "eos"
            elif stop is not None and stop(ids[:, :length], scores):
                out.finish_reason = "stopped"
            if out.finish_reason != "length" or len(out.tokens) >= params.max_new_tokens:
                return out
            logits = self.runner.decode(self.cache, [slot], [token], [length - 1], key=self._epoch)[0]

    # --- the cache ----------------------------------------------------------------------------------------------
    def _fit(self, tokens: int) -> None:
        """A cache whose slots hold `tokens` positions: made, or grown (powers of two) keeping what the slots hold;
        fewer slots where max_bytes cannot hold them all (the least recently used conversations go)."""
        if self.cache is None:
            self.cache = SlotCache(len(self.table), self._length(tokens))
            return
        length = self.cache.length if self.cache.length >= tokens else self._length(tokens)
        slots = len(self.table)
        if self.max_bytes is not None and self.cache.allocated:
            per_slot = self.cache.token_bytes() * length + self.cache.linear_bytes()
            slots = max(1, min(slots, self.max_bytes // max(per_slot, 1)))
        if (length, slots) == (self.cache.length, self.cache.slots):
            return
        holding = self.table.holding()
        self.cache = self.cache.resized(slots, length, holding)
        self._renumber(list(holding)[:slots], slots)
        self.runner.forget_graphs()
        logger.debug("cache resized to %d slots of %d positions", slots, length)

    def _length(self, tokens: int) -> int:
        limit = getattr(self.model.config.get_text_config(), "max_position_embeddings", None) or tokens
        return max(tokens, min(limit, max(self.min_cache_tokens, 1 << (tokens - 1).bit_length())))

    def _renumber(self, kept: list[int], slots: int) -> None:
        """The table and the saved states follow resized(): kept slots become 0, 1, ... in that order."""
        table = SlotTable(slots, self.hybrid, self.table.reuse)
        for new, old in enumerate(kept):
            table.held[new] = self.table.held[old]
        self._saved = {(kept.index(s), p): v for (s, p), v in self._saved.items() if s in kept}
        self.table = table

    def _resume(self, resume: Resume) -> None:
        """A hybrid model's linear-attention state set to where the prompt resumes."""
        for key in [k for k in self._saved if k[0] == resume.slot and k[1] > resume.position]:
            del self._saved[key]
        if not self.hybrid:
            return
        if resume.saved is not None:
            self.cache.restore_linear(resume.slot, self._saved[(resume.slot, resume.saved)])
        elif resume.position == 0:
            self.cache.reset_linear(resume.slot)

    def _save(self, slot: int, position: int) -> None:
        self._saved[(slot, position)] = self.cache.save_linear(slot)
        self.table.saved_at(slot, position)
        while len(self.table.held[slot].saved) > SAVED_PER_SLOT or self._over_budget():
            dropped = self.table.drop_oldest_saved()
            if dropped is None:
                break
            self._saved.pop(dropped, None)

    def _over_budget(self) -> bool:
        if self.max_bytes is None or not self._saved:
            return False
        held = self.cache.slots * self.cache.slot_bytes() + len(self._saved) * self.cache.linear_bytes()
        return held > self.max_bytes

    def _forget(self, slot: int | None = None) -> None:
        """One slot (None: every slot) holds nothing from now on; its saved states go too."""
        for key in self.table.forget(slot):
            self._saved.pop(key, None)

    def _check_adapters(self) -> None:
        """What the slots hold depends on the adapters too: which are active, merged, and their weights' versions.
        A change (disable_adapter, a reload) makes every kept conversation stale."""
        state = tuple((repr(m.active_adapters), m.disable_adapters, getattr(m, "merged", None),
                       tuple(p._version for p in m.parameters())) for m in self._lora)
        if state != self._adapters:
            self._forget()
            self.runner.forget_graphs()  # a graph holds the LoRA as it was captured
            self._adapters, self._epoch = state, self._epoch + 1
