"""Safetensors on disk: the dtype table, file headers and a checkpoint folder's shards, read without loading a tensor.

The one place ktchat knows the file format. `DTYPES` is every dtype safetensors defines, and every other dtype list
(`COMPUTE_DTYPES`, `LORA_DTYPES`, `st_name`) is derived from it. `read_header` parses and checks one file's header
(name -> dtype, shape, byte offsets); `open_checkpoint` finds a model folder's files (model.safetensors, or the shards
of model.safetensors.index.json) and reads all their headers up front, so a bad checkpoint fails before the slow work;
`staged_output` writes a new checkpoint or adapter folder all at once.
Every error is one KTChatError line naming the file (and the tensor, where one is at fault).

Bottom layer: the standard library and ktchat.errors only; torch is imported inside `DType.torch`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import KTChatError


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in 8 MiB pieces (adapter manifests and KT weight sets record them)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()

SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 << 20  # safetensors refuses larger headers too


@dataclass(frozen=True)
class DType:
    """One safetensors dtype: its name on disk, torch's name for it, bits per element, and what it holds."""

    name: str  # on disk, e.g. "BF16"
    torch_name: str | None  # e.g. "bfloat16"; None where torch has no element type for it
    bits: int
    floating: bool
    compute: bool = False  # ktchat computes in it: the dtypes a user may ask for (load, export, convert)

    @property
    def torch(self):
        """The torch dtype, or None where this torch has none (older versions lack some 8-bit floats)."""
        import torch

        return getattr(torch, self.torch_name, None) if self.torch_name else None

    @property
    def narrow(self) -> bool:
        """An 8-bit or smaller float: quantized data, whose values mean something only with the scales stored
        beside it (DeepSeek-V3's FP8 `weight_scale_inv`, MX block scales)."""
        return self.floating and self.bits <= 8

    def nbytes(self, shape) -> int | None:
        """Bytes of a tensor of `shape` on disk; None where the elements do not fill whole bytes."""
        bits = self.bits
        for d in shape:
            bits *= d
        return bits // 8 if bits % 8 == 0 else None


# Every dtype safetensors (0.8) defines. The compute dtypes come first, in the order ktchat lists them.
DTYPES: dict[str, DType] = {d.name: d for d in (
    DType("F32", "float32", 32, True, compute=True),
    DType("BF16", "bfloat16", 16, True, compute=True),
    DType("F16", "float16", 16, True, compute=True),
    DType("F64", "float64", 64, True),
    DType("F8_E4M3", "float8_e4m3fn", 8, True),
    DType("F8_E5M2", "float8_e5m2", 8, True),
    DType("F8_E4M3FNUZ", "float8_e4m3fnuz", 8, True),
    DType("F8_E5M2FNUZ", "float8_e5m2fnuz", 8, True),
    DType("F8_E8M0", "float8_e8m0fnu", 8, True),  # exponent only: MX block scales
    DType("F6_E2M3", None, 6, True),
    DType("F6_E3M2", None, 6, True),
    DType("F4", None, 4, True),  # safetensors loads it as torch's float4_e2m1fn_x2, two values per element
    DType("I64", "int64", 64, False),
    DType("I32", "int32", 32, False),  # also packed int4 (GPTQ/AWQ qweight, qzeros), eight values per element
    DType("I16", "int16", 16, False),
    DType("I8", "int8", 8, False),
    DType("U64", "uint64", 64, False),
    DType("U32", "uint32", 32, False),
    DType("U16", "uint16", 16, False),
    DType("U8", "uint8", 8, False),
    DType("BOOL", "bool", 8, False),
    DType("C64", "complex64", 64, False),
)}

BY_TORCH_NAME: dict[str, DType] = {d.torch_name: d for d in DTYPES.values() if d.torch_name}
# torch names of the dtypes ktchat computes in: --dtype, --expert-dtype, a model's dtype
COMPUTE_DTYPES: tuple[str, ...] = tuple(d.torch_name for d in DTYPES.values() if d.compute)
# torch names a LoRA tensor may be stored in: any float torch has an element type for
LORA_DTYPES: frozenset[str] = frozenset(d.torch_name for d in DTYPES.values() if d.floating and d.torch_name)


def st_name(torch_dtype) -> str | None:
    """The on-disk name of a torch dtype (or of its name, "bfloat16"), None where safetensors has none."""
    d = BY_TORCH_NAME.get(str(torch_dtype).removeprefix("torch."))
    return d.name if d else None


def dtype_named(name, where: str) -> DType:
    """The DType of an on-disk name; one error naming `where` (file and tensor) for anything else."""
    d = DTYPES.get(name) if isinstance(name, str) else None
    if d is None:
        raise KTChatError(f"{where}: unknown safetensors dtype {name!r} (known: {', '.join(DTYPES)})")
    return d


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry."""

    dtype: DType
    shape: tuple[int, ...]
    start: int  # byte offsets in the data section (safetensors' data_offsets)
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Header:
    """One safetensors file's header, checked: tensors in file order, their bytes covering the data exactly."""

    path: Path
    data_start: int  # file offset of the data section: tensor bytes are at data_start + start .. data_start + end
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None


def read_header(path) -> Header:
    """Reads and checks the header of a safetensors file from its first bytes (no tensor data is read)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise KTChatError(f"{path}: truncated: {size} bytes, too short for a safetensors header")
            n = int.from_bytes(head, "little")
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise KTChatError(f"{path}: truncated or not safetensors: its first 8 bytes give a header of {n} "
                                  f"bytes, the file has {size}")
            text = f.read(n)
    except OSError as exc:
        raise KTChatError(f"{path}: cannot read safetensors header ({exc.strerror or exc})") from None
    try:
        raw = json.loads(text)
    except (UnicodeDecodeError, ValueError) as exc:
        raise KTChatError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(raw, dict):
        raise KTChatError(f"{path}: corrupt safetensors header (a JSON {type(raw).__name__}, not an object)")
    metadata = raw.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise KTChatError(f"{path}: corrupt safetensors header (__metadata__ must map names to strings)")
    tensors = dict(sorted(((name, _entry(path, name, e)) for name, e in raw.items()), key=lambda t: t[1].start))
    end = 0
    for name, t in tensors.items():
        if t.start != end:
            raise KTChatError(f"{path}: corrupt safetensors header: tensor {name!r} starts at byte {t.start} of the "
                              f"data, not {end} (offsets overlap or leave a gap)")
        end = t.end
    if 8 + n + end != size:
        state = "truncated" if 8 + n + end > size else "corrupt"
        raise KTChatError(f"{path}: {state}: its header says the file has {8 + n + end} bytes, it has {size}")
    return Header(path, 8 + n, tensors, metadata)


def _entry(path: Path, name: str, entry) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise KTChatError(f"{where}: corrupt header entry {entry!r}")
    dtype = dtype_named(entry.get("dtype"), where)
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(_count(d) for d in shape):
        raise KTChatError(f"{where}: corrupt header entry: shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise KTChatError(f"{where}: corrupt header entry: data_offsets {offsets!r}")
    want = dtype.nbytes(shape)
    if want != offsets[1] - offsets[0]:
        raise KTChatError(f"{where}: {dtype.name} {shape} takes {want if want is not None else 'no whole number of'} "
                          f"bytes, the header gives it {offsets[1] - offsets[0]}")
    return TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])


def _count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_shard_index(index) -> dict[str, Path]:
    """tensor name -> shard file, from a safetensors shard index; one clear error for a malformed index or a
    shard it lists that is not there."""
    index = Path(index)
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: index.parent / file for name, file in weight_map.items() if isinstance(file, str)}
        if len(files) != len(weight_map) or not files:
            raise ValueError("weight_map must map tensor names to file names, and name at least one")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:  # AttributeError: not a mapping
        raise KTChatError(f"{index}: cannot read shard index ({exc})") from None
    for file in sorted(set(files.values())):
        if not file.is_file():
            raise KTChatError(f"{index}: lists shard {file.name}, which is missing ({file})")
    return files


@dataclass(frozen=True)
class Checkpoint:
    """A model folder's safetensors files, with every header read and checked."""

    index: Path | None  # model.safetensors.index.json, or None for a single model.safetensors
    files: dict[str, Path]  # tensor name -> the file that holds it
    headers: dict[Path, Header]  # in shard order

    @property
    def shards(self) -> list[Path]:
        return list(self.headers)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """name -> shape of every tensor in the files (an index may list fewer)."""
        return {name: t.shape for h in self.headers.values() for name, t in h.tensors.items()}


def open_checkpoint(model_dir) -> Checkpoint:
    """The folder's model.safetensors.index.json and its shards, or its model.safetensors; every header checked,
    and every tensor the index lists found in the shard it names."""
    model_dir = Path(model_dir)
    index, single = model_dir / SHARD_INDEX, model_dir / SINGLE_FILE
    if index.is_file():
        files = read_shard_index(index)
        headers = {f: read_header(f) for f in sorted(set(files.values()))}
        for name, file in files.items():
            if name not in headers[file].tensors:
                raise KTChatError(f"{index}: lists {name} in {file.name}, which does not hold it")
        return Checkpoint(index, files, headers)
    if single.is_file():
        header = read_header(single)
        return Checkpoint(None, dict.fromkeys(header.tensors, single), {single: header})
    raise KTChatError(f"{model_dir}: no safetensors checkpoint found ({SINGLE_FILE} or {SHARD_INDEX})")


@contextlib.contextmanager
def staged_output(out, overwrite: bool = False):
    """Yields an empty folder beside `out` that replaces `out` once the block succeeds; on any error `out` stays
    as it was. The folder is made first, so an unwritable destination is one line naming it before the slow work."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise KTChatError(f"{out}: exists and is not empty (pass --overwrite to replace it)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as exc:
        raise KTChatError(f"{out}: cannot write the output folder there ({exc.strerror or exc})") from None
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- quantized modules: which tensors of a checkpoint make up one quantized weight ----


@dataclass(frozen=True)
class QuantizedModule:
    """One quantized linear of the checkpoint: its on-disk module name and its tensors, role -> on-disk name."""

    module: str
    names: dict[str, str]  # "data", "scale", ("shape") -> e.g. model.layers.1.mlp.experts.0.up_proj.weight_scale_inv


@dataclass(frozen=True)
class QuantLayout:
    """A checkpoint's quantized modules as its config.quantization_config and its headers say, checked on the
    headers alone (no tensor read): every quantized tensor has the others its format needs, nothing is left over."""

    scheme: object  # ktchat.formats.quant.QuantScheme, or None for an unquantized checkpoint
    modules: dict[str, QuantizedModule]  # by on-disk module name
    member: dict[str, str]  # on-disk tensor name -> the module it belongs to

    def __bool__(self) -> bool:
        return bool(self.modules)

    def assemble(self, module: str, tensors: dict, where: str):
        """The QuantizedWeight of `module` from its tensors (role -> torch tensor); one error naming `where`."""
        from .quant import QuantizedWeight

        fmt = self.scheme.fmt
        try:
            q = fmt.from_tensors(tensors, self.scheme.block)
            if not isinstance(q, QuantizedWeight):
                raise KTChatError(f"format {fmt.name} built {type(q).__name__}")
            return q
        except KTChatError as exc:
            raise KTChatError(f"{where}: {exc}") from None


def quant_layout(checkpoint: Checkpoint, quantization_config, where: str) -> QuantLayout:
    """Groups the checkpoint's quantized tensors by module (quantization_config as config.json has it; `where` names
    that file). Refuses, naming the file and tensor: a quantized tensor without a quantization_config, or of another
    format than it names; a weight whose scales are missing (its values would load as if unscaled) or scales
    without their weight; a module quantized that the config's `ignore` leaves unquantized; scales whose shape does
    not fit the weight and block."""
    from . import quant

    scheme = quant.scheme_of(quantization_config, where)
    fmt = scheme.fmt if scheme else None
    own = {suffix: role for role, suffix in fmt.tensors.items()} if fmt else {}
    others = {s: f for s, (f, _) in quant.suffixes().items() if s not in own and s != "weight"}
    data_dtypes = {st_name(d) for d in fmt.data_dtypes} if fmt else set()
    said = f"quantization_config names {scheme.format}" if scheme else "config.json has no quantization_config"
    groups: dict[str, dict[str, str]] = {}
    for name, file in checkpoint.files.items():
        info = checkpoint.headers[file].tensors[name]
        module, _, suffix = name.rpartition(".")
        loc = f"{file.name}: {name}"
        role = own.get(suffix)
        if role == "data" and info.dtype.name not in data_dtypes:
            role = None  # an unquantized weight (fp8's data suffix is every weight's)
        if role is None:
            if info.dtype.narrow and suffix == "weight":
                raise KTChatError(f"{loc}: stored as {info.dtype.name}, a quantized dtype, but {said}: its values "
                                  "would load without their scales")
            if suffix in others:
                raise KTChatError(f"{loc}: a {others[suffix]} quantization tensor, but {said}")
            continue
        groups.setdefault(module, {})[role] = name
    modules, member = {}, {}
    for module, names in groups.items():
        loc = f"{checkpoint.files[next(iter(names.values()))].name}: {module}"
        if "data" not in names:
            have = ", ".join(sorted(n.rpartition(".")[2] for n in names.values()))
            raise KTChatError(f"{loc}.{fmt.tensors['data']}: missing or not {'/'.join(sorted(data_dtypes))}, but the "
                              f"checkpoint holds its {have}")
        missing = [fmt.tensors[r] for r in fmt.required if r not in names]
        if missing:
            raise KTChatError(f"{loc}: its {fmt.name} weight is in the checkpoint but {module}.{missing[0]} is not "
                              "(the values cannot be used without it)")
        if scheme.ignores(module):
            raise KTChatError(f"{loc}: stored quantized, but quantization_config.ignore leaves it unquantized")
        problem = _header_problem(fmt.name, scheme.block, {r: checkpoint.headers[checkpoint.files[n]].tensors[n]
                                                           for r, n in names.items()})
        if problem:
            raise KTChatError(f"{loc}: {problem}")
        modules[module] = QuantizedModule(module, names)
        member.update(dict.fromkeys(names.values(), module))
    return QuantLayout(scheme, modules, member)


def _header_problem(fmt: str, block: tuple[int, int], infos: dict[str, TensorInfo]) -> str | None:
    """Scale shape against the weight's, from the headers (int4's input size is known only from weight_shape's
    value: checked within what its packed words allow, exactly once read)."""
    data, scale = infos["data"].shape, infos["scale"].shape
    if len(data) != 2 or len(scale) != 2:
        return f"weight {list(data)} and scale {list(scale)} must both be 2-D"
    if not infos["scale"].dtype.floating:
        return f"scale stored as {infos['scale'].dtype.name}, not a float"
    rows = -(-data[0] // block[0])
    if fmt == "fp8":
        cols = (-(-data[1] // block[1]),) * 2
    elif fmt == "int4":
        cols = (-(-(8 * data[1] - 7) // block[1]), -(-(8 * data[1]) // block[1]))
    else:
        return None  # formats added later check their own shapes on read
    if scale[0] != rows or not cols[0] <= scale[1] <= cols[1]:
        want = f"[{rows}, {cols[0]}]" if cols[0] == cols[1] else f"[{rows}, {cols[0]}..{cols[1]}]"
        return f"scale shape {list(scale)} does not fit weight {list(data)} in blocks {list(block)} (expected {want})"
    return None
