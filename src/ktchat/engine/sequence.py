"""One request in the engine: its prompt and settings, where it runs, and what it has produced so far."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from .sampling import Chooser, SamplingParams

StopCheck = Callable[[torch.Tensor, torch.Tensor], bool]  # (ids [1, length] so far, scores [1, vocab]) -> stop now


@dataclass
class Generation:
    """What one sequence produced: the new tokens (a stop id included when one ended it), why it ended ("eos",
    "length", "stopped" by the caller's check, or "cancelled"), the prompt tokens it did not compute again, and, when
    asked, the processed scores and raw logits of each new token."""

    tokens: list[int]
    finish_reason: str
    reused: int
    scores: list[torch.Tensor] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)


@dataclass(eq=False)
class Sequence:
    """A request and its progress. The engine's worker thread calls `on_token` with each new token, `stop` after it
    and `on_end` once it ended; the submitting thread waits for the end (`wait`) and may `cancel` at any time."""

    prompt: list[int]
    params: SamplingParams
    on_token: Callable[[int], None] | None = None
    stop: StopCheck | None = None
    on_end: Callable[["Sequence"], None] | None = None  # called with it once it ended, whatever ended it
    save_at: tuple[int, ...] = ()  # positions after which a hybrid model's state is worth saving, besides the end
    keep_scores: bool = False
    keep_logits: bool = False
    out: Generation = field(default_factory=lambda: Generation([], "length", 0))
    slot: int = -1  # the cache slot it runs in, once admitted
    computed: int = 0  # prompt positions the cache holds for it
    saves: list[int] = field(default_factory=list)  # where its prefill saves the linear-attention state
    chooser: Chooser | None = None  # made at its first token, on the logits' device
    ids: torch.Tensor | None = None  # [1, prompt + max_new_tokens]: what its processors and stop check read
    error: BaseException | None = None
    cancelled: bool = False
    _done: threading.Event = field(default_factory=threading.Event)

    @property
    def length(self) -> int:
        """Prompt and new tokens so far."""
        return len(self.prompt) + len(self.out.tokens)

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Ends it at the next step boundary (waiting ones never start)."""
        self.cancelled = True

    def wait(self, timeout: float | None = None) -> Generation:
        """Blocks until it ends; re-raises what failed it."""
        self._done.wait(timeout)
        if self.error is not None:
            raise self.error
        return self.out

    def end(self, reason: str | None = None, error: BaseException | None = None) -> None:
        """Marks it ended (the engine calls this once)."""
        if reason is not None:
            self.out.finish_reason = reason
        self.error = error
        self._done.set()
        if self.on_end is not None:
            self.on_end(self)
