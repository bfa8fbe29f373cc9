"""The family registry: every entry is exercised end to end by a tiny model, and unknown families are refused."""

import types

import pytest

from ktchat.errors import KTChatError
from ktchat.model.registry import ARCHS, arch_for
from ktchat.tinymodels import FAMILY_NAMES


def test_every_registered_family_has_a_tiny_model_and_back():
    """tests/test_families.py runs each tiny family against its hand-merged reference: a family without one is
    untested, a tiny model without an entry cannot load."""
    assert set(ARCHS) == set(FAMILY_NAMES)


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_entry_is_keyed_by_its_model_type(name):
    assert ARCHS[name].model_type == name
    assert {canon for _, canon in ARCHS[name].proj_names} == {"gate", "up", "down"}


def test_unknown_model_type_is_one_line_naming_it_and_the_supported():
    with pytest.raises(KTChatError, match=r"model_type 'llama' is not a supported MoE family \(supported: .*mixtral"):
        arch_for(types.SimpleNamespace(model_type="llama"))


@pytest.mark.parametrize("overrides, fragment", [
    ({"topk_method": "noaux_tc"}, "topk_method 'noaux_tc' is not supported for deepseek_v2"),
    ({"topk_method": "group_limited_greedy", "n_routed_experts": 10, "n_group": 3}, "divisible by n_group"),
])
def test_deepseek_v2_configs_it_cannot_route_are_refused(overrides, fragment):
    config = types.SimpleNamespace(model_type="deepseek_v2", topk_method="greedy", n_routed_experts=8, n_group=1)
    for key, value in overrides.items():
        setattr(config, key, value)
    with pytest.raises(KTChatError, match=fragment):
        arch_for(config)
