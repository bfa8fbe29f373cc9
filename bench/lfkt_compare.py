"""llamafactory-kt's own `use_kt` chat against ktchat through its LLaMA-Factory hook, in the KT users' environment.

    .venv/bin/python bench/lfkt_compare.py --python .venv-lfkt/bin/python [--families deepseek_v2,...] [--out F.json]

Per tiny family (ktchat.tinymodels, built offline) and per path, one subprocess builds LLaMA-Factory's ChatModel
from the same inference YAML (`use_kt: true`, the tiny PEFT adapter as training writes it), with
KTCHAT_LLAMAFACTORY_HOOK=0 (llamafactory-kt's own path) or 1 (ktchat: its defaults, kt_kernel's bf16 experts; and
fp32 with the torch experts backend), in --python (the KT environment), under a wall-clock limit so that a hang is
recorded as one. The YAML sets `low_cpu_mem_usage: false`: LLaMA-Factory then passes no device_map, so kt_kernel's
`prepare_kt_non_expert_device_map` does not refuse a machine without a GPU (ktchat's loader does not use the key). The reference is built by this interpreter's transformers (run it from .venv: transformers-kt 5.6
does not fuse Qwen3.5-MoE's per-expert checkpoint keys, so its reference would miss the experts). It reports whether the model loaded (or the error's last line), the relative L2 error of the
logits of the trained chat prompts against the fp32 hand-merged reference (tests/reference.py, built here in plain
transformers), the greedy tokens against the reference's (up to its end of sequence), and the median ms per generated token of 32 greedy tokens
(prefill included). Prints a Markdown table (docs/llamafactory.md has the one measured here).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ("deepseek_v2", "qwen3_moe", "qwen3_5_moe_text", "qwen3_5_moe")
# label -> (KTCHAT_LLAMAFACTORY_HOOK, extra YAML keys)
PATHS = {"llamafactory-kt use_kt": ("0", {}), "ktchat hook": ("1", {}),
         "ktchat hook, fp32 torch experts": ("1", {"experts_backend": "torch", "infer_dtype": "float32"})}
NEW_TOKENS = 32

WORKER = r"""
import json, statistics, sys, time, torch
sys.path.insert(0, sys.argv[3])
from reference import chat_prompt_ids, greedy, logits
from llamafactory.chat import ChatModel

args, out = json.loads(sys.argv[1]), sys.argv[2]
start = time.perf_counter()
chat = ChatModel(args)
load_s = time.perf_counter() - start
model, tokenizer = chat.engine.model, chat.engine.tokenizer
prompts = chat_prompt_ids(tokenizer)
got = [logits(model, ids) for ids in prompts]
ids = prompts[0].to(model.device)
times = []
for _ in range(3):
    start = time.perf_counter()
    with torch.no_grad():
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
                                   do_sample=False)
    times.append(time.perf_counter() - start)
tokens = greedy(model, prompts[0], NEW)  # stops at the end of sequence, as the reference's does
torch.save({"logits": got, "tokens": tokens, "load_s": load_s,
            "ms_per_token": 1000 * statistics.median(times) / NEW}, out)
print("WORKER-DONE", flush=True)
""".replace("NEW", str(NEW_TOKENS))


def tiny_paths(root: Path, family: str):
    from ktchat.tinymodels import build_tiny

    where = root if family == "deepseek_v2" else root.with_name(f"{root.name}-{family}")
    return build_tiny(where, family=family)


def reference(paths):
    """The hand-merged fp32 reference's logits and greedy tokens on the trained chat prompts."""
    sys.path.insert(0, str(REPO / "tests"))
    from reference import chat_prompt_ids, greedy, load_reference, logits, merge_by_hand
    from transformers import AutoTokenizer

    model = load_reference(merge_by_hand(paths.model, paths.adapter, paths.root / "merged-all-lfkt-compare"))
    prompts = chat_prompt_ids(AutoTokenizer.from_pretrained(paths.model))
    return [logits(model, ids) for ids in prompts], greedy(model, prompts[0], NEW_TOKENS)


def error_line(log: str) -> str:
    """The error a failed run ended with: the last line that names an exception."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    named = [line for line in lines if "Error" in line or "Exception" in line or "error:" in line]
    return (named or lines or ["(no output)"])[-1][:300]


def run_path(python: str, paths, hook: str, extra: dict, timeout: float) -> dict:
    args = {"model_name_or_path": str(paths.model), "adapter_name_or_path": str(paths.adapter),
            "infer_backend": "huggingface", "use_kt": True, "finetuning_type": "lora",
            "lora_rank": 8, "lora_alpha": 16, "kt_config": {"kt_num_threads": 1}, "do_sample": False,
            "max_new_tokens": NEW_TOKENS, "low_cpu_mem_usage": False, **extra}
    env = {**os.environ, "KTCHAT_LLAMAFACTORY_HOOK": hook, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_WAIT_POLICY": "PASSIVE"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.pt"
        cmd = [python, "-c", WORKER, json.dumps(args), str(out), str(REPO / "tests")]
        start = time.monotonic()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
        except subprocess.TimeoutExpired as e:
            log = (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
            return {"status": f"hung: no result within {timeout:.0f} s (last line: {error_line(log)})"}
        if proc.returncode != 0 or not out.exists():
            return {"status": f"failed (exit {proc.returncode}): {error_line(proc.stderr + proc.stdout)}",
                    "wall_s": time.monotonic() - start}
        import torch

        result = torch.load(out)
        result["status"] = "loads"
        result["by_ktchat"] = "[ktchat] use_kt:" in proc.stderr
        return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--cache", default=os.environ.get("KTCHAT_TEST_CACHE", str(REPO / ".cache" / "tiny")))
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per path and family (a hang is a row)")
    parser.add_argument("--python", default=sys.executable, help="the KT environment's interpreter")
    parser.add_argument("--out", help="write the rows as JSON here too")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO / "tests"))
    from reference import rel_err

    rows = []
    for family in args.families.split(","):
        paths = tiny_paths(Path(args.cache), family)
        want_logits, want_tokens = reference(paths)
        for label, (hook, extra) in PATHS.items():
            result = run_path(args.python, paths, hook, extra, args.timeout)
            row = {"family": family, "path": label, "status": result["status"]}
            if result["status"] == "loads":
                row.update(
                    logits_rel_err=max(rel_err(g, w) for g, w in zip(result["logits"], want_logits)),
                    greedy_match=sum(a == b for a, b in zip(result["tokens"], want_tokens)), greedy_len=len(want_tokens),
                    ms_per_token=result["ms_per_token"], load_s=result["load_s"], by_ktchat=result["by_ktchat"])
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print(f"| family | path | loads | logits rel. error (max over {len(want_logits)} prompts) | greedy tokens "
          f"= reference | ms/token |\n|---|---|---|---|---|---|")
    for row in rows:
        if row["status"] == "loads":
            print(f"| {row['family']} | {row['path']} | yes | {row['logits_rel_err']:.2e} | "
                  f"{row['greedy_match']}/{row['greedy_len']} | {row['ms_per_token']:.1f} |")
        else:
            print(f"| {row['family']} | {row['path']} | no: {row['status'].replace('|', '/')} | - | - | - |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
