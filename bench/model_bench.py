"""End-to-end speed of KT mode on a random-weight checkpoint with DeepSeek-V2-Lite's configuration (or, with
--family, Qwen3.5-35B-A3B's text model or GLM-4.5-Air's layer shapes at a layer count of about the same ~16B
parameters), against plain transformers on the GPU (with and without the adapter). No downloads: weights and adapter
are random.

    python bench/model_bench.py --layers 27 --out /tmp/bench            # the whole table
    python bench/model_bench.py --layers 4 --variants hf kt-exact kt-exact-eager
    python bench/model_bench.py --family glm4_moe --variants hf-peft kt-exact --json /tmp/glm.json
    python bench/model_bench.py --prefill-lengths 512 2048 8192 --variants hf-peft kt-exact kt-exact-gpu   # GPU prefill

Each variant runs in its own process (clean CPU/GPU memory peaks); the parent prints medians and ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ktchat.runtime import wanted_environment

os.environ.update({k: v for k, v in wanted_environment().items() if k != "GLIBC_TUNABLES"})  # that one: at start
os.environ.setdefault("HF_HUB_OFFLINE", "1")

V2_LITE = {
    "model_type": "deepseek_v2", "architectures": ["DeepseekV2ForCausalLM"], "vocab_size": 102400,
    "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
    "num_attention_heads": 16, "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64,
    "num_experts_per_tok": 6, "routed_scaling_factor": 1.0, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
    "norm_topk_prob": False, "scoring_func": "softmax", "first_k_dense_replace": 1, "moe_layer_freq": 1,
    "kv_lora_rank": 512, "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "hidden_act": "silu", "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    "attention_bias": False, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 100000,
    "eos_token_id": 100001, "use_cache": True, "initializer_range": 0.02, "aux_loss_alpha": 0.001, "seq_aux": True,
}
# Qwen3.5-35B-A3B's text model (Qwen3_5MoeTextConfig's defaults): 3 Gated DeltaNet layers then 1 gated full
# attention layer, every layer sparse with a sigmoid-gated shared expert; 18 layers are 16.2B parameters (its 40: 34.7B)
QWEN3_5_MOE = {
    "model_type": "qwen3_5_moe_text", "architectures": ["Qwen3_5MoeForCausalLM"], "vocab_size": 248320,
    "hidden_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 16, "num_key_value_heads": 2,
    "head_dim": 256, "attention_bias": False, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128,
    "linear_value_head_dim": 128, "linear_num_key_heads": 16, "linear_num_value_heads": 32,
    "full_attention_interval": 4, "layer_types": None, "num_experts": 256, "num_experts_per_tok": 8,
    "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512, "router_aux_loss_coef": 0.001,
    "output_router_logits": False, "hidden_act": "silu", "max_position_embeddings": 262144, "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000000, "partial_rotary_factor": 0.25,
                        "mrope_section": [11, 11, 10], "mrope_interleaved": True},
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "eos_token_id": 248319, "use_cache": True,
    "initializer_range": 0.02,
}
# GLM-4.5-Air (Glm4MoeConfig's defaults): GQA with q/k/v bias, no q/k norm, a dense first layer, sigmoid routing with
# a score-correction bias; 7 layers are 15.5B parameters (its 46: 106B); no MTP layer (neither side runs one)
GLM45_AIR = {
    "model_type": "glm4_moe", "architectures": ["Glm4MoeForCausalLM"], "vocab_size": 151552, "hidden_size": 4096,
    "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 7, "num_attention_heads": 96,
    "num_key_value_heads": 8, "head_dim": 128, "partial_rotary_factor": 0.5, "attention_bias": True,
    "use_qk_norm": False, "n_routed_experts": 128, "num_experts_per_tok": 8, "n_shared_experts": 1, "n_group": 1,
    "topk_group": 1, "routed_scaling_factor": 1.0, "norm_topk_prob": True, "first_k_dense_replace": 1,
    "num_nextn_predict_layers": 0, "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
    "rope_theta": 1000000, "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "eos_token_id": 151551, "use_cache": True, "initializer_range": 0.02,
}
MLA = ("q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
GQA = ("q_proj", "k_proj", "v_proj", "o_proj")
GDN = ("in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
FAMILIES = {  # --family: (checkpoint folder, config.json, transformers package, LoRA targets: what `lora_target: all` hits)
    "deepseek_v2": ("v2lite", V2_LITE, "deepseek_v2", MLA + MLP),
    "qwen3_5_moe_text": ("qwen3_5moe", QWEN3_5_MOE, "qwen3_5_moe", GQA + GDN + MLP + ("shared_expert_gate",)),
    "glm4_moe": ("glm45air", GLM45_AIR, "glm4_moe", GQA + MLP),
}
KT = {"experts_backend": "kt", "kt_method": "bf16"}
# --skew: the score-correction bias of DeepSeek-V3 / GLM-4-MoE's routing, from +SKEW (expert 0) to -SKEW (the last):
# random weights route near uniformly, real models do not (docs/gpu-experts.md); what keeping the frequent experts gains
SKEW = 0.0
VARIANTS = {  # name -> (engine, load_model keyword arguments); a ":tN" suffix sets N kt worker threads
    "hf": ("hf", {}), "hf-peft": ("hf-peft", {}),
    "kt-exact": ("ktchat", dict(KT, moe_lora="exact")),
    "kt-exact-eager": ("ktchat", dict(KT, moe_lora="exact", cuda_graphs=False)),
    "kt-exact-peftmerged": ("ktchat", dict(KT, moe_lora="exact", merge_peft_lora=True)),
    "kt-merged-bf16": ("ktchat", dict(KT, moe_lora="merged")),
    "kt-merged-int8": ("ktchat", dict(KT, moe_lora="merged", kt_method="int8")),
    "kt-noadapter": ("ktchat-base", KT),
    "kt-noadapter-int8": ("ktchat-base", dict(KT, kt_method="int8")),
    "torch": ("ktchat", {"experts_backend": "torch"}),
    # GPU prefill (routed experts streamed to the GPU for long prompts; kt keeps its bf16 weights for it)
    "kt-exact-gpu": ("ktchat", dict(KT, moe_lora="exact", gpu_prefill_tokens="auto")),
    "kt-merged-bf16-gpu": ("ktchat", dict(KT, moe_lora="merged", gpu_prefill_tokens="auto")),
    "kt-merged-int8-gpu": ("ktchat", dict(KT, moe_lora="merged", kt_method="int8", gpu_prefill_tokens="auto")),
}


def variant(name: str) -> tuple[str, dict]:
    """A variant's engine and load_model arguments. Suffixes: ":tN" sets N kt worker threads, "@G" keeps G GiB of
    routed experts on the GPU (gpu_experts_gib; "@auto", or "@all" for every expert)."""
    name, _, gpu = name.partition("@")
    base, _, threads = name.partition(":t")
    engine, kwargs = VARIANTS[base]
    kwargs = dict(kwargs, num_threads=int(threads)) if threads else dict(kwargs)
    if gpu:
        kwargs["gpu_experts_gib"] = 1e6 if gpu == "all" else gpu if gpu == "auto" else float(gpu)
    return engine, kwargs


def model_config(family: str, layers: int | None) -> dict:
    cfg = FAMILIES[family][1]
    cfg = dict(cfg, num_hidden_layers=layers or cfg["num_hidden_layers"])
    if "layer_types" in cfg:  # Qwen3.5: every full_attention_interval-th layer is full attention
        n = cfg["full_attention_interval"]
        cfg["layer_types"] = [("linear" if (i + 1) % n else "full") + "_attention" for i in range(cfg["num_hidden_layers"])]
    return cfg


def shapes(cfg: dict):
    """(name, shape) of every tensor of the checkpoint, in on-disk names."""
    h, v, heads = cfg["hidden_size"], cfg["vocab_size"], cfg["num_attention_heads"]
    yield "model.embed_tokens.weight", (v, h)
    yield "lm_head.weight", (v, h)
    yield "model.norm.weight", (h,)
    e = cfg.get("n_routed_experts") or cfg["num_experts"]
    kinds = cfg.get("layer_types") or ["full_attention"] * cfg["num_hidden_layers"]
    for layer, kind in enumerate(kinds):
        p = f"model.layers.{layer}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "post_attention_layernorm.weight", (h,)
        if "kv_lora_rank" in cfg:  # DeepSeek-V2's MLA (no q_lora)
            nope, rope, vd, kvr = (cfg[k] for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "kv_lora_rank"))
            yield p + "self_attn.q_proj.weight", (heads * (nope + rope), h)
            yield p + "self_attn.kv_a_proj_with_mqa.weight", (kvr + rope, h)
            yield p + "self_attn.kv_a_layernorm.weight", (kvr,)
            yield p + "self_attn.kv_b_proj.weight", (heads * (nope + vd), kvr)
            yield p + "self_attn.o_proj.weight", (h, heads * vd)
        elif kind == "linear_attention":  # Qwen3.5's Gated DeltaNet
            a, nv, vd = p + "linear_attn.", cfg["linear_num_value_heads"], cfg["linear_value_head_dim"]
            conv = 2 * cfg["linear_num_key_heads"] * cfg["linear_key_head_dim"] + nv * vd
            yield from ((a + "in_proj_qkv.weight", (conv, h)), (a + "in_proj_z.weight", (nv * vd, h)),
                        (a + "in_proj_a.weight", (nv, h)), (a + "in_proj_b.weight", (nv, h)),
                        (a + "conv1d.weight", (conv, 1, cfg["linear_conv_kernel_dim"])), (a + "dt_bias", (nv,)),
                        (a + "A_log", (nv,)), (a + "norm.weight", (vd,)), (a + "out_proj.weight", (h, nv * vd)))
        else:  # GQA; Qwen3.5's q_proj also holds the output gate, and it has q/k norms
            hd, kv, gated = cfg["head_dim"], cfg["num_key_value_heads"], "layer_types" in cfg
            for name, out in (("q_proj", heads * hd * (1 + gated)), ("k_proj", kv * hd), ("v_proj", kv * hd)):
                yield p + f"self_attn.{name}.weight", (out, h)
                if cfg["attention_bias"]:
                    yield p + f"self_attn.{name}.bias", (out,)
            yield p + "self_attn.o_proj.weight", (h, heads * hd)
            if gated or cfg.get("use_qk_norm"):
                yield from ((p + "self_attn.q_norm.weight", (hd,)), (p + "self_attn.k_norm.weight", (hd,)))
        if layer < cfg.get("first_k_dense_replace", 0):
            yield from mlp(p + "mlp.", h, cfg["intermediate_size"])
            continue
        i = cfg["moe_intermediate_size"]
        yield p + "mlp.gate.weight", (e, h)
        if cfg["model_type"] == "glm4_moe":
            yield p + "mlp.gate.e_score_correction_bias", (e,)
        if "n_shared_experts" in cfg:
            yield from mlp(p + "mlp.shared_experts.", h, i * cfg["n_shared_experts"])
        else:  # Qwen's sigmoid-gated shared expert
            yield from mlp(p + "mlp.shared_expert.", h, cfg["shared_expert_intermediate_size"])
            yield p + "mlp.shared_expert_gate.weight", (1, h)
        for x in range(e):
            yield from mlp(p + f"mlp.experts.{x}.", h, i)


def mlp(prefix, h, i):
    yield prefix + "gate_proj.weight", (i, h)
    yield prefix + "up_proj.weight", (i, h)
    yield prefix + "down_proj.weight", (h, i)


def write_checkpoint(root: Path, family: str, layers: int, rank: int) -> Path:
    """Random bf16 weights in ~2 GB shards (norms 1, biases 0, the score-correction bias fp32) + a random rank-`rank`
    all-target adapter (per-expert PEFT layout). The random numbers come from the GPU when there is one (the CPU
    takes minutes for 15.7B of them)."""
    import torch
    from safetensors.torch import save_file

    model, adapter = root / "model", root / "adapter"
    if (adapter / "adapter_model.safetensors").exists():
        return root
    model.mkdir(parents=True, exist_ok=True)
    adapter.mkdir(parents=True, exist_ok=True)
    cfg, targets = model_config(family, layers), FAMILIES[family][3]
    (model / "config.json").write_text(json.dumps(cfg, indent=2))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(dev).manual_seed(0)
    randn = lambda *shape: torch.randn(shape, generator=gen, device=dev)  # noqa: E731
    shard, size, index, lora = {}, 0, {}, {}

    def flush():
        nonlocal shard, size
        name = f"model-{len(set(index.values())) + 1:05d}.safetensors"
        save_file(shard, str(model / name))
        index.update({k: name for k in shard})
        shard, size = {}, 0

    for name, shape in shapes(cfg):
        last = name.rsplit(".", 1)[-1]
        dtype = torch.float32 if last == "e_score_correction_bias" else torch.bfloat16
        if last == "e_score_correction_bias" and SKEW:  # a router that favours the first experts, smoothly
            shard[name], size = SKEW * torch.linspace(1, -1, shape[0]), size + 4 * shape[0]
            continue
        t = ((torch.zeros if "bias" in last else torch.ones)(shape, dtype=dtype) if len(shape) == 1
             else (randn(*shape) * 0.02).bfloat16().cpu())
        shard[name], size = t, size + t.nbytes
        module = name.removesuffix(".weight")
        if len(shape) == 2 and module.rsplit(".", 1)[-1] in targets:
            lora[f"base_model.model.{module}.lora_A.weight"] = (randn(rank, shape[1]) / shape[1] ** 0.5).bfloat16().cpu()
            lora[f"base_model.model.{module}.lora_B.weight"] = (randn(shape[0], rank) * 0.01).bfloat16().cpu()
        if size > 2e9:
            flush()
    flush()
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    save_file(lora, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
        "bias": "none", "target_modules": list(targets), "base_model_name_or_path": str(model)}))
    write_tokenizer(model, cfg["vocab_size"])
    return root


def non_expert_bytes(cfg: dict) -> int:
    """What KT mode keeps on the GPU: every weight but the routed experts (bf16)."""
    return sum(2 * math.prod(shape) for name, shape in shapes(cfg) if ".mlp.experts." not in name)


def warm_page_cache(model: Path) -> None:
    """Reads every shard once, so each variant's load starts from the same (cached) state."""
    for f in sorted(model.glob("*.safetensors")):
        with open(f, "rb") as fh:
            while fh.read(1 << 26):
                pass


def write_tokenizer(model: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab - 2)} | {"<unk>": vocab - 2, "<eos>": vocab - 1}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>").save_pretrained(model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps(dict(cfg, tokenizer_class="PreTrainedTokenizerFast")))


def load(engine: str, root: Path, kwargs: dict):
    import torch

    kwargs = dict(kwargs)
    device_map = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU: a smoke run of the bench's own code
    if engine.startswith("hf"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.bfloat16, device_map=device_map)
        if engine == "hf-peft":
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(root / "adapter"))
        return model.eval()
    from ktchat import load_model

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    adapter = None if engine == "ktchat-base" else root / "adapter"
    return load_model(root / "model", adapter, dtype="bfloat16", **kwargs)[0]


def import_engine(engine: str, family: str) -> None:
    import importlib

    package = FAMILIES[family][2]
    importlib.import_module(f"transformers.models.{package}.modeling_{package}")

    if engine != "hf":
        import peft  # noqa: F401
    if engine.startswith("ktchat"):
        import kt_kernel  # noqa: F401

        import ktchat.engine  # noqa: F401


def timed(fn) -> float:
    """Wall time of fn, GPU work included where CUDA is in use (never starts CUDA itself: the parent stays off it)."""
    import torch

    def sync():
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()

    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def run_variant(name: str, root: Path, family: str, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    import torch

    engine, kwargs = variant(name)
    gpu = torch.cuda.is_available()  # without one: a smoke run (tiny --layers) of the bench's code, no figures
    if gpu:
        torch.cuda.synchronize()  # creates the CUDA context before any timer: neither imports nor load pay for it
    import_s = timed(lambda: import_engine(engine, family))  # apart from the load: both sides pay it once per process
    load_s = timed(lambda: globals().__setitem__("_model", load(engine, root, kwargs)))
    model = globals().pop("_model")
    ids = torch.randint(0, 100000, (1, prompt_len), generator=torch.Generator().manual_seed(0)).to(model.device)
    gen = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        model(ids[:, :16])  # warm-up
        model.generate(ids, **gen)  # warm-up (captures the decode graph where there is one)
        prefill = [timed(lambda: model(ids)) for _ in range(repeats)]
        total = [timed(lambda: model.generate(ids, **gen)) for _ in range(repeats)]
    decode = [(t - p) / (new_tokens - 1) for t, p in zip(total, prefill)]
    return {
        **engine_figures(model),
        "variant": name, "load_s": load_s, "import_s": import_s, "prefill_tok_s": prompt_len / statistics.median(prefill),
        "decode_tok_s": 1 / statistics.median(decode), "decode_ms": 1000 * statistics.median(decode),
        "gpu_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else 0.0,
        "cpu_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def engine_figures(model) -> dict:
    """The engine's side of a ktchat run (after the timings: the hf variants import no ktchat before): whether the
    decode step was one CUDA graph, the cache's size, and where a graphed token goes."""
    from ktchat import KTChatError
    from ktchat.model import engine_of

    try:
        engine = engine_of(model)
    except KTChatError:  # plain transformers (+ PEFT)
        return {"graph": False, "kv_cache_gib": 0.0}
    from ktchat.model import offloaded_blocks

    captured = list(engine.runner._captured.values())
    cache = engine.cache
    blocks = offloaded_blocks(model).values()
    kept = [b.plan.resident for b in blocks if b.plan.resident is not None]
    figures = {"graph": bool(captured), "eager_reason": engine.runner.eager_reason,
               "kv_cache_gib": cache.slots * cache.slot_bytes() / 2**30 if cache is not None else 0.0,
               "gpu_experts": sum(len(k.experts) for k in kept), "gpu_experts_gib": sum(k.nbytes for k in kept) / 2**30,
               "gpu_experts_share": sum(len(k.experts) for k in kept) / sum(b.experts.backend.spec.num_experts
                                                                            for b in blocks)}
    if captured:
        figures.update(decode_breakdown(engine, captured[-1]))
    return figures


def run_prefill(name: str, root: Path, family: str, lengths: list[int], repeats: int) -> dict:
    """Prefill only, at each prompt length (medians); with GPU prefill also the pinned copy rate measured here (the
    link floor) and the logits of the GPU path against the CPU experts' on the same model and prompt."""
    import torch

    engine, kwargs = variant(name)
    torch.cuda.synchronize()
    import_s = timed(lambda: import_engine(engine, family))
    load_s = timed(lambda: globals().__setitem__("_model", load(engine, root, kwargs)))
    model = globals().pop("_model")
    gen = torch.Generator().manual_seed(0)
    result = {"variant": name, "load_s": load_s, "import_s": import_s, "prefill": {}}
    with torch.no_grad():
        model(torch.randint(0, 100000, (1, 64), generator=gen).cuda())  # warm-up
        for n in lengths:
            ids = torch.randint(0, 100000, (1, n), generator=gen).cuda()
            model(ids)  # warm-up at this length (allocator, kernels)
            runs = [timed(lambda: model(ids)) for _ in range(repeats)]
            result["prefill"][str(n)] = {"tok_s": n / statistics.median(runs), "s": runs}
        if engine == "ktchat" and kwargs.get("gpu_prefill_tokens") not in (None, "off"):
            result.update(gpu_prefill_check(model, gen))
    result["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    result["cpu_peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return result


def gpu_prefill_check(model, gen, check_tokens: int = 2048) -> dict:
    """The copy rate the floor is judged by, the streamer's figures, and GPU-path logits vs the CPU experts'."""
    import torch

    from ktchat.experts.gpu_prefill import copy_bandwidth
    from ktchat.model import offloaded_blocks

    blocks = offloaded_blocks(model).values()
    streamer, tokens = next(iter(blocks)).plan.streamed, next(iter(blocks)).plan.stream_from
    bw = max(copy_bandwidth(streamer.device, 1 << 30) for _ in range(3))
    ids = torch.randint(0, 100000, (1, check_tokens), generator=gen).cuda()
    layer = sorted(offloaded_blocks(model))[len(blocks) // 2]
    seen, stream = {}, streamer.forward
    streamer.forward = lambda i, *a: (seen.setdefault(i, a), stream(i, *a))[1]  # keeps one layer's inputs
    gpu = model(ids).logits.float()
    del streamer.forward
    for b in blocks:
        b.plan = dataclasses.replace(b.plan, stream_from=1 << 40)  # everything on the CPU experts
    cpu = model(ids).logits.float()
    for b in blocks:
        b.plan = dataclasses.replace(b.plan, stream_from=tokens)
    err = ((gpu - cpu).norm() / cpu.norm()).item()
    one = one_layer_errors(offloaded_blocks(model)[layer], streamer, seen[layer])
    return {**one, "check_layer": layer,"threshold_tokens": tokens, "pinned_copy_gbs": bw / 1e9, "expert_bytes": streamer.host_bytes,
            "group": streamer.group, "num_experts": streamer.num_experts, "slot_gib": streamer.slot_bytes / 2**30,
            "floor_s": streamer.host_bytes / bw, "check_tokens": check_tokens, "gpu_vs_cpu_experts_rel_err": err,
            "greedy_last_equal": bool((gpu[0, -1].argmax() == cpu[0, -1].argmax()).item())}


def one_layer_errors(block, streamer, inputs) -> dict:
    """One layer's routed experts on a real prompt's hidden states, against the same layer in fp32 (bf16 weights
    upcast, LoRA merged in fp32 on the GPU): the GPU path's error beside the CPU kernel's."""
    import torch

    from ktchat.experts.base import HostExperts
    from ktchat.experts.gpu_prefill import StreamedExperts

    x, ids, w = inputs
    backend = block.cpu_experts.backend
    host = backend.host_experts()
    fp32 = HostExperts({p: t.float() for p, t in host.weights.items()}, host.lora, merge=True)
    want = StreamedExperts({block.layer_idx: fp32}, streamer.device, 8 << 30).forward(block.layer_idx, x.float(), ids, w)
    gpu = streamer.forward(block.layer_idx, x, ids, w).float()
    cpu = backend.forward(x.cpu(), ids.cpu(), w.cpu()).float().to(want.device)
    rel = lambda got: ((got - want).norm() / want.norm()).item()  # noqa: E731
    return {"layer_gpu_vs_fp32": rel(gpu), "layer_cpu_kernel_vs_fp32": rel(cpu)}


def prefill_report(rows: list[dict], lengths: list[int]) -> None:
    floor = next((r["floor_s"] for r in rows if "floor_s" in r), None)
    head = " | ".join(f"{n} tok/s" for n in lengths)
    print(f"\n| variant | {head} | load s |\n|---|" + "---|" * len(lengths) + "---|")
    for r in rows:
        cells = " | ".join(f"{r['prefill'][str(n)]['tok_s']:,.0f}" for n in lengths)
        print(f"| {r['variant']} | {cells} | {r['load_s']:.1f} |")
    if floor:
        cells = " | ".join(f"{n / floor:,.0f}" for n in lengths)
        print(f"| link floor (expert bytes / pinned copy rate) | {cells} | |")
    for r in rows:
        if "floor_s" in r:
            print(f"{r['variant']}: threshold {r['threshold_tokens']} tokens, {r['expert_bytes'] / 1e9:.1f} GB experts, "
                  f"pinned {r['pinned_copy_gbs']:.1f} GB/s, floor {r['floor_s']:.3f} s, groups of {r['group']}/"
                  f"{r['num_experts']}; GPU vs CPU experts at {r['check_tokens']} tokens: rel err "
                  f"{r['gpu_vs_cpu_experts_rel_err']:.2e}, last greedy equal {r['greedy_last_equal']}; layer "
                  f"{r['check_layer']} vs fp32: GPU {r['layer_gpu_vs_fp32']:.2e}, CPU kernel {r['layer_cpu_kernel_vs_fp32']:.2e}; "
                  + ", ".join(f"{n}: {n / r['prefill'][str(n)]['tok_s'] / r['floor_s']:.2f}x floor" for n in lengths))


def decode_breakdown(engine, graph, repeats: int = 20) -> dict:
    """Where a graphed decode token goes: the graph alone (GPU work + CPU experts inside), and the CPU experts
    alone (every layer's bound task run from the host on the same buffers)."""
    replay = [timed(graph.graph.replay) for _ in range(repeats)]
    rows = graph.inputs["rows"].shape[0]  # the graph's batch bucket: each experts module's task bound for it
    bound = [e._bound[rows][0] for e in engine.runner.experts]

    def experts():
        for b in bound:
            b.submit()
            b.wait()

    cpu = [timed(experts) for _ in range(repeats)]
    return {"replay_ms": 1000 * statistics.median(replay), "experts_ms": 1000 * statistics.median(cpu)}


def cpu_bandwidth_gbs(gib: float = 4.0, repeats: int = 8) -> dict[str, float]:
    """Read bandwidth: an fp32 reduction (vectorised) over a tensor far larger than the caches, the best of
    `repeats`: one thread per core on 4 KiB and on huge pages (fewer TLB misses; the highest sets the floor, the
    strictest), and on huge pages with as many threads as the kt workers get (what the experts can draw on)."""
    import torch

    from ktchat.experts.base import huge_page_empty
    from ktchat.experts.kt_backend import default_threads

    cores = len(os.sched_getaffinity(0))
    result = {}
    for name, threads, alloc in (("4k pages", cores, torch.empty), ("huge pages", cores, huge_page_empty),
                                 (f"huge pages, {default_threads()} threads", default_threads(), huge_page_empty)):
        torch.set_num_threads(threads)
        x = alloc((int(gib * 2**30 / 4),), dtype=torch.float32)
        x.fill_(1)
        x.sum()
        result[name] = x.numel() * 4 / min(timed(x.sum) for _ in range(repeats)) / 1e9
        del x
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("/tmp/ktchat-bench"))
    ap.add_argument("--family", choices=list(FAMILIES), default="deepseek_v2")
    ap.add_argument("--layers", type=int, help="default: the family's ~16B-parameter count (DeepSeek-V2-Lite's 27)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--json", type=Path, help="also write the config, bandwidth and rows here")
    ap.add_argument("--resume", action="store_true", help="keep the results of variants already measured here")
    ap.add_argument("--prefill-lengths", type=int, nargs="+", help="prefill only, at these prompt lengths")
    ap.add_argument("--skew", type=float, default=0.0, help="a skewed router (noaux families: the score-correction "
                    "bias from +SKEW to -SKEW across the experts)")
    ap.add_argument("--run", help=argparse.SUPPRESS)  # internal: one variant, JSON on stdout
    args = ap.parse_args()
    args.layers = model_config(args.family, args.layers)["num_hidden_layers"]
    global SKEW
    SKEW = args.skew
    root = args.out / f"{FAMILIES[args.family][0]}-{args.layers}l-r{args.rank}{f'-skew{SKEW:g}' if SKEW else ''}"
    if args.run:  # JSON to a file: kt_kernel prints to stdout at exit
        if args.prefill_lengths:
            result = run_prefill(args.run, root, args.family, args.prefill_lengths, args.repeats)
        else:
            result = run_variant(args.run, root, args.family, args.prompt, args.new_tokens, args.repeats)
        (root / f"result-{args.run}.json").write_text(json.dumps(result))
        return
    start = time.perf_counter()
    write_checkpoint(root, args.family, args.layers, args.rank)
    params = sum(math.prod(shape) for _, shape in shapes(model_config(args.family, args.layers)))
    print(f"checkpoint ready in {time.perf_counter() - start:.0f}s: {root} ({params / 1e9:.2f}B parameters)", flush=True)
    os.sync()  # the checkpoint written out first: writeback would steal bandwidth
    bw = cpu_bandwidth_gbs()  # before any variant: nothing else running
    rows = []
    for name in args.variants:
        done = root / f"result-{name}.json"
        if args.resume and done.exists():
            rows.append(json.loads(done.read_text()))
            continue
        warm_page_cache(root / "model")
        cmd = [sys.executable, __file__, "--out", str(args.out), "--family", args.family, "--layers", str(args.layers),
               "--rank", str(args.rank),
               "--prompt", str(args.prompt), "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
               "--skew", str(args.skew), "--run", name] + (
                   ["--prefill-lengths", *map(str, args.prefill_lengths)] if args.prefill_lengths else [])
        # Every variant runs in the process environment the ktchat command gives itself (huge pages, OpenMP).
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **wanted_environment()})
        if proc.returncode:
            print(f"{name}: failed\n{proc.stderr[-3000:]}", flush=True)
            continue
        rows.append(json.loads((root / f"result-{name}.json").read_text()))
        said = [line for line in proc.stderr.splitlines() if "loaded " in line or "CUDA graph" in line
                or "GPU prefill" in line]
        print("\n".join(said + [json.dumps(rows[-1]), f"({time.perf_counter() - start:.0f}s)"]), flush=True)
    prefill_report(rows, args.prefill_lengths) if args.prefill_lengths else report(rows, args, bw)
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "family": args.family, "layers": args.layers,
                                         "parameters": params, "config": model_config(args.family, args.layers),
                                         "cpu_read_bandwidth_gbs": bw, "rows": rows}, indent=1))


def report(rows: list[dict], args, bandwidth: dict[str, float]) -> None:
    cfg = model_config(args.family, args.layers)
    moe_layers = args.layers - cfg.get("first_k_dense_replace", 0)
    active = moe_layers * cfg["num_experts_per_tok"] * 3 * cfg["hidden_size"] * cfg["moe_intermediate_size"]
    bw = max(bandwidth.values())
    floor = {"bf16": bw * 1e9 / (active * 2), "int8": bw * 1e9 / active}
    resident = non_expert_bytes(cfg) / 2**30
    pages = ", ".join(f"{k} {v:.0f}" for k, v in bandwidth.items())
    print(f"\nCPU read bandwidth {bw:.0f} GB/s ({pages}); active routed-expert bytes per token: bf16 {active * 2 / 1e9:.2f} GB, "
          f"int8 {active / 1e9:.2f} GB; decode floor: bf16 {floor['bf16']:.1f} tok/s, int8 {floor['int8']:.1f} tok/s; "
          f"non-expert weights {resident:.2f} GiB")
    by = {r["variant"]: r for r in rows}
    hf, peft = by.get("hf"), by.get("hf-peft")
    print(f"\n| variant | load s + imports s | prefill tok/s ({args.prompt}) | decode tok/s | decode ms | of floor | vs hf-peft "
          "| GPU peak GiB (bound) | CPU peak GiB | experts on the GPU (GiB, share) | floor of the CPU's share tok/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    notes = []
    for r in rows:
        kt = r["variant"].startswith(("kt", "torch"))
        fmt = "int8" if "int8" in r["variant"] else "bf16"
        load = f"{r['load_s']:.1f}" + (f" ({r['load_s'] / hf['load_s']:.2f}x hf)" if hf and kt else "")
        load += f" + {r['import_s']:.1f}"
        of_floor = f"{r['decode_tok_s'] / floor[fmt]:.0%} {fmt}" if kt else "-"
        vs_peft = f"{r['decode_tok_s'] / peft['decode_tok_s']:.2f}x" if peft else "-"
        bound = f" ({resident + r['kv_cache_gib'] + 2:.1f})" if kt else ""
        if "replay_ms" in r:
            notes.append(f"{r['variant']}: graph replay {r['replay_ms']:.1f} ms, of which CPU experts alone "
                         f"{r['experts_ms']:.1f} ms; generate adds {r['decode_ms'] - r['replay_ms']:.1f} ms per token")
        share = r.get("gpu_experts_share", 0.0)
        kept = f"{r.get('gpu_experts_gib', 0.0):.1f}, {share:.0%}" if kt else "-"
        cpu_floor = (f"{floor[fmt] / (1 - share):.1f}" if share < 1 else "GPU only") if kt else "-"
        print(f"| {r['variant']}{' (graph)' if r.get('graph') else ''} | {load} | {r['prefill_tok_s']:.0f} | "
              f"{r['decode_tok_s']:.1f} | {r['decode_ms']:.1f} | {of_floor} | {vs_peft} | "
              f"{r['gpu_peak_gib']:.1f}{bound} | {r['cpu_peak_gib']:.1f} | {kept} | {cpu_floor} |")
    print("\n" + "\n".join(notes))


if __name__ == "__main__":
    main()
