import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny():
    """The tiny DeepSeek-V2 model + trained all-target adapter, built once into a persistent cache."""
    from ktchat.tiny import build_tiny

    return build_tiny(Path(os.environ.get("KTCHAT_TEST_CACHE", REPO / ".cache" / "tiny")))
