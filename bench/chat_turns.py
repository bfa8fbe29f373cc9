"""Time to first token, turn by turn, of a scripted chat through `ktchat chat`'s ChatSession: with the kept KV
cache (each turn prefills only itself) and without it (each turn prefills the whole conversation, as before).
The bench's random-weight model and rank-8 adapter (bench/model_bench.py writes them); prompts are random words.

    python bench/chat_turns.py --layers 27 --turns 10 --turn-tokens 300       # V2-Lite size, on the GPU machine
    python bench/chat_turns.py --layers 2 --turns 4 --turn-tokens 100 --device cpu --variants kt-exact
    python bench/chat_turns.py --family qwen3_5_moe_text --thinking    # a template that rewrites the last prompt's end
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import model_bench  # noqa: E402

TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} <eos> {% endfor %}"
            "{% if add_generation_prompt %}assistant : {% endif %}")
# As Qwen's templates drop earlier turns' reasoning: the generation prompt opens a thinking note that the history, once
# the reply is in it, renders without (so each prompt rewrites the end of the one before)
THINKING_TEMPLATE = TEMPLATE.replace("assistant : {% endif %}", "assistant : think w1 w2 w3 : {% endif %}")


def turns(n: int, words: int, vocab: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(vocab - 2)}" for _ in range(words)) for _ in range(n)]


def run(session, texts: list[str]) -> list[dict]:
    rows = []
    for text in texts:
        prompt = len(session.prompt_ids(text))
        start = time.perf_counter()
        first = any_piece = None
        for piece in session.stream(text):
            any_piece = any_piece or time.perf_counter() - start
            if first is None and piece.strip():
                first = time.perf_counter() - start
        first = first or any_piece  # a reply of blanks only (random weights): its first piece
        rows.append({"prompt_tokens": prompt, "ttft_s": first, "turn_s": time.perf_counter() - start,
                     "reused": session.engine.last_reused})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("/tmp/ktchat-bench"))
    ap.add_argument("--family", choices=list(model_bench.FAMILIES), default="deepseek_v2")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--turn-tokens", type=int, default=300)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--thinking", action="store_true", help="a template whose prompts rewrite the previous one's end")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--variants", nargs="+", default=["kt-exact"], help="model_bench variants (ktchat ones)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    cfg = model_bench.model_config(args.family, args.layers)
    root = args.out / f"{model_bench.FAMILIES[args.family][0]}-{cfg['num_hidden_layers']}l-r8"
    model_bench.write_checkpoint(root, args.family, cfg["num_hidden_layers"], 8)

    from transformers import PreTrainedTokenizerFast

    from ktchat.config import GenerationArgs
    from ktchat.generate import ChatSession, Prompts

    # the bench's word-level tokenizer as it is: transformers 5.2x's AutoTokenizer would build Qwen3.5's own BPE
    # tokenizer around it for that family, which encodes the bench's words as nothing
    tok = PreTrainedTokenizerFast.from_pretrained(root / "model")
    tok.chat_template = THINKING_TEMPLATE if args.thinking else TEMPLATE
    texts = turns(args.turns, args.turn_tokens, cfg["vocab_size"])
    generation = GenerationArgs(do_sample=False, max_new_tokens=args.new_tokens)
    result = {"command": " ".join(sys.argv), "family": args.family, "layers": cfg["num_hidden_layers"], "runs": {}}
    for name in args.variants:
        engine, kwargs = model_bench.variant(name)
        model = model_bench.load(engine, root, dict(kwargs, device=args.device) if args.device == "cpu" else kwargs)
        for kept in (True, False):
            session = ChatSession(model, tok, generation, Prompts(model, tok))
            session.engine.keep(1 if kept else 0)
            session.reply(texts[0][:50])  # warm-up (graph capture, first kernels), then a fresh conversation
            session.clear()
            label = f"{name} {'kept cache' if kept else 'whole conversation'}"
            print(label, flush=True)
            result["runs"][label] = rows = run(session, texts)
            first, last = rows[0]["ttft_s"], rows[-1]["ttft_s"]
            median = statistics.median(r["turn_s"] for r in rows)
            print(f"{label}: turn 1 {first:.3f} s, turn {len(rows)} {last:.3f} s ({last / first:.2f}x); "
                  f"median turn {median:.3f} s", flush=True)
        del model
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
