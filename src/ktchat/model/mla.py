"""Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2) decoded in its absorbed form on ktchat's cache.

transformers 5 caches MLA's compressed latent (kv_a_proj_with_mqa's output after kv_a_layernorm, and the shared
rope key) but, at every step, decompresses the whole cache through kv_b_proj before attending: on a static cache
that is a [cache length, kv_lora_rank] x [kv_lora_rank, heads * (nope + v)] product per layer per token, so the GPU
part of a decode step grows with the context. Absorbed, kv_b_proj's key half (W_UK) multiplies the query and its
value half (W_UV) the attention output; a step then reads the latent cache once and its context-dependent cost is
heads * (2 * kv_lora_rank + rope) per cached token.

The LoRA stays exact: q, kv_a and o projections run their own (PEFT) forwards, and the absorption uses kv_b_proj's
effective weight, W + s * B @ A for the active adapters, read off the module itself (its forward on the identity),
held in a fixed buffer and refreshed in place whenever the module's weights or adapter state change.

The attention is built as a subclass of transformers' own class (`absorbed`, at load), so prefill and every call
that is not a one-token step on ktchat's cache run transformers' forward unchanged.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys

import torch
from torch import nn

from ..engine.cache import SlotCache
from ..engine.step import Refreshable

logger = logging.getLogger(__name__)

_FIELDS = ("kv_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm", "o_proj", "q_lora_rank", "kv_lora_rank",
           "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "num_heads", "scaling", "layer_idx")


# The rope of each family's attention, as transformers' own module-level functions apply it (named per family in
# the registry: MoEArch.owned_layers).

def rope_freqs_cis(attn, q_pe, k_pe, position_embeddings):
    """DeepSeek-V2: complex frequencies."""
    return _functions(attn).apply_rotary_emb(q_pe, k_pe, position_embeddings.to(q_pe.device))


def rope_cos_sin(attn, q_pe, k_pe, position_embeddings):
    """DeepSeek-V3: cos / sin, interleaved where the config says so."""
    cos, sin = position_embeddings
    module = _functions(attn)
    if getattr(attn.config, "rope_interleave", False):
        return module.apply_rotary_pos_emb_interleave(q_pe, k_pe, cos, sin)
    return module.apply_rotary_pos_emb(q_pe, k_pe, cos, sin)


def _functions(attn):
    return sys.modules[type(attn).__module__]


def absorbed(rope):
    """The owned-layer builder for a family's MLA attention with this rope (registry: MoEArch.owned_layers): a module
    of `AbsorbedMLA` over transformers' class, or None where transformers caches MLA decompressed (4.x)."""

    def build(module: nn.Module, config) -> nn.Module | None:
        if not all(hasattr(module, f) for f in _FIELDS) or getattr(module.kv_b_proj, "bias", None) is not None:
            return None
        if not hasattr(type(module), "expand_kv"):  # transformers 4.x caches decompressed per-head K/V
            logger.info("absorbed MLA off: this transformers caches MLA's keys and values decompressed")
            return None
        return _absorbed_class(type(module), rope)(config, module.layer_idx)

    return build


@functools.cache
def _absorbed_class(base: type, rope) -> type:
    return type(base.__name__, (AbsorbedMLA, base), {"rope": staticmethod(rope), "__module__": base.__module__})


class AbsorbedMLA(Refreshable):
    """Mixed into an MLA attention class: one-token steps on ktchat's SlotCache run absorbed; everything else
    (prefill, no cache, another cache) runs transformers' forward."""

    rope = None  # the family's rope, (attn, q_pe, k_pe, position_embeddings) -> both rotated; set on each built class

    def forward(self, *args, **kwargs):
        base = super().forward
        try:
            bound = inspect.signature(base).bind(*args, **kwargs)
        except TypeError:
            return base(*args, **kwargs)
        arguments = dict(bound.arguments)
        extra = arguments.pop(next((p.name for p in inspect.signature(base).parameters.values()
                                    if p.kind is inspect.Parameter.VAR_KEYWORD), "kwargs"), {})
        get = lambda *names: next((v for n in names for v in (arguments.get(n), extra.get(n)) if v is not None), None)  # noqa: E731
        hidden, cache = get("hidden_states"), get("cache", "past_key_values")
        if not isinstance(cache, SlotCache) or hidden is None or hidden.shape[1] != 1:
            return base(*args, **kwargs)
        return self._step(hidden, get("position_embeddings"), get("attention_mask"), cache)

    def refresh(self) -> None:
        """kv_b_proj's effective weight, recomputed in place when its weights or adapter state changed since."""
        proj = self.kv_b_proj
        state = (tuple((p.data_ptr(), p._version) for p in proj.parameters()), _adapter_state(proj))
        if state == getattr(self, "_absorbed_state", None):
            return
        weight = self.effective_weight()
        held = getattr(self, "_absorbed_weight", None)
        if held is not None and held.shape == weight.shape and held.dtype == weight.dtype:
            held.copy_(weight)  # a captured graph keeps reading this buffer
        else:
            self._absorbed_weight = weight
        self._absorbed_state = state

    def effective_weight(self) -> torch.Tensor:
        """[heads, nope + v, kv_lora_rank]: what kv_b_proj multiplies a latent by, adapters and all."""
        proj = self.kv_b_proj
        if type(proj) is nn.Linear:
            weight = proj.weight.detach()
        else:  # a PEFT layer (or any other wrapper): its own forward on the identity gives W + s * B @ A
            ref = next(proj.parameters())
            with torch.no_grad():
                weight = proj(torch.eye(self.kv_lora_rank, dtype=ref.dtype, device=ref.device)).T.contiguous()
        return weight.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)

    @property
    def absorbed_steps(self) -> int:
        """Steps run absorbed, eagerly or captured (tests check the path is taken)."""
        return getattr(self, "_absorbed_steps", 0)

    def _step(self, hidden, position_embeddings, mask, cache):
        if not torch.cuda.is_available() or not torch.cuda.is_current_stream_capturing():
            self.refresh()  # a replayed graph skips this: the engine refreshes before replaying
        self._absorbed_steps = self.absorbed_steps + 1
        b, n, _ = hidden.shape
        if self.q_lora_rank is None:
            q = self.q_proj(hidden)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden)))
        q = q.view(b, n, self.num_heads, self.qk_nope_head_dim + self.qk_rope_head_dim).transpose(1, 2)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(hidden).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent).view(b, 1, n, self.kv_lora_rank)
        q_pe, k_pe = self.rope(self, q_pe, k_pe.view(b, 1, n, self.qk_rope_head_dim), position_embeddings)
        latents, k_pes = cache.update(latent, k_pe, self.layer_idx)  # [b, 1, S, kv_lora_rank], [b, 1, S, rope]

        w_uk, w_uv = self._absorbed_weight.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)
        h, length = self.num_heads, latents.shape[-2]
        # the query in latent space, [b, h, n, nope] @ [h, nope, r]; then every head's rows against the one latent
        # cache, [b, 1, h * n, r] @ [b, 1, r, S] (one shared key: no per-head copy of the cache)
        q_latent = torch.matmul(q_nope, w_uk).reshape(b, 1, h * n, self.kv_lora_rank)
        scores = (torch.matmul(q_latent, latents.transpose(-1, -2))
                  + torch.matmul(q_pe.reshape(b, 1, h * n, self.qk_rope_head_dim), k_pes.transpose(-1, -2)))
        scores = scores.view(b, h, n, length) * self.scaling
        if mask is not None:
            mask = mask[..., :length]
            scores = (scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool
                      else scores + mask)
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(q_latent.dtype).reshape(b, 1, h * n, length)
        out_latent = torch.matmul(probs, latents).view(b, h, n, self.kv_lora_rank)
        out = torch.matmul(out_latent, w_uv.transpose(-1, -2))  # [b, h, n, r] @ [h, r, v]
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1)), None


def _adapter_state(proj: nn.Module):
    scaling = getattr(proj, "scaling", None)
    return (repr(getattr(proj, "active_adapters", None)), getattr(proj, "disable_adapters", None),
            getattr(proj, "merged", None), tuple(sorted(scaling.items())) if isinstance(scaling, dict) else None)
