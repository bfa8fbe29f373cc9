"""`ktchat convert` round trips bit for bit and agrees with kt_kernel's own reader and SGLang converter;
`ktchat export` writes a checkpoint plain transformers loads, equal to the hand-merged reference; `ktchat inspect`
shows every module and every problem."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ktchat import KTChatError
from ktchat.adapter.writer import convert
from ktchat.formats.checkpoint import st_name
from ktchat.cli.adapter import add_command as add_adapter_commands
from ktchat.model.export import export_merged

from reference import load_reference, logits, read_checkpoint, rel_err
from tolerances import FP32_BOUND
from test_layouts import kt_kernel_written, peft_v5_by_hand, rewrite


ADAPTER, FUSED = "adapter_model.safetensors", "fused_expert_lora.safetensors"
INDEX = "model.safetensors.index.json"


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_identical(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in got:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def run_cli(*argv) -> int:
    """The commands as `ktchat` runs them (cli.main adds the same subparsers)."""
    parser = argparse.ArgumentParser(prog="ktchat")
    add_adapter_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


# ---- convert ----

def test_peft_kt_peft_is_bit_identical(tiny, tmp_path):
    convert(tiny.adapter, tmp_path / "kt", "kt")
    convert(tmp_path / "kt", tmp_path / "peft", "peft")
    assert_identical(tensors(tmp_path / "peft" / ADAPTER), tensors(tiny.adapter / ADAPTER))
    assert json.loads((tmp_path / "peft/adapter_config.json").read_text()) == json.loads(
        (tiny.adapter / "adapter_config.json").read_text())
    assert not any(".experts." in k for k in tensors(tmp_path / "kt" / ADAPTER))


def test_kt_peft_kt_is_bit_identical_for_kt_kernels_own_adapter(tiny, tmp_path):
    pytest.importorskip("kt_kernel.sft.artifacts")
    src = kt_kernel_written(tiny, tmp_path / "src", dtype=torch.bfloat16)
    convert(src, tmp_path / "peft", "peft")
    convert(tmp_path / "peft", tmp_path / "kt", "kt")
    assert_identical(tensors(tmp_path / "kt" / FUSED), tensors(src / FUSED))
    assert_identical(tensors(tmp_path / "kt" / ADAPTER), tensors(src / ADAPTER))
    manifest = json.loads((tmp_path / "kt/kt_adapter_manifest.json").read_text())
    assert manifest["lora"] == {"rank": 8, "alpha": 16.0} and manifest["status"] == "ready"


def test_kt_kernel_accepts_ktchats_kt_layout(tiny, tmp_path):
    """kt_kernel's own manifest validator and fused loader take what `convert --to kt` writes."""
    pytest.importorskip("kt_kernel.sft.artifacts")
    from types import SimpleNamespace

    from kt_kernel.sft.artifacts import _validate_adapter_manifest
    from kt_kernel.sft.lora import _load_fused_expert_lora

    convert(tiny.adapter, tmp_path / "kt", "kt")
    stored = tensors(tmp_path / "kt" / FUSED)
    names = ["gate_lora_a", "gate_lora_b", "up_lora_a", "up_lora_b", "down_lora_a", "down_lora_b"]
    wrappers = [SimpleNamespace(layer_idx=layer, lora_experts=None, _full_weight_grad=False, _lora_rank=8,
                                _lora_alpha=16.0, _fused_expert_lora_params=[
                                    torch.nn.Parameter(torch.zeros_like(stored[f"layers.{layer}.experts.{n}"])) for n in names])
                for layer in (1, 2)]
    base = json.loads((tiny.adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = SimpleNamespace(_kt_wrappers=wrappers, config=SimpleNamespace(_name_or_path=base))
    _validate_adapter_manifest(model, tmp_path / "kt")
    assert _load_fused_expert_lora(wrappers, str(tmp_path / "kt")) == 12
    for w in wrappers:
        for n, p in zip(names, w._fused_expert_lora_params):
            assert torch.equal(p.data, stored[f"layers.{w.layer_idx}.experts.{n}"])


def test_sglang_adapter_equals_kt_kernels_converter(tiny, tmp_path):
    """`convert --to sglang` writes what kt_kernel's convert_kt_to_sglang_adapter writes from the same KT adapter."""
    pytest.importorskip("kt_kernel.sft.convert_kt_to_sglang_adapter")
    from kt_kernel.sft.convert_kt_to_sglang_adapter import convert_kt_to_sglang_adapter

    convert(tiny.adapter, tmp_path / "kt", "kt")
    convert(tmp_path / "kt", tmp_path / "ours", "sglang")
    convert_kt_to_sglang_adapter(tmp_path / "kt", tmp_path / "theirs", base_model_name_or_path=str(tiny.model))
    assert_identical(tensors(tmp_path / "ours" / ADAPTER), tensors(tmp_path / "theirs" / ADAPTER))
    ours, theirs = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "theirs"))
    assert (ours["r"], ours["lora_alpha"], set(ours["target_modules"])) == (
        theirs["r"], theirs["lora_alpha"], set(theirs["target_modules"]))
    # and back: SGLang -> PEFT gives the original adapter
    convert(tmp_path / "ours", tmp_path / "peft", "peft")
    assert_identical(tensors(tmp_path / "peft" / ADAPTER), tensors(tiny.adapter / ADAPTER))


def test_peft_v5_converts_to_kt_at_the_trained_rank(tiny, tmp_path):
    convert(peft_v5_by_hand(tiny, tmp_path / "v5"), tmp_path / "kt", "kt")
    fused = tensors(tmp_path / "kt" / FUSED)
    original = tensors(tiny.adapter / ADAPTER)
    for e in (0, 7):
        want = original[f"base_model.model.model.layers.2.mlp.experts.{e}.up_proj.lora_B.weight"]
        assert torch.equal(fused["layers.2.experts.up_lora_b"][e], want)


def test_convert_refuses_to_overwrite_and_names_the_folder(tiny, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("keep")
    with pytest.raises(KTChatError, match="not empty"):
        convert(tiny.adapter, tmp_path / "out", "kt")
    assert (tmp_path / "out" / "x").read_text() == "keep"


def test_bf16_expert_dtype_for_kt_training(tiny, tmp_path):
    assert run_cli("convert", tiny.adapter, tmp_path / "kt", "--to", "kt", "--expert-dtype", "bfloat16") == 0
    assert {t.dtype for t in tensors(tmp_path / "kt" / FUSED).values()} == {torch.bfloat16}


# ---- export ----

@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "fp32"
    assert run_cli("export", "--model", tiny.model, "--adapter", tiny.adapter, "--out", out, "--dtype", "float32") == 0
    return out


def test_export_loads_in_plain_transformers_and_equals_reference(exported, tiny, reference, prompts):
    want = read_checkpoint(tiny.root / "merged-all")
    got = read_checkpoint(exported)
    assert got.keys() == want.keys()
    assert max((got[k] - want[k]).abs().max().item() for k in got) < 1e-6
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((tiny.model / "model.safetensors.index.json").read_text())["weight_map"]
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (exported / name).is_file()
    model = load_reference(exported)  # plain AutoModelForCausalLM.from_pretrained
    for ids in prompts:
        assert rel_err(logits(model, ids), logits(reference, ids)) < FP32_BOUND


def test_export_in_base_dtype_rounds_once(tiny, tmp_path):
    """Default: the base dtype (bf16 here), each merged weight within one bf16 rounding of the fp64 merge (plus fp32
    cancellation error where W + scale * B @ A nearly vanishes)."""
    export_merged(tiny.model, tiny.adapter, tmp_path / "bf16")
    got, want = read_checkpoint(tmp_path / "bf16"), read_checkpoint(tiny.root / "merged-all")
    for k in got:
        assert got[k].dtype == torch.bfloat16
        ulp = want[k].abs() * 2.0**-7 + 1e-7
        assert ((got[k].float() - want[k]).abs() <= ulp).all(), k


def test_export_of_every_layout_is_the_same_checkpoint(exported, tiny, tmp_path):
    convert(tiny.adapter, tmp_path / "kt", "kt")
    export_merged(tiny.model, tmp_path / "kt", tmp_path / "from-kt", dtype="float32")
    assert_identical(read_checkpoint(tmp_path / "from-kt"), read_checkpoint(exported))


def test_export_refuses_an_adapter_for_another_model(tiny, tmp_path):
    def shrink(t):
        k = "base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"
        t[k] = t[k][:-64].contiguous()

    adapter = rewrite(tiny.adapter, tmp_path / "bad")
    t = tensors(adapter / ADAPTER)
    shrink(t)
    save_file(t, str(adapter / ADAPTER))
    with pytest.raises(KTChatError, match="o_proj") as err:
        export_merged(tiny.model, adapter, tmp_path / "out")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("model_type, message", [
    ("llama", "model_type 'llama' is not a supported MoE family"),
    ("deepseek_v4", "model_type 'deepseek_v4' is not supported: DeepSeek-V4 routes"),
])
def test_export_refuses_a_family_ktchat_does_not_load(tiny, tmp_path, model_type, message):
    """export names experts with the registry entry load_model uses: a family without one is refused as load_model
    refuses it, before anything is written (it used to fall back to generic expert names)."""
    base = tmp_path / "base"
    base.mkdir()
    config = json.loads((tiny.model / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
    with pytest.raises(KTChatError, match=f"config.json: {message}"):
        export_merged(base, tiny.adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _fp8_blocks(key: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """DeepSeek-V3's FP8 format: an F8_E4M3 weight and its F32 weight_scale_inv, one per 128 x 128 block."""
    (rows, cols), b = w.shape, 128
    blocks = w.float().reshape(rows // b, b, cols // b, b)
    scale = blocks.abs().amax(dim=(1, 3)) / 448
    q = (blocks / scale[:, None, :, None]).reshape(rows, cols).to(torch.float8_e4m3fn)
    return {key: q, f"{key}_scale_inv": scale.contiguous()}


def _mlx_4bit(key: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """MLX's 4-bit format: eight values packed into each U32 of the weight, BF16 scales and biases per 64 inputs."""
    groups = w.float().reshape(w.shape[0], -1, 64)
    low, scale = groups.amin(-1), (groups.amax(-1) - groups.amin(-1)) / 15
    q = ((groups - low[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int64)
    packed = (q.reshape(w.shape[0], -1, 8) << (4 * torch.arange(8))).sum(-1).to(torch.uint32)
    module = key.removesuffix(".weight")
    return {key: packed, f"{module}.scales": scale.bfloat16(), f"{module}.biases": low.bfloat16()}


QUANTIZED = {  # scheme -> (how a routed expert weight is stored, config.json's note of it, its dtypes on disk)
    "fp8": (_fp8_blocks, {"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                                  "weight_block_size": [128, 128]}}, {"F8_E4M3", "F32"}),
    "mlx-4bit": (_mlx_4bit, {"quantization": {"group_size": 64, "bits": 4}}, {"U32", "BF16"}),
}


def quantized_base(tiny, out: Path, scheme: str) -> Path:
    """The tiny checkpoint with its routed experts stored quantized, as real checkpoints store them."""
    quantize, note, _ = QUANTIZED[scheme]
    out.mkdir()
    weight_map = {}
    for shard in sorted(set(json.loads((tiny.model / INDEX).read_text())["weight_map"].values())):
        stored = {}
        for key, w in tensors(tiny.model / shard).items():
            stored.update(quantize(key, w) if ".mlp.experts." in key else {key: w})
        save_file(stored, str(out / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(stored, shard))
    (out / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}))
    for f in tiny.model.iterdir():
        if f.suffix != ".safetensors" and f.name != INDEX:
            shutil.copy(f, out / f.name)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, **note}))
    return out


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                     b.reshape(-1).view(torch.uint8))


@pytest.fixture(scope="module")
def without_expert_lora(tiny, tmp_path_factory):
    """What a user trains on a base whose routed experts are quantized: LoRA on everything but those."""
    out = tmp_path_factory.mktemp("adapters") / "no-experts"
    return rewrite(tiny.adapter, out, keep=lambda k: ".mlp.experts." not in k)


@pytest.mark.parametrize("dtype", [None, "float32"])
@pytest.mark.parametrize("scheme", sorted(QUANTIZED))
def test_export_copies_quantized_tensors_unchanged(tiny, without_expert_lora, tmp_path, scheme, dtype):
    """F8_E4M3 / U32 experts and their scales are copied byte for byte (the scales are re-typed with the compute
    dtypes: F32 stays F32, MLX's BF16 ones follow --dtype); everything else is exactly the export of the plain base."""
    base = quantized_base(tiny, tmp_path / "base", scheme)
    export_merged(base, without_expert_lora, tmp_path / "out", dtype=dtype, format="base")
    export_merged(tiny.model, without_expert_lora, tmp_path / "plain", dtype=dtype)
    got, src, plain = (read_checkpoint(tmp_path / d) for d in ("out", "base", "plain"))
    assert got.keys() == src.keys()
    quantized = {k for k in src if ".mlp.experts." in k}
    assert {st_name(src[k].dtype) for k in quantized} == QUANTIZED[scheme][2]
    for k in quantized:
        cast = dtype and src[k].dtype == torch.bfloat16  # MLX's scales and biases: a compute dtype
        assert same_bytes(got[k], src[k].float() if cast else src[k]), k
    for k in got.keys() - quantized:
        assert same_bytes(got[k], plain[k]), k
    index = json.loads((tmp_path / "out" / INDEX).read_text())
    assert index["weight_map"] == json.loads((base / INDEX).read_text())["weight_map"]
    assert index["metadata"]["total_size"] == sum(f.stat().st_size - 8 - int.from_bytes(f.read_bytes()[:8], "little")
                                                  for f in (tmp_path / "out").glob("*.safetensors"))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config.items() >= QUANTIZED[scheme][1].items() and config["torch_dtype"] == (dtype or "bfloat16")


def test_export_refuses_lora_on_a_quantized_weight(tiny, tmp_path):
    """W + B @ A on an F8 weight whose config names no quantization would ignore its scales: refused, naming the
    tensor, before anything is written. (FP8 and INT4 bases with their quantization_config merge:
    tests/test_quantized.py.)"""
    base = quantized_base(tiny, tmp_path / "base", "fp8")
    config = json.loads((base / "config.json").read_text())
    del config["quantization_config"]
    (base / "config.json").write_text(json.dumps(config))
    refusal = r"experts\.\d\.\w+_proj\.weight: stored as F8_E4M3, a quantized dtype, but config.json has no quantization_"
    with pytest.raises(KTChatError, match=refusal) as err:
        export_merged(base, tiny.adapter, tmp_path / "out")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


# ---- inspect ----

def test_inspect_lists_channels_and_totals(tiny, capsys):
    assert run_cli("inspect", tiny.adapter, "--model", tiny.model) == 0
    out = capsys.readouterr().out
    assert "model.layers.1.mlp.experts.{0..7}.gate_proj  KT (CPU)" in out
    assert "model.layers.0.self_attn.q_proj" in out and "PEFT (GPU)" in out
    assert "KT (CPU): 48 LoRA modules" in out and "PEFT (GPU): 21 LoRA modules" in out
    assert "no problems found" in out


def test_inspect_reports_every_problem(tiny, tmp_path, capsys):
    adapter = rewrite(tiny.adapter, tmp_path / "bad")
    t = tensors(adapter / ADAPTER)
    t["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"][0, 0] = float("nan")
    t["base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"] = torch.zeros(200, 8)
    del t["base_model.model.model.layers.2.mlp.experts.5.up_proj.lora_A.weight"]
    t["base_model.model.model.layers.1.self_attn.nonexistent.lora_A.weight"] = torch.zeros(8, 256)
    t["base_model.model.model.layers.1.self_attn.nonexistent.lora_B.weight"] = torch.zeros(256, 8)
    save_file(t, str(adapter / ADAPTER))
    assert run_cli("inspect", adapter, "--model", tiny.model, "--json") == 1
    problems = json.loads(capsys.readouterr().out)["problems"]
    for fragment in ("NaN", "layers.1.self_attn.o_proj", "experts.5.up_proj has lora_B but no lora_A", "nonexistent"):
        assert sum(fragment in p for p in problems) == 1, (fragment, problems)
    assert all(str(adapter) in p and "\n" not in p for p in problems)


def test_cli_commands_log_what_they_did(tiny, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        assert run_cli("convert", tiny.adapter, tmp_path / "kt", "--to", "kt") == 0
    assert "KT fused" in caplog.text


def test_manifest_alpha_survives_the_trip_through_peft(tiny, tmp_path):
    """KT keeps the experts' alpha in the manifest only; the PEFT layout gets it as an alpha_pattern, and back."""
    from ktchat.adapter import GENERIC_EXPERTS, read_adapter, split_channels

    convert(tiny.adapter, tmp_path / "kt", "kt")
    path = tmp_path / "kt/kt_adapter_manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "lora": {"rank": 8, "alpha": 32.0}}))
    convert(tmp_path / "kt", tmp_path / "peft", "peft")
    peft, routed = split_channels(read_adapter(tmp_path / "peft"), GENERIC_EXPERTS)
    assert {g.scale for g in routed.values()} == {4.0} and {m.scale for m in peft.values()} == {2.0}
    convert(tmp_path / "peft", tmp_path / "kt2", "kt")
    assert json.loads((tmp_path / "kt2/kt_adapter_manifest.json").read_text())["lora"] == {"rank": 8, "alpha": 32.0}
