"""CPU backends for routed experts, one class each behind `ExpertsBackend`; `choose_experts` picks one."""

from .base import BoundExperts, ExpertsBackend, ExpertsSpec
from .choice import BACKENDS, ExpertsChoice, backend_factory, choose_experts
from .kt_backend import KTExperts
from .torch_backend import TorchExperts

__all__ = ["BACKENDS", "BoundExperts", "ExpertsBackend", "ExpertsChoice", "ExpertsSpec", "KTExperts", "TorchExperts",
           "backend_factory", "choose_experts"]
