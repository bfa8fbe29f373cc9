"""A multi-turn chat over any transformers-style causal LM, streaming the reply as it is generated.

`model.generate` blocks until the reply is done, so it runs in a worker thread feeding a TextIteratorStreamer
while the caller reads pieces from the queue. The worker's exceptions are carried back and re-raised in the
caller (otherwise a failed generate would leave the reader waiting forever), and a caller that stops reading
(Ctrl+C, closing the iterator) cancels the worker through a stopping criterion instead of letting it run on.
"""

from __future__ import annotations

import logging
import threading
from typing import Iterator

from ..config import ChatConfig, GenerationArgs
from .prefix import PrefixCache
from .prompts import Prompts, check_template

logger = logging.getLogger(__name__)


def cancel_criterion(event: threading.Event):
    """A StoppingCriteria that ends generation once `event` is set (the reader went away)."""
    import torch
    from transformers import StoppingCriteria

    class _Cancelled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), event.is_set(), dtype=torch.bool, device=input_ids.device)

    return _Cancelled()


class ChatSession:
    """Holds the conversation so far and turns each user message into a streamed assistant reply."""

    def __init__(self, model, tokenizer, generation: GenerationArgs, prompts: Prompts):
        self.model, self.tokenizer, self.generation, self.prompts = model, tokenizer, generation, prompts
        self.history: list[dict[str, str]] = []
        self._generate_kwargs = prompts.generate_kwargs(generation)
        self.kept = PrefixCache(model)  # the conversation's KV cache, continued by the next turn

    def clear(self) -> None:
        self.history = []
        if self.kept is not None:
            self.kept.clear()

    def input_ids(self, user_message: str):
        """The prompt for the history plus this message, as a [1, T] tensor on the model's device."""
        import torch

        ids = self.prompts.encode(self.history + [{"role": "user", "content": user_message}])
        return torch.tensor([ids], dtype=torch.long, device=self.model.device)

    def _start(self, user_message: str):
        """Start generate in a worker thread; returns (streamer, thread, errors, cancel event)."""
        import torch
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        input_ids = self.input_ids(user_message)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancel, errors = threading.Event(), []

        kept = {} if self.kept is None else self.kept.for_prompt(input_ids[0].tolist())

        def work():
            try:
                out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                          **self._generate_kwargs, **kept, streamer=streamer,
                                          stopping_criteria=StoppingCriteriaList([cancel_criterion(cancel)]))
                if self.kept is not None:
                    self.kept.after(out[0].tolist())
            except BaseException as exc:  # carried to the reader, which re-raises it
                if self.kept is not None:
                    self.kept.clear()  # a cache left half-written by a failed or cancelled turn is not reused
                errors.append(exc)
                streamer.end()  # unblock the reader

        thread = threading.Thread(target=work, name="ktchat-generate", daemon=True)
        thread.start()
        return streamer, thread, errors, cancel

    def stream(self, user_message: str) -> Iterator[str]:
        """Yield the reply's text pieces as they are generated; the finished reply joins the history."""
        streamer, thread, errors, cancel = self._start(user_message)
        pieces: list[str] = []
        try:
            for piece in streamer:
                if piece:
                    pieces.append(piece)
                    yield piece
        finally:
            cancel.set()  # no-op when generation already ended; stops it when the reader left early
        thread.join()
        if errors:
            raise errors[0]
        reply = "".join(pieces)
        self.history += [{"role": "user", "content": user_message}, {"role": "assistant", "content": reply}]

    def reply(self, user_message: str) -> str:
        return "".join(self.stream(user_message))


def open_session(config: ChatConfig) -> ChatSession:
    """Load the model and adapter the config names; prompts as `Prompts.named` builds them (chat and api alike).

    `template` is checked before the load (an unknown name was found only after it); load_model checks the rest."""
    from ..model import load_model

    m = config.model
    check_template(m.template)
    model, tokenizer = load_model(m.model_name_or_path, m.adapter_name_or_path, **m.load_kwargs())
    prompts = Prompts.named(model, tokenizer, m.template, config.generation.default_system)
    return ChatSession(model, tokenizer, config.generation, prompts)
