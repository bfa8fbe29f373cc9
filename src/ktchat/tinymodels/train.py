"""A short real PEFT LoRA run on the tiny model that leaves a per-expert adapter, as KT training does.

transformers 5 stores routed experts fused (3-D parameters, no nn.Linear), so PEFT could not put a
LoRA on each expert. For DeepSeek-V2 each MoE block is swapped for `PerExpertMoE`, which keeps HF's
router and shared experts but holds the routed experts as HF `DeepseekV2MLP` modules (nn.Linear). The
other families keep HF's own block (its router, shared experts and gate) and only get `PerExpertExperts`
in place of the fused experts. Either computes what HF's block computes (checked before training), and
gives the per-expert adapter layout in both transformers majors.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from . import recipe
from .checkpoint import EXPERT_KEY, load_expert_weights

logger = logging.getLogger(__name__)


class PerExpertMoE(nn.Module):
    """HF's router + shared experts, routed experts as a ModuleList of nn.Linear MLPs."""

    def __init__(self, hf_moe: nn.Module, config, expert_mlps: nn.ModuleList):
        super().__init__()
        self.gate = hf_moe.gate
        self.shared_experts = hf_moe.shared_experts
        self.experts = expert_mlps
        self.hidden_size = config.hidden_size

    def route(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(topk_idx [T,k], topk_weight [T,k] fp32) from either major's router."""
        out = self.gate(hidden)
        if len(out) == 3:  # transformers 5 DeepseekV2TopkRouter: (logits, weights, indices)
            return out[2], out[1]
        return out[0], out[1]  # transformers 4.57 DeepseekV2MoEGate: (indices, weights)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        idx, weight = self.route(hidden)
        x = hidden.reshape(-1, self.hidden_size)
        routed = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e, expert in enumerate(self.experts):
            tok, pos = torch.where(idx == e)
            if tok.numel():
                y = expert(x[tok]).float() * weight[tok, pos, None].float()
                routed.index_add_(0, tok, y)
        return routed.to(hidden.dtype).view(hidden.shape) + self.shared_experts(hidden)


def swap_moe(model: nn.Module, model_dir: Path) -> None:
    """Replaces every MoE block's mlp by PerExpertMoE loaded with the checkpoint's per-expert weights."""
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as mdv2

    cfg = model.config
    experts = load_expert_weights(model_dir)
    for li, layer in enumerate(model.model.layers):
        if li < cfg.first_k_dense_replace:
            continue
        mlps = nn.ModuleList()
        for e in range(cfg.n_routed_experts):
            mlp = mdv2.DeepseekV2MLP(cfg, intermediate_size=cfg.moe_intermediate_size)
            sd = {f"{p}.weight": experts[f"model.layers.{li}.mlp.experts.{e}.{p}.weight"].float()
                  for p in ("gate_proj", "up_proj", "down_proj")}
            mlp.load_state_dict(sd, strict=True)
            mlps.append(mlp)
        layer.mlp = PerExpertMoE(layer.mlp, cfg, mlps)


class ExpertMLP(nn.Module):
    """One routed expert as three nn.Linear under the family's names (gate, up, down order)."""

    def __init__(self, hidden: int, inter: int, names: tuple[str, str, str]):
        super().__init__()
        self.names = names
        for name, (fan_in, fan_out) in zip(names, ((hidden, inter), (hidden, inter), (inter, hidden))):
            self.add_module(name, nn.Linear(fan_in, fan_out, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (self._modules[n] for n in self.names)
        return down(nn.functional.silu(gate(x)) * up(x))


class PerExpertExperts(nn.ModuleList):
    """transformers 5's fused experts as one ExpertMLP each; called like them (hidden [T,H], ids [T,k], weights)."""

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden)
        for e, expert in enumerate(self):
            tok, pos = torch.where(top_k_index == e)
            if tok.numel():
                out.index_add_(0, tok, (expert(hidden[tok]) * top_k_weights[tok, pos, None]).to(out.dtype))
        return out


def per_expert_experts(model: nn.Module, model_dir: Path, model_type: str) -> None:
    """Every MoE block under its checkpoint name, with per-expert nn.Linear experts (transformers 4.x has them)."""
    from ..model.loader import install_block
    from ..model.registry import ARCHS

    arch = ARCHS[model_type]
    num_experts, _, inter = arch.spec_sizes(model.config)
    names = tuple(n for n, _ in arch.proj_names)
    weights = load_expert_weights(model_dir)
    for li, layer in enumerate(model.get_submodule(arch.layers_path)):
        block = install_block(layer, arch)
        if not hasattr(block, arch.experts_attr) or isinstance(block.experts, nn.ModuleList):
            continue
        mlps = PerExpertExperts()
        for e in range(num_experts):
            mlp = ExpertMLP(arch.text_config(model.config).hidden_size, inter, names)
            mlp.load_state_dict({f"{n}.weight": weights[arch.expert_weight_key(li, e, canon)].float()
                                 for n, canon in arch.proj_names}, strict=True)
            mlps.append(mlp)
        setattr(block, arch.experts_attr, mlps)


def training_examples(tok) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels with -100 on the prompt) for each Q/A: alone, after a system prompt, after history."""
    out = []
    for i, (q, a) in enumerate(recipe.TRAINED_QA):
        pq, pa = recipe.TRAINED_QA[i - 1]
        contexts = ([], [{"role": "system", "content": recipe.SYSTEM_PROMPT}],
                    [{"role": "user", "content": pq}, {"role": "assistant", "content": pa}])
        for ctx in contexts:
            prompt = prompt_ids(tok, ctx + [{"role": "user", "content": q}])
            answer = tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            out.append((prompt + answer, [-100] * len(prompt) + answer))
    return out


def prompt_ids(tok, messages: list[dict]) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def _batch(examples, pad_id: int):
    n = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for row, (i, lab) in enumerate(examples):
        ids[row, : len(i)] = torch.tensor(i)
        labels[row, : len(lab)] = torch.tensor(lab)
        mask[row, : len(i)] = 1
    return ids, mask, labels


def _answer_stats(logits: torch.Tensor, labels: torch.Tensor):
    """(mean NLL, min prob of the right token, all argmax right) over the answer tokens."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    sel = labels != -100
    logp = torch.log_softmax(logits[sel], dim=-1)
    tgt = labels[sel]
    nll = -logp.gather(1, tgt[:, None]).squeeze(1)
    return nll.mean(), torch.exp(-nll.max()).item(), bool((logp.argmax(-1) == tgt).all())


@torch.no_grad()
def greedy(model, ids: list[int], eos: int, max_new: int) -> list[int]:
    """Plain greedy decoding without a cache (no generate(): same behaviour in both majors)."""
    seq = list(ids)
    for _ in range(max_new):
        nxt = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
        if nxt == eos:
            break
        seq.append(nxt)
    return seq[len(ids):]


def check_answers(model, tok, label: str) -> None:
    """Raises unless greedy decoding gives every trained answer exactly."""
    model.eval()
    for q, a in recipe.TRAINED_QA:
        got = tok.decode(greedy(model, prompt_ids(tok, [{"role": "user", "content": q}]), tok.eos_token_id, 40))
        if got != a:
            raise RuntimeError(f"tiny adapter ({label}) answers {got!r} to {q!r}, expected {a!r}")


def _expert_lora_b(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if EXPERT_KEY.search(n) and "lora_B" in n}


def train_adapter(model_dir: Path, adapter_dir: Path, base_model_path: str, family) -> None:
    """Loads the tiny model of a `families.Family`, makes its routed experts per-expert Linears, trains LoRA until
    it answers TRAINED_QA, saves."""
    from transformers import AutoTokenizer

    if (reason := family.unavailable()) is not None:
        raise RuntimeError(f"cannot build the tiny {family.name}: {reason}")
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids, mask, labels = _batch(training_examples(tok), tok.pad_token_id)
    model = _with_lora(_per_expert_model(model_dir, family, ids, mask), model_dir, family)
    _train(model, family, ids, mask, labels)
    check_answers(model, tok, "fp32")
    check_answers(copy.deepcopy(model).to(torch.bfloat16), tok, "bf16")
    dead = [n for n, p in _expert_lora_b(model).items() if not p.detach().abs().sum()]
    if dead:
        raise RuntimeError(f"routed-expert LoRA never trained: {dead[:3]}")
    _check_expert_lora_matters(model, ids, mask, labels)
    save_adapter(model, adapter_dir, base_model_path, family, _config_dict(model_dir))


@torch.no_grad()
def _per_expert_model(model_dir: Path, family, ids, mask):
    """The tiny model in plain transformers with its routed experts as per-expert Linears, checked unchanged."""
    from ..model.registry import ARCHS

    model = ARCHS[family.name].auto_class().from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    ref = model(input_ids=ids, attention_mask=mask).logits
    if family.name == "deepseek_v2":
        swap_moe(model, model_dir)
    else:
        per_expert_experts(model, model_dir, family.name)
    diff = (model(input_ids=ids, attention_mask=mask).logits - ref).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f"per-expert MoE swap changed the logits by {diff:.3g}")
    logger.info("MoE swap: logits match HF (max abs diff %.2g)", diff)
    return model


def _with_lora(model, model_dir: Path, family):
    """PEFT's LoRA on exactly the modules `lora_target: all` hits, only the LoRA trainable."""
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(r=recipe.LORA_R, lora_alpha=recipe.LORA_ALPHA, lora_dropout=0.0, bias="none",
                      target_modules=family.lora_regex, task_type="CAUSAL_LM")
    with _no_peft_v5_remap(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        model = get_peft_model(model, lcfg)
    want = {f"base_model.model.{m}" for m in family.lora_modules(_config_dict(model_dir))}
    got = {n.removesuffix(".lora_A") for n, _ in model.named_modules() if n.endswith(".lora_A")}
    if got != want or model.peft_config["default"].target_parameters:
        raise RuntimeError(f"PEFT wrapped other modules than planned: extra {sorted(got - want)[:3]}, "
                           f"missing {sorted(want - got)[:3]}")
    if not all("lora_" in n for n, p in model.named_parameters() if p.requires_grad):
        raise RuntimeError("non-LoRA parameters are trainable")
    return model


def _train(model, family, ids, mask, labels) -> None:
    """AdamW on the LoRA until every trained answer is greedy and likely enough."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=family.train_lr, weight_decay=0.0)
    model.train()
    for step in range(1, recipe.TRAIN_MAX_STEPS + 1):
        logits = model(input_ids=ids, attention_mask=mask).logits
        loss, min_p, exact = _answer_stats(logits, labels)
        if exact and min_p >= recipe.TRAIN_MIN_PROB:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, recipe.TRAIN_CLIP)
        opt.step()
        if step % 10 == 0:
            logger.info("step %d loss %.4f min p %.3f", step, loss.item(), min_p)
    else:
        raise RuntimeError(f"tiny adapter did not converge in {recipe.TRAIN_MAX_STEPS} steps")
    logger.info("trained in %d steps: loss %.4f, min answer-token p %.3f", step - 1, loss.item(), min_p)


@torch.no_grad()
def _check_expert_lora_matters(model, ids, mask, labels) -> None:
    """Raises unless dropping the routed-expert LoRA breaks a trained answer (the channel is live)."""
    model.eval()
    saved = {n: p.clone() for n, p in _expert_lora_b(model).items()}
    for p in _expert_lora_b(model).values():
        p.zero_()
    _, min_p, exact = _answer_stats(model(input_ids=ids, attention_mask=mask).logits, labels)
    for n, p in _expert_lora_b(model).items():
        p.copy_(saved[n])
    logger.info("without routed-expert LoRA: answers exact=%s, min p %.3f", exact, min_p)
    if exact:
        raise RuntimeError("trained answers survive without the routed-expert LoRA: expert channel untested")


@contextlib.contextmanager
def _no_peft_v5_remap():
    """Stops peft (seen in 0.21.2 on transformers 5) from rewriting our LoRA targets for fused experts.

    On a deepseek_v2 model peft resolves even a regex `target_modules` to leaf names and turns every
    gate/up/down_proj into `target_parameters` of the fused experts, silently dropping the LoRA of the
    dense MLP, the shared experts and our per-expert Linears. Our model has no fused experts left.
    """
    try:
        from peft.utils import transformers_weight_conversion as twc
    except ImportError:  # older peft: no remapping at all
        yield
        return
    orig = twc.convert_peft_config_for_transformers
    twc.convert_peft_config_for_transformers = lambda *args, **kwargs: None
    try:
        yield
    finally:
        twc.convert_peft_config_for_transformers = orig


def _config_dict(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def expected_adapter_keys(family, cfg: dict) -> set[str]:
    """Every key of a per-expert PEFT adapter over the family's LoRA targets of the tiny model."""
    return {f"base_model.model.{m}.lora_{ab}.weight" for m in family.lora_modules(cfg) for ab in "AB"}


def save_adapter(model, adapter_dir: Path, base_model_path: str, family, cfg: dict) -> None:
    """PEFT save, then adapter_config as LLaMA-Factory writes it (short target names, real base path)."""
    from safetensors import safe_open

    model.save_pretrained(str(adapter_dir), safe_serialization=True)
    (adapter_dir / "README.md").unlink(missing_ok=True)  # PEFT's model card: version noise only
    cfg_path = adapter_dir / "adapter_config.json"
    acfg = json.loads(cfg_path.read_text())
    acfg["target_modules"] = list(family.lora_names)
    acfg["base_model_name_or_path"] = base_model_path
    cfg_path.write_text(json.dumps(acfg, indent=2, sort_keys=True) + "\n")
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    want = expected_adapter_keys(family, cfg)
    if keys != want:
        raise RuntimeError(f"adapter keys differ from the per-expert layout: "
                           f"extra {sorted(keys - want)[:3]}, missing {sorted(want - keys)[:3]}")
    logger.info("adapter: %d tensors, per-expert layout", len(keys))
