"""Which weight format the routed experts run in: the one the adapter was trained on, unless the user says otherwise.

KT training records `expert_weight_format` in kt_adapter_manifest.json (bf16, int8, fp8, rawint4, mxfp4). Its
math becomes the default here: int8 -> kt's INT8 kernels (or the torch backend on KT's INT8 of the base,
dequantized), fp8 -> the FP8 checkpoint's bytes on kt's FP8 kernels, rawint4 -> Kimi-K2's INT4 on kt's group-32
INT4 kernels, bf16 -> bf16. With moe_lora exact that is the same kind of SFT kernel training ran. A kt_method
from the YAML/CLI wins, with one line saying it differs from training's. Where this CPU's kt build has no kernel
for the format, "auto" says so in one line and runs the torch backend on the same math. Checked here, before any
weight is read: the base fingerprint, the routed INT8 set's manifest, the non-expert cache's fingerprint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..adapter.core import Problems
from ..adapter.kt_provenance import check_base, check_non_expert_cache, check_routed
from ..errors import KTChatError

logger = logging.getLogger(__name__)

# The checkpoint quantization a native format needs (quant.QuantScheme.format)
_NEEDS_SCHEME = {"fp8": "fp8", "rawint4": "int4"}


@dataclass(frozen=True)
class ExpertFormat:
    experts_backend: str
    kt_method: str | None
    int8_root: Path | None = None  # KT's pre-converted routed INT8 to load as it is (kt_weights)


def checkpoint_scheme(config, model_dir: Path):
    """The base's quant.QuantScheme from config.json's quantization_config (a VLM's text_config's), or None."""
    from ..quant import scheme_of

    for c in (config, getattr(config, "text_config", None)):
        qc = getattr(c, "quantization_config", None) if c is not None else None
        if qc is not None:
            return scheme_of(qc if isinstance(qc, dict) else qc.to_dict(), str(model_dir / "config.json"))
    return None


def resolve(adapter, model_dir: Path, scheme, *, experts_backend: str, kt_method: str | None,
            moe_lora: str | None, kt_weight_path: str | None = None) -> ExpertFormat:
    """`scheme`: the base checkpoint's quant.QuantScheme (None for bf16/fp32)."""
    from ..experts import kt_backend

    manifest = adapter.manifest if adapter is not None else None
    prov = manifest.provenance if manifest is not None else None
    trained = None
    if prov is not None:
        problems = Problems()  # raises at the first mismatch, one line
        logger.info("%s: %s", manifest.path.name, check_base(prov, manifest.path, model_dir, problems))
        note = check_non_expert_cache(prov, manifest.path, problems)
        if note:
            logger.info("%s: %s", manifest.path.name, note)
        trained = kt_backend.TRAINED_METHOD.get(prov.weight_format)
        if trained is None:
            raise KTChatError(f"{manifest.path}: expert_weight_format {prov.weight_format} (DeepSeek-V4's native "
                              "experts) is not supported by ktchat")
    method = kt_method
    if method is None and trained is not None:
        method = trained
        logger.info("routed experts: %s, the format the adapter was trained on (%s expert_weight_format)", method,
                    manifest.path.name)
    elif method is not None and trained is not None and method != trained:
        logger.warning("kt_method %s differs from the adapter's training format %s (%s expert_weight_format): "
                       "running %s as asked", method, trained, manifest.path.name, method)
    _check_scheme(method, scheme, model_dir)
    backend = experts_backend
    if backend == "torch" or method in (None, "bf16"):
        pass
    else:
        reason = kt_backend.unavailable_reason(moe_lora or "merged", method) if _kt_imports() else "no kt_kernel"
        if reason and backend == "auto":
            logger.info("routed experts: torch backend on the same %s math (%s)", method, reason)
            backend = "torch"
        elif reason:
            raise KTChatError(f"experts_backend kt: {reason}; use experts_backend torch (same math, slower)"
                              + ("" if kt_method else f" or kt_method bf16 (not the adapter's {method})"))
    root = _int8_root(method, prov, manifest, kt_weight_path)
    return ExpertFormat(backend, method, root)


def _kt_imports() -> bool:
    from ..experts import kt_backend

    try:
        kt_backend.kt_ext()
    except KTChatError:
        return False
    return True


def _check_scheme(method: str | None, scheme, model_dir: Path) -> None:
    need = _NEEDS_SCHEME.get(method)
    have = scheme.format if scheme is not None else None
    if need is not None and have != need:
        raise KTChatError(f"{model_dir / 'config.json'}: expert format {method} needs a checkpoint quantized as {need} "
                          f"(quantization_config), but this base is {have or 'not quantized'}")


def _int8_root(method, prov, manifest, kt_weight_path) -> Path | None:
    """KT's INT8 set: kt_weight_path as given, else the one training used (int8_experts), checked either way."""
    if kt_weight_path is not None and method != "int8":
        raise KTChatError(f"kt_weight_path is KT's routed INT8 set; the experts run {method or 'bf16'} "
                          "(set kt_method: int8, or leave kt_weight_path out)")
    if method != "int8":
        return None
    if prov is not None and prov.routed is not None:
        root = check_routed(prov, manifest.path, Problems(), Path(kt_weight_path) if kt_weight_path else None)
        logger.info("routed experts: KT's pre-converted INT8 from %s (%s; manifest sha256 and fingerprint as "
                    "recorded at training)", root, prov.routed_key)
        return root
    if kt_weight_path is not None:
        logger.info("routed experts: KT's pre-converted INT8 from %s (kt_weight_path)", kt_weight_path)
        return Path(kt_weight_path)
    return None


def open_int8(root: Path | None, skeleton):
    """The checked INT8 tree for this model's MoE layers (or None)."""
    if root is None:
        return None
    from ..kt_weights import open_int8_experts

    spec = next(iter(skeleton.moe_blocks.values())).cpu_experts.backend.spec
    return open_int8_experts(root, num_experts=spec.num_experts, hidden_size=spec.hidden_size,
                             intermediate_size=spec.intermediate_size, layers=sorted(skeleton.moe_blocks))
