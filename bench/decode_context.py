"""Decode speed at a given context, on bench/model_bench.py's random-weight checkpoint (V2-Lite-sized, rank-8
adapter): milliseconds per token at each context, the graph replay (GPU work + CPU experts) and the CPU experts
alone. The CPU-bandwidth floor (active routed-expert bytes / measured read bandwidth) goes beside it.

    python bench/decode_context.py --contexts 512 4096 --variants kt-exact kt-merged-bf16 kt-merged-int8 hf-peft
    python bench/decode_context.py --layers 2 --contexts 64 256 --variants kt-exact --new-tokens 8   # a quick look

Each variant runs in its own process; per context one greedy generate, its per-token times taken at every step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import model_bench  # noqa: E402
from ktchat.runtime import wanted_environment  # noqa: E402


def step_times(model, ids, new_tokens: int) -> tuple[list[float], list[int]]:
    """Seconds between consecutive generated tokens (greedy; generate syncs at every step for its stop check), and
    the tokens."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    stamps = []

    class Stamp(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, stopping_criteria=StoppingCriteriaList([Stamp()]))
    # the first step after prefill may capture a graph
    return [b - a for a, b in zip(stamps, stamps[1:])][1:], out[0, ids.shape[1]:].tolist()


def breakdown(model) -> dict:
    """The captured step replayed where the cache now stands (the context just decoded), and the CPU experts alone."""
    figures = model_bench.engine_figures(model)
    return {k: v for k, v in figures.items() if k in ("replay_ms", "experts_ms")}


def run_variant(name: str, root: Path, family: str, contexts: list[int], new_tokens: int) -> dict:
    import torch

    engine, kwargs = model_bench.variant(name)
    torch.cuda.synchronize()
    model_bench.import_engine(engine, family)
    load_s = model_bench.timed(lambda: globals().__setitem__("_model", model_bench.load(engine, root, kwargs)))
    model = globals().pop("_model")
    gen = torch.Generator().manual_seed(0)
    result = {"variant": name, "load_s": load_s, "contexts": {}}
    with torch.no_grad():
        model.generate(torch.randint(0, 100000, (1, 32), generator=gen).cuda(), max_new_tokens=4)  # warm-up
        for n in contexts:
            ids = torch.randint(0, 100000, (1, n), generator=gen).cuda()
            steps, _ = step_times(model, ids, new_tokens)
            row = {"decode_ms": 1000 * statistics.median(steps), "steps": len(steps), **breakdown(model)}
            result["contexts"][str(n)] = row
            print(name, n, json.dumps(row), file=sys.stderr, flush=True)
    result["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("/tmp/ktchat-bench"))
    ap.add_argument("--family", choices=list(model_bench.FAMILIES), default="deepseek_v2")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 4096])
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--variants", nargs="+", default=["kt-exact", "kt-merged-bf16", "kt-merged-int8", "hf-peft"])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--run", help=argparse.SUPPRESS)
    args = ap.parse_args()
    cfg = model_bench.model_config(args.family, args.layers)
    layers = cfg["num_hidden_layers"]
    root = args.out / f"{model_bench.FAMILIES[args.family][0]}-{layers}l-r8"
    if args.run:
        result = run_variant(args.run, root, args.family, args.contexts, args.new_tokens)
        (root / f"decode-{args.run}.json").write_text(json.dumps(result))
        return
    start = time.perf_counter()
    model_bench.write_checkpoint(root, args.family, layers, 8)
    print(f"checkpoint ready in {time.perf_counter() - start:.0f}s", flush=True)
    os.sync()
    bw = max(model_bench.cpu_bandwidth_gbs().values())
    moe_layers = layers - cfg.get("first_k_dense_replace", 0)
    active = moe_layers * cfg["num_experts_per_tok"] * 3 * cfg["hidden_size"] * cfg["moe_intermediate_size"]
    floor_ms = {"bf16": 1000 * active * 2 / (bw * 1e9), "int8": 1000 * active / (bw * 1e9)}
    rows = []
    for name in args.variants:
        model_bench.warm_page_cache(root / "model")
        cmd = [sys.executable, __file__, "--out", str(args.out), "--family", args.family, "--layers", str(layers),
               "--contexts", *map(str, args.contexts), "--new-tokens", str(args.new_tokens), "--run", name]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **wanted_environment()})
        if proc.returncode:
            print(f"{name}: failed\n{proc.stderr[-3000:]}", flush=True)
            continue
        rows.append(json.loads((root / f"decode-{name}.json").read_text()))
        print(json.dumps(rows[-1]), f"({time.perf_counter() - start:.0f}s)", flush=True)
    print(f"\nCPU read bandwidth {bw:.0f} GB/s; CPU-bandwidth decode floor: bf16 {floor_ms['bf16']:.1f} ms, "
          f"int8 {floor_ms['int8']:.1f} ms per token")
    keys = sorted({k for r in rows for k in r["contexts"]}, key=lambda k: (int(k.split("-")[0]), k))
    print("\n| variant | context | decode ms/token | tok/s | of the first context | graph replay ms | CPU experts ms "
          "| GPU part ms | floor ms |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        fmt = "int8" if "int8" in r["variant"] else "bf16"
        for k in keys:
            c = r["contexts"].get(k)
            if c is None:
                continue
            first = next(v for kk, v in r["contexts"].items() if kk.split("-")[1:] == k.split("-")[1:])
            gpu = f"{c['replay_ms'] - c['experts_ms']:.1f}" if "replay_ms" in c else "-"
            floor = f"{floor_ms[fmt]:.1f}" if r["variant"].startswith("kt") else "-"
            print(f"| {r['variant']} | {k} | {c['decode_ms']:.1f} | {1000 / c['decode_ms']:.1f} | "
                  f"{first['decode_ms'] / c['decode_ms']:.0%} | {c.get('replay_ms', float('nan')):.1f} | "
                  f"{c.get('experts_ms', float('nan')):.1f} | {gpu} | {floor} |")
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "family": args.family, "layers": layers,
                                         "cpu_read_bandwidth_gbs": bw, "floor_ms": floor_ms, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
