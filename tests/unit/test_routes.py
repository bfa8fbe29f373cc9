"""The routing table: every checkpoint tensor's destination derived from the registry entry and the headers alone,
before anything is read (ktchat.model.routes). No model is built: the model's names are given."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from ktchat.formats.checkpoint import Checkpoint, QuantLayout
from ktchat.errors import KTChatError
from ktchat.model.registry import ARCHS
from ktchat.model.routes import DERIVED, EXPERT, FUSED, PARAM, SKIPPED, ModelNames, Route, route_checkpoint

SHARD = Path("model-00001-of-00001.safetensors")
NAMES = ModelNames(frozenset({"model.embed_tokens.weight", "model.layers.1.mlp.gate.weight"}),
                   frozenset({"model.rotary_emb.inv_freq"}), {1: 4})
V3 = SimpleNamespace(num_hidden_layers=3, num_nextn_predict_layers=1)  # layer 3 is the MTP layer


def routes(arch: str, names, member=None, model=NAMES) -> dict[str, Route]:
    checkpoint = Checkpoint(None, dict.fromkeys(names, SHARD), {})
    layout = QuantLayout(None, {}, member or {})
    return route_checkpoint(ARCHS[arch], checkpoint, layout, model, V3)


def test_each_tensor_gets_its_one_destination():
    got = routes("deepseek_v3", ["model.embed_tokens.weight", "model.layers.1.mlp.experts.3.up_proj.weight",
                                 "model.layers.1.mlp.experts.gate_up_proj", "model.rotary_emb.inv_freq",
                                 "model.layers.3.self_attn.q_proj.weight"])
    assert got["model.embed_tokens.weight"] == Route(PARAM, "model.embed_tokens.weight")
    assert got["model.layers.1.mlp.experts.3.up_proj.weight"] == Route(
        EXPERT, "model.layers.1.mlp.experts.3.up_proj.weight", 1, 3, "up")
    assert got["model.layers.1.mlp.experts.gate_up_proj"] == Route(
        FUSED, "model.layers.1.mlp.experts.gate_up_proj", 1, proj="gate_up_proj")
    assert got["model.rotary_emb.inv_freq"].kind == DERIVED
    mtp = got["model.layers.3.self_attn.q_proj.weight"]
    assert mtp.kind == SKIPPED and "multi-token-prediction" in mtp.reason


def test_a_quantized_modules_tensors_share_its_route():
    module = "model.layers.1.mlp.experts.0.down_proj"
    member = {f"{module}.weight": module, f"{module}.weight_scale_inv": module}
    got = routes("deepseek_v3", member, member)
    assert set(got.values()) == {Route(EXPERT, f"{module}.weight", 1, 0, "down", quantized=module)}


def test_shipped_names_route_under_the_models_names():
    got = routes("kimi_k25", ["language_model.model.layers.1.mlp.experts.0.gate_proj.weight"])
    assert got.popitem()[1] == Route(EXPERT, "model.language_model.layers.1.mlp.experts.0.gate_proj.weight", 1, 0,
                                     "gate")
    got = routes("mixtral", ["model.layers.1.block_sparse_moe.experts.2.w2.weight"])
    assert got.popitem()[1].order == (1, 2, "down")


@pytest.mark.parametrize("name, message", [
    ("model.layers.1.mlp.experts.4.up_proj.weight", "checkpoint tensor does not belong to the model"),  # expert 4 of 4
    ("model.layers.0.mlp.experts.0.up_proj.weight", "checkpoint tensor does not belong to the model"),  # a dense layer
    ("model.norm.weight", "checkpoint tensor does not belong to the model"),
])
def test_a_tensor_that_belongs_nowhere_is_refused_naming_it(name, message):
    with pytest.raises(KTChatError, match=f"^{SHARD.name}: {name}: {message}$"):
        routes("deepseek_v3", ["model.embed_tokens.weight", name])


def test_quantized_fused_experts_are_refused_with_the_reason():
    module = "model.layers.1.mlp.experts.gate_up_proj"
    with pytest.raises(KTChatError, match="quantized fused experts are not supported"):
        routes("deepseek_v3", [f"{module}.weight"], {f"{module}.weight": module})


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_every_family_parses_the_names_it_writes(name):
    arch = ARCHS[name]
    for proj in ("gate", "up", "down"):
        assert arch.expert_weight(arch.expert_weight_key(7, 11, proj)) == (7, 11, proj)
    experts = f"{arch.layers_path}.7.{arch.moe_attr}.{arch.experts_attr}"
    assert arch.fused_experts(f"{experts}.gate_up_proj") == (7, "gate_up_proj")
    assert arch.fused_experts(f"{experts}.down_proj") == (7, "down_proj")
    assert arch.expert_weight(f"{experts}.0.gate_proj.bias") is None
