"""The `ktchat` command: a thin layer over load_config, load_model and ChatSession.

The REPL mirrors `llamafactory-cli chat` (same banner, prompts and commands) so users moving over from
LLaMA-Factory see nothing new. torch and transformers are imported only inside the commands that need them,
which keeps `ktchat --help` and config errors instant.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from . import __version__
from .config import ChatConfig, load_config, parse_overrides
from .errors import KTChatError
from .runtime import wanted_environment

logger = logging.getLogger("ktchat")

WELCOME = "Welcome to the CLI application, use `clear` to remove the history, use `exit` to exit the application."


def open_session(config: ChatConfig):
    """Load the model and adapter the config names and wrap them in a ChatSession."""
    from .chat import ChatSession
    from .integrations.llamafactory import llamafactory_template
    from .model import load_model

    m = config.model
    model, tokenizer = load_model(m.model_name_or_path, m.adapter_name_or_path, **m.load_kwargs())
    template = llamafactory_template(tokenizer, m.template) if m.template else None
    if m.template and template is None:
        logger.info("template: %s needs LLaMA-Factory, which is not installed; prompts use the tokenizer's own "
                    "chat template", m.template)
    elif template is not None:
        logger.info("template: %s (LLaMA-Factory's)", m.template)
    return ChatSession(model, tokenizer, config.generation, template=template)


def _read_query() -> str | None:
    """One user line, or None at end of input. Undecodable input is reported and asked again."""
    while True:
        try:
            return input("\nUser: ")
        except EOFError:
            print()
            return None
        except UnicodeDecodeError:
            print("Detected decoding error at the inputs, please set the terminal encoding to utf-8.")


def repl(session) -> int:
    """The llamafactory-cli chat loop: `exit` or end of input quits, `clear` forgets the conversation."""
    print(WELCOME)
    while True:
        query = _read_query()
        if query is None or query.strip() == "exit":
            return 0
        if query.strip() == "clear":
            session.clear()
            print("History has been removed.")
            continue
        if not query.strip():
            continue
        print("Assistant: ", end="", flush=True)
        for piece in session.stream(query):
            print(piece, end="", flush=True)
        print()


def cmd_chat(args) -> int:
    config = load_config(args.config, overrides=parse_overrides(args.set))
    return repl(open_session(config))


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
    from .tiny import TRAINED_QA, build_tiny

    root = demo_dir(args.cache)
    root.mkdir(parents=True, exist_ok=True)
    logger.info("building the tiny demo model and adapter in %s", root)
    paths = build_tiny(root)
    config_path = write_demo_config(paths, root)
    logger.info("config written to %s (rerun with: ktchat chat %s)", config_path, config_path)
    print("The demo adapter was trained on these questions; ask one:")
    for question, _ in TRAINED_QA:
        print(f"  {question}")
    return repl(open_session(load_config(config_path)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ktchat", description="Chat with MoE models fine-tuned with LoRA on "
                                     "LLaMA-Factory's KTransformers backend.")
    parser.add_argument("--version", action="version", version=f"ktchat {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chat = sub.add_parser("chat", help="chat in the terminal with the model a LLaMA-Factory inference YAML names")
    chat.add_argument("config", metavar="CONFIG.yaml", help="inference YAML (model_name_or_path, adapter, ...)")
    chat.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a YAML key (repeatable)")
    chat.set_defaults(func=cmd_chat)
    demo = sub.add_parser("demo", help="build a tiny offline MoE model + trained LoRA adapter and chat with it")
    demo.add_argument("--cache", metavar="DIR", help="where to build it (default $KTCHAT_CACHE or "
                      "~/.cache/ktchat/demo)")
    demo.set_defaults(func=cmd_demo)
    from .adapter_cli import add_adapter_commands

    add_adapter_commands(sub)
    from .serve import add_api_command

    add_api_command(sub)
    return parser


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv=None) -> int:
    """Entry point of the `ktchat` console script; returns the exit status (2: user error, 130: Ctrl+C)."""
    args = build_parser().parse_args(argv)
    wanted = wanted_environment()  # before torch loads: OpenMP and glibc read these once
    os.environ.update(wanted)
    if "GLIBC_TUNABLES" in wanted and argv is None:  # the console script: start again, glibc now asks for huge pages
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    logging.basicConfig(level=logging.INFO, format="[ktchat] %(message)s")
    try:
        return args.func(args)
    except (KTChatError, FileNotFoundError) as exc:
        print(f"ktchat: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
