"""A conversation as prompt ids, and the ids that end a reply: one rule for `ktchat chat`, `ktchat api` and tests.

The chat REPL and the server once built prompts separately and drifted (the server ignored `template:` and its
stop ids), so the same question got different answers. Both now hold one `Prompts`. With `template: NAME` and
LLaMA-Factory installed, prompts and stop ids are LLaMA-Factory's template applied as `llamafactory-cli chat`
applies it; otherwise the tokenizer's own chat template, tokenized without extra specials (the template has its
own BOS).
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

from ..errors import KTChatError

if TYPE_CHECKING:  # torch-free at import: the engine is imported where sampling() runs
    from ..engine import SamplingParams

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LFTemplate:
    """A LLaMA-Factory chat template bound to a tokenizer: prompt ids for a conversation, and its stop ids."""

    name: Optional[str]  # None: LLaMA-Factory parsed the tokenizer's own chat template
    encode: Callable[..., list]  # encode(messages, system=None) -> prompt token ids, ending where the reply starts
    stop_token_ids: list


def check_template(name: Optional[str]) -> bool:
    """Before any load: True when `name` is one of LLaMA-Factory's templates, False when LLaMA-Factory is not
    installed (prompts then use the tokenizer's template). An unknown name or a broken install is a KTChatError."""
    if name is None or importlib.util.find_spec("llamafactory") is None:
        return False
    try:
        from llamafactory.data.template import TEMPLATES
    except Exception as exc:  # noqa: BLE001 - any import failure of a broken install is reported as one line
        raise KTChatError(f"template: {name!r} needs LLaMA-Factory, whose import fails here "
                          f"({type(exc).__name__}: {' '.join(str(exc).split())})") from None
    if name not in TEMPLATES:
        close = difflib.get_close_matches(name, list(TEMPLATES), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise KTChatError(f"template: {name!r} is not one of LLaMA-Factory's templates{hint}")
    return True


def llamafactory_template(tokenizer, name: str) -> Optional[LFTemplate]:
    """LLaMA-Factory's template `name` applied as `llamafactory-cli chat` applies it; None without LLaMA-Factory.

    Fixes the tokenizer's special tokens as LLaMA-Factory does. An unknown name raises KTChatError.
    """
    if not check_template(name):
        return None
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments

    return bound_template(tokenizer, get_template_and_fix_tokenizer(tokenizer, DataArguments(template=name)), name)


def bound_template(tokenizer, template, name: Optional[str]) -> LFTemplate:
    """LLaMA-Factory's Template object (as get_template_and_fix_tokenizer returns it) bound to `tokenizer`."""

    def encode(messages, system: Optional[str] = None) -> list:
        paired = list(messages) + [{"role": "assistant", "content": ""}]
        prompt, _ = template.encode_oneturn(tokenizer, paired, system)
        return prompt

    return LFTemplate(name=name, encode=encode, stop_token_ids=list(template.get_stop_token_ids(tokenizer)))


def _as_list(ids) -> list[int]:
    if ids is None:
        return []
    return [int(i) for i in ids] if isinstance(ids, (list, tuple)) else [int(ids)]


class Prompts:
    """How a conversation becomes prompt ids, and which ids end a reply, for one model and tokenizer.

    `model` is read for its checkpoint's generation_config only (its eos ids end replies): the loaded model, or the
    LoadPlan that will load it (`ktchat.model.resolve`), so prompts can be built before the weights are read."""

    def __init__(self, model, tokenizer, template: Optional[LFTemplate] = None, default_system: Optional[str] = None):
        if template is None and not getattr(tokenizer, "chat_template", None):
            raise KTChatError("the tokenizer has no chat template: ktchat formats prompts with it "
                              "(add chat_template to tokenizer_config.json, or set template: NAME)")
        self.tokenizer, self.template, self.default_system = tokenizer, template, default_system
        # Every id that ends a reply: the tokenizer's eos, any the checkpoint's generation_config lists, the template's.
        config_ids = _as_list(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
        template_ids = _as_list(template.stop_token_ids) if template is not None else []
        self.stop_ids = list(dict.fromkeys(_as_list(tokenizer.eos_token_id) + config_ids + template_ids))

    @classmethod
    def named(cls, model, tokenizer, template_name: Optional[str], default_system: Optional[str] = None) -> "Prompts":
        """With `template: NAME`: LLaMA-Factory's template where it is installed, else the tokenizer's (logged)."""
        template = llamafactory_template(tokenizer, template_name) if template_name else None
        if template_name and template is None:
            logger.info("template: %s needs LLaMA-Factory, which is not installed; prompts use the tokenizer's own "
                        "chat template", template_name)
        elif template is not None:
            logger.info("template: %s (LLaMA-Factory's)", template_name)
        return cls(model, tokenizer, template, default_system)

    def sampling(self, generation, **extra) -> "SamplingParams":
        """The engine's settings for a reply under `generation` (GenerationArgs), ended by these prompts' stop ids;
        `extra`: per-request fields (seed, logit_bias). Greedy where LLaMA-Factory would be (temperature 0 too)."""
        from ..engine import SamplingParams

        sampled = {} if generation.greedy else dict(do_sample=True, temperature=generation.temperature,
                                                    top_p=generation.top_p, top_k=generation.top_k)
        return SamplingParams(max_new_tokens=generation.max_new_tokens, repetition_penalty=generation.repetition_penalty,
                              stop_ids=tuple(self.stop_ids), **sampled, **extra)

    def with_system(self, messages: list[dict]) -> list[dict]:
        """The default system message in front, unless the conversation brings its own."""
        if self.default_system and not any(m["role"] == "system" for m in messages):
            return [{"role": "system", "content": self.default_system}, *messages]
        return list(messages)

    def encode(self, messages: list[dict]) -> list[int]:
        """Prompt ids for the conversation, ending where the assistant's reply starts."""
        messages = self.with_system(messages)
        if self.template is not None:
            system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
            return list(self.template.encode(messages[1:] if system is not None else messages, system))
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
