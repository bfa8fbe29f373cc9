"""`ktchat chat CONFIG.yaml`: the llamafactory-cli chat REPL (same banner, prompts and commands) over ktchat."""

from __future__ import annotations

from ..config import load_config, parse_overrides

WELCOME = "Welcome to the CLI application, use `clear` to remove the history, use `exit` to exit the application."


def add_command(subparsers) -> None:
    chat = subparsers.add_parser("chat", help="chat in the terminal with the model a LLaMA-Factory inference YAML "
                                 "names")
    chat.add_argument("config", metavar="CONFIG.yaml", help="inference YAML (model_name_or_path, adapter, ...)")
    chat.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a YAML key (repeatable)")
    chat.set_defaults(func=cmd_chat)


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
    from ..generate import open_session

    config = load_config(args.config, overrides=parse_overrides(args.set))
    return repl(open_session(config))
