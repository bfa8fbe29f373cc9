"""Time to first token, turn by turn, of a scripted chat sent to `ktchat api` by the openai client (streaming), on
bench/model_bench.py's random-weight checkpoint and rank-8 adapter: a server that keeps the conversation's cache
(the default) and one started with --kept-caches 0 (every request prefills the whole conversation, as before).

    python bench/api_turns.py --layers 27 --turns 10 --turn-tokens 300      # V2-Lite size, on the GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import chat_turns  # noqa: E402
import model_bench  # noqa: E402


def wait_healthy(url: str, proc, log: Path, timeout: float = 600.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"no /health within {timeout:.0f}s:\n{log.read_text()[-3000:]}")


def conversation(client, texts: list[str], new_tokens: int) -> list[dict]:
    messages, rows = [], []
    for text in texts:
        messages.append({"role": "user", "content": text})
        start = time.perf_counter()
        first, reply, usage = None, [], None
        stream = client.chat.completions.create(model="bench", messages=messages, stream=True, max_tokens=new_tokens,
                                                stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            piece = chunk.choices[0].delta.content if chunk.choices else None
            if piece:
                if first is None and piece.strip():
                    first = time.perf_counter() - start
                reply.append(piece)
        rows.append({"prompt_tokens": usage.prompt_tokens if usage else None, "ttft_s": first,
                     "turn_s": time.perf_counter() - start})
        messages.append({"role": "assistant", "content": "".join(reply)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("/tmp/ktchat-bench"))
    ap.add_argument("--layers", type=int)
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--turn-tokens", type=int, default=300)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--kept", type=int, nargs="+", default=[4, 0], help="--kept-caches of each server run")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import openai

    cfg = model_bench.model_config("deepseek_v2", args.layers)
    root = args.out / f"v2lite-{cfg['num_hidden_layers']}l-r8"
    model_bench.write_checkpoint(root, "deepseek_v2", cfg["num_hidden_layers"], 8)
    tok_config = root / "model" / "tokenizer_config.json"  # the server renders prompts with the tokenizer's template
    tok_config.write_text(json.dumps(dict(json.loads(tok_config.read_text()), chat_template=chat_turns.TEMPLATE)))
    config = root / "api.yaml"
    config.write_text(yaml.safe_dump({
        "model_name_or_path": str(root / "model"), "adapter_name_or_path": str(root / "adapter"),
        "infer_backend": "huggingface", "use_kt": True, "experts_backend": "kt", "moe_lora": "exact",
        "kt_method": "bf16", "infer_dtype": "bfloat16", "do_sample": False, "max_new_tokens": args.new_tokens}))
    texts = chat_turns.turns(args.turns, args.turn_tokens, cfg["vocab_size"])
    result = {"command": " ".join(sys.argv), "layers": cfg["num_hidden_layers"], "runs": {}}
    url = f"http://127.0.0.1:{args.port}"
    for kept in args.kept:
        log = args.out / f"api-{kept}.log"
        with open(log, "w") as fh:
            proc = subprocess.Popen([sys.executable, "-m", "ktchat.cli", "api", str(config), "--port", str(args.port),
                                     "--model-name", "bench", "--kept-caches", str(kept)],
                                    stdout=fh, stderr=subprocess.STDOUT, env=os.environ.copy())
        try:
            wait_healthy(url, proc, log)
            client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
            conversation(client, [texts[0][:50]], args.new_tokens)  # warm-up: graph capture, first kernels
            label = f"ktchat api, --kept-caches {kept}"
            print(label, flush=True)
            result["runs"][label] = rows = conversation(client, texts, args.new_tokens)
            first, last = rows[0]["ttft_s"], rows[-1]["ttft_s"]
            print(f"{label}: turn 1 {first:.3f} s, turn {len(rows)} {last:.3f} s ({last / first:.2f}x); median turn "
                  f"{statistics.median(r['turn_s'] for r in rows):.3f} s", flush=True)
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
        result["runs"].setdefault("logs", {})[str(kept)] = log.read_text()[-2000:]
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
