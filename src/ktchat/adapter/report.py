"""What `ktchat inspect` shows: every LoRA module with its channel, rank, scale and dtype, and every problem.

Unlike loading, which stops at the first problem, this collects them all: header checks, the base model's
shapes when given, and NaN/Inf values (it reads every tensor once).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import KTChatError
from .core import GENERIC_EXPERTS, KT_CHANNEL, PEFT_CHANNEL, ExpertPath, Problems
from .plan import BaseShapes, check_channels, split_channels
from .kt_provenance import check_base, check_non_expert_cache, check_routed
from .reader import read_adapter


@dataclass(frozen=True)
class Row:
    module: str
    channel: str
    rank: int
    scale: float
    dtype: str
    in_features: int
    out_features: int
    experts: int = 1  # modules this row stands for (a routed-expert group row covers every expert)

    @property
    def params(self) -> int:
        return self.experts * self.rank * (self.in_features + self.out_features)


@dataclass
class Report:
    adapter: Path
    layout: str = "unreadable"
    rows: list[Row] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def totals(self) -> dict[str, tuple[int, int]]:
        """channel -> (LoRA modules, parameters)."""
        out: dict[str, tuple[int, int]] = {}
        for row in self.rows:
            modules, params = out.get(row.channel, (0, 0))
            out[row.channel] = (modules + row.experts, params + row.params)
        return out


def inspect_adapter(adapter_dir, *, experts: ExpertPath = GENERIC_EXPERTS, base: BaseShapes | None = None,
                    expand: bool = False, model_dir: Path | None = None) -> Report:
    report = Report(Path(adapter_dir))
    problems = Problems(collect=True)
    try:
        adapter = read_adapter(adapter_dir, problems)
        peft, routed = split_channels(adapter, experts, problems)
        if base is not None:
            check_channels(adapter, (peft, routed), base, problems)
    except KTChatError as exc:  # fatal: nothing more can be read
        report.problems = problems.found + [str(exc)]
        return report
    _check_values(adapter, peft, routed, problems)
    extra = _check_provenance(adapter.manifest, model_dir, problems)
    report.layout, report.problems, report.notes = adapter.layout, problems.found, _notes(adapter) + extra
    report.rows = [Row(n, PEFT_CHANNEL, m.rank, m.scale, m.dtype, m.in_features, m.out_features)
                   for n, m in sorted(peft.items())]
    for (layer, proj), g in sorted(routed.items()):
        names = [g.module_name(e) for e in range(g.num_experts)] if expand else [_group_name(g)]
        report.rows += [Row(n, KT_CHANNEL, g.rank, g.scale, g.dtype, g.in_features, g.out_features,
                            1 if expand else g.num_experts) for n in names]
    return report


def _check_provenance(manifest, model_dir: Path | None, problems: Problems) -> list[str]:
    """The manifest's record of training's weights against the files here: the routed-expert set and non-expert
    cache it names, and (with --model) the base's fingerprint."""
    if manifest is None or manifest.provenance is None:
        return []
    prov, path, notes = manifest.provenance, manifest.path, []
    if check_routed(prov, path, problems) is not None:
        notes.append(f"{path.name}: {prov.routed_key} present, manifest sha256 and fingerprint match")
    notes += [f"{path.name}: {n}" for n in [check_non_expert_cache(prov, path, problems)] if n]
    if model_dir is not None:
        notes.append(f"{path.name}: {check_base(prov, path, Path(model_dir), problems)}")
    return notes


def _group_name(g) -> str:
    return g.name_template.replace("{expert}", f"{{0..{g.num_experts - 1}}}")


def _check_values(adapter, peft, routed, problems: Problems) -> None:
    """Loads every tensor once so NaN/Inf (and unreadable data) show up as problems, all of them."""
    for m in peft.values():
        try:
            adapter.weights.load([m.a_key, m.b_key])
        except KTChatError as exc:
            problems.add(str(exc))
    for g in routed.values():
        try:
            g.load()
        except KTChatError as exc:
            problems.add(str(exc))


def _notes(adapter) -> list[str]:
    notes = [f"adapter_config.json: r={adapter.config.r}, lora_alpha={adapter.config.lora_alpha:g}"
             + (", use_rslora" if adapter.config.use_rslora else "")
             + f", base_model_name_or_path={adapter.config.raw.get('base_model_name_or_path')}"]
    m = adapter.manifest
    if m is not None:
        notes.append(f"{m.path.name}: experts rank={m.rank}, alpha={m.alpha:g} (scale {m.scale:g})")
        notes += [f"{m.path.name}: {line}" for line in m.provenance.notes()]
    return notes
