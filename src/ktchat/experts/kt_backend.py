"""Routed experts on kt_kernel's CPU MoE kernels (its amx, avx512 or avx2 build, whichever matches this CPU).

Two ways to run the expert LoRA:
- "exact": kt_kernel's SFT kernel computes x W^T + s (x A^T) B^T unmerged, as in training;
- "merged": s * B @ A is folded into the bf16 weights, then the inference kernel (bf16, int8 or int4) runs.

We drive the raw `kt_kernel_ext` classes, not kt_kernel's Python wrappers: the inference wrappers assume CUDA
pinned memory and a CUDA stream. The raw calls check nothing, so every size, dtype and length is checked here.
kt_kernel is imported lazily: `import ktchat` must work without it. What its native code prints (the pool's
hello and goodbye, each kernel build) goes to the debug log (native_output), not into the user's conversation.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import threading
import weakref

import torch

from ..adapter import StackedLoRA, merge_lora
from ..errors import KTChatError
from ..formats import KT_METHODS, MOE_LORA_MODES, PROJS, TRAINED_METHOD  # noqa: F401 - TRAINED_METHOD re-exported
from .base import BoundExperts, ExpertsBackend, ExpertsSpec, HostExperts, huge_page_empty, lora_rows
from .kt_native import NATIVE_FORMAT, NativeWeights
from .native_output import captured

logger = logging.getLogger(__name__)

METHODS = tuple(KT_METHODS)  # the kt experts' weight formats (formats.KT_METHODS: their kernels, tiles, training)
_M_STEP = 32  # the SFT kernel's row tile; its max_len is rounded up to it
# With no backward pass, the SFT kernel's transposed-weight and activation-cache buffers can be shared by all layers.
_SFT_SHARED = {"share_backward_bb": True, "share_cache_pool": True}

_pool = None  # (CPUInfer, thread count or None when kt_kernel's own wrappers made it)
_pool_lock = threading.RLock()  # guards creation, kernel builds, and submit+sync pairs from concurrent callers
_live: weakref.WeakSet = weakref.WeakSet()  # every KTExperts: their kernels point into the pool, which must go last


def kt_ext():
    """Imports kt_kernel (which picks the CPU variant) and returns its native module."""
    try:
        import kt_kernel  # noqa: F401 - registers kt_kernel_ext for this CPU
        import kt_kernel_ext
    except Exception as exc:  # ImportError, or a native module this CPU or Python cannot load
        raise KTChatError(f"experts backend 'kt' needs the kt-kernel package, which failed to import: {exc}") from exc
    return kt_kernel_ext


def cpu_variant() -> str:
    import kt_kernel

    return str(kt_kernel.__cpu_variant__)


def kernel_class_name(moe_lora: str, method: str) -> str | None:
    """The kt_kernel_ext class a mode runs with a LoRA installed, or None if this build/CPU lacks it."""
    moe = kt_ext().moe
    names = (KT_METHODS[method].sft,) if moe_lora == "exact" else KT_METHODS[method].inference
    return next((n for n in names if hasattr(moe, n)), None)


def unavailable_reason(moe_lora: str = "exact", method: str = "bf16") -> str | None:
    """Why KTExperts cannot run this mode here (one line), or None when it can."""
    try:
        name = kernel_class_name(moe_lora, method)
    except KTChatError as exc:
        return str(exc)
    if name is None:
        want = KT_METHODS[method].sft if moe_lora == "exact" else " or ".join(KT_METHODS[method].inference)
        where = ("kt_kernel builds its SFT kernels only for AMX / AVX512-BF16 CPUs" if moe_lora == "exact"
                 else "this build's inference kernels take other kt_method formats")
        return (f"kt_kernel's '{cpu_variant()}' build for this CPU has no {want} kernel "
                f"(moe_lora={moe_lora!r}, method={method!r}; {where})")
    return None


def default_threads() -> int:
    """Three quarters of the usable cores: kt workers spin, and the rest is needed by the calling thread, the
    CUDA host-callback thread and kt's task queue. On the 16-core AMX machine, a graphed V2-Lite decode ran
    at 12 workers 42.7 ms/token, 14 44.4, 16 388 (oversubscribed), 8 61.5."""
    return max(1, len(os.sched_getaffinity(0)) * 3 // 4)


def cpu_infer(num_threads: int | None = None):
    """The process-wide kt_kernel worker pool; the first caller's thread count wins."""
    global _pool
    with _pool_lock:
        if _pool is None:
            ext = kt_ext()
            from kt_kernel.experts_base import _MoEBase  # kt_kernel's own wrappers keep one pool per process too

            shared = getattr(_MoEBase, "_cpu_infer_instance", None)
            if shared is not None:
                _pool = (shared, None)
            else:
                n = num_threads or default_threads()
                with captured("kt_kernel worker pool"):
                    _pool = (ext.CPUInfer(n), n)
                _MoEBase._cpu_infer_instance = _pool[0]
                atexit.register(_release_pool)
                logger.info("kt_kernel worker pool: %d threads (variant %s)", n, cpu_variant())
        elif num_threads and num_threads != _pool[1]:
            have = "set by kt_kernel's wrappers" if _pool[1] is None else f"{_pool[1]} threads"
            logger.warning("kt_kernel worker pool already exists (%s); ignoring num_threads=%d", have, num_threads)
        return _pool[0]


def _release_pool() -> None:
    """At exit: the pool's destructor prints "Goodbye" from C++, so it runs here, captured, rather than during the
    interpreter's teardown. The kernels point into the pool, so it must go last: with a model still referenced at
    exit (a module global), the pool is kept for good instead, and the OS reclaims its threads and memory."""
    global _pool
    gc.collect()  # models held only by reference cycles
    with _pool_lock:
        if _pool is None or _pool[1] is None:
            return
        if len(_live):
            import ctypes

            ctypes.pythonapi.Py_IncRef(ctypes.py_object(_pool[0]))  # never destroyed: no goodbye, no dangling kernel
            logger.debug("kt_kernel worker pool left to the OS at exit (%d kt experts layers still referenced)",
                         len(_live))
            return
        pool, _pool = _pool[0], None
        from kt_kernel.experts_base import _MoEBase

        if getattr(_MoEBase, "_cpu_infer_instance", None) is pool:
            _MoEBase._cpu_infer_instance = None
        with captured("kt_kernel worker pool at exit"):
            del pool


def _run(pool, task) -> None:
    with _pool_lock:
        pool.submit(task)
        pool.sync()


def _run_without_gil(pool, task) -> None:
    """_run for long tasks (kernel builds): kt_kernel's sync holds the GIL while it waits, which would stall
    every other Python thread of a parallel load. With CUDA, the task and its sync are queued on a side stream
    instead, and the wait is a CUDA event's, which releases the GIL."""
    if not torch.cuda.is_available() or not hasattr(pool, "submit_with_cuda_stream"):
        return _run(pool, task)
    with _pool_lock:
        stream = torch.cuda.Stream()
        pool.submit_with_cuda_stream(stream.cuda_stream, task)
        pool.sync_with_cuda_stream(stream.cuda_stream)
        done = torch.cuda.Event()
        done.record(stream)
        done.synchronize()


class KTExperts(ExpertsBackend):
    """kt_kernel experts. Keeps the bf16 base weights (2 bytes/param, beside the kernel's own packed copy) so that
    set_lora can be called again: to re-merge, switch kernels, or change rank."""

    name = "kt"
    io_dtype = torch.bfloat16  # the kernels' activations, whatever the model's dtype

    def __init__(
        self,
        spec: ExpertsSpec,
        *,
        moe_lora: str = "exact",
        method: str = "bf16",
        num_threads: int | None = None,
        chunk_size: int = 8192,
        keep_base_weights: bool = False,
    ):
        super().__init__(spec)
        if moe_lora not in MOE_LORA_MODES:
            raise KTChatError(f"kt experts: moe_lora must be one of {', '.join(MOE_LORA_MODES)} (got {moe_lora!r})")
        if method not in METHODS:
            raise KTChatError(f"kt experts: method must be one of {', '.join(METHODS)} (got {method!r})")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise KTChatError(f"kt experts: chunk_size must be an integer >= 1 (got {chunk_size!r})")
        if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
            raise KTChatError(f"kt experts: num_threads must be an integer >= 1 (got {num_threads!r})")
        _check_sizes(spec, method)
        reason = unavailable_reason(moe_lora, method)
        if reason:
            raise KTChatError(f"layer {spec.layer_idx}: {reason}")
        self.moe_lora, self.method, self.chunk_size = moe_lora, method, chunk_size
        self.keep_base_weights = keep_base_weights
        self._moe = kt_ext().moe
        self._pool = cpu_infer(num_threads)
        _live.add(self)
        e = spec.num_experts
        self.base = None if method in ("fp8", "rawint4") else {
            p: huge_page_empty((e, *spec.weight_shape(p)), torch.bfloat16) for p in PROJS}
        # fp8 / rawint4 always, int8 when KT's pre-converted INT8 arrives: the quantized bytes, as the kernel takes them
        self.native = NativeWeights(spec, method) if method in NATIVE_FORMAT else None
        # Everything the kernel keeps a raw pointer to lives on self as long as the kernel does.
        self._gpu_mask = torch.zeros(e, dtype=torch.bool)  # no expert of this layer lives on a GPU
        self._p2l = torch.arange(e, dtype=torch.int64)  # physical -> logical expert id: identity
        self._kernel = None
        self._kernel_lora: dict[str, torch.Tensor] = {}  # the six bf16 LoRA buffers of an SFT kernel
        self._kernel_rank, self._kernel_alpha = 0, 0.0  # of the SFT kernel in use; rank 0: inference kernel
        self._pending: dict[str, StackedLoRA] = {}

    def _store(self, proj, expert, tensor):
        if self.method in ("fp8", "rawint4"):
            raise KTChatError(f"layer {self.spec.layer_idx} expert {expert} {proj}_proj: kt_method {self.method} runs "
                              f"the checkpoint's {NATIVE_FORMAT[self.method]} weights, but this checkpoint's experts "
                              "are not quantized that way (use kt_method bf16 or int8)")
        self.base[proj][expert].copy_(tensor)

    def load_quantized(self, proj, expert, q, source):
        """fp8 / rawint4 / KT INT8 bytes go to the kernel as they are; another format is dequantized (the bf16 and
        online-quantizing kernels take bf16)."""
        if self.native is None or q.format not in ("fp8", "int4", "int8"):
            return super().load_quantized(proj, expert, q, source)
        problem = self.native.accepts(q, proj)
        if problem and self.method == "int8":  # e.g. an FP8 checkpoint: int8 quantizes its bf16 values
            return super().load_quantized(proj, expert, q, source)
        if problem:
            raise KTChatError(f"{source}: {problem}")
        self._check_new(proj, expert, q.shape, source)
        self.native.store(proj, expert, q)
        self._loaded.add((proj, expert))

    def _bf16_weights(self) -> dict[str, torch.Tensor]:
        """The bf16 weights [E, out, in]: as loaded, or the native ones dequantized (merged LoRA needs them)."""
        return self.native.dequantized() if self._runs_native else self.base

    @property
    def _runs_native(self) -> bool:
        return self.native is not None and (self.method != "int8" or self.native.complete)

    def weight_slot(self, proj, expert):
        if self.method in ("fp8", "rawint4"):
            return None
        return None if self.prepared or self.base is None else self.base[proj][expert]

    def _prepare(self) -> None:
        self._build()
        if not self.keep_base_weights:
            self.base = None  # the kernel packed its own copy: never hold the experts twice
            if self.native is not None:
                self.native.release_sources()

    def host_experts(self) -> HostExperts | None:
        """The bf16 base weights, kept beside the kernel's packed copy only with keep_base_weights; the LoRA is
        merged (moe_lora merged, whatever `method`: bf16 on the GPU) or applied unmerged (exact) where they run."""
        if self.base is None:
            return None
        return HostExperts(self.base, dict(self._pending), merge=self.moe_lora == "merged")

    def gpu_copy(self, experts):
        """Native fp8 / int4 / KT INT8 bytes: those experts dequantized exactly, one at a time."""
        if self.base is not None or not self._runs_native:
            return super().gpu_copy(experts)
        weights = {p: torch.stack([self.native.weights[p][e].dequantize(torch.float32) for e in experts])
                   .to(torch.bfloat16) for p in PROJS}
        return HostExperts(weights, lora_rows(self._pending, experts), merge=self.moe_lora == "merged")

    def set_resident(self, mask):
        super().set_resident(mask)
        self._gpu_mask.copy_(self.resident)  # the kernel reads it at every call: those experts are skipped

    def release_host_copy(self) -> None:
        """Drops the bf16 copy kept for the GPU (the kernel's packed copy stays)."""
        self.base = None

    def _set_lora(self, lora: dict[str, StackedLoRA]) -> None:
        self._pending = {p: s for p, s in lora.items() if s.a.shape[1] > 0}
        if not self.prepared:
            return
        kept = self.base is not None or (self.native is not None and self.native.complete)
        if not kept and not self._updates_in_place(self._pending):
            raise KTChatError(
                f"layer {self.spec.layer_idx}: changing the expert LoRA after the kernel was built needs the base "
                "weights, which were released (build the backend with keep_base_weights=True, or reload the model)"
            )
        self._build()

    def _updates_in_place(self, lora: dict[str, StackedLoRA]) -> bool:
        """An exact-mode LoRA of the kernel's rank and alpha only refreshes the kernel's LoRA buffers."""
        if self.moe_lora != "exact" or not lora or self._kernel_rank == 0:
            return False
        rank, scale = _kernel_rank_scale(lora)
        return self._fits_kernel(rank, scale * rank)

    def _fits_kernel(self, rank: int, alpha: float) -> bool:
        return rank == self._kernel_rank and abs(alpha - self._kernel_alpha) <= 1e-12 * max(1.0, abs(alpha))

    def _build(self) -> None:
        """(Re)creates the kernel for the current LoRA: inference kernel without one or when merged, else SFT."""
        lora = self._pending
        if not lora:
            self._load_inference(None if self._runs_native else self.base)
        elif self.moe_lora == "merged":
            self._load_inference(_merge(self._bf16_weights(), lora))
        else:
            self._load_sft(lora)

    def _load_inference(self, weights: dict[str, torch.Tensor] | None) -> None:
        """The inference kernel on bf16 `weights`, or on the native bytes (None). Merged into bf16, a native
        method's weights run on the bf16 kernel (the quantized kernels take only their own format)."""
        spec = self.spec
        method = "bf16" if weights is not None and self.method in ("fp8", "rawint4") else self.method
        cls = getattr(self._moe, kernel_class_name("merged", method))
        cfg = self._moe.MOEConfig(
            spec.num_experts, spec.top_k, spec.hidden_size, spec.intermediate_size, self._gpu_mask.data_ptr()
        )
        cfg.layer_idx = spec.layer_idx
        cfg.pool = self._pool.backend_
        cfg.max_len = self.chunk_size
        if weights is None:
            self.native.configure(cfg)
        else:
            cfg.gate_proj, cfg.up_proj, cfg.down_proj = (weights[p].data_ptr() for p in PROJS)
        kernel = self._create(cls, cfg, self._p2l.data_ptr())  # packs (and quantizes) a copy of the weights
        self._kernel, self._kernel_lora, self._kernel_rank = kernel, {}, 0

    def _load_sft(self, lora: dict[str, StackedLoRA]) -> None:
        rank, alpha, bufs = self._kernel_lora_buffers(lora)
        if self._fits_kernel(rank, alpha):
            for name, t in bufs.items():  # same shapes: update in place, as after an optimizer step
                self._kernel_lora[name].copy_(t)
            self._kernel.update_lora_weights(*(self._kernel_lora[n].data_ptr() for n in _LORA_NAMES))
            return
        spec = self.spec
        cfg = self._moe.MOESFTConfig(spec.num_experts, spec.top_k, spec.hidden_size, spec.intermediate_size)
        cfg.expert_num, cfg.num_experts_per_tok = spec.num_experts, spec.top_k
        cfg.hidden_size, cfg.intermediate_size = spec.hidden_size, spec.intermediate_size
        cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout = rank, alpha, 0.0
        cfg.max_cache_depth = 1
        for flag, value in _SFT_SHARED.items():
            setattr(cfg, flag, value)
        cfg.max_len = -(-self.chunk_size // _M_STEP) * _M_STEP
        cfg.layer_idx = spec.layer_idx
        cfg.physical_to_logical_map = self._p2l.data_ptr()
        cfg.gpu_experts_mask = self._gpu_mask.data_ptr()  # experts kept on the GPU: skipped here (set_resident)
        if self._runs_native:
            self.native.configure(cfg, stacked=self.method == "rawint4")  # the K2 SFT kernel takes stacked tensors
        else:
            cfg.gate_proj, cfg.up_proj, cfg.down_proj = (self.base[p].data_ptr() for p in PROJS)
        for name, t in bufs.items():
            setattr(cfg, name, t.data_ptr())
        cfg.pool = self._pool.backend_
        kernel = self._create(getattr(self._moe, KT_METHODS[self.method].sft), cfg)
        kernel.update_lora_weights(*(bufs[n].data_ptr() for n in _LORA_NAMES))  # refreshes its cached copies
        self._kernel, self._kernel_lora, self._kernel_rank, self._kernel_alpha = kernel, bufs, rank, alpha

    def _create(self, cls, cfg, *load_args):
        self._kernel = None  # frees the old kernel's packed weights before new ones are packed
        try:  # one build at a time on the shared pool (parallel loading calls this from threads)
            with _pool_lock, captured(f"layer {self.spec.layer_idx}: kt_kernel {cls.__name__}"):
                kernel = cls(cfg)
                _run_without_gil(self._pool, kernel.load_weights_task(*load_args))
        except RuntimeError as exc:  # kt_kernel's own checks (sizes, ISA); crashes are prevented by _check_sizes
            layer = self.spec.layer_idx
            raise KTChatError(f"layer {layer}: kt_kernel {cls.__name__} refused this layer: {exc}") from exc
        return kernel

    def _kernel_lora_buffers(self, lora: dict[str, StackedLoRA]) -> tuple[int, float, dict[str, torch.Tensor]]:
        """One rank and one alpha for all projections, as the kernel wants: smaller ranks and absent projections are
        zero-padded (exact); a projection whose scale differs from the largest gets it folded into its B."""
        spec = self.spec
        rank, ref = _kernel_rank_scale(lora)
        e, h, i = spec.num_experts, spec.hidden_size, spec.intermediate_size
        bufs = {}
        for proj in PROJS:
            fan_in, fan_out = (i, h) if proj == "down" else (h, i)
            a = torch.zeros((e, rank, fan_in), dtype=torch.bfloat16)
            b = torch.zeros((e, fan_out, rank), dtype=torch.bfloat16)
            if proj in lora:
                s = lora[proj]
                r = s.a.shape[1]
                a[:, :r].copy_(s.a)
                ratio = s.scale / ref if ref else 1.0
                b[:, :, :r].copy_(s.b if ratio == 1.0 else s.b.float() * ratio)
            bufs[f"{proj}_lora_a"], bufs[f"{proj}_lora_b"] = a, b
        if len({s.scale for s in lora.values()}) > 1:
            logger.debug("layer %d: expert LoRA scales differ per projection; folded into B", spec.layer_idx)
        return rank, ref * rank, bufs

    @torch.no_grad()
    def forward(self, x, topk_ids, topk_weights):
        self.prepare()
        spec = self.spec
        t = x.shape[0]
        if x.dim() != 2 or x.shape[1] != spec.hidden_size or tuple(topk_ids.shape) != (t, spec.top_k) or (
            tuple(topk_weights.shape) != (t, spec.top_k)
        ):
            raise KTChatError(
                f"layer {spec.layer_idx}: kt experts got x {list(x.shape)}, topk_ids {list(topk_ids.shape)}, "
                f"topk_weights {list(topk_weights.shape)}; expected [T, {spec.hidden_size}] and [T, {spec.top_k}]"
            )
        if t == 0:
            return torch.zeros_like(x)
        xb = x.to(device="cpu", dtype=torch.bfloat16).contiguous()
        ids = topk_ids.to(device="cpu", dtype=torch.int64).contiguous()
        w = topk_weights.to(device="cpu", dtype=torch.float32).contiguous()
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= spec.num_experts:
            bad = lo if lo < 0 else hi
            raise KTChatError(f"layer {spec.layer_idx}: expert id {bad} out of range 0..{spec.num_experts - 1}")
        out = torch.empty_like(xb)
        for s in range(0, t, self.chunk_size):  # the kernel's buffers hold chunk_size tokens; more overruns the heap
            bsz = torch.tensor([min(self.chunk_size, t - s)], dtype=torch.int32)  # per call: callers must not share it
            _run(self._pool, self._task(bsz, ids[s], w[s], xb[s], out[s]))
        return out if x.dtype == torch.bfloat16 else out.to(x.dtype)

    def _task(self, bsz, ids, weights, x, out):
        """The kernel's forward task on these CPU buffers (bsz: int32 [1], the token count; the rest from their
        first token): SFT kernel with the LoRA, or inference kernel. It keeps no backward cache (SFT) and is not
        incremental (inference): the last False."""
        call = self._kernel.forward_sft_task if self._kernel_rank > 0 else self._kernel.forward_task
        return call(bsz.data_ptr(), self.spec.top_k, ids.data_ptr(), weights.data_ptr(), x.data_ptr(), out.data_ptr(),
                    False)

    def bind(self, x, topk_ids, topk_weights, out):
        if torch.cuda.is_available() and not hasattr(self._pool, "submit_with_cuda_stream"):
            return None  # a kt_kernel built without CUDA cannot queue its tasks on a stream
        self.prepare()
        spec, t = self.spec, x.shape[0]
        want = {"x": ((t, spec.hidden_size), torch.bfloat16), "topk_ids": ((t, spec.top_k), torch.int64),
                "topk_weights": ((t, spec.top_k), torch.float32), "out": ((t, spec.hidden_size), torch.bfloat16)}
        for name, buf in zip(want, (x, topk_ids, topk_weights, out)):
            shape, dtype = want[name]
            if tuple(buf.shape) != shape or buf.dtype != dtype or buf.device.type != "cpu" or not buf.is_contiguous():
                raise KTChatError(f"layer {spec.layer_idx}: kt experts cannot bind {name} {list(buf.shape)} "
                                  f"{buf.dtype} on {buf.device}; expected a contiguous CPU {list(shape)} {dtype}")
        if not 0 < t <= self.chunk_size:
            raise KTChatError(f"layer {spec.layer_idx}: kt experts bind 1..{self.chunk_size} tokens, got {t}")
        return _BoundKT(self, x, topk_ids, topk_weights, out)


class _BoundKT(BoundExperts):
    """One kernel task on fixed buffers. kt_kernel's task is a (function, arguments) pair it never frees, so the
    same task can be queued again and again: by each replay of a graph that captured it."""

    def __init__(self, experts: KTExperts, x, topk_ids, topk_weights, out):
        self._experts, self._buffers = experts, (x, topk_ids, topk_weights, out)  # the task points into these
        self._bsz = torch.tensor([x.shape[0]], dtype=torch.int32)
        self._kernel = experts._kernel
        self._task = experts._task(self._bsz, topk_ids, topk_weights, x, out)

    def submit(self, stream=None):
        if self._kernel is not self._experts._kernel:  # the LoRA was changed and the kernel rebuilt since
            raise KTChatError(f"layer {self._experts.spec.layer_idx}: kt experts were rebuilt after bind(); bind again")
        pool = self._experts._pool
        if stream is None:
            pool.submit(self._task)
        else:
            pool.submit_with_cuda_stream(stream, self._task)

    def wait(self, stream=None):
        pool = self._experts._pool
        if stream is None:
            pool.sync()
        else:
            pool.sync_with_cuda_stream(stream)

    def set_tokens(self, count):
        if not 0 < count <= self._buffers[0].shape[0]:
            raise KTChatError(f"layer {self._experts.spec.layer_idx}: kt experts bound to "
                              f"{self._buffers[0].shape[0]} rows cannot compute {count}")
        self._bsz[0] = count  # read by the task when it runs (a replayed graph's too)


def _kernel_rank_scale(lora: dict[str, StackedLoRA]) -> tuple[int, float]:
    """The SFT kernel's one rank (the largest) and one scale (the largest in size) for all projections."""
    return max(s.a.shape[1] for s in lora.values()), max((s.scale for s in lora.values()), key=abs)


_LORA_NAMES = tuple(f"{p}_lora_{ab}" for p in PROJS for ab in "ab")


def _check_sizes(spec: ExpertsSpec, method: str) -> None:
    """The kernels tile weights in blocks; other sizes crash them, so refuse before any native call."""
    align = KT_METHODS[method].align  # other sizes crash the bf16 kernel (SIGSEGV) and fail the others at load
    h, i = spec.hidden_size, spec.intermediate_size
    if h % align or i % align or h <= 0 or i <= 0:
        raise KTChatError(
            f"layer {spec.layer_idx}: kt_kernel's {method} experts need hidden_size and moe_intermediate_size "
            f"to be positive multiples of {align}; this model has {h} and {i} (use experts_backend: torch"
            + (", or method bf16" if method != "bf16" and h % 32 == 0 and i % 32 == 0 else "")
            + ")"
        )
    if not 0 < spec.top_k <= spec.num_experts:
        raise KTChatError(f"layer {spec.layer_idx}: top_k {spec.top_k} must be in 1..{spec.num_experts}")


def _merge(base: dict[str, torch.Tensor], lora: dict[str, StackedLoRA]) -> dict[str, torch.Tensor]:
    """merge_lora per expert, rounded once to bf16 (one expert at a time: a low fp32 peak)."""
    merged = {}
    for proj, w in base.items():
        if proj not in lora:
            merged[proj] = w
            continue
        s = lora[proj]
        out = torch.empty_like(w)
        for e in range(w.shape[0]):
            out[e] = merge_lora(w[e], s.a[e], s.b[e], s.scale)
        merged[proj] = out
    return merged


def auto_choice(method: str = "bf16") -> tuple[bool, str]:
    """For experts_backend "auto": kt where one of its `method` kernels runs on this CPU, else torch; and why."""
    reason = unavailable_reason("merged", method)
    if reason:
        return False, reason
    exact = unavailable_reason("exact", method) is None
    mode = "exact LoRA (SFT kernel)" if exact else "merged LoRA (no SFT kernel in this build)"
    return True, f"kt_kernel variant '{cpu_variant()}' runs {method} experts here, {mode}"


def kt_int8_writer():
    """kt_kernel's own online-quantize-and-save (AMXInt8_MOE with save=True), or None where this build lacks it."""
    try:
        moe = kt_ext().moe
    except KTChatError:
        return None
    if not hasattr(moe, "AMXInt8_MOE"):
        return None

    def write(root, layer: int, weights: dict[str, torch.Tensor]) -> None:
        e, i, h = weights["gate"].shape
        pool = cpu_infer()
        mask, p2l = torch.zeros(e, dtype=torch.bool), torch.arange(e, dtype=torch.int64)
        cfg = moe.MOEConfig(e, min(2, e), h, i, mask.data_ptr())
        cfg.layer_idx, cfg.pool, cfg.max_len = layer, pool.backend_, _M_STEP
        cfg.save, cfg.load, cfg.path = True, False, str(root)
        cfg.gate_proj, cfg.up_proj, cfg.down_proj = (weights[p].data_ptr() for p in PROJS)
        with captured(f"layer {layer}: kt_kernel AMXInt8_MOE save"):
            kernel = moe.AMXInt8_MOE(cfg)
            _run(pool, kernel.load_weights_task(p2l.data_ptr()))
        del kernel

    return write
