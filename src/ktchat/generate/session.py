"""A multi-turn chat over a model loaded by ktchat, streaming the reply as it is generated.

The engine's generate blocks until the reply is done, so it runs in a worker thread that puts text pieces on a
queue while the caller reads them. The worker's exceptions are carried back and re-raised in the caller (otherwise a
failed turn would leave the reader waiting forever), and a caller that stops reading (Ctrl+C, closing the iterator)
stops the worker at the next token instead of letting it run on. The engine keeps the conversation's cache from one
turn to the next: a turn computes only what is new.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Iterator

from ..config import ChatConfig, GenerationArgs
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
        cancel, errors = threading.Event(), []
        reply = ReplyText(self._decode)
        prompt = self.prompt_ids(user_message)

        def work():
            try:
                self.engine.generate(prompt, self._params, on_token=lambda t: pieces.put(reply.push(t)),
                                     stop=lambda *_: cancel.is_set())
                pieces.put(reply.finish())
            except BaseException as exc:  # carried to the reader, which re-raises it
                errors.append(exc)
            finally:
                pieces.put(_END)

        thread = threading.Thread(target=work, name="ktchat-generate", daemon=True)
        thread.start()
        text = []
        try:
            while (piece := pieces.get()) is not _END:
                if piece:
                    text.append(piece)
                    yield piece
        finally:
            cancel.set()  # no-op when the reply is done; stops it when the reader left early
            thread.join()
        if errors:
            raise errors[0]
        self.history += [{"role": "user", "content": user_message}, {"role": "assistant", "content": "".join(text)}]

    def reply(self, user_message: str) -> str:
        return "".join(self.stream(user_message))

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)


def open_session(config: ChatConfig) -> ChatSession:
    """Load the model and adapter the config names; prompts as `Prompts.named` builds them (chat and api alike).

    `template` is checked before the load (an unknown name was found only after it); load_model checks the rest."""
    from ..model import load_model

    m = config.model
    check_template(m.template)
    model, tokenizer = load_model(m)
    prompts = Prompts.named(model, tokenizer, m.template, config.generation.default_system)
    return ChatSession(model, tokenizer, config.generation, prompts)
