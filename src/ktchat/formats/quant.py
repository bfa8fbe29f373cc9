"""Quantized weights as big MoE checkpoints ship them, and their exact dequantization.

A checkpoint's `config.quantization_config` names one scheme (`scheme_of`); each quantized module `<m>` is then
stored as a few tensors `<m>.<suffix>` (its format's `tensors`, role -> suffix). `QuantizedWeight` holds one
module's tensors as they are on disk and dequantizes them exactly: in fp32, then cast. Formats:

- "fp8": DeepSeek-V3 / V3.1 block FP8. `<m>.weight` float8_e4m3fn [out, in] and `<m>.weight_scale_inv` fp32
  [ceil(out/br), ceil(in/bc)] (block (br, bc) = weight_block_size, [128, 128]); value = fp8 * scale_inv of its
  block, edge blocks partial (kv_a_proj_with_mqa's 576 rows).
- "int4": compressed-tensors "pack-quantized" (Kimi-K2-Thinking / K2.5): `<m>.weight_packed` int32
  [out, ceil(in/8)], eight 4-bit values per word, value j of a word in bits 4j..4j+3, stored as q + 8 (q signed,
  -8..7); `<m>.weight_scale` [out, ceil(in/g)] (g = group_size, 32); `<m>.weight_shape` int64 [2] = (out, in).
  Symmetric: value = q * scale of its group.

Other formats (KT's pre-converted routed INT8) join with `register`; every list of formats or suffixes is derived
from `FORMATS`. Bottom layer: torch and ktchat.errors only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from ..errors import KTChatError


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """One linear weight of logical `shape` (out, in) in a quantized format, tensors as on disk.

    `data` holds the values (fp8 [out, in]; int4 packed int32 [out, ceil(in/8)]); `scale` one factor per `block`
    (rows, cols) of the logical weight, [ceil(out/rows), ceil(in/cols)], edge blocks partial. Checked on creation
    against its format, so a QuantizedWeight that exists dequantizes."""

    format: str
    data: torch.Tensor
    scale: torch.Tensor
    block: tuple[int, int]
    shape: tuple[int, int]

    def __post_init__(self):
        fmt = format_named(self.format)
        object.__setattr__(self, "block", tuple(int(b) for b in self.block))
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        problem = fmt.check(self)
        if problem:
            raise KTChatError(f"{self.format} weight of shape {list(self.shape)}: {problem}")

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [out, in], computed in fp32 (exact for fp8 and int4: one product per element) then cast."""
        w = FORMATS[self.format].dequantize(self)
        return w if dtype == torch.float32 else w.to(dtype)

    @property
    def nbytes(self) -> int:
        """Bytes held: values plus scales (what stays in memory where a kernel runs on the native format)."""
        return self.data.nbytes + self.scale.nbytes

    def tensors(self, module: str) -> dict[str, torch.Tensor]:
        """The checkpoint tensors of module `module` ("model.layers.3.mlp.experts.0.up_proj"), for export."""
        fmt = FORMATS[self.format]
        names = fmt.names(module)
        return {names[role]: t for role, t in fmt.to_tensors(self).items()}


@dataclass(frozen=True)
class QuantFormat:
    """One on-disk format: the tensors a quantized module is stored as, and how they become a weight."""

    name: str
    tensors: Mapping[str, str]  # role ("data", "scale", "shape") -> checkpoint suffix after the module name
    data_dtypes: tuple[torch.dtype, ...]
    check: Callable[[QuantizedWeight], str | None]  # what is inconsistent, or None
    dequantize: Callable[[QuantizedWeight], torch.Tensor]  # -> fp32 [out, in]
    quantize: Callable[[torch.Tensor, tuple[int, int]], QuantizedWeight]  # fp32 [out, in], block -> weight
    from_tensors: Callable[[dict[str, torch.Tensor], tuple[int, int]], QuantizedWeight]  # role -> tensor
    to_tensors: Callable[[QuantizedWeight], dict[str, torch.Tensor]]  # -> role -> tensor (named by `tensors`)
    required: tuple[str, ...] = ("data", "scale")  # roles that must be present (others optional)
    doc: str = ""

    def names(self, module: str) -> dict[str, str]:
        """role -> full checkpoint name of `module`'s tensors."""
        return {role: f"{module}.{suffix}" for role, suffix in self.tensors.items()}


FORMATS: dict[str, QuantFormat] = {}


def register(fmt: QuantFormat) -> QuantFormat:
    if fmt.name in FORMATS:
        raise ValueError(f"quantized format {fmt.name!r} registered twice")
    FORMATS[fmt.name] = fmt
    return fmt


def format_named(name: str) -> QuantFormat:
    fmt = FORMATS.get(name)
    if fmt is None:
        raise KTChatError(f"unknown quantized format {name!r} (known: {', '.join(FORMATS)})")
    return fmt


def suffixes() -> dict[str, tuple[str, str]]:
    """Every checkpoint suffix a quantized module may carry -> (format, role); derived from FORMATS.
    "weight" belongs to fp8's data (and to every unquantized weight), so callers match it by dtype."""
    out: dict[str, tuple[str, str]] = {}
    for fmt in FORMATS.values():
        for role, suffix in fmt.tensors.items():
            out.setdefault(suffix, (fmt.name, role))
    return out


def blocks(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    """Scale grid of a weight: ceil(out/rows), ceil(in/cols) (the last blocks may be partial)."""
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def _expand(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """Per-element fp32 factor [out, in] from a per-block scale, cutting the partial edge blocks."""
    s = scale.to(torch.float32)
    return s.repeat_interleave(block[0], 0)[: shape[0]].repeat_interleave(block[1], 1)[:, : shape[1]]


def _check_scale(q: QuantizedWeight) -> str | None:
    if len(q.block) != 2 or min(q.block) < 1:
        return f"block {list(q.block)} must be two positive sizes"
    if not q.scale.is_floating_point():
        return f"scale dtype {q.scale.dtype} is not a float"
    want = blocks(q.shape, q.block)
    if tuple(q.scale.shape) != want:
        return (f"scale shape {list(q.scale.shape)} does not fit block {list(q.block)} "
                f"(expected {list(want)})")
    return None


def _block_amax(w: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """max |w| of each block, [ceil(out/rows), ceil(in/cols)] (partial edge blocks padded with zeros)."""
    gr, gc = blocks(tuple(w.shape), block)
    padded = torch.zeros(gr * block[0], gc * block[1], dtype=torch.float32, device=w.device)
    padded[: w.shape[0], : w.shape[1]] = w.abs()
    return padded.view(gr, block[0], gc, block[1]).amax(dim=(1, 3))


def _dequantize_scaled(q: QuantizedWeight) -> torch.Tensor:
    """An unpacked format (one stored value per weight): value times its block's scale."""
    return q.data.to(torch.float32) * _expand(q.scale, q.shape, q.block)


def _unpacked(name: str) -> Callable[[dict[str, torch.Tensor], tuple[int, int]], QuantizedWeight]:
    """from_tensors of an unpacked format: the data's shape is the weight's."""
    return lambda t, block: QuantizedWeight(name, t["data"], t["scale"], block, tuple(t["data"].shape))


def _unpacked_roles(q: QuantizedWeight) -> dict[str, torch.Tensor]:
    """to_tensors of an unpacked format: its values and its scales."""
    return {"data": q.data, "scale": q.scale}


# ---- fp8: DeepSeek-V3 block FP8 ----

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def _fp8_check(q: QuantizedWeight) -> str | None:
    if q.data.dtype != torch.float8_e4m3fn:
        return f"data dtype {q.data.dtype} is not float8_e4m3fn"
    if tuple(q.data.shape) != q.shape:
        return f"data shape {list(q.data.shape)} is not the weight's"
    return _check_scale(q)


def _fp8_quantize(w: torch.Tensor, block: tuple[int, int]) -> QuantizedWeight:
    w = w.to(torch.float32)
    amax = _block_amax(w, block)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    data = (w / _expand(scale, tuple(w.shape), block)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return QuantizedWeight("fp8", data, scale, block, tuple(w.shape))


register(QuantFormat(
    name="fp8",
    tensors={"data": "weight", "scale": "weight_scale_inv"},
    data_dtypes=(torch.float8_e4m3fn,),
    check=_fp8_check,
    dequantize=_dequantize_scaled,
    quantize=_fp8_quantize,
    from_tensors=_unpacked("fp8"),
    to_tensors=_unpacked_roles,
    doc="float8_e4m3fn values, one fp32 scale_inv per block (DeepSeek-V3)",
))


# ---- int4: compressed-tensors pack-quantized, symmetric, per group along `in` ----

INT4_PER_WORD = 8
INT4_OFFSET = 8  # stored unsigned: q + 8


def _int4_check(q: QuantizedWeight) -> str | None:
    if q.data.dtype != torch.int32:
        return f"packed dtype {q.data.dtype} is not int32"
    want = (q.shape[0], math.ceil(q.shape[1] / INT4_PER_WORD))
    if tuple(q.data.shape) != want:
        return f"packed shape {list(q.data.shape)} does not hold it (expected {list(want)})"
    if q.block[0] != 1:
        return f"block {list(q.block)}: int4 groups are along the input dimension only (rows 1)"
    return _check_scale(q)


def _unpack_int4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """int32 [out, words] -> signed int values [out, cols] (int32)."""
    shifts = torch.arange(0, 4 * INT4_PER_WORD, 4, dtype=torch.int32, device=packed.device)
    nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF  # arithmetic shift, then mask: sign bits fall away
    return nibbles.flatten(1)[:, :cols] - INT4_OFFSET


def _pack_int4(values: torch.Tensor) -> torch.Tensor:
    """signed int values [out, cols] in -8..7 -> int32 [out, ceil(cols/8)] (padding stored as 0)."""
    out, cols = values.shape
    words = math.ceil(cols / INT4_PER_WORD)
    u = torch.zeros(out, words * INT4_PER_WORD, dtype=torch.int64, device=values.device)
    u[:, :cols] = values.to(torch.int64) + INT4_OFFSET
    shifts = torch.arange(0, 4 * INT4_PER_WORD, 4, dtype=torch.int64, device=values.device)
    word = (u.view(out, words, INT4_PER_WORD) << shifts).sum(-1)  # disjoint bits: sum == or
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def _int4_dequantize(q: QuantizedWeight) -> torch.Tensor:
    return _unpack_int4(q.data, q.shape[1]).to(torch.float32) * _expand(q.scale, q.shape, q.block)


def _int4_quantize(w: torch.Tensor, block: tuple[int, int]) -> QuantizedWeight:
    w = w.to(torch.float32)
    amax = _block_amax(w, block)
    scale = torch.where(amax > 0, amax / 7.0, torch.ones_like(amax)).to(torch.bfloat16)  # Kimi ships bf16 scales
    values = torch.round(w / _expand(scale, tuple(w.shape), block)).clamp(-8, 7)
    return QuantizedWeight("int4", _pack_int4(values), scale, block, tuple(w.shape))


def _int4_from_tensors(t: dict[str, torch.Tensor], block: tuple[int, int]) -> QuantizedWeight:
    shape = t.get("shape")
    if shape is None:
        raise KTChatError("missing its weight_shape")
    if shape.dtype not in (torch.int32, torch.int64) or tuple(shape.shape) != (2,):
        raise KTChatError(f"weight_shape must be two integers (out, in), got {shape.dtype} {list(shape.shape)}")
    return QuantizedWeight("int4", t["data"], t["scale"], block, tuple(shape.tolist()))


register(QuantFormat(
    name="int4",
    tensors={"data": "weight_packed", "scale": "weight_scale", "shape": "weight_shape"},
    data_dtypes=(torch.int32,),
    required=("data", "scale", "shape"),
    check=_int4_check,
    dequantize=_int4_dequantize,
    quantize=_int4_quantize,
    from_tensors=_int4_from_tensors,
    to_tensors=lambda q: {"data": q.data, "scale": q.scale,
                          "shape": torch.tensor(q.shape, dtype=torch.int64)},  # as compressed-tensors writes it
    doc="compressed-tensors pack-quantized: signed 4-bit, 8 per int32, one scale per group of the input dim",
))


# ---- int8: KT's pre-converted routed INT8 (kt_kernel's AMXInt8 / INT8_SFT experts), one scale per row ----
# (added by the kernel side of issue 15; ktchat.formats.kt_weights reads and writes kt_kernel's .kt files)

INT8_MAX = 127.0


def _int8_check(q: QuantizedWeight) -> str | None:
    if q.data.dtype != torch.int8:
        return f"data dtype {q.data.dtype} is not int8"
    if tuple(q.data.shape) != q.shape:
        return f"data shape {list(q.data.shape)} is not the weight's"
    if q.block[0] != 1:
        return f"block {list(q.block)}: int8 scales are per row (rows 1)"
    if q.scale.dtype != torch.float32:
        return f"scale dtype {q.scale.dtype} is not float32"
    return _check_scale(q)


def _int8_quantize(w: torch.Tensor, block: tuple[int, int]) -> QuantizedWeight:
    """kt_kernel's own rule, bit for bit (checked against its .kt files): scale = amax * (1/127) in fp32,
    q = round-half-even(w * (1/scale)); an all-zero row keeps scale 0 and q 0."""
    w = w.to(torch.float32)
    amax = _block_amax(w, block)
    scale = amax * torch.tensor(1.0 / INT8_MAX, dtype=torch.float32)
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    data = torch.round(w * _expand(inv, tuple(w.shape), block)).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return QuantizedWeight("int8", data, scale, block, tuple(w.shape))


register(QuantFormat(
    name="int8",
    tensors={"data": "weight", "scale": "weight_scale"},
    data_dtypes=(torch.int8,),
    check=_int8_check,
    dequantize=_dequantize_scaled,
    quantize=_int8_quantize,
    from_tensors=_unpacked("int8"),
    to_tensors=_unpacked_roles,
    doc="KT routed INT8: int8 values, one fp32 scale per row (per row and NUMA slice of the input)",
))


def kt_int8(w: torch.Tensor) -> QuantizedWeight:
    """What kt_kernel's INT8 experts hold for a weight [out, in] (one scale per row): the math INT8 training ran."""
    return _int8_quantize(w, (1, w.shape[1]))


def quantize(format: str, w: torch.Tensor, block: tuple[int, int]) -> QuantizedWeight:
    """Quantizes an [out, in] weight the way the format's checkpoints are made (round to nearest, scale = block
    max / format max); for tiny checkpoints and export in the base's format."""
    return format_named(format).quantize(w, tuple(block))


# ---- the checkpoint's scheme, from config.quantization_config ----


@dataclass(frozen=True)
class QuantScheme:
    """What a checkpoint's quantization_config says: the format of its quantized modules, their block, and
    which modules it leaves unquantized (compressed-tensors' `ignore`: names, or "re:" patterns)."""

    format: str
    block: tuple[int, int]
    ignore: tuple[str, ...] = ()
    config: dict = field(default_factory=dict, compare=False)  # as read, for export to write back

    def ignores(self, module: str) -> bool:
        for pattern in self.ignore:
            if pattern.startswith("re:"):
                if re.fullmatch(pattern[3:], module):
                    return True
            elif module == pattern or module.endswith("." + pattern):
                return True
        return False

    @property
    def fmt(self) -> QuantFormat:
        return FORMATS[self.format]


def quantization_config(config):
    """config.json's quantization_config, or its text_config's (a VLM's), or None: from a transformers config or
    config.json as read. The one reader (loading, the experts' format, export)."""
    def get(c, key):
        return c.get(key) if isinstance(c, Mapping) else getattr(c, key, None)

    for c in (config, get(config, "text_config")):
        qc = get(c, "quantization_config") if c is not None else None
        if qc is not None:
            return qc.to_dict() if hasattr(qc, "to_dict") else qc
    return None


def scheme_of(qc, where: str) -> QuantScheme | None:
    """The scheme of a config's quantization_config (None where there is none); one error naming `where` and
    the key for anything ktchat cannot dequantize exactly."""
    if qc is None:
        return None
    if not isinstance(qc, Mapping):
        raise KTChatError(f"{where}: quantization_config must be an object, got {type(qc).__name__}")
    qc = dict(qc)
    method = qc.get("quant_method")
    reader = _SCHEME_READERS.get(method)
    if reader is None:
        raise KTChatError(f"{where}: quantization_config.quant_method {method!r} is not supported "
                          f"(supported: {', '.join(_SCHEME_READERS)})")
    return reader(qc, f"{where}: quantization_config")


def _fp8_scheme(qc: dict, where: str) -> QuantScheme:
    if qc.get("fmt", "e4m3") != "e4m3":
        raise KTChatError(f"{where}.fmt {qc.get('fmt')!r} is not supported (e4m3)")
    if qc.get("activation_scheme", "dynamic") != "dynamic":
        raise KTChatError(f"{where}.activation_scheme {qc.get('activation_scheme')!r} is not supported (dynamic: "
                          "static activation scales are not read)")
    block = qc.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise KTChatError(f"{where}.weight_block_size must be two positive integers, got {block!r}")
    ignore = qc.get("modules_to_not_convert") or ()
    return QuantScheme("fp8", tuple(block), tuple(ignore), qc)


_CT_WEIGHTS = {"num_bits": 4, "type": "int", "strategy": "group", "symmetric": True}


def _compressed_tensors_scheme(qc: dict, where: str) -> QuantScheme:
    if qc.get("quantization_status", "compressed") != "compressed":
        raise KTChatError(f"{where}.quantization_status {qc.get('quantization_status')!r}: the weights are not "
                          "stored packed (compressed)")
    groups = qc.get("config_groups")
    if not (isinstance(groups, Mapping) and len(groups) == 1):
        raise KTChatError(f"{where}.config_groups must hold exactly one group, got {groups!r}")
    (name, group), = groups.items()
    g = f"{where}.config_groups.{name}"
    fmt = group.get("format") or qc.get("format")
    if fmt != "pack-quantized":
        raise KTChatError(f"{where}.format {fmt!r} is not supported (pack-quantized)")
    if group.get("input_activations") or group.get("output_activations"):
        raise KTChatError(f"{g}: activation quantization is not supported (weights only)")
    weights = group.get("weights") or {}
    for key, want in _CT_WEIGHTS.items():
        if weights.get(key) != want:
            raise KTChatError(f"{g}.weights.{key} {weights.get(key)!r} is not supported ({want!r})")
    if weights.get("actorder") or weights.get("dynamic"):
        raise KTChatError(f"{g}.weights: actorder / dynamic quantization is not supported")
    size = weights.get("group_size")
    if not (isinstance(size, int) and size > 0):
        raise KTChatError(f"{g}.weights.group_size must be a positive integer, got {size!r}")
    ignore = qc.get("ignore") or ()
    if not (isinstance(ignore, list | tuple) and all(isinstance(p, str) for p in ignore)):
        raise KTChatError(f"{where}.ignore must be a list of module names or re: patterns, got {ignore!r}")
    return QuantScheme("int4", (1, size), tuple(ignore), qc)


_SCHEME_READERS: dict[str, Callable[[dict, str], QuantScheme]] = {
    "fp8": _fp8_scheme,
    "compressed-tensors": _compressed_tensors_scheme,
}
