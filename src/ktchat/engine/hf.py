"""`model.generate` as transformers defines it, run by ktchat's engine.

load_model builds the model as a subclass of its transformers class with this `generate` (no method is replaced on
an instance), so every caller of `generate` (LLaMA-Factory's HuggingfaceEngine, PEFT's generate, users' own code)
takes ktchat's loop: one sequence, greedy or sampled, with the settings, logits processors, stopping criteria and
streamer transformers' generate takes. A call the engine does not run (beams, batches, assistant models, a cache of
the caller's own, settings it does not implement) goes to transformers' own generate, on the same model, unchanged.
"""

from __future__ import annotations

import copy
import functools
import logging
from dataclasses import dataclass
from typing import Any

import torch

from .sampling import SamplingParams

logger = logging.getLogger(__name__)

# GenerationConfig fields the engine implements, and fields that do not change what one sequence's decoding does
HANDLED = frozenset({"max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "min_p",
                     "repetition_penalty", "min_new_tokens", "eos_token_id", "output_scores", "output_logits",
                     "return_dict_in_generate"})
NEUTRAL = frozenset({"bos_token_id", "pad_token_id", "decoder_start_token_id", "transformers_version",
                     "_from_model_config", "use_cache", "cache_implementation", "cache_config", "compile_config",
                     "disable_compile", "low_memory", "length_penalty", "early_stopping", "max_cache_len",
                     "prefill_chunk_size", "return_legacy_cache", "is_assistant", "num_assistant_tokens",
                     "num_assistant_tokens_schedule", "assistant_confidence_threshold", "assistant_lookbehind",
                     "target_lookbehind", "continuous_batching_config", "_commit_hash", "_original_object_hash"})
# generate's own arguments besides the config: those it takes here, and those that leave the engine out when set
TAKEN = ("generation_config", "logits_processor", "stopping_criteria", "streamer", "inputs", "input_ids",
         "attention_mask")


def generation_class(base: type) -> type:
    """`base` with ktchat's generate (what load_model builds the model as)."""
    return _generation_class(base)


@functools.cache
def _generation_class(base: type) -> type:
    return type(base.__name__, (GenerateWithEngine, base), {"__module__": base.__module__})


class GenerateWithEngine:
    """Mixed into a transformers causal LM: `generate` runs on the model's `ktchat_engine` where it can."""

    ktchat_engine = None  # the Engine load_model attaches

    def generate(self, *args, **kwargs):
        request = None
        if self.ktchat_engine is not None:
            request, why = _request(self, args, kwargs)
            if request is None:
                logger.debug("generate runs transformers' own loop: %s", why)
        if request is None:
            return super().generate(*args, **kwargs)
        return request.run(self.ktchat_engine)


@dataclass
class _Request:
    input_ids: torch.Tensor
    params: SamplingParams
    criteria: list
    streamer: Any
    scores: bool
    logits: bool
    as_dict: bool

    def run(self, engine):
        if self.streamer is not None:
            self.streamer.put(self.input_ids.cpu())
        stop = None
        if self.criteria:
            stop = lambda ids, scores: any(bool(c(ids, scores).any()) for c in self.criteria)  # noqa: E731
        on_token = None if self.streamer is None else (lambda t: self.streamer.put(torch.tensor([t])))
        out = engine.generate(self.input_ids[0].tolist(), self.params, on_token=on_token, stop=stop,
                              keep_scores=self.scores, keep_logits=self.logits)
        if self.streamer is not None:
            self.streamer.end()
        new = torch.tensor([out.tokens], dtype=self.input_ids.dtype, device=self.input_ids.device)
        sequences = torch.cat([self.input_ids, new], dim=1)
        if not self.as_dict:
            return sequences
        from transformers.generation.utils import GenerateDecoderOnlyOutput

        return GenerateDecoderOnlyOutput(sequences=sequences, scores=tuple(out.scores) if self.scores else None,
                                         logits=tuple(out.logits) if self.logits else None)


def _request(model, args: tuple, kwargs: dict) -> tuple[_Request | None, str]:
    """The engine's request for this generate call, or (None, why not)."""
    extra = [k for k, v in kwargs.items() if k not in TAKEN and v is not None]
    ids = args[0] if args else kwargs.get("inputs", kwargs.get("input_ids"))
    if len(args) > 1:
        return None, "positional arguments besides the inputs"
    config = copy.deepcopy(kwargs.get("generation_config") or model.generation_config)
    unused = config.update(**{k: kwargs[k] for k in extra})  # settings go to the config; the rest is model input
    if unused:
        return None, f"model inputs or arguments {sorted(unused)}"
    if not torch.is_tensor(ids) or ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        return None, "not one sequence of input ids"
    mask = kwargs.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        return None, "padding in the attention mask"
    unhandled = _unhandled(config)
    if unhandled:
        return None, f"settings {unhandled}"
    new = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - ids.shape[1]
    if new < 1:
        return None, "no room for new tokens"
    stop_ids = config.eos_token_id if isinstance(config.eos_token_id, (list, tuple)) else [config.eos_token_id]
    params = SamplingParams(
        max_new_tokens=new, do_sample=bool(config.do_sample), temperature=config.temperature, top_p=config.top_p,
        top_k=config.top_k, min_p=config.min_p, repetition_penalty=config.repetition_penalty,
        min_new_tokens=config.min_new_tokens or 0, stop_ids=tuple(i for i in stop_ids if i is not None),
        processors=tuple(kwargs.get("logits_processor") or ()))
    return _Request(ids.to(model.device), params, list(kwargs.get("stopping_criteria") or ()), kwargs.get("streamer"),
                    bool(config.output_scores), bool(getattr(config, "output_logits", False)),
                    bool(config.return_dict_in_generate)), ""


def _unhandled(config) -> list[str]:
    """The config's fields set away from their defaults that the engine neither implements nor may ignore (a field
    off either way, None / False / 0, is not set: a model's own config spells output_attentions=False where a fresh
    GenerationConfig has None)."""
    default = type(config)().to_dict()
    off = (None, False, 0)
    return sorted(k for k, v in config.to_dict().items()
                  if k in default and k not in HANDLED and k not in NEUTRAL and v != default[k]
                  and not (v in off and default[k] in off))
