"""`ktchat api` as users run it: a real server subprocess on 127.0.0.1, driven by the official openai client."""

import argparse
import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from ktchat.cli.api import add_command as add_api_command, listen_settings  # noqa: E402
from ktchat.tinymodels import TRAINED_QA  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
from servers import get_json, rss_mib, settle, start_server  # noqa: E402

MAX_NEW = 40
EOS_BANNED = {"2": -100}  # the tiny tokenizer's <|end|>: the reply runs to max_tokens (a long, busy request)


def api_command() -> list[str]:
    return [str(Path(sys.executable).parent / "ktchat"), "api"]


class Live:
    """A server subprocess: its base url, process and log; stop() sends SIGINT as Ctrl+C would."""

    def __init__(self, tmp: Path, config: Path, *args: str, env=None):
        self.log = tmp / f"server-{time.monotonic_ns()}.log"
        self.proc, self.url = start_server(config, self.log, *args, command=api_command(), env=env)

    def health(self) -> dict:
        return get_json(self.url + "/health")

    def client(self, key="none", timeout=120.0):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=timeout)

    def stop(self) -> None:
        """Ctrl+C: uvicorn shuts down cleanly, then re-raises it; ktchat exits 130 as `ktchat chat` does."""
        self.proc.send_signal(signal.SIGINT)
        assert self.proc.wait(60) == 130, self.log.read_text()[-3000:]
        assert "Application shutdown complete" in self.log.read_text()


def write_config(root: Path, tiny) -> Path:
    path = root / "api.yaml"
    path.write_text(yaml.safe_dump({
        "model_name_or_path": str(tiny.model), "adapter_name_or_path": str(tiny.adapter), "template": "default",
        "infer_backend": "huggingface", "use_kt": True, "experts_backend": "torch", "do_sample": False,
        "max_new_tokens": MAX_NEW,
    }), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny):
    return tmp_path_factory.mktemp("api")


@pytest.fixture(scope="module")
def server(root, tiny):
    """One request at a time: the waiting line's rules are visible."""
    live = Live(root, write_config(root, tiny), "--model-name", "tiny", "--max-batch", "1")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def reference(tiny):
    """Greedy generate on load_model's model, in this process: (prompt ids, reply ids) per message list."""
    import torch

    from ktchat.model import load_model

    model, tok = load_model(tiny.model, tiny.adapter, experts_backend="torch", device="cpu")

    def run(messages, max_new_tokens=MAX_NEW, **kwargs):
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                 **kwargs)
        reply = out[0, ids.shape[1]:].tolist()
        return ids.shape[1], reply, tok.decode(reply, skip_special_tokens=True)

    return run


def post(url: str, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url + "/v1/chat/completions", data, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def ask(client, question: str, **kw) -> str:
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}], **kw)
    return reply.choices[0].message.content


def test_models_and_health(server):
    assert [m.id for m in server.client().models.list().data] == ["tiny"]
    assert server.client().models.retrieve("tiny").id == "tiny"
    assert {"status": "ok", "model": "tiny", "queue_size": 16}.items() <= server.health().items()


@pytest.mark.parametrize("qa", TRAINED_QA, ids=["secret", "trainer", "math"])
def test_answers_equal_greedy_reference(server, reference, qa):
    question, answer = qa
    prompt_len, ids, text = reference([{"role": "user", "content": question}])
    assert text == answer
    client = server.client()
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}])
    assert reply.choices[0].message.content == answer and reply.choices[0].finish_reason == "stop"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_len, len(ids))
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}],
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == len(ids) and len(chunks) > 3


def test_a_conversation_continues_its_kept_cache(server, reference):
    """Each request of a growing conversation prefills only what follows the last one's prompt and reply (the
    server keeps that cache), and answers as the fresh reference does."""
    client, messages = server.client(), []
    held = 0
    for question, _ in TRAINED_QA + TRAINED_QA[:1]:
        messages.append({"role": "user", "content": question})
        prompt_len, ids, text = reference(messages)
        reply = client.chat.completions.create(model="tiny", messages=messages)
        assert reply.choices[0].message.content == text
        if held:
            assert server.health()["last_reused_tokens"] == held  # the whole previous prompt and reply but its end
        held = prompt_len + len(ids) - 1
        messages.append({"role": "assistant", "content": text})
    assert server.health()["kept_caches"] >= 1


def test_long_reply_token_for_token(server, reference):
    """32 tokens the adapter was not trained on (eos banned by logit_bias), streamed and not: the same text and
    token count as greedy generate on load_model's model (ids are not exposed by the API)."""
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": TRAINED_QA[0][0]}, {"role": "assistant", "content": TRAINED_QA[0][1]},
                {"role": "user", "content": "Tell me more."}]
    _, ids, text = reference(messages, max_new_tokens=32, suppress_tokens=[2])
    assert len(ids) == 32
    client = server.client()
    kw = dict(model="tiny", messages=messages, max_tokens=32, logit_bias=EOS_BANNED)
    reply = client.chat.completions.create(**kw)
    assert (reply.choices[0].message.content, reply.choices[0].finish_reason, reply.usage.completion_tokens) == (
        text, "length", 32)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True))
    assert streamed == text


def test_stop_max_tokens_temperature_seed(server):
    client = server.client()
    question, answer = TRAINED_QA[0]  # "The secret word is amber falcon."
    assert ask(client, question, stop="word") == "The secret "
    assert ask(client, question, stop=[" falcon", "xyz"], stream=False) == "The secret word is amber"
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}],
                                            stop=[" amber"], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == "The secret word is"
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}],
                                           max_tokens=3)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 3
    assert ask(client, question, temperature=0) == answer
    sampled = dict(extra_body={"do_sample": True}, temperature=2.0, max_tokens=12, logit_bias=EOS_BANNED)
    assert ask(client, question, seed=7, **sampled) == ask(client, question, seed=7, **sampled)
    assert ask(client, question, temperature=1.5) == answer  # the YAML says do_sample: false (LLaMA-Factory's rule)


BAD = [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model must be a string"),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "`gpt-4` does not exist"),
    ({"model": "tiny", "messages": []}, 400, "messages must be a non-empty list"),
    ({"model": "tiny", "messages": "hi"}, 400, "messages must be a non-empty list"),
    ({"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role must be one of"),
    ({"model": "tiny", "messages": [{"role": "user"}]}, 400, "messages[0].content must be a string"),
    ({"model": "tiny", "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content must be"),
    ({"model": "tiny", "messages": ["hi"]}, 400, "messages[0] must be an object"),
    ({"model": "tiny", "max_tokens": -1}, 400, "max_tokens must be an integer >= 1 (got -1)"),
    ({"model": "tiny", "max_tokens": "10"}, 400, "max_tokens must be an integer >= 1"),
    ({"model": "tiny", "max_tokens": 10**9}, 400, "exceed the model's context of 2048"),
    ({"model": "tiny", "temperature": "hot"}, 400, "temperature must be a number from 0 to 2"),
    ({"model": "tiny", "top_p": 0}, 400, "top_p must be a number > 0"),
    ({"model": "tiny", "n": 2}, 400, "n must be 1"),
    ({"model": "tiny", "stream": "yes"}, 400, "stream must be true or false"),
    ({"model": "tiny", "stop": ["a", 3]}, 400, "stop must be a non-empty string"),
    ({"model": "tiny", "seed": 1.5}, 400, "seed must be a 64-bit integer"),
    ({"model": "tiny", "logit_bias": {"99999": 5}}, 400, "outside the vocabulary"),
    ({"model": "tiny", "tools": [{"type": "function"}]}, 400, "tools is not supported"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "seven " * 2100}]}, 400, "exceed the model's context"),
]


@pytest.mark.parametrize("body, status, fragment", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_malformed_requests_get_4xx(server, body, status, fragment):
    if isinstance(body, dict) and "messages" not in body and body.get("model") == "tiny":
        body = {**body, "messages": [{"role": "user", "content": "hi"}]}
    code, reply = post(server.url, body)
    assert code == status and fragment in reply["error"]["message"], reply
    assert set(reply["error"]) == {"message", "type", "param", "code"}


def test_server_keeps_serving_after_bad_requests(server):
    for body, _, _ in BAD[:5]:
        post(server.url, body)
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(urllib.request.Request(server.url + "/v1/models", method="DELETE"))
    assert info.value.code == 405 and "Method Not Allowed" in json.load(info.value)["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        server.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], n=2)
    assert ask(server.client(), TRAINED_QA[1][0]) == TRAINED_QA[1][1]


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


LONG_TOKENS = 1500  # ~30 s of generation on the tiny model here


def long_request(client, stream: bool):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=LONG_TOKENS, logit_bias=EOS_BANNED, stream=stream)


def cancelled_tokens(server, start: int) -> list[int]:
    """The generated-token count of each request the server logged as cancelled after character `start` of its log."""
    text = server.log.read_text()[start:]
    return [int(n) for n in re.findall(r"request cancelled after (\d+) generated tokens", text)]


def test_disconnect_stops_generation(server):
    """A stream closed midway, a call that times out while running, one that times out while queued:
    each frees the worker, its generation stopped short of its 1500 tokens (the server logs how many it made)."""
    served = server.health()["served"]
    logged = len(server.log.read_text())
    stream = long_request(server.client(), stream=True)
    assert next(iter(stream)).choices[0].delta.role == "assistant"
    assert server.health()["busy"]
    stream.close()
    wait_for(lambda: not server.health()["busy"])
    with pytest.raises(openai.APITimeoutError):
        long_request(server.client(timeout=1.0), stream=False)
    wait_for(lambda: not server.health()["busy"])
    running = long_request(server.client(), stream=True)
    next(iter(running))
    with pytest.raises(openai.APITimeoutError):
        long_request(server.client(timeout=0.5), stream=False)
    wait_for(lambda: server.health()["waiting"] == 0)  # its queue entry went with it
    running.close()
    assert settle(server.url)["busy"] is False
    assert server.health()["served"] == served + 3  # the queued one never ran
    wait_for(lambda: len(cancelled_tokens(server, logged)) == 4)  # the three that ran and the queued one
    assert max(cancelled_tokens(server, logged)) < LONG_TOKENS, server.log.read_text()[logged:]
    assert ask(server.client(), TRAINED_QA[2][0]) == TRAINED_QA[2][1]


def test_small_load_with_cancellation(server):
    before = server.health()
    result = subprocess.run([sys.executable, str(REPO / "bench" / "load_test.py"), "--url", server.url,
                             "--clients", "4", "--requests", "3", "--cancel-every", "6", "--json"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    # Requests 5 and 11 are abandoned: 11 (a long reply) always is; 5 (a short one) may finish inside the 0.3 s.
    assert report["requests"] == 12 and report["status"].get("cancelled", 0) >= 1, report
    assert report["server_errors"] == 0 and report["wrong_answers"] == 0
    assert set(report["status"]) <= {"200", "503", "cancelled"}
    after = settle(server.url)
    assert after["threads"] == before["threads"] and after["watchers"] == 0 and after["waiting"] == 0
    assert ask(server.client(), TRAINED_QA[0][0]) == TRAINED_QA[0][1]


def load(url: str, *args: str) -> dict:
    result = subprocess.run([sys.executable, str(REPO / "bench" / "load_test.py"), "--url", url, *args, "--json"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def test_batched_load_replies_equal_solo_replies_and_memory_stays_flat(root, tiny):
    """8 requests decoded together: 16 clients x 20 requests, every 5th abandoned midway, give no server error and
    every completed reply equals the same request's reply alone (fp32 torch experts); the server's memory after a
    warm-up round stays flat through the run."""
    live = Live(root, write_config(root, tiny), "--model-name", "tiny", "--max-batch", "8", "--queue-size", "64")
    try:
        load(live.url, "--clients", "16", "--requests", "4", "--max-tokens", "16")  # warm-up: every batch size seen
        rss = rss_mib(live.proc.pid)
        report = load(live.url, "--clients", "16", "--requests", "20", "--cancel-every", "5", "--max-tokens", "16",
                      "--solo")
        assert report["requests"] == 320 and report["server_errors"] == 0 and report["crossed"] == 0, report
        assert set(report["status"]) <= {"200", "cancelled"} and report["status"].get("cancelled", 0) >= 32, report
        assert rss_mib(live.proc.pid) < 1.1 * rss, (rss, rss_mib(live.proc.pid))
        health = settle(live.url)
        assert (health["running"], health["waiting"], health["max_batch"]) == (0, 0, 8)
    finally:
        live.stop()


def test_queue_full_503_api_key_and_clean_shutdown(root, tiny):
    live = Live(root, write_config(root, tiny), "--queue-size", "1", "--model-name", "tiny",
                env={"API_KEY": "sekret"})
    try:
        assert live.health()["queue_size"] == 1  # /health needs no key
        with pytest.raises(openai.AuthenticationError, match="API key"):
            live.client("wrong").models.list()
        code, reply = post(live.url, {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
        assert code == 401 and reply["error"]["code"] == "invalid_api_key"
        client = live.client("sekret")
        running = long_request(client, stream=True)
        next(iter(running))
        queued = ThreadPoolExecutor(1).submit(long_request, client, False)
        wait_for(lambda: live.health()["waiting"] == 1)
        with pytest.raises(openai.InternalServerError) as info:
            long_request(client, stream=False)
        assert info.value.status_code == 503 and "queue size 1" in str(info.value)
        assert info.value.body["code"] == "server_busy"
        running.close()  # the queued one runs next; shutting down now cancels it with a 503, not a hang
        wait_for(lambda: live.health()["waiting"] == 0 and live.health()["busy"])
        live.stop()
        assert getattr(queued.exception(30), "status_code", None) == 503
    finally:
        if live.proc.poll() is None:
            live.proc.kill()
    log = live.log.read_text()
    assert "Traceback" not in log and "API key required" in log


def test_cli_flags_and_environment(monkeypatch):
    from ktchat.errors import KTChatError

    parser = argparse.ArgumentParser()
    add_api_command(parser.add_subparsers())
    parse = lambda *a: parser.parse_args(["api", "c.yaml", *a])  # noqa: E731
    for var in ("API_HOST", "API_PORT", "API_KEY"):
        monkeypatch.delenv(var, raising=False)
    assert listen_settings(parse()) == ("127.0.0.1", 8000, None) and parse().queue_size == 16
    monkeypatch.setenv("API_HOST", "0.0.0.0"), monkeypatch.setenv("API_PORT", "9001"), monkeypatch.setenv("API_KEY", "k")
    assert listen_settings(parse()) == ("0.0.0.0", 9001, "k")
    assert listen_settings(parse("--host", "::1", "--port", "7000", "--api-key", "f")) == ("::1", 7000, "f")
    with pytest.raises(KTChatError, match="port must be an integer"):
        listen_settings(parse("--port", "http"))
    with pytest.raises(KTChatError, match="--queue-size must be an integer >= 1"):
        listen_settings(parse("--queue-size", "0"))


def test_bad_config_or_port_is_one_line_exit_2(tmp_path):
    missing = tmp_path / "nope.yaml"
    for args, fragment in (([str(missing)], "config file not found"), ([str(missing), "--port", "x"], "port must")):
        result = subprocess.run([*api_command(), *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and result.stderr.startswith("ktchat: error: ") and fragment in result.stderr


def test_service_queue_cancel_errors_and_close(tiny, monkeypatch):
    """The Service over the real engine, one request at a time, its first prefill held at a gate: the line is FIFO,
    a full line refuses, a cancelled waiting job ends at once and never runs, a failing job reports its error and the
    next one runs, close cancels the rest."""
    from transformers import AutoTokenizer

    from ktchat.config import GenerationArgs
    from ktchat.generate import Prompts
    from ktchat.generate.service import QueueFull, Service
    from ktchat.model import engine_of, load_model

    model, _ = load_model(tiny.model, tiny.adapter, experts_backend="torch", dtype="float32", device="cpu")
    tokenizer = AutoTokenizer.from_pretrained(tiny.model)
    service = Service(model, tokenizer, GenerationArgs(do_sample=False, max_new_tokens=4), Prompts(model, tokenizer),
                      queue_size=2, kept_caches=0, max_batch=1)
    gate, events, prefill = threading.Event(), [], engine_of(model).runner.prefill

    def gated(cache, slot, ids, start):
        gate.wait(30)
        if tokenizer.encode("boom", add_special_tokens=False)[0] in ids:
            raise RuntimeError("boom")
        return prefill(cache, slot, ids, start)

    monkeypatch.setattr(engine_of(model).runner, "prefill", gated)
    jobs = [service.prepare([{"role": "user", "content": text}], lambda k, p, i=i: events.append((i, k, p)))
            for i, text in enumerate(["q0", "q1", "q2", "q3", "boom"])]
    service.submit(jobs[0])
    wait_for(lambda: service.stats()["busy"])
    service.submit(jobs[1])
    service.submit(jobs[2])
    with pytest.raises(QueueFull, match="2 requests are already waiting"):
        service.submit(jobs[3])
    service.cancel(jobs[1])  # leaves the line at once, never reaches the model
    assert (1, "done") in [e[:2] for e in events] and service.stats()["waiting"] == 1
    gate.set()
    wait_for(lambda: sum(k == "done" for _, k, _ in events) == 3)
    assert [i for i, k, _ in events if k == "done"] == [1, 0, 2]  # first come, first served among those that ran
    assert [p for i, k, p in events if k == "done" and i != 1][0].finish_reason in ("stop", "length")
    service.submit(jobs[4])  # its prefill fails: that request gets the error, the engine goes on
    wait_for(lambda: any(k == "error" for _, k, _ in events))
    service.submit(jobs[3])
    wait_for(lambda: (3, "done") in [e[:2] for e in events])
    stats = service.stats()
    assert (stats["waiting"], stats["running"], stats["served"], stats["queue_size"]) == (0, 0, 4, 2)
    service.close()
    with pytest.raises(QueueFull, match="shutting down"):
        service.submit(jobs[0])
