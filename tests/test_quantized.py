"""FP8 (DeepSeek-V3, partial edge blocks) and compressed-tensors INT4 (Kimi-K2-Thinking) bases: KT mode's fp32 torch
path against the dequantized base with every LoRA merged by hand (tests/reference.py dequantizes block by block,
sharing no code with ktchat.formats.quant); scales that are dropped, corrupt or missing; export and convert on these bases."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ktchat import load_model
from ktchat.adapter.writer import convert
from ktchat.errors import KTChatError
from ktchat.model import offloaded_blocks
from ktchat.model.export import export_merged
from ktchat.tinymodels import build_tiny
from ktchat.tinymodels.quantized import VARIANTS, build_quantized

from reference import (DEVICE, dequantize_by_hand, greedy, load_reference, logits, merge_by_hand, random_prompt,
                       read_checkpoint, rel_err)
from tolerances import FP32_BOUND

REPO = Path(__file__).resolve().parents[1]
INDEX = "model.safetensors.index.json"
EXPERT = re.compile(r"\.experts\.\d+\.")


def _cache_root() -> Path:
    return Path(os.environ.get("KTCHAT_TEST_CACHE", REPO / ".cache" / "tiny"))


def _merged(paths, tag: str, keep=lambda m: True):
    digest = hashlib.sha256((paths.adapter / "adapter_model.safetensors").read_bytes()).hexdigest()[:12]
    return load_reference(merge_by_hand(paths.model, paths.adapter, paths.root / f"{tag}-{digest}", keep=keep))


class Q:
    def __init__(self, name, paths, reference, control, prompts):
        self.name, self.paths, self.reference, self.control, self.prompts = name, paths, reference, control, prompts


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def qfam(request):
    from transformers import AutoTokenizer

    from reference import chat_prompt_ids

    from ktchat.tinymodels.families import family

    root = _cache_root()
    v = VARIANTS[request.param]
    if reason := family(v.family).unavailable():
        pytest.skip(reason)
    base = build_tiny(root.with_name(f"{root.name}-{v.family}"), family=v.family)
    paths = build_quantized(root.with_name(f"{root.name}-{v.name}"), v.name, base)
    tok = AutoTokenizer.from_pretrained(paths.model)
    prompts = chat_prompt_ids(tok)[:2] + [random_prompt(120)]
    return Q(v.name, paths, _merged(paths, "merged-all"),
             _merged(paths, "merged-no-expert-lora", keep=lambda m: not EXPERT.search(m)), prompts)


@pytest.fixture(scope="module")
def kt_fp32(qfam):
    return load_model(qfam.paths.model, qfam.paths.adapter, experts_backend="torch", dtype="float32", device=DEVICE)[0]


def copy_base(src: Path, out: Path, edit=None, config=None) -> Path:
    """The checkpoint with `edit(tensors)` applied to every shard's tensors (dict, in place) and config.json updated
    by `config(dict)`; the index follows the new names."""
    shutil.copytree(src, out)
    weight_map = {}
    for shard in sorted(out.glob("*.safetensors")):
        tensors = load_file(str(shard))
        if edit:
            edit(tensors)
        save_file(tensors, str(shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard.name))
    index = json.loads((out / INDEX).read_text())
    (out / INDEX).write_text(json.dumps({**index, "weight_map": dict(sorted(weight_map.items()))}))
    if config:
        cfg = json.loads((out / "config.json").read_text())
        config(cfg)
        (out / "config.json").write_text(json.dumps(cfg))
    return out


# ---- the layouts on disk are the real ones ----


def test_layouts_are_the_shipped_ones(qfam):
    stored = read_checkpoint(qfam.paths.model)
    qc = json.loads((qfam.paths.model / "config.json").read_text())["quantization_config"]
    if qc["quant_method"] == "fp8":
        br, bc = qc["weight_block_size"]
        scaled = [k.removesuffix("_scale_inv") for k in stored if k.endswith(".weight_scale_inv")]
        assert all(stored[k].dtype == torch.float8_e4m3fn for k in scaled)
        assert all(stored[k].dtype != torch.float8_e4m3fn for k in stored if k not in scaled)
        for k in scaled:  # [ceil(out/br), ceil(in/bc)] fp32
            out, inp = stored[k].shape
            assert tuple(stored[f"{k}_scale_inv"].shape) == (-(-out // br), -(-inp // bc))
        assert stored["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16  # router, norms, embeddings, head
        assert stored["lm_head.weight"].dtype == torch.bfloat16
        partial = [k for k in scaled if stored[k].shape[0] % br or stored[k].shape[1] % bc]
        assert "model.layers.0.self_attn.kv_a_proj_with_mqa.weight" in partial
        if (br, bc) != (128, 128):
            assert any(EXPERT.search(k) for k in partial)
    else:
        packed = {k.removesuffix(".weight_packed") for k in stored if k.endswith(".weight_packed")}
        assert packed and all(EXPERT.search(m) for m in packed)  # only the routed experts
        for m in packed:
            rows, cols = stored[f"{m}.weight_shape"].tolist()
            assert stored[f"{m}.weight_packed"].dtype == torch.int32
            assert stored[f"{m}.weight_shape"].dtype == torch.int64  # as compressed-tensors writes it
            assert tuple(stored[f"{m}.weight_packed"].shape) == (rows, cols // 8)
            assert tuple(stored[f"{m}.weight_scale"].shape) == (rows, cols // 32)


# ---- KT mode's fp32 torch path against the dequantized reference ----


def test_logits_and_greedy_equal_dequantized_reference(qfam, kt_fp32):
    """...and not the unquantized base's: quantization moves the logits by 6.5e-3 to 3.9e-2 (over 10x the bound)."""
    v = VARIANTS[qfam.name]
    root = _cache_root()
    unquantized = _merged(build_tiny(root.with_name(f"{root.name}-{v.family}"), family=v.family), "merged-all")
    for ids in qfam.prompts:
        assert rel_err(logits(kt_fp32, ids), logits(qfam.reference, ids)) < FP32_BOUND
        assert rel_err(logits(kt_fp32, ids), logits(unquantized, ids)) > 10 * FP32_BOUND
    for ids in qfam.prompts[:2]:
        assert greedy(kt_fp32, ids) == greedy(qfam.reference, ids)


def test_dropping_expert_lora_breaks_the_match(qfam):
    model, _ = load_model(qfam.paths.model, qfam.paths.adapter, experts_backend="torch", dtype="float32",
                          device=DEVICE)
    for block in offloaded_blocks(model).values():
        block.experts.backend.set_lora({})
    for ids in qfam.prompts:
        assert rel_err(logits(model, ids), logits(qfam.reference, ids)) > 100 * FP32_BOUND
        assert rel_err(logits(model, ids), logits(qfam.control, ids)) < FP32_BOUND


def test_fp8_bytes_as_if_unscaled_fail_the_reference(tmp_path):
    """The same FP8 bytes with every scale 1 (what loading them without their scales computes) is consistent on
    disk, loads, and is far from the reference: the scales carry the weights."""
    root = _cache_root()
    base = build_tiny(root.with_name(f"{root.name}-deepseek_v3"), family="deepseek_v3")
    paths = build_quantized(root.with_name(f"{root.name}-deepseek_v3-fp8"), "deepseek_v3-fp8", base)
    reference = _merged(paths, "merged-all")

    def unscaled(t):
        for k in [k for k in t if k.endswith("_scale_inv")]:
            t[k] = torch.ones_like(t[k])

    model_dir = copy_base(paths.model, tmp_path / "unscaled", unscaled)
    model, _ = load_model(model_dir, paths.adapter, experts_backend="torch", dtype="float32", device=DEVICE)
    ids = random_prompt(60)
    assert rel_err(logits(model, ids), logits(reference, ids)) > 0.1


# ---- bad quantized checkpoints: one line naming the file and tensor, before the weights load ----


def _fp8(tmp_path):
    root = _cache_root()
    base = build_tiny(root.with_name(f"{root.name}-deepseek_v3"), family="deepseek_v3")
    return build_quantized(root.with_name(f"{root.name}-deepseek_v3-fp8-edge"), "deepseek_v3-fp8-edge", base)


def _int4(tmp_path):
    root = _cache_root()
    base = build_tiny(root.with_name(f"{root.name}-deepseek_v3"), family="deepseek_v3")
    return build_quantized(root.with_name(f"{root.name}-kimi_k2-int4"), "kimi_k2-int4", base)


EXP = "model.layers.1.mlp.experts.3.up_proj"
ATT = "model.layers.0.self_attn.kv_a_proj_with_mqa"


def _weights(config):
    return config["quantization_config"]["config_groups"]["group_0"]["weights"]


def _drop(key):
    return lambda t: t.pop(key, None)


def _set(key, fn):
    def edit(t):
        if key in t:
            t[key] = fn(t[key])
    return edit


BAD = {  # case -> (base, tensor edit, config edit, message)
    "fp8 scale dropped": (_fp8, _drop(f"{EXP}.weight_scale_inv"), None,
                          rf"{re.escape(EXP)}: its fp8 weight is in the checkpoint but {re.escape(EXP)}"
                          r"\.weight_scale_inv is not"),
    "fp8 attention scale dropped": (_fp8, _drop(f"{ATT}.weight_scale_inv"), None, rf"{re.escape(ATT)}: its fp8"),
    "fp8 scales and config dropped": (_fp8, lambda t: [t.pop(k) for k in [k for k in t if k.endswith("_scale_inv")]],
                                      lambda c: c.pop("quantization_config"),
                                      r"stored as F8_E4M3, a quantized dtype, but config\.json has no "
                                      r"quantization_config"),
    "fp8 scale wrong shape": (_fp8, _set(f"{ATT}.weight_scale_inv", lambda s: s[:1].contiguous()), None,
                              rf"{re.escape(ATT)}: scale shape \[1, 4\] does not fit weight \[80, 256\] in blocks "
                              r"\[48, 80\] \(expected \[2, 4\]\)"),
    "fp8 scale as int": (_fp8, _set(f"{EXP}.weight_scale_inv", lambda s: s.to(torch.int32)), None,
                         r"scale stored as I32, not a float"),
    "fp8 weight dropped": (_fp8, _drop(f"{EXP}.weight"), None, rf"{re.escape(EXP)}\.weight: missing or not F8_E4M3"),
    "fp8 block size unknown": (_fp8, None, lambda c: c["quantization_config"].pop("weight_block_size"),
                               r"quantization_config\.weight_block_size must be two positive integers"),
    "int4 scale dropped": (_int4, _drop(f"{EXP}.weight_scale"), None,
                           rf"{re.escape(EXP)}: its int4 weight is in the checkpoint but .*weight_scale is not"),
    "int4 shape dropped": (_int4, _drop(f"{EXP}.weight_shape"), None, r"weight_shape is not"),
    "int4 shape wrong": (_int4, _set(f"{EXP}.weight_shape", lambda s: s * 2), None,
                         rf"{re.escape(EXP)}: int4 weight of shape \[256, 512\]: packed shape"),
    "int4 scale wrong group": (_int4, _set(f"{EXP}.weight_scale", lambda s: s[:, :4].contiguous()), None,
                               r"scale shape \[128, 4\] does not fit weight \[128, 32\] in blocks \[1, 32\]"),
    "int4 in ignored module": (_int4, None, lambda c: c["quantization_config"]["ignore"].append("re:.*experts.*"),
                               r"stored quantized, but quantization_config\.ignore leaves it unquantized"),
    "int4 without config": (_int4, None, lambda c: c.pop("quantization_config"),
                            r"a int4 quantization tensor, but config\.json has no quantization_config"),
    "int4 asymmetric": (_int4, None, lambda c: _weights(c).update(symmetric=False),
                        r"weights\.symmetric False is not supported"),
    "gptq": (_int4, None, lambda c: c["quantization_config"].update(quant_method="gptq"),
             r"quant_method 'gptq' is not supported \(supported: fp8, compressed-tensors\)"),
}


def test_int4_weight_shape_stored_as_int32_loads_too(tmp_path):
    paths = _int4(tmp_path)

    def as_int32(t):
        for k in [k for k in t if k.endswith(".weight_shape")]:
            t[k] = t[k].to(torch.int32)

    model_dir = copy_base(paths.model, tmp_path / "i32", as_int32)
    model, _ = load_model(model_dir, paths.adapter, experts_backend="torch", dtype="float32", device=DEVICE)
    ids = random_prompt(60)
    assert rel_err(logits(model, ids), logits(_merged(paths, "merged-all"), ids)) < FP32_BOUND


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_quantized_checkpoint_is_one_clear_line(case, tmp_path):
    make, edit, config, message = BAD[case]
    paths = make(tmp_path)
    model_dir = copy_base(paths.model, tmp_path / "bad", edit, config)
    with pytest.raises(KTChatError, match=message) as err:
        load_model(model_dir, paths.adapter, experts_backend="torch", dtype="float32", device="cpu")
    assert "\n" not in str(err.value)


# ---- export and convert on quantized bases ----


def test_export_dequantized_loads_in_plain_transformers_and_matches(qfam, tmp_path):
    """--format bf16 (the default) with --dtype float32: every weight dequantized and merged, no quantization_config;
    plain transformers loads it and it equals the hand merge."""
    out = tmp_path / "exported"
    export_merged(qfam.paths.model, qfam.paths.adapter, out, dtype="float32")
    got = read_checkpoint(out)
    want = dequantize_by_hand(read_checkpoint(qfam.paths.model),
                              json.loads((qfam.paths.model / "config.json").read_text())["quantization_config"])
    assert set(got) == set(want) and all(t.dtype == torch.float32 for k, t in got.items() if k.endswith(".weight"))
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    if config["model_type"] == "kimi_k2":  # plain transformers (Kimi's remote code reads the same files)
        config.pop("auto_map")
        config["model_type"] = "deepseek_v3"
    (out / "config.json").write_text(json.dumps(config))
    exported = load_reference(out)
    for ids in qfam.prompts:
        assert rel_err(logits(exported, ids), logits(qfam.reference, ids)) < FP32_BOUND


def test_export_default_is_bf16_and_loads_in_ktchat(qfam, tmp_path):
    out = tmp_path / "bf16"
    export_merged(qfam.paths.model, qfam.paths.adapter, out)
    got = read_checkpoint(out)
    assert not any(k.endswith(("_scale_inv", "_packed", "_scale", "_shape")) for k in got)
    assert {t.dtype for k, t in got.items() if k.endswith("_proj.weight")} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model, _ = load_model(out, None, experts_backend="torch", dtype="float32", device=DEVICE)
    ids = qfam.prompts[0]
    assert rel_err(logits(model, ids), logits(qfam.reference, ids)) < 2e-2  # one bf16 rounding of every weight


def test_export_in_base_format_requantizes_only_what_has_lora(qfam, tmp_path):
    """--format base: the base's tensors, dtypes and shapes; a weight with LoRA is the merged weight on the format's
    grid (within half a step of its block), everything else byte for byte; ktchat loads it."""
    out = tmp_path / "base-format"
    export_merged(qfam.paths.model, qfam.paths.adapter, out, format="base")
    src, got = read_checkpoint(qfam.paths.model), read_checkpoint(out)
    assert {k: (t.dtype, t.shape) for k, t in got.items()} == {k: (t.dtype, t.shape) for k, t in src.items()}
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc == json.loads((qfam.paths.model / "config.json").read_text())["quantization_config"]
    merged_ref = read_checkpoint(next(qfam.paths.root.glob("merged-all-*")))
    deq = dequantize_by_hand(got, qc)
    suffix = ".weight_scale_inv" if qc["quant_method"] == "fp8" else ".weight_scale"
    changed = 0
    for key in [k for k in got if k.endswith(suffix)]:
        module = key.removesuffix(suffix)
        w, ref = deq[f"{module}.weight"], merged_ref[f"{module}.weight"]
        if qc["quant_method"] == "fp8":  # e4m3 keeps 3 mantissa bits: half a step is at most 1/16 of the value
            assert ((w - ref).abs() <= ref.abs() / 16 + got[key].max() / 2**9).all(), module
        else:  # the nearest of the group's grid points q * scale, q in -8..7 (scale = group max / 7)
            size = qc["config_groups"]["group_0"]["weights"]["group_size"]
            step = got[key].float().repeat_interleave(size, 1)[:, :w.shape[1]]
            inside = ref.abs() <= 7 * step
            assert ((w - ref).abs() <= step * 0.5 * (1 + 1e-4) + 1e-7)[inside].all(), module
        changed += not torch.equal(got[key], src[key])
    assert changed  # the LoRA did move weights onto other grid points
    model, _ = load_model(out, None, experts_backend="torch", dtype="float32", device=DEVICE)
    assert torch.isfinite(logits(model, qfam.prompts[0])).all()


def test_convert_to_kt_loads_on_the_quantized_base(qfam, kt_fp32, tmp_path):
    convert(qfam.paths.adapter, tmp_path / "kt", "kt")
    model, _ = load_model(qfam.paths.model, tmp_path / "kt", experts_backend="torch", dtype="float32", device=DEVICE)
    ids = qfam.prompts[0]
    assert rel_err(logits(model, ids), logits(qfam.reference, ids)) < FP32_BOUND


def test_inspect_reads_the_quantized_base(qfam, capsys):
    from ktchat.cli import main

    assert main(["inspect", str(qfam.paths.adapter), "--model", str(qfam.paths.model)]) == 0
    assert "no problems found" in capsys.readouterr().out


def test_cli_export_in_base_format_and_refuses_an_unknown_one(qfam, tmp_path, capsys):
    from ktchat.cli import main

    out = tmp_path / "cli"
    args = ["export", "--model", str(qfam.paths.model), "--adapter", str(qfam.paths.adapter), "--out", str(out)]
    assert main(args + ["--format", "base"]) == 0
    assert set(read_checkpoint(out)) == set(read_checkpoint(qfam.paths.model))
    with pytest.raises(SystemExit) as exit_:
        main(args + ["--format", "fp4", "--overwrite"])
    assert exit_.value.code == 2 and "invalid choice: 'fp4'" in capsys.readouterr().err


# ---- kt experts on a quantized base (the kt backend's own load_quantized; its native FP8 / INT4 kernels are
# tested on the kernel side of issue 15) ----


def test_kt_bf16_experts_on_a_quantized_base_match_the_reference(qfam):
    pytest.importorskip("kt_kernel")
    from ktchat.experts.kt_backend import unavailable_reason
    from tolerances import KT_BF16_BOUND

    if reason := unavailable_reason("exact", "bf16"):
        pytest.skip(reason)
    model, _ = load_model(qfam.paths.model, qfam.paths.adapter, experts_backend="kt", dtype="float32", device=DEVICE,
                          moe_lora="exact", kt_method="bf16")
    for ids in qfam.prompts[:2]:
        assert rel_err(logits(model, ids), logits(qfam.reference, ids)) < KT_BF16_BOUND
