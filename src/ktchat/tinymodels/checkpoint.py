"""Writes the tiny base model folder: tokenizer, config.json, generation_config.json, sharded weights.

Every file is written by hand from the recipe (not by a transformers save_pretrained), so the folder
is byte-identical whichever transformers major builds it, and uses the on-disk key names of real
checkpoints of the family (per-expert keys), which both majors load.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from ..formats.checkpoint import SHARD_INDEX, open_checkpoint
from . import recipe
from .families import Family, Spec

logger = logging.getLogger(__name__)

SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
EXPERT_KEY = re.compile(r"\.experts\.\d+\.")


def _dump(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def train_tokenizer():
    """A byte-level BPE trained on the built-in corpus (deterministic, same in tokenizers 0.22/0.23)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.TOKENIZER_VOCAB,
        special_tokens=list(recipe.SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(recipe.corpus(), trainer=trainer)
    return tok


def write_tokenizer(model_dir: Path) -> dict[str, int]:
    """Saves tokenizer.json + tokenizer_config.json + special_tokens_map.json; returns special ids."""
    tok = train_tokenizer()
    tok.save(str(model_dir / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in recipe.SPECIAL_TOKENS}
    added = {
        str(ids[t]): {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }
        for t in recipe.SPECIAL_TOKENS
    }
    _dump(model_dir / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": recipe.BOS,
        "eos_token": recipe.EOS,
        "pad_token": recipe.PAD,
        "additional_special_tokens": list(recipe.SPECIAL_TOKENS[3:]),
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 2048,
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
        "chat_template": recipe.CHAT_TEMPLATE,
    })
    _dump(model_dir / "special_tokens_map.json", {
        "bos_token": recipe.BOS, "eos_token": recipe.EOS, "pad_token": recipe.PAD,
        "additional_special_tokens": list(recipe.SPECIAL_TOKENS[3:]),
    })
    logger.info("tokenizer: %d tokens", tok.get_vocab_size())
    return {"size": tok.get_vocab_size(), "pad": ids[recipe.PAD], "bos": ids[recipe.BOS], "eos": ids[recipe.EOS]}


def write_config(model_dir: Path, tok_info: dict[str, int], family: Family) -> dict:
    """The family's config.json (vocab rounded up to a multiple of 64) and a greedy generation_config.json."""
    vocab = -(-tok_info["size"] // 64) * 64
    cfg = family.config(vocab, tok_info["pad"], tok_info["bos"], tok_info["eos"])
    _dump(model_dir / "config.json", cfg)
    _dump(model_dir / "generation_config.json", {
        "bos_token_id": tok_info["bos"], "eos_token_id": tok_info["eos"], "pad_token_id": tok_info["pad"],
        "do_sample": False, "max_new_tokens": 64,
    })
    return cfg


def random_weights(specs: list[Spec]) -> dict:
    """Seeded random bf16 tensors: one private generator, fixed order, so every build is identical.

    A score-correction bias stays fp32 and non-negative, as in real DeepSeek-V3 checkpoints.
    """
    import torch

    gen = torch.Generator().manual_seed(recipe.SEED)
    out = {}
    for name, shape, kind in specs:
        t = torch.randn(shape, generator=gen, dtype=torch.float32) * recipe.INIT_STD[kind]
        if kind == "norm":
            t += 1.0
        out[name] = t.abs().contiguous() if kind == "score_bias" else t.to(torch.bfloat16).contiguous()
    return out


_PER_EXPERT = re.compile(r"(.*\.experts)\.(\d+)\.(gate|up|down)_proj\.weight")
_FUSED = re.compile(r"(.*\.experts)\.(gate_up_proj|down_proj)")


def fuse_experts(weights: dict) -> dict:
    """Per-expert weights -> Qwen3-VL-MoE's shipped layout: per block experts.gate_up_proj [E, H, 2I] (gate
    columns, then up) and experts.down_proj [E, I, H]."""
    import torch

    out, blocks = {}, {}
    for key, t in weights.items():
        m = _PER_EXPERT.fullmatch(key)
        if m is None:
            out[key] = t
        else:
            blocks.setdefault(m[1], {}).setdefault(m[3], {})[int(m[2])] = t
    for block, projs in blocks.items():
        stack = lambda p: torch.stack([projs[p][e].T for e in sorted(projs[p])])  # noqa: E731
        out[f"{block}.gate_up_proj"] = torch.cat([stack("gate"), stack("up")], dim=2).contiguous()
        out[f"{block}.down_proj"] = stack("down").contiguous()
    return out


def split_fused_experts(weights: dict) -> dict:
    """The inverse of fuse_experts: every fused block back to per-expert `.experts.E.{gate,up,down}_proj.weight`."""
    out = {}
    for key, t in weights.items():
        m = _FUSED.fullmatch(key)
        if m is None:
            out[key] = t
            continue
        parts = dict(zip(("gate", "up"), t.chunk(2, dim=2))) if m[2] == "gate_up_proj" else {"down": t}
        for proj, part in parts.items():
            for e in range(part.shape[0]):
                out[f"{m[1]}.{e}.{proj}_proj.weight"] = part[e].T.contiguous()
    return out


def write_weights(model_dir: Path, cfg: dict, family: Family) -> None:
    """The family's tensors for `cfg` in two safetensors shards split by layer, plus model.safetensors.index.json,
    like real checkpoints."""
    from safetensors.torch import save_file

    weights = random_weights(family.weight_specs(cfg))
    if family.fused_on_disk:
        weights = fuse_experts(weights)
    last = re.compile(rf"model\.(language_model\.)?layers\.{cfg.get('text_config', cfg)['num_hidden_layers'] - 1}\.")
    second = [k for k in weights if last.match(k) or not re.match(r"model\.(language_model\.)?layers\.", k)]
    second = [k for k in second if not k.endswith("embed_tokens.weight")]
    shards = {SHARDS[0]: [k for k in weights if k not in second], SHARDS[1]: second}
    weight_map, total = {}, 0
    for fname, keys in shards.items():
        save_file({k: weights[k] for k in keys}, str(model_dir / fname), metadata={"format": "pt"})
        for k in keys:
            weight_map[k] = fname
            total += weights[k].numel() * weights[k].element_size()
    _dump(model_dir / SHARD_INDEX,
          {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    n = sum(w.numel() for w in weights.values())
    logger.info("weights: %d tensors, %.2fM parameters, 2 shards", len(weights), n / 1e6)


def load_expert_weights(model_dir: Path) -> dict:
    """Reads every routed-expert tensor back from the shards (bf16 as stored), per expert whatever the layout."""
    from safetensors import safe_open

    out = {}
    for shard in open_checkpoint(model_dir).shards:
        with safe_open(str(shard), framework="pt") as f:
            for k in f.keys():
                if EXPERT_KEY.search(k) or _FUSED.fullmatch(k):
                    out[k] = f.get_tensor(k)
    return split_fused_experts(out)


def write_model_dir(model_dir: Path, family: Family) -> dict:
    """Tokenizer, configs and weights of a `families.Family` into model_dir; returns the config dict."""
    model_dir.mkdir(parents=True, exist_ok=True)
    tok_info = write_tokenizer(model_dir)
    cfg = write_config(model_dir, tok_info, family)
    write_weights(model_dir, cfg, family)
    return cfg
