"""Which sequences the next step runs: pure bookkeeping over plain objects, no tensors and no model.

Sequences wait in arrival order; one is admitted (given a slot) while fewer than `max_batch` are active and a slot is
free. An admitted sequence computes its prompt in chunks; a running one decodes a token per step. A step is either
one prompt chunk (of the oldest sequence still computing its prompt) or one decode step of every running sequence,
alternating when both have work, so a running stream waits at most one chunk for a newcomer.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

PREFILL, DECODE = "prefill", "decode"


@dataclass(frozen=True)
class Step:
    kind: str  # PREFILL (one sequence) or DECODE (every running sequence)
    sequences: tuple


class Scheduler:
    def __init__(self, max_batch: int):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 (got {max_batch})")
        self.max_batch = max_batch
        self.waiting: deque = deque()
        self.prefilling: deque = deque()
        self.running: list = []
        self._decoded_last = False

    @property
    def active(self) -> int:
        return len(self.prefilling) + len(self.running)

    def add(self, sequence) -> None:
        self.waiting.append(sequence)

    def admit(self, start: Callable[[object], bool]) -> list:
        """Admits waiting sequences in order while there is room and `start(sequence)` (which gives it a slot)
        agrees; returns the cancelled ones it dropped from the line."""
        dropped = []
        while self.waiting and self.active < self.max_batch:
            sequence = self.waiting[0]
            if getattr(sequence, "cancelled", False):
                dropped.append(self.waiting.popleft())
                continue
            if not start(sequence):
                break
            self.prefilling.append(self.waiting.popleft())
        return dropped

    def next_step(self) -> Step | None:
        if self.prefilling and (not self.running or self._decoded_last):
            self._decoded_last = False
            return Step(PREFILL, (self.prefilling[0],))
        if self.running:
            self._decoded_last = True
            return Step(DECODE, tuple(self.running))
        return None

    def prefilled(self, sequence) -> None:
        """Its prompt is computed: it decodes from now on."""
        self.prefilling.remove(sequence)
        self.running.append(sequence)

    def retire(self, sequence) -> None:
        """It ended (or failed): its place is free."""
        if sequence in self.prefilling:
            self.prefilling.remove(sequence)
        if sequence in self.running:
            self.running.remove(sequence)
        if sequence in self.waiting:
            self.waiting.remove(sequence)
