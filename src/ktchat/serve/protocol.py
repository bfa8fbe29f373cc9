"""The OpenAI chat-completions protocol as plain values: every request field ktchat reads is checked here
(errors name the field, OpenAI-style JSON, never a 5xx), with no HTTP framework and no model in sight."""

from __future__ import annotations

import json

MAX_BODY_BYTES = 4 << 20
MAX_STOP = 4  # as OpenAI
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


def _max_tokens(body: dict):
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return _optional(body, key, lambda v: _is_int(v) and v >= 1, "an integer >= 1")


def _logit_bias(body: dict) -> dict[int, float]:
    bias = _optional(body, "logit_bias", lambda v: isinstance(v, dict) and all(
        k.isdigit() and _is_number(b) and -100 <= b <= 100 for k, b in v.items()), "{token id: -100 to 100}")
    return {int(k): float(v) for k, v in (bias or {}).items()}


# The generation settings a request may set, each read and checked from the body: what the engine's prepare takes
_GENERATION = {
    "max_tokens": _max_tokens,
    "temperature": lambda body: _optional(body, "temperature", lambda v: _is_number(v) and 0 <= v <= 2,
                                          "a number from 0 to 2"),
    "top_p": lambda body: _optional(body, "top_p", lambda v: _is_number(v) and 0 < v <= 1, "a number > 0 and <= 1"),
    "do_sample": lambda body: _optional(body, "do_sample", lambda v: isinstance(v, bool), "true or false"),
    "seed": lambda body: _optional(body, "seed", lambda v: _is_int(v) and -(2**63) <= v < 2**64, "a 64-bit integer"),
    "stop": lambda body: _stop(body["stop"]) if body.get("stop") is not None else (),
    "logit_bias": _logit_bias,
}
GENERATION_FIELDS = tuple(_GENERATION)


def parse_request(body: dict, model_name: str) -> dict:
    """Check every field we read; returns plain values: messages, stream, include_usage and GENERATION_FIELDS.
    Fields we do not know are ignored, as OpenAI clients send extras; fields we know but cannot honour are refused
    rather than silently dropped."""
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
    generation = {key: read(body) for key, read in _GENERATION.items()}
    stream_options = _optional(body, "stream_options", lambda v: isinstance(v, dict), "an object")
    return {
        "messages": parse_messages(body.get("messages")),
        "stream": bool(_optional(body, "stream", lambda v: isinstance(v, bool), "true or false")),
        "include_usage": bool((stream_options or {}).get("include_usage")),
        **generation,
    }


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


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, separators=(',', ':'))}\n\n"
