"""CPU backends for routed experts, one class each behind `ExpertsBackend`."""

from __future__ import annotations

import functools
import logging
from typing import Callable

from ..errors import KTChatError
from . import kt_backend
from .base import BoundExperts, ExpertsBackend, ExpertsSpec
from .kt_backend import KTExperts
from .torch_backend import TorchExperts

__all__ = ["BACKENDS", "BoundExperts", "ExpertsBackend", "ExpertsSpec", "KTExperts", "TorchExperts", "backend_factory"]

logger = logging.getLogger(__name__)

BACKENDS: dict[str, type[ExpertsBackend]] = {"torch": TorchExperts, "kt": KTExperts}


def backend_factory(
    name: str = "auto", *, moe_lora: str | None = None, kt_method: str | None = None, num_threads: int | None = None,
    keep_host_weights: bool = False,
) -> Callable[[ExpertsSpec], ExpertsBackend]:
    """Maps "auto" | "torch" | "kt" and its options to a per-layer backend constructor; says which, and why.
    keep_host_weights: kt keeps its bf16 weights beside the kernel's packed copy (for GPU prefill)."""
    if name not in ("auto", *BACKENDS):
        raise KTChatError(f"experts_backend must be one of auto, {', '.join(BACKENDS)} (got {name!r})")
    if name == "auto":
        use_kt, why = kt_backend.auto_choice(kt_method or "bf16")  # imports kt_kernel only now, never at `import ktchat`
        name = "kt" if use_kt else "torch"
        logger.info("experts backend: %s (%s)", name, why)
    if name == "torch":  # int8: KT's INT8 of the weights; fp8/rawint4: the checkpoint's, dequantized exactly
        if kt_method not in (None, "bf16", "int8", "fp8", "rawint4") or num_threads is not None:
            logger.warning("ignored: kt_method %s / kt_num_threads apply to the kt experts backend, not torch",
                           kt_method)
        return functools.partial(TorchExperts, moe_lora=moe_lora or "exact", kt_int8=kt_method == "int8")
    if moe_lora is None:
        moe_lora = "exact" if kt_backend.unavailable_reason("exact", kt_method or "bf16") is None else "merged"
    options = {"moe_lora": moe_lora, "method": kt_method or "bf16", "num_threads": num_threads,
               "keep_base_weights": keep_host_weights}
    reason = kt_backend.unavailable_reason(options["moe_lora"], options["method"])
    if reason:
        raise KTChatError(f"experts_backend kt: {reason}")
    logger.info("kt experts: moe_lora=%s, method=%s", options["moe_lora"], options["method"])
    return functools.partial(KTExperts, **options)
