"""CPU backends for routed experts, one class each behind `ExpertsBackend`."""

from __future__ import annotations

import logging

from ..errors import KTChatError
from . import kt_backend
from .base import ExpertsBackend, ExpertsSpec
from .kt_backend import KTExperts
from .torch_backend import TorchExperts

__all__ = ["BACKENDS", "ExpertsBackend", "ExpertsSpec", "KTExperts", "TorchExperts", "resolve_backend"]

logger = logging.getLogger(__name__)

BACKENDS: dict[str, type[ExpertsBackend]] = {"torch": TorchExperts, "kt": KTExperts}


def resolve_backend(name: str) -> type[ExpertsBackend]:
    """Maps "auto" | "torch" | "kt" to a backend class, saying in one line which and why."""
    if name == "auto":
        use_kt, why = kt_backend.auto_choice()  # imports kt_kernel only now, never at `import ktchat`
        logger.info("experts backend: %s (%s)", "kt" if use_kt else "torch", why)
        return KTExperts if use_kt else TorchExperts
    if name not in ("torch", "kt"):
        raise KTChatError(f"experts_backend must be 'auto', 'torch' or 'kt', got {name!r}")
    if name not in BACKENDS:
        raise KTChatError(f"experts_backend {name!r} is not available yet; use 'torch'")
    return BACKENDS[name]
