"""The independent reference: base weights with every LoRA merged by hand (W + scale * B @ A, in fp64, stored
as fp32), run in plain transformers. Shares no code with ktchat on purpose."""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from ktchat.tinymodels.checkpoint import fuse_experts, split_fused_experts

from tolerances import BF16_MAX_NEAR_TIE_SHARE, BF16_NEAR_TIE_ULPS, BF16_POSITION_RATIO, ROUTER_FP32_BOUND

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
    """Writes an fp32 checkpoint with the LoRA of every module for which keep(module) is true merged in, once: under
    a lock, since scripts/test.sh runs two environments' tests side by side on the shared .cache."""
    if (out_dir / "model.safetensors").exists():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.with_name(f".{out_dir.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out_dir / "model.safetensors").exists():
            _write_merged(model_dir, adapter_dir, out_dir, keep)
    return out_dir


def _write_merged(model_dir: Path, adapter_dir: Path, out_dir: Path, keep) -> None:
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert not cfg.get("rank_pattern") and not cfg.get("alpha_pattern") and not cfg.get("use_rslora")
    scale = cfg["lora_alpha"] / cfg["r"]
    base_config = json.loads((model_dir / "config.json").read_text())
    stored = dequantize_by_hand(read_checkpoint(model_dir), base_config.get("quantization_config"))
    weights = {k: v.double() for k, v in split_fused_experts(stored).items()}  # Qwen3-VL-MoE: fused on disk
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
        lora = {k: f.get_tensor(k).double() for k in f.keys()}
    if (adapter_dir / FUSED_EXPERT_LORA).exists():  # KT training's layout: the routed experts' LoRA apart
        manifest = json.loads((adapter_dir / "kt_adapter_manifest.json").read_text())
        assert (manifest["lora"]["rank"], manifest["lora"]["alpha"]) == (cfg["r"], cfg["lora_alpha"]), manifest
        lora.update(fused_expert_lora_by_hand(adapter_dir / FUSED_EXPERT_LORA, weights))
    modules = {_LORA.match(k).group(1) for k in lora}
    for module in modules:
        if keep(module):
            a = lora[f"base_model.model.{module}.lora_A.weight"]
            b = lora[f"base_model.model.{module}.lora_B.weight"]
            weights[f"{module}.weight"] += scale * (b @ a)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if set(weights) != set(stored):
        weights = fuse_experts(weights)
    save_file({k: v.float().contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"))
    for f in model_dir.iterdir():
        if f.suffix in (".json", ".jinja", ".txt") and not f.name.startswith("model.safetensors"):
            shutil.copy(f, tmp / f.name)
    config = json.loads((tmp / "config.json").read_text())
    config["torch_dtype"] = "float32"
    if config.pop("quantization_config", None) is not None:  # stored dequantized: plain transformers, plain weights
        config.pop("auto_map", None)
        if config.get("model_type") == "kimi_k2":  # Kimi-K2's remote-code type is transformers' deepseek_v3
            config["model_type"] = "deepseek_v3"
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)


FUSED_EXPERT_LORA = "fused_expert_lora.safetensors"
_FUSED_KEY = re.compile(r"^layers\.(\d+)\.experts\.(gate|up|down)_lora_([ab])$")
_EXPERT_WEIGHT = re.compile(r"^(?:.*\.)?layers\.(\d+)\..+\.experts\.(\d+)\.(\w+)\.weight$")
_EXPERT_PROJ = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}


def fused_expert_lora_by_hand(path: Path, weights: dict) -> dict[str, torch.Tensor]:
    """KT's fused expert LoRA file (`layers.L.experts.{gate,up,down}_lora_{a,b}`, stacked by expert id: a [E, r, in],
    b [E, out, r]) as per-expert PEFT keys of the checkpoint's own expert modules (found in `weights`' keys by layer,
    expert and projection), in fp64."""
    modules = {}  # (layer, expert, "gate" | "up" | "down") -> module name
    for key in weights:
        m = _EXPERT_WEIGHT.match(key)
        if m and m[3] in _EXPERT_PROJ:
            modules[int(m[1]), int(m[2]), _EXPERT_PROJ[m[3]]] = key.removesuffix(".weight")
    out = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            layer, proj, side = _FUSED_KEY.match(key).groups()
            stacked = f.get_tensor(key).double()
            for expert in range(stacked.shape[0]):
                out[f"base_model.model.{modules[int(layer), expert, proj]}.lora_{side.upper()}.weight"] = stacked[expert]
    return out


def dequantize_by_hand(stored: dict, qc: dict | None) -> dict[str, torch.Tensor]:
    """The checkpoint's quantized weights as fp32 `<module>.weight`, block by block (DeepSeek-V3 FP8: value *
    weight_scale_inv of its block; compressed-tensors pack-quantized INT4: eight nibbles per int32 word, lowest
    first, stored as q + 8, times weight_scale of its group); everything else as stored."""
    if qc is None:
        return dict(stored)
    out = dict(stored)
    if qc["quant_method"] == "fp8":
        br, bc = qc["weight_block_size"]
        for key in [k for k in stored if k.endswith(".weight_scale_inv")]:
            module = key.removesuffix(".weight_scale_inv")
            data, scale = stored[f"{module}.weight"], out.pop(key)
            assert data.dtype == torch.float8_e4m3fn
            w = data.float()
            for i in range(scale.shape[0]):
                for j in range(scale.shape[1]):
                    w[i * br:(i + 1) * br, j * bc:(j + 1) * bc] *= scale[i, j].item()
            out[f"{module}.weight"] = w
        return out
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized", qc
    (group,) = qc["config_groups"].values()
    assert group["weights"]["num_bits"] == 4 and group["weights"]["symmetric"]
    size = group["weights"]["group_size"]
    for key in [k for k in stored if k.endswith(".weight_packed")]:
        module = key.removesuffix(".weight_packed")
        packed, scale = out.pop(key), out.pop(f"{module}.weight_scale")
        rows, cols = out.pop(f"{module}.weight_shape").tolist()
        nibbles = torch.stack([(packed >> (4 * j)) & 15 for j in range(8)], dim=2).reshape(rows, -1)[:, :cols]
        w = (nibbles - 8).float()
        for g in range(scale.shape[1]):
            w[:, g * size:(g + 1) * size] *= scale[:, g:g + 1].float()
        out[f"{module}.weight"] = w
    return out


def is_routed_expert(module: str) -> bool:
    return re.search(r"\.mlp\.experts\.\d+\.", module) is not None


def model_class(model_dir: Path):
    """Plain transformers' class for the checkpoint: a VLM's own (image-text-to-text), else the causal LM."""
    import transformers

    vlm = "vision_config" in json.loads((Path(model_dir) / "config.json").read_text())
    return transformers.AutoModelForImageTextToText if vlm else transformers.AutoModelForCausalLM


def load_reference(merged_dir: Path, dtype=torch.float32):
    return model_class(merged_dir).from_pretrained(merged_dir, dtype=dtype).eval()


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
    from ktchat.tinymodels import TRAINED_QA

    def encode(messages):
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        return out["input_ids"]

    history = [m for q, a in TRAINED_QA * 3 for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    singles = [encode([{"role": "user", "content": q}]) for q, _ in TRAINED_QA]
    return singles + [encode(history + [{"role": "user", "content": TRAINED_QA[0][0]}])]


def random_prompt(n: int = 300, seed: int = 0) -> torch.Tensor:
    """Out-of-distribution token ids (the tiny tokenizer has 500 tokens): near-ties in routing amplify rounding."""
    return torch.randint(0, 500, (1, n), generator=torch.Generator().manual_seed(seed))


# --- bf16: judged position by position against transformers' own bf16 ---------------------------------------------
#
# A bf16 model cannot match fp32 everywhere: where two experts' fp32 router scores are closer than bf16 can tell
# apart, rounding upstream may pick the other one, and that position's logits move by as much as the swapped
# expert contributes (up to ~1 relative on the tiny model). A single global bound cannot tell that from a defect,
# so `judge_bf16` asks, per position, whether the model errs more than transformers itself does in bf16 on the same
# merged checkpoint, and excuses only routing near-ties (measured on the fp32 reference, by hooks on its routers).

_GATE = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.gate$")


def gate_modules(model) -> dict[int, torch.nn.Module]:
    """{layer: router module} by module path (`...layers.L.mlp.gate`: transformers' DeepSeek name, kept in KT mode
    and under a PEFT wrapper)."""
    return {int(m[1]): module for name, module in model.named_modules() if (m := _GATE.search(name))}


@contextlib.contextmanager
def captured_gates(model):
    """Records, per forward, each router's input [T, H] and output: {layer: (input, output)}."""
    seen: dict[int, tuple[torch.Tensor, object]] = {}

    def recorder(layer):
        def record(module, args, out):
            seen[layer] = (args[0].detach().reshape(-1, args[0].shape[-1]), out)
        return record

    hooks = [module.register_forward_hook(recorder(layer)) for layer, module in gate_modules(model).items()]
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 numbers (8 significant bits) at |x|."""
    return torch.exp2(torch.floor(torch.log2(x.abs().float())) - 7)


def reference_routing(reference, ids) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The reference's logits [1, T, V] and, per MoE layer, its router scores [T, E], recomputed from each router's
    input as transformers' DeepSeek-V2 does in both majors (fp32 logits, fp32 softmax)."""
    cfg = reference.config
    assert getattr(cfg, "topk_method", "greedy") == "greedy", "margins assume greedy softmax top-k routing"
    gates = gate_modules(reference)
    with captured_gates(reference) as seen:
        out = logits(reference, ids)
    scores = {layer: F.linear(x.float(), gates[layer].weight.float()).softmax(-1, dtype=torch.float32).cpu()
              for layer, (x, _) in seen.items()}
    return out, scores


def routing_margins(scores: dict[int, torch.Tensor], top_k: int) -> torch.Tensor:
    """[T] the smallest top-k margin over the MoE layers (k-th minus (k+1)-th score), in bf16 ulps of the k-th."""
    margins = []
    for s in scores.values():
        top = torch.topk(s, top_k + 1, dim=-1).values
        margins.append((top[:, top_k - 1] - top[:, top_k]) / bf16_ulp(top[:, top_k - 1]))
    return torch.stack(margins).min(dim=0).values


def position_errors(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """[T] relative L2 error of each position's logits."""
    got, want = got.double().reshape(-1, got.shape[-1]), want.double().reshape(-1, want.shape[-1])
    return (got - want).norm(dim=-1) / want.norm(dim=-1)


@dataclass
class Bf16Baseline:
    """What the judge compares with, per prompt: the fp32 reference's logits and routing margins, and the error of
    transformers' own bf16 model on the same merged checkpoint."""

    prompts: list
    want: list  # fp32 reference logits
    scores: list  # {layer: fp32 router scores [T, E]}
    margins: list  # [T] ulps
    err_bf16: list  # [T] transformers-bf16 vs fp32 reference
    gate_weights: dict  # {layer: fp32 router weight} of the reference


def bf16_baseline(reference, reference_bf16, prompts) -> Bf16Baseline:
    k = reference.config.num_experts_per_tok
    want, scores = zip(*(reference_routing(reference, ids) for ids in prompts))
    return Bf16Baseline(
        list(prompts), list(want), list(scores), [routing_margins(s, k) for s in scores],
        [position_errors(logits(reference_bf16, ids), w) for ids, w in zip(prompts, want)],
        {layer: g.weight.detach().float().cpu() for layer, g in gate_modules(reference).items()},
    )


@dataclass
class PromptVerdict:
    err: torch.Tensor  # [T] the judged model vs the fp32 reference
    err_bf16: torch.Tensor  # [T] transformers-bf16 vs the fp32 reference
    margin: torch.Tensor  # [T] fp32 routing margin, bf16 ulps
    failing: list  # positions above BF16_POSITION_RATIO x transformers-bf16's error there
    not_near_ties: list  # those of them whose margin is not a near-tie
    allowed: int  # how many failing (near-tie) positions the prompt may have
    router_err: float  # largest relative error of the model's router logits vs fp32 math on their own input

    def scale(self) -> torch.Tensor:
        return _floored(self.err_bf16)


def _floored(err_bf16: torch.Tensor) -> torch.Tensor:
    """transformers-bf16's error at each position, floored at its median over the prompt (it is itself noisy)."""
    return torch.maximum(err_bf16, err_bf16.median())


@dataclass
class Bf16Verdict:
    prompts: list  # PromptVerdict per prompt
    problems: list  # why the model is rejected; empty: accepted

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        lines = list(self.problems) or ["accepted"]
        for i, p in enumerate(self.prompts):
            worst = torch.argsort(p.err / p.scale(), descending=True)[:3].tolist()
            shown = ", ".join(f"{t}: {p.err[t]:.2e} vs {p.err_bf16[t]:.2e} (margin {p.margin[t]:.2f} ulp)"
                              for t in worst)
            lines.append(f"prompt {i} ({p.err.numel()} tokens): router {p.router_err:.1e}; worst positions {shown}")
        return "\n".join(lines)


def over_bound(err: torch.Tensor, bound, margin: torch.Tensor) -> tuple[list, list, int]:
    """(positions erring over `bound` (a number or [T]), those of them that are no routing near-tie, how many
    near-tie positions the prompt may have): the one rule every bf16 expert judge applies."""
    failing = (err > bound).nonzero().flatten().tolist()
    allowed = max(1, math.ceil(BF16_MAX_NEAR_TIE_SHARE * err.numel()))
    return failing, [t for t in failing if margin[t] >= BF16_NEAR_TIE_ULPS], allowed


def near_tie_problems(model, reference, ids, bound: float) -> list[str]:
    """Why `model` fails `bound` per position on `ids` against the fp32 reference (empty: it passes): only routing
    near-ties may exceed it, at most BF16_MAX_NEAR_TIE_SHARE of the positions, and the rest together stay within."""
    want, scores = reference_routing(reference, ids)
    margin = routing_margins(scores, reference.config.num_experts_per_tok)
    got = logits(model, ids)
    err = position_errors(got, want)
    failing, not_near_ties, allowed = over_bound(err, bound, margin)
    keep = torch.ones(err.numel(), dtype=torch.bool)
    keep[failing] = False
    rest = rel_err(got.reshape(-1, got.shape[-1])[keep], want.reshape(-1, want.shape[-1])[keep])
    problems = [f"position {t}: {err[t]:.2e} over {bound:.0e}, margin {margin[t]:.1f} ulp (no near-tie)"
                for t in not_near_ties]
    if len(failing) > allowed:
        problems.append(f"{len(failing)} near-tie positions over {bound:.0e} (at most {allowed}): {failing[:10]}")
    if not rest < bound:
        problems.append(f"the other positions err {rest:.2e} together (bound {bound:.0e})")
    return problems


def judge_bf16(model, baseline: Bf16Baseline) -> Bf16Verdict:
    """Accepts a bf16 model only if, on every prompt,
    - its router logits are fp32 math on the router's own input (what transformers computes for DeepSeek);
    - every position erring more than BF16_POSITION_RATIO x transformers-bf16's error there (floored at that
      error's median over the prompt) is a routing near-tie: fp32 top-k margin < BF16_NEAR_TIE_ULPS at some layer;
    - such positions are at most BF16_MAX_NEAR_TIE_SHARE of the prompt's positions (at least one).
    """
    verdicts, problems = [], []
    for i, ids in enumerate(baseline.prompts):
        with captured_gates(model) as seen:
            got = logits(model, ids)
        router_err = _router_error(seen, baseline.gate_weights)
        err, err_bf16, margin = position_errors(got, baseline.want[i]), baseline.err_bf16[i], baseline.margins[i]
        failing, not_near_ties, allowed = over_bound(err, BF16_POSITION_RATIO * _floored(err_bf16), margin)
        v = PromptVerdict(err, err_bf16, margin, failing, not_near_ties, allowed, router_err)
        verdicts.append(v)
        if not router_err <= ROUTER_FP32_BOUND:
            problems.append(f"prompt {i}: router logits err {router_err:.1e} from fp32 math on their own input "
                            f"(bound {ROUTER_FP32_BOUND:.0e}): routing is not computed in fp32")
        if v.not_near_ties:
            shown = ", ".join(f"{t}: {err[t]:.2e} vs {err_bf16[t]:.2e}, margin {margin[t]:.1f} ulp"
                              for t in v.not_near_ties[:5])
            problems.append(f"prompt {i}: {len(v.not_near_ties)} of {err.numel()} positions err over "
                            f"{BF16_POSITION_RATIO}x transformers-bf16 without a routing near-tie ({shown})")
        elif len(v.failing) > v.allowed:
            problems.append(f"prompt {i}: {len(v.failing)} near-tie positions err over {BF16_POSITION_RATIO}x "
                            f"transformers-bf16 (at most {v.allowed}): {v.failing[:10]}")
    return Bf16Verdict(verdicts, problems)


def _router_error(seen: dict, gate_weights: dict) -> float:
    """Largest relative error of the captured router logits vs F.linear(input, reference weight) in fp64; inf where
    the router's output holds no logits [T, E] or the MoE layers differ from the reference's."""
    if set(seen) != set(gate_weights):
        return math.inf
    worst = 0.0
    for layer, (x, out) in seen.items():
        w = gate_weights[layer]
        out = out[0] if isinstance(out, tuple) else out
        if not torch.is_tensor(out) or not out.is_floating_point() or tuple(out.shape) != (x.shape[0], w.shape[0]):
            return math.inf
        want = F.linear(x.double().cpu(), w.double())
        worst = max(worst, rel_err(out.cpu(), want))
    return worst
