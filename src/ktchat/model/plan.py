"""load_model's settings resolved once, into a frozen LoadPlan, before any weight is read.

`LoadSettings` is what load_model is asked, by its argument names (`ModelArgs` says the same in the YAML's words:
`LoadSettings.of`). `resolve` checks it cheapest first (devices and GPU prefill from the arguments alone, the
folders, their JSON files, the model config and family, the adapter) and decides everything the load then only
carries out: the dtype, the experts backend with its LoRA mode and weight format (by default the format the adapter
was trained on), the devices, CUDA graphs and GPU prefill. Every problem is one KTChatError line naming the setting
or the file.
"""

from __future__ import annotations

import json
import logging
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Any

import torch

from ..adapter import read_adapter
from ..config import ModelArgs, check_folders, check_gpu_experts_settings
from ..errors import KTChatError
from ..experts import ExpertsChoice, choose_experts
from ..formats.checkpoint import BY_TORCH_NAME, COMPUTE_DTYPES
from . import expert_format
from .moe import check_gpu_prefill
from .placement import check_devices
from .registry import NATIVE_MODEL_TYPES, MoEArch, arch_for

logger = logging.getLogger(__name__)

_DTYPES = {name: BY_TORCH_NAME[name].torch for name in COMPUTE_DTYPES}


@dataclass(frozen=True)
class LoadSettings:
    """What load_model is asked for, by its argument names (ktchat.load_model's docstring says what each does)."""

    model_name_or_path: Any
    adapter_name_or_path: Any = None
    experts_backend: str = "auto"
    device: Any = None
    dtype: Any = None
    _: KW_ONLY
    trust_remote_code: bool = False
    moe_lora: str | None = None
    kt_method: str | None = None
    num_threads: int | None = None
    kt_weight_path: Any = None
    device_map: Any = None
    merge_peft_lora: bool = False
    cuda_graphs: bool | None = None
    gpu_prefill_tokens: int | str | None = None
    gpu_prefill_gib: float | None = None
    gpu_experts_gib: float | str | None = None
    gpu_experts_placement: str = "frequency"
    gpu_experts_calibration: Any = None

    @classmethod
    def of(cls, args: ModelArgs) -> LoadSettings:
        """The settings a YAML's ModelArgs stands for."""
        return cls(args.model_name_or_path, args.adapter_name_or_path, **args.load_kwargs())


@dataclass(frozen=True)
class LoadPlan:
    """Every decision of a load, made before a weight is read: `load_model(plan)` carries it out."""

    model_dir: Path
    config: Any  # the family's native transformers config
    arch: MoEArch
    dtype: torch.dtype
    generation_config: Any  # the checkpoint's generation defaults, or None
    adapter: Any  # ktchat.adapter.Adapter, or None
    experts: ExpertsChoice
    int8_root: Path | None  # KT's pre-converted routed INT8, loaded as it is
    devices: tuple  # (device, device_map), placement.check_devices'
    cuda_graphs: bool | None
    gpu_prefill: tuple  # (tokens, gib), moe.check_gpu_prefill's
    gpu_experts: tuple  # (gib or "auto" or None: off, placement, calibration prompts path or None)
    merge_peft_lora: bool = False
    trust_remote_code: bool = False


def resolve(settings: LoadSettings | ModelArgs) -> LoadPlan:
    """The plan for these settings; what can be known before the slow part is checked first, cheapest first."""
    s = settings if isinstance(settings, LoadSettings) else LoadSettings.of(settings)
    devices = check_devices(s.device, s.device_map, s.cuda_graphs)
    gpu_prefill = check_gpu_prefill(s.gpu_prefill_tokens, s.gpu_prefill_gib, s.device)
    gpu_experts = (check_gpu_experts_settings(s.gpu_experts_gib, s.gpu_experts_placement, s.gpu_experts_calibration),
                   s.gpu_experts_placement, Path(s.gpu_experts_calibration) if s.gpu_experts_calibration else None)
    if gpu_experts[0] == "auto" and devices[0] is not None and torch.device(devices[0]).type != "cuda":
        raise KTChatError(f"gpu_experts_gib: auto reads the GPU's free memory, but the model goes to {devices[0]} "
                          "(give a number of GiB, or leave it out)")
    model_dir, adapter_dir = check_folders(s.model_name_or_path, s.adapter_name_or_path)
    config = _read_config(model_dir)
    arch = arch_for(config)
    generation_config = _read_generation_config(model_dir)
    dtype = resolve_dtype(s.dtype, config)
    adapter = read_adapter(adapter_dir) if adapter_dir else None
    if s.trust_remote_code and getattr(config, "auto_map", None):
        logger.info("trust_remote_code: the model runs on transformers' native %s (remote code is used for the "
                    "tokenizer only)", config.model_type)
    method = expert_format.method_for(adapter, model_dir, s.kt_method)
    expert_format.check_scheme(method, config, model_dir)
    experts = choose_experts(s.experts_backend, moe_lora=s.moe_lora, kt_method=method, num_threads=s.num_threads,
                             keep_host_weights=gpu_prefill[0] not in (None, "off") or gpu_experts[0] is not None,
                             adapters_method=s.kt_method is None)
    return LoadPlan(model_dir, config, arch, dtype, generation_config, adapter, experts,
                    expert_format.int8_root(method, adapter, s.kt_weight_path), devices, s.cuda_graphs, gpu_prefill,
                    gpu_experts, s.merge_peft_lora, s.trust_remote_code)


def resolve_dtype(dtype, config) -> torch.dtype:
    """None/"auto" -> the checkpoint's dtype (float32 if it names none)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
        if isinstance(dtype, torch.dtype):
            return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise KTChatError(f"dtype must be one of {', '.join(_DTYPES)} or 'auto', got {dtype!r}")
    return _DTYPES[name]


def _first_line(exc: BaseException) -> str:
    """transformers' messages run over several lines and paragraphs: the first paragraph, on one line."""
    return " ".join(str(exc).strip().split("\n\n")[0].split()) or type(exc).__name__


def _read_config(model_dir: Path):
    """transformers' own implementation of the family, even where the folder ships remote code (auto_map):
    ktchat replaces its MoE blocks and relies on its module names."""
    from transformers import AutoConfig

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


def read_tokenizer(model_dir: Path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception for a file it cannot use
        raise KTChatError(f"{model_dir}: cannot load the tokenizer ({_first_line(exc)})") from None
