"""Which slot a prompt runs in, and from which position: pure bookkeeping, no tensors.

A slot holds one conversation: the token ids whose cache entries it has (attention KV for positions 0..n-1, and a
linear-attention state after exactly those n tokens), plus, for hybrid models, the positions where a copy of the
linear-attention state was saved (the end of each prompt). A new prompt continues the slot that lets it skip the most
tokens:

- attention-only models cut the cache back to the common prefix (positions past it are simply overwritten);
- a linear-attention state cannot be cut back: the prompt resumes from the live state when it extends everything the
  slot holds, else from the last saved copy inside the common prefix, else from zero.

At least the prompt's last token is always computed again (its logits choose the first reply token). A slot is
continued when the skip is at least half of what it holds (a conversation going on, or its last reply regenerated);
otherwise the prompt takes a free slot, or the least recently used one. SGLang keeps hybrid models' prefixes the same
way, by saving the recurrent state at chosen positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field


# A rewrite this close to the previous prompt's end is the template's doing, learnt once per conversation.
_REWRITE_WINDOW = 64


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two id lists share."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


@dataclass
class Held:
    """What one slot holds."""

    ids: list[int] = field(default_factory=list)
    saved: list[int] = field(default_factory=list)  # positions with a saved linear-attention state, ascending
    used: int = 0  # when it last ran (a counter), for least-recently-used choices
    prompt_end: int = 0  # the length of the last prompt run here
    rewritten: int = 0  # how far before its end the next prompt last diverged from the last one (0: it did not)


@dataclass(frozen=True)
class Resume:
    """Where a prompt starts in its slot: `position` tokens are reused; `saved` names the saved state to restore
    first (None: the live state, or nothing to restore when `position` is 0 on a hybrid model)."""

    slot: int
    position: int
    saved: int | None = None


def resume_point(held: Held, prompt: list[int], hybrid: bool) -> tuple[int, int | None]:
    """(tokens of `prompt` that need no computing in this slot, the saved state to restore or None)."""
    limit = min(common_prefix(held.ids, prompt), len(prompt) - 1)
    if not hybrid:
        return max(limit, 0), None
    if len(held.ids) <= limit:
        return len(held.ids), None
    saved = [p for p in held.saved if p <= limit]
    return (saved[-1], saved[-1]) if saved else (0, None)


class SlotTable:
    """The slots' contents and the choice of a slot for each prompt. With reuse off every prompt starts at zero."""

    def __init__(self, slots: int, hybrid: bool, reuse: bool = True):
        if slots < 1:
            raise ValueError(f"slots must be >= 1 (got {slots})")
        self.hybrid, self.reuse = hybrid, reuse
        self.held = [Held() for _ in range(slots)]
        self._clock = 0

    def __len__(self) -> int:
        return len(self.held)

    def choose(self, prompt: list[int], busy=frozenset()) -> Resume | None:
        """The slot for `prompt` and where in it the prompt starts; slots in `busy` (sequences running in them) are
        not taken. None where every slot is busy."""
        free_slots = [s for s in range(len(self.held)) if s not in busy]
        if not free_slots:
            return None
        self._clock += 1
        oldest = min(free_slots, key=lambda s: self.held[s].used)
        if not self.reuse:
            return Resume(oldest, 0)
        points = {s: resume_point(self.held[s], prompt, self.hybrid) for s in free_slots}
        best = max(free_slots, key=lambda s: (points[s][0], self.held[s].used))
        position, saved = points[best]
        if position > 0 and (2 * position >= len(self.held[best].ids) or len(self.held) == 1):
            return Resume(best, position, saved)
        empty = [s for s in free_slots if not self.held[s].ids]
        return Resume(empty[0], 0) if empty else Resume(oldest, *points[oldest])

    def start(self, resume: Resume, prompt: list[int], save_at=()) -> list[int]:
        """The prompt runs in its slot: what the slot holds is cut to the reused part. Returns the positions after
        which a hybrid model saves its linear-attention state (ascending, past the reused part): the prompt's end,
        the caller's `save_at`, and as far before the end as the last prompt here was rewritten by this one (a
        template that drops earlier turns' reasoning rewrites the reply's start, just before the prompt's end)."""
        held = self.held[resume.slot]
        diverged = common_prefix(held.ids, prompt)
        if 0 < held.prompt_end - diverged <= _REWRITE_WINDOW:
            held.rewritten = held.prompt_end - diverged
        held.ids = list(prompt[:resume.position])
        held.saved = [p for p in held.saved if p <= resume.position]
        held.used, held.prompt_end = self._clock, len(prompt)
        if not self.hybrid:
            return []
        wanted = {len(prompt), *save_at} | ({len(prompt) - held.rewritten} if held.rewritten else set())
        return sorted(p for p in wanted if resume.position < p <= len(prompt))

    def saved_at(self, slot: int, position: int) -> None:
        """A copy of the slot's linear-attention state after `position` tokens was saved."""
        held = self.held[slot]
        held.saved = sorted(set(held.saved) | {position})

    def finish(self, slot: int, ids: list[int]) -> None:
        """The slot now holds the cache entries of `ids` (prompt and reply, all but the last reply token)."""
        self.held[slot].ids = list(ids)

    def forget(self, slot: int | None = None) -> list[int]:
        """Empties one slot (or all); returns the saved positions dropped with it (their copies can go)."""
        dropped = []
        for s in range(len(self.held)) if slot is None else [slot]:
            dropped += [(s, p) for p in self.held[s].saved]
            self.held[s] = Held()
        return dropped

    def drop_oldest_saved(self) -> tuple[int, int] | None:
        """The saved state of the least recently used slot, its earliest first, taken off the table; None if none."""
        candidates = [s for s, h in enumerate(self.held) if h.saved]
        if not candidates:
            return None
        slot = min(candidates, key=lambda s: self.held[s].used)
        return slot, self.held[slot].saved.pop(0)

    def holding(self) -> dict[int, int]:
        """{slot: tokens held} for the slots that hold something, most recently used first."""
        order = sorted(range(len(self.held)), key=lambda s: -self.held[s].used)
        return {s: len(self.held[s].ids) for s in order if self.held[s].ids}
