"""One entry per MoE family: where its MoE block is, how its router picks experts, how experts are named.

Adding a model family is adding one `MoEArch` to `ARCHS`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from ..adapter import ExpertPath
from ..errors import KTChatError

RouteFn = Callable[[torch.Tensor, object], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class MoEArch:
    model_type: str
    route: RouteFn  # fp32 router logits [T, E], config -> (weights [T, k] fp32, ids [T, k] int64)
    check_config: Callable[[object], None]
    num_experts_attr: str
    top_k_attr: str
    moe_intermediate_attr: str
    layers_path: str = "model.layers"
    moe_attr: str = "mlp"
    router_attr: str = "gate"
    shared_experts_attr: str | None = "shared_experts"
    experts_attr: str = "experts"
    proj_names: tuple[tuple[str, str], ...] = (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down"))

    def spec_sizes(self, config) -> tuple[int, int, int]:
        return (
            getattr(config, self.num_experts_attr),
            getattr(config, self.top_k_attr),
            getattr(config, self.moe_intermediate_attr),
        )

    @property
    def expert_path(self) -> ExpertPath:
        names = "|".join(re.escape(n) for n, _ in self.proj_names)
        pattern = rf"{re.escape(self.layers_path)}\.(?P<layer>\d+)\.{self.moe_attr}\.{self.experts_attr}\.(?P<expert>\d+)\.(?P<proj>{names})"
        return ExpertPath(re.compile(pattern), dict(self.proj_names))

    def expert_weight_key(self, layer: int, expert: int, proj: str) -> str:
        name = {canon: n for n, canon in self.proj_names}[proj]
        return f"{self.layers_path}.{layer}.{self.moe_attr}.{self.experts_attr}.{expert}.{name}.weight"


def _deepseek_v2_route(logits: torch.Tensor, config) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts, greedy or group-limited top-k, then the routed scaling factor (DeepSeek-V2)."""
    scores = logits.softmax(dim=-1, dtype=torch.float32)
    k = config.num_experts_per_tok
    if config.topk_method == "group_limited_greedy":
        n, e = scores.shape
        groups = scores.view(n, config.n_group, e // config.n_group).max(dim=-1).values
        keep = torch.zeros_like(groups).scatter_(1, torch.topk(groups, config.topk_group, dim=-1).indices, 1.0)
        scores = scores.masked_fill(~keep.bool().repeat_interleave(e // config.n_group, dim=1), 0.0)
    weights, ids = torch.topk(scores, k=k, dim=-1, sorted=False)
    if k > 1 and getattr(config, "norm_topk_prob", False):
        return weights / (weights.sum(dim=-1, keepdim=True) + 1e-20), ids
    return weights * config.routed_scaling_factor, ids


def _check_deepseek_v2(config) -> None:
    method = getattr(config, "topk_method", "greedy")
    if method not in ("greedy", "group_limited_greedy"):
        raise KTChatError(f"config.json: topk_method {method!r} is not supported for deepseek_v2")
    if method == "group_limited_greedy" and config.n_routed_experts % config.n_group:
        raise KTChatError("config.json: n_routed_experts must be divisible by n_group")


ARCHS: dict[str, MoEArch] = {
    "deepseek_v2": MoEArch(
        model_type="deepseek_v2",
        route=_deepseek_v2_route,
        check_config=_check_deepseek_v2,
        num_experts_attr="n_routed_experts",
        top_k_attr="num_experts_per_tok",
        moe_intermediate_attr="moe_intermediate_size",
    ),
}


def arch_for(config) -> MoEArch:
    arch = ARCHS.get(getattr(config, "model_type", None))
    if arch is None:
        raise KTChatError(
            f"config.json: model_type {getattr(config, 'model_type', None)!r} is not a supported MoE family "
            f"(supported: {', '.join(sorted(ARCHS))})"
        )
    arch.check_config(config)
    return arch
