"""`ktchat demo`: build the tiny offline model and trained adapter, then chat with it as `ktchat chat` would."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..config import load_config
from ..errors import KTChatError
from .chat import repl

logger = logging.getLogger(__name__)


def add_command(subparsers) -> None:
    demo = subparsers.add_parser("demo", help="build a tiny offline MoE model + trained LoRA adapter and chat with it")
    demo.add_argument("--cache", metavar="DIR", help="where to build it (default $KTCHAT_CACHE or "
                      "~/.cache/ktchat/demo)")
    demo.set_defaults(func=cmd_demo)


def demo_dir(cache: str | None) -> Path:
    """--cache, else $KTCHAT_CACHE, else ~/.cache/ktchat/demo: a rerun reuses what was built."""
    return Path(cache or os.environ.get("KTCHAT_CACHE") or Path.home() / ".cache" / "ktchat" / "demo").expanduser()


def write_demo_config(paths, root: Path) -> Path:
    """A YAML like one a LLaMA-Factory user would write, so `ktchat chat` can be rerun on it by hand."""
    import yaml

    settings = {
        "model_name_or_path": str(paths.model),
        "adapter_name_or_path": str(paths.adapter),
        "infer_backend": "huggingface",
        "use_kt": True,
        "do_sample": False,
        "max_new_tokens": 64,
    }
    path = root / "demo.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False), encoding="utf-8")
    return path


def cmd_demo(args) -> int:
    root = demo_dir(args.cache)
    root.mkdir(parents=True, exist_ok=True)  # an OSError here leaves as one line naming the folder (cli.main)
    if not os.access(root, os.W_OK | os.X_OK):  # checked before the build, not found halfway through it
        raise KTChatError(f"{root}: cannot write the demo model there (permission denied): pass --cache DIR")

    from ..generate import open_session
    from ..tinymodels import TRAINED_QA, build_tiny

    logger.info("building the tiny demo model and adapter in %s", root)
    paths = build_tiny(root)
    config_path = write_demo_config(paths, root)
    logger.info("config written to %s (rerun with: ktchat chat %s)", config_path, config_path)
    print("The demo adapter was trained on these questions; ask one:")
    for question, _ in TRAINED_QA:
        print(f"  {question}")
    return repl(open_session(load_config(config_path)))
