"""One generation at a time on the shared CPU experts: a bounded FIFO of jobs and the one worker thread that runs them
on the model's engine.

Why one worker: every request runs its routed experts on the same CPU cores, so two generations at once only slow
each other down until the engine batches them. Requests wait in a FIFO (fair: first come, first served); a full queue
refuses at once (the server answers 503) instead of letting latency grow without bound. Each job has a stop event
that ends its generation within one token (client gone, stop string seen, shutdown), so the worker is free as soon as
nobody waits for the rest. One long-lived thread, no per-request threads: nothing to leak under sustained use. The
engine keeps the last conversations' caches (`kept_caches`): a request continuing one computes only its new tokens.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
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

    def emit(self, kind: str, payload: Any) -> None:
        try:
            self.on_event(kind, payload)
        except Exception:  # a listener that is gone (closed event loop) must not take the worker down
            logger.debug("dropped %s event of a finished request", kind, exc_info=True)


class Service:
    """Owns the model, the tokenizer and the worker; the HTTP layer only prepares, submits and cancels jobs.
    Model, tokenizer and prompts are the ones `ktchat chat` uses (generate.open_session), so replies match it."""

    def __init__(self, model, tokenizer, generation: GenerationArgs, prompts: Prompts, queue_size: int = 16,
                 kept_caches: int = 4, kept_cache_bytes: int = 4 << 30):
        if queue_size < 1:
            raise KTChatError(f"queue size must be an integer >= 1 (got {queue_size!r})")
        if kept_caches < 0 or kept_cache_bytes < 0:
            raise KTChatError(f"kept caches and their bytes must be >= 0 (got {kept_caches!r}, {kept_cache_bytes!r})")
        from ..model import engine_of

        self.engine = engine_of(model)
        self.engine.keep(kept_caches if kept_cache_bytes > 0 else 0, kept_cache_bytes)
        self.last_reused = 0  # prompt tokens the last generation did not compute again
        self.model, self.tokenizer, self.defaults, self.queue_size = model, tokenizer, generation, queue_size
        self.prompts = prompts
        config = getattr(model, "config", None)
        self.vocab_size = int(getattr(config, "vocab_size", 0) or len(tokenizer))
        self.context_length = int(getattr(config, "max_position_embeddings", 0) or tokenizer.model_max_length)
        # The event loop encodes while the worker decodes, and a fast tokenizer is not safe to share across threads.
        self._tokenizer_lock = threading.Lock()
        self._cond = threading.Condition()  # guards the queue, the running job and `served`
        self._waiting: deque[Job] = deque()
        self._running: Optional[Job] = None
        self._closed = False
        self.served = 0
        self._thread = threading.Thread(target=self._loop, name="ktchat-api-worker", daemon=True)
        self._thread.start()

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
        """Queue a job (FIFO); raises QueueFull when `queue_size` jobs already wait or the engine is closed."""
        with self._cond:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.queue_size:
                raise QueueFull(f"the server is busy: {len(self._waiting)} requests are already waiting "
                                f"(queue size {self.queue_size}); retry later")
            self._waiting.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Stop a job wherever it is: out of the queue at once, or at the next token if it runs. Idempotent."""
        job.cancel.set()
        with self._cond:
            try:
                self._waiting.remove(job)
            except ValueError:
                return
        job.emit("done", Result("", 0, "cancelled"))

    def stats(self) -> dict:
        with self._cond:
            return {"waiting": len(self._waiting), "busy": self._running is not None, "served": self.served,
                    "queue_size": self.queue_size, "kept_caches": self.engine.kept(),
                    "last_reused_tokens": self.last_reused}

    def close(self, timeout: float = 10.0) -> None:
        """Refuse new jobs, cancel the waiting ones and the running one, and wait for the worker to end."""
        with self._cond:
            self._closed = True
            waiting, self._waiting = list(self._waiting), deque()
            if self._running is not None:
                self._running.cancel.set()
            self._cond.notify_all()
        for job in waiting:
            job.cancel.set()
            job.emit("done", Result("", 0, "cancelled"))
        self._thread.join(timeout)

    # --- worker -------------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job = self._running = self._waiting.popleft()
            try:
                self._run(job)
            finally:
                with self._cond:
                    self._running = None
                    self.served += 1

    def _run(self, job: Job) -> None:
        if job.cancel.is_set():
            job.emit("done", Result("", 0, "cancelled"))
            return
        try:
            job.emit("done", self._generate(job))
        except Exception as exc:  # reported to this request only; the worker goes on with the next one
            logger.exception("generation failed")
            job.emit("error", exc)

    def _generate(self, job: Job) -> Result:
        extra = {"logit_bias": tuple(job.logit_bias.items())}
        if not job.generation.greedy and job.seed is not None:
            extra["seed"] = job.seed
        params = self.prompts.sampling(job.generation, **extra)
        reply = ReplyText(self.decode, job.stop)

        def on_token(token: int) -> None:
            piece = reply.push(token)
            if piece:
                job.emit("text", piece)
            if reply.stopped:
                job.cancel.set()  # ends the generation after this token

        out = self.engine.generate(job.input_ids, params, on_token=on_token, stop=lambda *_: job.cancel.is_set())
        self.last_reused = out.reused
        tail = reply.finish()
        if tail:
            job.emit("text", tail)
        if reply.stopped or out.finish_reason == "eos":
            reason = "stop"
        else:
            reason = "cancelled" if out.finish_reason == "stopped" else "length"
        return Result(reply.text, len(reply.tokens), reason)
