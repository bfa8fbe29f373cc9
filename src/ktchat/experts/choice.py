"""Which backend runs the routed experts, in which LoRA mode and weight format: decided here once, said once.

"auto" takes kt where one of its kernels for the weight format runs on this CPU, else torch; a format other than
bf16 whose kernel this kt build lacks falls back to the torch backend, on the same math where torch has it (int8,
fp8, rawint4) and on the bf16 weights for int4 (or, asked for kt by name, is one error). moe_lora defaults to
"exact" where kt has the SFT kernel (and always on torch), else "merged".
kt_kernel is imported only here and only when kt may run: `import ktchat` never loads it.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Callable

from ..errors import KTChatError
from ..formats import MOE_LORA_MODES
from . import kt_backend
from .base import ExpertsBackend, ExpertsSpec
from .kt_backend import KTExperts
from .torch_backend import TorchExperts

logger = logging.getLogger(__name__)

BACKENDS: dict[str, type[ExpertsBackend]] = {cls.name: cls for cls in (TorchExperts, KTExperts)}
_TORCH_METHODS = (None, "bf16", "int8", "fp8", "rawint4")  # the kt_method math the torch backend reproduces


@dataclass(frozen=True)
class ExpertsChoice:
    """The experts backend decided: "torch" or "kt", its LoRA mode and weight format, and its options."""

    backend: str
    moe_lora: str
    kt_method: str | None = None
    num_threads: int | None = None
    keep_host_weights: bool = False  # kt keeps its bf16 weights beside the kernel's packed copy (GPU prefill)

    def factory(self) -> Callable[[ExpertsSpec], ExpertsBackend]:
        """The per-layer backend constructor."""
        if self.backend == "torch":  # int8: KT's INT8 of the weights; fp8/rawint4: the checkpoint's, dequantized
            return functools.partial(TorchExperts, moe_lora=self.moe_lora, kt_int8=self.kt_method == "int8")
        return functools.partial(KTExperts, moe_lora=self.moe_lora, method=self.kt_method or "bf16",
                                 num_threads=self.num_threads, keep_base_weights=self.keep_host_weights)


def choose_experts(name: str = "auto", *, moe_lora: str | None = None, kt_method: str | None = None,
                   num_threads: int | None = None, keep_host_weights: bool = False,
                   adapters_method: bool = False) -> ExpertsChoice:
    """Maps "auto" | "torch" | "kt" and its options to the backend that runs, and says which and why.
    `adapters_method`: kt_method is the adapter's training format, not the user's (a refusal then says so)."""
    _check_choices(name, moe_lora, kt_method)
    asked, name = name, _format_fallback(name, moe_lora, kt_method, adapters_method)
    if name == "auto":
        use_kt, why = kt_backend.auto_choice(kt_method or "bf16")  # imports kt_kernel only now
        name = "kt" if use_kt else "torch"
        logger.info("experts backend: %s (%s)", name, why)
    if name == "torch":
        if (kt_method not in _TORCH_METHODS and asked == name) or num_threads is not None:
            logger.warning("ignored: kt_method %s / kt_num_threads apply to the kt experts backend, not torch",
                           kt_method)
        return ExpertsChoice("torch", moe_lora or "exact", kt_method)
    method = kt_method or "bf16"
    if moe_lora is None:
        moe_lora = "exact" if kt_backend.unavailable_reason("exact", method) is None else "merged"
    reason = kt_backend.unavailable_reason(moe_lora, method)
    if reason:
        raise KTChatError(f"experts_backend kt: {reason}")
    logger.info("kt experts: moe_lora=%s, method=%s", moe_lora, method)
    return ExpertsChoice("kt", moe_lora, kt_method, num_threads, keep_host_weights)


def _check_choices(name: str, moe_lora: str | None, kt_method: str | None) -> None:
    for key, value, allowed in (("experts_backend", name, ("auto", *BACKENDS)), ("moe_lora", moe_lora, MOE_LORA_MODES),
                                ("kt_method", kt_method, kt_backend.METHODS)):
        if value not in allowed and (value is not None or key == "experts_backend"):
            raise KTChatError(f"{key} must be one of {', '.join(allowed)} (got {value!r})")


def _format_fallback(name: str, moe_lora: str | None, method: str | None, adapters_method: bool) -> str:
    """A weight format other than bf16 that this CPU's kt build has no kernel for: "auto" runs the torch backend (on
    the same math where it has it, else on the bf16 weights) and says so; "kt" is refused, naming what to set
    instead."""
    if name == "torch" or method in (None, "bf16"):
        return name
    reason = kt_backend.unavailable_reason(moe_lora or "merged", method) if _kt_imports() else "no kt_kernel"
    same_math = method in _TORCH_METHODS
    if reason and name == "auto":
        logger.info("routed experts: torch backend on %s (%s)",
                    f"the same {method} math" if same_math else f"the bf16 weights: it has no {method} math", reason)
        return "torch"
    if reason:
        raise KTChatError(f"experts_backend kt: {reason}; use experts_backend torch "
                          + ("(same math, slower)" if same_math else f"(bf16 weights: it has no {method} math)")
                          + (f" or kt_method bf16 (not the adapter's {method})" if adapters_method else ""))
    return name


def _kt_imports() -> bool:
    try:
        kt_backend.kt_ext()
    except KTChatError:
        return False
    return True


def backend_factory(name: str = "auto", *, moe_lora: str | None = None, kt_method: str | None = None,
                    num_threads: int | None = None, keep_host_weights: bool = False
                    ) -> Callable[[ExpertsSpec], ExpertsBackend]:
    """choose_experts' per-layer backend constructor."""
    return choose_experts(name, moe_lora=moe_lora, kt_method=kt_method, num_threads=num_threads,
                          keep_host_weights=keep_host_weights).factory()
