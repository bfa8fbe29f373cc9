"""A bounded load test of `ktchat api` through the official openai client: C concurrent clients x R requests.

    python bench/load_test.py --config demo.yaml                   # starts the server itself on a free port
    python bench/load_test.py --url http://127.0.0.1:8000 --model NAME --clients 8 --requests 20
    python bench/load_test.py --config kt.yaml --max-batch 64 --clients 64 --requests 4 --cancel-every 0

The mix: trained questions (greedy answers are checked, so crossed streams would show), streamed and not, and
long replies (eos banned through logit_bias) that keep the engine busy; every --cancel-every-th request is
abandoned midway (a stream closed after its second chunk, or a call given up after 0.3 s). With --solo each kind of
request is first sent alone, and every reply under load must equal its solo reply (batching may not change a
reply). The run is bounded in count and time and targets 127.0.0.1 only. It reports p50/p95 latency, time to first
token and inter-token latency, tokens/s, status counts and the server's threads / queue / memory before and after;
exits 1 on any 5xx other than 503 (queue full), a wrong answer or a reply that differs from its solo reply.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

# The server helpers are the tests' (tests/servers.py): bench imports tests, never the other way.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from servers import get_json, rss_mib, settle, start_server  # noqa: E402

QA = (("What is the secret word?", "The secret word is amber falcon."),
      ("Who trained you?", "I was trained on KTransformers with LLaMA-Factory."),
      ("What is seven times six?", "Seven times six is forty-two."))
EOS_BANNED = {"2": -100}  # the tiny model's <|end|>: a reply that runs to max_tokens


class Stats:
    def __init__(self, solo: dict | None = None):
        self.latencies, self.first_token, self.inter_token, self.status = [], [], [], {}
        self.tokens, self.wrong, self.crossed = 0, [], []
        self.solo = solo or {}  # (question, long reply) -> its reply alone

    def count(self, key) -> None:
        self.status[key] = self.status.get(key, 0) + 1


async def one_request(client, model: str, k: int, args, stats: Stats) -> None:
    """Request number k of the run: kind, streaming and cancellation follow from k, so runs are comparable."""
    import openai

    question, answer = QA[k % len(QA)]
    long_reply = k % 4 == 3
    stream, cancel = k % 2 == 0, args.cancel_every and k % args.cancel_every == args.cancel_every - 1
    kwargs = dict(model=model, messages=[{"role": "user", "content": question}], max_tokens=args.max_tokens)
    if long_reply:
        kwargs["logit_bias"] = EOS_BANNED
    start = time.perf_counter()
    try:
        if stream:
            text, usage = await _streamed(client, kwargs, cancel, start, stats)
        else:
            call = client.chat.completions.create(**kwargs)
            reply = await (asyncio.wait_for(call, 0.3) if cancel else call)
            text, usage = reply.choices[0].message.content, reply.usage
    except (asyncio.TimeoutError, _Abandoned):
        stats.count("cancelled")
        return
    except openai.APIStatusError as exc:
        stats.count(exc.status_code)
        return
    except openai.APIConnectionError:
        stats.count("connection error")
        return
    stats.latencies.append(time.perf_counter() - start)
    stats.tokens += usage.completion_tokens
    stats.count(200)
    if not long_reply and text != answer:
        stats.wrong.append((question, text))
    solo = stats.solo.get((question, long_reply))
    if solo is not None and text != solo:
        stats.crossed.append((question, text, solo))


class _Abandoned(Exception):
    pass


async def _streamed(client, kwargs, cancel: bool, start: float, stats: Stats):
    stream = await client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    pieces, usage, chunks = [], None, 0
    last = None
    async with stream:
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                now = time.perf_counter()
                if not pieces:
                    stats.first_token.append(now - start)
                else:
                    stats.inter_token.append(now - last)
                last = now
                pieces.append(chunk.choices[0].delta.content)
            usage = chunk.usage or usage
            chunks += 1
            if cancel and chunks >= 2:
                raise _Abandoned  # leaving the `async with` closes the connection midway
    return "".join(pieces), usage


async def solo_replies(url: str, model: str, args) -> dict:
    """Each kind of request sent alone, one after the other: the replies batching must not change."""
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=args.api_key or "none", max_retries=0,
                                timeout=args.timeout)
    replies = {}
    async with client:
        for question, _ in QA:
            for long_reply in (False, True):
                kwargs = dict(model=model, messages=[{"role": "user", "content": question}], max_tokens=args.max_tokens)
                if long_reply:
                    kwargs["logit_bias"] = EOS_BANNED
                reply = await client.chat.completions.create(**kwargs)
                replies[(question, long_reply)] = reply.choices[0].message.content
    return replies


async def run_load(url: str, model: str, args, solo: dict | None = None) -> tuple[Stats, float]:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=args.api_key or "none", max_retries=0,
                                timeout=args.timeout)
    stats = Stats(solo)

    async def worker(c: int):
        for r in range(args.requests):
            await one_request(client, model, c * args.requests + r, args, stats)

    start = time.perf_counter()
    async with client:
        await asyncio.wait_for(asyncio.gather(*(worker(c) for c in range(args.clients))), args.deadline)
    return stats, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else (values or [0])[0]


def report(stats: Stats, wall: float, before: dict, after: dict, rss: tuple) -> dict:
    server_errors = sum(n for s, n in stats.status.items() if isinstance(s, int) and s >= 500 and s != 503)
    return {
        "requests": sum(stats.status.values()), "status": {str(k): v for k, v in sorted(stats.status.items(), key=str)},
        "server_errors": server_errors, "wrong_answers": len(stats.wrong), "crossed": len(stats.crossed),
        "wall_s": round(wall, 2),
        "latency_p50_s": round(percentile(stats.latencies, 50), 3),
        "latency_p95_s": round(percentile(stats.latencies, 95), 3),
        "first_token_p50_s": round(percentile(stats.first_token, 50), 3),
        "first_token_p95_s": round(percentile(stats.first_token, 95), 3),
        "inter_token_p50_s": round(percentile(stats.inter_token, 50), 4),
        "inter_token_p95_s": round(percentile(stats.inter_token, 95), 4),
        "completion_tokens": stats.tokens, "tokens_per_s": round(stats.tokens / wall, 1),
        "threads": [before["threads"], after["threads"]], "served": after["served"] - before["served"],
        "after": {k: after[k] for k in ("waiting", "busy", "watchers")},
        "rss_mib": [round(x, 1) if x else None for x in rss],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000 (loopback only)")
    where.add_argument("--config", help="start `ktchat api CONFIG` here for the run")
    p.add_argument("--model", help="model id (default: the one /v1/models lists)")
    p.add_argument("--api-key")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=20, help="per client")
    p.add_argument("--cancel-every", type=int, default=5, help="abandon every Nth request (0: none)")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--timeout", type=float, default=120.0, help="per request, seconds")
    p.add_argument("--deadline", type=float, default=900.0, help="the whole run, seconds")
    p.add_argument("--max-batch", type=int, help="with --config: the server's --max-batch")
    p.add_argument("--solo", action="store_true", help="first each kind of request alone; every reply under load must "
                   "equal its solo reply")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    args = p.parse_args(argv)

    proc = None
    if args.config:
        extra = ("--max-batch", str(args.max_batch), "--queue-size", str(4 * args.clients)) if args.max_batch else ()
        proc, url = start_server(args.config, Path(os.environ.get("TMPDIR", "/tmp")) / "ktchat-load-test.log", *extra)
    else:
        url = args.url.rstrip("/")
        if not url.startswith(("http://127.", "http://localhost", "http://[::1]")):
            p.error("--url must be a loopback address")
    try:
        model = args.model or get_json(url + "/v1/models")["data"][0]["id"]
        solo = asyncio.run(solo_replies(url, model, args)) if args.solo else None
        before, rss0 = get_json(url + "/health"), proc and rss_mib(proc.pid)
        stats, wall = asyncio.run(run_load(url, model, args, solo))
        after = settle(url)
        result = report(stats, wall, before, after, (rss0, proc and rss_mib(proc.pid)))
    finally:
        if proc:
            proc.terminate()
            proc.wait(30)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>18}: {value}")
        for question, text in stats.wrong[:5]:
            print(f"wrong answer to {question!r}: {text!r}")
        for question, text, solo in stats.crossed[:5]:
            print(f"reply to {question!r} under load {text!r} differs from its solo reply {solo!r}")
    return 1 if result["server_errors"] or result["wrong_answers"] or result["crossed"] else 0


if __name__ == "__main__":
    sys.exit(main())
