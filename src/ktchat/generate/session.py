"""A multi-turn chat over a model loaded by ktchat, streaming the reply as it is generated.

The engine generates on its own thread and hands each token over; the session turns tokens into text pieces on a
queue the caller reads. A failed reply is re-raised in the caller, and a caller that stops reading (Ctrl+C, closing
the iterator) cancels the reply at the next token instead of letting it run on. The engine keeps the conversation's
cache from one turn to the next: a turn computes only what is new.
"""

from __future__ import annotations

import logging
import queue
from typing import Iterator

from ..config import ChatConfig, GenerationArgs, check_folders
from .prompts import Prompts, check_template
from .text import ReplyText

logger = logging.getLogger(__name__)

_END = object()  # the worker's last item on the queue


class ChatSession:
    """Holds the conversation so far and turns each user message into a streamed assistant reply."""

    def __init__(self, model, tokenizer, generation: GenerationArgs, prompts: Prompts):
        from ..model import engine_of

        self.model, self.tokenizer, self.generation, self.prompts = model, tokenizer, generation, prompts
        self.engine = engine_of(model)
        self.history: list[dict[str, str]] = []
        self._params = prompts.sampling(generation)

    def clear(self) -> None:
        """A new conversation: the history and the engine's kept cache go."""
        self.history = []
        self.engine.forget()

    def prompt_ids(self, user_message: str) -> list[int]:
        """The prompt for the history plus this message."""
        return self.prompts.encode(self.history + [{"role": "user", "content": user_message}])

    def stream(self, user_message: str) -> Iterator[str]:
        """Yield the reply's text pieces as they are generated; the finished reply joins the history."""
        pieces: queue.Queue = queue.Queue()
        reply = ReplyText(self._decode)
        sequence = self.engine.submit(self.prompt_ids(user_message), self._params,
                                      on_token=lambda t: pieces.put(reply.push(t)), on_end=lambda _: pieces.put(_END))
        text = []
        try:
            while (piece := pieces.get()) is not _END:
                if piece:
                    text.append(piece)
                    yield piece
        finally:
            sequence.cancel()  # no-op when the reply is done; stops it when the reader left early
            sequence.wait()  # re-raises what failed it
        text.append(reply.finish())
        if text[-1]:
            yield text[-1]
        self.history += [{"role": "user", "content": user_message}, {"role": "assistant", "content": "".join(text)}]

    def reply(self, user_message: str) -> str:
        return "".join(self.stream(user_message))

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)


def open_session(config: ChatConfig) -> ChatSession:
    """Load the model and adapter the config names; prompts as `Prompts.named` builds them (chat and api alike).

    `template` and the folders are checked before torch is imported; load_model checks the rest."""
    m = config.model
    check_template(m.template)
    check_folders(m.model_name_or_path, m.adapter_name_or_path)
    from ..model import load_model

    model, tokenizer = load_model(m)
    prompts = Prompts.named(model, tokenizer, m.template, config.generation.default_system)
    return ChatSession(model, tokenizer, config.generation, prompts)
