"""The `ktchat` command: one module per command (chat, demo, api, predict, and the adapter tools), each a thin layer.

torch and transformers are imported only inside the commands that need them, which keeps `ktchat --help` and
config errors instant. Every KTChatError, and every OSError (a file or folder the command cannot read or write),
leaves as one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .. import __version__
from ..errors import KTChatError
from ..runtime import wanted_environment
from . import adapter, api, chat, demo, predict

COMMANDS = (chat, demo, adapter, api, predict)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ktchat", description="Chat with MoE models fine-tuned with LoRA on "
                                     "LLaMA-Factory's KTransformers backend.")
    parser.add_argument("--version", action="version", version=f"ktchat {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_command(sub)
    return parser


def _one_line(exc: BaseException) -> str:
    """The message on one line; an OSError as `PATH: strerror`, the way the shell reports it."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        paths = f"{exc.filename} -> {exc.filename2}" if exc.filename2 is not None else f"{exc.filename}"
        return f"{paths}: {exc.strerror}"
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv=None) -> int:
    """Entry point of the `ktchat` console script; returns the exit status (2: user error, 130: Ctrl+C)."""
    args = build_parser().parse_args(argv)
    wanted = wanted_environment()  # before torch loads: OpenMP and glibc read these once
    os.environ.update(wanted)
    if "GLIBC_TUNABLES" in wanted and argv is None:  # the console script: start again, glibc now asks for huge pages
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    level = os.environ.get("KTCHAT_LOG_LEVEL", "INFO").strip().upper()  # DEBUG shows kt_kernel's captured output
    logging.basicConfig(level=level if isinstance(logging.getLevelName(level), int) else logging.INFO,
                        format="[ktchat] %(message)s")
    try:
        return args.func(args)
    except (KTChatError, OSError) as exc:  # OSError: a path or socket the command could not use (unwritable OUT...)
        print(f"ktchat: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
