"""The names several layers share, kept once: every other list of them is derived from these.

A routed expert's projections; the kt experts' weight formats (`kt_method`) with the kt_kernel classes that run
each; the two ways the expert LoRA runs; the formats `ktchat export` and `ktchat convert` write. Bottom layer: no
imports, no torch, so the CLI offers these as its choices and `ktchat --help` stays instant.
"""

from __future__ import annotations

from dataclasses import dataclass

PROJS = ("gate", "up", "down")  # a routed expert's projections, in kt_kernel's order
MOE_LORA_MODES = ("exact", "merged")  # the expert LoRA unmerged as in training, or folded into the weights
EXPORT_FORMATS = ("bf16", "base")  # a quantized base's export: dequantized (the default), or in its own format
ADAPTER_LAYOUTS = ("peft", "kt", "sglang")  # what `ktchat convert --to` writes
GPU_EXPERT_PLACEMENTS = ("frequency", "uniform", "front")  # which routed experts go to the GPU (or a .json placement)


@dataclass(frozen=True)
class KTMethod:
    """One weight format of the kt experts: kt_kernel_ext.moe's kernels for it and what it needs.

    bf16 / int8 / int4 take bf16 weights (int8 and int4 quantized by the kernel; int8 also KT's pre-converted
    INT8 as it is); fp8 and rawint4 (Kimi-K2's group-32 INT4) run a quantized checkpoint's own bytes."""

    inference: tuple[str, ...]  # inference kernel classes, the first this build has wins
    sft: str  # the SFT kernel class: the expert LoRA applied unmerged
    align: int  # hidden and intermediate sizes must be multiples of it (others crash the bf16 kernel)
    trained: str | None = None  # the expert_weight_format KT training records for this math
    scheme: str | None = None  # the checkpoint quantization it runs as stored (quant.QuantScheme.format)


KT_METHODS: dict[str, KTMethod] = {
    "bf16": KTMethod(("AMXBF16_MOE", "AVX2BF16_MOE"), "AMXBF16_SFT_MOE", 32, trained="bf16"),
    "int8": KTMethod(("AMXInt8_MOE",), "AMXInt8_SFT_MOE", 64, trained="int8"),
    "int4": KTMethod(("AMXInt4_MOE",), "AMXInt4_SFT_MOE", 128),
    "fp8": KTMethod(("AMXFP8_MOE", "AVX2FP8_MOE"), "AMXFP8_SFT_MOE", 128, trained="fp8", scheme="fp8"),
    "rawint4": KTMethod(("AMXInt4_KGroup_MOE", "AVX2RawInt4_MOE"), "AMXInt4_KGroup_SFT_MOE", 64, trained="rawint4",
                        scheme="int4"),
}
# What KT training records as expert_weight_format (kt_adapter_manifest.json) -> the kt method running that math
TRAINED_METHOD = {m.trained: name for name, m in KT_METHODS.items() if m.trained}
