"""The hooks: LLaMA-Factory's chat argument parser and model loader, wrapped to serve `use_kt` through ktchat.

LLaMA-Factory has no plugin entry point for model loading, so ktchat wraps two names, only in the modules that
serve chat (docs/llamafactory.md has the whole story):

- `llamafactory.chat.chat_model.get_infer_args` (ChatModel's argument parser, which chat, api and webchat all
  go through): when the arguments say `use_kt: true`, the wrapper takes `use_kt` and the keys of ktchat's config
  (and kt_* keys) LLaMA-Factory does not know out of them, validates those with ktchat's own config rules, and
  parses the rest with LLaMA-Factory's parser. LLaMA-Factory therefore never sees `use_kt` and never asks for its
  KT forks (`_check_extra_dependencies`); the wrapper puts `use_kt = True` back on the parsed ModelArguments and
  attaches ktchat's settings to it. `use_kt` with vllm/sglang is refused here, before anything loads.
- `llamafactory.chat.hf_engine.load_model`: for arguments carrying ktchat's settings, `ktchat.load_model`
  loads the model and adapter in two channels instead. The tokenizer, template and generation arguments stay
  LLaMA-Factory's own (HuggingfaceEngine loads and applies them before and after this call).

`llamafactory-cli export` with `use_kt` gets an error that points to `ktchat export`. Without `use_kt` every
wrapper calls LLaMA-Factory's function with the very arguments it was given. The wrappers are installed right
after each module executes (ktchat.integrations.importhook). This module imports only the standard library and
ktchat's config until use_kt is seen.

One fix applies with or without `use_kt`: at exit the process waits for LLaMA-Factory's generate threads
(`_finish_generation`), which LLaMA-Factory leaves running and which could abort its exit.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import logging
import os
import sys
import threading
from typing import Any, Callable, Optional

from ...config import ALIASES, IGNORED_KEYS, KT_SERVED_BACKENDS, ModelArgs
from ...errors import KTChatError
from . import HOOKS

logger = logging.getLogger(__name__)

SETTINGS_ATTR = "ktchat_settings"  # set on LLaMA-Factory's ModelArguments when ktchat loads the model

_LF_ARGUMENT_CLASSES = ("ModelArguments", "DataArguments", "FinetuningArguments", "GeneratingArguments")
# What ktchat's config reads (ModelArgs) or accepts (LLaMA-Factory's older names, keys logged as ignored), derived
# from config.py so that a key added there is served here too: a hand-kept copy once lost `cuda_graphs`.
MODEL_KEYS = frozenset(f.name for f in dataclasses.fields(ModelArgs))
KTCHAT_KEYS = MODEL_KEYS | frozenset(ALIASES) | frozenset(IGNORED_KEYS)


# ----------------------------------------------------------------------------------------------------------------
# Reading the arguments


def _truthy(value: Any) -> bool:
    """`use_kt` as HfArgumentParser reads it: a bool, or a string such as true/yes/1."""
    if isinstance(value, str):
        return value.strip().lower() in ("true", "yes", "y", "1", "on")
    return bool(value)


def _lf_keys() -> set[str]:
    """Every key LLaMA-Factory's inference parser accepts (its four argument dataclasses)."""
    import llamafactory.hparams as hparams

    return {f.name for name in _LF_ARGUMENT_CLASSES for f in dataclasses.fields(getattr(hparams, name))}


def _argv_pairs(argv: list[str]) -> list[tuple[int, int, str, Any]]:
    """(first token, token count, key, value) for each `--key value`, `--key=value` or bare `--flag` in argv."""
    from ...config import parse_overrides

    pairs, i = [], 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--"):
            i += 1
            continue
        key, eq, value = token[2:].partition("=")
        count = 1
        if not eq:
            has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            value, count = (argv[i + 1], 2) if has_value else ("true", 1)
        key = key.replace("-", "_")
        pairs.append((i, count, key, parse_overrides([f"{key}={value}"])[key]))
        i += count
    return pairs


def _is_kt(key: str) -> bool:
    """LLaMA-Factory-KT's ever-growing kt_* family: ktchat's config logs the ones it does not read as ignored."""
    return key.startswith("kt_")


def _taken(keys, lf_keys: set[str]) -> set[str]:
    """The keys the hook takes out of LLaMA-Factory's arguments when use_kt is on: those ktchat reads or accepts
    and every kt_* key, where LLaMA-Factory's parser does not know them (it stops on a key it does not know)."""
    return {k for k in keys if (k in KTCHAT_KEYS or _is_kt(k)) and k not in lf_keys} | {"use_kt", "infer_backend"}


def _ours(values: dict[str, Any], taken: set[str]) -> dict[str, Any]:
    """What ktchat's config reads: the taken keys, every kt_* key and ModelArgs' keys (LLaMA-Factory's too)."""
    return {k: v for k, v in values.items() if k in taken or _is_kt(k) or k in MODEL_KEYS}


def split_arguments(raw, lf_keys: set[str]) -> tuple[Any, Optional[dict[str, Any]]]:
    """Splits LLaMA-Factory's raw arguments (a dict from YAML/JSON, or an argv list) when they ask for use_kt.

    Returns (arguments for LLaMA-Factory, ktchat's keys). Without use_kt: (raw, None), untouched. With it: `use_kt`,
    `infer_backend` and the keys of ktchat's config (and kt_* keys) LLaMA-Factory does not know are taken out
    (LLaMA-Factory gets `infer_backend: huggingface`); ktchat's keys hold those, LLaMA-Factory's own kt_* keys and
    the ModelArgs keys both read (model_name_or_path, adapter_name_or_path, template, ...).
    """
    if isinstance(raw, dict):
        if not _truthy(raw.get("use_kt", False)):
            return raw, None
        taken = _taken(raw, lf_keys)
        ours = _ours(raw, taken)
        return {**{k: v for k, v in raw.items() if k not in taken}, "infer_backend": "huggingface"}, ours
    argv = list(raw or ())
    pairs = _argv_pairs(argv)
    values = {key: value for _, _, key, value in pairs}
    if not _truthy(values.get("use_kt", False)):
        return raw, None
    taken = _taken(values, lf_keys)
    drop = {i + j for i, count, key, _ in pairs if key in taken for j in range(count)}
    ours = _ours(values, taken)
    return [t for i, t in enumerate(argv) if i not in drop] + ["--infer_backend", "huggingface"], ours


def _check_backend(ours: dict[str, Any]) -> None:
    backend = ours.get("infer_backend") or "huggingface"
    backend = str(getattr(backend, "value", backend))  # LLaMA-Factory's EngineName enum, if a caller passed one
    if backend in KT_SERVED_BACKENDS:
        if backend != "huggingface":
            logger.info("infer_backend: %s is served by ktchat inside LLaMA-Factory's huggingface engine", backend)
        return
    raise KTChatError(
        f"use_kt: true needs infer_backend: huggingface (got {backend!r}): with use_kt, ktchat loads the model "
        f"and runs the routed experts and their LoRA on the CPU inside transformers, which {backend} cannot host. "
        f"Set infer_backend: huggingface, or merge the adapter (`ktchat export --model BASE --adapter ADAPTER "
        f"--out DIR`) and serve DIR with {backend} without use_kt"
    )


def kt_settings(ours: dict[str, Any]):
    """ktchat's validated ModelArgs for the keys split_arguments took; KTChatError names a bad key or value."""
    from ...config import config_from_mapping

    _check_backend(ours)
    mapping = {k: v for k, v in ours.items() if v is not None}
    if isinstance(mapping.get("adapter_name_or_path"), (list, tuple)):
        mapping["adapter_name_or_path"] = ",".join(map(str, mapping["adapter_name_or_path"]))
    mapping.update(use_kt=True, infer_backend="huggingface")
    return config_from_mapping(mapping).model


# ----------------------------------------------------------------------------------------------------------------
# The hooks


def _wraps(original: Callable, wrapper: Callable) -> Callable:
    wrapper = functools.wraps(original)(wrapper)
    wrapper.__ktchat_original__ = original
    return wrapper


def _hooked(function) -> bool:
    return hasattr(function, "__ktchat_original__")


def _read(original: Callable, args):
    """LLaMA-Factory's own reading of its arguments (YAML/JSON + overrides, argv, or a dict); None if unknown."""
    read_args = getattr(sys.modules.get(original.__module__), "read_args", None)
    if read_args is None:  # not the LLaMA-Factory this hook knows: stay out of its way
        logger.warning("ktchat: %s.read_args not found: use_kt is not served by ktchat with this LLaMA-Factory",
                       original.__module__)
        return None
    return read_args(args)


def _split(original: Callable, args) -> tuple[Any, Optional[dict[str, Any]]]:
    """split_arguments over LLaMA-Factory's own reading of its arguments."""
    raw = _read(original, args)
    return (args, None) if raw is None else split_arguments(raw, _lf_keys())


# The YAML's LoRA shape (llamafactory-kt's inference YAML repeats the training's) -> the adapter_config.json key.
LORA_SHAPE_KEYS = {"lora_rank": "r", "kt_lora_rank": "r", "lora_alpha": "lora_alpha", "kt_lora_alpha": "lora_alpha"}


def lora_shape_note(raw, adapter: Optional[str]) -> Optional[str]:
    """One line where the YAML's lora_rank/lora_alpha disagree with the adapter's own config, which ktchat uses."""
    values = raw if isinstance(raw, dict) else {key: value for _, _, key, value in _argv_pairs(list(raw or ()))}
    config_path = os.path.join(adapter, "adapter_config.json") if adapter else None
    if not config_path or not os.path.isfile(config_path) or not LORA_SHAPE_KEYS.keys() & values.keys():
        return None
    import json

    with open(config_path) as f:
        config = json.load(f)
    differ = [f"{key}: {values[key]!r} (adapter {ours}: {config.get(ours)!r})" for key, ours in LORA_SHAPE_KEYS.items()
              if key in values and values[key] is not None and values[key] != config.get(ours)]
    if not differ:
        return None
    return (f"the YAML's {', '.join(differ)} disagree with {config_path}: ktchat takes rank and alpha from the "
            "adapter's own config")


def serve_get_infer_args(original: Callable) -> Callable:
    """ChatModel's get_infer_args: with use_kt, parse without it and attach ktchat's settings."""

    def get_infer_args(args=None):
        raw = _read(original, args)
        lf_args, ours = (args, None) if raw is None else split_arguments(raw, _lf_keys())
        if ours is None:
            return original(args)
        _setup_logging()
        settings = kt_settings(ours)
        note = lora_shape_note(raw, settings.adapter_name_or_path)
        if note:
            logger.warning("%s", note)
        parsed = original(lf_args)
        model_args = parsed[0]
        model_args.use_kt = True
        setattr(model_args, SETTINGS_ATTR, settings)
        logger.info("use_kt: LLaMA-Factory's %s engine will load %s through ktchat (experts_backend: %s)",
                    settings.infer_backend, settings.model_name_or_path, settings.resolved_experts_backend)
        return parsed

    return _wraps(original, get_infer_args)


def refuse_export_get_infer_args(original: Callable) -> Callable:
    """`llamafactory-cli export` (train.tuner) with use_kt: point to ktchat export instead of a fork error."""

    def get_infer_args(args=None):
        _, ours = _split(original, args)
        if ours is not None:
            raise KTChatError(
                "use_kt: `llamafactory-cli export` does not go through ktchat; merge the adapter with `ktchat export "
                "--model BASE --adapter ADAPTER --out DIR`, which merges every LoRA, the routed experts' included"
            )
        return original(args)

    return _wraps(original, get_infer_args)


def serve_load_model(original: Callable) -> Callable:
    """HuggingfaceEngine's load_model: arguments with ktchat's settings load through ktchat.load_model."""
    import inspect

    signature = inspect.signature(original)

    def load_model(*args, **kwargs):
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:  # a call this hook does not know: LLaMA-Factory answers it
            return original(*args, **kwargs)
        settings = getattr(bound.arguments.get("model_args"), SETTINGS_ATTR, None)
        if settings is None:
            return original(*args, **kwargs)
        bound.apply_defaults()
        return load_through_ktchat(settings, **bound.arguments)

    return _wraps(original, load_model)


def load_through_ktchat(settings, tokenizer, model_args, finetuning_args, is_trainable=False, add_valuehead=False,
                        **_):
    """What LLaMA-Factory's load_model returns, loaded in two channels by ktchat."""
    from ...model import load_model

    if is_trainable:
        raise KTChatError("use_kt: ktchat loads models for inference only; training with use_kt needs "
                          "LLaMA-Factory's KTransformers build")
    if add_valuehead:
        raise KTChatError("use_kt: ktchat serves generation models (stage: sft), not reward models")
    if getattr(model_args, "quantization_bit", None) is not None:
        raise KTChatError("use_kt: quantization_bit is not supported; kt_method: int8 or int4 quantizes the "
                          "routed experts on the CPU")
    model, _ = load_model(model_args.model_name_or_path, settings.adapter_name_or_path, **settings.load_kwargs())
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise KTChatError(f"use_kt: the tokenizer has {len(tokenizer)} tokens after LLaMA-Factory's template added "
                          f"its special tokens, the model's embedding only {rows}; pick the template the adapter "
                          "was trained with")
    model.requires_grad_(False)
    return model.eval()


def _finish_generation(timeout: float = 30.0) -> None:
    """At exit, before the interpreter finalizes, waits for LLaMA-Factory's streaming threads to end.

    The cause of "terminate called without an active exception" (SIGABRT) at the exit of `llamafactory-cli chat`,
    with or without use_kt: HuggingfaceEngine streams from `Thread(target=model.generate, daemon=True)`, which
    nobody joins. The REPL exits as soon as the streamer's stop signal arrives, while that thread is still
    returning from generate and freeing its tensors. torch releases the GIL inside a tensor's deallocation
    (THPVariable_clear); a daemon thread that takes the GIL back once the interpreter is finalizing is ended by
    pthread_exit, whose unwinding through that C++ frame calls std::terminate (pytorch/pytorch#38228). Rare: CI
    hit it under load without use_kt, ktchat's model on kt's exact kernels in 1 exit of 5. Joined here, before
    finalization, the thread has freed everything when the interpreter goes down."""
    for thread in threading.enumerate():
        if thread.daemon and thread.name.endswith("(generate)") and thread is not threading.current_thread():
            thread.join(timeout)


def _setup_logging() -> None:
    """ktchat's log lines on stderr, as `ktchat chat` shows them, unless the program configured logging itself."""
    root = logging.getLogger("ktchat")
    if root.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[ktchat] %(message)s"))
    root.addHandler(handler)
    level = os.environ.get("LLAMAFACTORY_VERBOSITY", "INFO").upper()
    root.setLevel(level if isinstance(logging.getLevelName(level), int) else logging.INFO)
    root.propagate = False


# ----------------------------------------------------------------------------------------------------------------
# Installing the hooks


def patch_module(module) -> None:
    """Wraps the hooked function of one of HOOKS' modules, once (a wrapper is never wrapped again). With the
    huggingface engine, the process also waits for its generate threads at exit (`_finish_generation`)."""
    if module.__name__ == "llamafactory.chat.hf_engine":
        atexit.unregister(_finish_generation)  # registered once however often the module is patched
        atexit.register(_finish_generation)
    name, wrapper = HOOKS[module.__name__]
    make = globals()[wrapper]  # HOOKS names this module's wrappers, so the startup hook need not import it
    original = getattr(module, name, None)
    if not callable(original):
        logger.warning("ktchat: %s.%s not found: use_kt is not served by ktchat with this LLaMA-Factory",
                       module.__name__, name)
        return
    if not _hooked(original):
        setattr(module, name, make(original))
