"""The api's requests on the model's engine: validation into jobs, a bounded waiting line, cancellation, and each
reply's text with its stop strings.

The engine runs up to `max_batch` requests at once (continuous batching: a request joins at the next step and
leaves when it ends, ktchat.engine); the rest wait in arrival order, and a full line refuses at once (the server
answers 503) instead of letting latency grow without bound. A job's stop event ends its generation at the next token
(client gone, stop string seen, shutdown). The engine keeps the last conversations' caches (`kept_caches`): a
request continuing one computes only its new tokens.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

from ..config import GenerationArgs
from ..errors import KTChatError
from .prompts import Prompts
from .text import ReplyText

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The waiting line is full (or the server is shutting down): the caller should answer 503."""


class BadRequest(ValueError):
    """A request the model cannot take as asked (too long, settings out of range): the caller answers 400."""

    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.param, self.code = param, code


@dataclass(frozen=True)
class Result:
    text: str
    completion_tokens: int
    finish_reason: str  # "stop" (eos or a stop string), "length" (max_tokens) or "cancelled"


@dataclass(eq=False)
class Job:
    """One request's generation. `on_event(kind, payload)` is called from the worker thread with
    ("text", str) pieces, then exactly once ("done", Result) or ("error", Exception)."""

    input_ids: Any
    generation: GenerationArgs
    on_event: Callable[[str, Any], None]
    stop: tuple[str, ...] = ()
    seed: Optional[int] = None
    logit_bias: dict = field(default_factory=dict)  # token id -> added to its logit (OpenAI's logit_bias)
    cancel: threading.Event = field(default_factory=threading.Event)
    sequence: Any = None  # the engine's Sequence, once submitted

    def emit(self, kind: str, payload: Any) -> None:
        try:
            self.on_event(kind, payload)
        except Exception:  # a listener that is gone (closed event loop) must not take the worker down
            logger.debug("dropped %s event of a finished request", kind, exc_info=True)


class Service:
    """Owns the model, the tokenizer and the worker; the HTTP layer only prepares, submits and cancels jobs.
    Model, tokenizer and prompts are the ones `ktchat chat` uses (generate.open_session), so replies match it."""

    def __init__(self, model, tokenizer, generation: GenerationArgs, prompts: Prompts, queue_size: int = 16,
                 kept_caches: int = 4, kept_cache_bytes: int = 4 << 30, max_batch: int = 1):
        if queue_size < 1 or max_batch < 1:
            raise KTChatError(f"queue size and batch must be integers >= 1 (got {queue_size!r}, {max_batch!r})")
        if kept_caches < 0 or kept_cache_bytes < 0:
            raise KTChatError(f"kept caches and their bytes must be >= 0 (got {kept_caches!r}, {kept_cache_bytes!r})")
        from ..model import engine_of

        self.engine = engine_of(model)
        self.engine.keep(kept_caches if kept_cache_bytes > 0 else 0, kept_cache_bytes, max_batch=max_batch)
        self.last_reused = 0  # prompt tokens the last generation did not compute again
        self.model, self.tokenizer, self.defaults, self.queue_size = model, tokenizer, generation, queue_size
        self.prompts = prompts
        config = getattr(model, "config", None)
        self.vocab_size = int(getattr(config, "vocab_size", 0) or len(tokenizer))
        self.context_length = int(getattr(config, "max_position_embeddings", 0) or tokenizer.model_max_length)
        # The event loop encodes while the engine's thread decodes, and a fast tokenizer is not safe to share.
        self._tokenizer_lock = threading.Lock()
        self._lock = threading.Lock()  # guards `_jobs`, `served` and `_closed`
        self._jobs: set[Job] = set()  # submitted and not done
        self._closed = False
        self.served = 0

    # --- tokenizer ----------------------------------------------------------------------------------------------
    def encode(self, messages: list[dict]) -> list[int]:
        """Prompt ids as `ktchat chat` builds them (the same Prompts)."""
        with self._tokenizer_lock:
            return self.prompts.encode(messages)

    def prepare(self, messages: list[dict], on_event, *, max_tokens: Optional[int] = None, stop=(), seed=None,
                logit_bias: Optional[dict] = None, **overrides) -> Job:
        """A job for these messages, sized to the context. LLaMA-Factory's rule for settings: the YAML's are the
        defaults, the request's temperature/top_p/do_sample override them, temperature 0 means greedy."""
        try:
            prompt = self.encode(messages)
        except Exception as exc:  # the template's own raise_exception, or one that cannot render these
            raise BadRequest(f"the chat template cannot format these messages: {exc}", "messages") from None
        room = self.context_length - len(prompt)
        if room < 1 or (max_tokens or 0) > room:
            asked = f"{max_tokens} + " if max_tokens else ""
            raise BadRequest(f"{asked}{len(prompt)} prompt tokens exceed the model's context of {self.context_length} "
                             f"tokens (max_tokens can be at most {max(room, 0)} here)",
                             "max_tokens" if max_tokens else "messages", "context_length_exceeded")
        bad_ids = sorted(t for t in logit_bias or {} if not 0 <= t < self.vocab_size)
        if bad_ids:
            raise BadRequest(f"logit_bias names token ids outside the vocabulary (size {self.vocab_size}): {bad_ids}",
                             "logit_bias")
        settings = {k: (v if isinstance(v, bool) else float(v)) for k, v in overrides.items() if v is not None}
        try:
            generation = replace(self.defaults, max_new_tokens=max_tokens or min(self.defaults.max_new_tokens, room),
                                 **settings)
        except KTChatError as exc:
            raise BadRequest(str(exc)) from None
        return Job(prompt, generation, on_event, stop=tuple(stop), seed=seed, logit_bias=dict(logit_bias or {}))

    def decode(self, ids: list[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    # --- queue --------------------------------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Start a job (it waits its turn in the engine); raises QueueFull when `queue_size` jobs already wait or
        the service is closed."""
        with self._lock:
            if self._closed:
                raise QueueFull("the server is shutting down")
            waiting = self.engine.stats()["waiting"]
            if waiting >= self.queue_size:
                raise QueueFull(f"the server is busy: {waiting} requests are already waiting "
                                f"(queue size {self.queue_size}); retry later")
            self._jobs.add(job)
            reply = ReplyText(self.decode, job.stop)
            job.sequence = self.engine.submit(job.input_ids, self._params(job),
                                              on_token=lambda t: self._token(job, reply, t),
                                              stop=lambda *_: job.cancel.is_set(),
                                              on_end=lambda sequence: self._done(job, reply, sequence))

    def cancel(self, job: Job) -> None:
        """Stop a job wherever it is: out of the line at once, or at the next token if it runs. Idempotent."""
        job.cancel.set()
        if job.sequence is not None:
            self.engine.cancel(job.sequence)

    def stats(self) -> dict:
        engine = self.engine.stats()
        with self._lock:
            return {"waiting": engine["waiting"], "running": engine["running"], "busy": engine["running"] > 0,
                    "max_batch": engine["max_batch"], "served": self.served, "queue_size": self.queue_size,
                    "kept_caches": self.engine.kept(), "last_reused_tokens": self.last_reused}

    def close(self, timeout: float = 10.0) -> None:
        """Refuse new jobs and cancel the ones submitted; they end (as cancelled) at the engine's next step."""
        with self._lock:
            self._closed = True
            jobs = list(self._jobs)
        for job in jobs:
            self.cancel(job)
        for job in jobs:
            job.sequence.wait(timeout)

    # --- the engine's side (its thread) -------------------------------------------------------------------------
    def _params(self, job: Job):
        extra = {"logit_bias": tuple(job.logit_bias.items())}
        if not job.generation.greedy and job.seed is not None:
            extra["seed"] = job.seed
        return self.prompts.sampling(job.generation, **extra)

    @staticmethod
    def _token(job: Job, reply: ReplyText, token: int) -> None:
        piece = reply.push(token)
        if piece:
            job.emit("text", piece)
        if reply.stopped:
            job.cancel.set()  # ends the generation after this token

    def _done(self, job: Job, reply: ReplyText, out) -> None:
        with self._lock:
            self._jobs.discard(job)
            if out.slot >= 0:  # it ran (a job cancelled while it waited did not)
                self.served += 1
                self.last_reused = out.out.reused
        if out.error is not None:
            logger.error("generation failed: %s", out.error)
            job.emit("error", out.error)
            return
        tail = reply.finish()
        if tail:
            job.emit("text", tail)
        reason = out.out.finish_reason
        if reply.stopped or reason == "eos":
            reason = "stop"
        elif reason in ("stopped", "cancelled"):
            reason = "cancelled"
        job.emit("done", Result(reply.text, len(reply.tokens), reason))
