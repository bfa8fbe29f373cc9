"""LLaMA-Factory integration: `llamafactory-cli chat | api | webchat` with `use_kt: true` load through ktchat.

- hook: the wrappers around LLaMA-Factory's chat argument parser and model loader, and `install()`;
- pth: the .pth file that calls `install()` at interpreter start (`python -m ktchat.integrations.llamafactory
  enable | disable | status`).

LLaMA-Factory's chat templates by name, for `ktchat chat` and `ktchat api`, live in ktchat.generate.prompts.

Importing this package imports nothing else (it runs at every interpreter start where the hook is enabled);
the names below load their module on first use. Neither torch nor LLaMA-Factory is imported before use_kt is seen.
"""

import importlib

_EXPORTS = {
    "KT_KEYS": "hook", "install": "hook", "split_arguments": "hook",
    "PTH_NAME": "pth", "enable": "pth", "disable": "pth", "status": "pth",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(name)
