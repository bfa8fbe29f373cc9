"""KT-mode loading: build the model on `meta`, swap each MoE block for an `OffloadedMoE`, then stream the
checkpoint once: routed-expert tensors straight into the CPU backend, everything else to the compute device."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import KTChatError
from ..experts import ExpertsSpec
from .moe import CPUExperts, OffloadedMoE, Router
from .registry import MoEArch

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def resolve_device(device) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise KTChatError(f"device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KTChatError(f"device {device} requested but CUDA is not available")
    return device


@dataclass(frozen=True)
class Skeleton:
    model: nn.Module
    arch: MoEArch
    moe_blocks: dict[int, OffloadedMoE]


def build_skeleton(config, arch: MoEArch, make_backend, dtype: torch.dtype) -> Skeleton:
    """The family's own model class with empty weights, its MoE blocks replaced by `OffloadedMoE`."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    num_experts, top_k, inter = arch.spec_sizes(config)
    blocks = {}
    for idx, layer in enumerate(model.get_submodule(arch.layers_path)):
        block = getattr(layer, arch.moe_attr)
        if not hasattr(block, arch.experts_attr):
            continue  # a dense layer
        spec = ExpertsSpec(idx, num_experts, top_k, config.hidden_size, inter, dtype, config.hidden_act)
        with torch.device("meta"):
            gate = Router(config.hidden_size, num_experts, bias=False, dtype=torch.float32)
        shared = getattr(block, arch.shared_experts_attr, None) if arch.shared_experts_attr else None
        blocks[idx] = OffloadedMoE(idx, gate, shared, CPUExperts(make_backend(spec)), arch.route, config)
        setattr(layer, arch.moe_attr, blocks[idx])
    if not blocks:
        raise KTChatError(f"{config.model_type}: the model has no MoE layers to offload")
    return Skeleton(model, arch, blocks)


def checkpoint_files(model_dir: Path) -> dict[str, Path]:
    """tensor name -> safetensors file, from the shard index or the single file."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise KTChatError(f"{index}: cannot read shard index ({exc})") from None
        return {name: model_dir / file for name, file in weight_map.items()}
    single = model_dir / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(single), framework="pt") as f:
                return {name: single for name in f.keys()}
        except Exception as exc:
            raise KTChatError(f"{single}: cannot read checkpoint ({type(exc).__name__}: {exc})") from None
    raise KTChatError(f"{model_dir}: no safetensors checkpoint found (model.safetensors or model.safetensors.index.json)")


def load_checkpoint(skeleton: Skeleton, model_dir: Path, device: torch.device, dtype: torch.dtype) -> None:
    """Streams every tensor once to where it lives; fails on unknown tensors and on anything left empty."""
    from safetensors import safe_open
    from tqdm.auto import tqdm

    model, arch = skeleton.model, skeleton.arch
    expert_keys = {
        arch.expert_weight_key(layer, e, proj): (layer, e, proj)
        for layer, block in skeleton.moe_blocks.items()
        for e in range(block.experts.backend.spec.num_experts)
        for proj in ("gate", "up", "down")
    }
    params = dict(model.named_parameters())
    buffers = {name for name, _ in model.named_buffers()}
    keep_fp32 = _fp32_param_names(model)
    files = checkpoint_files(model_dir)
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    loaded = set()
    with tqdm(total=len(files), desc="Loading weights", unit="tensor", disable=None) as bar:
        for file, names in by_file.items():
            try:
                handle = safe_open(str(file), framework="pt")
            except Exception as exc:
                raise KTChatError(f"{file}: cannot read checkpoint shard ({type(exc).__name__}: {exc})") from None
            with handle as f:
                for name in names:
                    where = f"{file.name}: {name}"
                    if name in expert_keys:
                        layer, e, proj = expert_keys[name]
                        backend = skeleton.moe_blocks[layer].experts.backend
                        backend.load_weight(proj, e, f.get_tensor(name).to(dtype), where)
                    elif name in params:
                        target = torch.float32 if name in keep_fp32 else dtype
                        _assign(model, name, params[name], f.get_tensor(name), device, target, where)
                    elif name not in buffers:
                        raise KTChatError(f"{where}: checkpoint tensor does not belong to the model")
                    loaded.add(name)
                    bar.update(1)
    for block in skeleton.moe_blocks.values():
        block.experts.backend.finalize()
    _tie_or_fail(model, loaded, params)
    for module in model.modules():
        for bname, buf in module._buffers.items():
            if buf is not None:
                module._buffers[bname] = buf.to(device)


def _fp32_param_names(model) -> set[str]:
    """Parameters the family keeps in fp32 whatever the dtype: our routers and `_keep_in_fp32_modules`."""
    marks = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    names = set()
    for mname, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if isinstance(module, Router) or any(m in full.split(".") for m in marks):
                names.add(full)
    return names


def _assign(model, name, param, tensor, device, dtype, where) -> None:
    if tuple(tensor.shape) != tuple(param.shape):
        raise KTChatError(f"{where}: shape {list(tensor.shape)} does not fit the model config (expected {list(param.shape)})")
    module_name, _, pname = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[pname] = nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False)


def _tie_or_fail(model, loaded: set[str], params: dict) -> None:
    missing = [n for n in params if n not in loaded]
    if missing and getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise KTChatError(f"checkpoint is missing {len(missing)} tensors the model needs (first: {missing[0]})")
