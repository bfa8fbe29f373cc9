"""Adapters trained on quantized experts (kt_adapter_manifest.json expert_weight_format int8 / fp8 / rawint4) and
KT's pre-converted routed INT8 (int8_experts / kt_weight_path), against the fp32 hand-merged reference.

The reference for int8 is the bf16 base with every routed expert replaced by KT's INT8 of it, dequantized (the
rule written out here element by element: scale = amax * (1/127) in fp32, q = round-half-even(w * (1/scale))),
then every LoRA merged by hand (tests/reference.py). Real kt_kernel, no mocks; what this CPU's kt build lacks is
skipped with the reason it gives (run under KT_KERNEL_CPU_VARIANT=avx2 for CI's)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ktchat import load_model
from ktchat.adapter.writer import convert
from ktchat.errors import KTChatError
from ktchat.formats import quant
from ktchat.formats.kt_weights import MANIFEST_NAME, open_int8_experts, sha256_file, write_int8_experts
from ktchat.tinymodels.checkpoint import load_expert_weights

from reference import DEVICE, load_reference, logits, merge_by_hand, read_checkpoint, rel_err
from tolerances import FP32_BOUND, KT_BOUND

MANIFEST = "kt_adapter_manifest.json"
EXPERT = r"model.layers.{layer}.mlp.experts.{expert}.{proj}_proj.weight"


def kt_int8_by_hand(w: torch.Tensor) -> torch.Tensor:
    """KT's INT8 of one weight [out, in], dequantized; row by row, independent of quant.kt_int8."""
    out = torch.empty(w.shape, dtype=torch.float32)
    inv127 = torch.tensor(1 / 127, dtype=torch.float32)
    for r in range(w.shape[0]):
        row = w[r].float()
        s = row.abs().max() * inv127
        q = torch.round(row * (1 / s)).clamp(-127, 127) if s > 0 else torch.zeros_like(row)
        out[r] = q * s
    return out


@pytest.fixture(scope="module")
def kt_adapter(tiny, tmp_path_factory):
    """The tiny trained adapter in KT's fused layout with a manifest (as kt_kernel writes it)."""
    out = tmp_path_factory.mktemp("kt") / "adapter"
    convert(tiny.adapter, out, "kt")
    return out


def with_manifest(src: Path, dst: Path, **fields) -> Path:
    """A copy of a KT adapter whose manifest has `fields` set (None deletes a key)."""
    shutil.copytree(src, dst)
    path = dst / MANIFEST
    raw = json.loads(path.read_text())
    for key, value in fields.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    path.write_text(json.dumps(raw, indent=2))
    return dst


@pytest.fixture(scope="module")
def int8_base(tiny, tmp_path_factory):
    """The tiny base with its routed experts replaced by KT's INT8 of them, dequantized (fp32 on disk)."""
    from safetensors.torch import save_file

    out = tmp_path_factory.mktemp("int8") / "base"
    shutil.copytree(tiny.model, out, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    stored = read_checkpoint(tiny.model)
    experts = set(load_expert_weights(tiny.model))
    weights = {k: (kt_int8_by_hand(v) if k in experts else v.float()).contiguous() for k, v in stored.items()}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def int8_reference(int8_base, tiny):
    return load_reference(merge_by_hand(int8_base, tiny.adapter, int8_base.parent / "merged"))


def moe_layers(tiny) -> dict[int, dict[str, torch.Tensor]]:
    """{layer: {proj: [E, out, in]}} of the tiny checkpoint's routed experts (bf16 as stored)."""
    cfg = json.loads((tiny.model / "config.json").read_text())
    stored = load_expert_weights(tiny.model)
    return {layer: {p: torch.stack([stored[EXPERT.format(layer=layer, expert=e, proj=p)]
                                    for e in range(cfg["n_routed_experts"])]) for p in ("gate", "up", "down")}
            for layer in range(cfg["first_k_dense_replace"], cfg["num_hidden_layers"])}


def _kt_writer():
    """kt_kernel's INT8 writer where it imports and has AMXInt8_MOE, else None (ktchat's writer of the same bytes)."""
    try:
        from ktchat.experts.kt_backend import kt_int8_writer
    except ImportError:
        return None
    return kt_int8_writer()


@pytest.fixture(scope="module")
def int8_set(tiny, tmp_path_factory):
    """KT's INT8 of the tiny base, written by kt_kernel itself where this build can (else ktchat's writer)."""
    root = tmp_path_factory.mktemp("kt-int8") / "experts"
    write_int8_experts(root, moe_layers(tiny), writer=_kt_writer())
    return root


def int8_adapter(tiny, kt_adapter, int8_set, dst: Path, **overrides) -> Path:
    """An adapter whose manifest points at the INT8 set as kt_kernel records a routed INT8 plan."""
    manifest = int8_set / MANIFEST_NAME
    routed = {"path": str(int8_set), "manifest": MANIFEST_NAME, "manifest_sha256": sha256_file(manifest),
              "fingerprint": sha256_file(manifest)}
    fields = {**with_fingerprint(tiny), "expert_weight_format": "int8", "int8_experts": routed,
              "non_expert_cache": {"path": str(dst.parent / "no-cache-here"), "fingerprint": "0" * 64}}
    fields.update(overrides)
    return with_manifest(kt_adapter, dst, **fields)


def with_fingerprint(tiny, **fields) -> dict:
    from ktchat.adapter.kt_provenance import source_fingerprint

    return {"base": {"model_name_or_path": str(tiny.model), "fingerprint": source_fingerprint(tiny.model)}, **fields}


# ---- KT's INT8 bytes ----


def test_int8_writer_is_kt_kernels_bytes(tiny, tmp_path):
    """ktchat's writer and kt_kernel's own (AMXInt8_MOE save) give the same files, which kt_kernel's validator
    accepts and which decode to the hand-written rule."""
    pytest.importorskip("kt_kernel")
    from ktchat.experts import kt_backend

    if not hasattr(kt_backend.kt_ext().moe, "AMXInt8_MOE"):
        pytest.skip(f"kt_kernel's '{kt_backend.cpu_variant()}' build has no AMXInt8_MOE to write INT8 files with")
    from kt_kernel.sft.weight_manifest import validate_persistent_int8_weights

    layers = moe_layers(tiny)
    layers[1]["gate"][0, 5] = 0  # an all-zero row: scale 0
    ours, theirs = tmp_path / "ours", tmp_path / "kt"
    write_int8_experts(ours, layers)
    write_int8_experts(theirs, layers, writer=kt_backend.kt_int8_writer())
    files = sorted(p.relative_to(theirs) for p in theirs.rglob("*.kt"))
    assert files == sorted(p.relative_to(ours) for p in ours.rglob("*.kt")) and len(files) == 2 * 2 * 3 * 8
    assert all((ours / f).read_bytes() == (theirs / f).read_bytes() for f in files)
    e, i, h = layers[1]["gate"].shape
    validate_persistent_int8_weights(str(theirs), layer_indices=sorted(layers), numa_count=1, expert_num=e,
                                     hidden_size=h, intermediate_size=i, verify_hashes=True)
    read = open_int8_experts(theirs, num_experts=e, hidden_size=h, intermediate_size=i, layers=sorted(layers))
    for proj in ("gate", "down"):
        assert torch.equal(read.weight(1, 0, proj).dequantize(), kt_int8_by_hand(layers[1][proj][0]))


def test_int8_layout_blocks_wide_layers_as_kt_kernel(tmp_path):
    """Past 3584 inputs kt_kernel blocks a weight (64-row groups x 3584-input blocks): V3's gate/up have 7168."""
    pytest.importorskip("kt_kernel")
    from ktchat.experts import kt_backend

    if not hasattr(kt_backend.kt_ext().moe, "AMXInt8_MOE"):
        pytest.skip(f"kt_kernel's '{kt_backend.cpu_variant()}' build has no AMXInt8_MOE to write INT8 files with")
    g = torch.Generator().manual_seed(5)
    layer = {p: torch.randn((2, 7680, 128) if p == "down" else (2, 128, 7680), generator=g).bfloat16()
             for p in ("gate", "up", "down")}
    write_int8_experts(tmp_path / "ours", {0: layer})
    write_int8_experts(tmp_path / "kt", {0: layer}, writer=kt_backend.kt_int8_writer())
    files = sorted(p.relative_to(tmp_path / "kt") for p in (tmp_path / "kt").rglob("*.kt"))
    assert files and all((tmp_path / "ours" / f).read_bytes() == (tmp_path / "kt" / f).read_bytes() for f in files)


def test_int8_tree_mismatches_are_one_line(tiny, int8_set, tmp_path):
    cfg = dict(num_experts=8, hidden_size=256, intermediate_size=128, layers=[1, 2])
    open_int8_experts(int8_set, **cfg)  # as written: fine
    bad = tmp_path / "bad"
    shutil.copytree(int8_set, bad)
    victim = next((bad / "_layer_2" / "_numa_0").glob("INT8_up_3_*scale_.kt"))
    victim.write_bytes(b"\0" * victim.stat().st_size)  # same size, other bytes: only the sha256 tells
    experts = open_int8_experts(bad, **cfg)
    with pytest.raises(KTChatError, match=rf"{victim.name}: sha256 .* differs from {MANIFEST_NAME}"):
        experts.weight(2, 3, "up")
    victim.unlink()
    with pytest.raises(KTChatError, match=rf"{victim.name}: missing \(listed in {MANIFEST_NAME}\)"):
        open_int8_experts(bad, **cfg)
    with pytest.raises(KTChatError, match=r"hidden_size is 256, expected 512"):
        open_int8_experts(int8_set, **{**cfg, "hidden_size": 512})
    with pytest.raises(KTChatError, match=r"layers \[1, 2\] do not match the model's MoE layers \[1, 2, 3\]"):
        open_int8_experts(int8_set, **{**cfg, "layers": [1, 2, 3]})


# ---- adapters trained on int8 experts: the torch path is the math training ran ----


def test_int8_adapter_torch_matches_int8_reference(tiny, kt_adapter, int8_reference, reference, chat_prompts,
                                                    tmp_path, caplog):
    adapter = with_manifest(kt_adapter, tmp_path / "a", expert_weight_format="int8")
    with caplog.at_level(logging.INFO, logger="ktchat"):
        model, _ = load_model(tiny.model, adapter, experts_backend="torch", dtype="float32", device=DEVICE)
    assert "routed experts: int8, the format the adapter was trained on" in caplog.text
    ids = chat_prompts[0]
    got = logits(model, ids)
    assert rel_err(got, logits(int8_reference, ids)) < FP32_BOUND
    assert rel_err(got, logits(reference, ids)) > 3 * FP32_BOUND  # the bf16 experts: other math (5.0e-4 measured)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ktchat"):
        bf16, _ = load_model(tiny.model, adapter, experts_backend="torch", dtype="float32", device=DEVICE,
                             kt_method="bf16")
    assert "kt_method bf16 differs from the adapter's training format int8" in caplog.text
    assert rel_err(logits(bf16, ids), logits(reference, ids)) < FP32_BOUND


def test_pre_converted_int8_loads_as_is(tiny, kt_adapter, int8_set, int8_reference, chat_prompts, tmp_path, caplog):
    adapter = int8_adapter(tiny, kt_adapter, int8_set, tmp_path / "a")
    with caplog.at_level(logging.INFO, logger="ktchat"):
        model, _ = load_model(tiny.model, adapter, experts_backend="torch", dtype="float32", device=DEVICE)
    assert "KT's pre-converted INT8 from" in caplog.text and "base fingerprint" in caplog.text
    ids = chat_prompts[0]
    assert rel_err(logits(model, ids), logits(int8_reference, ids)) < FP32_BOUND


def test_kt_weight_path_names_the_int8_set(tiny, kt_adapter, int8_set, int8_reference, chat_prompts, tmp_path,
                                           caplog):
    """kt_weight_path (LLaMA-Factory's key) points at the INT8 set when the manifest names none; it needs int8."""
    adapter = with_manifest(kt_adapter, tmp_path / "a", expert_weight_format="int8")
    with caplog.at_level(logging.INFO, logger="ktchat"):
        model, _ = load_model(tiny.model, adapter, experts_backend="torch", dtype="float32", device=DEVICE,
                              kt_weight_path=str(int8_set))
    assert f"KT's pre-converted INT8 from {int8_set} (kt_weight_path)" in caplog.text
    ids = chat_prompts[0]
    assert rel_err(logits(model, ids), logits(int8_reference, ids)) < FP32_BOUND
    with pytest.raises(KTChatError, match=r"kt_weight_path is KT's routed INT8 set; the experts run bf16"):
        load_model(tiny.model, adapter, experts_backend="torch", dtype="float32", device=DEVICE, kt_method="bf16",
                   kt_weight_path=str(int8_set))


def test_wrong_int8_scales_break_the_match(tiny, kt_adapter, int8_set, int8_reference, chat_prompts, tmp_path):
    """Scales of one layer's experts doubled (manifest rewritten to match): loads, and misses the reference."""
    bad = tmp_path / "int8"
    shutil.copytree(int8_set, bad)
    for f in (bad / "_layer_1" / "_numa_0").glob("*_scale_.kt"):
        f.write_bytes((torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.float32) * 2).numpy().tobytes())
    manifest = json.loads((bad / MANIFEST_NAME).read_text())
    for layer in manifest["layers"]:
        for rec in layer["files"]:
            rec["sha256"] = sha256_file(bad / rec["path"])
    (bad / MANIFEST_NAME).write_text(json.dumps(manifest))
    adapter = int8_adapter(tiny, kt_adapter, bad, tmp_path / "a")
    model, _ = load_model(tiny.model, adapter, experts_backend="torch", dtype="float32", device=DEVICE)
    assert rel_err(logits(model, chat_prompts[0]), logits(int8_reference, chat_prompts[0])) > 100 * FP32_BOUND


def test_int8_adapter_on_kt_kernels(tiny, kt_adapter, int8_set, int8_reference, chat_prompts, tmp_path):
    """kt's INT8 kernels (SFT kernel with the LoRA unmerged where the build has it) on the pre-converted bytes."""
    pytest.importorskip("kt_kernel")
    from ktchat.experts.kt_backend import unavailable_reason

    adapter = int8_adapter(tiny, kt_adapter, int8_set, tmp_path / "a")
    runs = [m for m in ("exact", "merged") if unavailable_reason(m, "int8") is None]
    if not runs:
        pytest.skip(unavailable_reason("merged", "int8"))
    for moe_lora in runs:
        model, _ = load_model(tiny.model, adapter, experts_backend="kt", dtype="float32", device=DEVICE,
                              moe_lora=moe_lora)
        errors = [rel_err(logits(model, ids), logits(int8_reference, ids)) for ids in chat_prompts[:-1]]
        print("int8", moe_lora, f"{max(errors):.2e}")
        assert max(errors) < KT_BOUND["int8"]


# ---- manifest fields: one line per mismatch, naming the file and key ----


def test_manifest_mismatches_are_one_line(tiny, kt_adapter, int8_set, tmp_path):
    def load(name, **fields):
        adapter = int8_adapter(tiny, kt_adapter, int8_set, tmp_path / name, **fields)
        with pytest.raises(KTChatError) as err:
            load_model(tiny.model, adapter, experts_backend="torch", dtype="float32", device="cpu")
        assert "\n" not in str(err.value)
        return str(err.value)

    assert "base.fingerprint" in load("fp", base={"model_name_or_path": "x", "fingerprint": "1" * 64}) \
        and "not the base this adapter was trained on" in load("fp2", base={"model_name_or_path": "x",
                                                                           "fingerprint": "1" * 64})
    routed = {"path": str(int8_set), "manifest": MANIFEST_NAME, "manifest_sha256": "2" * 64,
              "fingerprint": sha256_file(int8_set / MANIFEST_NAME)}
    assert f"{MANIFEST}: int8_experts.manifest_sha256" in load("sha", int8_experts=routed)
    gone = {**routed, "path": str(tmp_path / "nowhere"), "manifest_sha256": sha256_file(int8_set / MANIFEST_NAME)}
    assert "int8_experts" in (msg := load("gone", int8_experts=gone)) and "set kt_weight_path" in msg
    assert "expert_weight_format 'int4' is not one kt-kernel 0.7.2 writes" in load("fmt", expert_weight_format="int4")
    assert "int8_experts.fingerprint" in load("fpr", int8_experts={**routed, "manifest_sha256": gone["manifest_sha256"],
                                                                   "fingerprint": "3" * 64})
    from ktchat.adapter.core import Problems
    from ktchat.adapter.kt import read_manifest
    from ktchat.adapter.kt_provenance import RAWINT4_SCHEMA, rawint4_identity

    base = {"model_name_or_path": str(tiny.model), "fingerprint_schema": RAWINT4_SCHEMA, **rawint4_identity(tiny.model)}
    quantization = {"bits": 4, "group_size": 128, "signed": True, "symmetric": True, "zero_point": False,
                    "format": "pack-quantized", "weight_layout": "compressed-tensors-rawint4-g32-v1"}
    adapter = with_manifest(kt_adapter, tmp_path / "q", expert_weight_format="rawint4", int8_experts=None,
                            non_expert_cache=None, expert_quantization=quantization, base=base)
    problems = Problems(collect=True)
    read_manifest(adapter, problems)
    assert problems.found == [f"{adapter / MANIFEST}: expert_quantization.group_size is 128, expected 32 (Kimi-K2 INT4)"]
    raw = json.loads((adapter / MANIFEST).read_text())
    raw["base"]["shards"][0]["size"] += 1  # the record no longer adds up to its fingerprint
    raw["artifacts"]["fused_expert_lora.safetensors"]["tensor_count"] = 5
    (adapter / MANIFEST).write_text(json.dumps(raw))
    problems = Problems(collect=True)
    read_manifest(adapter, problems)
    assert any("base.fingerprint does not match its own config/index/shard records" in p for p in problems.found)
    assert any("fused_expert_lora.safetensors.tensor_count 5 but tensors lists 12" in p for p in problems.found)
    assert "mxfp4 (DeepSeek-V4's native experts) is not supported" in load("mx", expert_weight_format="mxfp4",
                                                                            int8_experts=None, non_expert_cache=None)


def test_inspect_shows_every_manifest_field(tiny, kt_adapter, int8_set, tmp_path):
    adapter = int8_adapter(tiny, kt_adapter, int8_set, tmp_path / "a")
    out = subprocess.run([sys.executable, "-m", "ktchat.cli", "inspect", str(adapter), "--model", str(tiny.model)],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stdout + out.stderr
    for line in ("expert_weight_format: int8", "base: model_name_or_path=", "non_expert_cache: path=",
                 "int8_experts: path=", "int8_experts present, manifest sha256 and fingerprint match",
                 "base fingerprint", "matches"):
        assert line in out.stdout, (line, out.stdout)


def test_kt_fingerprints_are_kt_kernels(tiny):
    """The fingerprints ktchat recomputes are kt_kernel's own (its artifact module on the tiny base)."""
    pytest.importorskip("kt_kernel")
    from kt_kernel.sft import artifacts

    from ktchat.adapter.kt_provenance import rawint4_identity, source_fingerprint

    assert source_fingerprint(tiny.model) == artifacts._source_fingerprint(
        artifacts._sha256_file(tiny.model / "config.json"), artifacts._sha256_file(tiny.model / "model.safetensors.index.json"))
    assert rawint4_identity(tiny.model)["fingerprint"] == artifacts._rawint4_base_identity(tiny.model)["fingerprint"]


# ---- fp8 / rawint4 experts on one layer: torch exact, kt within its kernel's bound ----

FORMAT_OF = {"fp8": ("fp8", (128, 128)), "rawint4": ("int4", (1, 32)), "int8": ("int8", None)}
KT_LAYER_BOUND = {"fp8": 1e-2, "rawint4": 3e-2, "int8": 5e-2}  # measured 4-5e-3, 4e-3-1.2e-2, 1.4-2.3e-2


def _layer(method):
    from ktchat.adapter import StackedLoRA
    from ktchat.experts import ExpertsSpec

    e, h, i, k = 8, 256, 256, 2
    g = torch.Generator().manual_seed(3)
    w = {p: torch.randn((e, h, i) if p == "down" else (e, i, h), generator=g) / h**0.5 for p in ("gate", "up", "down")}
    fmt, block = FORMAT_OF[method]
    q = {p: [quant.kt_int8(w[p][x]) if fmt == "int8" else quant.quantize(fmt, w[p][x], block) for x in range(e)]
         for p in w}
    lora = {}
    for p in w:
        fo, fi = (h, i) if p == "down" else (i, h)
        lora[p] = StackedLoRA(torch.randn(e, 8, fi, generator=g) / fi**0.5, torch.randn(e, fo, 8, generator=g) / 6, 2.0)
    x = torch.randn(40, h, generator=g).bfloat16().float()
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(40)])
    return ExpertsSpec(0, e, k, h, i, torch.float32), q, lora, x, ids, torch.rand(40, k, generator=g)


def _by_hand(q, lora, x, ids, wts):
    """sum_k w_k * down(silu(gate x) * up x), each W the dequantized weight plus s * B @ A, in fp64."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            m = {p: q[p][e].dequantize().double() + lora[p].scale * lora[p].b[e].double() @ lora[p].a[e].double()
                 for p in q}
            xx = x[t].double()
            h = torch.nn.functional.silu(m["gate"] @ xx) * (m["up"] @ xx)
            out[t] += wts[t, j].double() * (m["down"] @ h)
    return out


@pytest.mark.parametrize("method", ["fp8", "rawint4", "int8"])
def test_quantized_layer_torch_exact_kt_within_bound(method):
    from ktchat.experts import TorchExperts

    spec, q, lora, x, ids, wts = _layer(method)
    want = _by_hand(q, lora, x, ids, wts)
    ref = TorchExperts(spec)
    for p in q:
        for e, qe in enumerate(q[p]):
            ref.load_quantized(p, e, qe, f"{p}{e}")
    ref.finalize()
    ref.set_lora(lora)
    assert rel_err(ref.forward(x, ids, wts), want) < FP32_BOUND
    unscaled = TorchExperts(spec)  # the quantized bytes as if unscaled (scale 1): far off
    for p in q:
        for e, qe in enumerate(q[p]):
            unscaled.load_quantized(p, e, quant.QuantizedWeight(qe.format, qe.data, torch.ones_like(qe.scale),
                                                                qe.block, qe.shape), "x")
    unscaled.finalize()
    unscaled.set_lora(lora)
    assert rel_err(unscaled.forward(x, ids, wts), want) > 0.5

    pytest.importorskip("kt_kernel")
    from ktchat.experts import ExpertsSpec
    from ktchat.experts.kt_backend import KTExperts, unavailable_reason

    ran = []
    for moe_lora in ("exact", "merged"):
        if unavailable_reason(moe_lora, method):
            continue
        kt = KTExperts(ExpertsSpec(0, spec.num_experts, spec.top_k, spec.hidden_size, spec.intermediate_size,
                                   torch.bfloat16), moe_lora=moe_lora, method=method, chunk_size=32)
        for p in q:
            for e, qe in enumerate(q[p]):
                kt.load_quantized(p, e, qe, f"{p}{e}")
        kt.finalize()
        kt.set_lora(lora)
        err = rel_err(kt.forward(x.bfloat16(), ids, wts), want)
        print("layer", method, moe_lora, f"{err:.2e}")
        assert err < KT_LAYER_BOUND[method], moe_lora
        ran.append(moe_lora)
    if not ran:
        pytest.skip(unavailable_reason("merged", method))


def test_native_format_refuses_what_it_cannot_run():
    pytest.importorskip("kt_kernel")
    from ktchat.experts import ExpertsSpec
    from ktchat.experts.kt_backend import KTExperts, unavailable_reason

    if unavailable_reason("merged", "fp8"):
        pytest.skip(unavailable_reason("merged", "fp8"))
    kt = KTExperts(ExpertsSpec(0, 8, 2, 256, 256, torch.bfloat16), moe_lora="merged", method="fp8")
    with pytest.raises(KTChatError, match=r"src: fp8 block \[64, 64\], but kt_kernel's fp8 kernels take \[128, 128\]"):
        kt.load_quantized("up", 0, quant.quantize("fp8", torch.randn(256, 256), (64, 64)), "src")
    with pytest.raises(KTChatError, match=r"kt_method fp8 runs the checkpoint's fp8 weights"):
        kt.load_weight("up", 1, torch.randn(256, 256), "src")


def test_skip_reasons_under_avx2():
    """CI's build: FP8 / RAWINT4 inference kernels run, the SFT kernels and INT8 do not, and the reasons say so."""
    pytest.importorskip("kt_kernel")
    code = ("from ktchat.experts.kt_backend import unavailable_reason as u\n"
            "for m in ('int8', 'fp8', 'rawint4'):\n"
            "    print(m, u('exact', m), '|', u('merged', m))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "KT_KERNEL_CPU_VARIANT": "avx2"})
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.strip().splitlines())
    assert "'avx2' build for this CPU has no AMXInt8_SFT_MOE" in lines["int8"]
    assert "no AMXInt8_MOE kernel" in lines["int8"]
    assert "no AMXFP8_SFT_MOE kernel" in lines["fp8"] and lines["fp8"].endswith("| None")
    assert "no AMXInt4_KGroup_SFT_MOE kernel" in lines["rawint4"] and lines["rawint4"].endswith("| None")


def test_config_methods_are_the_backends():
    from ktchat.config import KT_METHODS
    from ktchat.experts.kt_backend import METHODS, TRAINED_METHOD

    assert KT_METHODS == METHODS
    assert set(TRAINED_METHOD.values()) <= set(METHODS)


# ---- adapters trained on fp8 / rawint4 experts, on the tiny FP8 (DeepSeek-V3) and INT4 (Kimi-K2) bases ----

TRAINED_ON = {"deepseek_v3-fp8": "fp8", "kimi_k2-int4": "rawint4"}
KT_MODEL_BOUND = {"fp8": 1e-2, "rawint4": 1e-2}  # measured (avx512_bf16, exact / merged): fp8 1.5e-3 / 1.4e-3, rawint4 1.8e-3 / 1.3e-3


@pytest.fixture(scope="module", params=sorted(TRAINED_ON))
def qbase(request, tmp_path_factory):
    """(format, quantized tiny base, its adapter in KT's layout naming `format`, the dequantized reference)."""
    from ktchat.adapter.kt_provenance import RAWINT4_QUANTIZATION, RAWINT4_SCHEMA, rawint4_identity
    from ktchat.tinymodels import build_tiny
    from ktchat.tinymodels.quantized import VARIANTS, build_quantized

    root = Path(os.environ.get("KTCHAT_TEST_CACHE", Path(__file__).resolve().parents[1] / ".cache" / "tiny"))
    v = VARIANTS[request.param]
    base = build_tiny(root.with_name(f"{root.name}-{v.family}"), family=v.family)
    paths = build_quantized(root.with_name(f"{root.name}-{v.name}"), v.name, base)
    fmt = TRAINED_ON[request.param]
    out = tmp_path_factory.mktemp(fmt)
    convert(paths.adapter, out / "kt", "kt")
    fields = {"expert_weight_format": fmt}
    if fmt == "rawint4":
        fields.update(base={"model_name_or_path": str(paths.model), "fingerprint_schema": RAWINT4_SCHEMA,
                            **rawint4_identity(paths.model)}, expert_quantization=dict(RAWINT4_QUANTIZATION))
    adapter = with_manifest(out / "kt", out / "adapter", **fields)
    reference = load_reference(merge_by_hand(paths.model, paths.adapter, out / "merged"))
    from transformers import AutoTokenizer

    from reference import chat_prompt_ids

    return fmt, paths.model, adapter, reference, chat_prompt_ids(AutoTokenizer.from_pretrained(paths.model))[:2]


def test_quantized_adapter_torch_matches_dequantized_reference(qbase, caplog):
    fmt, model_dir, adapter, reference, prompts = qbase
    with caplog.at_level(logging.INFO, logger="ktchat"):
        model, _ = load_model(model_dir, adapter, experts_backend="torch", dtype="float32", device=DEVICE)
    assert f"routed experts: {fmt}, the format the adapter was trained on" in caplog.text
    for ids in prompts:
        assert rel_err(logits(model, ids), logits(reference, ids)) < FP32_BOUND


def test_quantized_adapter_on_kt_kernels(qbase, caplog):
    """The default (format and moe_lora) on kt: the SFT kernel of the format where the build has it, else its
    inference kernel on the LoRA merged into bf16; auto falls back to torch in one line where neither runs."""
    pytest.importorskip("kt_kernel")
    from ktchat.experts.kt_backend import unavailable_reason
    from ktchat.model import offloaded_blocks

    fmt, model_dir, adapter, reference, prompts = qbase
    if reason := unavailable_reason("merged", fmt):
        with caplog.at_level(logging.INFO, logger="ktchat"):
            load_model(model_dir, adapter, experts_backend="auto", dtype="float32", device=DEVICE)
        assert f"routed experts: torch backend on the same {fmt} math ({reason})" in caplog.text
        pytest.skip(reason)
    errors = {}
    for moe_lora in [m for m in ("exact", "merged") if unavailable_reason(m, fmt) is None]:
        model, _ = load_model(model_dir, adapter, experts_backend="kt", dtype="float32", device=DEVICE,
                              moe_lora=moe_lora)
        backend = next(iter(offloaded_blocks(model).values())).experts.backend
        assert (backend.name, backend.method) == ("kt", fmt)
        errors[moe_lora] = max(rel_err(logits(model, ids), logits(reference, ids)) for ids in prompts)
    print(fmt, errors)
    assert all(e < KT_MODEL_BOUND[fmt] for e in errors.values()), errors


def test_native_format_needs_its_checkpoint(tiny, kt_adapter, tmp_path):
    adapter = with_manifest(kt_adapter, tmp_path / "a", expert_weight_format="fp8")
    with pytest.raises(KTChatError, match=r"config.json: expert format fp8 needs a checkpoint quantized as fp8 "
                                          r"\(quantization_config\), but this base is not quantized"):
        load_model(tiny.model, adapter, experts_backend="torch", dtype="float32", device="cpu")


def test_experts_kept_on_the_gpu_from_native_kt_weights(qbase):
    """gpu_experts_gib on kt running the checkpoint's own bytes: the kept experts (the most routed, not just the
    first ones) are those experts dequantized exactly with their LoRA; the split stays within kt's bound."""
    pytest.importorskip("kt_kernel")
    from ktchat.experts.kt_backend import unavailable_reason
    from ktchat.model import offloaded_blocks

    fmt, model_dir, adapter, reference, prompts = qbase
    if reason := unavailable_reason("merged", fmt):
        pytest.skip(reason)
    from ktchat.model.gpu_experts import expert_bytes

    def with_kept(gib):
        return load_model(model_dir, adapter, experts_backend="kt", moe_lora="merged", dtype="float32",
                          device=DEVICE, gpu_experts_gib=gib)[0]

    blocks = offloaded_blocks(with_kept(1e-9))  # sized from it: half the experts
    half = sum(b.experts.backend.spec.num_experts for b in blocks.values()) // 2
    model = with_kept(half * expert_bytes(next(iter(blocks.values()))) / 2**30)
    kept = [b.plan.resident for b in offloaded_blocks(model).values() if b.plan.resident is not None]
    assert any(max(r.experts) >= len(r.experts) for r in kept), [r.experts for r in kept]
    for ids in prompts:
        assert rel_err(logits(model, ids), logits(reference, ids)) < KT_MODEL_BOUND[fmt]
