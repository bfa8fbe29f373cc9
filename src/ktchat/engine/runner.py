"""Runs the model on ktchat's cache: a prefill of a prompt's tokens, and one decode step for a batch of sequences,
replayed as one CUDA graph per batch size where the model sits on one GPU.

The model is transformers' own (its layers, its forward); the runner owns everything around a forward: the slot
cache, the positions, the attention mask (computed from the positions, on the device, so a replayed graph reads the
current ones) and, in a decode step, the CPU experts bound to fixed buffers and queued on the CUDA stream as host
functions, so the whole token is one graph, the CPU experts inside.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import torch
from torch import nn

from .cache import SlotCache
from .step import BindableExperts, Refreshable, bound_step

logger = logging.getLogger(__name__)

# Batch sizes a decode step is captured at (a batch runs in the smallest that holds it); larger batches run eagerly,
# where Python's launches are a small part of a step that reads most experts anyway.
GRAPH_BATCHES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)


@dataclass
class _Graph:
    graph: object
    inputs: dict[str, torch.Tensor]  # the static tensors a replay reads: ids [B, 1], positions [B, 1], rows [B]
    logits: torch.Tensor  # [B, vocab], written by each replay
    done: object  # a CUDA event recorded after each replay


class ModelRunner:
    """Forward passes of one transformers causal LM on a SlotCache."""

    def __init__(self, model: nn.Module, graphs: bool, graph_rows: int | None = None):
        """graph_rows: the most rows a captured step may hold (None: GRAPH_BATCHES' largest)."""
        self.model = model
        self.buckets = tuple(b for b in GRAPH_BATCHES if graph_rows is None or b <= graph_rows)
        params = inspect.signature(type(model).forward).parameters
        # transformers 5 renames past_key_values to cache, model by model
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.extra = {k: v for k, v in (("use_cache", True), ("logits_to_keep", 1), ("num_logits_to_keep", 1))
                      if k in params}
        self.takes_cache_position = "cache_position" in params
        self.experts = [m for m in model.modules() if isinstance(m, BindableExperts)]
        self.refreshable = [m for m in model.modules() if isinstance(m, Refreshable)]
        self.device = model.get_input_embeddings().weight.device
        self.dtype = model.get_input_embeddings().weight.dtype
        self.graphs = graphs and self.device.type == "cuda"
        self.eager_reason: str | None = None if self.graphs else "cuda_graphs off"
        self._captured: dict[tuple, _Graph] = {}
        self._pool = None
        self.steps = 0  # decode steps run (replays included): tests check the path was taken

    # --- the two kinds of forward -------------------------------------------------------------------------------
    def prefill(self, cache: SlotCache, slot: int, ids: list[int], start: int) -> torch.Tensor:
        """Computes `ids` at positions start.. in `slot`; returns the last position's logits [vocab]."""
        positions = torch.arange(start, start + len(ids), device=self.device)[None]
        rows = torch.tensor([slot], device=self.device)
        cache.begin(rows, positions, start=start, visible=start + len(ids), all_slots=cache.slots == 1)
        tokens = torch.tensor([ids], dtype=torch.long, device=self.device)
        return self._forward(cache, tokens, positions)[0]

    def decode(self, cache: SlotCache, rows: list[int], tokens: list[int], positions: list[int], key=()) -> torch.Tensor:
        """One token for each row (slot rows[b] at positions[b]); returns logits [B, vocab]. A graph runs a bucket
        of rows (GRAPH_BATCHES): the rows past B are the cache's last slot, a scratch slot, and the CPU experts
        compute only the first B. `key` names the adapter state: a captured graph holds the LoRA as it was."""
        self.steps += 1
        batch = len(rows)
        bucket = next((b for b in self.buckets if b >= batch), None) if self.graphs else None
        if bucket is None:  # eager: every row as it is; a big batch's copies go unbound (its per-layer syncs are
            bound = batch <= GRAPH_BATCHES[-1] and self._bind(batch, batch)  # a small part of its step)
            inputs = self._inputs(rows, tokens, positions)
            with bound_step(batch if bound else 0):
                return self._step(cache, inputs, rows == list(range(cache.slots)), visible=max(positions) + 1)
        pad = bucket - batch
        inputs = self._inputs(rows + [cache.slots - 1] * pad, tokens + [0] * pad, positions + [0] * pad)
        if not self._bind(bucket, batch):
            return self.decode(cache, rows, tokens, positions, key)  # the graphs went off: eager
        graph = self._captured.get((id(cache), bucket, key))
        if graph is None:
            return self._capture(cache, inputs, key)[:batch]
        for name, value in inputs.items():
            graph.inputs[name].copy_(value)
        for module in self.refreshable:
            module.refresh()  # an adapter reloaded in place since the capture: its derived buffers rewritten
        graph.graph.replay()
        # Waits asleep: a spinning wait (the default synchronize) would take a core the kt workers need.
        graph.done.record()
        graph.done.synchronize()
        return graph.logits[:batch]

    def forget_graphs(self) -> None:
        self._captured.clear()

    # --- internals ----------------------------------------------------------------------------------------------
    def _forward(self, cache: SlotCache, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        kwargs = {"input_ids": ids, "position_ids": positions, self.cache_kwarg: cache, **self.extra,
                  "attention_mask": self._mask(positions, cache.visible)}
        if self.takes_cache_position:
            kwargs["cache_position"] = positions[0]
        return self.model(**kwargs).logits[:, -1]

    def _mask(self, positions: torch.Tensor, length: int) -> torch.Tensor:
        """[B, 1, T, length] additive: each token sees its slot's positions up to its own."""
        hidden = torch.arange(length, device=positions.device)[None, None, None, :] > positions[:, None, :, None]
        return torch.zeros(hidden.shape, dtype=self.dtype, device=positions.device).masked_fill_(
            hidden, torch.finfo(self.dtype).min)

    def _step(self, cache: SlotCache, inputs: dict, all_slots: bool, visible: int | None) -> torch.Tensor:
        cache.begin(inputs["rows"], inputs["positions"], visible=visible, all_slots=all_slots)
        return self._forward(cache, inputs["ids"], inputs["positions"])

    def _inputs(self, rows: list[int], tokens: list[int], positions: list[int]) -> dict[str, torch.Tensor]:
        return {"ids": torch.tensor(tokens, device=self.device)[:, None],
                "positions": torch.tensor(positions, device=self.device)[:, None],
                "rows": torch.tensor(rows, device=self.device)}

    def _bind(self, tokens: int, valid: int) -> bool:
        """Every CPU experts module on fixed buffers of `tokens` rows, `valid` of them computed; False (and no
        graphs) where one cannot be bound."""
        unbound = [e for e in self.experts if not e.bind(tokens, valid)]
        if unbound and self.graphs:
            self._eager(f"the {unbound[0].name} experts cannot be queued on a CUDA stream")
        return not unbound

    def _capture(self, cache: SlotCache, inputs: dict, key) -> torch.Tensor:
        """Runs the step eagerly (it is this token's step, and lazy initialisations happen outside the capture), then
        captures it; capturing executes nothing, so the cache is written once."""
        bucket = inputs["rows"].shape[0]
        static = {name: value.clone() for name, value in inputs.items()}
        with bound_step(bucket):
            logits = self._step(cache, static, False, visible=None)
            torch.cuda.synchronize()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=self._pool):
                    out = self._step(cache, static, False, visible=None)
            except Exception as exc:  # noqa: BLE001 - an uncapturable model still decodes, eagerly
                self._eager(f"capture failed ({str(exc).splitlines()[0]})")
                return logits
        self._captured = {k: g for k, g in self._captured.items() if k[0] == id(cache)}  # older caches' graphs go
        self._captured[(id(cache), bucket, key)] = _Graph(graph, static, out, torch.cuda.Event(blocking=True))
        logger.debug("decode step of %d rows captured as a CUDA graph (%d positions a slot)", bucket, cache.length)
        return logits

    def _eager(self, reason: str) -> None:
        logger.warning("decode runs without CUDA graphs: %s", reason)
        self.graphs, self.eager_reason = False, reason
