import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny():
    """The tiny DeepSeek-V2 model + trained all-target adapter, built once into a persistent cache."""
    from ktchat.tinymodels import build_tiny

    return build_tiny(Path(os.environ.get("KTCHAT_TEST_CACHE", REPO / ".cache" / "tiny")))


@pytest.fixture(scope="session")
def chat_prompts(tiny):
    """The trained questions as chat prompts, and a long multi-turn chat ending in the first question."""
    from transformers import AutoTokenizer

    from reference import chat_prompt_ids

    return chat_prompt_ids(AutoTokenizer.from_pretrained(tiny.model))


@pytest.fixture(scope="session")
def prompts(chat_prompts):
    """The chat prompts, and a 300-token random prompt (out of distribution: near-ties amplify rounding)."""
    from reference import random_prompt

    return chat_prompts + [random_prompt()]


@pytest.fixture(scope="session")
def reference(tiny):
    from reference import load_reference, merge_by_hand

    return load_reference(merge_by_hand(tiny.model, tiny.adapter, tiny.root / "merged-all"))


@pytest.fixture(scope="session")
def reference_without_expert_lora(tiny):
    from reference import is_routed_expert, load_reference, merge_by_hand

    out = tiny.root / "merged-no-expert-lora"
    return load_reference(merge_by_hand(tiny.model, tiny.adapter, out, keep=lambda m: not is_routed_expert(m)))


@pytest.fixture(scope="session")
def tiny_family():
    """family name -> that family's tiny model + trained adapter, cached beside `tiny` (.cache/tiny-<family>)."""
    from ktchat.tinymodels import build_tiny

    root = Path(os.environ.get("KTCHAT_TEST_CACHE", REPO / ".cache" / "tiny"))
    built = {}

    def build(name: str):
        from ktchat.tinymodels.families import family

        reason = family(name).unavailable()  # Qwen3.5-MoE under transformers 4.57: not built there
        if reason:
            pytest.skip(reason)
        if name not in built:
            where = root if name == "deepseek_v2" else root.with_name(f"{root.name}-{name}")  # DeepSeek-V2: `tiny`
            built[name] = build_tiny(where, family=name)
        return built[name]

    return build
