"""One entry per MoE family: where its MoE block is, how its router picks experts, how experts are named.

Adding a model family is adding one `MoEArch` to `ARCHS`. The routing functions reproduce transformers' own
math (read in both 4.57 and 5.x); the end-to-end tests compare against plain transformers to keep them honest.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from dataclasses import dataclass, replace
from typing import Callable

import torch

from ..adapter import ExpertPath
from ..errors import KTChatError
from .linear_attention import slotted
from .mla import absorbed, rope_cos_sin, rope_freqs_cis

logger = logging.getLogger(__name__)

# A layer's fused expert tensor (transformers 5's layout) -> the projections it stacks along its rows, in order
FUSED_PROJS = {"gate_up_proj": ("gate", "up"), "down_proj": ("down",)}

# (fp32 router logits [T, E], the base Router module (its fp32 buffers), config) -> (weights [T, k] fp32, ids [T, k])
RouteFn = Callable[[torch.Tensor, torch.nn.Module, object], tuple[torch.Tensor, torch.Tensor]]


def _no_check(config) -> None:
    pass


def _no_skip(name: str, config) -> str | None:
    return None


def _no_patch(layers, config) -> None:
    pass


def _attention_cache(config) -> tuple[str, ...]:
    return ("attention",) * config.num_hidden_layers


def _latent_cache(config) -> tuple[str, ...]:
    return ("latent",) * config.num_hidden_layers


def _hybrid_cache(config) -> tuple[str, ...]:
    """Qwen3.5-MoE: layer_types says which layers are Gated DeltaNet (a recurrent state) and which attend."""
    return tuple("linear" if kind == "linear_attention" else "attention" for kind in config.layer_types)


@dataclass(frozen=True)
class MoEArch:
    model_type: str
    route: RouteFn
    num_experts_attr: str
    top_k_attr: str
    moe_intermediate_attr: str
    check_config: Callable[[object], None] = _no_check
    layers_path: str = "model.layers"
    moe_attr: str = "mlp"  # the MoE block's name in checkpoints and per-expert adapters
    moe_attr_aliases: tuple[str, ...] = ()  # what a transformers major calls it instead (kept as an alias)
    router_attr: str = "gate"
    router_buffers: tuple[str, ...] = ()  # fp32 [E] buffers of the router, read by `route`, loaded from the checkpoint
    shared_experts_attr: str | None = None
    shared_gate_attr: str | None = None  # a Linear [1, H]: shared experts' output is scaled by sigmoid(gate(x))
    experts_attr: str = "experts"
    proj_names: tuple[tuple[str, str], ...] = (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down"))
    tuple_output_v4: bool = False  # under transformers 4.x the block returns (hidden, router_logits)
    skip_tensor: Callable[[str, object], str | None] = _no_skip  # why a checkpoint tensor has no place in the model
    patch_model: Callable[[torch.nn.Module, object], None] = _no_patch  # corrections to transformers' own layers
    fused_transposed: bool = False  # fused expert tensors on disk are [E, H, 2I] / [E, I, H] (Qwen3-VL-MoE)
    # A VLM checkpoint: its text model's settings under config.text_config, the model built by transformers'
    # image-text-to-text class with the modules at `vision_modules` left out (text chat never calls them)
    text_config_attr: str | None = None
    vision_modules: tuple[str, ...] = ()
    renames: tuple[tuple[str, str], ...] = ()  # (on-disk prefix, module prefix) where the shipped files differ
    # What each decoder layer caches (engine.cache): "attention" (KV), "latent" (MLA's compressed KV, and V3.2's
    # indexer keys), "linear" (a recurrent state that cannot be cut back: the engine saves copies of it)
    cache_kinds: Callable[[object], tuple[str, ...]] = _attention_cache
    # Decoder-layer modules ktchat builds as its own subclass of transformers' class, so they run on the engine's cache
    # (model/mla.py, model/linear_attention.py): (attribute, builder (module, text config) -> replacement or None)
    owned_layers: tuple[tuple[str, Callable], ...] = ()

    def module_name(self, key: str) -> str:
        """A checkpoint key under the model's module names (the shipped layout renamed, else as it is)."""
        for disk, module in self.renames:
            if key.startswith(disk):
                return module + key[len(disk):]
        return key

    def auto_class(self):
        """transformers' auto class for the family. A VLM's image-text-to-text class keeps the checkpoint's module
        names (model.language_model.layers, where adapters trained on it point too)."""
        import transformers

        return transformers.AutoModelForImageTextToText if self.vision_modules else transformers.AutoModelForCausalLM

    def text_config(self, config):
        """The settings the MoE blocks and routing read: the VLM's text_config, or the config itself."""
        return getattr(config, self.text_config_attr) if self.text_config_attr else config

    def hybrid(self, config) -> bool:
        """Whether some layers keep a recurrent state (the engine then saves copies of it to resume prompts)."""
        return "linear" in self.cache_kinds(self.text_config(config))

    def spec_sizes(self, config) -> tuple[int, int, int]:
        config = self.text_config(config)
        return (
            getattr(config, self.num_experts_attr),
            getattr(config, self.top_k_attr),
            getattr(config, self.moe_intermediate_attr),
        )

    @functools.cached_property
    def expert_path(self) -> ExpertPath:
        """Routed-expert module paths, under the checkpoint's block name or any alias (adapters use either)."""
        names = "|".join(re.escape(n) for n, _ in self.proj_names)
        pattern = rf"{self._experts_prefix}\.(?P<expert>\d+)\.(?P<proj>{names})"
        return ExpertPath(re.compile(pattern), dict(self.proj_names))

    @functools.cached_property
    def fused_expert_pattern(self) -> re.Pattern:
        """A layer's fused routed-expert tensors (transformers 5's layout): groups layer and name."""
        return re.compile(rf"{self._experts_prefix}\.(?P<name>{'|'.join(FUSED_PROJS)})")

    @property
    def _experts_prefix(self) -> str:
        """A layer's routed-experts container, the layer index grouped as `layer`."""
        blocks = "|".join(re.escape(b) for b in (self.moe_attr, *self.moe_attr_aliases))
        return rf"{re.escape(self.layers_path)}\.(?P<layer>\d+)\.(?:{blocks})\.{re.escape(self.experts_attr)}"

    def expert_weight_key(self, layer: int, expert: int, proj: str) -> str:
        name = {canon: n for n, canon in self.proj_names}[proj]
        return f"{self.layers_path}.{layer}.{self.moe_attr}.{self.experts_attr}.{expert}.{name}.weight"

    def expert_weight(self, key: str) -> tuple[int, int, str] | None:
        """(layer, expert, gate | up | down) of a routed expert's weight (a key under the model's names), or None."""
        module, _, tensor = key.rpartition(".")
        return self.expert_path.parse(module) if tensor == "weight" else None

    def fused_experts(self, key: str) -> tuple[int, str] | None:
        """(layer, gate_up_proj | down_proj) of a layer's fused routed-expert tensor, or None."""
        m = self.fused_expert_pattern.fullmatch(key)
        return (int(m["layer"]), m["name"]) if m else None


# --- routing -------------------------------------------------------------------------------------------------------


def _deepseek_v2_route(logits: torch.Tensor, router, config) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts, greedy or group-limited (max per group) top-k, then the routed scaling factor."""
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


def _deepseek_v3_route(logits: torch.Tensor, router, config) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's noaux_tc routing, which GLM-4-MoE's is line for line (Glm4MoeTopkRouter, both majors).

    Sigmoid scores; experts chosen on score + e_score_correction_bias within the topk_group groups of highest top-2
    sum; weights are the unbiased scores, normalised if norm_topk_prob, times routed_scaling_factor.

    Groups left out are masked with -inf as in transformers 5 and DeepSeek's own inference code (transformers 4.57
    masks with 0.0, which differs only where a kept expert's biased score is negative).
    """
    scores = logits.sigmoid()
    choice = scores + router.e_score_correction_bias
    n, e = choice.shape
    g = config.n_group
    group_scores = choice.view(n, g, e // g).topk(2, dim=-1).values.sum(dim=-1)
    keep = torch.zeros_like(group_scores).scatter_(1, torch.topk(group_scores, config.topk_group, dim=-1).indices, 1.0)
    choice = choice.masked_fill(~keep.bool().repeat_interleave(e // g, dim=1), float("-inf"))
    ids = torch.topk(choice, k=config.num_experts_per_tok, dim=-1, sorted=False).indices
    weights = scores.gather(1, ids)
    if config.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * config.routed_scaling_factor, ids


def _softmax_topk(norm_attr: str | None) -> RouteFn:
    """Softmax over all experts, top-k, renormalised over the k if `config.<norm_attr>` (always if None: Mixtral's
    softmax over the top-k logits)."""

    def route(logits: torch.Tensor, router, config) -> tuple[torch.Tensor, torch.Tensor]:
        weights, ids = torch.topk(logits.softmax(dim=-1, dtype=torch.float32), config.num_experts_per_tok, dim=-1)
        if norm_attr is None or getattr(config, norm_attr):
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids

    return route


# --- config checks, checkpoint extras, model patches ----------------------------------------------------------------


def _check_deepseek_v2(config) -> None:
    method = getattr(config, "topk_method", "greedy")
    if method not in ("greedy", "group_limited_greedy"):
        raise KTChatError(f"config.json: topk_method {method!r} is not supported for deepseek_v2")
    if method == "group_limited_greedy" and config.n_routed_experts % config.n_group:
        raise KTChatError("config.json: n_routed_experts must be divisible by n_group")


def _check_noaux_tc(config) -> None:
    """transformers' DeepseekV3 and Glm4Moe always route as noaux_tc with sigmoid scores: refuse configs that say
    otherwise, and groupings that cannot pick num_experts_per_tok experts."""
    family = config.model_type
    for key, allowed in (("topk_method", "noaux_tc"), ("scoring_func", "sigmoid")):
        value = getattr(config, key, None)
        if value not in (None, allowed):
            raise KTChatError(f"config.json: {key} {value!r} is not supported for {family} (only {allowed!r})")
    e, g, k = config.n_routed_experts, config.n_group, config.num_experts_per_tok
    if e % g or e // g < 2 or config.topk_group * (e // g) < k:
        raise KTChatError(f"config.json: n_routed_experts {e}, n_group {g}, topk_group {config.topk_group} cannot "
                          f"route {k} experts per token (groups of >= 2 experts, topk_group * group size >= k)")


_LAYER = re.compile(r"(?P<path>model\.(?:language_model\.)?layers)\.(?P<layer>\d+)\.")


def decoder_layer(key: str) -> tuple[str, int] | None:
    """(layers path, index) of a key inside a decoder layer (`model.layers.3.mlp...`, a VLM's
    `model.language_model.layers.3...`), or None."""
    m = _LAYER.match(key)
    return (m["path"], int(m["layer"])) if m else None


def _mtp_layer(name: str, config) -> str | None:
    """DeepSeek-V3 and GLM-4-MoE checkpoints append num_nextn_predict_layers multi-token-prediction layers after the
    last decoder layer; transformers' model has no MTP head, so their tensors are skipped (and logged)."""
    where = decoder_layer(name)
    n, extra = config.num_hidden_layers, getattr(config, "num_nextn_predict_layers", 0) or 0
    if where and n <= where[1] < n + extra:
        return (f"multi-token-prediction layer (num_nextn_predict_layers={extra}), which transformers' "
                f"{type(config).__name__.removesuffix('Config')} has no module for")
    return None


def _yarn_mscale_scaling(layers, config) -> None:
    """DeepSeek's YaRN scales attention logits by mscale(factor, mscale_all_dim)^2 on top of 1/sqrt(qk_head_dim).

    transformers 5.x (and DeepSeek's remote code) apply it; 4.57's native DeepseekV2 omits it (0.1443 instead of
    0.2294 on DeepSeek-V2-Lite). Sets every attention's `scaling` to the right value and logs what it changed.
    """
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    if kind not in (None, "default") and rope.get("mscale_all_dim") and rope.get("factor", 1) > 1:
        mscale = 0.1 * rope["mscale_all_dim"] * math.log(rope["factor"]) + 1.0
        scale *= mscale * mscale
    fixed = 0
    for layer in layers:
        attn = layer.self_attn
        if not math.isclose(attn.scaling, scale, rel_tol=1e-12):
            attn.scaling, fixed = scale, fixed + 1
    if fixed:
        import transformers

        logger.info("transformers %s omits the YaRN mscale^2 attention factor: attention scaling set to %.6g on %d "
                    "layers", transformers.__version__, scale, fixed)


def _mtp_module(name: str, config) -> str | None:
    """Qwen3.5-MoE checkpoints hold their multi-token-prediction module under `mtp.`, which transformers skips too."""
    if name.startswith("mtp."):
        family = type(config).__name__.removesuffix("Config")
        return f"multi-token-prediction module (mtp.*), which transformers' {family} has no module for"
    return None


def _vlm(text: MoEArch, model_type: str, vision_modules: tuple[str, ...] = ("model.visual",), **changes) -> MoEArch:
    """A VLM whose language model is the `text` family: decoder layers under model.language_model, the vision
    tower's tensors skipped (it is not built), the text family's own skips applied to the rest."""
    prefixes = tuple(f"{m}." for m in vision_modules)

    def skip(name: str, config) -> str | None:
        if name.startswith(prefixes):
            return "vision modules, not allocated for text chat"
        return text.skip_tensor(name, config)

    return replace(text, model_type=model_type, layers_path="model.language_model.layers",
                   text_config_attr="text_config", vision_modules=vision_modules, skip_tensor=skip, **changes)


# --- the families --------------------------------------------------------------------------------------------------

_SHARED_MOE = dict(num_experts_attr="n_routed_experts", top_k_attr="num_experts_per_tok",
                   moe_intermediate_attr="moe_intermediate_size", shared_experts_attr="shared_experts")
# sigmoid + score-correction-bias routing, shared experts, MTP layers in the checkpoint: DeepSeek-V3, GLM-4-MoE
_NOAUX_TC = dict(route=_deepseek_v3_route, check_config=_check_noaux_tc, router_buffers=("e_score_correction_bias",),
                 skip_tensor=_mtp_layer, **_SHARED_MOE)
_QWEN = dict(num_experts_attr="num_experts", top_k_attr="num_experts_per_tok",
             moe_intermediate_attr="moe_intermediate_size", route=_softmax_topk("norm_topk_prob"), tuple_output_v4=True)

ARCHS: dict[str, MoEArch] = {
    "deepseek_v2": MoEArch("deepseek_v2", _deepseek_v2_route, check_config=_check_deepseek_v2,
                           patch_model=_yarn_mscale_scaling, cache_kinds=_latent_cache,
                           owned_layers=(("self_attn", absorbed(rope_freqs_cis)),), **_SHARED_MOE),
    "deepseek_v3": MoEArch("deepseek_v3", patch_model=_yarn_mscale_scaling, cache_kinds=_latent_cache,
                           owned_layers=(("self_attn", absorbed(rope_cos_sin)),), **_NOAUX_TC),
    # DeepSeek-V3.2 (transformers 5 only): V3's MoE and routing; its attention (latents decompressed each step, the
    # sparse indexer's own keys) stays transformers'
    "deepseek_v32": MoEArch("deepseek_v32", patch_model=_yarn_mscale_scaling, cache_kinds=_latent_cache, **_NOAUX_TC),
    "glm4_moe": MoEArch("glm4_moe", **_NOAUX_TC),
    "qwen2_moe": MoEArch("qwen2_moe", shared_experts_attr="shared_expert", shared_gate_attr="shared_expert_gate",
                         **_QWEN),
    "qwen3_moe": MoEArch("qwen3_moe", **_QWEN),
    # Qwen3.5-MoE's text model (transformers 5 only): Qwen3_5MoeTopKRouter always renormalises the top-k softmax
    # (its config has no norm_topk_prob); the shared expert sits behind a sigmoid gate as in Qwen2-MoE
    "qwen3_5_moe_text": MoEArch("qwen3_5_moe_text", _softmax_topk(None), num_experts_attr="num_experts",
                                top_k_attr="num_experts_per_tok", moe_intermediate_attr="moe_intermediate_size",
                                shared_experts_attr="shared_expert", shared_gate_attr="shared_expert_gate",
                                skip_tensor=_mtp_module, cache_kinds=_hybrid_cache,
                                owned_layers=(("linear_attn", slotted),)),
    "mixtral": MoEArch("mixtral", _softmax_topk(None), num_experts_attr="num_local_experts",
                       top_k_attr="num_experts_per_tok", moe_intermediate_attr="intermediate_size",
                       moe_attr="block_sparse_moe", moe_attr_aliases=("mlp",), tuple_output_v4=True,
                       proj_names=(("w1", "gate"), ("w3", "up"), ("w2", "down"))),
}


# VLM checkpoints around the text families: Qwen3.5-MoE and Qwen3-VL-MoE as Qwen ships them; Kimi-K2.5 / K2.6,
# whose shipped files keep the remote code's names (language_model.model.*, vision_tower.*, mm_projector.*)
ARCHS["qwen3_5_moe"] = _vlm(ARCHS["qwen3_5_moe_text"], "qwen3_5_moe")
# Qwen3-VL-MoE: Qwen3-MoE's block with the top-k always renormalised; experts shipped fused and transposed
ARCHS["qwen3_vl_moe"] = _vlm(replace(ARCHS["qwen3_moe"], route=_softmax_topk(None)), "qwen3_vl_moe",
                             fused_transposed=True)
ARCHS["kimi_k25"] = _vlm(ARCHS["deepseek_v3"], "kimi_k25", ("model.vision_tower", "model.mm_projector"),
                         renames=(("language_model.model.", "model.language_model."),
                                  ("language_model.lm_head.", "lm_head."), ("vision_tower.", "model.vision_tower."),
                                  ("mm_projector.", "model.mm_projector.")))

# Remote-code model types that transformers runs natively: Kimi-K2's config.json says kimi_k2 (DeepSeek-V3's
# architecture, auto_map to its own copy of DeepseekV3Config), which ktchat reads as the native deepseek_v3
NATIVE_MODEL_TYPES = {"kimi_k2": "deepseek_v3"}

# Families ktchat knows and refuses, with the reason (one line each)
REFUSED = {
    "deepseek_v4": "DeepSeek-V4 routes its first layers by token id (hash routing, a [vocab, k] table), mixes "
                   "hyper-connection residual streams, clamps its experts' SwiGLU and keeps a compressed KV cache; "
                   "ktchat's CPU experts take hidden states only and have no clamp, so it cannot run DeepSeek-V4's MoE",
}


def arch_named(model_type) -> MoEArch:
    """The family of a config.json's model_type; one line naming it for a family ktchat refuses or does not know."""
    if model_type in REFUSED:
        raise KTChatError(f"config.json: model_type {model_type!r} is not supported: {REFUSED[model_type]}")
    arch = ARCHS.get(NATIVE_MODEL_TYPES.get(model_type, model_type))
    if arch is None:
        raise KTChatError(f"config.json: model_type {model_type!r} is not a supported MoE family "
                          f"(supported: {', '.join(sorted([*ARCHS, *NATIVE_MODEL_TYPES]))})")
    return arch


def arch_for(config) -> MoEArch:
    """The family of a transformers config, its text settings checked."""
    arch = arch_named(getattr(config, "model_type", None))
    text = arch.text_config(config)
    if text is None:
        raise KTChatError(f"config.json: {arch.model_type} is a VLM config without text_config")
    arch.check_config(text)
    return arch
