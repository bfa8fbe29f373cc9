"""python -m ktchat.integrations.llamafactory enable | disable | status"""

from __future__ import annotations

import argparse
import sys

from .pth import disable, enable, status


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ktchat.integrations.llamafactory",
                                     description="Turn ktchat's LLaMA-Factory hook on or off in this Python "
                                     "environment (a .pth file in site-packages; docs/llamafactory.md).")
    parser.add_argument("action", choices=("enable", "disable", "status"))
    parser.add_argument("--site-packages", metavar="DIR", help="where the .pth file goes (default: this "
                        "interpreter's site-packages)")
    args = parser.parse_args(argv)
    try:
        if args.action == "enable":
            print(f"enabled: {enable(args.site_packages)}")
        elif args.action == "disable":
            path = disable(args.site_packages)
            print(f"disabled: removed {path}" if path else "already disabled")
        else:
            print(status(args.site_packages))
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
