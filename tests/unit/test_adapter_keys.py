"""Adapter key translation (ktchat.adapter.keys, ExpertPath): pure functions, round trips over every layout's names."""

import itertools

import pytest

from ktchat.adapter.keys import (PeftKey, kt_fused_key, parse_kt_fused_key, parse_peft_key, peft_key, split_nested,
                                 unsupported_reason)

MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.12.mlp.experts.63.down_proj",
           "model.language_model.layers.3.linear_attn.in_proj_qkv", "model.layers.1.block_sparse_moe.experts.7.w1")


@pytest.mark.parametrize("module, side, prefix", list(itertools.product(MODULES, "AB", (True, False))))
def test_peft_keys_round_trip(module, side, prefix):
    assert parse_peft_key(peft_key(module, side, prefix=prefix)) == PeftKey(module, side, prefix, False)


@pytest.mark.parametrize("wrapper", ["orig_module", "original_moe"])
def test_older_kt_wrappers_are_removed_and_reported(wrapper):
    key = f"base_model.model.model.layers.2.mlp.{wrapper}.experts.5.up_proj.lora_B.weight"
    assert parse_peft_key(key) == PeftKey("model.layers.2.mlp.experts.5.up_proj", "B", True, True)


def test_adapter_names_inside_the_key_are_read_past():
    assert parse_peft_key("base_model.model.model.layers.0.self_attn.o_proj.lora_A.default.weight") == \
        PeftKey("model.layers.0.self_attn.o_proj", "A", True, False)


@pytest.mark.parametrize("key", ["model.layers.0.self_attn.q_proj.weight", "lora_A.weight",
                                 "base_model.model.model.layers.0.q_proj.lora_C.weight",
                                 "layers.0.experts.gate_lora_a"])
def test_what_is_not_a_peft_key_is_none(key):
    assert parse_peft_key(key) is None


@pytest.mark.parametrize("layer, proj, side", list(itertools.product((0, 7, 60), ("gate", "up", "down"), "AB")))
def test_kt_fused_keys_round_trip(layer, proj, side):
    key = kt_fused_key(layer, proj, side)
    assert key == f"layers.{layer}.experts.{proj}_lora_{side.lower()}"
    assert parse_kt_fused_key(key) == (layer, proj, side)


@pytest.mark.parametrize("key", ["layers.x.experts.gate_lora_a", "layers.1.experts.w1_lora_a",
                                 "layers.1.experts.gate_lora_c", "model.layers.1.experts.gate_lora_a"])
def test_what_is_not_a_kt_fused_key_is_none(key):
    assert parse_kt_fused_key(key) is None


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_nested_base_layers_split_off(depth):
    assert split_nested("model.layers.4.mlp.experts" + ".base_layer" * depth) == ("model.layers.4.mlp.experts", depth)


@pytest.mark.parametrize("key, fragment", [
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", "DoRA"),
    ("base_model.model.model.embed_tokens.lora_embedding_A", "embeddings"),
    ("base_model.model.lm_head.modules_to_save.default.weight", "modules_to_save"),
    ("base_model.model.model.layers.0.mlp.lora_experts.0.weight", "LoRA Experts"),
    ("something.else", "not a PEFT LoRA"),
])
def test_unsupported_keys_say_why(key, fragment):
    assert fragment in unsupported_reason(key)


def test_every_family_names_its_experts_both_ways():
    """registry.expert_weight_key and expert_path.parse are inverse on every family, under every block alias."""
    from ktchat.model.registry import ARCHS

    for arch in ARCHS.values():
        for layer, expert, (name, canon) in itertools.product((0, 11), (0, 5), arch.proj_names):
            module = arch.expert_weight_key(layer, expert, canon).removesuffix(".weight")
            assert arch.expert_path.parse(module) == (layer, expert, canon), module
            for alias in arch.moe_attr_aliases:
                aliased = module.replace(f".{arch.moe_attr}.", f".{alias}.")
                assert arch.expert_path.parse(aliased) == (layer, expert, canon), aliased
            assert arch.expert_path.parse(module.replace(f".{name}", ".q_proj")) is None
