"""Whole-model bf16 KT mode position by position: its error against the fp32 hand-merged reference next to plain
transformers' own bf16 error on the same merged checkpoint, and the routing near-ties (fp32 top-k margins in bf16
ulps) that excuse a position (the rule of tests/test_exactness.py, `reference.judge_bf16`).

    PYTHONPATH=src python bench/bf16_positions.py [--device cuda] [--worst 8]

Prompts: the 3 trained questions, the 172-token multi-turn chat, 3 x 300 random tokens. The tiny model is built
(or reused) under --cache. --device puts KT mode's non-expert layers and the transformers-bf16 model there; the fp32
reference stays on the CPU. With the torch experts backend only (no kt_kernel needed).
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from reference import (bf16_baseline, captured_gates, chat_prompt_ids, gate_modules, judge_bf16,  # noqa: E402
                       load_reference, logits, merge_by_hand, position_errors, random_prompt, rel_err)
from tolerances import BF16_NEAR_TIE_ULPS, BF16_POSITION_RATIO  # noqa: E402

from ktchat import load_model  # noqa: E402
from ktchat.model import offloaded_blocks  # noqa: E402
from ktchat.tinymodels import build_tiny  # noqa: E402


def router_scores(model, ids) -> dict[int, torch.Tensor]:
    """{layer: router scores [T, E]} from each router's input and weight (fp32 logits, fp32 softmax: what
    transformers' DeepSeek-V2 and ktchat both compute)."""
    with captured_gates(model) as seen:
        logits(model, ids)
    gates = gate_modules(model)
    return {layer: F.linear(x.float(), gates[layer].weight.float()).softmax(-1, dtype=torch.float32).cpu()
            for layer, (x, _) in seen.items()}


def chosen(scores: dict, k: int) -> dict[int, torch.Tensor]:
    """{layer: sorted top-k expert ids [T, k]}."""
    return {layer: torch.topk(s, k, dim=-1).indices.sort(dim=-1).values for layer, s in scores.items()}


def flips(got: dict, want: dict) -> dict[int, list[int]]:
    """{position: layers where the experts chosen differ from the fp32 reference's}."""
    out: dict[int, list[int]] = {}
    for layer in sorted(want):
        for t in (got[layer] != want[layer]).any(dim=-1).nonzero().flatten().tolist():
            out.setdefault(t, []).append(layer)
    return out


def forced_logits(model, ids, want_ids: dict) -> torch.Tensor:
    """KT mode's logits with its routed experts replaced by the fp32 reference's choice at every position (where
    they agree this changes nothing; DeepSeek-V2 greedy routing: weight = own softmax score x routed_scaling_factor)."""
    blocks = offloaded_blocks(model)
    saved = {layer: block._route for layer, block in blocks.items()}

    def forcing(layer, route):
        def run(router_logits, router, config):
            weights, ids_ = route(router_logits, router, config)
            ref = want_ids[layer].to(ids_.device)
            if ref.shape[0] != ids_.shape[0]:
                return weights, ids_
            scores = router_logits.softmax(-1, dtype=torch.float32)
            return scores.gather(1, ref) * config.routed_scaling_factor, ref
        return run

    try:
        for layer, block in blocks.items():
            block._route = forcing(layer, saved[layer])
        return logits(model, ids)
    finally:
        for layer, block in blocks.items():
            block._route = saved[layer]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache", type=Path, default=REPO / ".cache" / "tiny")
    ap.add_argument("--worst", type=int, default=6, help="positions shown per prompt, by ratio to transformers-bf16")
    args = ap.parse_args()
    import transformers
    from transformers import AutoTokenizer

    tiny = build_tiny(args.cache)
    merged = merge_by_hand(tiny.model, tiny.adapter, tiny.root / "merged-all")
    reference = load_reference(merged)
    reference_bf16 = load_reference(merged, dtype=torch.bfloat16).to(args.device)
    model, _ = load_model(tiny.model, tiny.adapter, experts_backend="torch", dtype="bfloat16", device=args.device)
    tok = AutoTokenizer.from_pretrained(tiny.model)
    names = ["question 1", "question 2", "question 3", "multi-turn chat"] + [f"random seed {s}" for s in (0, 1, 2)]
    prompts = chat_prompt_ids(tok) + [random_prompt(300, s) for s in (0, 1, 2)]
    k = reference.config.num_experts_per_tok
    print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{platform.processor() or platform.machine()}; attention on {args.device}; fp32 reference on cpu")
    print(f"per-position relative L2 error vs the fp32 reference; ratio = ktchat / max(transformers-bf16 there, its "
          f"median); margin = fp32 top-{k} margin in bf16 ulps (near-tie < {BF16_NEAR_TIE_ULPS}), smallest over layers")
    baseline = bf16_baseline(reference, reference_bf16, prompts)
    verdict = judge_bf16(model, baseline)
    for name, ids, v, want, scores in zip(names, prompts, verdict.prompts, baseline.want, baseline.scores):
        n = ids.shape[1]
        want_ids = chosen(scores, k)
        kt_scores, hf_scores = router_scores(model, ids), router_scores(reference_bf16, ids)
        kt_flips, hf_flips = flips(chosen(kt_scores, k), want_ids), flips(chosen(hf_scores, k), want_ids)
        ratio = v.err / v.scale()
        total_kt = rel_err(logits(model, ids), want)
        total_hf = rel_err(logits(reference_bf16, ids), want)
        print(f"\n{name} ({n} tokens): whole prompt ktchat {total_kt:.2e}, transformers-bf16 {total_hf:.2e}; "
              f"median position {v.err.median():.2e} vs {v.err_bf16.median():.2e}; worst position "
              f"{v.err.max():.2e} vs {v.err_bf16.max():.2e}; router logits vs fp32 {v.router_err:.1e}")
        print(f"  near-ties: {(v.margin < BF16_NEAR_TIE_ULPS).sum().item()} positions < {BF16_NEAR_TIE_ULPS} ulp, "
              f"{(v.margin < 1).sum().item()} < 1 ulp; over {BF16_POSITION_RATIO}x transformers-bf16: {v.failing} "
              f"(allowed {v.allowed}, not near-ties {v.not_near_ties})")
        for label, fl, err in (("ktchat", kt_flips, v.err), ("transformers-bf16", hf_flips, v.err_bf16)):
            shown = ", ".join(f"{t} (layer {'/'.join(map(str, layers))}, margin {v.margin[t]:.2f}, err {err[t]:.2e})"
                              for t, layers in sorted(fl.items()))
            print(f"  experts unlike fp32's, {label}: {shown or 'none'}")
        for t, layers in sorted(kt_flips.items()):
            for layer in layers:
                top = torch.topk(scores[layer][t], k + 1).indices
                print(f"    position {t}, layer {layer}, scores of experts {top.tolist()}: " + "; ".join(
                    f"{label} {', '.join(f'{x:.6f}' for x in sc[layer][t, top].tolist())}"
                    for label, sc in (("fp32", scores), ("transformers-bf16", hf_scores), ("ktchat", kt_scores))))
        if kt_flips:
            forced = forced_logits(model, ids, want_ids)
            at = position_errors(forced, want)
            print("  ktchat with fp32's experts forced: " + ", ".join(
                f"{t}: {v.err[t]:.2e} -> {at[t]:.2e}" for t in sorted(kt_flips)) +
                f"; whole prompt {total_kt:.2e} -> {rel_err(forced, want):.2e}")
        print("  pos   ktchat  tf-bf16   ratio  margin")
        for t in torch.argsort(ratio, descending=True)[:args.worst].tolist():
            print(f"  {t:3d}  {v.err[t]:.2e}  {v.err_bf16[t]:.2e}  {ratio[t]:6.2f}  {v.margin[t]:6.2f}")
    print("\nverdict:", "accepted" if verdict.ok else "rejected:\n  " + "\n  ".join(verdict.problems))


if __name__ == "__main__":
    main()
