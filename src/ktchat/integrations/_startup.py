"""Imported at interpreter start by ktchat-llamafactory.pth; registers the LLaMA-Factory hook and nothing else.

Cheap by design (a few milliseconds: no torch, no logging): it only puts a finder on sys.meta_path that wakes up
when one of LLaMA-Factory's chat modules is imported, and imports the hook itself then. Never raises: Python
must start whatever happens here (KTCHAT_DEBUG=1 prints what went wrong). KTCHAT_LLAMAFACTORY_HOOK=0 turns it off.
"""

import os

from ..runtime import switched_off
from .llamafactory import HOOKS  # names only: the package imports nothing else


def _patch(module) -> None:
    from .llamafactory.hook import patch_module

    patch_module(module)


if not switched_off("KTCHAT_LLAMAFACTORY_HOOK"):
    try:
        from .importhook import when_imported

        for _name in HOOKS:
            when_imported(_name, _patch)
    except Exception:  # noqa: BLE001 - a broken hook must not stop every Python program in this environment
        if os.environ.get("KTCHAT_DEBUG"):
            import traceback

            traceback.print_exc()
