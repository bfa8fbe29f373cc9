"""Architectures, KT-mode loading and the two-channel adapter wiring."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

from ..errors import KTChatError
from ..runtime import check_libraries, huge_pages_hint

check_libraries()  # one line naming a missing transformers/peft/accelerate, before model code imports them
from .channels import ExpertLoRAInstall, load_moe_lora_from_adapter, load_peft_channel, offloaded_blocks, plan_adapter
from .registry import ARCHS, MoEArch, arch_for

# Absorbed MLA keeps only the latent (V2-Lite: 31 KB a token over 27 layers) and a step's cost barely grows with the
# cache's length: its slots start long, so a growing chat is rarely moved into a bigger cache and captured again
ABSORBED_MIN_CACHE_TOKENS = 4096

__all__ = ["ARCHS", "MoEArch", "engine_of", "load_model", "load_moe_lora_from_adapter", "offloaded_blocks"]

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
    kt_weight_path=None,
    device_map=None,
    merge_peft_lora: bool = False,
    cuda_graphs: bool | None = None,
    gpu_prefill_tokens: int | str | None = None,
    gpu_prefill_gib: float | None = None,
):
    """Loads a MoE checkpoint in KT mode (routed experts on the CPU, the rest on `device`) and its adapter.

    Returns (model, tokenizer); the model is called like any transformers causal LM. moe_lora ("exact" |
    "merged"), kt_method (bf16, int8, int4, fp8, rawint4; default: the format a KT adapter was trained on, see
    model.expert_format) and num_threads tune the CPU experts backend; kt_weight_path: KT's pre-converted routed
    INT8 (default: the adapter manifest's int8_experts), loaded as it is.
    device="auto" spreads the non-expert layers over the visible GPUs when there are several (as device_map="auto");
    device_map may also be a dict {module name: device}. merge_peft_lora folds the PEFT channel's LoRA into the
    compute-device weights after loading (fewer kernels per token; W + s*B@A rounded once to `dtype`).
    The model's `generate` runs on ktchat's engine (ktchat.engine): its own cache and loop, and with cuda_graphs
    (None: wherever everything but the experts sits on one CUDA device) one CUDA graph per decoded token, the CPU
    experts inside.
    gpu_prefill_tokens ("auto" | "off" | N; None: auto where the experts backend shares its host copy, i.e. torch,
    off for kt) runs the routed experts of prompts from N tokens on the GPU, streamed within gpu_prefill_gib
    (ktchat.model.moe.enable_gpu_prefill); "auto" or N with kt keeps kt's bf16 weights: a second host copy.
    """
    from ..adapter import read_adapter
    from ..experts import backend_factory
    from . import expert_format
    from .loader import build_skeleton, load_checkpoint, resolve_dtype
    from .moe import check_gpu_prefill, wire_gpu_prefill
    from .placement import check_devices, describe, dispatch, plan_placement

    start = time.perf_counter()
    # What can be known before the slow part is checked first, cheapest first: devices, folders, files, adapter.
    check_devices(device, device_map, cuda_graphs)
    gpu_prefill = check_gpu_prefill(gpu_prefill_tokens, gpu_prefill_gib, device)
    model_dir = _local_dir(model_name_or_path, "model_name_or_path")
    adapter_dir = _local_dir(adapter_name_or_path, "adapter_name_or_path") if adapter_name_or_path else None
    _check_json_files(model_dir)
    config = _read_config(model_dir)
    arch = arch_for(config)
    generation_config = _read_generation_config(model_dir)
    dtype = resolve_dtype(dtype, config)
    adapter = read_adapter(adapter_dir) if adapter_dir else None
    if trust_remote_code and getattr(config, "auto_map", None):
        logger.info("trust_remote_code: the model runs on transformers' native %s (remote code is used for the "
                    "tokenizer only)", config.model_type)
    tokenizer = _read_tokenizer(model_dir, trust_remote_code)
    fmt = expert_format.resolve(adapter, model_dir, expert_format.checkpoint_scheme(config, model_dir),
                                experts_backend=experts_backend, kt_method=kt_method, moe_lora=moe_lora,
                                kt_weight_path=kt_weight_path)
    experts_backend, kt_method = fmt.experts_backend, fmt.kt_method
    make_backend = backend_factory(experts_backend, moe_lora=moe_lora, kt_method=kt_method, num_threads=num_threads,
                                   keep_host_weights=gpu_prefill[0] not in (None, "off"))

    skeleton = build_skeleton(config, arch, make_backend, dtype)
    int8_experts = expert_format.open_int8(fmt.int8_root, skeleton)  # checked before any weight is read
    placement = plan_placement(skeleton.model, device, device_map, dtype)
    plan = plan_adapter(adapter, skeleton.model, arch) if adapter else None  # validate before loading anything
    phases = _Phases(start)
    phases.done("setup")
    peft_modules, routed = plan or ({}, {})
    # Each layer's expert LoRA is installed on a thread while the checkpoint streams; the kernels are built (LoRA
    # included) once the experts are read.
    with ExpertLoRAInstall(skeleton.moe_blocks, routed) if routed else contextlib.nullcontext() as lora:
        experts = load_checkpoint(skeleton, model_dir, placement, dtype, before_prepare=lora and lora.wait,
                                  routed_int8=int8_experts)
        with experts.cancel_on_error():  # the PEFT channel goes in while the experts are read and packed
            dispatch(skeleton.model, placement)
            phases.done("checkpoint but the experts")
            model = skeleton.model.eval()
            if generation_config is not None:
                model.generation_config = generation_config
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
    _attach_engine(model, arch, cuda_graphs)
    wire_gpu_prefill(model, *gpu_prefill)
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

    devices = {t.device for t in (*model.parameters(), *model.buffers())}
    one_gpu = len(devices) == 1 and next(iter(devices)).type == "cuda"
    if cuda_graphs and not one_gpu:
        where = ", ".join(sorted(str(d) for d in devices))
        raise KTChatError(f"cuda_graphs: true needs every non-expert weight on one CUDA device (they are on {where})")
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    absorbed = any(isinstance(m, AbsorbedMLA) for m in inner.modules())
    inner.ktchat_engine = Engine(inner, graphs=one_gpu and cuda_graphs is not False, hybrid=arch.hybrid(inner.config),
                                 min_cache_tokens=ABSORBED_MIN_CACHE_TOKENS if absorbed else MIN_CACHE_TOKENS)


# The JSON files transformers reads from a model folder.
_JSON_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.json",
               "special_tokens_map.json", "added_tokens.json")


def _check_json_files(model_dir: Path) -> None:
    """A corrupt JSON file of the model folder is one line naming it, before transformers reads it its own way
    (tokenizers raises a bare Exception; generation_config.json used to be read after the weights)."""
    for name in _JSON_FILES:
        path = model_dir / name
        if path.is_file():
            try:
                json.loads(path.read_bytes())
            except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                raise KTChatError(f"{path}: not valid JSON ({exc})") from None


def _first_line(exc: BaseException) -> str:
    """transformers' messages run over several lines and paragraphs: the first paragraph, on one line."""
    return " ".join(str(exc).strip().split("\n\n")[0].split()) or type(exc).__name__


def _read_config(model_dir: Path):
    """transformers' own implementation of the family, even where the folder ships remote code (auto_map):
    ktchat replaces its MoE blocks and relies on its module names."""
    from transformers import AutoConfig

    from .registry import NATIVE_MODEL_TYPES

    path = model_dir / "config.json"
    try:
        raw = json.loads(path.read_bytes())
        native = NATIVE_MODEL_TYPES.get(raw.get("model_type")) if isinstance(raw, dict) else None
        if native is None:
            return AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
        logger.info("config.json: model_type %r runs on transformers' native %s", raw["model_type"], native)
        fields = {k: v for k, v in raw.items() if k not in ("model_type", "auto_map", "transformers_version")}
        return AutoConfig.for_model(native, **fields)
    except (OSError, ValueError, TypeError) as exc:
        raise KTChatError(f"{path}: cannot read the model config ({_first_line(exc)})") from None


def _read_generation_config(model_dir: Path):
    """The checkpoint's generation defaults (its eos ids end replies), read before the weights: None without one."""
    from transformers import GenerationConfig

    path = model_dir / "generation_config.json"
    if not path.is_file():
        return None
    try:
        generation_config = GenerationConfig.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError) as exc:
        raise KTChatError(f"{path}: cannot read the generation config ({_first_line(exc)})") from None
    for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
        value = getattr(generation_config, key, None)
        ids = value if isinstance(value, list) else [value]
        if value is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise KTChatError(f"{path}: {key} must be a token id >= 0 or a list of them, got {value!r}")
    return generation_config


def _read_tokenizer(model_dir: Path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception for a file it cannot use
        raise KTChatError(f"{model_dir}: cannot load the tokenizer ({_first_line(exc)})") from None


def _local_dir(path, key: str) -> Path:
    p = Path(str(path)).expanduser()
    if not p.is_dir():
        raise KTChatError(f"{key}: {path} is not a local folder (ktchat never downloads from a model hub)")
    return p
