"""ktchat.formats.checkpoint: the dtype table against safetensors and torch, header round trips for every dtype, shard
lists, and one clear error naming the file for every way a header or an index can be broken. No model is loaded."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ktchat import KTChatError
from ktchat.formats.checkpoint import (
    BY_TORCH_NAME,
    COMPUTE_DTYPES,
    DTYPES,
    LORA_DTYPES,
    SHARD_INDEX,
    dtype_named,
    open_checkpoint,
    read_header,
    st_name,
)


def write_raw(path: Path, entries: dict, data: bytes = b"", *, length: int | None = None) -> Path:
    """A safetensors file written byte by byte: 8-byte header length, JSON header (padded to 8), data."""
    text = json.dumps(entries).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes((len(text) if length is None else length).to_bytes(8, "little") + text + data)
    return path


def entry(dtype: str, shape: list, start: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


def safetensors_dtypes(tmp_path: Path) -> list[str]:
    """Every dtype name the installed safetensors knows, from its own refusal of an unknown one."""
    bad = write_raw(tmp_path / "probe.safetensors", {"t": entry("NOT_A_DTYPE", [1], 0, 1)}, b"\0")
    with pytest.raises(Exception) as err:
        safe_open(str(bad), framework="pt")
    found = re.search(r"expected one of (.*?) at line", str(err.value))
    assert found, f"safetensors words its error differently now: {err.value}"
    return re.findall(r"`(\w+)`", found.group(1))


# ---- the table ----

def test_the_table_holds_every_dtype_safetensors_defines(tmp_path):
    assert set(safetensors_dtypes(tmp_path)) <= set(DTYPES)
    for name in ("BF16", "F16", "F32", "F64", "F8_E4M3", "F8_E5M2", "I8", "U8", "I16", "I32", "I64", "U32", "BOOL",
                 "U16", "U64"):
        assert name in DTYPES, name


@pytest.mark.parametrize("name", [n for n, d in DTYPES.items() if d.torch is not None])
def test_torch_dtype_item_size_and_kind_agree_with_torch(name):
    d = DTYPES[name]
    t = torch.empty(0, dtype=d.torch)
    assert t.element_size() * 8 == d.bits
    assert d.torch.is_floating_point == d.floating
    assert BY_TORCH_NAME[d.torch_name] is d and st_name(d.torch) == name and st_name(d.torch_name) == name


def test_derived_lists():
    assert COMPUTE_DTYPES == ("float32", "bfloat16", "float16")
    assert {"float64", "float32", "bfloat16", "float16", "float8_e4m3fn", "float8_e5m2"} <= LORA_DTYPES
    assert not LORA_DTYPES & {"int8", "uint8", "int32", "uint32", "bool", "complex64"}
    assert [d.name for d in DTYPES.values() if d.narrow] == ["F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ",
                                                              "F8_E8M0", "F6_E2M3", "F6_E3M2", "F4"]
    assert st_name(torch.float4_e2m1fn_x2) is None and st_name("not_a_dtype") is None  # F4 has no torch dtype


def test_sizes_of_sub_byte_dtypes():
    assert DTYPES["F4"].nbytes([2, 4]) == 4 and DTYPES["F6_E2M3"].nbytes([2, 4]) == 6
    assert DTYPES["F4"].nbytes([3]) is None  # half a byte left over
    assert DTYPES["U32"].nbytes([]) == 4 and DTYPES["BF16"].nbytes([0, 7]) == 0


def test_unknown_dtype_names_where(tmp_path):
    with pytest.raises(KTChatError, match=r"^somewhere: unknown safetensors dtype 'F12' \(known: F32, BF16"):
        dtype_named("F12", "somewhere")
    path = write_raw(tmp_path / "x.safetensors", {"w": entry("F12", [2], 0, 2)}, b"\0\0")
    with pytest.raises(KTChatError, match=rf"^{re.escape(str(path))}: tensor 'w': unknown safetensors dtype 'F12'"):
        read_header(path)


# ---- header round trips ----

@pytest.mark.parametrize("name", [n for n, d in DTYPES.items() if d.torch is not None])
def test_header_round_trip_through_safetensors(tmp_path, name):
    d = DTYPES[name]
    t = torch.arange(6, dtype=torch.uint8).reshape(2, 3)
    t = t.to(d.torch) if name != "BOOL" else t > 2
    path = tmp_path / "x.safetensors"
    save_file({"t": t, "pad": torch.zeros(5, dtype=torch.float32)}, str(path), metadata={"format": "pt"})
    header = read_header(path)
    assert header.metadata == {"format": "pt"} and header.path == path
    info = header.tensors["t"]
    assert info.dtype is d and info.shape == (2, 3) and info.nbytes == 6 * d.bits // 8
    raw = path.read_bytes()[header.data_start + info.start:header.data_start + info.end]
    assert raw == t.contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("name", [n for n, d in DTYPES.items() if d.torch is None])
def test_header_round_trip_by_hand_for_dtypes_torch_lacks(tmp_path, name):
    d = DTYPES[name]
    n = d.nbytes([2, 4])
    path = write_raw(tmp_path / "x.safetensors", {"a": entry("U8", [3], 0, 3), "t": entry(name, [2, 4], 3, 3 + n)},
                     bytes(3 + n))
    info = read_header(path).tensors["t"]
    assert (info.dtype, info.shape, info.start, info.end) == (d, (2, 4), 3, 3 + n)
    with safe_open(str(path), framework="pt") as f:  # safetensors reads the same header
        assert f.get_slice("t").get_dtype() == name and f.get_slice("t").get_shape() == [2, 4]


def test_tensors_come_in_file_order_with_their_bytes(tmp_path):
    tensors = {"z": torch.arange(3, dtype=torch.int64), "a": torch.full((2, 2), 7, dtype=torch.uint8),
               "m": torch.tensor(1.5, dtype=torch.bfloat16), "e": torch.zeros(0, 4)}
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path))
    header = read_header(path)
    starts = [t.start for t in header.tensors.values()]
    assert starts == sorted(starts) and set(header.tensors) == set(tensors) and header.metadata is None
    data = path.read_bytes()
    for name, t in header.tensors.items():
        stored = data[header.data_start + t.start:header.data_start + t.end]
        assert stored == tensors[name].reshape(-1).view(torch.uint8).numpy().tobytes(), name
    assert header.tensors["m"].shape == () and header.tensors["e"].nbytes == 0


# ---- broken headers: one error naming the file, where safetensors refuses the file too ----

U8 = entry("U8", [4], 0, 4)
BROKEN = {
    "shorter than 8 bytes": (lambda p: p.write_bytes(b"\x10\0\0"), "truncated: 3 bytes"),
    "length past the end": (lambda p: write_raw(p, {"t": U8}, bytes(4), length=4096), "truncated or not safetensors"),
    "not json": (lambda p: p.write_bytes((8).to_bytes(8, "little") + b"{nope!!}"), "corrupt safetensors header"),
    "not an object": (lambda p: write_raw(p, [1, 2]), "not an object"),
    "entry not an object": (lambda p: write_raw(p, {"t": "F32"}), "tensor 't': corrupt header entry"),
    "no dtype": (lambda p: write_raw(p, {"t": {"shape": [4], "data_offsets": [0, 4]}}, bytes(4)),
                 "tensor 't': unknown safetensors dtype None"),
    "bad shape": (lambda p: write_raw(p, {"t": entry("U8", [-4], 0, 4)}, bytes(4)), "tensor 't': corrupt header entry"),
    "bad offsets": (lambda p: write_raw(p, {"t": entry("U8", [4], 4, 0)}, bytes(4)), "data_offsets"),
    "size mismatch": (lambda p: write_raw(p, {"t": entry("F32", [4], 0, 4)}, bytes(4)),
                      "tensor 't': F32 \\[4\\] takes 16 bytes, the header gives it 4"),
    "gap": (lambda p: write_raw(p, {"t": U8, "u": entry("U8", [4], 8, 12)}, bytes(12)), "tensor 'u' starts at byte 8"),
    "overlap": (lambda p: write_raw(p, {"t": U8, "u": entry("U8", [4], 2, 6)}, bytes(6)), "starts at byte 2"),
    "cut data": (lambda p: write_raw(p, {"t": U8}, bytes(2)), "truncated: its header says the file has"),
    "trailing bytes": (lambda p: write_raw(p, {"t": U8}, bytes(9)), "corrupt: its header says the file has"),
    "bad metadata": (lambda p: write_raw(p, {"__metadata__": {"format": 1}, "t": U8}, bytes(4)), "__metadata__"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_header_is_one_error_naming_the_file(tmp_path, case):
    make, fragment = BROKEN[case]
    path = tmp_path / "model.safetensors"
    make(path)
    with pytest.raises(KTChatError) as err:
        read_header(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and re.search(fragment, message) and "\n" not in message, message
    with pytest.raises(Exception):  # never stricter than safetensors itself
        safe_open(str(path), framework="pt")


def test_missing_file(tmp_path):
    with pytest.raises(KTChatError, match=rf"^{re.escape(str(tmp_path / 'gone.safetensors'))}: cannot read"):
        read_header(tmp_path / "gone.safetensors")


# ---- checkpoint folders: single file, shards, broken indexes ----

def sharded(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    second = {"a": torch.zeros(2, 3), "b": torch.zeros(4, dtype=torch.uint8)}
    save_file(second, str(d / "model-00002-of-00002.safetensors"))
    save_file({"c": torch.zeros(5, dtype=torch.bfloat16)}, str(d / "model-00001-of-00002.safetensors"))
    weight_map = {"a": "model-00002-of-00002.safetensors", "b": "model-00002-of-00002.safetensors",
                  "c": "model-00001-of-00002.safetensors"}
    (d / SHARD_INDEX).write_text(json.dumps({"metadata": {"total_size": 33}, "weight_map": weight_map}))
    return d


def test_single_file_checkpoint(tmp_path):
    save_file({"x": torch.zeros(3), "y": torch.zeros(1, dtype=torch.int32)}, str(tmp_path / "model.safetensors"))
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.index is None and ckpt.shards == [tmp_path / "model.safetensors"]
    assert ckpt.files == {"x": tmp_path / "model.safetensors", "y": tmp_path / "model.safetensors"}
    assert ckpt.shapes() == {"x": (3,), "y": (1,)}


def test_sharded_checkpoint(tmp_path):
    d = sharded(tmp_path)
    ckpt = open_checkpoint(d)
    assert ckpt.index == d / SHARD_INDEX
    assert ckpt.shards == [d / "model-00001-of-00002.safetensors", d / "model-00002-of-00002.safetensors"]
    assert ckpt.files["a"] == d / "model-00002-of-00002.safetensors" and ckpt.shapes()["c"] == (5,)
    assert ckpt.headers[d / "model-00002-of-00002.safetensors"].tensors["b"].dtype is DTYPES["U8"]


@pytest.mark.parametrize("broken", ["{not json", '["weight_map"]', '{"metadata": {}}', '{"weight_map": ["a", "b"]}',
                                    '{"weight_map": {}}', '{"weight_map": {"a": 3}}'])
def test_bad_index_names_the_index(tmp_path, broken):
    d = sharded(tmp_path)
    (d / SHARD_INDEX).write_text(broken)
    with pytest.raises(KTChatError, match=rf"^{re.escape(str(d / SHARD_INDEX))}: cannot read shard index \("):
        open_checkpoint(d)


def test_missing_shard_names_the_index_and_the_shard(tmp_path):
    d = sharded(tmp_path)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(KTChatError, match=rf"^{re.escape(str(d / SHARD_INDEX))}: lists shard "
                                          r"model-00002-of-00002.safetensors, which is missing"):
        open_checkpoint(d)


def test_index_listing_a_tensor_its_shard_lacks(tmp_path):
    d = sharded(tmp_path)
    index = json.loads((d / SHARD_INDEX).read_text())
    index["weight_map"]["c"] = "model-00002-of-00002.safetensors"
    (d / SHARD_INDEX).write_text(json.dumps(index))
    with pytest.raises(KTChatError, match=r"lists c in model-00002-of-00002.safetensors, which does not hold it"):
        open_checkpoint(d)


def test_broken_shard_names_the_shard(tmp_path):
    d = sharded(tmp_path)
    shard = d / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(KTChatError, match=rf"^{re.escape(str(shard))}: truncated"):
        open_checkpoint(d)
    write_raw(shard, {"c": entry("Q4_K", [5], 0, 10)}, bytes(10))
    with pytest.raises(KTChatError, match=rf"^{re.escape(str(shard))}: tensor 'c': unknown safetensors dtype 'Q4_K'"):
        open_checkpoint(d)


def test_no_checkpoint(tmp_path):
    with pytest.raises(KTChatError, match=rf"^{re.escape(str(tmp_path))}: no safetensors checkpoint found"):
        open_checkpoint(tmp_path)


# ---- the adapter's view of dtypes comes from the same table ----

def test_adapter_weights_name_every_dtype_as_torch_does(tmp_path):
    from ktchat.adapter.weights import AdapterWeights

    path = tmp_path / "adapter_model.safetensors"
    save_file({"f8": torch.zeros(2, dtype=torch.float8_e4m3fn), "u32": torch.zeros(2, dtype=torch.uint32),
               "bf16": torch.zeros(2, 2, dtype=torch.bfloat16)}, str(path))
    weights = AdapterWeights(path)
    assert weights.dtypes == {"bf16": "bfloat16", "f8": "float8_e4m3fn", "u32": "uint32"}
    assert weights.shapes == {"bf16": (2, 2), "f8": (2,), "u32": (2,)}
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(KTChatError, match=rf"^{re.escape(str(path))}: truncated"):
        AdapterWeights(path)
