"""KT-mode loading: build the model on `meta`, swap each MoE block for an `OffloadedMoE`, then stream the
checkpoint once: routed-expert tensors straight into the CPU backend, everything else to the compute device."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..formats.checkpoint import Header, QuantLayout, open_checkpoint, quant_layout, st_name
from ..engine.hf import generation_class
from ..errors import KTChatError
from ..experts import ExpertsSpec
from ..formats import PROJS
from ..formats.quant import quantization_config
from .moe import CPUExperts, OffloadedMoE, Router
from .placement import placement_of
from .registry import FUSED_PROJS, MoEArch, decoder_layer
from .routes import EXPERT, FUSED, PARAM, SKIPPED, ModelNames, Route, route_checkpoint

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class Skeleton:
    model: nn.Module
    arch: MoEArch
    moe_blocks: dict[int, OffloadedMoE]


def build_skeleton(config, arch: MoEArch, make_backend, dtype: torch.dtype) -> Skeleton:
    """The family's own model class with empty weights, its MoE blocks replaced by `OffloadedMoE`."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False), _no_init_weights():
        # the family's class with ktchat's generate (engine.hf): callers of model.generate take ktchat's loop
        model = generation_class(arch.auto_class()._model_mapping[type(config)])._from_config(config)
        _own_layers(model, arch, config)
    for module in arch.vision_modules:  # their checkpoint tensors are skipped, with a log line (arch.skip_tensor)
        parent, _, name = module.rpartition(".")
        setattr(model.get_submodule(parent), name, None)
    blocks = {}
    for idx, layer in enumerate(model.get_submodule(arch.layers_path)):
        block = install_block(layer, arch)
        if hasattr(block, arch.experts_attr):  # else a dense layer
            blocks[idx] = _offloaded(idx, block, arch, config, make_backend, dtype)
            install_block(layer, arch, blocks[idx])
    if not blocks:
        raise KTChatError(f"{config.model_type}: the model has no MoE layers to offload")
    arch.patch_model(model.get_submodule(arch.layers_path), arch.text_config(config))
    return Skeleton(model, arch, blocks)


def _own_layers(model: nn.Module, arch: MoEArch, config) -> None:
    """The decoder layers' modules the registry names (arch.owned_layers), built again as ktchat's subclass of their
    transformers class (same parameters, same names), so they run on the engine's cache."""
    text = arch.text_config(config)
    for layer in model.get_submodule(arch.layers_path):
        for name, build in arch.owned_layers:
            module = getattr(layer, name, None)
            owned = build(module, text) if module is not None else None
            if owned is not None:
                setattr(layer, name, owned)


def _no_init_weights():
    """transformers' own switch that skips random init: on meta weights it still cost 0.6 s at V2-Lite size."""
    try:
        from transformers.initialization import no_init_weights  # 5.x
    except ImportError:
        from transformers.modeling_utils import no_init_weights  # 4.x
    return no_init_weights()


def _offloaded(idx: int, block: nn.Module, arch: MoEArch, config, make_backend, dtype) -> OffloadedMoE:
    import transformers

    num_experts, top_k, inter = arch.spec_sizes(config)
    config = arch.text_config(config)
    spec = ExpertsSpec(idx, num_experts, top_k, config.hidden_size, inter, dtype, config.hidden_act)
    with torch.device("meta"):
        router = Router(config.hidden_size, num_experts, arch.router_buffers)
    shared, gate = (getattr(block, a) if a else None for a in (arch.shared_experts_attr, arch.shared_gate_attr))
    v4 = transformers.__version__.startswith("4.")
    return OffloadedMoE(idx, arch, config, router, CPUExperts(make_backend(spec)), shared, gate,
                        return_router_logits=arch.tuple_output_v4 and v4)


def install_block(layer: nn.Module, arch: MoEArch, block: nn.Module | None = None) -> nn.Module:
    """Returns the layer's MoE/MLP block, moved (or replaced by `block`) under the checkpoint's name `arch.moe_attr`.

    Where the running transformers calls it otherwise (Mixtral's `mlp` in 5.x for `block_sparse_moe`), that name is
    kept on the layer as a plain attribute pointing to the same block (not a registered submodule, so the block has
    one name in every module path, which matches the checkpoint and per-expert adapters in both majors): the
    layer's forward still finds it.
    """
    names = (arch.moe_attr, *arch.moe_attr_aliases)
    current = next((n for n in names if n in layer._modules), None)
    if current is None:
        raise KTChatError(f"{type(layer).__name__} has none of the MoE block names {names}: transformers changed it")
    items = list(layer._modules.items())
    layer._modules.clear()  # rebuilt in the same order, the block renamed and/or replaced
    for name, module in items:
        if name == current:
            name, module = arch.moe_attr, (module if block is None else block)
        layer._modules[name] = module
    for alias in arch.moe_attr_aliases:
        if alias == current or alias in layer.__dict__:  # the name this transformers' forward reads
            object.__setattr__(layer, alias, layer._modules[arch.moe_attr])  # not nn.Module's: no second registration
    return layer._modules[arch.moe_attr]


def load_checkpoint(skeleton: Skeleton, model_dir: Path, placement, dtype: torch.dtype,
                    before_prepare: Callable[[int], None] | None = None, routed_int8=None) -> ExpertLoading:
    """Streams every tensor once to where its route says (model.routes); a tensor that belongs nowhere fails
    before any is read, and so does anything left empty after.

    Routed-expert tensors are read by a pool of threads straight from the file into their backend's buffers,
    then each layer's experts are prepared (packed, LoRA folded) in turn. This returns once everything else is in
    place, with the experts still loading: the caller can do other work, then must call `.wait()`. `placement` is
    a device, or {module name: device} (a device map; "" is the whole model). `before_prepare(layer)` runs (on a
    loading thread) before a layer is prepared: it waits for what else the layer's kernel needs (its LoRA).
    `routed_int8`: the folder of KT's pre-converted INT8 experts, read instead of the checkpoint's.
    """
    from tqdm.auto import tqdm

    model, arch = skeleton.model, skeleton.arch
    checkpoint = open_checkpoint(model_dir)  # every header read and checked here, before any weight moves
    layout = quant_layout(checkpoint, quantization_config(model.config), str(model_dir / "config.json"))
    routes = route_checkpoint(arch, checkpoint, layout, ModelNames.of(model, skeleton.moe_blocks),
                              arch.text_config(model.config))
    int8 = _open_int8(routed_int8, skeleton.moe_blocks)  # checked before any weight is read too
    bar = tqdm(total=len(routes), desc="Loading weights", unit="tensor", disable=None)
    experts = ExpertLoading(skeleton.moe_blocks, bar, before_prepare)
    with experts.cancel_on_error():
        # Expert reads are queued first, in layer order, then their packing: the threads start at once, while the
        # rest of the checkpoint loads here.
        taken = _queue_expert_reads(experts, checkpoint, layout, routes, int8)
        experts.pack_after_reads()
        destinations = _Destinations(skeleton, placement, dtype, layout, experts, bar)
        loaded = _consume(checkpoint, routes, taken, destinations)
        _check_complete(model, loaded, destinations.params, destinations.where_is)
    return experts


def _open_int8(root: Path | None, blocks: dict[int, OffloadedMoE]):
    """KT's INT8 set (kt_weights.KTInt8Experts) checked against these MoE layers' sizes, or None."""
    if root is None:
        return None
    from ..formats.kt_weights import open_int8_experts

    spec = next(iter(blocks.values())).cpu_experts.backend.spec
    return open_int8_experts(root, num_experts=spec.num_experts, hidden_size=spec.hidden_size,
                             intermediate_size=spec.intermediate_size, layers=sorted(blocks))


def _queue_expert_reads(experts: ExpertLoading, checkpoint, layout: QuantLayout, routes: dict[str, Route],
                        int8) -> set[str]:
    """Queues the loading threads' reads and returns the on-disk names they take. With KT's INT8, every routed-expert
    tensor of the checkpoint is left unread. Else each plain expert tensor whose slot takes its bytes as they are,
    and each quantized expert projection (its weight and scales, one task, handed to backend.load_quantized)."""
    if int8 is not None:
        taken = {name for name, route in routes.items() if route.kind in (EXPERT, FUSED)}
        experts.replace_with_kt_int8(int8, unread=len(taken))
        return taken
    taken = set()
    for name in sorted((n for n, r in routes.items() if r.kind == EXPERT), key=lambda n: routes[n].order):
        route, file = routes[name], checkpoint.files[name]
        if route.quantized is not None:
            taken.add(name)
            names = layout.modules[route.quantized].names
            if name == names["data"]:
                parts = {role: (checkpoint.headers[checkpoint.files[n]], n) for role, n in names.items()}
                experts.read_quantized(layout, route.quantized, parts, *route.order, f"{file.name}: {route.quantized}")
        elif experts.read_into_slot(checkpoint.headers[file], name, *route.order, f"{file.name}: {name}"):
            taken.add(name)
    return taken


def _consume(checkpoint, routes: dict[str, Route], taken: set[str], destinations: _Destinations) -> set[str]:
    """The shards read in turn on this thread, every tensor the loading threads did not take put where its route
    says; returns the model names consumed (the threads' included)."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name, file in checkpoint.files.items():
        if name not in taken:
            by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        try:
            handle = safe_open(str(file), framework="pt")
        except Exception as exc:
            raise KTChatError(f"{file}: cannot read checkpoint shard ({type(exc).__name__}: {exc})") from None
        with handle as shard:
            for name in names:
                destinations.put(name, routes[name], shard, file.name)
    destinations.log_skipped()
    return destinations.loaded | {routes[name].key for name in taken}


class _Destinations:
    """Puts each tensor read on this thread where its route says; remembers the model names consumed."""

    def __init__(self, skeleton: Skeleton, placement, dtype: torch.dtype, layout: QuantLayout,
                 experts: ExpertLoading, bar):
        self.model, self.dtype, self.experts, self.bar = skeleton.model, dtype, experts, bar
        self.transposed = skeleton.arch.fused_transposed
        self.where_is = placement_of(placement)
        self.keep_fp32 = _fp32_names(self.model)
        self.params = dict(self.model.named_parameters())  # as built: what must be loaded (or tied)
        self.meta = {**self.params, **dict(self.model.named_buffers())}
        self.parts = _QuantizedParts(layout)
        self.loaded: set[str] = set()
        self.skipped: dict[str, list[str]] = {}

    def put(self, name: str, route: Route, shard, file: str) -> None:
        """Tensor `name` of the open `shard`; a quantized module's tensors once its last one has arrived."""
        if route.quantized is None:
            self._put(route, lambda: shard.get_tensor(name), f"{file}: {name}", 1)
            return
        where = f"{file}: {route.quantized}"
        q = self.parts.add(name, shard, where)
        if q is not None:
            count = len(self.parts.layout.modules[route.quantized].names)
            self._put(route, lambda: _dequantized_on(q, self.where_is(route.key)), where, count)

    def _put(self, route: Route, read: Callable[[], torch.Tensor], where: str, count: int) -> None:
        if route.kind == PARAM:
            self._assign(route.key, read(), where)
        elif route.kind == EXPERT:  # one the backend cannot take as stored: converted here
            self.experts.load(route.layer, route.expert, route.proj, read().to(self.dtype), where)
        elif route.kind == FUSED:
            _load_fused(self.experts, route, read().to(self.dtype), self.transposed, where)
        elif route.kind == SKIPPED:
            self.skipped.setdefault(route.reason, []).extend([route.key] * count)
        if route.kind not in (EXPERT, FUSED):  # experts count as their backend takes them
            self.bar.update(count)
        self.loaded.add(route.key)

    def _assign(self, key: str, tensor: torch.Tensor, where: str) -> None:
        meta = self.meta[key]
        if tuple(tensor.shape) != tuple(meta.shape):
            raise KTChatError(f"{where}: shape {list(tensor.shape)} does not fit the model config "
                              f"(expected {list(meta.shape)})")
        module_name, _, tname = key.rpartition(".")
        module = self.model.get_submodule(module_name)
        dtype = torch.float32 if key in self.keep_fp32 else self.dtype
        tensor = tensor.to(device=self.where_is(key), dtype=dtype)
        if tname in module._buffers:
            module._buffers[tname] = tensor
        else:
            module._parameters[tname] = nn.Parameter(tensor, requires_grad=False)

    def log_skipped(self) -> None:
        for reason, names in self.skipped.items():
            logger.info("skipped %d checkpoint tensors of %s: %s", len(names), _layers_of(names), reason)


def _check_complete(model, loaded: set[str], params: dict, where_is) -> None:
    """Every parameter loaded (or tied), every buffer loaded or computed; buffers moved where their module is."""
    _tie_or_fail(model, loaded, params)
    for mname, module in model.named_modules():
        for bname, buf in module._buffers.items():
            if buf is not None and buf.is_meta:
                raise KTChatError(f"checkpoint is missing {mname}.{bname}, which the model needs")
            if buf is not None:
                module._buffers[bname] = buf.to(where_is(f"{mname}.{bname}"))


class ExpertLoading:
    """Routed experts read on threads (os.preadv into each backend's own buffer: one copy, no GIL), then every
    layer packed in turn on one of those threads once the reads are done. `wait` joins them, packs what came
    the slow way (converted on the caller's thread), raises the first error and checks that every expert weight
    arrived: once it returns, every layer's experts are prepared.

    Reading and packing take turns rather than overlap: kt_kernel's workers spin between tasks, and readers racing
    them slowed both (AMX machine: 5.2-5.7 s for what takes 1.1 s of reading and 2.4 s of packing apart). The
    memory is the same either way: a layer's read buffer is freed as the layer is packed.
    """

    def __init__(self, blocks: dict[int, OffloadedMoE], bar, before_prepare: Callable[[int], None] | None = None):
        from concurrent.futures import ThreadPoolExecutor

        self._blocks, self._bar, self._before_prepare = blocks, bar, before_prepare
        self._missing = {layer: 3 * b.cpu_experts.backend.spec.num_experts for layer, b in blocks.items()}
        self._packed: set[int] = set()
        self._lock = threading.Lock()
        self._stopped = False
        self._pool = ThreadPoolExecutor(max_workers=max(1, min(16, len(os.sched_getaffinity(0)) // 2)),
                                        thread_name_prefix="ktchat-load")
        self._futures, self._files = [], {}

    def pack_after_reads(self) -> None:
        """Queues the packing behind every read queued so far (call once they all are)."""
        reads = list(self._futures)
        self._futures.append(self._pool.submit(self._pack_after, reads))

    def wait(self) -> None:
        self._close(cancel=False)
        for future in self._futures:
            future.result()  # the first error of a read or a build
        self._pack_complete()  # layers completed on the caller's thread
        for block in self._blocks.values():
            block.cpu_experts.backend.finalize()  # names what never arrived

    @contextlib.contextmanager
    def cancel_on_error(self):
        """Stops the threads if the caller's own loading fails (its error is the one raised)."""
        try:
            yield self
        except BaseException:
            self._close(cancel=True)
            raise

    def _close(self, cancel: bool) -> None:
        self._stopped = self._stopped or cancel  # the packing stops at the next layer
        self._pool.shutdown(wait=True, cancel_futures=cancel)
        for fd in self._files.values():
            os.close(fd)
        self._files = {}
        self._bar.close()

    def replace_with_kt_int8(self, int8, unread: int) -> None:
        """Queues the reads of KT's INT8 experts (kt_weights.KTInt8Experts), one layer per task, in place of the
        checkpoint's `unread` routed-expert tensors."""
        def read(layer: int) -> None:
            backend = self._blocks[layer].cpu_experts.backend
            for e in range(backend.spec.num_experts):
                for proj in PROJS:
                    where = f"{int8.root}: layer {layer} expert {e} {proj}_proj"
                    backend.load_quantized(proj, e, int8.weight(layer, e, proj), where)
                    self._arrived(layer)

        self._bar.update(unread)
        self._futures += [self._pool.submit(read, layer) for layer in sorted(self._blocks)]

    def read_into_slot(self, header: Header, name: str, layer: int, expert: int, proj: str, where: str) -> bool:
        """Queues the read of one tensor into its slot; False where it needs converting (load it instead)."""
        backend = self._blocks[layer].cpu_experts.backend
        slot = backend.weight_slot(proj, expert)
        entry = header.tensors.get(name)
        if slot is None or not slot.is_contiguous() or entry is None or entry.dtype.name != st_name(slot.dtype):
            return False
        backend.filled(proj, expert, entry.shape, where)  # shape and duplicate checks first
        if entry.nbytes != slot.nbytes:
            raise KTChatError(f"{where}: {entry.nbytes} bytes on disk for a tensor of {slot.nbytes}")
        offset = header.data_start + entry.start
        self._futures.append(self._pool.submit(self._read, self._fd(header.path), offset, slot, layer, where))
        return True

    def load(self, layer: int, expert: int, proj: str, tensor: torch.Tensor, where: str) -> None:
        self._blocks[layer].cpu_experts.backend.load_weight(proj, expert, tensor, where)
        self._arrived(layer)

    def _fd(self, file: Path) -> int:
        if file not in self._files:
            try:
                self._files[file] = os.open(file, os.O_RDONLY)
            except OSError as exc:
                raise KTChatError(f"{file}: cannot open checkpoint shard ({exc.strerror or exc})") from None
        return self._files[file]

    def read_quantized(self, layout: QuantLayout, module: str, parts: dict[str, tuple[Header, str]], layer: int,
                       expert: int, proj: str, where: str) -> None:
        """Queues the read of one quantized expert projection (its tensors by role: (header, name), from any shard)
        and its hand-over to the backend, both on a loading thread; its buffers are allocated there, one
        projection at a time."""
        reads = [(role, self._fd(header.path), header.data_start + header.tensors[name].start, header.tensors[name])
                 for role, (header, name) in parts.items()]
        self._futures.append(self._pool.submit(self._read_quantized, layout, module, reads, layer, expert, proj,
                                               where))

    def _read_quantized(self, layout, module, reads, layer, expert, proj, where) -> None:
        tensors = {}
        for role, fd, offset, entry in reads:
            tensors[role] = torch.empty(entry.shape, dtype=entry.dtype.torch)
            self._read_bytes(fd, offset, tensors[role], where)
        q = layout.assemble(module, tensors, where)
        self._blocks[layer].cpu_experts.backend.load_quantized(proj, expert, q, where)
        with self._lock:
            self._bar.update(len(reads) - 1)
        self._arrived(layer)

    def _read(self, fd: int, offset: int, slot: torch.Tensor, layer: int, where: str) -> None:
        self._read_bytes(fd, offset, slot, where)
        self._arrived(layer)

    @staticmethod
    def _read_bytes(fd: int, offset: int, slot: torch.Tensor, where: str) -> None:
        view = memoryview((ctypes.c_char * slot.nbytes).from_address(slot.data_ptr())).cast("B")
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise KTChatError(f"{where}: the file ends inside this tensor")
            done += n

    def _arrived(self, layer: int) -> None:
        with self._lock:
            self._missing[layer] -= 1
            self._bar.update(1)

    def _pack_after(self, reads) -> None:
        # Future.result, not concurrent.futures.wait: shutdown(cancel_futures=True) can drain a read from the queue
        # while this task is being taken off it, and a future cancelled that way never wakes wait() (it hung CI).
        for read in reads:
            try:
                read.result()
            except Exception:  # failed or cancelled: ExpertLoading.wait raises the error
                return
        self._pack_complete()

    def _pack_complete(self) -> None:
        for layer, block in sorted(self._blocks.items()):
            if self._stopped:
                return
            if self._missing[layer] == 0 and layer not in self._packed:
                if self._before_prepare is not None:
                    self._before_prepare(layer)
                block.cpu_experts.backend.finalize()
                block.cpu_experts.backend.prepare()
                self._packed.add(layer)


def _dequantized_on(q, device) -> torch.Tensor:
    """A non-expert weight dequantized where it will live: its FP8 / INT4 bytes cross to the GPU, not bf16's, and
    the GPU dequantizes (a DeepSeek-V3 layer's 231M non-expert parameters take 2.4 s on 2 CPU cores)."""
    if torch.device(device).type != "cpu":
        q = dataclasses.replace(q, data=q.data.to(device), scale=q.scale.to(device))
    return q.dequantize(torch.float32)


class _QuantizedParts:
    """Collects each quantized module's tensors as the shards stream by (a weight and its scales may sit in
    different shards); hands back the module's QuantizedWeight once the last arrives."""

    def __init__(self, layout: QuantLayout):
        self.layout = layout
        self._pending: dict[str, dict[str, torch.Tensor]] = {}

    def add(self, name: str, handle, where: str):
        """The module's QuantizedWeight once `name` completes it, else None; `where` names it in errors."""
        module = self.layout.member[name]
        qm = self.layout.modules[module]
        role = next(r for r, n in qm.names.items() if n == name)
        parts = self._pending.setdefault(module, {})
        parts[role] = handle.get_tensor(name)
        if len(parts) < len(qm.names):
            return None
        del self._pending[module]
        return self.layout.assemble(module, parts, where)


def _load_fused(experts: ExpertLoading, route: Route, tensor: torch.Tensor, transposed: bool, where: str) -> None:
    """One layer's fused expert tensor (transformers 5's layout, or both transposed) loaded expert by expert."""
    if tensor.dim() != 3:
        raise KTChatError(f"{where}: a fused expert tensor must be 3-D [experts, out, in], got {list(tensor.shape)}")
    tensor = tensor.transpose(1, 2) if transposed else tensor
    projs = FUSED_PROJS[route.proj]
    if tensor.shape[1] % len(projs):
        raise KTChatError(f"{where}: gate_up_proj rows {tensor.shape[1]} are not gate and up rows of one size")
    for proj, part in zip(projs, tensor.chunk(len(projs), dim=1)):
        for e in range(part.shape[0]):
            experts.load(route.layer, e, proj, part[e].contiguous(), f"{where}[{e}]")


def _layers_of(names: list[str]) -> str:
    """What the skipped tensors are: their decoder layers (model.layers.3,4), else their common module path."""
    found = [decoder_layer(n) for n in names]
    if all(found) and len({path for path, _ in found}) == 1:
        return f"{found[0][0]}.{','.join(str(i) for i in sorted({i for _, i in found}))}"
    common = os.path.commonprefix([n.split(".") for n in names])
    if len(common) >= 2:
        return ".".join(common)
    return ", ".join(sorted({".".join(n.split(".")[:2]) for n in names}))  # e.g. a VLM's tower and projector


def _fp32_names(model) -> set[str]:
    """Tensors the family keeps in fp32 whatever the dtype: our routers' and `_keep_in_fp32_modules` (a mark is a
    module name or a dotted path, e.g. DeepSeek-V3.2's indexer.weights_proj)."""
    marks = [f".{m}." for m in getattr(model, "_keep_in_fp32_modules", None) or []]
    names = set()
    for mname, module in model.named_modules():
        own = [n for n, _ in module.named_parameters(recurse=False)] + [n for n, _ in module.named_buffers(recurse=False)]
        for tname in own:
            full = f"{mname}.{tname}" if mname else tname
            if isinstance(module, Router) or any(m in f".{full}." for m in marks):
                names.add(full)
    return names


def _tie_or_fail(model, loaded: set[str], params: dict) -> None:
    missing = [n for n in params if n not in loaded]
    if missing and getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise KTChatError(f"checkpoint is missing {len(missing)} tensors the model needs (first: {missing[0]})")
