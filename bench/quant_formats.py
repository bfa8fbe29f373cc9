"""One DeepSeek-V3-shaped MoE layer on kt_kernel's CPU experts in bf16, FP8 (the checkpoint's block FP8 as is) and
KT's pre-converted INT8 (a .kt tree read as is): load time, CPU memory, decode / prefill ms, and the error against
an fp32 reference of the same (dequantized) weights, LoRA r=8 unmerged on the SFT kernels.

    PYTHONPATH=$PWD/src:$PWD/.devkt/site python bench/quant_formats.py --experts 64 --out bench/results/x.json

V3's shape: hidden 7168, moe_intermediate 2048, top-8; `--experts` of its 256 (a decode token touches top-8 of
them whatever their number, so ms per token is the full layer's; memory and load time scale with the count).
Medians of `--repeat` calls, each format measured in this one process, one after another.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ktchat.formats import quant
from ktchat.adapter import PROJS, StackedLoRA
from ktchat.experts import ExpertsSpec
from ktchat.experts.kt_backend import KTExperts, cpu_variant, kt_int8_writer, unavailable_reason
from ktchat.formats.kt_weights import open_int8_experts, write_int8_experts


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def median_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def reference(weights, lora, x, ids, w) -> torch.Tensor:
    """fp32, every used expert dequantized, LoRA unmerged: the math the kernels approximate."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    for e in ids.unique().tolist():
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        xe = x[tok].float()
        m = {p: weights(p, e) for p in PROJS}
        proj = {p: (lambda v, p=p: F.linear(v, m[p]) + lora[p].scale * F.linear(F.linear(v, lora[p].a[e].float()),
                                                                                  lora[p].b[e].float())) for p in PROJS}
        out.index_add_(0, tok, proj["down"](F.silu(proj["gate"](xe)) * proj["up"](xe)) * w[tok, slot, None])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--inter", type=int, default=2048)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--formats", default="bf16,fp8,int8")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    e, h, i, k = args.experts, args.hidden, args.inter, args.top_k
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    bf16 = {p: (torch.randn((e, h, i) if p == "down" else (e, i, h), generator=g) / (h if p != "down" else i) ** 0.5)
            .bfloat16() for p in PROJS}
    lora = {p: StackedLoRA((torch.randn(e, 8, w.shape[2], generator=g) / w.shape[2] ** 0.5).bfloat16(),
                           (torch.randn(e, w.shape[1], 8, generator=g) / 8).bfloat16(), 2.0) for p, w in bf16.items()}
    print(f"weights made in {time.perf_counter() - t0:.1f}s", flush=True)
    x1, x128 = (torch.randn(n, h, generator=g).bfloat16() for n in (1, 128))
    ids1, ids128 = (torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)]) for n in (1, 128))
    w1, w128 = torch.rand(1, k), torch.rand(128, k)
    xa, idsa, wa = x128[:16], ids128[:16], w128[:16]
    results = {"machine": platform.node(), "cpu_variant": cpu_variant(), "shape": dict(experts=e, hidden=h, inter=i,
               top_k=k), "lora_rank": 8, "formats": {}}
    tmp = Path(tempfile.mkdtemp(prefix="kt-int8-bench-"))
    for fmt in args.formats.split(","):
        method = fmt
        reason = unavailable_reason("exact", method)
        if reason:
            results["formats"][fmt] = {"skipped": reason}
            print(fmt, "skipped:", reason, flush=True)
            continue
        t = time.perf_counter()
        if fmt == "fp8":
            src = {p: [quant.quantize("fp8", bf16[p][x].float(), (128, 128)) for x in range(e)] for p in PROJS}
            deq = lambda p, x: src[p][x].dequantize()  # noqa: E731
        elif fmt == "int8":
            write_int8_experts(tmp, {0: bf16}, writer=kt_int8_writer())  # kt_kernel's own quantize-and-save where the build has it
            tree = open_int8_experts(tmp, num_experts=e, hidden_size=h, intermediate_size=i, layers=[0])
            deq = lambda p, x: tree.weight(0, x, p).dequantize()  # noqa: E731
        else:
            deq = lambda p, x: bf16[p][x].float()  # noqa: E731
        prep = time.perf_counter() - t
        gc.collect()
        before = rss_bytes()
        t = time.perf_counter()
        kt = KTExperts(ExpertsSpec(0, e, k, h, i, torch.bfloat16), moe_lora="exact", method=method,
                       num_threads=args.threads, chunk_size=128)
        source_bytes = 0
        for p in PROJS:
            for x in range(e):
                if fmt == "bf16":
                    kt.load_weight(p, x, bf16[p][x], f"{p}{x}")
                    source_bytes += bf16[p][x].nbytes
                else:
                    q = src[p][x] if fmt == "fp8" else tree.weight(0, x, p)
                    kt.load_quantized(p, x, q, f"{p}{x}")
                    source_bytes += q.nbytes
        kt.finalize()
        kt.set_lora(lora)
        kt.prepare()
        load_s = time.perf_counter() - t
        gc.collect()
        held = rss_bytes() - before
        want = reference(deq, lora, xa, idsa, wa)
        err = ((kt.forward(xa, idsa, wa).float() - want).norm() / want.norm()).item()
        decode = median_ms(lambda: kt.forward(x1, ids1, w1), args.repeat)
        prefill = median_ms(lambda: kt.forward(x128, ids128, w128), max(3, args.repeat // 5))
        row = {"kernel_with_lora": f"{kt._kernel.__class__.__name__}", "source_prepare_s": round(prep, 2),
               "load_s": round(load_s, 2), "source_gib": round(source_bytes / 2**30, 3),
               "rss_held_gib": round(held / 2**30, 3), "rel_err_vs_fp32": err, "decode_ms_lora": round(decode, 3),
               "prefill128_ms_lora": round(prefill, 2)}
        results["formats"][fmt] = row
        print(fmt, json.dumps(row), flush=True)
        del kt
        if fmt == "fp8":
            del src
        gc.collect()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
