"""kt_kernel experts vs the pure-torch reference (fp32, same weights, LoRA unmerged), on the tiny model's shapes.

Real kt_kernel, no mocks: modes this CPU's kt_kernel build lacks are skipped with the reason it gives."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ktchat.adapter import PROJS, StackedLoRA
from ktchat.errors import KTChatError
from ktchat.experts import ExpertsSpec, TorchExperts
from ktchat.experts import kt_backend
from ktchat.experts.kt_backend import KTExperts

E, H, I, K = 8, 256, 128, 2  # the tiny model: 8 experts, hidden 256, moe_intermediate 128, top-2
CHUNK = 128  # small, so that 300 tokens go through the kernel in three calls
TOL = {"bf16": 1e-2, "int8": 5e-2}  # relative L2 error vs fp32; measured ~4e-3 (bf16), ~2e-2 (int8)
MODES = [("exact", "bf16"), ("merged", "bf16"), ("merged", "int8"), ("exact", "int8")]


def spec(dtype=torch.bfloat16, hidden=H, inter=I) -> ExpertsSpec:
    return ExpertsSpec(0, E, K, hidden, inter, dtype)


def bf16_exact(t: torch.Tensor) -> torch.Tensor:
    """Values a bf16 kernel holds exactly, so kernel and reference start from the same numbers."""
    return t.bfloat16().float()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def weights():
    g = torch.Generator().manual_seed(0)
    return {p: bf16_exact(torch.randn((E, *spec().weight_shape(p)), generator=g) / spec().weight_shape(p)[1] ** 0.5)
            for p in PROJS}


def make_lora(seed: int, ranks: dict[str, int], scales: dict[str, float]) -> dict[str, StackedLoRA]:
    """A LoRA as large as the weights themselves (|s B A| ~ |W|), so getting it wrong cannot hide in tolerance."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for proj, r in ranks.items():
        fan_out, fan_in = spec().weight_shape(proj)
        a = bf16_exact(torch.randn((E, r, fan_in), generator=g) / fan_in**0.5)
        b = bf16_exact(torch.randn((E, fan_out, r), generator=g) / (r**0.5 * scales[proj]))
        out[proj] = StackedLoRA(a, b, scales[proj])
    return out


# Mixed ranks (padded by the exact kernel) and mixed scales (folded into B).
LORA = make_lora(1, {"gate": 8, "up": 4, "down": 8}, {"gate": 2.0, "up": 2.0, "down": 1.0})


def build(cls, sp, weights, lora=None, **kw):
    backend = cls(sp, **kw)
    for proj, w in weights.items():
        for e in range(E):
            backend.load_weight(proj, e, w[e].to(sp.dtype), f"expert {e} {proj}")
    if lora is not None:
        backend.set_lora(lora)
    backend.finalize()
    return backend


def reference(weights, lora, x, ids, w) -> torch.Tensor:
    ref = build(TorchExperts, spec(torch.float32), weights, lora)
    return ref.forward(x.float(), ids, w)


def routing(t: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((t, H), generator=g).bfloat16()
    ids = torch.rand((t, E), generator=g).topk(K, dim=1).indices
    w = torch.softmax(torch.randn((t, K), generator=g), dim=1)
    return x, ids, w


def kt_or_skip(moe_lora: str, method: str):
    pytest.importorskip("kt_kernel")
    reason = kt_backend.unavailable_reason(moe_lora, method)
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def backends(weights):
    cache = {}

    def get(moe_lora, method):
        if (moe_lora, method) not in cache:
            kt_or_skip(moe_lora, method)
            cache[moe_lora, method] = build(KTExperts, spec(), weights, LORA, moe_lora=moe_lora, method=method,
                                            chunk_size=CHUNK)
        return cache[moe_lora, method]

    return get


@pytest.mark.parametrize("tokens", [1, 5, 300])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(m))
def test_matches_torch_reference_with_lora(backends, weights, mode, tokens):
    kt = backends(*mode)
    x, ids, w = routing(tokens)
    out = kt.forward(x, ids, w)
    assert out.dtype == torch.bfloat16 and out.shape == (tokens, H)
    want = reference(weights, LORA, x, ids, w)
    tol = TOL[mode[1]]
    assert rel(out, want) < tol
    # The LoRA matters: the base model's answer is far outside the tolerance.
    assert rel(reference(weights, {}, x, ids, w), want) > 10 * tol


@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(m))
def test_set_lora_again_and_remove(weights, mode):
    kt_or_skip(*mode)
    tol = TOL[mode[1]]
    kt = build(KTExperts, spec(), weights, moe_lora=mode[0], method=mode[1], chunk_size=CHUNK, keep_base_weights=True)
    x, ids, w = routing(37, seed=3)
    assert rel(kt.forward(x, ids, w), reference(weights, {}, x, ids, w)) < tol  # no LoRA yet: plain experts
    same_shapes = make_lora(2, {"gate": 8, "up": 4, "down": 8}, {"gate": 2.0, "up": 2.0, "down": 1.0})
    only_up = make_lora(4, {"up": 16}, {"up": 0.5})  # one projection, another rank
    for lora in (LORA, same_shapes, only_up, {}):
        kt.set_lora(lora)
        assert rel(kt.forward(x, ids, w), reference(weights, lora, x, ids, w)) < tol, sorted(lora)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(m))
def test_base_weights_released_after_prepare(weights, mode):
    """The experts are never held twice: once the kernel has packed them, only an in-place LoRA update works."""
    kt_or_skip(*mode)
    kt = build(KTExperts, spec(), weights, LORA, moe_lora=mode[0], method=mode[1], chunk_size=CHUNK)
    kt.prepare()
    assert kt.base is None
    x, ids, w = routing(11, seed=5)
    if mode[0] == "exact":  # same rank and alpha: the kernel's LoRA buffers are refreshed in place
        same_shapes = make_lora(2, {"gate": 8, "up": 4, "down": 8}, {"gate": 2.0, "up": 2.0, "down": 1.0})
        kt.set_lora(same_shapes)
        assert rel(kt.forward(x, ids, w), reference(weights, same_shapes, x, ids, w)) < TOL[mode[1]]
    with pytest.raises(KTChatError, match="keep_base_weights"):
        kt.set_lora({})


def test_lora_set_before_finalize_and_fp32_io(weights):
    kt_or_skip("exact", "bf16")
    kt = build(KTExperts, spec(torch.float32), weights, LORA, chunk_size=CHUNK)
    x, ids, w = routing(9)
    out = kt.forward(x.float(), ids, w)
    assert out.dtype == torch.float32
    assert rel(out, reference(weights, LORA, x, ids, w)) < TOL["bf16"]


@pytest.mark.parametrize(
    "method,hidden,inter,multiple", [("bf16", 100, I, 32), ("bf16", H, 48, 32), ("int8", 96, I, 64)]
)
def test_bad_sizes_raise_before_the_kernel(method, hidden, inter, multiple):
    with pytest.raises(KTChatError, match=f"multiples of {multiple}"):
        KTExperts(spec(hidden=hidden, inter=inter), moe_lora="merged", method=method)


@pytest.mark.parametrize("kw, message", [
    ({"moe_lora": "fast"}, "moe_lora must be one of exact, merged \\(got 'fast'\\)"),
    ({"method": "mxfp4"}, "method must be one of bf16, int8, int4, fp8, rawint4 \\(got 'mxfp4'\\)"),
    ({"chunk_size": 0}, "chunk_size must be an integer >= 1 \\(got 0\\)"),
    ({"num_threads": 0}, "num_threads must be an integer >= 1 \\(got 0\\)"),
])
def test_bad_options_raise_naming_the_option(kw, message):
    with pytest.raises(KTChatError, match=f"^kt experts: {message}$"):
        KTExperts(spec(), **kw)


def test_bad_routing_raises(backends):
    kt = backends("merged", "bf16")
    x, ids, w = routing(4)
    with pytest.raises(KTChatError, match="out of range"):
        kt.forward(x, ids + E, w)
    with pytest.raises(KTChatError, match="expected"):
        kt.forward(x, ids[:, :1], w)


def test_worker_pool_is_shared_and_first_count_wins(backends, caplog):
    kt = backends("merged", "bf16")
    first = kt_backend.cpu_infer()
    assert first is kt._pool
    with caplog.at_level("WARNING", logger=kt_backend.__name__):
        assert kt_backend.cpu_infer(kt_backend.default_threads() + 3) is first
    assert "ignoring num_threads" in caplog.text


def test_import_does_not_load_kt_kernel():
    code = "import sys, ktchat.experts.kt_backend; assert 'kt_kernel' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# The AVX-512 that kt_kernel 0.7.2's avx512_bf16 build needs (AMX CPUs have it too): the builds that have its SFT
# kernels, the only ones with exact LoRA. Every build has a bf16 inference kernel (AVX2BF16_MOE in the avx2 one).
SFT_FLAGS = {"avx512f", "avx512bw", "avx512_vnni", "avx512_vbmi", "avx512_bf16"}
AUTO_PROBE = """
import logging
logging.basicConfig(level=logging.INFO, format="%(message)s")
from ktchat.experts import backend_factory
factory = backend_factory("auto")
print(factory.func.__name__, factory.keywords.get("moe_lora"))
"""


def cpu_flags() -> set[str]:
    """This CPU's flags, without underscores (the kernel spells avx512_vbmi as avx512vbmi)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return {flag.replace("_", "") for flag in line.split(":", 1)[1].split()}
    return set()


@pytest.mark.parametrize("variant", [None, "avx2"], ids=["this-cpu", "avx2-build"])
def test_auto_picks_kt_and_exact_lora_where_the_cpu_has_avx512_bf16(variant):
    """In a fresh process per kt_kernel build: this CPU's own (by /proc/cpuinfo), and the avx2 one forced."""
    pytest.importorskip("kt_kernel")
    if not Path("/proc/cpuinfo").exists():
        pytest.skip("no /proc/cpuinfo to tell what this CPU has")
    env = {k: v for k, v in os.environ.items() if k != "KT_KERNEL_CPU_VARIANT"}
    if variant:
        env["KT_KERNEL_CPU_VARIANT"] = variant
    out = subprocess.run([sys.executable, "-c", AUTO_PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    exact = variant is None and {flag.replace("_", "") for flag in SFT_FLAGS} <= cpu_flags()
    assert out.stdout.split() == ["KTExperts", "exact" if exact else "merged"], out.stderr
    assert "experts backend: kt (kt_kernel variant '" in out.stderr
    if variant:
        assert f"variant '{variant}' runs bf16 experts here, merged LoRA (no SFT kernel in this build)" in out.stderr
