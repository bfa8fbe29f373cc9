"""KT's pre-converted routed INT8 experts (`kt_weight_path`, the adapter manifest's `int8_experts`), read as they are.

kt_kernel's INT8 experts are quantized once (from the bf16 base) and kept as a tree of `.kt` files that training
and KTransformers load directly, with their own manifest (`kt-weight-manifest.json`, schema 2; the older
`kt-ephemeral-manifest.json`, schema 1, has no hashes). The layout, as kt_kernel 0.7.2 writes it:

    _layer_<L>/_numa_<n>/INT8_<gate|up|down>_<expert>_<bytes>Byte_<quant|scale>_.kt

- quant: int8 values of one NUMA slice in the kernel's tiles ("kt-int8-n32-k64-vnni-v1"): per group of 64 output
  rows, per block of 3584 inputs, per 32 rows: for each 64 inputs, each half of 16 rows: 16 groups of 4 inputs x
  16 rows x 4 inputs (`pack`);
- scale: fp32, one per output row of the slice (kt's rule: amax * (1/127), quant.kt_int8);
- slices: gate and up split their output rows over the NUMA pools, down its inputs (so down has one scale per
  row per slice).

`KTInt8Experts` checks the whole tree against its manifest before any weight is read (every key, file, size; the
sha256 of each file as it is read) and yields one `QuantizedWeight("int8")` per expert projection, row-major:
the same bytes training ran on. `write_int8_experts` makes such a tree for tests and conversion, with kt_kernel's
own quantize-and-save path where this CPU's build has it (AMXInt8_MOE), else our writer of the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import sha256_file
from ..errors import KTChatError
from . import PROJS
from .quant import QuantizedWeight, kt_int8

MANIFEST_NAME = "kt-weight-manifest.json"
LEGACY_MANIFEST_NAME = "kt-ephemeral-manifest.json"
SCHEMA_VERSION = 2
LAYOUT = "kt-int8-n32-k64-vnni-v1"
_FILE = re.compile(rf"^INT8_({'|'.join(PROJS)})_(\d+)_(\d+)Byte_(quant|scale)_\.kt$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
TILE_ROWS, TILE_COLS = 32, 64
GROUP_ROWS, K_BLOCK = 64, 3584  # kt_kernel's outer blocking of a weight (rows, inputs)


def _blocks(rows: int, cols: int):
    """(row0, rows, col0, cols) of each tile in file order: groups of 64 rows; in each, blocks of 3584 inputs
    (the last one shorter); in each, the group's 32-row tiles. (Found by decoding kt_kernel's own files: one block
    of inputs up to 3584, so small layers are simply [32 rows][64 inputs] tiles in row order.)"""
    for g in range(0, rows, GROUP_ROWS):
        for c in range(0, cols, K_BLOCK):
            for r in range(g, min(g + GROUP_ROWS, rows), TILE_ROWS):
                yield r, TILE_ROWS, c, min(K_BLOCK, cols - c)


def _tile(block: torch.Tensor) -> torch.Tensor:
    """[32, k] -> its bytes: per 64 inputs, per half of 16 rows: 16 groups of 4 inputs x 16 rows x 4."""
    k = block.shape[1]
    return block.reshape(2, 16, k // 64, 16, 4).permute(2, 0, 3, 1, 4).reshape(-1)


def pack(values: torch.Tensor) -> torch.Tensor:
    """int8 [rows, cols] row-major -> kt_kernel's tile order (flat int8); rows % 32 == cols % 64 == 0."""
    n, k = values.shape
    return torch.cat([_tile(values[r:r + nr, c:c + nc]) for r, nr, c, nc in _blocks(n, k)])


def unpack(flat: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The inverse of `pack`: flat int8 in tile order -> [rows, cols] row-major."""
    out = torch.empty(rows, cols, dtype=flat.dtype)
    at = 0
    for r, nr, c, nc in _blocks(rows, cols):
        size = nr * nc
        out[r:r + nr, c:c + nc] = flat[at:at + size].reshape(nc // 64, 2, 16, 16, 4).permute(1, 3, 0, 2, 4).reshape(nr, nc)
        at += size
    return out


def file_name(proj: str, expert: int, nbytes: int, kind: str) -> str:
    return f"INT8_{proj}_{expert}_{nbytes}Byte_{kind}_.kt"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _slice_sizes(proj: str, hidden: int, inter: int, numa: int) -> dict[str, int]:
    """Bytes of one NUMA slice's quant and scale files."""
    per = inter // numa
    return {"quant": hidden * per, "scale": 4 * (hidden if proj == "down" else per)}


@dataclass
class KTInt8Experts:
    """A checked KT INT8 expert tree for one model shape; `weight()` reads one projection."""

    root: Path
    manifest_path: Path
    manifest: dict
    manifest_sha256: str
    num_experts: int
    hidden_size: int
    intermediate_size: int
    numa_count: int
    layers: tuple[int, ...]
    _files: dict = field(default_factory=dict, repr=False)  # (layer, numa, proj, expert, kind) -> (path, record)

    @property
    def fingerprint(self) -> str:
        """What kt_kernel records as int8_experts.fingerprint: the manifest's own, else its file's sha256."""
        return str(self.manifest.get("fingerprint") or self.manifest_sha256)

    @property
    def nbytes(self) -> int:
        return int(self.manifest.get("bytes", 0))

    def weight(self, layer: int, expert: int, proj: str) -> QuantizedWeight:
        h, i, numa = self.hidden_size, self.intermediate_size, self.numa_count
        per = i // numa
        parts, scales = [], []
        for n in range(numa):
            rows, cols = (h, per) if proj == "down" else (per, h)
            q = self._read(layer, n, proj, expert, "quant", torch.int8)
            parts.append(unpack(q, rows, cols))
            scales.append(self._read(layer, n, proj, expert, "scale", torch.float32))
        if proj == "down":  # input slices side by side, one scale column per slice
            return QuantizedWeight("int8", torch.cat(parts, 1).contiguous(), torch.stack(scales, 1), (1, per), (h, i))
        return QuantizedWeight("int8", torch.cat(parts, 0).contiguous(), torch.cat(scales)[:, None], (1, h), (i, h))

    def _read(self, layer, numa, proj, expert, kind, dtype) -> torch.Tensor:
        path, record = self._files[(layer, numa, proj, expert, kind)]
        data = path.read_bytes()
        if len(data) != record["size_bytes"]:
            raise KTChatError(f"{path}: {len(data)} bytes, {self.manifest_path.name} says {record['size_bytes']}")
        want = record.get("sha256")
        if want is not None and _sha256(data) != want:
            raise KTChatError(f"{path}: sha256 {_sha256(data)[:12]}... differs from {self.manifest_path.name} "
                              f"({want[:12]}...): the file changed since it was written")
        return torch.frombuffer(bytearray(data), dtype=dtype)


def open_int8_experts(root, *, num_experts: int, hidden_size: int, intermediate_size: int,
                      layers) -> KTInt8Experts:
    """Checks a KT INT8 tree against its manifest and this model's shape; one line naming the file/key per
    mismatch (the first one found)."""
    root = Path(root)
    if not root.is_dir():
        raise KTChatError(f"{root}: KT INT8 expert weights not found (int8_experts.path / kt_weight_path)")
    found = [root / n for n in (MANIFEST_NAME, LEGACY_MANIFEST_NAME) if (root / n).is_file()]
    if len(found) != 1:
        raise KTChatError(f"{root}: expected one of {MANIFEST_NAME} or {LEGACY_MANIFEST_NAME}, found "
                          f"{', '.join(p.name for p in found) or 'neither'}")
    path = found[0]
    raw_bytes = path.read_bytes()
    try:
        manifest = json.loads(raw_bytes)
    except ValueError as exc:
        raise KTChatError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise KTChatError(f"{path}: must be a JSON object")
    schema = manifest.get("schema_version")
    want_schema = SCHEMA_VERSION if path.name == MANIFEST_NAME else 1
    if schema != want_schema:
        raise KTChatError(f"{path}: schema_version {schema!r}, expected {want_schema} for {path.name}")
    expected = {"state": "ready", "expert_weight_format": "int8", "expert_num": num_experts,
                "hidden_size": hidden_size, "intermediate_size": intermediate_size}
    if schema == SCHEMA_VERSION:
        expected["layout"] = LAYOUT
    for key, value in expected.items():
        if manifest.get(key) != value:
            raise KTChatError(f"{path}: {key} is {manifest.get(key)!r}, expected {value!r} (this model / kt_kernel "
                              "0.7.2's INT8 layout)")
    numa = manifest.get("threadpool_count")
    if isinstance(numa, bool) or not isinstance(numa, int) or numa < 1 or intermediate_size % numa:
        raise KTChatError(f"{path}: threadpool_count {numa!r} must be a positive divisor of {intermediate_size}")
    if hidden_size % TILE_COLS or hidden_size % TILE_ROWS or (intermediate_size // numa) % TILE_COLS:
        raise KTChatError(f"{path}: hidden {hidden_size} / intermediate per NUMA slice {intermediate_size // numa} "
                          f"are not multiples of {TILE_COLS} (kt_kernel's INT8 tiles)")
    entries = manifest.get("layers")
    if not isinstance(entries, list):
        raise KTChatError(f"{path}: layers must be a list")
    have = sorted(e.get("index") for e in entries if isinstance(e, dict))
    want = sorted(layers)
    if have != want:
        raise KTChatError(f"{path}: layers {have} do not match the model's MoE layers {want}")
    experts = KTInt8Experts(root, path, manifest, _sha256(raw_bytes), num_experts, hidden_size, intermediate_size,
                            numa, tuple(want))
    total = 0
    for entry in entries:
        total += _check_layer(experts, entry, schema)
    if manifest.get("bytes") != total:
        raise KTChatError(f"{path}: bytes {manifest.get('bytes')!r}, the layers' files sum to {total}")
    return experts


def _check_layer(experts: KTInt8Experts, entry: dict, schema: int) -> int:
    path, layer = experts.manifest_path, entry["index"]
    where = f"{path}: layers[index={layer}]"
    if entry.get("state") != "ready" or entry.get("numa_count") != experts.numa_count:
        raise KTChatError(f"{where}: state {entry.get('state')!r} / numa_count {entry.get('numa_count')!r}, expected "
                          f"'ready' / {experts.numa_count}")
    files = entry.get("files")
    if not isinstance(files, list):
        raise KTChatError(f"{where}: files must be a list")
    seen, total = set(), 0
    for record in files:
        rel = record.get("path") if isinstance(record, dict) else None
        parts = Path(rel).parts if isinstance(rel, str) else ()
        match = _FILE.fullmatch(parts[-1]) if len(parts) == 3 else None
        numa = re.fullmatch(r"_numa_(\d+)", parts[1]) if len(parts) == 3 else None
        if not (match and numa and parts[0] == f"_layer_{layer}"):
            raise KTChatError(f"{where}: unexpected file entry {rel!r}")
        proj, expert, encoded, kind = match[1], int(match[2]), int(match[3]), match[4]
        n = int(numa[1])
        size = _slice_sizes(proj, experts.hidden_size, experts.intermediate_size, experts.numa_count)[kind]
        if n >= experts.numa_count or expert >= experts.num_experts or encoded != size or record.get("size_bytes") != size:
            raise KTChatError(f"{where}: {rel}: expected {size} bytes for expert < {experts.num_experts}, NUMA slice < "
                              f"{experts.numa_count} (name says {encoded}, manifest {record.get('size_bytes')!r})")
        if schema >= 2 and not (isinstance(record.get("sha256"), str) and _SHA256.fullmatch(record["sha256"])):
            raise KTChatError(f"{where}: {rel}: sha256 missing or malformed (schema {schema} records one per file)")
        file = experts.root / rel
        if not file.is_file():
            raise KTChatError(f"{file}: missing (listed in {path.name})")
        if file.stat().st_size != size:
            raise KTChatError(f"{file}: {file.stat().st_size} bytes, {path.name} says {size}")
        key = (layer, n, proj, expert, kind)
        if key in seen:
            raise KTChatError(f"{where}: {rel} listed twice")
        seen.add(key)
        experts._files[key] = (file, record)
        total += size
    missing = [(n, p, e, k) for n in range(experts.numa_count) for p in PROJS for e in range(experts.num_experts)
               for k in ("quant", "scale") if (layer, n, p, e, k) not in seen]
    if missing:
        n, p, e, k = missing[0]
        raise KTChatError(f"{where}: {len(missing)} files missing from the manifest (first: NUMA {n} expert {e} {p} {k})")
    if entry.get("bytes") != total:
        raise KTChatError(f"{where}: bytes {entry.get('bytes')!r}, its files sum to {total}")
    return total


# ---- writing (tests, conversion) ----


def write_int8_experts(root, layers: dict[int, dict[str, torch.Tensor]], *, writer=None) -> Path:
    """Writes {layer: {proj: [E, out, in] bf16 weights}} as a KT INT8 tree with a schema-2 manifest (one NUMA
    slice). `writer(root, layer, weights)` writes one layer's .kt files (experts.kt_backend.kt_int8_writer():
    kt_kernel's own quantize-and-save); None: ktchat writes the same bytes (quant.kt_int8 + pack). Returns the
    manifest's path."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    first = next(iter(layers.values()))
    e, i, h = first["gate"].shape
    for layer, weights in sorted(layers.items()):
        (writer or _own_writer)(root, layer, {p: weights[p].to(torch.bfloat16).contiguous() for p in PROJS})
    entries = []
    for layer in sorted(layers):
        files = sorted((p for p in (root / f"_layer_{layer}").rglob("*.kt")), key=lambda p: p.as_posix())
        records = [{"path": p.relative_to(root).as_posix(), "size_bytes": p.stat().st_size, "sha256": sha256_file(p)}
                   for p in files]
        entries.append({"index": layer, "numa_count": 1, "state": "ready", "files": records,
                        "bytes": sum(r["size_bytes"] for r in records)})
    manifest = {"schema_version": SCHEMA_VERSION, "state": "ready", "expert_weight_format": "int8", "layout": LAYOUT,
                "backend": "INT8", "threadpool_count": 1, "expert_num": e, "hidden_size": h, "intermediate_size": i,
                "layers": entries, "bytes": sum(x["bytes"] for x in entries),
                "producer": "kt_kernel AMXInt8_MOE save" if writer else "ktchat.kt_weights"}
    path = root / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def _own_writer(root: Path, layer: int, weights: dict[str, torch.Tensor]) -> None:
    out = root / f"_layer_{layer}" / "_numa_0"
    out.mkdir(parents=True, exist_ok=True)
    for proj, w in weights.items():
        for expert in range(w.shape[0]):
            q = kt_int8(w[expert])
            quant, scale = pack(q.data).numpy().tobytes(), q.scale.reshape(-1).numpy().tobytes()
            (out / file_name(proj, expert, len(quant), "quant")).write_bytes(quant)
            (out / file_name(proj, expert, len(scale), "scale")).write_bytes(scale)
