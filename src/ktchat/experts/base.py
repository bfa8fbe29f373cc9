"""The interface every CPU experts backend implements: create buffers, load weights, post-load, apply."""

from __future__ import annotations

import math
import mmap
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ..adapter import PROJS, StackedLoRA
from ..errors import KTChatError
from ..formats.quant import QuantizedWeight


@dataclass(frozen=True)
class ExpertsSpec:
    """One MoE layer's routed experts: E experts of SwiGLU MLPs (gate, up: [I, H]; down: [H, I])."""

    layer_idx: int
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    dtype: torch.dtype
    hidden_act: str = "silu"

    def weight_shape(self, proj: str) -> tuple[int, int]:
        h, i = self.hidden_size, self.intermediate_size
        return (h, i) if proj == "down" else (i, h)


@dataclass(frozen=True)
class HostExperts:
    """One layer's routed experts as a backend holds them on the host ([E, out, in] per projection), with the LoRA
    still to apply: unmerged, or merged into the weights wherever they are computed when `merge`."""

    weights: dict[str, torch.Tensor]
    lora: dict[str, StackedLoRA]
    merge: bool = False

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.weights.values())

    def subset(self, experts: list[int]) -> "HostExperts":
        """Just these experts (in this order): their weights and LoRA, copied out."""
        index = torch.tensor(experts, dtype=torch.long)
        return HostExperts({p: w[index] for p, w in self.weights.items()}, lora_rows(self.lora, experts), self.merge)


def lora_rows(lora: dict[str, StackedLoRA], experts: list[int]) -> dict[str, StackedLoRA]:
    """These experts' rows of a stacked LoRA (in this order), copied out."""
    index = torch.tensor(experts, dtype=torch.long)
    return {p: StackedLoRA(s.a[index], s.b[index], s.scale) for p, s in lora.items()}


_HUGE_PAGE = 2 << 20


def huge_page_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """torch.empty on transparent huge pages where the kernel grants them only on request (THP "madvise", the
    common default). Filling a layer's 1 GB of experts then takes about 500 page faults instead of 260,000; the
    faults, not the copy, were most of a layer's load time (and they contend with the packing threads)."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < _HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # THP compiled out or off: plain pages, as torch.empty would give
        pass
    return torch.frombuffer(buf, dtype=dtype).view(shape)  # the tensor keeps the mapping alive


class ExpertsBackend(ABC):
    """Holds one layer's routed-expert weights on the CPU and computes sum_k w_k * expert_k(x).

    Life cycle: load_weight (every expert projection, streamed once) -> finalize (all arrived) -> set_lora
    (optional; the adapter comes after the checkpoint) -> prepare (pack, quantize or fold the LoRA in, once)
    -> forward. forward prepares on first use if nobody did.
    """

    name: str = "?"

    def __init__(self, spec: ExpertsSpec):
        if spec.hidden_act != "silu":
            raise KTChatError(f"layer {spec.layer_idx}: expert activation {spec.hidden_act!r} is not supported")
        self.spec = spec
        self._loaded: set[tuple[str, int]] = set()
        self.lora: dict[str, StackedLoRA] = {}
        self.prepared = False
        self.resident = torch.zeros(spec.num_experts, dtype=torch.bool)  # experts computed on the GPU instead

    def load_weight(self, proj: str, expert: int, tensor: torch.Tensor, source: str) -> None:
        """Takes one expert projection straight from the checkpoint; `source` names it in errors."""
        self._check_new(proj, expert, tensor.shape, source)
        self._store(proj, expert, tensor)
        self._loaded.add((proj, expert))

    def load_quantized(self, proj: str, expert: int, q: QuantizedWeight, source: str) -> None:
        """Takes one expert projection stored quantized in the checkpoint (fp8, int4, ...; q.shape is its logical
        [out, in]). Contract: check the shape against the spec before anything else (same message as
        load_weight), then record the projection as loaded exactly once; `source` names the checkpoint tensor in
        errors. The default dequantizes exactly (fp32, then cast to spec.dtype) and goes through load_weight:
        the reference path, holding the experts in spec.dtype. A backend whose kernels run the native format
        overrides this to keep q's bytes (CPU memory about q.nbytes) and refuses, naming `source`, a format it
        cannot run rather than converting it silently. The loader calls it on its loading threads, concurrently
        for distinct projections of a layer."""
        if tuple(q.shape) != self.spec.weight_shape(proj):
            self._check_new(proj, expert, q.shape, source)
        self.load_weight(proj, expert, q.dequantize(torch.float32).to(self.spec.dtype), source)

    def weight_slot(self, proj: str, expert: int) -> torch.Tensor | None:
        """The CPU tensor this projection is stored in, for a loader that reads the file straight into it (then
        calls `filled`); None where the backend must convert what it is given (load_weight)."""
        return None

    def filled(self, proj: str, expert: int, shape, source: str) -> None:
        """Records a projection a loader wrote into `weight_slot` (shape as the file declares it)."""
        self._check_new(proj, expert, shape, source)
        self._loaded.add((proj, expert))

    def _check_new(self, proj: str, expert: int, shape, source: str) -> None:
        want = self.spec.weight_shape(proj)
        if tuple(shape) != want:
            raise KTChatError(f"{source}: shape {list(shape)} does not fit the model config (expected {list(want)})")
        if (proj, expert) in self._loaded:
            raise KTChatError(f"{source}: expert weight given twice")

    def finalize(self) -> None:
        """Checks that every expert weight arrived, then lets the backend pack or convert them."""
        missing = [(p, e) for p in PROJS for e in range(self.spec.num_experts) if (p, e) not in self._loaded]
        if missing:
            p, e = missing[0]
            raise KTChatError(
                f"layer {self.spec.layer_idx}: {len(missing)} routed-expert weights missing from the checkpoint "
                f"(first: expert {e} {p}_proj)"
            )
        self._finalize()

    def set_lora(self, lora: dict[str, StackedLoRA]) -> None:
        """Installs the layer's expert LoRA (possibly only some projections); {} removes it."""
        e, h, i = self.spec.num_experts, self.spec.hidden_size, self.spec.intermediate_size
        dims = {"gate": (h, i), "up": (h, i), "down": (i, h)}
        for proj, s in lora.items():
            fan_in, fan_out = dims[proj]
            r = s.a.shape[1]
            if tuple(s.a.shape) != (e, r, fan_in) or tuple(s.b.shape) != (e, fan_out, r):
                raise KTChatError(
                    f"layer {self.spec.layer_idx} {proj}_proj expert LoRA: A {list(s.a.shape)}, B {list(s.b.shape)} "
                    f"do not fit experts of shape [{fan_out}, {fan_in}] (expected A [{e}, r, {fan_in}], B [{e}, {fan_out}, r])"
                )
        self._set_lora(lora)
        self.lora = dict(lora)

    def prepare(self) -> None:
        """Turns loaded weights + LoRA into what forward runs on (kernel packing, LoRA folding); idempotent."""
        if not self.prepared:
            if len(self._loaded) != 3 * self.spec.num_experts:
                raise KTChatError(f"layer {self.spec.layer_idx}: experts used before all weights were loaded")
            self._prepare()
            self.prepared = True

    @abstractmethod
    def _store(self, proj: str, expert: int, tensor: torch.Tensor) -> None: ...

    def _finalize(self) -> None:  # noqa: B027 - optional hook
        pass

    def _prepare(self) -> None:  # noqa: B027 - optional hook
        pass

    @abstractmethod
    def _set_lora(self, lora: dict[str, StackedLoRA]) -> None: ...

    @abstractmethod
    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """x [T, H] on the CPU in spec.dtype; topk_ids [T, k] int64; topk_weights [T, k] fp32 -> [T, H]."""

    def host_experts(self) -> HostExperts | None:
        """The weights this backend keeps on the host, for computing the experts elsewhere (GPU prefill); None
        where it keeps only a packed copy of its own."""
        return None

    def gpu_copy(self, experts: list[int]) -> HostExperts:
        """These experts as this backend computes them (its weights, or their exact dequantization) with their
        LoRA: what a copy kept on the GPU runs. Raises, naming the layer, where the backend kept no such copy."""
        host = self.host_experts()
        if host is None:
            raise KTChatError(f"layer {self.spec.layer_idx}: the {self.name} experts keep no copy of their weights "
                              "to put on the GPU (load them with gpu_experts_gib set, which keeps one)")
        return host.subset(experts)

    def set_resident(self, mask: torch.Tensor) -> None:
        """The experts computed elsewhere from now on (mask [E], True: on the GPU): this backend leaves them out.
        The caller also zeroes their routing weights, so a kernel that ignores the mask still adds nothing."""
        self.resident = mask.to("cpu", torch.bool).clone()

    @property
    def io_dtype(self) -> torch.dtype:
        """The dtype forward computes hidden states in (what bound buffers hold)."""
        return self.spec.dtype

    def bind(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
             out: torch.Tensor) -> "BoundExperts | None":
        """forward on fixed CPU buffers, callable from a CUDA stream (so a CUDA graph can hold it); None where the
        backend cannot (the decode step then runs without a graph)."""
        return None


class BoundExperts(ABC):
    """The experts of one layer bound to fixed buffers: `submit` starts them, `wait` blocks until `out` is
    written. With a CUDA stream handle both are queued on that stream (host functions a graph can capture);
    with None they run now."""

    @abstractmethod
    def submit(self, stream: int | None = None) -> None: ...

    @abstractmethod
    def wait(self, stream: int | None = None) -> None: ...

    @abstractmethod
    def set_tokens(self, count: int) -> None:
        """From the next submit on, compute only the first `count` rows of the buffers (a batch padded to the size a
        graph was captured at: the padding rows cost nothing)."""
