"""`ktchat api CONFIG.yaml`: the model `ktchat chat` would load, served over an OpenAI-compatible HTTP API."""

from __future__ import annotations

import errno
import logging
import os
import socket
from pathlib import Path

from ..config import load_config, parse_overrides
from ..errors import KTChatError

logger = logging.getLogger(__name__)


def add_command(subparsers) -> None:
    api = subparsers.add_parser("api", help="serve the model over an OpenAI-compatible HTTP API")
    api.add_argument("config", metavar="CONFIG.yaml", help="inference YAML, as for `ktchat chat`")
    api.add_argument("--host", help="address to listen on (default $API_HOST, else 127.0.0.1)")
    api.add_argument("--port", help="port (default $API_PORT, else 8000)")
    api.add_argument("--api-key", help="require `Authorization: Bearer KEY` (default $API_KEY; unset: no key)")
    api.add_argument("--model-name", help="the model id clients send (default $API_MODEL_NAME, else the "
                     "model folder's name)")
    api.add_argument("--queue-size", type=int, default=16, help="requests that may wait while one generates; "
                     "more are answered 503 (default 16)")
    api.add_argument("--max-batch", type=int, help="requests generated at once, sharing each step (continuous "
                     "batching; default: as many 4,096-token conversations as half the free memory holds, at most 64)")
    api.add_argument("--kept-caches", type=int, default=4, help="conversations whose KV cache is kept, so a request "
                     "continuing one prefills only its new tokens (least recently used dropped first; 0: off; "
                     "default 4)")
    api.add_argument("--kept-cache-gib", type=float, default=4.0, help="memory those caches may hold together, on "
                     "the device the attention runs on (default 4 GiB)")
    api.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a YAML key (repeatable)")
    api.set_defaults(func=cmd_api)


def listen_settings(args) -> tuple[str, int, str | None]:
    """Flags win over LLaMA-Factory's environment variables (API_HOST, API_PORT, API_KEY)."""
    host = args.host or os.environ.get("API_HOST") or "127.0.0.1"
    port = args.port or os.environ.get("API_PORT") or "8000"
    if not str(port).isdigit() or not 0 < int(port) < 65536:
        raise KTChatError(f"port must be an integer from 1 to 65535 (got {port!r})")
    if args.queue_size < 1:
        raise KTChatError(f"--queue-size must be an integer >= 1 (got {args.queue_size})")
    if args.max_batch is not None and args.max_batch < 1:
        raise KTChatError(f"--max-batch must be an integer >= 1 (got {args.max_batch})")
    if args.kept_caches < 0 or not args.kept_cache_gib >= 0:
        raise KTChatError(f"--kept-caches and --kept-cache-gib must be >= 0 (got {args.kept_caches}, "
                          f"{args.kept_cache_gib})")
    return host, int(port), args.api_key or os.environ.get("API_KEY") or None


def require_serve_dependencies() -> None:
    """starlette and uvicorn are an optional extra: missing (or broken), that is one line before the load, not a
    traceback after it."""
    try:
        import starlette.applications  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise KTChatError(f"ktchat api needs starlette and uvicorn ({exc}): pip install 'ktchat[serve]'") from None


def bind_listener(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads, so a port in use is an error at once, not after the load;
    uvicorn then serves on it. Bound as uvicorn binds (IPv6 for a host with a colon, SO_REUSEADDR); while the model
    loads, clients that connect wait in the backlog."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)  # uvicorn's default backlog
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise KTChatError(f"port {port} on {host} is already in use: choose another (--port or API_PORT)") from None
        raise KTChatError(f"cannot listen on {host}:{port} (--host / --port): {exc.strerror or exc}") from None
    return sock


def cmd_api(args) -> int:
    require_serve_dependencies()
    host, port, api_key = listen_settings(args)
    config = load_config(args.config, overrides=parse_overrides(args.set))
    name = args.model_name or os.environ.get("API_MODEL_NAME") or Path(config.model.model_name_or_path).name

    from ..generate import open_session
    from ..generate.service import Service
    from ..serve.app import Server, run_uvicorn

    with bind_listener(host, port) as sock:
        session = open_session(config)  # the same model, tokenizer and settings as `ktchat chat`
        batch = args.max_batch or session.engine.batch_that_fits()
        service = Service(session.model, session.tokenizer, config.generation, session.prompts,
                          queue_size=args.queue_size, kept_caches=args.kept_caches,
                          kept_cache_bytes=int(args.kept_cache_gib * (1 << 30)), max_batch=batch)
        logger.info("serving %s on http://%s:%d/v1 (%d requests at once, queue size %d%s)", name, host, port, batch,
                    args.queue_size, ", API key required" if api_key else "")
        run_uvicorn(Server(service, name, api_key).app(), service, host, port, sock=sock)
    return 0
