"""Times one MoE layer at DeepSeek-V2-Lite shape (E=64, H=2048, I=1408, top-6, expert LoRA rank 8) on the CPU:
kt_kernel exact / merged bf16 / merged int8 against the torch backend with the LoRA unmerged.

    python bench/moe_layer.py --threads 8 --repeats 30

Needs about 4.5 GB of memory: the 1.1 GB of bf16 expert weights, plus one backend at a time (base copy + packed).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time

# Spinning OpenMP threads wreck torch timings on small VMs (8 ms instead of 0.24 ms for a mat-vec).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from ktchat.adapter import PROJS, StackedLoRA  # noqa: E402
from ktchat.experts import ExpertsSpec, TorchExperts  # noqa: E402
from ktchat.experts.kt_backend import KTExperts, default_threads, unavailable_reason  # noqa: E402

E, H, I, K, R = 64, 2048, 1408, 6, 8
VARIANTS = [  # label, backend class, keyword arguments
    ("torch bf16 + LoRA (unmerged)", TorchExperts, {}),
    ("kt exact bf16 (SFT kernel + LoRA)", KTExperts, {"moe_lora": "exact", "method": "bf16"}),
    ("kt merged bf16", KTExperts, {"moe_lora": "merged", "method": "bf16"}),
    ("kt merged int8", KTExperts, {"moe_lora": "merged", "method": "int8"}),
]


def random_layer(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sp = ExpertsSpec(1, E, K, H, I, torch.bfloat16)
    weights = {p: (torch.randn((E, *sp.weight_shape(p)), generator=g) / sp.weight_shape(p)[1] ** 0.5).bfloat16()
               for p in PROJS}
    lora = {}
    for p in PROJS:
        fan_out, fan_in = sp.weight_shape(p)
        a = (torch.randn((E, R, fan_in), generator=g) / fan_in**0.5).bfloat16()
        b = (torch.randn((E, fan_out, R), generator=g) * 0.01).bfloat16()
        lora[p] = StackedLoRA(a, b, 2.0)
    return sp, weights, lora


def build(cls, sp, weights, lora, kw):
    backend = cls(sp, **kw)
    for p, w in weights.items():
        for e in range(E):
            backend.load_weight(p, e, w[e], f"bench expert {e} {p}")
    backend.set_lora(lora)
    backend.finalize()
    backend.prepare()  # pack / quantize / fold now, so the build time covers it
    return backend


def median_ms(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help=f"kt worker threads (default {default_threads()})")
    ap.add_argument("--torch-threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--prefill", type=int, default=128)
    args = ap.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    sp, weights, lora = random_layer()
    g = torch.Generator().manual_seed(1)
    cases = {}
    for t in (1, args.prefill):
        x = torch.randn((t, H), generator=g).bfloat16()
        ids = torch.rand((t, E), generator=g).topk(K, dim=1).indices
        w = torch.softmax(torch.randn((t, K), generator=g), dim=1)
        cases[t] = (x, ids, w)
    rows = []
    for label, cls, kw in VARIANTS:
        if cls is KTExperts:
            reason = unavailable_reason(kw["moe_lora"], kw["method"])
            if reason:
                rows.append((label, None, None, reason))
                continue
            kw = {**kw, "num_threads": args.threads}
        t0 = time.perf_counter()
        backend = build(cls, sp, weights, lora, kw)
        load_s = time.perf_counter() - t0
        times = [median_ms(lambda c=c: backend.forward(*c), args.warmup, args.repeats) for c in cases.values()]
        rows.append((label, *times, f"built in {load_s:.1f} s"))
        del backend
        gc.collect()
    kt_threads = args.threads or default_threads()
    print(f"one MoE layer E={E} H={H} I={I} top-{K}, LoRA r={R}; median of {args.repeats} runs after "
          f"{args.warmup} warm-up; torch threads {torch.get_num_threads()}, kt threads {kt_threads}")
    base = rows[0]
    print(f"| variant | 1 token ms | vs torch | {args.prefill} tokens ms | vs torch | note |")
    print("|---|---|---|---|---|---|")
    for label, dec, pre, note in rows:
        if dec is None:
            print(f"| {label} | - | - | - | - | {note} |")
            continue
        print(f"| {label} | {dec:.2f} | {base[1] / dec:.2f}x | {pre:.1f} | {base[2] / pre:.2f}x | {note} |")


if __name__ == "__main__":
    main()
