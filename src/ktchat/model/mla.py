"""Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2) decoded in its absorbed form.

transformers 5 caches MLA's compressed latent (kv_a_proj_with_mqa's output after kv_a_layernorm, and the shared
rope key) but, at every step, decompresses the whole cache through kv_b_proj before attending: on the static
cache that is a [cache length, kv_lora_rank] x [kv_lora_rank, heads * (nope + v)] product per layer per token, so
the GPU part of a decode step grows with the context. Absorbed, kv_b_proj's key half (W_UK) multiplies the query
and its value half (W_UV) the attention output; a step then reads the latent cache once and its context-dependent
cost is heads * (2 * kv_lora_rank + rope) per cached token.

The LoRA stays exact: q, kv_a and o projections run their own (PEFT) forwards, and the absorption uses kv_b_proj's
effective weight, W + s * B @ A for the active adapters, read off the module itself (its forward on the identity),
held in a fixed buffer and refreshed in place whenever the module's weights or adapter state change.
"""

from __future__ import annotations

import inspect
import logging
import sys

import torch
from torch import nn

logger = logging.getLogger(__name__)

_FIELDS = ("kv_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm", "o_proj", "q_lora_rank", "kv_lora_rank",
           "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "num_heads", "scaling", "layer_idx")


# The rope of each family's attention, as transformers' own module-level functions apply it (named per family in
# the registry: MoEArch.absorbed_mla).

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


class AbsorbedMLA:
    """Installed on one MLA attention module: its one-token steps on a latent cache run absorbed, everything else
    (prefill, no cache) runs transformers' forward."""

    def __init__(self, attn: nn.Module, rope):
        self.attn, self.rope = attn, rope
        self._forward = attn.forward
        self._signature = inspect.signature(type(attn).forward)
        self._weight: torch.Tensor | None = None  # kv_b_proj's effective weight, [heads, nope + v, kv_lora_rank]
        self._state = None
        self.steps = 0  # absorbed steps run eagerly or captured (tests check the path is taken)
        self.enabled = True  # False: transformers' own step (benchmarks compare)
        attn.forward, attn.absorbed_mla = self.forward, self

    def forward(self, *args, **kwargs):
        try:
            bound = self._signature.bind(self.attn, *args, **kwargs)
        except TypeError:
            return self._forward(*args, **kwargs)
        arguments = dict(bound.arguments)
        extra = arguments.pop(next((p.name for p in self._signature.parameters.values()
                                    if p.kind is inspect.Parameter.VAR_KEYWORD), "kwargs"), {})
        hidden = arguments.get("hidden_states")
        cache = next((v for k in ("cache", "past_key_values") for v in (arguments.get(k), extra.get(k))
                      if v is not None), None)
        if (not self.enabled or cache is None or hidden is None or hidden.shape[1] != 1
                or not _holds_latents(cache, self.attn)):
            return self._forward(*args, **kwargs)
        return self._step(hidden, arguments.get("position_embeddings", extra.get("position_embeddings")),
                          arguments.get("attention_mask", extra.get("attention_mask")), cache)

    def refresh(self) -> None:
        """kv_b_proj's effective weight, recomputed in place when its weights or adapter state changed since."""
        proj = self.attn.kv_b_proj
        state = (tuple((p.data_ptr(), p._version) for p in proj.parameters()), _adapter_state(proj))
        if state == self._state and self._weight is not None:
            return
        weight = self.effective_weight()
        if self._weight is not None and self._weight.shape == weight.shape and self._weight.dtype == weight.dtype:
            self._weight.copy_(weight)  # a captured graph keeps reading this buffer
        else:
            self._weight = weight
        self._state = state

    def effective_weight(self) -> torch.Tensor:
        """[heads, nope + v, kv_lora_rank]: what kv_b_proj multiplies a latent by, adapters and all."""
        a, proj = self.attn, self.attn.kv_b_proj
        if type(proj) is nn.Linear:
            weight = proj.weight.detach()
        else:  # a PEFT layer (or any other wrapper): its own forward on the identity gives W + s * B @ A
            ref = next(proj.parameters())
            with torch.no_grad():
                weight = proj(torch.eye(a.kv_lora_rank, dtype=ref.dtype, device=ref.device)).T.contiguous()
        return weight.view(a.num_heads, a.qk_nope_head_dim + a.v_head_dim, a.kv_lora_rank)

    def _step(self, hidden, position_embeddings, mask, cache):
        a = self.attn
        if not torch.cuda.is_available() or not torch.cuda.is_current_stream_capturing():
            self.refresh()  # a replayed graph skips this: StaticDecode refreshes before replaying
        self.steps += 1
        b, n, _ = hidden.shape
        if a.q_lora_rank is None:
            q = a.q_proj(hidden)
        else:
            q = a.q_b_proj(a.q_a_layernorm(a.q_a_proj(hidden)))
        q = q.view(b, n, a.num_heads, a.qk_nope_head_dim + a.qk_rope_head_dim).transpose(1, 2)
        q_nope, q_pe = q.split([a.qk_nope_head_dim, a.qk_rope_head_dim], dim=-1)
        latent, k_pe = a.kv_a_proj_with_mqa(hidden).split([a.kv_lora_rank, a.qk_rope_head_dim], dim=-1)
        latent = a.kv_a_layernorm(latent).view(b, 1, n, a.kv_lora_rank)
        q_pe, k_pe = self.rope(a, q_pe, k_pe.view(b, 1, n, a.qk_rope_head_dim), position_embeddings)
        latents, k_pes = cache.update(latent, k_pe, a.layer_idx)  # [b, 1, S, kv_lora_rank], [b, 1, S, rope]

        w_uk, w_uv = self._weight.split([a.qk_nope_head_dim, a.v_head_dim], dim=1)
        h, length = a.num_heads, latents.shape[-2]
        # the query in latent space, [b, h, n, nope] @ [h, nope, r]; then every head's rows against the one latent
        # cache, [b, 1, h * n, r] @ [b, 1, r, S] (one shared key: no per-head copy of the cache)
        q_latent = torch.matmul(q_nope, w_uk).reshape(b, 1, h * n, a.kv_lora_rank)
        scores = (torch.matmul(q_latent, latents.transpose(-1, -2))
                  + torch.matmul(q_pe.reshape(b, 1, h * n, a.qk_rope_head_dim), k_pes.transpose(-1, -2)))
        scores = scores.view(b, h, n, length) * a.scaling
        if mask is not None:
            mask = mask[..., :length]
            scores = (scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool
                      else scores + mask)
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(q_latent.dtype).reshape(b, 1, h * n, length)
        out_latent = torch.matmul(probs, latents).view(b, h, n, a.kv_lora_rank)
        out = torch.matmul(out_latent, w_uv.transpose(-1, -2))  # [b, h, n, r] @ [h, r, v]
        return a.o_proj(out.transpose(1, 2).reshape(b, n, -1)), None


def _holds_latents(cache, attn) -> bool:
    """Whether this cache's layer for `attn` keeps the compressed latent (transformers 5) rather than per-head K/V."""
    layers = getattr(cache, "layers", None)
    if not layers or attn.layer_idx >= len(layers):
        return False
    layer = layers[attn.layer_idx]
    if not getattr(layer, "is_initialized", False):
        return False
    keys = layer.keys
    return keys.dim() == 4 and keys.shape[1] == 1 and keys.shape[-1] == attn.kv_lora_rank


def _adapter_state(proj: nn.Module):
    scaling = getattr(proj, "scaling", None)
    return (repr(getattr(proj, "active_adapters", None)), getattr(proj, "disable_adapters", None),
            getattr(proj, "merged", None), tuple(sorted(scaling.items())) if isinstance(scaling, dict) else None)


def install(model: nn.Module, rope) -> list[AbsorbedMLA]:
    """Absorbed decoding on every MLA attention of `model`, with its family's rope (MoEArch.absorbed_mla; None:
    not MLA), where transformers caches latents; [] elsewhere."""
    if rope is None:
        return []
    installed = []
    for module in model.modules():
        if isinstance(getattr(module, "absorbed_mla", None), AbsorbedMLA):
            installed.append(module.absorbed_mla)
            continue
        if not all(hasattr(module, f) for f in _FIELDS):
            continue
        if not hasattr(type(module), "expand_kv"):  # transformers 4.x caches decompressed per-head K/V
            logger.info("absorbed MLA off: this transformers caches MLA's keys and values decompressed")
            return []
        if getattr(_base(module.kv_b_proj), "bias", None) is not None:
            return []
        installed.append(AbsorbedMLA(module, rope))
    return installed


def _base(proj: nn.Module) -> nn.Module:
    return getattr(proj, "base_layer", proj)
