"""`ktchat export`: the base checkpoint with every LoRA folded in, for servers without LoRA support.

W' = W + scale * B @ A, computed in fp32 and stored in the base dtype (or `dtype`), under the base's own key
names and shard files, so vLLM, SGLang, kt-kernel or plain transformers load it as they load the base. Shards
are streamed tensor by tensor: untouched tensors are copied byte for byte, memory stays at one tensor plus
the current layer's expert LoRA. Everything is checked against the checkpoint's headers before a byte is written.
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
import tempfile
from functools import lru_cache
from pathlib import Path

from ..adapter import GENERIC_EXPERTS, ExpertPath, check_channels, read_adapter, split_channels
from ..errors import KTChatError
from .loader import SHARD_INDEX as INDEX_NAME
from .loader import read_shard_index

logger = logging.getLogger(__name__)

_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
          "F8_E4M3": 1, "F8_E5M2": 1}
_ST_DTYPE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_CHUNK = 64 << 20


def read_header(path: Path) -> tuple[int, dict]:
    """(data start offset, header dict) of a safetensors file, from its first bytes only."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100 << 20:
                raise ValueError(f"header length {n} is not plausible")
            return 8 + n, json.loads(f.read(n))
    except (OSError, struct.error, ValueError) as exc:
        raise KTChatError(f"{path}: cannot read safetensors header ({exc})") from None


def shard_files(model_dir: Path) -> list[Path]:
    index = model_dir / INDEX_NAME
    if index.is_file():
        return sorted(set(read_shard_index(index).values()))
    if (model_dir / "model.safetensors").is_file():
        return [model_dir / "model.safetensors"]
    raise KTChatError(f"{model_dir}: no safetensors checkpoint found (model.safetensors or {INDEX_NAME})")


def expert_path_for(model_dir: Path) -> ExpertPath:
    """The registry's expert naming for the base's model_type, else the generic DeepSeek/Qwen/Mixtral names."""
    from .registry import ARCHS

    try:
        model_type = json.loads((model_dir / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise KTChatError(f"{model_dir / 'config.json'}: cannot read the base model's config ({exc})") from None
    arch = ARCHS.get(model_type)
    return arch.expert_path if arch else GENERIC_EXPERTS


class CheckpointShapes:
    """The base model's shapes from its safetensors headers (no weights loaded), as `BaseShapes`."""

    def __init__(self, model_dir: Path, experts: ExpertPath):
        self.files = shard_files(Path(model_dir))
        self.headers = {f: read_header(f)[1] for f in self.files}
        self.shapes = {k: v["shape"] for h in self.headers.values() for k, v in h.items() if k != "__metadata__"}
        self.experts: dict[int, dict[tuple[int, str], list]] = {}
        for key, shape in self.shapes.items():
            where = experts.parse(key.removesuffix(".weight")) if key.endswith(".weight") else None
            if where is not None:
                self.experts.setdefault(where[0], {})[where[1:]] = shape

    def linear(self, name: str):
        shape = self.shapes.get(f"{name}.weight")
        if shape is None:
            return "which is not a weight of the base checkpoint"
        if len(shape) != 2:
            return f"whose weight has shape {shape}; only Linear layers are supported"
        return shape[1], shape[0]

    def routed(self, layer: int):
        found = self.experts.get(layer)
        if not found or (0, "gate") not in found:
            return None
        inter, hidden = found[(0, "gate")]
        return len({e for e, _ in found}), hidden, inter


def export_merged(model_dir, adapter_dir, out_dir, *, dtype: str | None = None, overwrite: bool = False) -> dict:
    """Writes the merged checkpoint to `out_dir`; returns a summary (modules merged, bytes written)."""
    model_dir, out = Path(model_dir), Path(out_dir)
    if dtype not in (None, *_ST_DTYPE):
        raise KTChatError(f"--dtype must be one of {', '.join(_ST_DTYPE)}, got {dtype!r}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise KTChatError(f"{out}: exists and is not empty (pass --overwrite to replace it)")
    experts = expert_path_for(model_dir)
    adapter = read_adapter(adapter_dir)
    channels = split_channels(adapter, experts)
    base = CheckpointShapes(model_dir, experts)
    check_channels(adapter, channels, base)
    merge = Merger(adapter, channels, experts)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        total = _write_all(model_dir, base, merge, tmp, dtype)
        merge.check_all_used()
        _copy_side_files(model_dir, tmp, base, total, dtype)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"merged_modules": len(merge.used), "bytes": total, "shards": len(base.files)}


class Merger:
    """key -> merged tensor for every base weight an adapter touches; remembers what it used."""

    def __init__(self, adapter, channels, experts: ExpertPath):
        self.adapter, (self.peft, self.routed), self.experts = adapter, channels, experts
        self.used: set = set()
        self._stacked = lru_cache(maxsize=3)(lambda key: self.routed[key].stack(_torch().float32))

    def lora_for(self, key: str):
        """(A, B, scale) for base tensor `key`, or None."""
        module = key.removesuffix(".weight")
        if not key.endswith(".weight"):
            return None
        if module in self.peft:
            m = self.peft[module]
            t = self.adapter.weights.load([m.a_key, m.b_key])
            self.used.add(module)
            return t[m.a_key], t[m.b_key], m.scale
        where = self.experts.parse(module)
        if where is None or (where[0], where[2]) not in self.routed:
            return None
        layer, e, proj = where
        s = self._stacked((layer, proj))
        self.used.add((layer, e, proj))
        return s.a[e], s.b[e], s.scale

    def check_all_used(self) -> None:
        want = set(self.peft) | {(lyr, e, p) for (lyr, p), g in self.routed.items() for e in range(g.num_experts)}
        missing = sorted(map(str, want - self.used))
        if missing:
            raise KTChatError(f"{self.adapter.path}: {len(missing)} LoRA modules found no base weight to merge into "
                              f"(first: {missing[0]})")


def _torch():
    import torch

    return torch


def _write_all(model_dir: Path, base: CheckpointShapes, merge: Merger, out: Path, dtype: str | None) -> int:
    from tqdm.auto import tqdm

    size = sum(f.stat().st_size for f in base.files)
    written = 0
    with tqdm(total=size, desc="Exporting", unit="B", unit_scale=True, disable=None) as bar:
        for src in base.files:
            written += _write_shard(src, out / src.name, merge, dtype, bar)
    return written


def _write_shard(src: Path, dst: Path, merge: Merger, dtype: str | None, bar) -> int:
    """Streams one shard: same keys and order; merged or re-typed tensors rewritten, the rest copied raw."""
    from safetensors import safe_open

    start, header = read_header(src)
    meta = header.pop("__metadata__", None)
    names = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    new, offset = {}, 0
    for name in names:
        entry = dict(header[name])
        if dtype and entry["dtype"] in _ST_DTYPE.values():
            entry["dtype"] = _ST_DTYPE[dtype]
        n = _BYTES[entry["dtype"]] * _numel(entry["shape"])
        entry["data_offsets"] = [offset, offset + n]
        new[name], offset = entry, offset + n
    text = json.dumps({**({"__metadata__": meta} if meta else {}), **new}, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(dst, "wb") as out, open(src, "rb") as raw, safe_open(str(src), framework="pt") as f:
        out.write(struct.pack("<Q", len(text)) + text)
        for name in names:
            old = header[name]
            lora = merge.lora_for(name)
            if lora is None and new[name]["dtype"] == old["dtype"]:
                _copy_raw(raw, out, start + old["data_offsets"][0], old["data_offsets"][1] - old["data_offsets"][0])
            else:
                _write_tensor(out, _merged(f.get_tensor(name), lora, new[name]["dtype"]))
            bar.update(old["data_offsets"][1] - old["data_offsets"][0])
    return offset


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _merged(weight, lora, st_dtype: str):
    """W + scale * B @ A in fp32, then the target dtype; or only the dtype change."""
    torch = _torch()
    target = {v: getattr(torch, k) for k, v in _ST_DTYPE.items()}.get(st_dtype, weight.dtype)
    if lora is None:
        return weight.to(target)
    a, b, scale = lora
    return torch.addmm(weight.float(), b.float(), a.float(), alpha=scale).to(target)


def _write_tensor(out, tensor) -> None:
    torch = _torch()
    out.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)


def _copy_raw(raw, out, offset: int, length: int) -> None:
    raw.seek(offset)
    while length > 0:
        chunk = raw.read(min(_CHUNK, length))
        if not chunk:
            raise KTChatError(f"{raw.name}: file is shorter than its header says")
        out.write(chunk)
        length -= len(chunk)


def _copy_side_files(model_dir: Path, out: Path, base: CheckpointShapes, total: int, dtype: str | None) -> None:
    """config, tokenizer, generation config and the rest as they are; the index with the new total size."""
    for f in model_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != INDEX_NAME:
            shutil.copy2(f, out / f.name)
    if (model_dir / INDEX_NAME).is_file():
        index = json.loads((model_dir / INDEX_NAME).read_text())
        index.setdefault("metadata", {})["total_size"] = total
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    if dtype and (out / "config.json").is_file():
        config = json.loads((out / "config.json").read_text())
        for key in ("torch_dtype", "dtype"):
            if key in config:
                config[key] = dtype
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
