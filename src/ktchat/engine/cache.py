"""ktchat's cache: static buffers for every cache kind the families use, one slot per sequence.

The engine hands one `SlotCache` to the transformers model as its cache. Each layer reaches it the way its kind
needs, and each buffer is allocated once, on the first write, in the shape and dtype that layer writes:

- attention KV (GQA) and MLA's latent (transformers 5 caches MLA compressed: one "head" of kv_lora_rank, and the
  shared rope key as the "value"): `update`, transformers' own call, [slots, heads, length, dim] each;
- DeepSeek-V3.2's indexer keys: `update_indexer`, [slots, length, dim];
- a linear-attention layer's conv and recurrent state (Qwen3.5-MoE's Gated DeltaNet, run by ktchat's own layer,
  model.linear_attention): `linear_state`, [slots, ...] with no length dimension.

Before a forward the engine says which slots the batch's rows are and which positions its tokens take (`begin`).
Writes go to those (slot, position) pairs; reads return the rows' slots, up to `visible` positions when the step
runs eagerly, or the whole length when it is being captured into a CUDA graph (the step's mask then hides what is
not yet written). A linear-attention state cannot be cut back, so the engine keeps copies of it (`save_linear`,
`restore_linear`) at chosen positions.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache


class SlotCache(Cache):
    """Static per-slot buffers behind transformers' cache interface (update, update_indexer) and ktchat's own
    (linear_state). `length` positions a slot; `slots` sequences at most."""

    # transformers' Cache constructor changed across majors; nothing of it is used here, so it is not called
    def __init__(self, slots: int, length: int):  # noqa: super-init-not-called
        self.slots, self.length = slots, length
        self.layers = []  # transformers' per-layer objects: none (what the models call is defined here)
        self._kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._indexer: dict[int, torch.Tensor] = {}
        self._linear: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._rows = self._positions = None
        self._start, self._visible, self._all_slots = 0, length, False

    # --- the step ----------------------------------------------------------------------------------------------
    def begin(self, rows: torch.Tensor, positions: torch.Tensor, *, start: int = 0, visible: int | None = None,
              all_slots: bool = False) -> None:
        """The next forward: batch row b is slot rows[b], its tokens take positions[b] ([B, T] int64, on the model's
        device), the first row's from `start`. visible: positions read back (eager steps); None: all `length` (a
        step captured into a graph). all_slots: rows are 0..slots-1 in order (reads are then views, no copy)."""
        self._rows, self._positions, self._start = rows, positions, start
        self._visible = self.length if visible is None else visible
        self._all_slots = all_slots

    # --- transformers' interface ------------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Writes the step's keys and values ([B, heads, T, dim]) at its positions; returns the rows' slots."""
        if layer_idx not in self._kv:
            self._kv[layer_idx] = (self._zeros(key_states, (key_states.shape[1], self.length, key_states.shape[3])),
                                   self._zeros(value_states, (value_states.shape[1], self.length, value_states.shape[3])))
        keys, values = self._kv[layer_idx]
        rows, positions = self._where(keys)
        keys[rows, :, positions] = key_states.transpose(1, 2).to(keys.dtype)  # [B, T, heads, dim] at (slot, position)
        values[rows, :, positions] = value_states.transpose(1, 2).to(values.dtype)
        return self._read(keys, 2), self._read(values, 2)

    def update_indexer(self, key_states: torch.Tensor, layer_idx: int, *args, **kwargs) -> torch.Tensor:
        """DeepSeek-V3.2's indexer keys ([B, T, dim]) written at the step's positions; returns the rows' slots."""
        if layer_idx not in self._indexer:
            self._indexer[layer_idx] = self._zeros(key_states, (self.length, key_states.shape[-1]))
        keys = self._indexer[layer_idx]
        rows, positions = self._where(keys)
        keys[rows, positions] = key_states.to(keys.dtype)
        return self._read(keys, 1)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._start

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        return self._visible, 0

    def has_previous_state(self, *args, **kwargs) -> bool:
        """Asked by transformers' hybrid models before deriving a padding mask for linear attention, which ktchat's
        own linear-attention layer does not read."""
        return True

    @property
    def is_compileable(self) -> bool:
        return False

    def __len__(self) -> int:
        return len(self._kv) + len(self._linear)

    # --- ktchat's linear-attention state ----------------------------------------------------------------------
    def linear_state(self, layer_idx: int, conv_like: torch.Tensor, conv_shape: tuple[int, ...],
                     state_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """A linear-attention layer's (conv state [slots, *conv_shape] in conv_like's dtype, recurrent state
        [slots, *state_shape] in fp32), zeros at first use."""
        if layer_idx not in self._linear:
            self._linear[layer_idx] = (self._zeros(conv_like, conv_shape),
                                       torch.zeros((self.slots, *state_shape), dtype=torch.float32,
                                                   device=conv_like.device))
        return self._linear[layer_idx]

    @property
    def rows(self) -> torch.Tensor:
        """The step's slots, one per batch row."""
        return self._rows

    @property
    def visible(self) -> int:
        """Positions the step reads back (its attention mask's width)."""
        return self._visible

    def reset_linear(self, slot: int) -> None:
        """A slot's linear-attention state back to the start of a sequence."""
        for conv, state in self._linear.values():
            conv[slot].zero_()
            state[slot].zero_()

    def save_linear(self, slot: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """A copy of the slot's linear-attention state, every layer."""
        return {i: (conv[slot].clone(), state[slot].clone()) for i, (conv, state) in self._linear.items()}

    def restore_linear(self, slot: int, saved: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        for i, (conv, state) in saved.items():
            self._linear[i][0][slot].copy_(conv)
            self._linear[i][1][slot].copy_(state)

    def move_slot(self, source: int, target: int, tokens: int) -> None:
        """Copies what `source` holds (its first `tokens` positions, its linear state) into `target`."""
        for keys, values in self._kv.values():
            keys[target, :, :tokens].copy_(keys[source, :, :tokens])
            values[target, :, :tokens].copy_(values[source, :, :tokens])
        for keys in self._indexer.values():
            keys[target, :tokens].copy_(keys[source, :tokens])
        for conv, state in self._linear.values():
            conv[target].copy_(conv[source])
            state[target].copy_(state[source])

    # --- memory -----------------------------------------------------------------------------------------------
    @property
    def allocated(self) -> bool:
        return bool(self._kv or self._indexer or self._linear)

    def devices(self) -> set[torch.device]:
        """Where the buffers are (one device, or each layer's where layers are spread over GPUs)."""
        tensors = [t for pair in (*self._kv.values(), *self._linear.values()) for t in pair] + list(self._indexer.values())
        return {t.device for t in tensors}

    def slot_bytes(self) -> int:
        """Bytes one slot takes, every layer's buffers (known once a forward has allocated them)."""
        tensors = [t for pair in (*self._kv.values(), *self._linear.values()) for t in pair] + list(self._indexer.values())
        return sum(t.nbytes for t in tensors) // max(self.slots, 1)

    def linear_bytes(self) -> int:
        """Bytes of one copy of a slot's linear-attention state (`save_linear`)."""
        return sum(t.nbytes for pair in self._linear.values() for t in pair) // max(self.slots, 1)

    def token_bytes(self) -> int:
        """Bytes a position of one slot takes (every layer's KV, latents and indexer keys)."""
        tensors = [t for pair in self._kv.values() for t in pair] + list(self._indexer.values())
        return sum(t.nbytes for t in tensors) // max(self.slots * self.length, 1)

    def resized(self, slots: int, length: int) -> "SlotCache":
        """A cache of another shape holding what this one holds, slot for slot (sequences may be running in them):
        the first min(slots) slots and min(length) positions."""
        new = SlotCache(slots, length)
        for i, (keys, values) in self._kv.items():
            new._kv[i] = tuple(self._copy(t, 2, slots, length) for t in (keys, values))
        for i, keys in self._indexer.items():
            new._indexer[i] = self._copy(keys, 1, slots, length)
        for i, pair in self._linear.items():
            new._linear[i] = tuple(self._copy(t, None, slots, length) for t in pair)
        return new

    # --- helpers ----------------------------------------------------------------------------------------------
    def _zeros(self, like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros((self.slots, *shape), dtype=like.dtype, device=like.device)

    def _where(self, buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows [B, 1], positions [B, T]) on the buffer's device (layers spread over GPUs keep theirs there)."""
        return self._rows.to(buffer.device)[:, None], self._positions.to(buffer.device)

    def _read(self, buffer: torch.Tensor, length_dim: int) -> torch.Tensor:
        """The batch rows' slots, `visible` positions long (a view where the rows are every slot in order)."""
        seen = buffer.narrow(length_dim, 0, self._visible) if self._visible < self.length else buffer
        return seen if self._all_slots else seen.index_select(0, self._rows.to(buffer.device))

    @staticmethod
    def _copy(t: torch.Tensor, length_dim: int | None, slots: int, length: int) -> torch.Tensor:
        shape = list(t.shape)
        shape[0] = slots
        if length_dim is not None:
            shape[length_dim] = length
        out = torch.zeros(shape, dtype=t.dtype, device=t.device)
        index = [slice(0, min(slots, t.shape[0]))] + [slice(None)] * (t.dim() - 1)
        if length_dim is not None:
            index[length_dim] = slice(0, min(length, t.shape[length_dim]))
        out[tuple(index)] = t[tuple(index)]
        return out
