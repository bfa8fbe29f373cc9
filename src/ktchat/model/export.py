"""`ktchat export`: the base checkpoint with every LoRA folded in, for servers without LoRA support.

W' = W + scale * B @ A, computed in fp32 and stored in the base dtype (or `dtype`), under the base's own key
names and shard files, so vLLM, SGLang, kt-kernel or plain transformers load it as they load the base. Shards
are streamed tensor by tensor: untouched tensors are copied byte for byte, memory stays at one tensor plus
the current layer's expert LoRA. Everything is checked against the checkpoint's headers before a byte is written.

Quantized bases (config.json's quantization_config: DeepSeek-V3's block FP8, compressed-tensors INT4;
ktchat.formats.quant):
`format="bf16"` (the default) writes every quantized weight dequantized (exact, fp32) with its LoRA merged, as
`<module>.weight` in bf16 (or `dtype`), and drops quantization_config: the checkpoint any server loads, about 2 bytes
per parameter on disk (DeepSeek-V3 671B: ~1.3 TB, against ~0.7 TB in FP8). `format="base"` keeps the base's format:
weights without LoRA are copied byte for byte, those with LoRA are dequantized, merged in fp32 and quantized again
in the same format and blocks (one more rounding to the format's grid), so the export is the base's size. Either way
memory stays at one weight in fp32 (a 7168 x 2048 expert: 59 MB) plus the layer's expert LoRA.

Dtypes: without `dtype`, every tensor keeps the dtype it has on disk. With `dtype` (one of `COMPUTE_DTYPES`), the
tensors stored in a compute dtype (F32, BF16, F16) are stored in it; every other tensor is copied byte for byte:
integers and bools (token ids, packed int4 weights, masks), F64, complex, and the 8-bit and smaller floats (F8_E4M3,
F8_E5M2, F8_E8M0, ...), because a quantized tensor means something only with the scales stored beside it, and a
cast would write a checkpoint whose scales no longer apply. For the same reason LoRA is merged only into weights
stored in F64/F32/BF16/F16 or in a quantized format ktchat reads: an adapter on any other quantized weight (an MLX
U32 weight, an F8 weight without a quantization_config) is refused, with its name, before anything is written.
"""

from __future__ import annotations

import json
import logging
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Callable

from ..adapter import check_channels, merge_lora, read_adapter, split_channels
from ..errors import KTChatError
from ..formats import EXPORT_FORMATS
from ..formats.checkpoint import (BY_TORCH_NAME, COMPUTE_DTYPES, SHARD_INDEX, DType, Header, QuantLayout,
                                  TensorInfo, open_checkpoint, quant_layout, st_name, staged_output)
from ..formats.quant import quantization_config
from .registry import FUSED_PROJS, MoEArch, arch_named

logger = logging.getLogger(__name__)

_CHUNK = 64 << 20
MERGE_INTO = tuple(d.name for d in BY_TORCH_NAME.values() if d.floating and not d.narrow)  # F32, BF16, F16, F64
FORMATS = EXPORT_FORMATS  # a quantized base's export: dequantized (the default), or in the base's own format


def read_base_config(model_dir: Path) -> tuple[MoEArch, dict | None]:
    """The base's family from its config.json (a model_type ktchat does not know is refused, as load_model refuses
    it) and its quantization_config."""
    path = model_dir / "config.json"
    try:
        config = json.loads(path.read_text())
        model_type = config.get("model_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise KTChatError(f"{path}: cannot read the base model's config ({exc})") from None
    return arch_named(model_type), quantization_config(config)


class CheckpointShapes:
    """The base model's shapes from its safetensors headers (no weights loaded), as `BaseShapes`; a quantized
    module's `<module>.weight` has its logical shape (compressed-tensors' from its small weight_shape tensor)."""

    def __init__(self, model_dir: Path, arch: MoEArch, qc: dict | None):
        """`qc`: config.json's quantization_config (read_base_config)."""
        checkpoint = open_checkpoint(model_dir)
        self.headers: dict[Path, Header] = checkpoint.headers
        self.files = checkpoint.files
        self.layout: QuantLayout = quant_layout(checkpoint, qc, str(model_dir / "config.json"))
        self.shapes = {arch.module_name(k): list(shape) for k, shape in checkpoint.shapes().items()}
        self.quantized_shapes: dict[str, tuple[int, int]] = {}  # on-disk module -> logical [out, in]
        with _Reader() as read:
            for module, qm in self.layout.modules.items():
                if "shape" in qm.names:
                    shape = tuple(read(self.files[qm.names["shape"]], qm.names["shape"]).tolist())
                else:
                    shape = tuple(checkpoint.shapes()[qm.names["data"]])
                self.quantized_shapes[module] = shape
                self.shapes[arch.module_name(f"{module}.weight")] = list(shape)
        self.experts: dict[int, dict[tuple[int, str], list]] = {}
        for key, shape in self.shapes.items():
            if (where := arch.expert_weight(key)) is not None:
                self.experts.setdefault(where[0], {})[where[1:]] = shape
            elif (fused := arch.fused_experts(key)) is not None and len(shape) == 3:
                e, out, inp = (shape[0], shape[2], shape[1]) if arch.fused_transposed else shape
                projs = FUSED_PROJS[fused[1]]
                for i in range(e):
                    for proj in projs:
                        self.experts.setdefault(fused[0], {})[(i, proj)] = [out // len(projs), inp]

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


def export_merged(model_dir, adapter_dir, out_dir, *, dtype: str | None = None, format: str = "bf16",
                  overwrite: bool = False) -> dict:
    """Writes the merged checkpoint to `out_dir`; returns a summary (modules merged, bytes written). `format`
    matters for a quantized base only (module docstring)."""
    model_dir, out = Path(model_dir), Path(out_dir)
    if dtype not in (None, *COMPUTE_DTYPES):
        raise KTChatError(f"--dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {dtype!r}")
    if format not in FORMATS:
        raise KTChatError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    with staged_output(out, overwrite) as tmp:
        arch, qc = read_base_config(model_dir)
        adapter = read_adapter(adapter_dir)
        channels = split_channels(adapter, arch.expert_path)
        base = CheckpointShapes(model_dir, arch, qc)
        check_channels(adapter, channels, base)
        merge = Merger(adapter, channels, arch)
        _check_merge_dtypes(base, merge)
        quant = QuantExport(base, merge, format, dtype)
        total, weight_map = _write_all(base, merge, tmp, dtype, quant)
        merge.check_all_used()
        _copy_side_files(model_dir, tmp, total, dtype, weight_map, dequantized=bool(base.layout) and format == "bf16")
    return {"merged_modules": len(merge.used), "bytes": total, "shards": len(base.headers)}


class Merger:
    """key -> merged tensor for every base weight an adapter touches; remembers what it used."""

    def __init__(self, adapter, channels, arch: MoEArch):
        self.adapter, (self.peft, self.routed), self.arch = adapter, channels, arch
        self.used: set = set()
        self._stacked = lru_cache(maxsize=3)(lambda key: self.routed[key].stack(_torch().float32))

    def target(self, key: str):
        """The PEFT module name or routed (layer, expert, proj) the adapter merges into base tensor `key` (on-disk
        name), or None."""
        if (fused := self._fused(key)) is not None:
            return fused
        key = self.arch.module_name(key)
        if key.endswith(".weight") and (module := key.removesuffix(".weight")) in self.peft:
            return module
        where = self.arch.expert_weight(key)
        return where if where is not None and (where[0], where[2]) in self.routed else None

    def lora_for(self, key: str):
        """(A, B, scale) for base tensor `key`, or None."""
        if self.is_fused(key):  # merged_fused does those
            return None
        where = self.target(key)
        if where is None:
            return None
        if isinstance(where, str):
            m = self.peft[where]
            t = self.adapter.weights.load([m.a_key, m.b_key])
            self.used.add(where)
            return t[m.a_key], t[m.b_key], m.scale
        layer, e, proj = where
        s = self._stacked((layer, proj))
        self.used.add((layer, e, proj))
        return s.a[e], s.b[e], s.scale

    def is_fused(self, key: str) -> bool:
        return self._fused(key) is not None

    def _fused(self, key: str) -> tuple[int, str] | None:
        """(layer, name) for a fused expert tensor the adapter has routed LoRA for."""
        where = self.arch.fused_experts(self.arch.module_name(key))
        return where if where and any((where[0], p) in self.routed for p in FUSED_PROJS[where[1]]) else None

    def merged_fused(self, key: str, weight):
        """A fused expert tensor (is_fused) with every expert's LoRA merged in (fp32), in its stored layout."""
        layer, name = self._fused(key)
        merged = weight.float().clone()
        w = merged.transpose(1, 2) if self.arch.fused_transposed else merged  # a view [E, out, in]
        projs = FUSED_PROJS[name]
        for proj, part in zip(projs, w.chunk(len(projs), dim=1)):
            if (layer, proj) in self.routed:
                s = self._stacked((layer, proj))
                part.copy_(merge_lora(part, s.a, s.b, s.scale))
                self.used.update((layer, e, proj) for e in range(part.shape[0]))
        return merged

    def check_all_used(self) -> None:
        want = set(self.peft) | {(lyr, e, p) for (lyr, p), g in self.routed.items() for e in range(g.num_experts)}
        missing = sorted(map(str, want - self.used))
        if missing:
            raise KTChatError(f"{self.adapter.path}: {len(missing)} LoRA modules found no base weight to merge into "
                              f"(first: {missing[0]})")


def _torch():
    import torch

    return torch


def _check_merge_dtypes(base: CheckpointShapes, merge: Merger) -> None:
    """Refuses LoRA on a weight stored quantized (F8) or as integers, before anything is written."""
    for file, header in base.headers.items():
        for name, t in header.tensors.items():
            if name in base.layout.member:
                continue  # dequantized to merge (QuantExport)
            if t.dtype.name not in MERGE_INTO and merge.target(name) is not None:
                raise KTChatError(f"{file}: {name} is stored as {t.dtype.name}, and export merges LoRA only into "
                                  f"{', '.join(MERGE_INTO)} weights and the formats of a quantization_config ktchat "
                                  "reads (dequantize the base model first)")


class QuantExport:
    """What export writes for each tensor of a quantized module: in "bf16", the module's data tensor becomes its
    merged, dequantized `<module>.weight` and its other tensors go; in "base", a module with LoRA is merged and
    quantized again in the same format and block, one without is copied."""

    def __init__(self, base: CheckpointShapes, merge: Merger, format: str, dtype: str | None):
        self.base, self.merge, self.format = base, merge, format
        self.out_dtype = BY_TORCH_NAME[dtype or "bfloat16"]
        self._read = _Reader()
        self._requantized: dict[str, dict] = {}

    def close(self) -> None:
        self._read.close()

    def items(self, name: str, t: TensorInfo) -> list[tuple[str, DType, list, Callable | None]]:
        """(out name, dtype, shape, producer: () -> tensor, or None to copy the stored bytes) for tensor `name`."""
        module = self.base.layout.member[name]
        qm = self.base.layout.modules[module]
        has_lora = self.merge.target(f"{module}.weight") is not None
        if self.format == "bf16":
            if name != qm.names["data"]:
                return []
            shape = list(self.base.quantized_shapes[module])
            return [(f"{module}.weight", self.out_dtype, shape, lambda: self._merged(module).to(self.out_dtype.torch))]
        if not has_lora:
            return [(name, t.dtype, list(t.shape), None)]
        role = next(r for r, n in qm.names.items() if n == name)
        return [(name, t.dtype, list(t.shape), lambda: self._requantize(module, role, t))]

    def _weight(self, module: str):
        qm = self.base.layout.modules[module]
        tensors = {r: self._read(self.base.files[n], n) for r, n in qm.names.items()}
        return self.base.layout.assemble(module, tensors, f"{self.base.files[qm.names['data']].name}: {module}")

    def _merged(self, module: str):
        """The module's weight, dequantized in fp32, with its LoRA (if any) added in fp32."""
        torch = _torch()
        w = self._weight(module).dequantize(torch.float32)
        lora = self.merge.lora_for(f"{module}.weight")
        return w if lora is None else merge_lora(w, *lora)

    def _requantize(self, module: str, role: str, t: TensorInfo):
        from ..formats import quant

        if module not in self._requantized:
            scheme = self.base.layout.scheme
            q = quant.quantize(scheme.format, self._merged(module), scheme.block)
            self._requantized[module] = {r: q.tensors(module)[n] for r, n in
                                         self.base.layout.modules[module].names.items()}
        tensor = self._requantized[module][role]
        if len(self._requantized[module]) == 1:
            del self._requantized[module]
        else:
            del self._requantized[module][role]
        if st_name(tensor.dtype) != t.dtype.name:
            tensor = tensor.to(t.dtype.torch)  # e.g. scales stored in F32 where the format makes BF16
        if list(tensor.shape) != list(t.shape):
            raise KTChatError(f"{module}: re-quantized {role} has shape {list(tensor.shape)}, the base {list(t.shape)}")
        return tensor


class _Reader:
    """Tensors by (file, name) from any shard, each file opened once."""

    def __init__(self):
        self._handles: dict[Path, object] = {}

    def __call__(self, file: Path, name: str):
        from safetensors import safe_open

        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt").__enter__()
        return self._handles[file].get_tensor(name)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _write_all(base: CheckpointShapes, merge: Merger, out: Path, dtype: str | None,
               quant: QuantExport) -> tuple[int, dict[str, str]]:
    from tqdm.auto import tqdm

    size = sum(f.stat().st_size for f in base.headers)
    written, weight_map = 0, {}
    try:
        with tqdm(total=size, desc="Exporting", unit="B", unit_scale=True, disable=None) as bar:
            for header in base.headers.values():
                n, names = _write_shard(header, out / header.path.name, merge, dtype, bar, base.layout, quant)
                written += n
                weight_map.update(dict.fromkeys(names, header.path.name))
    finally:
        quant.close()
    return written, weight_map


def _stored_as(t: TensorInfo, dtype: str | None) -> DType:
    """The dtype a tensor is written in: `dtype` for tensors in a compute dtype, else its own (module docstring)."""
    return BY_TORCH_NAME[dtype] if dtype and t.dtype.compute else t.dtype


def _write_shard(header: Header, dst: Path, merge: Merger, dtype: str | None, bar, layout: QuantLayout,
                 quant: QuantExport) -> tuple[int, list[str]]:
    """Streams one shard: same keys and order (a quantized module exported dequantized: its weight where its
    values were, its scales gone); merged or re-typed tensors rewritten, the rest copied raw."""
    from safetensors import safe_open

    src = header.path
    items = []  # (name, tensor info, out name, out dtype, out shape, producer or None)
    for name, t in header.tensors.items():
        if name in layout.member:
            items += [(name, t, *item) for item in quant.items(name, t)]
        else:
            items.append((name, t, name, _stored_as(t, dtype), list(t.shape), False))
    new, offset = {}, 0
    for _, _, out_name, stored, shape, _ in items:
        end = offset + stored.nbytes(shape)
        new[out_name], offset = {"dtype": stored.name, "shape": shape, "data_offsets": [offset, end]}, end
    meta = {"__metadata__": header.metadata} if header.metadata else {}
    text = json.dumps({**meta, **new}, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(dst, "wb") as out, open(src, "rb") as raw, safe_open(str(src), framework="pt") as f:
        out.write(len(text).to_bytes(8, "little") + text)
        for name, t, _, stored, _, produce in items:
            if produce:  # a quantized module's merged or re-quantized tensor
                _write_tensor(out, produce())
            elif produce is None:  # a quantized tensor kept as it is
                _copy_raw(raw, out, header.data_start + t.start, t.nbytes)
            elif merge.is_fused(name):
                _write_tensor(out, merge.merged_fused(name, f.get_tensor(name)).to(stored.torch))
            elif (lora := merge.lora_for(name)) is None and stored is t.dtype:
                _copy_raw(raw, out, header.data_start + t.start, t.nbytes)
            else:
                _write_tensor(out, _merged(f.get_tensor(name), lora, stored))
        for _, t in header.tensors.items():
            bar.update(t.nbytes)
    return offset, list(new)


def _merged(weight, lora, stored: DType):
    """merge_lora (A, B, scale) stored in `stored`; or only the dtype change."""
    return weight.to(stored.torch) if lora is None else merge_lora(weight, *lora, dtype=stored.torch)


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


def _copy_side_files(model_dir: Path, out: Path, total: int, dtype: str | None, weight_map: dict[str, str],
                     dequantized: bool) -> None:
    """config, tokenizer, generation config and the rest as they are; the index with the new total size (and the
    names written, where dequantized modules changed them); a dequantized export's config without its
    quantization_config and in the dtype written."""
    for f in model_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != SHARD_INDEX:
            shutil.copy2(f, out / f.name)
    if (model_dir / SHARD_INDEX).is_file():
        index = json.loads((model_dir / SHARD_INDEX).read_text())
        index.setdefault("metadata", {})["total_size"] = total
        if dequantized:
            index["weight_map"] = dict(sorted(weight_map.items()))
        (out / SHARD_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    if (dtype or dequantized) and (out / "config.json").is_file():
        config = json.loads((out / "config.json").read_text())
        for c in (config, config.get("text_config") or {}):
            if dequantized:
                c.pop("quantization_config", None)
            for key in ("torch_dtype", "dtype"):
                if key in c:
                    c[key] = dtype or "bfloat16"
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
