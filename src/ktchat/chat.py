"""A multi-turn chat over any transformers-style causal LM, streaming the reply as it is generated.

`model.generate` blocks until the reply is done, so it runs in a worker thread feeding a TextIteratorStreamer
while the caller reads pieces from the queue. The worker's exceptions are carried back and re-raised in the
caller (otherwise a failed generate would leave the reader waiting forever), and a caller that stops reading
(Ctrl+C, closing the iterator) cancels the worker through a stopping criterion instead of letting it run on.
"""

from __future__ import annotations

import logging
import threading
from typing import Iterator, Optional

from .config import GenerationArgs
from .errors import KTChatError

logger = logging.getLogger(__name__)


def generation_kwargs(generation: GenerationArgs, eos_token_ids: list[int], pad_token_id: Optional[int]) -> dict:
    """The keyword arguments for `model.generate`, in one place so chat, server and tests decode alike.

    Sampling knobs are set to None when greedy so a checkpoint's generation_config (which often sets
    temperature/top_p) does not trigger transformers' "flag only used in sample mode" warnings.
    """
    kwargs = dict(
        max_new_tokens=generation.max_new_tokens,
        repetition_penalty=generation.repetition_penalty,
        eos_token_id=eos_token_ids or None,
        pad_token_id=pad_token_id,
    )
    if generation.greedy:
        return {**kwargs, "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return {**kwargs, "do_sample": True, "temperature": generation.temperature, "top_p": generation.top_p,
            "top_k": generation.top_k}


def _as_list(ids) -> list[int]:
    if ids is None:
        return []
    return [int(i) for i in ids] if isinstance(ids, (list, tuple)) else [int(ids)]


def stop_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a reply: the tokenizer's eos plus any the checkpoint's generation_config lists."""
    config_ids = _as_list(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    ids = _as_list(tokenizer.eos_token_id) + config_ids
    return list(dict.fromkeys(ids))


def eos_and_pad(model, tokenizer) -> tuple[list[int], Optional[int]]:
    """The ids that end a reply, and the pad id generate needs (the tokenizer's, else the first eos)."""
    eos = stop_token_ids(model, tokenizer)
    return eos, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else None)


def prompt_text(tokenizer, messages) -> str:
    """The chat template's rendering; tokenize it without extra specials (the template has its own BOS)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


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

    def __init__(self, model, tokenizer, generation: GenerationArgs, template=None):
        """`template`: a LLaMA-Factory template by name (integrations.llamafactory.LFTemplate) replacing the
        tokenizer's chat template, as `llamafactory-cli chat` formats prompts."""
        self.template = template
        if template is None and not getattr(tokenizer, "chat_template", None):
            raise KTChatError("the tokenizer has no chat template: ktchat formats prompts with it "
                              "(add chat_template to tokenizer_config.json)")
        self.model = model
        self.tokenizer = tokenizer
        self.generation = generation
        self.history: list[dict[str, str]] = []
        eos, pad = eos_and_pad(model, tokenizer)
        if template is not None:
            eos = list(dict.fromkeys(eos + [int(i) for i in template.stop_token_ids]))
        self._generate_kwargs = generation_kwargs(generation, eos, pad)

    def clear(self) -> None:
        self.history = []

    def _messages(self, user_message: str) -> list[dict[str, str]]:
        system = self.generation.default_system
        head = [{"role": "system", "content": system}] if system else []
        return head + self.history + [{"role": "user", "content": user_message}]

    def _encode(self, messages):
        if self.template is not None:
            import torch

            system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
            ids = self.template.encode(messages[1:] if system is not None else messages, system)
            return {"input_ids": torch.tensor([ids], device=self.model.device)}
        encoded = self.tokenizer(prompt_text(self.tokenizer, messages), return_tensors="pt", add_special_tokens=False)
        return {k: v.to(self.model.device) for k, v in encoded.items()}

    def _start(self, user_message: str):
        """Start generate in a worker thread; returns (streamer, thread, errors, cancel event)."""
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        inputs = self._encode(self._messages(user_message))
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancel, errors = threading.Event(), []

        def work():
            try:
                self.model.generate(**inputs, **self._generate_kwargs, streamer=streamer,
                                    stopping_criteria=StoppingCriteriaList([cancel_criterion(cancel)]))
            except BaseException as exc:  # carried to the reader, which re-raises it
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
