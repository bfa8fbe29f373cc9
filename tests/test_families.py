"""Every MoE family in KT mode against the hand-merged fp32 reference (plain transformers, whichever major runs the
suite), and what each family brings: MTP tensors, the score-correction bias and its routing (DeepSeek-V3, V3.1,
GLM-4-MoE), router LoRA, Mixtral's block name, DeepSeek's YaRN attention scale, and layers spread over several
devices."""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
import re
import shutil
from dataclasses import dataclass

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from ktchat import load_model
from ktchat.adapter import read_adapter
from ktchat.model import offloaded_blocks
from ktchat.model.moe import OffloadedMoE
from ktchat.model.registry import arch_for
from ktchat.tinymodels import TRAINED_QA

from reference import (DEVICE, GREEDY_TOKENS, chat_prompt_ids, greedy, load_reference, logits, merge_by_hand, model_class,
                       read_checkpoint, rel_err)
from tolerances import FP32_BOUND, KT_BF16_BOUND

FAMILIES = ("deepseek_v3", "glm4_moe", "qwen2_moe", "qwen3_moe", "mixtral", "qwen3_5_moe_text", "qwen3_5_moe",
            "deepseek_v32", "kimi_k25", "qwen3_vl_moe")
VLMS = ("qwen3_5_moe", "kimi_k25", "qwen3_vl_moe")  # the checkpoints as shipped: text model under model.language_model, a vision tower
MTP_FAMILIES = ("deepseek_v3", "glm4_moe")
# DeepSeek-V3.2's indexer picks each query's top index_topk keys: a discrete choice that CPU and CUDA kernels make
# differently. Plain transformers in fp32 on the H200 against itself on the CPU: 3.6e-2 on the 172-token chat,
# 2.3-2.9e-7 on the prompts shorter than index_topk. Its references run on KT mode's device.
SAME_DEVICE_REFERENCE = ("deepseek_v32",)  # sigmoid + bias routing, an MTP layer in the checkpoint
TF4 = transformers.__version__.startswith("4.")


@dataclass
class Fam:
    name: str
    paths: object
    tok: object
    prompts: list  # 3 trained questions, a 70-token conversation, 300 random tokens
    reference: object
    control: object  # merged without the routed-expert LoRA


def merged(paths, tag: str, keep=lambda module: True, adapter=None):
    """The hand-merged reference, in a folder named after the adapter's bytes: a rebuilt family never meets a stale
    merge."""
    adapter = adapter or paths.adapter
    digest = hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()[:12]
    return load_reference(merge_by_hand(paths.model, adapter, paths.root / f"{tag}-{digest}", keep=keep))


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request, tiny_family):
    from transformers import AutoTokenizer

    paths = tiny_family(request.param)
    tok = AutoTokenizer.from_pretrained(paths.model)
    noise = torch.randint(0, len(tok), (1, 300), generator=torch.Generator().manual_seed(0))
    control = merged(paths, "merged-no-expert-lora", keep=lambda m: not re.search(r"\.experts\.\d+\.", m))
    reference = merged(paths, "merged-all")
    if request.param in SAME_DEVICE_REFERENCE:  # the references compute where KT mode puts the attention
        reference, control = reference.to(DEVICE), control.to(DEVICE)
    return Fam(request.param, paths, tok, chat_prompt_ids(tok) + [noise], reference, control)


@pytest.fixture(scope="module")
def kt_fp32(fam):
    return load_model(fam.paths.model, fam.paths.adapter, experts_backend="torch", dtype="float32", device=DEVICE)[0]


def assert_matches(model, fam, prompts=None):
    for ids in prompts or fam.prompts:
        assert rel_err(logits(model, ids), logits(fam.reference, ids)) < FP32_BOUND


# --- end to end, every family ---------------------------------------------------------------------------------------


def test_logits_equal_reference(fam, kt_fp32):
    assert_matches(kt_fp32, fam)


def test_greedy_equals_reference_and_gives_trained_answers(fam, kt_fp32):
    for ids, (_, answer) in zip(fam.prompts, TRAINED_QA + TRAINED_QA[:1]):
        got = greedy(kt_fp32, ids)
        assert got == greedy(fam.reference, ids)
        assert answer in fam.tok.decode(got, skip_special_tokens=True)


def test_engine_decodes_every_family_as_the_reference(fam):
    """Every family decodes on the engine's cache (its slots, device-side mask and positions; MLA latents absorbed,
    Gated DeltaNet state, V3.2's indexer keys) as the reference does; a conversation going on continues its slot."""
    from ktchat.model import engine_of

    model, _ = load_model(fam.paths.model, fam.paths.adapter, experts_backend="torch", dtype="float32", device=DEVICE)
    engine = engine_of(model)
    def decoded(prompt):
        steps = engine.runner.steps
        tokens = greedy(model, prompt)
        assert tokens == greedy(fam.reference, prompt)
        assert engine.runner.steps - steps == len(tokens) - 1, "the engine did not decode"
        return tokens

    decoded(fam.prompts[1])
    first = decoded(fam.prompts[0])
    ids = fam.prompts[0].to(model.device)
    out = model.generate(ids, max_new_tokens=len(first), do_sample=False, output_scores=True,
                         return_dict_in_generate=True)  # every decode step's logits, on what the slot held
    want = logits(fam.reference, out.sequences[:, :-1].cpu())[0, ids.shape[1] - 1:]
    assert rel_err(torch.stack(out.scores)[:, 0].float().cpu(), want) < FP32_BOUND
    decoded(torch.cat([fam.prompts[0], torch.tensor([first]), fam.prompts[1]], dim=1))  # the conversation goes on
    held = fam.prompts[0].shape[1] + len(first) - 1
    assert engine.last_reused == held  # everything the slot held: the last prompt and its reply but its end


def test_kt_experts_inside_the_decode_step_of_every_family(fam):
    """kt experts bound to the step's fixed buffers, every family: on a GPU each decoded token is one replayed CUDA
    graph with them inside, and the tokens are those transformers' own generate picks on the same model."""
    pytest.importorskip("kt_kernel")
    from transformers import GenerationMixin

    from ktchat.experts.kt_backend import unavailable_reason
    from ktchat.model import engine_of

    moe_lora = "exact" if unavailable_reason("exact", "bf16") is None else "merged"
    model, _ = load_model(fam.paths.model, fam.paths.adapter, experts_backend="kt", dtype="float32", device=DEVICE,
                          moe_lora=moe_lora)
    engine = engine_of(model)
    for ids in fam.prompts[:2]:
        ids = ids.to(model.device)
        want = GenerationMixin.generate(model.get_base_model(), ids, max_new_tokens=GREEDY_TOKENS, do_sample=False)
        assert greedy(model, ids) == want[0, ids.shape[1]:].tolist()
    assert all(block.experts._bound is not None for block in offloaded_blocks(model).values())
    if DEVICE == "cuda":
        assert engine.runner._captured and engine.runner.eager_reason is None, engine.runner.eager_reason


def test_dropping_expert_lora_breaks_the_match(fam):
    """The CPU channel is live: without the expert LoRA, KT mode leaves the reference and meets the control."""
    model, _ = load_model(fam.paths.model, fam.paths.adapter, experts_backend="torch", dtype="float32", device=DEVICE)
    for block in offloaded_blocks(model).values():
        block.experts.backend.set_lora({})
    for ids in fam.prompts:
        assert rel_err(logits(model, ids), logits(fam.reference, ids)) > 100 * FP32_BOUND
        assert rel_err(logits(model, ids), logits(fam.control, ids)) < FP32_BOUND
    assert any(greedy(model, ids) != greedy(fam.reference, ids) for ids in fam.prompts[:-1])


@pytest.mark.parametrize("moe_lora", ["exact", "merged"])
def test_kt_bf16_experts_match_reference_and_answer(fam, moe_lora):
    pytest.importorskip("kt_kernel")
    from ktchat.experts.kt_backend import unavailable_reason

    reason = unavailable_reason(moe_lora, "bf16")
    if reason:
        pytest.skip(reason)
    model, _ = load_model(fam.paths.model, fam.paths.adapter, experts_backend="kt", dtype="float32", device=DEVICE,
                          moe_lora=moe_lora, kt_method="bf16")
    *questions, conversation, _ = fam.prompts
    for ids in questions:
        assert rel_err(logits(model, ids), logits(fam.reference, ids)) < KT_BF16_BOUND
    assert rel_err(logits(model, conversation), logits(fam.reference, conversation)) < 2 * KT_BF16_BOUND
    for ids, (_, answer) in zip(fam.prompts, TRAINED_QA + TRAINED_QA[:1]):
        assert answer in fam.tok.decode(greedy(model, ids), skip_special_tokens=True)


def test_checkpoint_uses_the_names_transformers_saves(fam, tmp_path):
    """Both majors load the hand-written checkpoint completely and save the same per-expert names back."""
    model, info = model_class(fam.paths.model).from_pretrained(fam.paths.model, dtype=torch.float32,
                                                                output_loading_info=True)
    mtp = re.compile(rf"model\.(language_model\.)?layers\.{model.config.get_text_config().num_hidden_layers}\.")
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert all(mtp.match(k) for k in info["unexpected_keys"])  # MTP layers (DeepSeek-V3, GLM)
    model.save_pretrained(tmp_path)
    saved = set(read_checkpoint(tmp_path))
    on_disk = {k for k in read_checkpoint(fam.paths.model) if not mtp.match(k)}
    assert saved == on_disk


def test_layers_on_a_device_map_go_through_hooks_and_match(fam):
    """A device map of 'cpu' entries takes the multi-GPU code path on CPU: placement per module, accelerate hooks."""
    model, _ = load_model(fam.paths.model, fam.paths.adapter, experts_backend="torch", dtype="float32",
                          device_map={k: "cpu" for k in two_gpu_map(fam.paths.model)})
    layers = [m for n, m in model.named_modules() if re.fullmatch(r".*model\.layers\.\d+", n)]
    assert layers and all(hasattr(layer, "_hf_hook") for layer in layers)
    assert_matches(model, fam, fam.prompts[:2])
    assert greedy(model, fam.prompts[0]) == greedy(fam.reference, fam.prompts[0])


def test_adapter_written_by_kt_kernel_loads_exactly(fam, tmp_path):
    """kt_kernel's own save_kt_adapter_artifacts (fused expert file by layer index, manifest, the PEFT part under
    the family's own module names: model.language_model for the VLMs) loads as the per-expert adapter does."""
    pytest.importorskip("kt_kernel.sft.artifacts")
    from test_layouts import kt_kernel_written

    adapter = kt_kernel_written(fam.paths, tmp_path / "kt")
    assert (adapter / "fused_expert_lora.safetensors").is_file()
    model, _ = load_model(fam.paths.model, adapter, experts_backend="torch", dtype="float32", device=DEVICE)
    assert_matches(model, fam, fam.prompts[:2])


def test_export_loads_in_plain_transformers_and_matches(fam, tmp_path):
    """`ktchat export` writes the checkpoint in the base's layout (a VLM keeps its vision tower), which
    plain transformers loads and which equals the hand merge."""
    from ktchat.model.export import export_merged

    out = tmp_path / "exported"
    export_merged(fam.paths.model, fam.paths.adapter, out, dtype="float32")
    assert set(read_checkpoint(out)) == set(read_checkpoint(fam.paths.model))
    exported = load_reference(out)
    for ids in fam.prompts[:2]:
        assert rel_err(logits(exported, ids), logits(fam.reference, ids)) < FP32_BOUND


def test_inspect_with_the_base_checks_every_module(fam, capsys):
    """`ktchat inspect ADAPTER --model BASE`: every module in its channel, checked against the base's shapes."""
    from ktchat.cli import main

    assert main(["inspect", str(fam.paths.adapter), "--model", str(fam.paths.model)]) == 0
    out = capsys.readouterr().out
    modules = read_adapter(fam.paths.adapter).modules
    routed = [m for m in modules if arch_for_dir(fam.paths.model).expert_path.parse(m)]
    assert f"KT (CPU): {len(routed)} LoRA modules" in out and f"PEFT (GPU): {len(modules) - len(routed)} LoRA modules" in out
    assert "no problems found" in out


@pytest.mark.parametrize("name", VLMS)
def test_vlm_text_chat_leaves_the_vision_tower_out_and_says_so(tiny_family, caplog, name):
    paths = tiny_family(name)
    with caplog.at_level(logging.INFO, logger="ktchat.model.loader"):
        model, _ = load_model(paths.model, experts_backend="torch", dtype="float32", device=DEVICE)
    arch = arch_for(model.config)
    for module in arch.vision_modules:
        parent, _, attr = module.rpartition(".")
        assert getattr(model.get_submodule(parent), attr) is None
    assert not [n for n, _ in model.named_parameters() if not n.startswith(("model.language_model.", "lm_head."))]
    vision = [k for k in read_checkpoint(paths.model) if k.startswith(arch.vision_modules)]
    lines = [r.getMessage() for r in caplog.records if "vision modules" in r.getMessage()]
    assert vision and lines == [f"skipped {len(vision)} checkpoint tensors of {', '.join(sorted(arch.vision_modules))}: "
                                "vision modules, not allocated for text chat"]


# --- what single families bring -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MTP_FAMILIES)
def test_mtp_layer_is_skipped_with_one_log_line(tiny_family, caplog, name):
    paths = tiny_family(name)
    with caplog.at_level(logging.INFO, logger="ktchat.model.loader"):
        load_model(paths.model, experts_backend="torch", dtype="float32", device=DEVICE)
    lines = [r.getMessage() for r in caplog.records if "multi-token-prediction" in r.getMessage()]
    n = json.loads((paths.model / "config.json").read_text())["num_hidden_layers"]
    mtp = [k for k in json.loads((paths.model / "model.safetensors.index.json").read_text())["weight_map"]
           if k.startswith(f"model.layers.{n}.")]
    assert mtp and len(lines) == 1 and f"skipped {len(mtp)} checkpoint tensors of model.layers.{n}:" in lines[0]


@pytest.mark.parametrize("name", MTP_FAMILIES)
def test_score_correction_bias_is_loaded_and_steers_routing(tiny_family, name):
    paths = tiny_family(name)
    model, tok = load_model(paths.model, experts_backend="torch", dtype="float32", device=DEVICE)
    stored = read_checkpoint(paths.model)
    ids = chat_prompt_ids(tok)[-1]
    before = logits(model, ids)
    for layer, block in offloaded_blocks(model).items():
        bias = block.gate.e_score_correction_bias
        want = stored[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"]
        assert bias.dtype == torch.float32 and torch.equal(bias.cpu(), want) and want.abs().min() > 0
        bias.zero_()
    assert rel_err(logits(model, ids), before) > 100 * FP32_BOUND


def _router_lora_adapter(paths, out):
    """The adapter plus random LoRA on every MoE router (`gate`, an nn.Linear under transformers 4.x, which
    LLaMA-Factory's `lora_target: all` then targets)."""
    shutil.copytree(paths.adapter, out)
    weights = load_file(str(out / "adapter_model.safetensors"))
    cfg = json.loads((out / "adapter_config.json").read_text())
    hidden = json.loads((paths.model / "config.json").read_text())["hidden_size"]
    blocks = {m[0] for k in weights if (m := re.search(r"model\.layers\.\d+\.\w+(?=\.experts\.)", k))}
    gen = torch.Generator().manual_seed(7)
    for block in sorted(blocks):
        experts = 1 + max(int(m[1]) for k in weights if (m := re.search(rf"{re.escape(block)}\.experts\.(\d+)\.", k)))
        for side, shape in (("A", (cfg["r"], hidden)), ("B", (experts, cfg["r"]))):
            weights[f"base_model.model.{block}.gate.lora_{side}.weight"] = torch.randn(shape, generator=gen) * 0.05
    save_file(weights, str(out / "adapter_model.safetensors"))
    cfg["target_modules"] = sorted(set(cfg["target_modules"]) | {"gate"})
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return out


@pytest.mark.parametrize("name", ["qwen2_moe", "qwen3_moe", "mixtral", "qwen3_5_moe_text"])
def test_router_lora_goes_through_peft_exactly(tiny_family, tmp_path, name):
    paths = tiny_family(name)
    adapter = _router_lora_adapter(paths, tmp_path / "adapter")
    reference = merged(paths, "merged-router-lora", adapter=adapter)
    model, tok = load_model(paths.model, adapter, experts_backend="torch", dtype="float32", device=DEVICE)
    without = merged(paths, "merged-all")
    for ids in chat_prompt_ids(tok):
        assert rel_err(logits(model, ids), logits(reference, ids)) < FP32_BOUND
        assert rel_err(logits(model, ids), logits(without, ids)) > 100 * FP32_BOUND


def _fused_expert_checkpoint(model_dir, out):
    """A copy of the tiny checkpoint with each layer's experts as transformers 5 holds them in memory:
    mlp.experts.gate_up_proj [E, 2I, H] (gate rows, then up rows) and mlp.experts.down_proj [E, H, I]."""
    shutil.copytree(model_dir, out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        weights = load_file(str(out / shard))
        per_expert = {}
        for key in [k for k in weights if re.search(r"\.experts\.\d+\.", k)]:
            m = re.fullmatch(r"(.*\.experts)\.(\d+)\.(\w+)\.weight", key)
            per_expert.setdefault(m[1], {}).setdefault(m[3], {})[int(m[2])] = weights.pop(key)
            del index["weight_map"][key]
        for block, projs in per_expert.items():
            stack = lambda p: torch.stack([projs[p][e] for e in sorted(projs[p])])  # noqa: E731
            weights[f"{block}.gate_up_proj"] = torch.cat([stack("gate_proj"), stack("up_proj")], dim=1)
            weights[f"{block}.down_proj"] = stack("down_proj")
            index["weight_map"].update({f"{block}.gate_up_proj": shard, f"{block}.down_proj": shard})
        save_file(weights, str(out / shard), metadata={"format": "pt"})
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return out


@pytest.mark.parametrize("name", ["qwen3_5_moe_text", "qwen3_moe"])
def test_fused_expert_checkpoint_loads_like_per_expert_keys(tiny_family, tmp_path, name):
    """Expert weights load from fused experts.gate_up_proj / experts.down_proj tensors as from per-expert keys."""
    paths = tiny_family(name)
    fused = _fused_expert_checkpoint(paths.model, tmp_path / "fused")
    assert not [k for k in read_checkpoint(fused) if re.search(r"\.experts\.\d+\.", k)]
    model, tok = load_model(fused, paths.adapter, experts_backend="torch", dtype="float32", device=DEVICE)
    reference = merged(paths, "merged-all")
    for ids in chat_prompt_ids(tok):
        assert rel_err(logits(model, ids), logits(reference, ids)) < FP32_BOUND


def _renamed_checkpoint(model_dir, out, rename, config=lambda c: c):
    """A copy of the tiny checkpoint with its keys renamed (and its config.json rewritten)."""
    shutil.copytree(model_dir, out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        save_file({rename(k): v for k, v in load_file(str(out / shard)).items()}, str(out / shard), metadata={"format": "pt"})
    index["weight_map"] = {rename(k): v for k, v in index["weight_map"].items()}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    (out / "config.json").write_text(json.dumps(config(json.loads((out / "config.json").read_text()))))
    return out


def _kimi_k25_shipped(key: str) -> str:
    """transformers' names -> the names of Kimi-K2.5's shipped files (its remote code's)."""
    for module, disk in (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                         ("model.vision_tower.", "vision_tower."), ("model.mm_projector.", "mm_projector.")):
        if key.startswith(module):
            return disk + key[len(module):]
    return key


def test_kimi_k25_loads_and_exports_under_its_shipped_names(tiny_family, tmp_path):
    """language_model.model.* / language_model.lm_head / vision_tower.* / mm_projector.*: the same model as under
    transformers' names, and export keeps the shipped names with the same merged tensors."""
    from ktchat.model.export import export_merged

    paths = tiny_family("kimi_k25")
    shipped = _renamed_checkpoint(paths.model, tmp_path / "shipped", _kimi_k25_shipped)
    assert any(k.startswith("language_model.model.layers.") for k in read_checkpoint(shipped))
    model, tok = load_model(shipped, paths.adapter, experts_backend="torch", dtype="float32", device=DEVICE)
    reference = merged(paths, "merged-all")
    for ids in chat_prompt_ids(tok):
        assert rel_err(logits(model, ids), logits(reference, ids)) < FP32_BOUND
    export_merged(shipped, paths.adapter, tmp_path / "from-shipped", dtype="float32")
    export_merged(paths.model, paths.adapter, tmp_path / "from-saved", dtype="float32")
    got, want = read_checkpoint(tmp_path / "from-shipped"), read_checkpoint(tmp_path / "from-saved")
    assert set(got) == {_kimi_k25_shipped(k) for k in want}
    assert all(torch.equal(got[_kimi_k25_shipped(k)], v) for k, v in want.items())


def test_kimi_k2_remote_code_config_runs_on_native_deepseek_v3(tiny_family, tmp_path, caplog):
    """Kimi-K2's config.json (model_type kimi_k2, auto_map to its own DeepseekV3Config copy): no remote code runs,
    the DeepSeek-V3 model does, and so does export."""
    from ktchat.model.export import export_merged

    paths = tiny_family("deepseek_v3")
    kimi = _renamed_checkpoint(paths.model, tmp_path / "kimi", lambda k: k, lambda c: {
        **c, "model_type": "kimi_k2", "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                                                   "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}})
    with caplog.at_level(logging.INFO, logger="ktchat.model"):
        model, tok = load_model(kimi, paths.adapter, experts_backend="torch", dtype="float32", device=DEVICE)
    assert "config.json: model_type 'kimi_k2' runs on transformers' native deepseek_v3" in caplog.messages
    reference = merged(paths, "merged-all")
    for ids in chat_prompt_ids(tok):
        assert rel_err(logits(model, ids), logits(reference, ids)) < FP32_BOUND
    summary = export_merged(kimi, paths.adapter, tmp_path / "exported")
    assert summary["merged_modules"] == len(read_adapter(paths.adapter).modules)


def test_mixtral_block_keeps_its_checkpoint_name(tiny_family):
    """transformers 5 calls Mixtral's block `mlp`; KT mode names it `block_sparse_moe` (checkpoint, 4.x adapters)."""
    model, _ = load_model(tiny_family("mixtral").model, experts_backend="torch", dtype="float32", device=DEVICE)
    layer = model.model.layers[0]
    assert isinstance(layer.block_sparse_moe, OffloadedMoE)
    assert "model.layers.0.block_sparse_moe.gate.weight" in dict(model.named_parameters())
    if not TF4:
        assert layer.mlp is layer.block_sparse_moe and "mlp" not in layer._modules


# config.json of real checkpoints, scaled down (auto_map and the FP8 quantization_config left out): DeepSeek-V3.1 is
# the deepseek_v3 entry (256 experts in 8 groups of 32, top-8 from the best 4 groups; here groups of 4).
DEEPSEEK_V3_1 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "attention_bias": False,
    "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
    "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 128,
    "kv_lora_rank": 16, "max_position_embeddings": 163840, "moe_intermediate_size": 32, "moe_layer_freq": 1,
    "n_group": 8, "n_routed_experts": 32, "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 4,
    "num_experts_per_tok": 8, "num_hidden_layers": 4, "num_key_value_heads": 4, "num_nextn_predict_layers": 1,
    "q_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "tie_word_embeddings": False,
    "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "use_cache": True, "v_head_dim": 16,
    "vocab_size": 1024,
}
# GLM-4.5 (160 experts, top-8, one group, 3 dense layers, q/k norms, half-rotary heads of 128; here 16 experts).
GLM_4_5 = {
    "architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", "attention_bias": True,
    "attention_dropout": 0.0, "pad_token_id": 0, "eos_token_id": [1, 2], "head_dim": 32, "hidden_act": "silu",
    "hidden_size": 64, "partial_rotary_factor": 0.5, "initializer_range": 0.02, "intermediate_size": 128,
    "max_position_embeddings": 131072, "moe_intermediate_size": 32, "norm_topk_prob": True,
    "num_attention_heads": 4, "n_group": 1, "topk_group": 1, "n_routed_experts": 16, "n_shared_experts": 1,
    "routed_scaling_factor": 2.5, "num_experts_per_tok": 4, "first_k_dense_replace": 3, "num_hidden_layers": 4,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 1000000,
    "num_nextn_predict_layers": 1, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "use_qk_norm": True, "vocab_size": 1024,
}
ROUTER_CONFIGS = {
    "deepseek_v3": dict(DEEPSEEK_V3_1, n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4),
    "deepseek_v3.1": DEEPSEEK_V3_1,
    "glm4.5": GLM_4_5,
    "glm4_moe-grouped": dict(GLM_4_5, n_group=4, topk_group=2),
}


def _config_json(tmp_path, cfg: dict):
    from transformers import AutoConfig

    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return AutoConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("negative_bias", [False, True])
@pytest.mark.parametrize("case", sorted(ROUTER_CONFIGS))
def test_noaux_tc_route_equals_transformers_router(tmp_path, case, negative_bias):
    """Group-limited sigmoid routing with bias, as the registry entry routes it, against transformers' own router
    module (DeepseekV3TopkRouter, Glm4MoeTopkRouter) on random logits."""
    config = _config_json(tmp_path, ROUTER_CONFIGS[case])
    mt = config.model_type
    try:
        router_cls = getattr(importlib.import_module(f"transformers.models.{mt}.modeling_{mt}"),
                             f"{type(config).__name__.removesuffix('Config')}TopkRouter")
    except (ImportError, AttributeError) as exc:
        pytest.skip(f"transformers {transformers.__version__} has no {mt} router ({exc})")
    if negative_bias and TF4 and config.topk_group < config.n_group:
        pytest.skip("transformers 4.57 masks left-out groups with 0.0, not -inf: it differs once biased scores go "
                    "negative (transformers 5 and DeepSeek's code use -inf, as ktchat does)")
    e, h = config.n_routed_experts, config.hidden_size
    gen = torch.Generator().manual_seed(0)
    router = router_cls(config)
    with torch.no_grad():
        router.weight.copy_(torch.randn(e, h, generator=gen) * 0.1)
        bias = torch.randn(e, generator=gen) * 0.3
        router.e_score_correction_bias.copy_(bias if negative_bias else bias.abs())
    x = torch.randn(200, h, generator=gen)
    out = router(x)
    want_ids, want_w = (out[0], out[1]) if TF4 else (out[2], out[1])
    got_w, got_ids = arch_for(config).route(x @ router.weight.T, router, config)
    order_got, order_want = got_ids.argsort(dim=-1), want_ids.argsort(dim=-1)
    assert torch.equal(got_ids.gather(1, order_got), want_ids.gather(1, order_want))
    torch.testing.assert_close(got_w.gather(1, order_got), want_w.float().gather(1, order_want))


def test_qwen3_5_moe_route_equals_transformers_router():
    """Qwen3.5-MoE's softmax top-k, always renormalised, as the registry entry routes it, against transformers' own
    Qwen3_5MoeTopKRouter on random inputs (256 experts, top-8, as Qwen3.5-35B-A3B)."""
    try:
        from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeTextConfig
        from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeTopKRouter
    except ImportError as exc:
        pytest.skip(f"transformers {transformers.__version__} has no qwen3_5_moe model ({exc})")
    config = Qwen3_5MoeTextConfig(hidden_size=64, num_experts=256, num_experts_per_tok=8, num_hidden_layers=4)
    gen = torch.Generator().manual_seed(0)
    router = Qwen3_5MoeTopKRouter(config)
    with torch.no_grad():
        router.weight.copy_(torch.randn(256, 64, generator=gen) * 0.3)
    x = torch.randn(200, 64, generator=gen)
    _, want_w, want_ids = router(x)
    got_w, got_ids = arch_for(config).route(x @ router.weight.T, router, config)
    order_got, order_want = got_ids.argsort(dim=-1), want_ids.argsort(dim=-1)
    assert torch.equal(got_ids.gather(1, order_got), want_ids.gather(1, order_want))
    torch.testing.assert_close(got_w.gather(1, order_got), want_w.float().gather(1, order_want))


@pytest.mark.parametrize("case", ["deepseek_v3.1", "glm4.5"])
def test_real_configs_are_accepted_with_dense_layers_and_mtp(tmp_path, case):
    """A DeepSeek-V3.1 / GLM-4.5 config.json (scaled down) builds in KT mode: its MoE layers after the dense ones
    offloaded with the config's sizes, its MTP layer's tensors skipped with the reason, the last layer's kept."""
    from ktchat.experts import backend_factory
    from ktchat.model.loader import build_skeleton

    config = _config_json(tmp_path, ROUTER_CONFIGS[case])
    arch = arch_for(config)
    blocks = build_skeleton(config, arch, backend_factory("torch"), torch.float32).moe_blocks
    n, dense = config.num_hidden_layers, config.first_k_dense_replace
    assert sorted(blocks) == list(range(dense, n))
    spec = blocks[n - 1].cpu_experts.backend.spec
    assert (spec.num_experts, spec.top_k, spec.intermediate_size) == (config.n_routed_experts,
                                                                       config.num_experts_per_tok, 32)
    assert "multi-token-prediction" in arch.skip_tensor(f"model.layers.{n}.eh_proj.weight", config)
    assert arch.skip_tensor(f"model.layers.{n - 1}.mlp.gate.weight", config) is None


def test_deepseek_v2_yarn_attention_scale_is_applied_in_both_majors(tiny, tmp_path):
    """DeepSeek's YaRN multiplies the attention scale by mscale(factor, mscale_all_dim)^2; transformers 4.57's
    DeepseekV2 forgets it (ktchat sets it), 5.x applies it: either way KT mode computes the formula."""
    from transformers import AutoModelForCausalLM

    model_dir = shutil.copytree(tiny.model, tmp_path / "yarn")
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["rope_scaling"] = {"type": "yarn", "factor": 40.0, "mscale": 0.707, "mscale_all_dim": 0.707,
                           "original_max_position_embeddings": 64, "beta_fast": 32.0, "beta_slow": 1.0}
    cfg["max_position_embeddings"] = 2560
    (model_dir / "config.json").write_text(json.dumps(cfg))
    want = (cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]) ** -0.5 * (0.1 * 0.707 * math.log(40) + 1) ** 2
    model, _ = load_model(model_dir, experts_backend="torch", dtype="float32", device=DEVICE)
    assert all(math.isclose(layer.self_attn.scaling, want, rel_tol=1e-12) for layer in model.model.layers)
    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, 500, (1, 150), generator=torch.Generator().manual_seed(1))  # well past 64 positions
    as_loaded = rel_err(logits(model, ids), logits(plain, ids))
    for layer in plain.model.layers:
        layer.self_attn.scaling = want
    assert rel_err(logits(model, ids), logits(plain, ids)) < FP32_BOUND
    assert (as_loaded > 5 * FP32_BOUND) if TF4 else (as_loaded < FP32_BOUND)


# --- several GPUs ----------------------------------------------------------------------------------------------------


def arch_for_dir(model_dir):
    from transformers import AutoConfig

    return arch_for(AutoConfig.from_pretrained(model_dir))


def two_gpu_map(model_dir, **config_overrides) -> dict:
    """The balanced map of the KT-mode model over two (pretend) GPUs of equal memory."""
    from transformers import AutoConfig

    from ktchat.experts import backend_factory
    from ktchat.model.loader import build_skeleton
    from ktchat.model.placement import balanced_device_map
    from ktchat.model.registry import arch_for

    config = AutoConfig.from_pretrained(model_dir, **config_overrides)
    skeleton = build_skeleton(config, arch_for(config), backend_factory("torch"), torch.float32)
    return balanced_device_map(skeleton.model, {0: 1 << 30, 1: 1 << 30}, torch.float32)


@pytest.mark.parametrize("name", FAMILIES)
def test_balanced_map_keeps_layers_whole_and_holds_no_experts(tiny_family, name):
    device_map = two_gpu_map(tiny_family(name).model)
    text = "model.language_model" if name in VLMS else "model"
    assert set(device_map.values()) == {0, 1}
    assert not [k for k in device_map if re.match(rf"{text}\.layers\.\d+\.", k) or "experts" in k]
    layers = [v for k, v in device_map.items() if re.fullmatch(rf"{text}\.layers\.\d+", k)]
    assert layers and layers == sorted(layers)
    assert device_map[f"{text}.embed_tokens"] == 0 and device_map["lm_head"] == 1


def test_balanced_map_keeps_tied_weights_on_one_device(tiny_family):
    device_map = two_gpu_map(tiny_family("qwen3_moe").model, tie_word_embeddings=True)
    assert device_map["lm_head"] == device_map["model.embed_tokens"] == 0 and 1 in device_map.values()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 or more CUDA devices (run on a multi-GPU machine)")
@pytest.mark.parametrize("name", ("deepseek_v2",) + FAMILIES)
def test_layers_spread_over_gpus_match_reference(tiny_family, name):
    from transformers import AutoTokenizer

    paths = tiny_family(name)
    reference = merged(paths, "merged-all")
    model, _ = load_model(paths.model, paths.adapter, experts_backend="torch", dtype="float32", device="auto")
    devices = {p.device for n, p in model.named_parameters() if ".layers." in n}
    assert len(devices) >= 2 and all(d.type == "cuda" for d in devices)
    for ids in chat_prompt_ids(AutoTokenizer.from_pretrained(paths.model)):
        assert rel_err(logits(model, ids), logits(reference, ids)) < FP32_BOUND
        assert greedy(model, ids) == greedy(reference, ids)
