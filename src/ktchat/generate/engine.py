"""One generation at a time on the shared CPU experts: a bounded FIFO of jobs and the one worker thread that runs them.

Why one worker: every request would run its routed experts on the same CPU cores, so two generations at once only
slow each other down, and batching would pad prompts, which changes the numerics: greedy replies would no
longer match `ktchat chat` token for token. Requests wait in a FIFO (fair: first come, first served); a full queue refuses at once (the
server answers 503) instead of letting latency grow without bound. Each job has a stop event that ends its
`generate` within one token (client gone, stop string seen, shutdown), so the worker is free as soon as nobody
waits for the rest. One long-lived thread, no per-request threads: nothing to leak under sustained use.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

from ..config import GenerationArgs
from ..errors import KTChatError
from ..model.decode import static_decode_of
from .prefix import PrefixPool
from .prompts import Prompts
from .session import cancel_criterion

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


def _bias_processor(bias: dict[int, float]):
    """A LogitsProcessor adding each bias to its token's logit, before the greedy or sampled choice."""
    import torch
    from transformers import LogitsProcessor

    ids, values = torch.tensor(list(bias), dtype=torch.long), torch.tensor(list(bias.values()))

    class _Bias(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores[:, ids.to(scores.device)] += values.to(scores.device, scores.dtype)
            return scores

    return _Bias()


class _ReplyStreamer:
    """A transformers streamer: decodes the generated ids as they come, applies stop strings, emits new text.

    The whole reply is decoded at every token (as TextStreamer does), so the streamed pieces add up to exactly
    `tokenizer.decode(generated, skip_special_tokens=True)`. Text that could still turn into a stop string, or
    that ends in an incomplete UTF-8 character, is held back until it cannot.
    """

    def __init__(self, engine: "Engine", job: Job):
        self.engine, self.job = engine, job
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.prompt_seen = False
        self.stopped = False
        self.hold = max((len(s) for s in job.stop), default=1) - 1

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate first hands over the prompt
            self.prompt_seen = True
            return
        if self.stopped:
            return
        self.ids.extend(int(i) for i in value.reshape(-1).tolist())
        self.text = self.engine.decode(self.ids)
        cut = self._stop_index()
        if cut is not None:
            self.text, self.stopped = self.text[:cut], True
            self.job.cancel.set()  # ends generate after this token
            self._flush(len(self.text))
        elif not self.text.endswith("\ufffd"):
            self._flush(len(self.text) - self.hold)

    def end(self) -> None:
        pass

    def _stop_index(self) -> Optional[int]:
        start = max(0, self.sent - self.hold)
        hits = [i for i in (self.text.find(s, start) for s in self.job.stop) if i >= 0]
        return min(hits) if hits else None

    def _flush(self, upto: int) -> None:
        if upto > self.sent:
            self.job.emit("text", self.text[self.sent:upto])
            self.sent = upto

    def result(self) -> Result:
        self._flush(len(self.text))
        ended_by_eos = bool(self.ids) and self.ids[-1] in self.engine.eos_ids
        if self.stopped or ended_by_eos:
            reason = "stop"
        elif self.job.cancel.is_set():
            reason = "cancelled"
        else:
            reason = "length"
        return Result(self.text, len(self.ids), reason)


class Engine:
    """Owns the model, the tokenizer and the worker; the HTTP layer only prepares, submits and cancels jobs.
    Model, tokenizer and prompts are the ones `ktchat chat` uses (generate.open_session), so replies match it."""

    def __init__(self, model, tokenizer, generation: GenerationArgs, prompts: Prompts, queue_size: int = 16,
                 kept_caches: int = 4, kept_cache_bytes: int = 4 << 30):
        if queue_size < 1:
            raise KTChatError(f"queue size must be an integer >= 1 (got {queue_size!r})")
        if kept_caches < 0 or kept_cache_bytes < 0:
            raise KTChatError(f"kept caches and their bytes must be >= 0 (got {kept_caches!r}, {kept_cache_bytes!r})")
        # the last conversations' KV caches (used by the worker thread only): a request that continues one
        # prefills only its new tokens
        keep = kept_caches > 0 and kept_cache_bytes > 0
        self.kept = PrefixPool(model, kept_caches, kept_cache_bytes) if keep else None
        static = static_decode_of(model)
        if static is not None and not keep:  # no kept caches: the static cache does not keep the last one either
            static.keep_conversation = False
        self.last_reused = 0  # prompt tokens the last generation did not prefill again
        self.model, self.tokenizer, self.defaults, self.queue_size = model, tokenizer, generation, queue_size
        self.prompts = prompts
        self.eos_ids = set(prompts.stop_ids)
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
                    "queue_size": self.queue_size, "kept_caches": len(self.kept) if self.kept is not None else 0,
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
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        kwargs = self.prompts.generate_kwargs(job.generation)
        if kwargs["do_sample"] and job.seed is not None:
            torch.manual_seed(job.seed)
        elif kwargs["do_sample"]:
            torch.seed()  # an earlier request's seed must not make this one repeat it
        input_ids = torch.tensor([job.input_ids], dtype=torch.long, device=self.model.device)
        if job.logit_bias:
            kwargs["logits_processor"] = LogitsProcessorList([_bias_processor(job.logit_bias)])
        streamer = _ReplyStreamer(self, job)
        entry = self.kept.take(job.input_ids) if self.kept is not None else None
        if entry is not None:
            kwargs.update(entry.for_prompt(job.input_ids))
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs,
                                      streamer=streamer,
                                      stopping_criteria=StoppingCriteriaList([cancel_criterion(job.cancel)]))
        if entry is not None:  # a failed generate never gets here: its cache is dropped
            entry.after(out[0].tolist())
            self.kept.give_back(entry)
        self.last_reused = entry.reused if entry is not None else 0
        return streamer.result()
