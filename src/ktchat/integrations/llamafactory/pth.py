"""The .pth file that installs the hook at interpreter start: write, remove, report."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Optional

from ...runtime import switched_off

PTH_NAME = "ktchat-llamafactory.pth"
PTH_TEXT = (
    "# ktchat: `llamafactory-cli chat|api|webchat` with use_kt: true load through ktchat (docs/llamafactory.md).\n"
    "# Turn off: KTCHAT_LLAMAFACTORY_HOOK=0, or `python -m ktchat.integrations.llamafactory disable`.\n"
    'import importlib.util as _u; _u.find_spec("ktchat") and __import__("ktchat.integrations._startup")\n'
)


def pth_path(site_dir=None) -> Path:
    """Where the file goes: `site_dir`, else this interpreter's purelib (a venv's site-packages)."""
    import sysconfig

    return Path(site_dir or sysconfig.get_paths()["purelib"]) / PTH_NAME


def enable(site_dir=None) -> Path:
    path = pth_path(site_dir)
    if not path.exists() or path.read_text(encoding="utf-8") != PTH_TEXT:
        path.write_text(PTH_TEXT, encoding="utf-8")
    return path


def disable(site_dir=None) -> Optional[Path]:
    path = pth_path(site_dir)
    if not path.exists():
        return None
    path.unlink()
    return path


def status(site_dir=None) -> str:
    from ..importhook import _finder

    path = pth_path(site_dir)
    lf = importlib.util.find_spec("llamafactory")
    lines = [
        f"{path}: {'present' if path.exists() else 'absent'}",
        f"hook active in this interpreter: {'yes' if _finder in sys.meta_path else 'no'}",
        f"llamafactory: {str(Path(lf.origin).parent) if lf else 'not installed'}",
    ]
    if switched_off("KTCHAT_LLAMAFACTORY_HOOK"):
        lines.append("KTCHAT_LLAMAFACTORY_HOOK turns the hook off in this environment")
    return "\n".join(lines)
