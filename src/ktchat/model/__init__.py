"""Architectures, KT-mode loading and the two-channel adapter wiring.

load_model, top to bottom: plan.resolve decides everything from the settings, the model folder and the adapter
(nothing is loaded yet); the skeleton is built on `meta` (loader.build_skeleton), the adapter planned against it
(channels.plan_adapter), the checkpoint streamed along its routing table (loader.load_checkpoint, model.routes)
while each layer's expert LoRA goes in (channels.ExpertLoRAInstall) and PEFT takes its channel
(channels.load_peft_channel); then the generation engine is attached (ktchat.engine) and GPU prefill wired on as
planned.
"""

from __future__ import annotations

import contextlib
import logging
import time

from ..errors import KTChatError
from ..runtime import check_libraries, huge_pages_hint

check_libraries()  # one line naming a missing transformers/peft/accelerate, before model code imports them
from ..config import ModelArgs
from .channels import ExpertLoRAInstall, load_moe_lora_from_adapter, load_peft_channel, offloaded_blocks, plan_adapter
from .placement import describe, dispatch, plan_placement
from .plan import LoadPlan, LoadSettings, read_tokenizer, resolve
from .registry import ARCHS, MoEArch

# Absorbed MLA keeps only the latent (V2-Lite: 31 KB a token over 27 layers) and a step's cost barely grows with the
# cache's length: its slots start long, so a growing chat is rarely moved into a bigger cache and captured again
ABSORBED_MIN_CACHE_TOKENS = 4096

__all__ = ["ARCHS", "LoadPlan", "LoadSettings", "MoEArch", "engine_of", "load_model", "load_moe_lora_from_adapter",
           "offloaded_blocks", "resolve"]

logger = logging.getLogger(__name__)


def load_model(model_name_or_path, adapter_name_or_path=None, *args, **kwargs):
    """Loads a MoE checkpoint in KT mode (routed experts on the CPU, the rest on `device`) and its adapter.

    Returns (model, tokenizer); the model is called like any transformers causal LM. Takes a `LoadPlan`
    (`ktchat.model.resolve`), a `ktchat.config.ModelArgs`, or the settings of `LoadSettings` as arguments
    (experts_backend, device and dtype also by position, the rest by keyword):
    experts_backend "auto" | "torch" | "kt"; moe_lora ("exact" | "merged"), kt_method (bf16, int8, int4, fp8,
    rawint4; default: the format a KT adapter was trained on, see model.expert_format) and num_threads tune the CPU
    experts backend; kt_weight_path: KT's pre-converted routed INT8 (default: the adapter manifest's int8_experts),
    loaded as it is. dtype None: the checkpoint's. device None: cuda where there is one; device="auto" spreads the
    non-expert layers over the visible GPUs when there are several (as device_map="auto"); device_map may also be a
    dict {module name: device}. merge_peft_lora folds the PEFT channel's LoRA into the compute-device weights after
    loading (fewer kernels per token; W + s*B@A rounded once to `dtype`). trust_remote_code: the tokenizer's.
    The model's `generate` runs on ktchat's engine (ktchat.engine): its own cache and loop, and with cuda_graphs
    (None: wherever everything but the experts sits on one CUDA device) one CUDA graph per decoded token, the CPU
    experts inside.
    gpu_prefill_tokens ("auto" | "off" | N; None: auto where the experts backend shares its host copy, i.e. torch,
    off for kt) runs the routed experts of prompts from N tokens on the GPU, streamed within gpu_prefill_gib
    (ktchat.model.moe.enable_gpu_prefill); "auto" or N with kt keeps kt's bf16 weights: a second host copy.
    """
    from .gpu_experts import place as place_gpu_experts
    from .moe import wire_gpu_prefill

    start = time.perf_counter()
    plan = _plan_of(model_name_or_path, adapter_name_or_path, args, kwargs)
    tokenizer = read_tokenizer(plan.model_dir, plan.trust_remote_code)
    phases = _Phases(start)
    model, blocks, placement = _assemble(plan, phases)
    place_gpu_experts(model, tokenizer, *plan.gpu_experts, keep_host=plan.gpu_prefill[0] not in (None, "off"))
    wire_gpu_prefill(model, *plan.gpu_prefill)
    _attach_engine(model, plan.arch, plan.cuda_graphs)
    _log_loaded(plan, blocks, placement, phases, time.perf_counter() - start)
    return model, tokenizer


def _plan_of(model, adapter, args: tuple, kwargs: dict) -> LoadPlan:
    """load_model's arguments as a plan: one given, or resolved from ModelArgs or from LoadSettings' arguments."""
    if not isinstance(model, (LoadPlan, ModelArgs)):
        return resolve(LoadSettings(model, adapter, *args, **kwargs))
    if adapter is not None or args or kwargs:
        raise TypeError(f"load_model({type(model).__name__}) takes no other arguments")
    return model if isinstance(model, LoadPlan) else resolve(model)


def _assemble(plan: LoadPlan, phases: _Phases):
    """The model built on `meta`, its checkpoint and both adapter channels loaded: (model, MoE blocks, placement).
    Each layer's expert LoRA is installed on a thread while the checkpoint streams; the kernels are built (LoRA
    included) once the experts are read, and the PEFT channel goes in meanwhile."""
    from .loader import build_skeleton, load_checkpoint  # looked up now: tests spy on load_checkpoint

    skeleton = build_skeleton(plan.config, plan.arch, plan.experts.factory(), plan.dtype)
    placement = plan_placement(skeleton.model, plan.devices, plan.dtype)
    peft_modules, routed = plan_adapter(plan.adapter, skeleton.model, plan.arch) if plan.adapter else ({}, {})
    phases.done("setup")
    with ExpertLoRAInstall(skeleton.moe_blocks, routed) if routed else contextlib.nullcontext() as lora:
        experts = load_checkpoint(skeleton, plan.model_dir, placement, plan.dtype, before_prepare=lora and lora.wait,
                                  routed_int8=plan.int8_root)
        with experts.cancel_on_error():
            dispatch(skeleton.model, placement)
            phases.done("checkpoint but the experts")
            model = _with_peft_channel(skeleton.model.eval(), plan, peft_modules, placement, lora)
            phases.done("PEFT channel")
        experts.wait()
    phases.done("experts")
    return model, skeleton.moe_blocks, placement


def _with_peft_channel(model, plan: LoadPlan, peft_modules: dict, placement, lora):
    """The model with the checkpoint's generation defaults and the adapter's PEFT channel (merged if planned)."""
    if plan.generation_config is not None:
        model.generation_config = plan.generation_config
    if plan.adapter is None:
        return model
    if peft_modules:
        model = load_peft_channel(model, plan.adapter, peft_modules).eval()
        if plan.merge_peft_lora:
            model = model.merge_and_unload()  # verified tensors first (load_peft_channel), then folded
    logger.info("adapter %s: %d LoRA modules -> PEFT on %s; %d routed-expert LoRA modules -> CPU experts",
                plan.adapter.path, len(peft_modules), describe(placement), lora.count if lora else 0)
    return model


def _log_loaded(plan: LoadPlan, blocks: dict, placement, phases: _Phases, seconds: float) -> None:
    backend_name = ", ".join(sorted({block.experts.backend.name for block in blocks.values()}))
    logger.info("loaded %s in %.1fs (%s): %d MoE layers' routed experts on the CPU (%s, %s), the rest on %s",
                plan.model_dir.name, seconds, phases, len(blocks), backend_name,
                str(plan.dtype).removeprefix("torch."), describe(placement))
    if "kt" in backend_name and (hint := huge_pages_hint()):
        logger.info(hint)


class _Phases:
    """Where load time went, for the log line."""

    def __init__(self, start: float):
        self._last, self._spent = start, []

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self._spent.append((name, now - self._last))
        self._last = now

    def __str__(self) -> str:
        return ", ".join(f"{name} {s:.1f}s" for name, s in self._spent)


def engine_of(model):
    """The generation engine load_model gave `model` (a PEFT model is looked through)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    engine = getattr(inner, "ktchat_engine", None)
    if engine is None:
        raise KTChatError(f"{type(inner).__name__} was not loaded by ktchat.load_model: it has no generation engine")
    return engine


def _attach_engine(model, arch: MoEArch, cuda_graphs: bool | None) -> None:
    """The generation engine of the model (under PEFT, the transformers model's), which its `generate` runs on:
    decode steps as CUDA graphs wherever everything but the experts sits on one GPU, unless cuda_graphs is false."""
    from ..engine import MIN_CACHE_TOKENS, Engine
    from .mla import AbsorbedMLA
    from .moe import OffloadedMoE

    devices = {t.device for t in (*model.parameters(), *model.buffers())}
    one_gpu = len(devices) == 1 and next(iter(devices)).type == "cuda"
    if cuda_graphs and not one_gpu:
        where = ", ".join(sorted(str(d) for d in devices))
        raise KTChatError(f"cuda_graphs: true needs every non-expert weight on one CUDA device (they are on {where})")
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    absorbed = any(isinstance(m, AbsorbedMLA) for m in inner.modules())
    # a decode step of as many rows as GPU prefill's threshold streams its experts to the GPU: it runs eagerly
    streamed = [m.plan.stream_from for m in inner.modules() if isinstance(m, OffloadedMoE)
                and m.plan.streamed is not None]
    inner.ktchat_engine = Engine(inner, graphs=one_gpu and cuda_graphs is not False, hybrid=arch.hybrid(inner.config),
                                 min_cache_tokens=ABSORBED_MIN_CACHE_TOKENS if absorbed else MIN_CACHE_TOKENS,
                                 graph_rows=min(streamed) - 1 if streamed else None)
