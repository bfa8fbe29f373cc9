"""Decoding with a static KV cache and, on a CUDA device, one CUDA graph per token.

A KT-mode decode step crosses to the CPU once per MoE layer. Run eagerly, every crossing waits on the host
and every small GPU kernel pays a Python launch, which costs more than the experts themselves on a
DeepSeek-V2-Lite-sized model. Here the step runs on fixed buffers: the KV cache is a transformers
`StaticCache`, the attention mask is computed on the device from the cache position, and the routed experts
are queued on the CUDA stream as host functions (`CPUExperts.bind`), so the whole token, CPU experts
included, is captured once and replayed. Without CUDA the same step runs eagerly (that is how CI tests it).

Only the common case takes this path: one sequence, no beams, no cache of the caller's own. Everything
else runs `generate` and `forward` unchanged.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading

import torch
from torch import nn

from . import mla
from .registry import arch_for
from .moe import CPUExperts

logger = logging.getLogger(__name__)

_CACHE_KEYS = ("past_key_values", "cache")  # transformers 5 renames the first to the second
_MIN_CACHE = 512
# Absorbed MLA keeps only the latent (V2-Lite: 31 KB a token over 27 layers) and a step's cost barely grows with the
# cache's length: start long, so a growing chat is not carried over and re-captured every doubling
_MIN_CACHE_ABSORBED = 4096


class StaticDecode:
    """Installed on a transformers causal LM (the innermost one under PEFT): wraps its `generate` to hand it a
    reused StaticCache, and its `forward` to run one-token steps on that cache as a replayed graph."""

    def __init__(self, model: nn.Module, cuda_graphs: bool):
        self.model = model
        self.cuda_graphs = cuda_graphs
        self._generate, self._forward = model.generate, model.forward
        self._experts = [m for m in model.modules() if isinstance(m, CPUExperts)]
        self._lock = threading.Lock()
        self.cache, self.cache_len = None, 0
        self.held: list[int] = []  # the tokens whose KV the static cache holds (the last conversation)
        self.keep_conversation = True  # False: every generate prefills its whole prompt (benchmarks compare)
        self.reused = 0  # prompt tokens the last generate did not prefill again
        self.eager_reason: str | None = None  # why this model cannot decode on a static cache, once known
        self._signature = None
        self._static: dict[str, torch.Tensor] = {}
        self._graph = self._output = None
        self._bound: list[CPUExperts] = []  # the experts bound to the step's fixed buffers
        # transformers 5.x renames past_key_values to cache, model by model: the forward's signature tells
        self._cache_kwarg = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
        model.generate, model.forward = self.generate, self.forward
        model.static_decode = self
        self._lora_layers = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "disable_adapters")]
        self._adapters_held = None  # the PEFT adapter state the held conversation was computed under
        # MLA (DeepSeek-V2/V3) steps attend on the latent cache, absorbed: the step's GPU time stays flat with context
        self.absorbed = mla.install(model, _absorbed_rope(model.config))

    def generate(self, *args, **kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        total = self._tokens_needed(input_ids, kwargs)
        if total is None:
            return self._generate(*args, **kwargs)
        with self._lock:  # one cache: one generation at a time
            if not self._cache_for(total, input_ids[0].tolist()):
                return self._generate(*args, **kwargs)
            if _disable_compile_known():
                kwargs.setdefault("disable_compile", True)  # transformers would torch.compile a static-cache model
            try:
                out = self._generate(*args, **{self._cache_kwarg: self.cache}, **kwargs)
            except BaseException:
                self.held = []  # whatever the cache holds now is not known
                raise
            sequence = out if torch.is_tensor(out) else out.sequences
            self.held = sequence[0, :int(self.cache.get_seq_length())].tolist()
            return out

    def forward(self, *args, **kwargs):
        cache = next((kwargs[k] for k in _CACHE_KEYS if kwargs.get(k) is not None), None)
        ids = kwargs.get("input_ids")
        if (args or cache is None or cache is not self.cache or ids is None or tuple(ids.shape) != (1, 1)
                or kwargs.get("inputs_embeds") is not None):
            return self._forward(*args, **kwargs)
        return self._step(kwargs)

    def _tokens_needed(self, input_ids, kwargs) -> int | None:
        """Cache length this call needs, or None where it is not the one-sequence case."""
        config = kwargs.get("generation_config") or self.model.generation_config
        setting = lambda name: kwargs.get(name, getattr(config, name, None))  # noqa: E731
        if (not torch.is_tensor(input_ids) or input_ids.dim() != 2 or input_ids.shape[0] != 1
                or any(kwargs.get(k) is not None for k in (*_CACHE_KEYS, "inputs_embeds", "assistant_model"))
                or (setting("num_beams") or 1) != 1 or (setting("num_return_sequences") or 1) != 1
                or setting("cache_implementation") is not None):
            return None
        new = setting("max_new_tokens")
        return input_ids.shape[1] + new if new is not None else setting("max_length")

    def _cache_for(self, total: int, prompt: list[int]) -> bool:
        """Reuses the cache when it is long enough, else makes one (powers of two, so few sizes ever get captured).

        A reused cache keeps the tokens the prompt shares with what it holds (the conversation so far), cut back to
        them: generate then prefills only the rest, and its tokens equal a fresh prefill's."""
        self.reused = 0
        if self.eager_reason is not None:
            return False
        keep = 0
        adapters = self._adapter_state()
        if self.keep_conversation and self.cache is not None and adapters == self._adapters_held:
            keep = min(common_prefix(self.held, prompt), len(prompt) - 1)
        self._adapters_held = adapters
        if self.cache is not None and self.cache_len >= total:
            if keep > 0:
                _truncate(self.cache, keep)
                self.held, self.reused = self.held[:keep], keep
            else:
                self.cache.reset()
                self.held = []
            return True
        old, self.held = self.cache, self.held[:keep]
        from transformers import StaticCache

        limit = getattr(self.model.config, "max_position_embeddings", None) or total
        least = max(_MIN_CACHE, _MIN_CACHE_ABSORBED if any(a.enabled for a in self.absorbed) else 0)
        size = max(total, min(limit, max(least, 1 << (total - 1).bit_length())))
        self._graph = self._output = self._signature = None
        self.cache = None
        try:
            cache = StaticCache(config=self.model.config, max_cache_len=size)
        except (KeyError, ValueError, TypeError, NotImplementedError) as exc:
            return self._eager(f"transformers' StaticCache cannot hold this model's cache ({type(exc).__name__}: "
                               f"{exc})")
        layers = getattr(cache, "layers", [None])
        other = sorted({type(layer).__name__ for layer in layers} - {"StaticLayer"})
        if other:
            # the mask here is full-length, and a linear-attention layer's conv / recurrent state (Qwen3.5-MoE's
            # Gated DeltaNet) or an indexer's own key cache (DeepSeek-V3.2) is not what the step's mask describes
            kind = "linear-attention" if any("LinearAttention" in n for n in other) else "non-KV"
            return self._eager(f"the cache has {kind} layers ({', '.join(other)})")
        if not _separate_value_width(type(layers[0])):
            return self._eager("this transformers' StaticCache stores values as wide as keys")
        self.cache, self.cache_len = cache, size
        if keep > 0 and _carry_over(old, cache, keep):  # a conversation outgrowing its cache keeps what it had
            self.reused = keep
        else:
            self.held = []
        return True

    def _adapter_state(self):
        """What the held KV depends on besides the tokens: which adapters are on, merged, and their weights' versions
        (a disabled, switched or reloaded adapter makes the held conversation stale)."""
        return tuple((repr(m.active_adapters), m.disable_adapters, getattr(m, "merged", None),
                      tuple(p._version for p in m.parameters())) for m in self._lora_layers)

    def _eager(self, reason: str) -> bool:
        """The model's cache has no static form: said once, then every generate runs eagerly."""
        self.eager_reason = reason
        logger.info("static decode off: %s; decoding is eager", reason)
        return False

    def _step(self, kwargs):
        tensors = {k: v for k, v in kwargs.items() if torch.is_tensor(v) and k != "attention_mask"}
        # attention_mask (a tensor, or transformers 5's {layer type: mask}) is replaced by the step's own
        rest = {k: v for k, v in kwargs.items() if not torch.is_tensor(v) and k not in (*_CACHE_KEYS, "attention_mask")}
        try:
            signature = (tuple((k, tuple(v.shape), v.dtype, v.device) for k, v in sorted(tensors.items())),
                         tuple(sorted(rest.items())), next(k for k in _CACHE_KEYS if k in kwargs))
            hash(signature)
        except TypeError:  # an argument we cannot freeze into a graph
            return self._forward(**kwargs)
        if signature == self._signature:
            for name, value in tensors.items():
                self._static[name].copy_(value)
            if self._graph is None:
                return self._run()
            for attn in self.absorbed:
                attn.refresh()  # an adapter changed since the capture: its buffers are rewritten in place
            self._graph.replay()
            # Wait here, asleep: generate's own sync right after would spin a core for the whole token, and the
            # kt workers need every core they were given.
            self._replayed.record()
            self._replayed.synchronize()
            return self._output
        self._signature, self._rest, self._cache_key = signature, rest, signature[2]
        self._static = {k: v.clone() for k, v in tensors.items()}
        self._graph = self._output = None
        self._bound = [e for e in self._experts if e.bind(1)]
        if self._position() is None:
            logger.warning("static decode off: cannot tell the cache position from %s", sorted(kwargs))
            self._signature = None
            return self._forward(**kwargs)
        output = self._run()  # also the warm-up a capture needs (lazy initialisations happen outside it)
        if self.cuda_graphs:
            self._capture()
        return output

    def _position(self):
        """The index this step writes in the cache, as a device tensor (so a replay reads the current one):
        transformers 4.x and early 5.x pass cache_position, later 5.x keep a counter in each cache layer."""
        for name in ("cache_position", "position_ids"):
            if name in self._static:
                return self._static[name].reshape(-1)[-1]
        counter = getattr(self.cache.layers[0], "cumulative_length", None) if getattr(self.cache, "layers", None) else None
        return counter if torch.is_tensor(counter) else None

    def _run(self):
        """The step on the static buffers, eager or being captured; the mask shows the cache up to this token."""
        dtype, position = self.model.dtype, self._position()
        hidden = torch.arange(self.cache_len, device=position.device) > position
        mask = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device).masked_fill_(hidden, torch.finfo(dtype).min)
        for e in self._bound:
            e.use_bound = True
        try:
            return self._forward(**self._static, **self._rest, attention_mask=mask.view(1, 1, 1, -1),
                                 **{self._cache_key: self.cache})
        finally:
            for e in self._bound:
                e.use_bound = False

    def _capture(self) -> None:
        """Captures the step just run eagerly; capturing executes nothing, so the cache is written once."""
        if len(self._bound) != len(self._experts):
            logger.warning("decode runs without CUDA graphs: the %s experts backend cannot be queued on a CUDA stream",
                           self._experts[0].backend.name)
            self.cuda_graphs = False
            return
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                output = self._run()
        except Exception as exc:  # noqa: BLE001 - an uncapturable model still decodes, eagerly
            logger.warning("decode runs without CUDA graphs: capture failed (%s)", str(exc).splitlines()[0])
            self.cuda_graphs = False
            return
        self._graph, self._output = graph, output
        self._replayed = torch.cuda.Event(blocking=True)
        logger.debug("decode step captured as a CUDA graph (static cache of %d tokens)", self.cache_len)


def _truncate(cache, keep: int) -> None:
    """The static cache made to hold its first `keep` tokens only: the rest zeroed (older transformers count the
    filled slots) and the layers' counters set (newer ones keep one)."""
    for layer in cache.layers:
        layer.keys[:, :, keep:].zero_()
        layer.values[:, :, keep:].zero_()
        if torch.is_tensor(getattr(layer, "cumulative_length", None)):
            layer.cumulative_length.fill_(keep)


def _carry_over(old, new, keep: int) -> bool:
    """Copies the first `keep` tokens of a smaller static cache into a new, empty one; False where it cannot."""
    try:
        for src, dst in zip(old.layers, new.layers, strict=True):
            if not getattr(src, "is_initialized", False):
                return False
            dst.lazy_initialization(src.keys, src.values)
            dst.keys[:, :, :keep].copy_(src.keys[:, :, :keep])
            dst.values[:, :, :keep].copy_(src.values[:, :, :keep])
            if torch.is_tensor(getattr(dst, "cumulative_length", None)):
                dst.cumulative_length.fill_(keep)
    except (AttributeError, RuntimeError, TypeError, ValueError):
        new.reset()
        return False
    return int(new.get_seq_length()) == keep


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two id lists share."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


@functools.cache
def _separate_value_width(layer_type) -> bool:
    """transformers 4.x sizes a static layer's values like its keys, which DeepSeek's attention (MLA) overflows."""
    layer = layer_type(max_cache_len=2)
    try:
        layer.lazy_initialization(torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 2))
    except TypeError:
        return False
    return layer.values.shape[-1] == 2


@functools.cache
def _disable_compile_known() -> bool:
    from transformers import GenerationConfig

    return hasattr(GenerationConfig(), "disable_compile")


def _inner(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (the one StaticDecode is installed on)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def static_decode_of(model: nn.Module) -> StaticDecode | None:
    """The StaticDecode installed on `model` (a PEFT model is looked through), or None."""
    return getattr(_inner(model), "static_decode", None)


def enable_static_decode(model: nn.Module, cuda_graphs: bool) -> StaticDecode:
    """Installs StaticDecode on `model` (a PEFT model is looked through); returns it."""
    existing = static_decode_of(model)
    return existing if existing is not None else StaticDecode(_inner(model), cuda_graphs)


def _absorbed_rope(config):
    """The family's rope for absorbed MLA (MoEArch.absorbed_mla), or None: not MLA, or a model ktchat's registry
    does not know (left as it is)."""
    try:
        return arch_for(config).absorbed_mla
    except Exception:  # noqa: BLE001
        return None
