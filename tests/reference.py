"""The independent reference: base weights with every LoRA merged by hand (W + scale * B @ A, in fp64, stored
as fp32), run in plain transformers. Shares no code with ktchat on purpose."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# Where KT mode puts the non-expert weights; the GPU run sets KTCHAT_TEST_DEVICE=cuda. The reference stays on CPU.
DEVICE = os.environ.get("KTCHAT_TEST_DEVICE", "cpu")
GREEDY_TOKENS = 24

_LORA = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")


def read_checkpoint(model_dir: Path) -> dict[str, torch.Tensor]:
    index = model_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    out = {}
    for name in files:
        with safe_open(str(model_dir / name), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def merge_by_hand(model_dir: Path, adapter_dir: Path, out_dir: Path, keep=lambda module: True) -> Path:
    """Writes an fp32 checkpoint with the LoRA of every module for which keep(module) is true merged in."""
    if (out_dir / "model.safetensors").exists():
        return out_dir
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert not cfg.get("rank_pattern") and not cfg.get("alpha_pattern") and not cfg.get("use_rslora")
    scale = cfg["lora_alpha"] / cfg["r"]
    weights = {k: v.double() for k, v in read_checkpoint(model_dir).items()}
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
        lora = {k: f.get_tensor(k).double() for k in f.keys()}
    modules = {_LORA.match(k).group(1) for k in lora}
    for module in modules:
        if keep(module):
            a = lora[f"base_model.model.{module}.lora_A.weight"]
            b = lora[f"base_model.model.{module}.lora_B.weight"]
            weights[f"{module}.weight"] += scale * (b @ a)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.float().contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"))
    for f in model_dir.iterdir():
        if f.suffix in (".json", ".jinja", ".txt") and not f.name.startswith("model.safetensors"):
            shutil.copy(f, tmp / f.name)
    config = json.loads((tmp / "config.json").read_text())
    config["torch_dtype"] = "float32"
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def is_routed_expert(module: str) -> bool:
    return re.search(r"\.mlp\.experts\.\d+\.", module) is not None


def load_reference(merged_dir: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(merged_dir, dtype=dtype).eval()


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm()).item()


@torch.no_grad()
def logits(model, ids):
    return model(ids.to(model.device)).logits.float().cpu()


@torch.no_grad()
def greedy(model, ids, n=GREEDY_TOKENS):
    ids = ids.to(model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def chat_prompt_ids(tokenizer) -> list[torch.Tensor]:
    """The trained questions as chat prompts, then a long multi-turn chat (the 3 pairs x 3) ending in the first."""
    from ktchat.tiny import TRAINED_QA

    def encode(messages):
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        return out["input_ids"]

    history = [m for q, a in TRAINED_QA * 3 for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    singles = [encode([{"role": "user", "content": q}]) for q, _ in TRAINED_QA]
    return singles + [encode(history + [{"role": "user", "content": TRAINED_QA[0][0]}])]


def random_prompt(n: int = 300, seed: int = 0) -> torch.Tensor:
    """Out-of-distribution token ids (the tiny tokenizer has 500 tokens): near-ties in routing amplify rounding."""
    return torch.randint(0, 500, (1, n), generator=torch.Generator().manual_seed(seed))
