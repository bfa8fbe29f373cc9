"""Architectures, KT-mode loading and the two-channel adapter wiring."""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

from ..errors import KTChatError
from ..runtime import huge_pages_hint
from .channels import ExpertLoRAInstall, load_moe_lora_from_adapter, load_peft_channel, offloaded_blocks, plan_adapter
from .registry import ARCHS, MoEArch, arch_for

__all__ = ["ARCHS", "MoEArch", "load_model", "load_moe_lora_from_adapter", "offloaded_blocks"]

logger = logging.getLogger(__name__)


def load_model(
    model_name_or_path,
    adapter_name_or_path=None,
    experts_backend: str = "auto",
    device=None,
    dtype=None,
    *,
    trust_remote_code: bool = False,
    moe_lora: str | None = None,
    kt_method: str | None = None,
    num_threads: int | None = None,
    device_map=None,
    merge_peft_lora: bool = False,
    cuda_graphs: bool | None = None,
):
    """Loads a MoE checkpoint in KT mode (routed experts on the CPU, the rest on `device`) and its adapter.

    Returns (model, tokenizer); the model is called like any transformers causal LM. moe_lora ("exact" |
    "merged"), kt_method ("bf16" | "int8" | "int4") and num_threads tune the CPU experts backend.
    device="auto" spreads the non-expert layers over the visible GPUs when there are several (as device_map="auto");
    device_map may also be a dict {module name: device}. merge_peft_lora folds the PEFT channel's LoRA into the
    compute-device weights after loading (fewer kernels per token; W + s*B@A rounded once to `dtype`).
    cuda_graphs (None: wherever everything but the experts sits on one CUDA device) decodes one-sequence `generate`
    calls on a static KV cache, one CUDA graph per token with the CPU experts inside (ktchat.model.decode).
    """
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from ..adapter import read_adapter
    from ..experts import backend_factory
    from .loader import build_skeleton, load_checkpoint, resolve_dtype
    from .placement import describe, dispatch, plan_placement

    start = time.perf_counter()
    model_dir = _local_dir(model_name_or_path, "model_name_or_path")
    try:
        # transformers' own implementation of the family, even where the folder ships remote code (auto_map):
        # ktchat replaces its MoE blocks and relies on its module names.
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise KTChatError(f"{model_dir}: cannot read config.json ({exc})") from None
    arch = arch_for(config)
    if trust_remote_code and getattr(config, "auto_map", None):
        logger.info("trust_remote_code: the model runs on transformers' native %s (remote code is used for the "
                    "tokenizer only)", config.model_type)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise KTChatError(f"{model_dir}: cannot load the tokenizer ({str(exc).splitlines()[0]})") from None
    dtype = resolve_dtype(dtype, config)
    make_backend = backend_factory(experts_backend, moe_lora=moe_lora, kt_method=kt_method, num_threads=num_threads)
    adapter = read_adapter(_local_dir(adapter_name_or_path, "adapter_name_or_path")) if adapter_name_or_path else None

    skeleton = build_skeleton(config, arch, make_backend, dtype)
    placement = plan_placement(skeleton.model, device, device_map, dtype)
    plan = plan_adapter(adapter, skeleton.model, arch) if adapter else None  # validate before loading anything
    phases = _Phases(start)
    phases.done("setup")
    peft_modules, routed = plan or ({}, {})
    # Each layer's expert LoRA is installed on a thread while the checkpoint streams; the kernels are built (LoRA
    # included) once the experts are read.
    with ExpertLoRAInstall(skeleton.moe_blocks, routed) if routed else contextlib.nullcontext() as lora:
        experts = load_checkpoint(skeleton, model_dir, placement, dtype, before_prepare=lora and lora.wait)
        with experts.cancel_on_error():  # the PEFT channel goes in while the experts are read and packed
            dispatch(skeleton.model, placement)
            phases.done("checkpoint but the experts")
            model = skeleton.model.eval()
            if (model_dir / "generation_config.json").is_file():
                model.generation_config = GenerationConfig.from_pretrained(model_dir)
            if adapter is not None:
                if peft_modules:
                    model = load_peft_channel(model, adapter, peft_modules).eval()
                if merge_peft_lora and peft_modules:
                    model = model.merge_and_unload()  # verified tensors first (load_peft_channel), then folded
                logger.info(
                    "adapter %s: %d LoRA modules -> PEFT on %s; %d routed-expert LoRA modules -> CPU experts",
                    adapter.path, len(peft_modules), describe(placement), lora.count if lora else 0,
                )
            phases.done("PEFT channel")
        experts.wait()
    phases.done("experts")
    backend_name = ", ".join(sorted({block.experts.backend.name for block in skeleton.moe_blocks.values()}))
    _decode_with_graphs(model, cuda_graphs)
    logger.info(
        "loaded %s in %.1fs (%s): %d MoE layers' routed experts on the CPU (%s, %s), the rest on %s",
        model_dir.name, time.perf_counter() - start, phases, len(skeleton.moe_blocks), backend_name,
        str(dtype).removeprefix("torch."), describe(placement),
    )
    if "kt" in backend_name and (hint := huge_pages_hint()):
        logger.info(hint)
    return model, tokenizer


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


def _decode_with_graphs(model, cuda_graphs: bool | None) -> None:
    from .decode import enable_static_decode

    devices = {t.device for t in (*model.parameters(), *model.buffers())}
    one_gpu = len(devices) == 1 and next(iter(devices)).type == "cuda"
    if cuda_graphs and not one_gpu:
        where = ", ".join(sorted(str(d) for d in devices))
        raise KTChatError(f"cuda_graphs: true needs every non-expert weight on one CUDA device (they are on {where})")
    if one_gpu and cuda_graphs is not False:
        enable_static_decode(model, cuda_graphs=True)


def _local_dir(path, key: str) -> Path:
    p = Path(str(path)).expanduser()
    if not p.is_dir():
        raise KTChatError(f"{key}: {path} is not a local folder (ktchat never downloads from a model hub)")
    return p
