"""What a model's modules learn about the step the engine is running, and the small interfaces they offer it.

A decode step runs its CPU experts on fixed, pinned buffers queued on the CUDA stream (so a graph can hold them).
The engine says so for the duration of the step through `bound_step(tokens)`; the experts read `bound_tokens()`.
Nothing is toggled on a module from outside: the plan is the step's, in a context variable of the thread running it.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from contextvars import ContextVar

_BOUND_TOKENS: ContextVar[int] = ContextVar("ktchat_bound_tokens", default=0)


@contextlib.contextmanager
def bound_step(tokens: int):
    """Within: steps of `tokens` tokens run the experts on their bound buffers (`BindableExperts.bind`)."""
    token = _BOUND_TOKENS.set(tokens)
    try:
        yield
    finally:
        _BOUND_TOKENS.reset(token)


def bound_tokens() -> int:
    """The token count of the bound step running now in this thread; 0 outside one."""
    return _BOUND_TOKENS.get()


class BindableExperts(ABC):
    """Experts a step can run on fixed buffers queued from the CUDA stream (a graph can then capture them)."""

    @abstractmethod
    def bind(self, tokens: int, valid: int | None = None) -> bool:
        """Fixed buffers for steps of `tokens` rows, the first `valid` (default all) computed; False where these
        experts cannot be queued on a stream."""

    @property
    @abstractmethod
    def name(self) -> str:
        """What the experts run on, for messages."""


class Refreshable(ABC):
    """A module holding buffers derived from its weights (absorbed MLA's kv_b_proj): a replayed graph reads them, so
    the engine refreshes them before each replay (eager steps refresh themselves)."""

    @abstractmethod
    def refresh(self) -> None: ...
