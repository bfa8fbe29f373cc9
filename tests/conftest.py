import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny():
    """The tiny DeepSeek-V2 model + trained all-target adapter, built once into a persistent cache."""
    from ktchat.tiny import build_tiny

    return build_tiny(Path(os.environ.get("KTCHAT_TEST_CACHE", REPO / ".cache" / "tiny")))


@pytest.fixture(scope="session")
def chat_prompts(tiny):
    """The trained questions as chat prompts, and a long multi-turn chat ending in the first question."""
    from transformers import AutoTokenizer

    from ktchat.tiny import TRAINED_QA

    tok = AutoTokenizer.from_pretrained(tiny.model)

    def encode(messages):
        return tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
            "input_ids"
        ]

    history = [m for q, a in TRAINED_QA * 3 for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    singles = [encode([{"role": "user", "content": q}]) for q, _ in TRAINED_QA]
    return singles + [encode(history + [{"role": "user", "content": TRAINED_QA[0][0]}])]


@pytest.fixture(scope="session")
def prompts(tiny, chat_prompts):
    """The chat prompts, and a 300-token random prompt (out of distribution: near-ties amplify rounding)."""
    long = torch.randint(0, 500, (1, 300), generator=torch.Generator().manual_seed(0))
    return chat_prompts + [long]


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
    from ktchat.tiny import build_tiny

    root = Path(os.environ.get("KTCHAT_TEST_CACHE", REPO / ".cache" / "tiny"))
    built = {}

    def build(name: str):
        if name not in built:
            where = root if name == "deepseek_v2" else root.with_name(f"{root.name}-{name}")  # DeepSeek-V2: `tiny`
            built[name] = build_tiny(where, family=name)
        return built[name]

    return build
