"""`ktchat api`: an OpenAI-compatible HTTP server (/v1/models, /v1/chat/completions, /health) over load_model.

A thin layer: this file reads the command line, validates each request into plain values (errors name the field,
OpenAI-style JSON, never a 5xx) and speaks HTTP/SSE with Starlette + uvicorn; generation and scheduling live in
serve_engine.Engine. Starlette, uvicorn and torch are imported inside the command, so `ktchat --help` stays instant.
A watcher per request reads the ASGI receive channel: a client that goes away, streaming or not, queued or
running, cancels its job at once, which frees the one worker for the next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import sys
import threading
import time
import uuid
from pathlib import Path

from .config import load_config, parse_overrides
from .errors import KTChatError

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 << 20
MAX_STOP = 4  # as OpenAI
GENERATION_FIELDS = ("max_tokens", "temperature", "top_p", "do_sample", "seed", "stop", "logit_bias")
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
UNSUPPORTED = {"tools": "tool calling", "functions": "function calling", "tool_choice": "tool calling",
               "logprobs": "logprobs", "top_logprobs": "logprobs",
               "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty"}


class ApiError(Exception):
    """An OpenAI-style error: the HTTP status and the {"error": {...}} body."""

    def __init__(self, status: int, message: str, param=None, code=None, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --- request validation ----------------------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _bad(param: str, allowed: str, value) -> ApiError:
    shown = json.dumps(value)[:80]
    return ApiError(400, f"{param} must be {allowed} (got {shown})", param=param, code="invalid_value")


def _content(i: int, msg: dict) -> str:
    """A message's text: a string, or a list of {"type": "text"} parts joined (other parts are refused)."""
    content = msg.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise _bad(f"messages[{i}].content", 'a string or a list of {"type": "text", "text": ...} parts', content)


def parse_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "a non-empty list of {role, content} objects", messages)
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise _bad(f"messages[{i}]", "an object with role and content", msg)
        role = msg.get("role")
        if role not in ROLES:
            raise _bad(f"messages[{i}].role", "one of " + ", ".join(ROLES), role)
        out.append({"role": ROLES[role], "content": _content(i, msg)})
    return out


def _optional(body: dict, key: str, check, allowed: str):
    """body[key] when it passes `check`; None when absent or null."""
    value = body.get(key)
    if value is not None and not check(value):
        raise _bad(key, allowed, value)
    return value


def _stop(value) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value
    ok = isinstance(stops, list) and len(stops) <= MAX_STOP and all(isinstance(s, str) and s for s in stops)
    if not ok:
        raise _bad("stop", f"a non-empty string or a list of at most {MAX_STOP} of them", value)
    return tuple(stops)


def parse_request(body: dict, model_name: str) -> dict:
    """Check every field we read; returns plain values. Fields we do not know are ignored, as OpenAI clients
    send extras; fields we know but cannot honour are refused rather than silently dropped."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise _bad("model", "a string naming the served model", model)
    if model != model_name:
        raise ApiError(404, f"The model `{model}` does not exist; this server serves `{model_name}`",
                       param="model", code="model_not_found")
    for key, what in UNSUPPORTED.items():
        if body.get(key) not in (None, False, 0, [], {}):
            raise ApiError(400, f"{key} is not supported: ktchat has no {what}", param=key, code="unsupported")
    _optional(body, "n", lambda v: v == 1 and _is_int(v), "1 (ktchat generates one choice per request)")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _optional(body, key, lambda v: _is_int(v) and v >= 1, "an integer >= 1")
    temperature = _optional(body, "temperature", lambda v: _is_number(v) and 0 <= v <= 2, "a number from 0 to 2")
    top_p = _optional(body, "top_p", lambda v: _is_number(v) and 0 < v <= 1, "a number > 0 and <= 1")
    seed = _optional(body, "seed", lambda v: _is_int(v) and -(2**63) <= v < 2**64, "a 64-bit integer")
    stream_options = _optional(body, "stream_options", lambda v: isinstance(v, dict), "an object")
    logit_bias = _optional(body, "logit_bias", lambda v: isinstance(v, dict) and all(
        k.isdigit() and _is_number(b) and -100 <= b <= 100 for k, b in v.items()), "{token id: -100 to 100}")
    return {
        "messages": parse_messages(body.get("messages")),
        "stream": bool(_optional(body, "stream", lambda v: isinstance(v, bool), "true or false")),
        "include_usage": bool((stream_options or {}).get("include_usage")),
        "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed,
        "do_sample": _optional(body, "do_sample", lambda v: isinstance(v, bool), "true or false"),
        "stop": _stop(body["stop"]) if body.get("stop") is not None else (),
        "logit_bias": {int(k): float(v) for k, v in (logit_bias or {}).items()},
    }


# --- HTTP ------------------------------------------------------------------------------------------------------
async def read_json(request):
    """The body as JSON, refusing bodies over MAX_BODY_BYTES before reading them whole."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is over {MAX_BODY_BYTES >> 20} MiB", code="body_too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except ValueError as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc})", code="invalid_json") from None


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, separators=(',', ':'))}\n\n"


class Server:
    """The routes over one Engine; every error leaves as OpenAI-style JSON."""

    def __init__(self, engine, model_name: str, api_key: str | None = None):
        self.engine, self.model_name, self.api_key = engine, model_name, api_key
        self.created = int(time.time())
        self._watchers: set[asyncio.Task] = set()

    def app(self):
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.routing import Route

        routes = [Route("/health", self.health), Route("/v1/models", self.models),
                  Route("/v1/models/{model:path}", self.models),
                  Route("/v1/chat/completions", self.chat, methods=["POST"])]
        handlers = {ApiError: self._api_error, HTTPException: self._http_error, Exception: self._crash}
        return Starlette(routes=routes, exception_handlers=handlers, lifespan=self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        yield
        self.engine.close()  # cancel what runs or waits, end the worker

    # --- errors ---
    @staticmethod
    async def _api_error(request, exc: ApiError):
        from starlette.responses import JSONResponse

        return JSONResponse(exc.body(), status_code=exc.status)

    async def _http_error(self, request, exc):
        """Routing errors (404 unknown path, 405 wrong method) in OpenAI's shape."""
        error = ApiError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}")
        response = await self._api_error(request, error)
        response.headers.update(exc.headers or {})
        return response

    async def _crash(self, request, exc):
        logger.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return await self._api_error(request, ApiError(500, f"internal error: {exc}", type_="server_error"))

    def _authorize(self, request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "invalid or missing API key: send the header Authorization: Bearer <key>",
                           code="invalid_api_key")

    # --- routes ---
    async def health(self, request):
        from starlette.responses import JSONResponse

        return JSONResponse({"status": "ok", "model": self.model_name, **self.engine.stats(),
                             "threads": threading.active_count(), "watchers": len(self._watchers)})

    async def models(self, request):
        """GET /v1/models lists the one model; GET /v1/models/{id} describes it."""
        from starlette.responses import JSONResponse

        self._authorize(request)
        card = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "ktchat"}
        asked = request.path_params.get("model")
        if asked is None:
            return JSONResponse({"object": "list", "data": [card]})
        if asked != self.model_name:
            raise ApiError(404, f"The model `{asked}` does not exist", param="model", code="model_not_found")
        return JSONResponse(card)

    async def chat(self, request):
        from starlette.responses import JSONResponse, StreamingResponse

        self._authorize(request)
        req = parse_request(await read_json(request), self.model_name)
        job, events, prompt_tokens = self._submit(req)
        self._watch(request, job)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req["stream"]:
            chunks = self._stream(job, events, rid, created, prompt_tokens if req["include_usage"] else None)
            return StreamingResponse(chunks, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            result = await self._result(events)
        finally:
            self.engine.cancel(job)  # no-op once done; stops the job if this handler is cancelled (shutdown)
        message = {"role": "assistant", "content": result.text}
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": created, "model": self.model_name,
            "choices": [{"index": 0, "message": message, "finish_reason": result.finish_reason, "logprobs": None}],
            "usage": self._usage(prompt_tokens, result.completion_tokens), "system_fingerprint": None,
        })

    # --- plumbing ---
    def _submit(self, req: dict):
        """Encode, size and queue the request; returns (job, asyncio queue of its events, prompt length)."""
        from .serve_engine import BadRequest, QueueFull

        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def on_event(kind, payload):  # called from the worker thread
            loop.call_soon_threadsafe(events.put_nowait, (kind, payload))

        try:
            job = self.engine.prepare(req["messages"], on_event, **{k: req[k] for k in GENERATION_FIELDS})
            self.engine.submit(job)
        except BadRequest as exc:
            raise ApiError(400, str(exc), param=exc.param, code=exc.code) from None
        except QueueFull as exc:
            raise ApiError(503, str(exc), code="server_busy", type_="server_error") from None
        return job, events, len(job.input_ids)

    def _watch(self, request, job) -> None:
        """Cancel the job when the client disconnects. uvicorn reports http.disconnect also once the response
        is complete, so every watcher ends on its own (cancel is then a no-op)."""
        async def watch():
            while (await request.receive())["type"] != "http.disconnect":
                pass
            self.engine.cancel(job)

        task = asyncio.get_running_loop().create_task(watch())
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    @staticmethod
    def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    @staticmethod
    def _failure(kind: str, payload) -> ApiError:
        if kind == "error":
            return ApiError(500, f"generation failed: {payload}", type_="server_error", code="generation_failed")
        return ApiError(503, "the request was cancelled (the server is shutting down)", type_="server_error",
                        code="cancelled")

    async def _result(self, events):
        while True:
            kind, payload = await events.get()
            if kind == "done" and payload.finish_reason != "cancelled":
                return payload
            if kind != "text":
                raise self._failure(kind, payload)

    async def _stream(self, job, events, rid: str, created: int, prompt_tokens: int | None):
        def chunk(delta: dict | None, finish=None, **extra) -> str:
            choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
            return _sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                         "model": self.model_name, "choices": choices, **extra})

        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                kind, payload = await events.get()
                if kind == "text":
                    yield chunk({"content": payload})
                    continue
                if kind == "done" and payload.finish_reason != "cancelled":
                    yield chunk({}, payload.finish_reason)
                    if prompt_tokens is not None:  # stream_options.include_usage: one more chunk, no choices
                        yield chunk(None, usage=self._usage(prompt_tokens, payload.completion_tokens))
                else:
                    yield _sse(self._failure(kind, payload).body())
                break
            yield _sse("[DONE]")
        finally:
            self.engine.cancel(job)


# --- command line ----------------------------------------------------------------------------------------------
def add_api_command(subparsers) -> None:
    """Register `ktchat api` on the `ktchat` subparsers (cli.build_parser)."""
    api = subparsers.add_parser("api", help="serve the model over an OpenAI-compatible HTTP API")
    api.add_argument("config", metavar="CONFIG.yaml", help="inference YAML, as for `ktchat chat`")
    api.add_argument("--host", help="address to listen on (default $API_HOST, else 127.0.0.1)")
    api.add_argument("--port", help="port (default $API_PORT, else 8000)")
    api.add_argument("--api-key", help="require `Authorization: Bearer KEY` (default $API_KEY; unset: no key)")
    api.add_argument("--model-name", help="the model id clients send (default $API_MODEL_NAME, else the "
                     "model folder's name)")
    api.add_argument("--queue-size", type=int, default=16, help="requests that may wait while one generates; "
                     "more are answered 503 (default 16)")
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
    return host, int(port), args.api_key or os.environ.get("API_KEY") or None


def run_uvicorn(app, engine, host: str, port: int) -> None:
    """uvicorn, with the engine closed as soon as shutdown starts: open requests then end at once (503, or an
    error event when streaming) instead of generating on through the graceful-shutdown wait."""
    import uvicorn

    class _Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            engine.close(timeout=0)
            await super().shutdown(sockets)

    _Server(uvicorn.Config(app, host=host, port=port, log_config=None, timeout_graceful_shutdown=5)).run()


def cmd_api(args) -> int:
    from .cli import open_session
    from .serve_engine import Engine

    host, port, api_key = listen_settings(args)
    config = load_config(args.config, overrides=parse_overrides(args.set))
    name = args.model_name or os.environ.get("API_MODEL_NAME") or Path(config.model.model_name_or_path).name
    session = open_session(config)  # the same model, tokenizer and settings as `ktchat chat`
    engine = Engine(session.model, session.tokenizer, config.generation, queue_size=args.queue_size)
    logger.info("serving %s on http://%s:%d/v1 (queue size %d%s)", name, host, port, args.queue_size,
                ", API key required" if api_key else "")
    run_uvicorn(Server(engine, name, api_key).app(), engine, host, port)
    return 0


def main(argv=None) -> int:
    """`python -m ktchat.serve CONFIG.yaml [options]` is `ktchat api CONFIG.yaml [options]`."""
    from .cli import main as cli_main

    return cli_main(["api", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
