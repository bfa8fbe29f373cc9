"""LLaMA-Factory integration: `llamafactory-cli chat | api | webchat` with `use_kt: true` load through ktchat.

- hook: the wrappers around LLaMA-Factory's chat argument parser and model loader (`patch_module`);
- pth: the .pth file whose one line imports ktchat.integrations._startup at interpreter start, which patches
  those modules when they are imported (`python -m ktchat.integrations.llamafactory enable | disable | status`).

LLaMA-Factory's chat templates by name, for `ktchat chat` and `ktchat api`, live in ktchat.generate.prompts.

Importing this package imports nothing else (the startup hook imports it as soon as LLaMA-Factory's chat modules
load); the names below load their module on first use. Neither torch nor LLaMA-Factory is imported before use_kt
is seen.
"""

import importlib

# The hooks, in names only (the startup hook reads them without importing the hook, which imports the config, yaml
# and logging): LLaMA-Factory module -> (its function ktchat wraps, the function of .hook that makes the wrapper)
HOOKS = {
    "llamafactory.chat.chat_model": ("get_infer_args", "serve_get_infer_args"),
    "llamafactory.chat.hf_engine": ("load_model", "serve_load_model"),
    "llamafactory.train.tuner": ("get_infer_args", "refuse_export_get_infer_args"),
}
_EXPORTS = {
    "KTCHAT_KEYS": "hook", "split_arguments": "hook",
    "PTH_NAME": "pth", "enable": "pth", "disable": "pth", "status": "pth",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(name)
