"""Relative logit error of each experts backend mode against the fp32 hand-merged reference, on the tiny
trained model (fp32 everywhere but the expert kernel). Prints one line per mode, one number per prompt.

    python bench/accuracy.py [--device cuda] [--family deepseek_v2 glm4_moe ...]   (default: DeepSeek-V2; "all")
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from reference import chat_prompt_ids, load_reference, logits, merge_by_hand, random_prompt, rel_err  # noqa: E402

from ktchat import load_model  # noqa: E402
from ktchat.experts.kt_backend import unavailable_reason  # noqa: E402
from ktchat.tinymodels import FAMILY_NAMES, build_tiny  # noqa: E402
from ktchat.tinymodels.families import family as family_recipe  # noqa: E402

MODES = [("torch", "exact", None), ("kt", "exact", "bf16"), ("kt", "merged", "bf16"), ("kt", "merged", "int8"),
         ("kt", "exact", "int8")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache", type=Path, default=REPO / ".cache" / "tiny")
    ap.add_argument("--family", nargs="+", default=["deepseek_v2"], help=f"any of {', '.join(FAMILY_NAMES)}, or all")
    args = ap.parse_args()
    for name in FAMILY_NAMES if args.family == ["all"] else args.family:
        if reason := family_recipe(name).unavailable():
            print(f"{name}: {reason}")
            continue
        measure(name, args.cache if name == "deepseek_v2" else args.cache.with_name(f"{args.cache.name}-{name}"),
                args.device)


def measure(name: str, cache: Path, device: str) -> None:
    from transformers import AutoTokenizer

    tiny = build_tiny(cache, family=name)
    reference = load_reference(merge_by_hand(tiny.model, tiny.adapter, tiny.root / "merged-all"))
    tok = AutoTokenizer.from_pretrained(tiny.model)
    prompts = chat_prompt_ids(tok) + [random_prompt()]
    print(f"{name}: 3 trained questions, a {prompts[3].shape[-1]}-token conversation, 300 random tokens")
    for backend, moe_lora, method in MODES:
        if backend == "kt" and unavailable_reason(moe_lora, method):
            print(f"  {backend} {moe_lora} {method}: unavailable here")
            continue
        model, _ = load_model(tiny.model, tiny.adapter, experts_backend=backend, dtype="float32", device=device,
                              moe_lora=moe_lora, kt_method=method)
        errors = [rel_err(logits(model, p), logits(reference, p)) for p in prompts]
        print(f"  {backend} {moe_lora} {method or ''}: " + " ".join(f"{e:.1e}" for e in errors), flush=True)

if __name__ == "__main__":
    main()
