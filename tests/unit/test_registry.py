"""The family registry: every entry is exercised end to end by a tiny model, and unknown families are refused."""

import re
import types

import pytest

from ktchat.errors import KTChatError
from ktchat.model.registry import ARCHS, arch_for
from ktchat.tinymodels import FAMILY_NAMES


def test_every_registered_family_has_a_tiny_model_and_back():
    """tests/test_families.py runs each tiny family against its hand-merged reference: a family without one is
    untested, a tiny model without an entry cannot load."""
    assert set(ARCHS) == set(FAMILY_NAMES)


def test_a_family_the_running_transformers_lacks_says_so():
    """Families whose model transformers 4.57 lacks (Qwen3.5-MoE, DeepSeek-V3.2, Kimi-K2.5) are not built there and
    their tests skip, naming the reason; under 5.x every family is available."""
    import importlib.util

    import transformers

    from ktchat.tinymodels.families import family

    lacking = {"qwen3_5_moe_text", "qwen3_5_moe", "deepseek_v32", "kimi_k25"} if transformers.__version__.startswith("4.") else set()
    for name in FAMILY_NAMES:
        recipe = family(name)
        reason = recipe.unavailable()
        if name in lacking:
            assert importlib.util.find_spec(f"transformers.models.{recipe.needs}") is None
            assert reason == (f"transformers {transformers.__version__} has no {recipe.needs} model "
                              f"({name} needs transformers 5)")
        else:
            assert reason is None, reason


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_entry_is_keyed_by_its_model_type(name):
    assert ARCHS[name].model_type == name
    assert {canon for _, canon in ARCHS[name].proj_names} == {"gate", "up", "down"}


def test_unknown_model_type_is_one_line_naming_it_and_the_supported():
    with pytest.raises(KTChatError, match=r"model_type 'llama' is not a supported MoE family \(supported: .*mixtral"):
        arch_for(types.SimpleNamespace(model_type="llama"))


def test_deepseek_v4_is_refused_in_one_line_saying_why():
    with pytest.raises(KTChatError) as info:
        arch_for(types.SimpleNamespace(model_type="deepseek_v4"))
    message = str(info.value)
    assert "\n" not in message and message.startswith("config.json: model_type 'deepseek_v4' is not supported: ")
    assert "token id" in message and "clamp" in message


def test_kimi_k2_reads_as_the_native_deepseek_v3():
    assert arch_for(types.SimpleNamespace(model_type="kimi_k2", n_routed_experts=8, n_group=1, topk_group=1,
                                          num_experts_per_tok=2)) is ARCHS["deepseek_v3"]


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


@pytest.mark.parametrize("model_type", ["deepseek_v3", "glm4_moe"])
@pytest.mark.parametrize("overrides, fragment", [
    ({"scoring_func": "softmax"}, "scoring_func 'softmax' is not supported for {model_type} (only 'sigmoid')"),
    ({"topk_method": "greedy"}, "topk_method 'greedy' is not supported for {model_type} (only 'noaux_tc')"),
    ({"n_group": 3}, "n_routed_experts 8, n_group 3, topk_group 1 cannot route 2 experts per token"),
    ({"n_group": 8}, "groups of >= 2 experts"),
    ({"n_group": 4, "num_experts_per_tok": 3}, "topk_group * group size >= k"),
])
def test_noaux_tc_configs_it_cannot_route_are_refused(model_type, overrides, fragment):
    """DeepSeek-V3 and GLM-4-MoE share the sigmoid + bias router: the same checks, naming the family."""
    config = types.SimpleNamespace(model_type=model_type, n_routed_experts=8, n_group=2, topk_group=1,
                                   num_experts_per_tok=2)
    for key, value in overrides.items():
        setattr(config, key, value)
    with pytest.raises(KTChatError, match=re.escape(fragment.format(model_type=model_type))):
        arch_for(config)


@pytest.mark.parametrize("model_type", ["deepseek_v3", "glm4_moe"])
def test_noaux_tc_configs_without_topk_method_are_accepted(model_type):
    """GLM-4.5's config.json names no topk_method or scoring_func (transformers' Glm4Moe routes noaux_tc anyway)."""
    config = types.SimpleNamespace(model_type=model_type, n_routed_experts=160, n_group=1, topk_group=1,
                                   num_experts_per_tok=8)
    assert arch_for(config).model_type == model_type
