"""`ktchat api`'s HTTP side: /v1/models, /v1/chat/completions and /health over one generate.service.Service.

A thin layer: requests are validated into plain values by serve.protocol, generation and scheduling live in the
Service, and this file speaks HTTP/SSE with Starlette + uvicorn (imported inside, so `ktchat --help` stays instant).
A watcher per request reads the ASGI receive channel: a client that goes away, streaming or not, queued or
running, cancels its job at once, which frees the one worker for the next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import threading
import time
import uuid

from .protocol import GENERATION_FIELDS, ApiError, parse_request, read_json, sse

logger = logging.getLogger(__name__)


class Server:
    """The routes over one Service; every error leaves as OpenAI-style JSON."""

    def __init__(self, service, model_name: str, api_key: str | None = None):
        self.service, self.model_name, self.api_key = service, model_name, api_key
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
        self.service.close()  # cancel what runs or waits, end the worker

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

        return JSONResponse({"status": "ok", "model": self.model_name, **self.service.stats(),
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
            self.service.cancel(job)  # no-op once done; stops the job if this handler is cancelled (shutdown)
        message = {"role": "assistant", "content": result.text}
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": created, "model": self.model_name,
            "choices": [{"index": 0, "message": message, "finish_reason": result.finish_reason, "logprobs": None}],
            "usage": self._usage(prompt_tokens, result.completion_tokens), "system_fingerprint": None,
        })

    # --- plumbing ---
    def _submit(self, req: dict):
        """Encode, size and queue the request; returns (job, asyncio queue of its events, prompt length)."""
        from ..generate.service import BadRequest, QueueFull

        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def on_event(kind, payload):  # called from the worker thread
            if kind == "done" and payload.finish_reason == "cancelled":  # how far a cancelled job got, for the log
                logger.info("request cancelled after %d generated tokens", payload.completion_tokens)
            loop.call_soon_threadsafe(events.put_nowait, (kind, payload))

        try:
            job = self.service.prepare(req["messages"], on_event, **{k: req[k] for k in GENERATION_FIELDS})
            self.service.submit(job)
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
            self.service.cancel(job)

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
            return sse({"id": rid, "object": "chat.completion.chunk", "created": created,
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
                    yield sse(self._failure(kind, payload).body())
                break
            yield sse("[DONE]")
        finally:
            self.service.cancel(job)


def run_uvicorn(app, service, host: str, port: int, sock=None) -> None:
    """uvicorn, with the service closed as soon as shutdown starts: open requests then end at once (503, or an
    error event when streaming) instead of generating on through the graceful-shutdown wait. `sock`: a listening
    socket to serve on (`ktchat api` binds it before the load), else uvicorn binds host:port itself."""
    import uvicorn

    class _Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            service.close(timeout=0)
            await super().shutdown(sockets)

    config = uvicorn.Config(app, host=host, port=port, log_config=None, timeout_graceful_shutdown=5)
    _Server(config).run(sockets=None if sock is None else [sock])
