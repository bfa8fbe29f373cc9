"""Which weight format the routed experts run in: the one the adapter was trained on, unless the user says otherwise.

KT training records `expert_weight_format` in kt_adapter_manifest.json (bf16, int8, fp8, rawint4, mxfp4). Its
math becomes the default here: int8 -> kt's INT8 kernels (or the torch backend on KT's INT8 of the base,
dequantized), fp8 -> the FP8 checkpoint's bytes on kt's FP8 kernels, rawint4 -> Kimi-K2's INT4 on kt's group-32
INT4 kernels, bf16 -> bf16. With moe_lora exact that is the same kind of SFT kernel training ran. A kt_method
from the YAML/CLI wins, with one line saying it differs from training's (which backend runs it: experts.choice).
Checked here, before any weight is read: the base fingerprint, the routed INT8 set's manifest, the non-expert
cache's fingerprint, and that fp8 / rawint4 have a checkpoint quantized that way.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..adapter.core import Problems
from ..adapter.kt_provenance import check_base, check_non_expert_cache, check_routed
from ..errors import KTChatError
from ..formats import KT_METHODS, TRAINED_METHOD
from ..formats.quant import quantization_config, scheme_of

logger = logging.getLogger(__name__)


def method_for(adapter, model_dir: Path, kt_method: str | None) -> str | None:
    """The weight format the experts run in: `kt_method`, else the one the adapter was trained on (checking the base
    and the non-expert cache its manifest records), else None (bf16)."""
    manifest, prov = _provenance(adapter)
    if prov is None:
        return kt_method
    problems = Problems()  # raises at the first mismatch, one line
    logger.info("%s: %s", manifest.path.name, check_base(prov, manifest.path, model_dir, problems))
    note = check_non_expert_cache(prov, manifest.path, problems)
    if note:
        logger.info("%s: %s", manifest.path.name, note)
    trained = TRAINED_METHOD.get(prov.weight_format)
    if trained is None:
        raise KTChatError(f"{manifest.path}: expert_weight_format {prov.weight_format} (DeepSeek-V4's native "
                          "experts) is not supported by ktchat")
    if kt_method is None:
        logger.info("routed experts: %s, the format the adapter was trained on (%s expert_weight_format)", trained,
                    manifest.path.name)
    elif kt_method != trained:
        logger.warning("kt_method %s differs from the adapter's training format %s (%s expert_weight_format): "
                       "running %s as asked", kt_method, trained, manifest.path.name, kt_method)
    return kt_method or trained


def check_scheme(method: str | None, config, model_dir: Path) -> None:
    """fp8 and rawint4 run the checkpoint's own bytes: its quantization_config must say that format."""
    where = model_dir / "config.json"
    need = KT_METHODS[method].scheme if method in KT_METHODS else None
    scheme = scheme_of(quantization_config(config), str(where))
    have = scheme.format if scheme is not None else None
    if need is not None and have != need:
        raise KTChatError(f"{where}: expert format {method} needs a checkpoint quantized as {need} "
                          f"(quantization_config), but this base is {have or 'not quantized'}")


def int8_root(method: str | None, adapter, kt_weight_path: str | None) -> Path | None:
    """KT's INT8 set: kt_weight_path as given, else the one training used (int8_experts), checked either way."""
    if kt_weight_path is not None and method != "int8":
        raise KTChatError(f"kt_weight_path is KT's routed INT8 set; the experts run {method or 'bf16'} "
                          "(set kt_method: int8, or leave kt_weight_path out)")
    if method != "int8":
        return None
    manifest, prov = _provenance(adapter)
    if prov is not None and prov.routed is not None:
        root = check_routed(prov, manifest.path, Problems(), Path(kt_weight_path) if kt_weight_path else None)
        logger.info("routed experts: KT's pre-converted INT8 from %s (%s; manifest sha256 and fingerprint as "
                    "recorded at training)", root, prov.routed_key)
        return root
    if kt_weight_path is not None:
        logger.info("routed experts: KT's pre-converted INT8 from %s (kt_weight_path)", kt_weight_path)
        return Path(kt_weight_path)
    return None


def _provenance(adapter):
    """(kt_adapter_manifest, its provenance), either None where the adapter has none."""
    manifest = adapter.manifest if adapter is not None else None
    return manifest, (manifest.provenance if manifest is not None else None)
