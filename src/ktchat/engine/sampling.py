"""How the next token is chosen: the settings of one sequence, and the logits processors they make.

The processors are transformers' own public classes, in the order transformers' `generate` applies them
(penalties, then the caller's processors, then, when sampling, temperature, top-k, top-p, min-p), so a reply chosen
here is the reply `generate` would choose from the same logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

Processor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (ids [1, length], scores [1, vocab]) -> scores


@dataclass(frozen=True)
class SamplingParams:
    """One sequence's generation settings; greedy unless do_sample."""

    max_new_tokens: int
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_new_tokens: int = 0
    stop_ids: tuple[int, ...] = ()
    seed: int | None = None  # sampling: a generator of its own, seeded; None: torch's global generator
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit), OpenAI's logit_bias
    processors: tuple[Processor, ...] = field(default=(), compare=False)  # the caller's, after the penalties

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")


class Chooser:
    """Turns a step's logits into the next token under one sequence's settings."""

    def __init__(self, params: SamplingParams, device: torch.device):
        self.params = params
        self.processors = _processors(params, device)
        self.generator = None
        if params.do_sample and params.seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed)

    @property
    def needs_ids(self) -> bool:
        return bool(self.processors)

    def __call__(self, ids: torch.Tensor | None, logits: torch.Tensor) -> tuple[int, torch.Tensor]:
        """(the token, the processed scores [1, vocab]) for logits [1, vocab] after `ids` [1, length]."""
        scores = logits.float()
        for processor in self.processors:
            scores = processor(ids, scores)
        if not self.params.do_sample:
            return int(scores.argmax(dim=-1)), scores
        probs = scores.softmax(dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator)), scores


def _processors(params: SamplingParams, device: torch.device) -> list[Processor]:
    from transformers import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                              TopKLogitsWarper, TopPLogitsWarper)

    out: list[Processor] = []
    if params.repetition_penalty is not None and params.repetition_penalty != 1.0:
        out.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.min_new_tokens > 0 and params.stop_ids:
        out.append(_MinNewTokens(params.min_new_tokens, params.stop_ids))
    if params.logit_bias:
        out.append(_Bias(params.logit_bias, device))
    out.extend(params.processors)
    if params.do_sample:
        if params.temperature is not None and params.temperature != 1.0:
            out.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k is not None and params.top_k != 0:
            out.append(TopKLogitsWarper(top_k=params.top_k))
        if params.top_p is not None and params.top_p < 1.0:
            out.append(TopPLogitsWarper(top_p=params.top_p))
        if params.min_p is not None:
            out.append(MinPLogitsWarper(min_p=params.min_p))
    return out


class _Bias:
    """Adds each bias to its token's logit."""

    def __init__(self, bias: Sequence[tuple[int, float]], device):
        self.ids = torch.tensor([t for t, _ in bias], dtype=torch.long, device=device)
        self.values = torch.tensor([v for _, v in bias], dtype=torch.float32, device=device)

    def __call__(self, ids, scores):
        scores[:, self.ids] += self.values.to(scores.dtype)
        return scores


class _MinNewTokens:
    """No stop token before `count` new tokens (transformers' MinNewTokensLengthLogitsProcessor, counted here)."""

    def __init__(self, count: int, stop_ids: Sequence[int]):
        self.count, self.stop_ids, self.start = count, list(stop_ids), None

    def __call__(self, ids, scores):
        self.start = ids.shape[1] if self.start is None else self.start
        if ids.shape[1] - self.start < self.count:
            scores[:, self.stop_ids] = float("-inf")
        return scores
