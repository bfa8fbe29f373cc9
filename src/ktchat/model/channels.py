"""Two-channel adapter loading: PEFT for everything on the compute device, the CPU experts for routed experts."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import warnings

import torch
from torch import nn

from ..adapter import Adapter, LoraModule, check_channels, read_adapter, split_channels
from ..adapter.keys import PEFT_KEY_MAPPING, parse_peft_key
from ..errors import KTChatError
from .moe import OffloadedMoE
from .registry import MoEArch

logger = logging.getLogger(__name__)

ADAPTER_NAME = "default"


def offloaded_blocks(model: nn.Module) -> dict[int, OffloadedMoE]:
    return {m.layer_idx: m for m in model.modules() if isinstance(m, OffloadedMoE)}


def plan_adapter(adapter: Adapter, model: nn.Module, arch: MoEArch):
    """Classifies every LoRA module and checks it against the model before anything is loaded.

    Returns (PEFT modules, {(layer, proj): ExpertLoRA}). Raises on any module that fits neither channel.
    """
    peft, routed = split_channels(adapter, arch.expert_path)
    unprefixed = next((m.a_key for m in peft.values() if not parse_peft_key(m.a_key).prefixed), None)
    if unprefixed is not None:
        raise KTChatError(
            f"{adapter.weights.path}: {unprefixed}: keys without the base_model.model. prefix (an SGLang-style "
            f"adapter) cannot go through PEFT; run `ktchat convert {adapter.path} OUT --to peft` and load OUT"
        )
    check_channels(adapter, (peft, routed), ModelShapes(model))
    return peft, routed


class ModelShapes:
    """A built KT-mode model as `BaseShapes`: its Linear layers, and its CPU experts' specs."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.blocks = offloaded_blocks(model)

    def linear(self, name: str):
        try:
            module = self.model.get_submodule(name)
        except AttributeError:
            return "which is not a module of the base model"
        if not isinstance(module, nn.Linear):
            return f"a {type(module).__name__}; only Linear layers are supported"
        return module.in_features, module.out_features

    def routed(self, layer: int):
        block = self.blocks.get(layer)
        if block is None:
            return None
        spec = block.experts.backend.spec
        return spec.num_experts, spec.hidden_size, spec.intermediate_size


def derived_peft_config(adapter: Adapter, modules: dict[str, LoraModule]):
    """The adapter's own LoRA settings, targeting exactly the named modules: no routed expert can match."""
    from peft import LoraConfig

    allowed = {f.name for f in dataclasses.fields(LoraConfig)}
    dropped = ("target_modules", "target_parameters", "exclude_modules", "layers_to_transform", "layers_pattern",
               "modules_to_save", "trainable_token_indices", "inference_mode")
    kwargs = {k: v for k, v in adapter.config.raw.items() if k in allowed and k not in dropped}
    target = "|".join(re.escape(name) for name in sorted(modules))
    return LoraConfig(**kwargs, target_modules=f"(?:{target})", inference_mode=True)


def load_peft_channel(model: nn.Module, adapter: Adapter, modules: dict[str, LoraModule]):
    """`PeftModel.from_pretrained` with the derived config, then proof that every tensor arrived intact."""
    from peft import PeftModel

    config = derived_peft_config(adapter, modules)
    renamed = any(parse_peft_key(m.a_key).renamed for m in modules.values())
    kwargs = {"key_mapping": PEFT_KEY_MAPPING} if renamed else {}  # drops KT wrapper segments (peft >= 0.17)
    with warnings.catch_warnings(record=True) as caught, _without_v5_moe_conversion(model):
        warnings.simplefilter("always")
        # torch_device="cpu": PEFT reads the whole file, routed-expert LoRA included; only its own tensors move on
        peft_model = PeftModel.from_pretrained(model, str(adapter.path), adapter_name=ADAPTER_NAME, config=config,
                                               torch_device="cpu", **kwargs)
    for w in caught:
        if "missing adapter keys" in str(w.message):
            raise KTChatError(f"{adapter.weights.path}: PEFT did not load every adapter tensor: {w.message}")
    _verify_peft_loaded(peft_model, adapter, modules)
    return peft_model


@contextlib.contextmanager
def _without_v5_moe_conversion(model: nn.Module):
    """Hides the model type from PEFT while it loads.

    Under transformers 5, PEFT rewrites the targets and tensors of adapters for model types whose experts
    transformers fuses (gate/up/down_proj -> target_parameters), which also catches the dense MLP and shared
    experts and drops their LoRA. Our MoE blocks hold no fused experts, so that conversion must not run.
    """
    config = model.config
    had_own = "model_type" in vars(config)
    saved = vars(config).get("model_type")
    config.model_type = f"ktchat-{config.model_type}"
    try:
        yield
    finally:
        if had_own:
            config.model_type = saved
        else:
            del config.model_type


def _verify_peft_loaded(peft_model, adapter: Adapter, modules: dict[str, LoraModule]) -> None:
    tensors = adapter.weights.load(k for m in modules.values() for k in (m.a_key, m.b_key))
    base = peft_model.base_model.model
    for name, lora in modules.items():
        layer = base.get_submodule(name)
        for side, key in (("lora_A", lora.a_key), ("lora_B", lora.b_key)):
            container = getattr(layer, side, None)
            got = container[ADAPTER_NAME] if container is not None and ADAPTER_NAME in container else None
            want = tensors[key]
            if got is None or not torch.equal(got.weight.detach().cpu(), want.to(got.weight.dtype)):
                raise KTChatError(f"{adapter.weights.path}: PEFT did not load {key} as stored")
        scale = layer.scaling[ADAPTER_NAME]
        if abs(scale - adapter.config.scale_for(name)) > 1e-6 * abs(scale):
            raise KTChatError(f"{adapter.config.path}: PEFT applied scale {scale} to {name}, expected {adapter.config.scale_for(name)}")


def load_moe_lora_from_adapter(model: nn.Module, adapter_path, *, arch: MoEArch | None = None) -> int:
    """Loads the routed-expert LoRA of an adapter (any layout) into the model's CPU experts (stacked KT layout).

    Returns the number of expert LoRA modules loaded. Validates everything before touching any layer.
    """
    adapter = adapter_path if isinstance(adapter_path, Adapter) else read_adapter(adapter_path)
    if arch is None:
        from .registry import arch_for

        arch = arch_for(_config_of(model))
    _, routed = split_channels(adapter, arch.expert_path)
    shapes = ModelShapes(model)
    check_channels(adapter, ({}, routed), shapes)
    stacked = {layer: stack_expert_lora(block, routed) for layer, block in shapes.blocks.items()}
    for layer, block in shapes.blocks.items():
        block.experts.backend.set_lora(stacked[layer])
    return sum(lora.num_experts for lora in routed.values())


def stack_expert_lora(block: OffloadedMoE, routed: dict) -> dict:
    """One layer's expert LoRA ({(layer, proj): ExpertLoRA}, checked by plan_adapter) read and stacked for its
    backend's set_lora: {proj: StackedLoRA}, empty where the adapter has none for this layer."""
    spec = block.experts.backend.spec
    return {proj: lora.stack(spec.dtype) for (layer, proj), lora in routed.items() if layer == spec.layer_idx}


class ExpertLoRAInstall:
    """Each layer's expert LoRA read, stacked and installed on a thread of its own, in layer order, while the
    checkpoint streams in: it was a second of loading before the first expert could be read. `wait(layer)` blocks
    until that layer's LoRA is in (a layer's kernel is built with it) and raises what went wrong there."""

    def __init__(self, blocks: dict[int, OffloadedMoE], routed: dict):
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ktchat-lora")
        self._done = {layer: self._pool.submit(self._install, blocks[layer], routed) for layer in sorted(blocks)}
        self.count = sum(lora.num_experts for lora in routed.values())

    @staticmethod
    def _install(block: OffloadedMoE, routed: dict) -> None:
        block.experts.backend.set_lora(stack_expert_lora(block, routed))

    def wait(self, layer: int) -> None:
        self._done[layer].result()

    def __enter__(self) -> "ExpertLoRAInstall":
        return self

    def __exit__(self, exc_type, *_) -> None:
        """Joins the thread; after an error elsewhere drops what is left, else raises what went wrong here."""
        self._pool.shutdown(wait=True, cancel_futures=exc_type is not None)
        if exc_type is None:
            for future in self._done.values():
                future.result()


def _config_of(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        raise KTChatError("load_moe_lora_from_adapter: the model has no config; pass one loaded by ktchat.load_model")
    return config
