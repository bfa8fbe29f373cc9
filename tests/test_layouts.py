"""Every adapter layout KT training writes, built from the tiny trained adapter, loads and equals the hand-merged
reference (fp32, 1e-4): per-expert PEFT (.safetensors, .bin, adapter name in keys), KT fused written by ktchat and
by kt_kernel's own save code, PEFT's transformers-5 parameter LoRA (written by PEFT itself), KT wrapper segments
in keys; Mixtral expert names at the adapter level."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from ktchat import KTChatError, load_model
from ktchat.adapter import read_adapter, split_channels
from ktchat.adapter.writer import convert
from ktchat.model import offloaded_blocks

from reference import DEVICE, load_reference, logits, merge_by_hand, read_checkpoint, rel_err
from tolerances import FP32_BOUND


ADAPTER = "adapter_model.safetensors"
TF5 = transformers.__version__.startswith("5.")
DENSE_OR_SHARED_MLP = re.compile(r"\.mlp\.(shared_experts\.)?(gate|up|down)_proj$")


# ---- layout builders (shared with test_convert_export and test_adapter_fuzz) ----

def rewrite(src: Path, dst: Path, rename=lambda k: k, keep=lambda k: True, fmt="safetensors") -> Path:
    """A copy of a PEFT adapter with its keys renamed/filtered, as safetensors or a torch .bin."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "adapter_config.json", dst)
    tensors = {rename(k): v for k, v in load_file(str(src / ADAPTER)).items() if keep(k)}
    if fmt == "bin":
        torch.save(tensors, dst / "adapter_model.bin")
    else:
        save_file(tensors, str(dst / ADAPTER))
    return dst


def moe_segment(segment: str):
    """Old KT integrations wrapped the MoE block: `model.layers.1.mlp.X` -> `model.layers.1.mlp.<segment>.X`."""
    return lambda k: re.sub(r"(\.layers\.[12]\.mlp\.)", rf"\1{segment}.", k)


def kt_kernel_written(tiny, dst: Path, dtype=torch.float32) -> Path:
    """An adapter saved by kt_kernel's own `save_kt_adapter_artifacts`, its wrappers holding the tiny LoRA (any
    family: the routed-expert modules found with the family's own expert path)."""
    from kt_kernel.sft.artifacts import save_kt_adapter_artifacts
    from transformers import AutoConfig

    from ktchat.model.registry import arch_for

    path = arch_for(AutoConfig.from_pretrained(tiny.model)).expert_path
    t = load_file(str(tiny.adapter / ADAPTER))
    experts = {}  # layer -> {(expert, proj, side): tensor}
    for key, tensor in t.items():
        module, _, side = key.removeprefix("base_model.model.").rpartition(".lora_")
        if (parsed := path.parse(module)) is not None:
            layer, expert, proj = parsed
            experts.setdefault(layer, {})[expert, proj, side.removesuffix(".weight")] = tensor
    rewrite(tiny.adapter, dst, keep=lambda k: path.parse(k.removeprefix("base_model.model.").rpartition(".lora_")[0]) is None)

    def six(layer):
        got, n = experts[layer], 1 + max(e for e, _, _ in experts[layer])
        return [torch.nn.Parameter(torch.stack([got[e, p, s] for e in range(n)]).to(dtype))
                for p in ("gate", "up", "down") for s in "AB"]

    wrappers = [SimpleNamespace(layer_idx=layer, lora_experts=None, _full_weight_grad=False,
                                _fused_expert_lora_params=six(layer), _lora_rank=8, _lora_alpha=16.0)
                for layer in sorted(experts)]
    save_kt_adapter_artifacts(SimpleNamespace(_kt_wrappers=wrappers, config=SimpleNamespace(_name_or_path="/elsewhere/base")), dst)
    return dst


def peft_v5_by_hand(tiny, dst: Path) -> Path:
    """PEFT's transformers-5 conversion of the tiny adapter, written from its documented layout: routed experts
    as parameter LoRA (gate_up: A [E*2r, H] with gate then up rows per expert, B [2I, 2r*E] block-diagonal, columns
    rank-major; down: A [E*r, I], B [H, r*E]); the dense and shared-expert MLP LoRA dropped, as PEFT drops it."""
    t = load_file(str(tiny.adapter / ADAPTER))
    out = {k: v for k, v in t.items() if ".mlp." not in k}
    for layer in (1, 2):
        p = f"base_model.model.model.layers.{layer}.mlp.experts"
        get = lambda proj, s: torch.stack([t[f"{p}.{e}.{proj}_proj.lora_{s}.weight"] for e in range(8)])  # noqa: E731
        a = torch.cat([get("gate", "A"), get("up", "A")], dim=1)  # [E, 2r, H]
        b = torch.stack([torch.block_diag(g, u) for g, u in zip(get("gate", "B"), get("up", "B"))])  # [E, 2I, 2r]
        out[f"{p}.base_layer.lora_A.weight"] = a.flatten(0, 1).contiguous()
        out[f"{p}.base_layer.lora_B.weight"] = b.permute(2, 0, 1).flatten(0, 1).T.contiguous()
        out[f"{p}.lora_A.weight"] = get("down", "A").flatten(0, 1).contiguous()
        out[f"{p}.lora_B.weight"] = get("down", "B").permute(2, 0, 1).flatten(0, 1).T.contiguous()
    dst.mkdir(parents=True, exist_ok=True)
    save_file(out, str(dst / ADAPTER))
    cfg = json.loads((tiny.adapter / "adapter_config.json").read_text())
    cfg.update(target_modules=["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"],
               target_parameters=["gate_up_proj", "down_proj"],
               rank_pattern={r".*\.gate_up_proj": 16}, alpha_pattern={r".*\.gate_up_proj": 32})
    (dst / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def peft_v5_by_peft(tiny, dst: Path) -> Path:
    """The same conversion done by PEFT itself: load the per-expert adapter on plain transformers 5, save."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny.model, dtype=torch.float32)
    PeftModel.from_pretrained(base, str(tiny.adapter)).save_pretrained(str(dst))
    return dst


@pytest.fixture(scope="module")
def layouts(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    made = {
        "peft": tiny.adapter,
        "peft-bin": rewrite(tiny.adapter, root / "bin", fmt="bin"),
        "peft-adapter-name": rewrite(tiny.adapter, root / "named", rename=lambda k: re.sub(r"\.lora_([AB])\.", r".lora_\1.default.", k)),
        "orig-module": rewrite(tiny.adapter, root / "orig", rename=moe_segment("orig_module")),
        "original-moe": rewrite(tiny.adapter, root / "original", rename=moe_segment("original_moe")),
    }
    convert(tiny.adapter, root / "kt", "kt")
    made["kt-fused"] = root / "kt"
    return made


@pytest.fixture(scope="module")
def reference_without_dense_mlp_lora(tiny):
    """What PEFT's transformers-5 conversion keeps: every LoRA except the dense and shared-expert MLP's."""
    out = tiny.root / "merged-no-dense-mlp-lora"
    return load_reference(merge_by_hand(tiny.model, tiny.adapter, out, keep=lambda m: not DENSE_OR_SHARED_MLP.search(m)))


def assert_matches(adapter, tiny, reference, prompts):
    model, _ = load_model(tiny.model, adapter, experts_backend="torch", dtype="float32", device=DEVICE)
    for ids in prompts:
        assert rel_err(logits(model, ids), logits(reference, ids)) < FP32_BOUND
    return model


@pytest.mark.parametrize("layout", ["peft", "peft-bin", "peft-adapter-name", "kt-fused", "orig-module", "original-moe"])
def test_layout_loads_exactly(layout, layouts, tiny, reference, prompts):
    assert_matches(layouts[layout], tiny, reference, prompts)


def test_adapter_written_by_kt_kernel_loads_exactly(tiny, reference, prompts, tmp_path):
    """The real peer: kt_kernel.sft.artifacts.save_kt_adapter_artifacts, with a base path spelled differently."""
    pytest.importorskip("kt_kernel.sft.artifacts")
    adapter = kt_kernel_written(tiny, tmp_path / "kt")
    assert json.loads((adapter / "kt_adapter_manifest.json").read_text())["base"]["model_name_or_path"] != str(tiny.model)
    assert_matches(adapter, tiny, reference, prompts)


def test_bf16_kt_kernel_adapter_reaches_the_experts_bit_for_bit(tiny, tmp_path):
    pytest.importorskip("kt_kernel.sft.artifacts")
    adapter = kt_kernel_written(tiny, tmp_path / "kt", dtype=torch.bfloat16)
    stored = load_file(str(adapter / "fused_expert_lora.safetensors"))
    model, _ = load_model(tiny.model, adapter, experts_backend="torch", dtype="float32", device="cpu")
    for layer, block in offloaded_blocks(model).items():
        for proj, lora in block.experts.backend.lora.items():
            assert torch.equal(lora.a, stored[f"layers.{layer}.experts.{proj}_lora_a"].float())
            assert torch.equal(lora.b, stored[f"layers.{layer}.experts.{proj}_lora_b"].float())
            assert lora.scale == 2.0


def test_peft_v5_layout_loads_exactly(tiny, reference_without_dense_mlp_lora, prompts, tmp_path):
    adapter = peft_v5_by_hand(tiny, tmp_path / "v5")
    model = assert_matches(adapter, tiny, reference_without_dense_mlp_lora, prompts)
    lora = offloaded_blocks(model)[1].experts.backend.lora
    assert {p: s.a.shape[1] for p, s in lora.items()} == {"gate": 8, "up": 8, "down": 8}  # zero halves dropped


@pytest.mark.skipif(not TF5, reason="PEFT writes parameter LoRA for fused experts only under transformers 5")
def test_peft_v5_layout_written_by_peft_is_the_documented_one(tiny, tmp_path):
    by_peft = peft_v5_by_peft(tiny, tmp_path / "peft")
    by_hand = peft_v5_by_hand(tiny, tmp_path / "hand")
    got, want = load_file(str(by_peft / ADAPTER)), load_file(str(by_hand / ADAPTER))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    cfg = json.loads((by_peft / "adapter_config.json").read_text())
    assert set(cfg["target_parameters"]) == {"gate_up_proj", "down_proj"}
    assert cfg["rank_pattern"] == {r".*\.gate_up_proj": 16} and cfg["alpha_pattern"] == {r".*\.gate_up_proj": 32}


@pytest.mark.skipif(not TF5, reason="PEFT's target_parameters on fused experts exist only under transformers 5")
def test_get_peft_model_target_parameters_adapter_loads_exactly(tiny, prompts, tmp_path):
    """An adapter trained the transformers-5 way (gate_up with one shared rank-8 LoRA, not block-diagonal): ktchat
    equals a hand merge of its documented layout, and PEFT's own forward on plain transformers 5."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny.model, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "kv_b_proj", "o_proj"],
                        target_parameters=["gate_up_proj", "down_proj"])
    peft_model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    reference = load_reference(merge_fused_by_hand(tiny.model, tmp_path / "adapter", tmp_path / "merged"))
    model, _ = load_model(tiny.model, tmp_path / "adapter", experts_backend="torch", dtype="float32", device=DEVICE)
    peft_model.eval()
    for ids in prompts:
        want = logits(reference, ids)
        assert rel_err(logits(model, ids), want) < FP32_BOUND
        assert rel_err(logits(peft_model, ids), want) < FP32_BOUND


def merge_fused_by_hand(model_dir: Path, adapter_dir: Path, out_dir: Path) -> Path:
    """fp64 merge of a target_parameters adapter by the documented formula
    dW[e] = s * sum_k B[:, k*E + e] A[e*r + k, :] (gate_up rows: gate then up), into per-expert base weights."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    s = cfg["lora_alpha"] / cfg["r"]
    w = {k: v.double() for k, v in read_checkpoint(model_dir).items()}
    lora = {k.removeprefix("base_model.model."): v.double() for k, v in load_file(str(adapter_dir / ADAPTER)).items()}
    for key in [k for k in lora if k.endswith(".lora_A.weight")]:
        module, a, b = key.removesuffix(".lora_A.weight"), lora[key], lora[key.replace("lora_A", "lora_B")]
        if ".experts" not in module:
            w[f"{module}.weight"] += s * (b @ a)
            continue
        container = module.removesuffix(".base_layer")
        n, r = 8, a.shape[0] // 8
        for e in range(n):
            delta = s * sum(torch.outer(b[:, k * n + e], a[e * r + k]) for k in range(r))
            if module.endswith(".base_layer"):  # gate_up_proj, the inner wrapper
                half = delta.shape[0] // 2
                w[f"{container}.{e}.gate_proj.weight"] += delta[:half]
                w[f"{container}.{e}.up_proj.weight"] += delta[half:]
            else:
                w[f"{container}.{e}.down_proj.weight"] += delta
    out_dir.mkdir(parents=True)
    save_file({k: v.float().contiguous() for k, v in w.items()}, str(out_dir / "model.safetensors"))
    for f in model_dir.glob("*.json"):
        if not f.name.startswith("model.safetensors"):
            shutil.copy(f, out_dir / f.name)
    return out_dir


def test_mixtral_expert_names_split_like_deepseek_names(tiny, tmp_path):
    """w1/w3/w2 under block_sparse_moe (Mixtral, transformers 4.x) stack to the same expert LoRA as gate/up/down."""
    from ktchat.model.registry import ARCHS, MoEArch

    names = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
    mixtral = rewrite(tiny.adapter, tmp_path / "mixtral", rename=lambda k: re.sub(
        r"\.mlp\.experts\.(\d+)\.(\w+_proj)\.", lambda m: f".block_sparse_moe.experts.{m[1]}.{names[m[2]]}.", k))
    arch = MoEArch("mixtral", route=None, check_config=None, num_experts_attr="num_local_experts", top_k_attr="",
                   moe_intermediate_attr="", moe_attr="block_sparse_moe", shared_experts_attr=None,
                   proj_names=(("w1", "gate"), ("w3", "up"), ("w2", "down")))
    _, got = split_channels(read_adapter(mixtral), arch.expert_path)
    peft, want = split_channels(read_adapter(tiny.adapter), ARCHS["deepseek_v2"].expert_path)
    assert got.keys() == want.keys() and len(peft) == 21
    for key, g in got.items():
        assert g.module_name(3) == f"model.layers.{key[0]}.block_sparse_moe.experts.3.{names[key[1] + '_proj']}"
        assert all(torch.equal(x, y) for x, y in zip(g.load(), want[key].load()))


def test_sglang_layout_is_refused_with_a_way_out(tiny, tmp_path):
    convert(tiny.adapter, tmp_path / "sglang", "sglang")
    with pytest.raises(KTChatError, match="--to peft") as err:
        load_model(tiny.model, tmp_path / "sglang", experts_backend="torch", dtype="float32", device="cpu")
    assert "\n" not in str(err.value)
