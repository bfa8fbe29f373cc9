"""What a KT adapter manifest says about the base it was trained on (kt-kernel 0.7.2, sft/artifacts.py), checked.

Besides the LoRA files, kt_kernel records the routed experts' weight format and where training's weights came
from: `expert_weight_format` (bf16, int8, fp8, rawint4, mxfp4), `base` {model_name_or_path, fingerprint} (rawint4:
a sampled identity of the base's safetensors shards), and for a routed INT8 plan `non_expert_cache` {path,
fingerprint} and `int8_experts` {path, manifest, manifest_sha256, fingerprint} (mxfp4: `native_experts`);
rawint4 adds `expert_quantization`. Every field is read here; each mismatch is one line naming the manifest and
the key. The fingerprints are recomputed from the files where ktchat has them (the base folder it loads, the INT8
tree), with kt's definitions (re-implemented here from its documented fields, not its code).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..formats.checkpoint import sha256_file
from .core import Problems

logger = logging.getLogger(__name__)

EXPERT_WEIGHT_FORMATS = ("bf16", "int8", "fp8", "rawint4", "mxfp4")
RAWINT4_QUANTIZATION = {"bits": 4, "group_size": 32, "signed": True, "symmetric": True, "zero_point": False,
                        "format": "pack-quantized", "weight_layout": "compressed-tensors-rawint4-g32-v1"}
RAWINT4_SCHEMA = "safetensors-sharded-sampled-v1"
INDEX_NAME = "model.safetensors.index.json"
NON_EXPERT_MANIFEST = "kt_non_expert_manifest.json"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_ROUTED_KEYS = ("path", "manifest", "manifest_sha256", "fingerprint")


@dataclass(frozen=True)
class Provenance:
    """The manifest's record of training's base and routed-expert weights."""

    weight_format: str  # as recorded; "bf16" where an old manifest records none (then `recorded` is False)
    recorded: bool
    base: dict = field(default_factory=dict)
    non_expert_cache: dict | None = None
    routed: dict | None = None  # int8_experts (int8) or native_experts (mxfp4)
    routed_key: str | None = None
    expert_quantization: dict | None = None

    @property
    def base_fingerprint(self) -> str | None:
        return self.base.get("fingerprint")

    def routed_root(self) -> Path | None:
        return Path(self.routed["path"]) if self.routed and isinstance(self.routed.get("path"), str) else None

    def notes(self) -> list[str]:
        """What `ktchat inspect` shows, one line per field."""
        fmt = self.weight_format + ("" if self.recorded else " (not recorded: an older KT manifest; bf16 assumed)")
        lines = [f"expert_weight_format: {fmt}",
                 f"base: model_name_or_path={self.base.get('model_name_or_path')}, fingerprint="
                 f"{_short(self.base_fingerprint)}" + (f" ({self.base.get('fingerprint_schema')}, "
                                                      f"{len(self.base.get('shards') or [])} shards)"
                                                      if self.base.get("fingerprint_schema") else "")]
        if self.non_expert_cache is not None:
            lines.append(f"non_expert_cache: path={self.non_expert_cache.get('path')}, fingerprint="
                         f"{_short(self.non_expert_cache.get('fingerprint'))} (training's bf16 non-expert weights; "
                         "ktchat dequantizes the base's own)")
        if self.routed is not None:
            lines.append(f"{self.routed_key}: path={self.routed.get('path')}, manifest={self.routed.get('manifest')} "
                         f"(sha256 {_short(self.routed.get('manifest_sha256'))}), fingerprint "
                         f"{_short(self.routed.get('fingerprint'))}")
        if self.expert_quantization is not None:
            lines.append("expert_quantization: " + ", ".join(f"{k}={v}" for k, v in
                                                             sorted(self.expert_quantization.items())))
        return lines


def _short(digest) -> str:
    return f"{digest[:12]}..." if isinstance(digest, str) and len(digest) > 12 else str(digest)


def _is_sha(value) -> bool:
    return isinstance(value, str) and bool(_SHA256.fullmatch(value))


def read_provenance(path: Path, raw: dict, problems: Problems) -> Provenance:
    """Every provenance field of a manifest, checked for shape; one line per problem."""
    fmt = raw.get("expert_weight_format")
    recorded = fmt is not None
    if fmt is None and "non_expert_cache" in raw and "int8_experts" in raw:
        fmt, recorded = "int8", True  # LLaMA-Factory's first writer recorded INT8 only through these two fields
    if fmt is None:
        fmt = "bf16"
    if fmt not in EXPERT_WEIGHT_FORMATS:
        problems.add(f"{path}: expert_weight_format {fmt!r} is not one kt-kernel 0.7.2 writes "
                     f"({', '.join(EXPERT_WEIGHT_FORMATS)})")
        fmt = "bf16"
    base = raw.get("base", {})
    if not isinstance(base, dict):
        problems.add(f"{path}: base must be an object {{model_name_or_path, fingerprint}}, got {type(base).__name__}")
        base = {}
    name = base.get("model_name_or_path")
    if name is not None and not isinstance(name, str):
        problems.add(f"{path}: base.model_name_or_path must be a string, got {name!r}")
    if "fingerprint" in base and not _is_sha(base["fingerprint"]):
        problems.add(f"{path}: base.fingerprint {base['fingerprint']!r} is not a sha256 hex digest")
    if fmt == "rawint4":
        _check_rawint4_record(path, base, problems)
    cache = _optional_object(path, raw, "non_expert_cache", ("path", "fingerprint"), problems)
    routed_key = "native_experts" if fmt == "mxfp4" else "int8_experts"
    other = "int8_experts" if routed_key == "native_experts" else "native_experts"
    if other in raw:
        problems.add(f"{path}: {other} recorded for expert_weight_format {fmt} (kt_kernel writes {routed_key})")
    routed = _optional_object(path, raw, routed_key, _ROUTED_KEYS, problems)
    if routed is not None and fmt not in ("int8", "mxfp4"):
        problems.add(f"{path}: {routed_key} recorded but expert_weight_format is {fmt} (kt_kernel records it for "
                     "int8 / mxfp4 only)")
    if (cache is None) != (routed is None) and fmt in ("int8", "mxfp4"):
        have, missing = ("non_expert_cache", routed_key) if routed is None else (routed_key, "non_expert_cache")
        problems.add(f"{path}: {have} recorded without {missing} (kt_kernel records both for a pre-converted plan)")
    if cache is not None and "fingerprint" not in base:
        problems.add(f"{path}: non_expert_cache recorded without base.fingerprint")
    quantization = raw.get("expert_quantization")
    if fmt == "rawint4" or quantization is not None:
        _check_quantization(path, fmt, quantization, problems)
    return Provenance(fmt, recorded, base, cache, routed, routed_key if routed is not None else None,
                      quantization if isinstance(quantization, dict) else None)


def _optional_object(path: Path, raw: dict, key: str, fields: tuple[str, ...], problems: Problems) -> dict | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        problems.add(f"{path}: {key} must be an object {{{', '.join(fields)}}}, got {type(value).__name__}")
        return None
    for name in fields:
        item = value.get(name)
        ok = _is_sha(item) if name in ("fingerprint", "manifest_sha256") else isinstance(item, str) and item
        if not ok:
            problems.add(f"{path}: {key}.{name} is {item!r}: expected "
                         + ("a sha256 hex digest" if name in ("fingerprint", "manifest_sha256") else "a non-empty string"))
    if key.endswith("experts") and isinstance(value.get("manifest"), str) and Path(value["manifest"]).name != value["manifest"]:
        problems.add(f"{path}: {key}.manifest {value['manifest']!r} must be a file name inside {key}.path")
    return value


def _check_rawint4_record(path: Path, base: dict, problems: Problems) -> None:
    if base.get("fingerprint_schema") != RAWINT4_SCHEMA:
        problems.add(f"{path}: base.fingerprint_schema {base.get('fingerprint_schema')!r}: expected {RAWINT4_SCHEMA!r} "
                     "for a rawint4 base")
        return
    for key in ("fingerprint", "config_sha256", "index_sha256"):
        if not _is_sha(base.get(key)):
            problems.add(f"{path}: base.{key} {base.get(key)!r} is not a sha256 hex digest")
    shards = base.get("shards")
    if not isinstance(shards, list) or not shards or not all(isinstance(s, dict) for s in shards):
        problems.add(f"{path}: base.shards must be a non-empty list of shard records")
        return
    if _is_sha(base.get("fingerprint")) and base["fingerprint"] != rawint4_fingerprint(
            base.get("config_sha256", ""), base.get("index_sha256", ""), shards):
        problems.add(f"{path}: base.fingerprint does not match its own config/index/shard records")


def _check_quantization(path: Path, fmt: str, quantization, problems: Problems) -> None:
    if fmt != "rawint4":
        problems.add(f"{path}: expert_quantization recorded for expert_weight_format {fmt} (kt_kernel writes it "
                     "for rawint4 only)")
        return
    if not isinstance(quantization, dict):
        problems.add(f"{path}: expert_quantization is missing (rawint4 records {RAWINT4_QUANTIZATION})")
        return
    for key in sorted(set(RAWINT4_QUANTIZATION) | set(quantization)):
        want, have = RAWINT4_QUANTIZATION.get(key), quantization.get(key)
        if type(want) is not type(have) or want != have:
            problems.add(f"{path}: expert_quantization.{key} is {have!r}, expected {want!r} (Kimi-K2 INT4)")


# ---- fingerprints, recomputed from the files ----


def _canonical_sha256(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def source_fingerprint(model_dir: Path) -> str | None:
    """kt's fingerprint of a source checkpoint (routed INT8 plans): sha256 over a tag and the sha256 of the
    config.json and model.safetensors.index.json files. None where the folder has no index."""
    config, index = model_dir / "config.json", model_dir / INDEX_NAME
    if not (config.is_file() and index.is_file()):
        return None
    digest = hashlib.sha256(b"kt-source-checkpoint-v2\0")
    digest.update(sha256_file(config).encode() + b"\0" + sha256_file(index).encode())
    return digest.hexdigest()


_SAMPLE_BYTES, _SAMPLE_COUNT = 64 * 1024, 8


def _shard_record(path: Path) -> dict:
    """A shard's portable identity: size, header sha256, sha256 of evenly spaced 64 KiB windows of its data."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = f.read(header_len)
        start = 8 + header_len
        payload = size - start
        window = min(_SAMPLE_BYTES, payload)
        offsets = {start}
        if payload > window:
            offsets |= {start + (payload - window) * i // (_SAMPLE_COUNT - 1) for i in range(_SAMPLE_COUNT)}
        sample = hashlib.sha256()
        for offset in sorted(offsets):
            f.seek(offset)
            sample.update(str(offset - start).encode() + b"\0" + f.read(window))
    return {"name": path.name, "size": size, "header_sha256": hashlib.sha256(header).hexdigest(),
            "sample_sha256": sample.hexdigest()}


def rawint4_fingerprint(config_sha256: str, index_sha256: str, shards: list[dict]) -> str:
    digest = hashlib.sha256(b"kt-rawint4-base-safetensors-v1\0")
    digest.update(config_sha256.encode() + b"\0" + index_sha256.encode() + b"\0")
    for record in sorted(shards, key=lambda r: str(r.get("name", ""))):
        portable = {k: record.get(k) for k in ("name", "size", "header_sha256", "sample_sha256")}
        digest.update(json.dumps(portable, sort_keys=True, separators=(",", ":")).encode() + b"\0")
    return digest.hexdigest()


def rawint4_identity(model_dir: Path) -> dict | None:
    """The base identity kt records for rawint4 (fingerprint over canonical config/index JSON and the shards)."""
    config, index = model_dir / "config.json", model_dir / INDEX_NAME
    if not (config.is_file() and index.is_file()):
        return None
    index_raw = json.loads(index.read_bytes())
    shards = [_shard_record(model_dir / n) for n in sorted(set(index_raw.get("weight_map", {}).values()))]
    config_sha, index_sha = _canonical_sha256(json.loads(config.read_bytes())), _canonical_sha256(index_raw)
    return {"fingerprint": rawint4_fingerprint(config_sha, index_sha, shards), "config_sha256": config_sha,
            "index_sha256": index_sha, "shards": shards}


def check_base(prov: Provenance, path: Path, model_dir: Path, problems: Problems) -> str:
    """Compares the recorded base fingerprint with the base folder ktchat loads; returns a note for the log."""
    want = prov.base_fingerprint
    if want is None:
        return "no base fingerprint recorded"
    if prov.weight_format == "rawint4":
        identity = rawint4_identity(model_dir)
        have = identity and identity["fingerprint"]
    else:
        have = source_fingerprint(model_dir)
    if have is None:
        return f"base fingerprint not computable here ({model_dir} has no {INDEX_NAME})"
    if have != want:
        problems.add(f"{path}: base.fingerprint {want[:12]}... was recorded for {prov.base.get('model_name_or_path')}, "
                     f"but {model_dir} fingerprints as {have[:12]}...: not the base this adapter was trained on")
    return f"base fingerprint {want[:12]}... matches {model_dir}"


def check_routed(prov: Provenance, path: Path, problems: Problems, root: Path | None = None) -> Path | None:
    """The routed-expert weight set's manifest: present, its sha256 and fingerprint as recorded. Returns its root."""
    if prov.routed is None:
        return None
    key, rec = prov.routed_key, prov.routed
    root = root or prov.routed_root()
    manifest = root / rec.get("manifest", "") if root else None
    if manifest is None or not manifest.is_file():
        problems.add(f"{path}: {key}: {manifest or rec.get('path')} not found (training's pre-converted experts; "
                     "set kt_weight_path to where they are now)")
        return None
    digest = sha256_file(manifest)
    if digest != rec.get("manifest_sha256"):
        problems.add(f"{path}: {key}.manifest_sha256 {_short(rec.get('manifest_sha256'))} but {manifest} has sha256 "
                     f"{_short(digest)}: the expert weights changed since training")
        return None
    try:
        inner = json.loads(manifest.read_bytes()).get("fingerprint")
    except (ValueError, AttributeError):
        inner = None
    if (inner or digest) != rec.get("fingerprint"):
        problems.add(f"{path}: {key}.fingerprint {_short(rec.get('fingerprint'))} differs from {manifest}'s "
                     f"{_short(inner or digest)}")
        return None
    return root


def check_non_expert_cache(prov: Provenance, path: Path, problems: Problems) -> str | None:
    """Training's bf16 non-expert cache: ktchat does not read it (it dequantizes the base), but where it is
    present its fingerprint must be the recorded one; returns a note."""
    if prov.non_expert_cache is None:
        return None
    cache = Path(prov.non_expert_cache.get("path", ""))
    manifest = cache / NON_EXPERT_MANIFEST
    if not manifest.is_file():
        return f"non_expert_cache {cache} is not here (not needed: ktchat dequantizes the base's non-expert weights)"
    try:
        have = json.loads(manifest.read_bytes()).get("fingerprint")
    except (ValueError, AttributeError):
        have = None
    if have != prov.non_expert_cache.get("fingerprint"):
        problems.add(f"{path}: non_expert_cache.fingerprint {_short(prov.non_expert_cache.get('fingerprint'))} "
                     f"differs from {manifest}'s {_short(have)}")
    return f"non_expert_cache {cache} fingerprint matches"
