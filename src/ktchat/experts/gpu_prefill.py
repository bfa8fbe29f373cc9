"""Routed experts of long prompts computed on the GPU, their weights streamed from the backends' host copy.

A layer's experts (1.1 GB in bf16 at DeepSeek-V2-Lite's shape) cross the host-to-GPU link in about 20 ms pinned,
and compute 2,048 tokens in under a millisecond there; the CPU takes far longer once a prompt has a few hundred
tokens. So each MoE layer's experts are copied, in order, into one of two device slots on a side stream while the
previous slot computes; a layer that does not fit the memory bound goes in groups of experts.

The same code runs on the CPU (device "cpu"): copies are plain and nothing overlaps, but grouping, LoRA application
and the routing combination are the ones the GPU runs, so the tests check them against the fp32 reference.
"""

from __future__ import annotations

import logging
import time
import weakref

import torch
import torch.nn.functional as F

from ..adapter import PROJS, merge_lora
from ..errors import KTChatError
from .base import HostExperts

logger = logging.getLogger(__name__)

_MERGE_BATCH = 16  # experts merged at once (W + s B A in fp32: 185 MB at DeepSeek-V2-Lite's shape)


class StreamedExperts:
    """Every MoE layer's routed experts, computed on `device` from their host copies (`HostExperts` by layer).

    `max_bytes` bounds the two weight slots together; a layer is split into `group` experts at a time to fit.
    The expert LoRA stays on the device ([E, r, in] and [E, out, r]: a few MB a layer): applied unmerged
    (x W^T + s (x A^T) B^T), or, for a layer marked `merge`, folded into the slot's weights once they arrive
    (W + s B A in fp32, rounded once, as the CPU backends merge).
    """

    def __init__(self, layers: dict[int, HostExperts], device, max_bytes: int):
        if not layers:
            raise KTChatError("GPU prefill: the model has no routed experts to stream")
        self.device = torch.device(device)
        self.order = sorted(layers)
        self.host = layers
        first = layers[self.order[0]]
        self.num_experts = first.weights["gate"].shape[0]
        self.dtype = first.weights["gate"].dtype
        per_expert = sum(w[0].nbytes for w in first.weights.values())
        self.group = min(self.num_experts, max_bytes // (2 * per_expert))
        if self.group < 1:
            raise KTChatError(f"gpu_prefill_gib: {max_bytes / 2**30:.3g} GiB cannot hold two experts "
                              f"({2 * per_expert / 2**20:.1f} MiB); raise it")
        self.chunks = [(layer, lo) for layer in self.order for lo in range(0, self.num_experts, self.group)]
        self._index = {c: i for i, c in enumerate(self.chunks)}
        slot = {p: torch.empty((self.group, *w.shape[1:]), dtype=self.dtype, device=self.device)
                for p, w in first.weights.items()}
        self._slots = [slot, {p: torch.empty_like(w) for p, w in slot.items()}]
        self.slot_bytes = 2 * sum(w.nbytes for w in slot.values())
        self._lora = {layer: {p: (s.a.to(self.device, self.dtype), s.b.to(self.device, self.dtype), s.scale)
                              for p, s in h.lora.items()} for layer, h in layers.items()}
        cuda = self.device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self._arrived = [torch.cuda.Event() if cuda else None for _ in range(2)]  # slot's copy done
        self._freed = [torch.cuda.Event() if cuda else None for _ in range(2)]  # slot's compute done
        self._in_slot: list[int | None] = [None, None]  # chunk index copied (or being copied) into each slot
        self.host_bytes = sum(h.nbytes for h in layers.values())
        self.grouped = None if hasattr(torch, "_grouped_mm") else False  # None: try it on the first group

    def _issue(self, chunk: int) -> int:
        """Starts copying chunk into the slot the previous chunk does not use; returns the slot."""
        s = chunk % 2
        if self._in_slot[s] == chunk:
            return s
        layer, lo = self.chunks[chunk]
        host, n = self.host[layer], min(self.group, self.num_experts - lo)
        slot = self._slots[s]
        if self._copy_stream is None:
            for p in PROJS:
                slot[p][:n].copy_(host.weights[p][lo:lo + n])
        else:
            with torch.cuda.stream(self._copy_stream):
                self._copy_stream.wait_event(self._freed[s])  # the slot's last chunk has finished computing
                for p in PROJS:
                    slot[p][:n].copy_(host.weights[p][lo:lo + n], non_blocking=True)
                self._arrived[s].record(self._copy_stream)
        self._in_slot[s] = chunk
        return s

    def _ready(self, chunk: int) -> dict[str, torch.Tensor]:
        """The slot holding chunk, once its copy is done (the compute stream waits, not the host), merged if so."""
        s = self._issue(chunk)
        if self._copy_stream is not None:
            torch.cuda.current_stream(self.device).wait_event(self._arrived[s])
        layer, lo = self.chunks[chunk]
        slot = self._slots[s]
        if self.host[layer].merge:
            n = min(self.group, self.num_experts - lo)
            for p, (a, b, scale) in self._lora[layer].items():
                for i in range(0, n, _MERGE_BATCH):  # a few experts at a time: a small fp32 peak
                    j = min(n, i + _MERGE_BATCH)
                    w = slot[p][i:j]
                    w.copy_(merge_lora(w, a[lo + i:lo + j], b[lo + i:lo + j], scale))
        return slot

    def _release(self, chunk: int) -> None:
        """The slot's weights are used (and maybe merged in place): free for the chunk after next."""
        s = chunk % 2
        self._in_slot[s] = None
        if self._copy_stream is not None:
            self._freed[s].record(torch.cuda.current_stream(self.device))

    @torch.no_grad()
    def forward(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """sum_k w_k expert_k(x) for one layer, as the CPU backends compute it: x [T, H] on `device`."""
        first = self._index.get((layer, 0))
        if first is None:
            raise KTChatError(f"GPU prefill: layer {layer} has no streamed experts")
        k = topk_ids.shape[1]
        flat = topk_ids.reshape(-1)
        order = torch.argsort(flat, stable=True)  # token slots grouped by expert
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()  # the one host sync of a layer
        token = order // k
        xs = x.to(self.dtype)[token]
        ys = torch.empty_like(xs)
        lora = self._lora[layer]
        merged = self.host[layer].merge
        starts = [0]
        for c in counts:
            starts.append(starts[-1] + c)
        self._issue(first)  # nothing before when this is the prompt's first layer (or the last one stopped short)
        for chunk in range(first, first + -(-self.num_experts // self.group)):
            if chunk + 1 < len(self.chunks):
                self._issue(chunk + 1)  # overlaps this chunk's compute (and the next layer's attention)
            slot = self._ready(chunk)
            lo = self.chunks[chunk][1]
            hi = min(lo + self.group, self.num_experts)
            self._group(slot, lo, hi, starts, xs, ys, None if merged else lora)
            self._release(chunk)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        out.index_add_(0, token, ys.float() * topk_weights.reshape(-1)[order, None].float())
        return out.to(x.dtype)

    def _group(self, slot, lo: int, hi: int, starts: list[int], xs, ys, lora) -> None:
        """Experts lo..hi-1 on their rows of xs (sorted by expert) into ys: one grouped matmul per projection where
        torch has one for this device and dtype (a few kernels a group, not a dozen an expert), else expert by
        expert; both compute the same products."""
        first, last = starts[lo], starts[hi]
        if first == last:
            return
        if self.grouped is not False:
            offs = torch.tensor(starts[lo + 1:hi + 1], dtype=torch.int32).sub_(first).to(self.device, non_blocking=True)
            try:
                ys[first:last] = _grouped_experts(slot, lo, hi, offs, xs[first:last], lora)
                self.grouped = True
                return
            except (RuntimeError, NotImplementedError) as exc:  # no kernel for this device/dtype/stride here
                if self.grouped:
                    raise
                logger.info("GPU prefill: expert by expert (no grouped matmul here: %s)", str(exc).splitlines()[0])
                self.grouped = False
        for e in range(lo, hi):
            a, b = starts[e], starts[e + 1]
            if a != b:
                ys[a:b] = _expert(slot, e - lo, e, xs[a:b], lora)

    def describe(self) -> str:
        groups = -(-self.num_experts // self.group)
        split = "" if groups == 1 else f" in {groups} groups of {self.group} experts"
        return (f"{len(self.order)} layers' routed experts ({self.host_bytes / 2**30:.1f} GiB {str(self.dtype)[6:]}) "
                f"streamed to {self.device}{split}, {self.slot_bytes / 2**30:.2f} GiB of slots")


def _grouped_experts(slot, lo: int, hi: int, offs: torch.Tensor, x: torch.Tensor, lora) -> torch.Tensor:
    """_expert for experts lo..hi-1 at once: x's rows sorted by expert, offs their cumulative counts (int32)."""
    n = hi - lo

    def mm(h, w):  # w [n, out, in]: every row block of h times its expert's w^T
        return torch._grouped_mm(h, w.transpose(-2, -1), offs=offs)

    def project(p, h):
        y = mm(h, slot[p][:n])
        if lora and p in lora:
            a, b, scale = lora[p]
            y = y + mm(mm(h, a[lo:hi]), b[lo:hi]) * scale
        return y

    return project("down", F.silu(project("gate", x)) * project("up", x))


def _expert(slot, i: int, e: int, x: torch.Tensor, lora) -> torch.Tensor:
    """One expert's SwiGLU MLP: slot row i holds expert e's weights; lora (unmerged) by projection, or None."""
    def project(p, h):
        y = F.linear(h, slot[p][i])
        if lora and p in lora:
            a, b, scale = lora[p]
            y = y + F.linear(F.linear(h, a[e]), b[e]) * scale
        return y

    return project("down", F.silu(project("gate", x)) * project("up", x))


# --- host memory: pinned in place ---------------------------------------------------------------------------------

def pin_in_place(owner, tensors: list[torch.Tensor]) -> int:
    """Page-locks the host tensors where they are (cudaHostRegister), so copies from them run at the pinned rate
    (55 GB/s vs 8.8 pageable on the H200 machine) without a second copy; unregistered when `owner` is collected
    (which must keep them referenced until then). Returns the bytes registered; pinned tensors are left alone, and
    one that cannot be pinned (a page shared with one already registered) is copied from pageable memory."""
    cudart = torch.cuda.cudart()
    done, failed = [], []
    for t in tensors:
        if t.is_pinned():
            continue
        err = int(cudart.cudaHostRegister(t.data_ptr(), t.nbytes, 0))
        (done if err == 0 else failed).append(t if err == 0 else err)
    if failed:
        logger.warning("GPU prefill: %d expert tensors stay pageable (cudaHostRegister error %d): slower copies",
                       len(failed), failed[0])
    weakref.finalize(owner, _unregister, done)
    return sum(t.nbytes for t in done)


def _unregister(tensors) -> None:
    cudart = torch.cuda.cudart()
    for t in tensors:
        cudart.cudaHostUnregister(t.data_ptr())


# --- when the GPU pays off -----------------------------------------------------------------------------------------

def copy_bandwidth(device, nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Pinned host-to-device copy rate in bytes/s, the best of `repeats`."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def cpu_seconds_per_token(backend, tokens: int = 128, repeats: int = 3) -> float:
    """The CPU backend's time per token for one layer, on random routing (the best of `repeats`)."""
    spec = backend.spec
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(tokens, spec.hidden_size, generator=gen) * 0.02).to(backend.io_dtype)
    ids = torch.stack([torch.randperm(spec.num_experts, generator=gen)[:spec.top_k] for _ in range(tokens)])
    w = torch.full((tokens, spec.top_k), 1.0 / spec.top_k)
    backend.forward(x, ids, w)  # warm
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        backend.forward(x, ids, w)
        best = min(best, time.perf_counter() - start)
    return best / tokens


def auto_threshold(layer_bytes: int, copy_bytes_per_s: float, cpu_s_per_token: float) -> int:
    """The prompt length from which one layer's copy (what the GPU path waits for) takes less than the CPU path."""
    return max(1, int(layer_bytes / copy_bytes_per_s / cpu_s_per_token) + 1)
