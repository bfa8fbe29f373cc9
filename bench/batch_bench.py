"""Aggregate decode speed of many sequences at once (continuous batching) on bench/model_bench.py's random-weight
checkpoint, beside the step floor: the bytes of the union of experts a step's tokens route to, over the CPU's read
bandwidth (and, for steps that stream the experts to the GPU, all experts over the host-to-GPU link).

    python bench/batch_bench.py --family deepseek_v2 --batches 1 4 16 64 256 --variant kt-exact
    python bench/batch_bench.py --layers 2 --batches 1 4 --new-tokens 8 --device cpu --variant kt-merged-bf16

One process: the model loads once, then for each batch size B sequences of random prompts decode together; a step's
time is the interval between consecutive decode steps at full batch (sampling included), its median reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import model_bench  # noqa: E402


def union_experts(num_experts: int, top_k: int, tokens: int) -> float:
    """Expected distinct experts B tokens route to, each picking top_k of num_experts uniformly."""
    return num_experts * (1 - (1 - top_k / num_experts) ** tokens)


def floor_tok_s(cfg: dict, batch: int, bandwidth_gbs: float, dtype_bytes: int = 2) -> float:
    layers = cfg["num_hidden_layers"] - cfg.get("first_k_dense_replace", 0)
    experts = cfg.get("n_routed_experts") or cfg["num_experts"]
    per_expert = 3 * cfg["hidden_size"] * cfg["moe_intermediate_size"] * dtype_bytes
    step_bytes = layers * union_experts(experts, cfg["num_experts_per_tok"], batch) * per_expert
    return batch / (step_bytes / (bandwidth_gbs * 1e9))


def step_times(engine, batch: int, prompt: int, new_tokens: int, vocab: int, seed: int) -> list[float]:
    """`new_tokens` intervals between consecutive decode steps that ran all `batch` sequences. The engine lets one
    prompt chunk join between two decode steps, so the first sequence decodes about `batch` tokens before the last
    one joins: each may run that much longer, and all are cancelled once the intervals are measured."""
    import torch

    from ktchat.engine import SamplingParams

    stamps, sequences = [], []
    decode = engine.runner.decode

    def timed(cache, rows, *args, **kwargs):
        stamps.append((time.perf_counter(), len(rows)))
        if sum(n == batch for _, n in stamps) > new_tokens:
            for sequence in sequences:
                sequence.cancel()  # at the next step boundary
        return decode(cache, rows, *args, **kwargs)

    engine.runner.decode = timed  # the bench's own instrument on its own runner
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, vocab - 2, (prompt,), generator=gen).tolist() for _ in range(batch)]
    joining = batch * -(-prompt // engine.prefill_chunk)  # decode steps while the others' prompts go in
    params = SamplingParams(max_new_tokens=new_tokens + joining + 1, min_new_tokens=new_tokens + joining + 1)
    try:
        sequences.extend(engine.submit(p, params) for p in prompts)
        for sequence in sequences:
            sequence.wait()
    finally:
        engine.runner.decode = decode
    full = [t for t, rows in stamps if rows == batch]
    if len(full) < 2:
        raise SystemExit(f"B={batch}: the batch never ran full ({max(n for _, n in stamps)} at most)")
    return [b - a for a, b in zip(full, full[1:])][:new_tokens]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("/tmp/ktchat-bench"))
    ap.add_argument("--family", choices=list(model_bench.FAMILIES), default="deepseek_v2")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--variant", default="kt-exact")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    cfg = model_bench.model_config(args.family, args.layers)
    root = args.out / f"{model_bench.FAMILIES[args.family][0]}-{cfg['num_hidden_layers']}l-r8"
    model_bench.write_checkpoint(root, args.family, cfg["num_hidden_layers"], 8)
    bandwidth = max(model_bench.cpu_bandwidth_gbs().values())
    engine_name, kwargs = model_bench.variant(args.variant)
    model = model_bench.load(engine_name, root, dict(kwargs, device=args.device) if args.device == "cpu" else kwargs)
    from ktchat.model import engine_of

    engine = engine_of(model)
    engine.keep(0, max_batch=max(args.batches))
    step_times(engine, 1, 16, 4, cfg["vocab_size"], seed=0)  # warm-up
    rows, single = [], None
    for batch in args.batches:
        steps = step_times(engine, batch, args.prompt, args.new_tokens, cfg["vocab_size"], seed=batch)
        tok_s = batch / statistics.median(steps)
        single = single or tok_s
        floor = floor_tok_s(cfg, batch, bandwidth, 1 if "int8" in args.variant else 2)
        rows.append({"batch": batch, "tok_s": tok_s, "step_ms": 1000 * statistics.median(steps), "steps": len(steps),
                     "vs_single": tok_s / single, "floor_tok_s": floor, "of_floor": tok_s / floor,
                     "graph": bool(engine.runner._captured), "experts_touched": union_experts(
                         cfg.get("n_routed_experts") or cfg["num_experts"], cfg["num_experts_per_tok"], batch)})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\nCPU read bandwidth {bandwidth:.0f} GB/s; {args.family}, {cfg['num_hidden_layers']} layers, {args.variant}")
    print("| batch | aggregate tok/s | step ms | vs one sequence | step floor tok/s | of floor | experts a layer |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['tok_s']:.1f} | {r['step_ms']:.1f} | {r['vs_single']:.1f}x | {r['floor_tok_s']:.1f} "
              f"| {r['of_floor']:.0%} | {r['experts_touched']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "family": args.family, "config": cfg,
                                         "cpu_read_bandwidth_gbs": bandwidth, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
