"""Routed experts kept on the GPU, with their LoRA, under a memory budget: which ones, and putting them there.

A decode step reads every routed expert it uses once; on the CPU that costs its memory bandwidth, on the GPU far
less. Given `gpu_experts_gib`, the experts most often routed to (counted on a calibration pass at load: a short
built-in text, or the user's prompts) go to the GPU of the MoE layers, as many as the budget holds; the CPU backend
leaves them out from then on. Alternatives: `uniform` (as many in every layer, each layer's most routed) and `front`
(each layer's first experts, no calibration). A placement can be saved to a JSON file and used again.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ..errors import KTChatError
from .moe import OffloadedMoE

logger = logging.getLogger(__name__)

AUTO_RESERVE_GIB, AUTO_RESERVE_SHARE = 4.0, 0.1  # left free by `auto`: for the cache, activations and graphs

# What the calibration pass reads when the user gives no prompts: plain prose on a few topics, about 400 tokens.
CALIBRATION_TEXT = (
    "The history of mathematics begins with counting and measuring: early farmers tracked seasons, herds and "
    "harvests, and traders needed weights and sums they could trust. Geometry grew from surveying fields after the "
    "river floods, and algebra from the problems of inheritance and commerce. "
    "In a modern kitchen, bread is flour, water, salt and yeast; the dough rises as the yeast turns sugar into "
    "carbon dioxide, and the oven sets the crumb while the crust browns. "
    "def merge_sorted(a, b):\n    out = []\n    i = j = 0\n    while i < len(a) and j < len(b):\n"
    "        if a[i] <= b[j]:\n            out.append(a[i]); i += 1\n        else:\n            out.append(b[j]); j += 1\n"
    "    return out + a[i:] + b[j:]\n"
    "Q: A train leaves at 9:40 and arrives at 13:05. How long is the journey? A: Three hours and twenty-five minutes. "
    "Ecosystems recycle what they use: plants take carbon from the air, animals eat the plants, and fungi and "
    "bacteria return both to the soil. A forest after a fire regrows in stages, grasses first, then shrubs, then "
    "trees that shade them out. "
    "Dear team, the release moves to Thursday: the last tests found a memory leak in the server, which is fixed, "
    "and we want one more day of load tests before we ship. Please update your notes. "
    "Translate to French: the weather is nice today and we are going to the park. "
    "Il fait beau aujourd'hui et nous allons au parc. "
    "Light travels about three hundred thousand kilometres a second; sunlight takes a little over eight minutes to "
    "reach the Earth, and the light of the nearest stars left them years ago."
)


@dataclass(frozen=True)
class Placement:
    """The experts kept on the GPU, by layer, how they were chosen, and the share of the calibration's routing
    they take (None without a calibration)."""

    experts: dict[int, list[int]]
    strategy: str
    covered: float | None = None

    @property
    def count(self) -> int:
        return sum(len(e) for e in self.experts.values())

    def save(self, path: Path, model_type: str, num_experts: int) -> None:
        path.write_text(json.dumps({"version": 1, "model_type": model_type, "num_experts": num_experts,
                                    "strategy": self.strategy, "covered": self.covered,
                                    "layers": {str(k): v for k, v in sorted(self.experts.items())}}, indent=1))

    @classmethod
    def load(cls, path: Path, layers: dict[int, int]) -> Placement:
        """A saved placement, checked against the model's MoE layers ({layer: experts}): one line naming the file
        and what does not fit."""
        try:
            raw = json.loads(path.read_text())
            chosen = {int(k): [int(e) for e in v] for k, v in raw["layers"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise KTChatError(f"gpu_experts_placement: {path} is not a placement ktchat wrote ({exc})") from None
        for layer, experts in chosen.items():
            if layer not in layers:
                raise KTChatError(f"gpu_experts_placement: {path} names layer {layer}, which has no routed experts")
            bad = [e for e in experts if not 0 <= e < layers[layer]] or sorted({e for e in experts
                                                                                if experts.count(e) > 1})
            if bad:
                raise KTChatError(f"gpu_experts_placement: {path}: layer {layer} names experts {bad[:3]} (it has "
                                  f"{layers[layer]}, each once)")
        return cls(chosen, f"file {path.name}", raw.get("covered"))


def choose(strategy: str, counts: dict[int, torch.Tensor], layers: dict[int, int], budget: int) -> Placement:
    """`budget` experts to keep on the GPU. frequency: the most routed over all layers; uniform: as many in every
    layer, each layer's most routed; front: each layer's first ones. Ties go to the lower layer and expert."""
    if strategy == "frequency":
        ranked = sorted(((-float(c), layer, e) for layer, row in counts.items() for e, c in enumerate(row.tolist())))
        picked = [(layer, e) for _, layer, e in ranked[:budget]]
    else:
        per_layer = budget // len(layers)
        picked = [(layer, e) for layer, n in sorted(layers.items())
                  for e in (_most_routed(counts[layer], per_layer) if strategy == "uniform" else range(min(per_layer, n)))]
    chosen: dict[int, list[int]] = {}
    for layer, e in picked:
        chosen.setdefault(layer, []).append(e)
    total = sum(float(c.sum()) for c in counts.values()) if counts else 0.0
    covered = sum(float(counts[layer][e]) for layer, e in picked) / total if total else None
    return Placement({k: sorted(v) for k, v in chosen.items()}, strategy, covered)


def _most_routed(row: torch.Tensor, n: int) -> list[int]:
    return sorted(range(len(row)), key=lambda e: (-float(row[e]), e))[:n]


@torch.no_grad()
def calibrate(model: nn.Module, tokenizer, texts: list[str], blocks: dict[int, OffloadedMoE]) -> dict[int, torch.Tensor]:
    """How often each expert is routed to on these texts (one forward each): {layer: counts [E]}."""
    counts = {idx: torch.zeros(b.cpu_experts.backend.spec.num_experts, device=b.router.weight.device)
              for idx, b in blocks.items()}
    for idx, block in blocks.items():
        block.plan = replace(block.plan, routed=counts[idx])
    try:
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=True)["input_ids"]
            model(ids.to(model.device), use_cache=False)
    finally:
        for block in blocks.values():
            block.plan = replace(block.plan, routed=None)
    return {idx: c.cpu() for idx, c in counts.items()}


def calibration_texts(path: Path | None) -> list[str]:
    """The user's prompts (a text file: one prompt; a .jsonl: each line's "text" or "prompt"), or the built-in."""
    if path is None:
        return [CALIBRATION_TEXT]
    try:
        raw = path.read_text(encoding="utf-8")
        if path.suffix != ".jsonl":
            return [raw]
        rows = [json.loads(line) for line in raw.splitlines() if line.strip()]
        return [row["text"] if "text" in row else row["prompt"] for row in rows]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise KTChatError(f"gpu_experts_calibration: cannot read prompts from {path} ({exc})") from None


def expert_bytes(block: OffloadedMoE) -> int:
    """What one of the block's experts takes on the GPU: its weights as the backend computes them, and its LoRA."""
    backend = block.cpu_experts.backend
    spec = backend.spec
    itemsize = torch.bfloat16.itemsize if backend.name == "kt" else spec.dtype.itemsize
    lora = sum(s.a[0].nbytes + s.b[0].nbytes for s in backend.lora.values())
    return 3 * spec.hidden_size * spec.intermediate_size * itemsize + lora


def budget_bytes(gib, device: torch.device) -> int:
    """The bytes the experts may take: a number of GiB, or "auto": what the GPU has free now, less a margin for the
    cache, activations and graphs (the larger of AUTO_RESERVE_GIB and AUTO_RESERVE_SHARE of the card)."""
    if gib != "auto":
        return int(float(gib) * 2**30)
    if device.type != "cuda":
        raise KTChatError(f"gpu_experts_gib: auto reads the GPU's free memory, but the MoE layers are on {device}")
    free, total = torch.cuda.mem_get_info(device)
    return max(0, int(free - max(AUTO_RESERVE_GIB * 2**30, AUTO_RESERVE_SHARE * total)))


def place(model: nn.Module, tokenizer, gib, placement: str, calibration: Path | None, keep_host: bool):
    """load_model's end: the experts the budget holds kept on the GPU of the MoE layers (or their CPU, the CPU
    variant CI runs), each layer's CPU backend told to leave them out; kt's bf16 copy, kept for this, dropped again
    unless GPU prefill streams from it (`keep_host`). Returns the Placement, or None where gib is None (off)."""
    if gib is None:
        return None
    blocks = {m.layer_idx: m for m in model.modules() if isinstance(m, OffloadedMoE)}
    devices = {b.router.weight.device for b in blocks.values()}
    if len(devices) != 1:
        raise KTChatError(f"gpu_experts_gib: the MoE layers sit on {len(devices)} devices; experts go to one")
    device = next(iter(devices))
    layers = {idx: b.cpu_experts.backend.spec.num_experts for idx, b in blocks.items()}
    per_expert = expert_bytes(next(iter(blocks.values())))
    budget = min(budget_bytes(gib, device) // per_expert, sum(layers.values()))
    chosen = _placement(model, tokenizer, placement, calibration, blocks, layers, budget)
    for idx, experts in chosen.experts.items():
        _keep_on(blocks[idx], experts, device)
    if not keep_host:
        for block in blocks.values():
            getattr(block.cpu_experts.backend, "release_host_copy", lambda: None)()
    covered = "" if chosen.covered is None else f", {chosen.covered:.0%} of the calibration's routing"
    logger.info("GPU experts: %d of %d routed experts on %s (%.2f GiB, %s placement%s); the CPU computes the rest",
                chosen.count, sum(layers.values()), device, chosen.count * per_expert / 2**30, chosen.strategy, covered)
    return chosen


def _placement(model, tokenizer, placement: str, calibration, blocks, layers, budget: int) -> Placement:
    """The saved placement (a .json that exists), or one chosen now (and saved where a .json was named)."""
    saved = Path(placement) if placement.endswith(".json") else None
    if saved is not None and saved.is_file():
        return Placement.load(saved, layers)
    strategy = "frequency" if saved is not None else placement
    counts = calibrate(model, tokenizer, calibration_texts(calibration), blocks) if strategy != "front" else {}
    chosen = choose(strategy, counts or {i: torch.zeros(n) for i, n in layers.items()}, layers, budget)
    if saved is not None:
        chosen.save(saved, model.config.model_type, max(layers.values()))
    return chosen


def _keep_on(block: OffloadedMoE, experts: list[int], device: torch.device) -> None:
    from ..experts.resident import ResidentExperts

    backend = block.cpu_experts.backend
    spec = backend.spec
    resident = ResidentExperts(block.layer_idx, spec.num_experts, experts, backend.gpu_copy(experts), device)
    backend.set_resident(resident.mask)
    block.plan = replace(block.plan, resident=resident)
