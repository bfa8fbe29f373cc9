"""LLaMA-Factory's chat templates by name, for `ktchat chat` when LLaMA-Factory is installed."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable, Optional

from ...errors import KTChatError


@dataclass(frozen=True)
class LFTemplate:
    """A LLaMA-Factory chat template bound to a tokenizer: prompt ids for a conversation, and its stop ids."""

    name: str
    encode: Callable[..., list]  # encode(messages, system=None) -> prompt token ids, ending where the reply starts
    stop_token_ids: list


def llamafactory_template(tokenizer, name: str) -> Optional[LFTemplate]:
    """LLaMA-Factory's template `name` applied as `llamafactory-cli chat` applies it; None without LLaMA-Factory.

    Fixes the tokenizer's special tokens as LLaMA-Factory does. An unknown name raises KTChatError.
    """
    if importlib.util.find_spec("llamafactory") is None:
        return None
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.data.template import TEMPLATES
    from llamafactory.hparams import DataArguments

    if name not in TEMPLATES:
        raise KTChatError(f"template: {name!r} is not one of LLaMA-Factory's templates")
    template = get_template_and_fix_tokenizer(tokenizer, DataArguments(template=name))

    def encode(messages, system: Optional[str] = None) -> list:
        paired = list(messages) + [{"role": "assistant", "content": ""}]
        prompt, _ = template.encode_oneturn(tokenizer, paired, system)
        return prompt

    return LFTemplate(name=name, encode=encode, stop_token_ids=list(template.get_stop_token_ids(tokenizer)))
