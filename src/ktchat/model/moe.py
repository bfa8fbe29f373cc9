"""The MoE block that replaces a family's own: router and shared experts on the compute device, routed
experts handed to a CPU backend, so no tensor ever meets a weight on another device."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..config import check_gpu_prefill_settings
from ..engine.step import BindableExperts, bound_tokens
from ..errors import KTChatError
from ..experts import ExpertsBackend

logger = logging.getLogger(__name__)

_CPU = torch.device("cpu")


class Router(nn.Linear):
    """The expert router, kept in fp32 as the families compute it; an nn.Linear so PEFT can target it.

    Holds the fp32 [E] buffers some families' routing reads (DeepSeek-V3's e_score_correction_bias) under the
    checkpoint's names, so they load like any other tensor.
    """

    def __init__(self, hidden_size: int, num_experts: int, buffers: tuple[str, ...] = ()):
        super().__init__(hidden_size, num_experts, bias=False, dtype=torch.float32)
        for name in buffers:
            self.register_buffer(name, torch.zeros(num_experts, dtype=torch.float32))


class CPUExperts(nn.Module, BindableExperts):
    """Moves hidden states to the CPU backend and the result back; holds no parameters of its own.

    From CUDA, the copies go through pinned buffers reused from token to token (decode calls every layer
    once per token, so allocation and synchronisation cost is per-token latency). With `bind`, the engine's decode
    steps (ktchat.engine.step.bound_step) use fixed buffers and the backend's stream-queued task instead: no host
    sync at all, so a CUDA graph can hold the whole step (ktchat.engine.runner).
    """

    def __init__(self, backend: ExpertsBackend):
        super().__init__()
        self.backend = backend
        self._pinned: dict[str, torch.Tensor] = {}
        self._event = None
        # tokens -> (BoundExperts, (x, ids, weights, out) fixed CPU buffers), or None where the backend cannot bind
        self._bound: dict[int, tuple | None] = {}

    @property
    def name(self) -> str:
        return self.backend.name

    def bind(self, tokens: int, valid: int | None = None) -> bool:
        """Fixed buffers for steps of `tokens` rows (made once per size), of which the experts compute the first
        `valid` (default all); False where the backend has no stream-queued task."""
        if tokens not in self._bound:
            spec, io, pin = self.backend.spec, self.backend.io_dtype, torch.cuda.is_available()
            bufs = tuple(torch.zeros((tokens, n), dtype=dtype, pin_memory=pin) for n, dtype in (
                (spec.hidden_size, io), (spec.top_k, torch.int64), (spec.top_k, torch.float32), (spec.hidden_size, io)))
            bound = self.backend.bind(*bufs)
            self._bound[tokens] = None if bound is None else (bound, bufs)
        entry = self._bound[tokens]
        if entry is not None:
            entry[0].set_tokens(tokens if valid is None else valid)
        return entry is not None

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        return self.finish(self.stage(x, topk_ids, topk_weights), x)

    def stage(self, x, topk_ids, topk_weights):
        """Starts the copies to the CPU; from CUDA they are asynchronous, so GPU work queued next overlaps."""
        x = x.to(self.backend.spec.dtype)
        topk_ids, topk_weights = topk_ids.to(torch.int64), topk_weights.to(torch.float32)
        bound = self._bound.get(x.shape[0]) if bound_tokens() == x.shape[0] else None
        if bound is not None:
            return self._stage_bound(bound, x, topk_ids, topk_weights)
        if x.device.type != "cuda":
            return (x.to(_CPU), topk_ids.to(_CPU), topk_weights.to(_CPU)), None
        staged = tuple(self._buffer(name, t).copy_(t, non_blocking=True)
                       for name, t in (("x", x), ("ids", topk_ids), ("weights", topk_weights)))
        if self._event is None:
            self._event = torch.cuda.Event()
        self._event.record(torch.cuda.current_stream(x.device))  # the copies' stream: layers may sit on other GPUs
        return staged, self._event

    def finish(self, staged, like: torch.Tensor) -> torch.Tensor:
        """Waits for the copies only (not for later GPU work), runs the experts, sends the result back."""
        if staged[0] is _BOUND:
            _, stream, (bound, bufs) = staged
            bound.wait(stream)
            out = bufs[3]  # the copy to the device first, then the cast there (a graph replays both)
            out = out.to(like.device, non_blocking=True) if like.device.type != "cpu" else out.clone()
            return out.to(like.dtype)
        (x, ids, weights), event = staged
        if event is None:
            return self.backend.forward(x, ids, weights).to(like.device, like.dtype)
        event.synchronize()
        out = self._buffer("out", x).copy_(self.backend.forward(x, ids, weights))
        return out.to(like.device, non_blocking=True).to(like.dtype)

    def _stage_bound(self, entry, x, topk_ids, topk_weights):
        """Copies into the fixed buffers and queues the experts behind the copies: on the current CUDA stream
        (the host waits for nothing), or at once from the CPU."""
        bound, bufs = entry
        for buf, t in zip(bufs, (x, topk_ids, topk_weights)):
            buf.copy_(t.to(buf.dtype), non_blocking=True)  # converted on the device, then one plain copy
        stream = torch.cuda.current_stream(x.device).cuda_stream if x.device.type == "cuda" else None
        bound.submit(stream)
        return _BOUND, stream, entry

    def _buffer(self, name: str, like: torch.Tensor) -> torch.Tensor:
        buf = self._pinned.get(name)
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype:
            buf = self._pinned[name] = torch.empty(like.shape, dtype=like.dtype, device=_CPU, pin_memory=True)
        return buf

    def extra_repr(self) -> str:
        s = self.backend.spec
        return f"backend={self.backend.name}, experts={s.num_experts}, top_k={s.top_k}, dtype={s.dtype}"


_BOUND = object()  # marks a step staged on the bound buffers


@dataclass(frozen=True)
class MoEPlan:
    """How an OffloadedMoE computes its routed experts. load_model's wiring sets it (GPU prefill, experts kept on the
    GPU, a calibration pass counting the routing); nothing toggles a block's behaviour otherwise."""

    streamed: object = None  # experts.gpu_prefill.StreamedExperts: steps of `stream_from` tokens or more run there
    stream_from: int = 0
    resident: object = None  # experts.resident.ResidentExperts: this layer's experts kept on the GPU
    routed: torch.Tensor | None = None  # [E] counts: each routed (token, k) pair adds one to its expert


class OffloadedMoE(nn.Module):
    """router -> top-k -> CPU experts, plus shared experts (optionally sigmoid-gated); keeps the family's submodule
    names (from its `MoEArch`), so checkpoint and adapter names apply unchanged.

    The CPU experts start first (their inputs copied to the CPU asynchronously); the experts kept on the GPU and the
    shared experts are queued on the GPU while the CPU computes; the outputs are summed once the CPU is done.
    """

    def __init__(self, layer_idx: int, arch, config, router: Router, experts: CPUExperts,
                 shared_experts: nn.Module | None = None, shared_gate: nn.Module | None = None,
                 return_router_logits: bool = False):
        super().__init__()
        self.layer_idx = layer_idx
        self._names = (arch.router_attr, arch.experts_attr, arch.shared_experts_attr, arch.shared_gate_attr)
        for name, module in zip(self._names, (router, experts, shared_experts, shared_gate)):
            if module is not None:
                self.add_module(name, module)
        self._route = arch.route
        self._config = config
        self.return_router_logits = return_router_logits  # transformers 4.x Mixtral/Qwen layers unpack a tuple
        self.plan = MoEPlan()

    @property
    def router(self) -> nn.Module:
        return self._modules[self._names[0]]

    @property
    def cpu_experts(self) -> CPUExperts:
        return self._modules[self._names[1]]

    def forward(self, hidden_states: torch.Tensor):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        router = self.router
        logits = router(x.float())
        base = router.get_base_layer() if hasattr(router, "get_base_layer") else router  # PEFT may wrap it
        weights, ids = self._route(logits, base, self._config)
        if self.plan.routed is not None:
            self.plan.routed.index_add_(0, ids.reshape(-1), torch.ones(ids.numel(), device=ids.device))
        out = self._experts_and_shared(x, ids, weights).view(shape)
        return (out, logits) if self.return_router_logits else out

    def _experts_and_shared(self, x, ids, weights):
        plan, experts, shared = self.plan, self.cpu_experts, self._modules.get(self._names[2])
        if plan.streamed is not None and x.shape[0] >= plan.stream_from and x.device == plan.streamed.device:
            routed = plan.streamed.forward(self.layer_idx, x, ids, weights)
            return routed if shared is None else routed + self._shared(shared, x)
        resident = plan.resident
        cpu_weights = weights if resident is None else weights.masked_fill(resident.mask[ids], 0.0)
        staged = experts.stage(x, ids, cpu_weights)  # the CPU first; what follows is queued while it computes
        on_gpu = [resident.forward(x, ids, weights)] if resident is not None else []
        if shared is not None:
            on_gpu.append(self._shared(shared, x))
        out = experts.finish(staged, x)
        for part in on_gpu:
            out = out + part
        return out

    def _shared(self, shared: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = shared(x)
        gate = self._modules.get(self._names[3])
        return out if gate is None else torch.sigmoid(gate(x)) * out


GPU_PREFILL_DEFAULT_GIB = 4.0


def enable_gpu_prefill(model: nn.Module, tokens="auto", gib: float = GPU_PREFILL_DEFAULT_GIB):
    """Prompts of at least `tokens` tokens ("auto": where one layer's copy beats the CPU experts, measured now)
    compute the routed experts on the device of the MoE layers, streamed from the backends' host copies, which are
    pinned in place; two weight slots within `gib`. On the CPU (`tokens` an integer) it runs the same math there.
    Returns the StreamedExperts, or raises naming the setting where a backend keeps no host copy."""
    from ..experts.gpu_prefill import StreamedExperts, auto_threshold, copy_bandwidth, cpu_seconds_per_token, pin_in_place

    blocks = {m.layer_idx: m for m in model.modules() if isinstance(m, OffloadedMoE)}
    devices = {b.router.weight.device for b in blocks.values()}
    if len(devices) != 1:
        raise KTChatError(f"gpu_prefill_tokens: the MoE layers sit on {len(devices)} devices; GPU prefill streams to one")
    device = next(iter(devices))
    if tokens == "auto" and device.type != "cuda":
        raise KTChatError(f"gpu_prefill_tokens: auto measures the host-to-GPU link, but the model is on {device}")
    hosts = {idx: b.cpu_experts.backend.host_experts() for idx, b in blocks.items()}
    kept = [idx for idx, h in hosts.items() if h is None]
    if kept:
        raise KTChatError(f"gpu_prefill_tokens: the {blocks[kept[0]].cpu_experts.backend.name} experts of layer "
                          f"{kept[0]} keep no host copy to stream (kt: load with GPU prefill on, which keeps their bf16 "
                          "weights)")
    streamer = StreamedExperts(hosts, device, int(gib * 2**30))
    if device.type == "cuda":
        start = time.perf_counter()
        pinned = pin_in_place(streamer, [w for h in hosts.values() for w in h.weights.values()])
        logger.info("GPU prefill: %.1f GiB of expert weights pinned in place in %.1fs (no second copy)",
                    pinned / 2**30, time.perf_counter() - start)
    if tokens == "auto":
        layer = next(iter(hosts.values())).nbytes
        bw = copy_bandwidth(device)
        cpu = cpu_seconds_per_token(blocks[min(blocks)].cpu_experts.backend)
        tokens = auto_threshold(layer, bw, cpu)
        logger.info("GPU prefill from %d tokens: a layer's experts copy in %.1f ms (%.1f GB/s pinned); the CPU "
                    "computes a token of a layer in %.3f ms", tokens, 1e3 * layer / bw, bw / 1e9, 1e3 * cpu)
    for block in blocks.values():
        block.plan = replace(block.plan, streamed=streamer, stream_from=tokens)
    logger.info("GPU prefill: %s; prompts of %d tokens or more", streamer.describe(), tokens)
    return streamer


def check_gpu_prefill(tokens, gib, device=None) -> tuple:
    """Validates the two GPU-prefill settings before any slow work; returns (tokens, gib) normalised."""
    tokens, gib = check_gpu_prefill_settings(tokens, gib)
    gib = GPU_PREFILL_DEFAULT_GIB if gib is None else gib
    if tokens == "auto" and (str(device) == "cpu" or (device is None and not torch.cuda.is_available())):
        raise KTChatError("gpu_prefill_tokens: auto measures the host-to-GPU link, but the model is on cpu")
    return tokens, float(gib)


def wire_gpu_prefill(model: nn.Module, tokens, gib: float) -> None:
    """load_model's end: GPU prefill as the setting says (None: on CUDA, where the backends share their host copy)."""
    if tokens == "off":
        return
    blocks = [m for m in model.modules() if isinstance(m, OffloadedMoE)]
    if not blocks:
        return
    on_cuda = all(b.router.weight.device.type == "cuda" for b in blocks)
    if tokens is None:
        backend = blocks[0].cpu_experts.backend
        if not on_cuda or len({b.router.weight.device for b in blocks}) != 1:
            return
        if backend.host_experts() is None:
            logger.info("GPU prefill off: the %s experts keep no host copy to stream (gpu_prefill_tokens: auto keeps "
                        "their bf16 weights, %.1f GiB more host memory)", backend.name,
                        sum(_experts_bytes(b.cpu_experts.backend.spec) for b in blocks) / 2**30)
            return
        tokens = "auto"
    elif blocks[0].cpu_experts.backend.name == "kt":
        cost = sum(h.nbytes for b in blocks if (h := b.cpu_experts.backend.host_experts()) is not None)
        logger.info("GPU prefill: the kt experts keep their bf16 weights beside the kernel's packed copy: "
                    "%.1f GiB more host memory", cost / 2**30)
    enable_gpu_prefill(model, tokens, gib)


def _experts_bytes(spec) -> int:
    return spec.num_experts * 3 * spec.hidden_size * spec.intermediate_size * 2  # bf16 gate, up, down
