"""`ktchat convert` round trips bit for bit and agrees with kt_kernel's own reader and SGLang converter;
`ktchat export` writes a checkpoint plain transformers loads, equal to the hand-merged reference; `ktchat inspect`
shows every module and every problem."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ktchat import KTChatError
from ktchat.adapter.writer import convert
from ktchat.cli.adapter import add_command as add_adapter_commands
from ktchat.model.export import export_merged

from reference import load_reference, logits, read_checkpoint, rel_err
from test_layouts import kt_kernel_written, peft_v5_by_hand, rewrite

FP32_BOUND = 1e-4
ADAPTER, FUSED = "adapter_model.safetensors", "fused_expert_lora.safetensors"


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
