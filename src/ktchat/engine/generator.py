"""ktchat's generation loop, in gpt-fast's shape: prefill a prompt, then one decode step per token, on a cache the
engine allocates itself and keeps from one request to the next; many sequences at once (continuous batching).

Requests are `submit`ted from any thread and run by one worker thread, step by step (engine.scheduler): sequences
join at step boundaries, compute their prompt in chunks between the running ones' decode steps, decode together
(one batched forward, the CPU experts taking every row's tokens in one kernel call), and leave on a stop id, their
token budget, their caller's stop check or a cancel. `generate` is submit-and-wait. The cache's slots hold the last
conversations too (`keep`): a prompt that continues one computes only its new tokens (engine.slots says which slot
and from where; hybrid linear-attention models resume from saved copies of their state).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import weakref

import torch
from torch import nn

from .cache import SlotCache
from .runner import ModelRunner
from .sampling import Chooser, SamplingParams
from .scheduler import DECODE, Scheduler, Step
from .sequence import Generation, Sequence, StopCheck
from .slots import Resume, SlotTable

logger = logging.getLogger(__name__)

# A slot of this many positions at least (powers of two above), so a growing chat is rarely moved and re-captured.
MIN_CACHE_TOKENS = 512
SAVED_PER_SLOT = 4  # copies of a hybrid model's linear-attention state kept per conversation (the latest)
PREFILL_CHUNK = 2048  # a prompt computed beside running sequences goes in chunks of this many tokens


_working: weakref.WeakSet = weakref.WeakSet()  # engines whose worker thread runs


def _close_at_exit() -> None:
    """At exit, every worker ends first. The interpreter stops a daemon thread that comes back from a native call
    after it began finalizing, and one inside torch then dies in a C++ destructor: "terminate called without an
    active exception", SIGABRT (seen after `ktchat demo` answered and read `exit`)."""
    for engine in list(_working):
        engine.close()


class Engine:
    """Generation over one transformers causal LM (its PEFT layers included) with ktchat's runner and cache."""

    def __init__(self, model: nn.Module, *, graphs: bool, hybrid: bool, min_cache_tokens: int = MIN_CACHE_TOKENS,
                 prefill_chunk: int = PREFILL_CHUNK, graph_rows: int | None = None):
        self.model = model
        self.runner = ModelRunner(model, graphs, graph_rows)
        self.hybrid, self.min_cache_tokens, self.prefill_chunk = hybrid, min_cache_tokens, prefill_chunk
        self._lora = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "disable_adapters")]
        self._adapters, self._epoch = None, 0
        self._cond = threading.Condition()  # guards the scheduler, the slot table and the worker's life
        self._thread: threading.Thread | None = None
        self._closed = False
        self.last_reused = 0
        self._configure(conversations=1, max_bytes=None, max_batch=1)

    # --- settings -----------------------------------------------------------------------------------------------
    def keep(self, conversations: int, max_bytes: int | None = None, max_batch: int | None = None) -> None:
        """Keep the caches of the last `conversations` (0: none; every prompt is computed whole), their saved
        states within `max_bytes` (None: no bound); run up to `max_batch` sequences at once (default: as before)."""
        if conversations < 0 or (max_bytes is not None and max_bytes < 0) or (max_batch is not None and max_batch < 1):
            raise ValueError(f"kept conversations, bytes and the batch must be >= 0, >= 0, >= 1 (got {conversations}, "
                             f"{max_bytes}, {max_batch})")
        with self._cond:
            if self.scheduler.active or self.scheduler.waiting:
                raise RuntimeError("the engine is generating: settings change between requests")
            self._configure(conversations, max_bytes, max_batch or self.scheduler.max_batch)

    def _configure(self, conversations: int, max_bytes: int | None, max_batch: int) -> None:
        self.table = SlotTable(max(conversations, max_batch, 1), self.hybrid, reuse=conversations > 0)
        self.scheduler = Scheduler(max_batch)
        self.max_bytes, self.cache, self._saved = max_bytes, None, {}
        self.runner.forget_graphs()

    def batch_that_fits(self, tokens: int = 4096, share: float = 0.5, most: int = 64) -> int:
        """How many sequences of `tokens` positions fit in `share` of the memory free where the cache lives (at
        least 1, at most `most`): measured on a one-token prefill, which allocates every layer's buffers."""
        if self.cache is None or not self.cache.allocated:
            self.generate([0], SamplingParams(max_new_tokens=1))
            self.forget()
        device = next(iter(self.cache.devices()))
        if device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
        else:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        per_sequence = self.cache.token_bytes() * tokens + self.cache.linear_bytes()
        return int(max(1, min(most, share * free // max(per_sequence, 1))))

    def kept(self) -> int:
        """How many conversations the cache holds now."""
        return sum(1 for held in self.table.held if held.ids)

    def stats(self) -> dict:
        with self._cond:
            return {"running": self.scheduler.active, "waiting": len(self.scheduler.waiting),
                    "max_batch": self.scheduler.max_batch}

    def forget(self) -> None:
        """Drops every kept conversation (their cache stays allocated for the next)."""
        with self._cond:
            self._forget(None, busy=self._busy())

    # --- requests -----------------------------------------------------------------------------------------------
    def submit(self, prompt: list[int], params: SamplingParams, *, on_token=None, stop: StopCheck | None = None,
               on_end=None, save_at=(), keep_scores: bool = False, keep_logits: bool = False) -> Sequence:
        """Queues a reply to `prompt` (token ids); returns its Sequence (wait, cancel). on_token gets each new token
        as it is chosen, stop is asked after each one and on_end is called once it ended, all on the engine's
        thread. save_at: positions after which a hybrid model's state is worth saving (where the caller's template
        may rewrite the next prompt)."""
        if not prompt:
            raise ValueError("the prompt is empty")
        sequence = Sequence(list(prompt), params, on_token, stop, on_end, tuple(save_at), keep_scores, keep_logits)
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self.scheduler.add(sequence)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="ktchat-engine", daemon=True)
                if not _working:  # registered after kt's pool, so it runs before the pool is released
                    atexit.unregister(_close_at_exit)
                    atexit.register(_close_at_exit)
                _working.add(self)
                self._thread.start()
            self._cond.notify_all()
        return sequence

    def generate(self, prompt: list[int], params: SamplingParams, **kwargs) -> Generation:
        """`submit` and wait for the reply; an interrupted wait cancels it."""
        sequence = self.submit(prompt, params, **kwargs)
        try:
            return sequence.wait()
        except BaseException:
            sequence.cancel()
            raise

    def cancel(self, sequence: Sequence) -> None:
        """Ends a sequence: a waiting one at once, a running one at its next step. Idempotent."""
        sequence.cancel()
        with self._cond:
            waiting = sequence in self.scheduler.waiting
            if waiting:
                self.scheduler.retire(sequence)
        if waiting:
            sequence.end("cancelled")

    def close(self, timeout: float = 10.0) -> None:
        """Cancels what waits or runs and ends the worker."""
        with self._cond:
            self._closed = True
            for sequence in (*self.scheduler.waiting, *self.scheduler.prefilling, *self.scheduler.running):
                sequence.cancel()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # --- the worker ---------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.no_grad():  # grad mode is per thread; not inference_mode: the cache stays ordinary tensors
            while (step := self._next_step()) is not None:
                try:
                    self._run(step)
                except BaseException as exc:  # noqa: BLE001 - those sequences fail, the engine goes on
                    logger.exception("generation step failed")
                    for sequence in step.sequences:
                        self._end(sequence, error=exc)
        self._cancel_all()

    def _next_step(self) -> Step | None:
        """The next step to run, waiting for work; None once closed."""
        with self._cond:
            while True:
                if self._closed:
                    return None
                self._retire_cancelled()
                if not self.scheduler.active:
                    self._check_adapters()
                for sequence in self.scheduler.admit(self._start):
                    sequence.end("cancelled")
                step = self.scheduler.next_step()
                if step is not None:
                    return step
                self._cond.wait()

    def _start(self, sequence: Sequence) -> bool:
        """A slot for the sequence, the cache fit for it, its state set to where its prompt resumes."""
        self._fit(len(sequence.prompt) + sequence.params.max_new_tokens)
        resume = self.table.choose(sequence.prompt, busy=self._busy())
        if resume is None:
            return False
        sequence.slot, sequence.computed, sequence.out.reused = resume.slot, resume.position, resume.position
        sequence.saves = self.table.start(resume, sequence.prompt, sequence.save_at)
        self._resume(resume)
        return True

    def _run(self, step: Step) -> None:
        if step.kind == DECODE:
            tokens = [s.out.tokens[-1] for s in step.sequences]
            positions = [s.length - 1 for s in step.sequences]
            logits = self.runner.decode(self.cache, [s.slot for s in step.sequences], tokens, positions, key=self._epoch)
            for sequence, row in zip(step.sequences, logits):
                self._emit(sequence, row)
            return
        sequence = step.sequences[0]
        logits = self._prefill_chunk(sequence)
        if sequence.computed == len(sequence.prompt):
            with self._cond:
                self.scheduler.prefilled(sequence)
            self._emit(sequence, logits)

    def _prefill_chunk(self, sequence: Sequence) -> torch.Tensor:
        """The next part of the prompt: up to its next save point, and one chunk at most beside running sequences."""
        start, prompt = sequence.computed, sequence.prompt
        end = min([len(prompt), *(p for p in sequence.saves if p > start)])
        if self.scheduler.running:
            end = min(end, start + self.prefill_chunk)
        logits = self.runner.prefill(self.cache, sequence.slot, prompt[start:end], start)
        sequence.computed = end
        if end in sequence.saves:
            self._save(sequence.slot, end)
        return logits

    def _emit(self, sequence: Sequence, logits: torch.Tensor) -> None:
        """Chooses the sequence's next token from its logits, hands it over, and ends the sequence when it is done."""
        params, out = sequence.params, sequence.out
        if sequence.chooser is None:
            sequence.chooser = Chooser(params, logits.device)
            sequence.ids = torch.empty((1, len(sequence.prompt) + params.max_new_tokens), dtype=torch.long,
                                       device=logits.device)
            sequence.ids[0, :len(sequence.prompt)] = torch.tensor(sequence.prompt)
        length = sequence.length
        token, scores = sequence.chooser(sequence.ids[:, :length], logits.view(1, -1))
        sequence.ids[0, length] = token
        out.tokens.append(token)
        if sequence.keep_scores:
            out.scores.append(scores.clone())
        if sequence.keep_logits:
            out.logits.append(logits.view(1, -1).clone())
        if sequence.on_token is not None:
            sequence.on_token(token)
        if token in params.stop_ids:
            self._end(sequence, "eos")
        elif sequence.stop is not None and sequence.stop(sequence.ids[:, :length + 1], scores):
            self._end(sequence, "stopped")
        elif sequence.cancelled:
            self._end(sequence, "cancelled")
        elif len(out.tokens) >= params.max_new_tokens:
            self._end(sequence, "length")

    def _end(self, sequence: Sequence, reason: str | None = None, error: BaseException | None = None) -> None:
        """The sequence leaves: its slot keeps what it computed (all but the last new token, never fed), or holds
        nothing when it failed or left mid-prompt."""
        with self._cond:
            self.scheduler.retire(sequence)
            if sequence.slot >= 0:
                if error is None and sequence.computed == len(sequence.prompt):
                    self.table.finish(sequence.slot, sequence.prompt + sequence.out.tokens[:-1])
                else:
                    self._forget(sequence.slot)
            self.last_reused = sequence.out.reused
            self._cond.notify_all()
        sequence.end(reason, error)

    def _retire_cancelled(self) -> None:
        for sequence in list(self.scheduler.prefilling):
            if sequence.cancelled:
                self._forget(sequence.slot)
                self.scheduler.retire(sequence)
                sequence.end("cancelled")

    def _cancel_all(self) -> None:
        with self._cond:
            left = [*self.scheduler.waiting, *self.scheduler.prefilling, *self.scheduler.running]
        for sequence in left:
            self._end(sequence, "cancelled")

    def _busy(self) -> set[int]:
        return {s.slot for s in (*self.scheduler.prefilling, *self.scheduler.running)}

    # --- the cache ----------------------------------------------------------------------------------------------
    def _fit(self, tokens: int) -> None:
        """A cache whose slots hold `tokens` positions: made, or grown (powers of two) keeping what every slot holds,
        under the same slot numbers (sequences may be running in them)."""
        slots = len(self.table) + (1 if self.runner.graphs else 0)  # the last: a scratch slot padding graph batches
        if self.cache is not None and self.cache.length >= tokens and self.cache.slots == slots:
            return
        limit = getattr(self.model.config.get_text_config(), "max_position_embeddings", None) or tokens
        length = max(tokens, min(limit, max(self.min_cache_tokens, 1 << (tokens - 1).bit_length())))
        if self.cache is None:
            self.cache = SlotCache(slots, length)
            return
        self.cache = self.cache.resized(slots, max(length, self.cache.length))
        self.runner.forget_graphs()
        logger.debug("cache resized to %d slots of %d positions", slots, self.cache.length)

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
        with self._cond:
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

    def _forget(self, slot: int | None = None, busy=frozenset()) -> None:
        """One slot (None: every slot not busy) holds nothing from now on; its saved states go too."""
        for s in [slot] if slot is not None else [s for s in range(len(self.table)) if s not in busy]:
            for key in self.table.forget(s):
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
