"""CPU backends for routed experts, one class each behind `ExpertsBackend`."""

from __future__ import annotations

import logging

from ..errors import KTChatError
from .base import ExpertsBackend, ExpertsSpec
from .torch_backend import TorchExperts

__all__ = ["BACKENDS", "ExpertsBackend", "ExpertsSpec", "TorchExperts", "resolve_backend"]

logger = logging.getLogger(__name__)

BACKENDS: dict[str, type[ExpertsBackend]] = {"torch": TorchExperts}


def resolve_backend(name: str) -> type[ExpertsBackend]:
    """Maps "auto" | "torch" | "kt" to a backend class, saying in one line which and why."""
    if name == "auto":
        logger.info("experts backend: torch (kt_kernel backend not available in this version)")
        return TorchExperts
    if name not in ("torch", "kt"):
        raise KTChatError(f"experts_backend must be 'auto', 'torch' or 'kt', got {name!r}")
    if name not in BACKENDS:
        raise KTChatError(f"experts_backend {name!r} is not available yet; use 'torch'")
    return BACKENDS[name]
