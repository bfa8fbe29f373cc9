"""`ktchat inspect | convert | export`: thin commands over ktchat.adapter and ktchat.model.export.

Nothing heavy is imported until a command runs, so `ktchat --help` stays instant. Errors are KTChatError, which
`ktchat.cli.main` prints as one line with exit status 2; `inspect` exits 1 when it finds problems.
"""

from __future__ import annotations

import json
import logging

from ..formats import ADAPTER_LAYOUTS, EXPORT_FORMATS
from ..formats.checkpoint import COMPUTE_DTYPES

logger = logging.getLogger(__name__)


def add_command(subparsers) -> None:
    """Adds the three adapter commands to ktchat's subparsers."""
    p = subparsers.add_parser("inspect", help="list every LoRA module of an adapter, its channel, rank, scale and "
                              "dtype, and every problem found")
    p.add_argument("adapter", metavar="ADAPTER", help="adapter folder (any layout KT training writes)")
    p.add_argument("--model", metavar="BASE", help="base model folder: check every shape against its config.json "
                   "and safetensors headers (no weights are loaded)")
    p.add_argument("--expand", action="store_true", help="one row per routed expert instead of one per layer")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_inspect)

    p = subparsers.add_parser("convert", help="rewrite an adapter as per-expert PEFT, KT fused (+ manifest) or "
                              "SGLang-KT's composite adapter, losslessly")
    p.add_argument("adapter", metavar="ADAPTER", help="adapter folder (any layout)")
    p.add_argument("out", metavar="OUT", help="output folder (must be empty or absent)")
    p.add_argument("--to", required=True, choices=ADAPTER_LAYOUTS, help="output layout")
    p.add_argument("--expert-dtype", choices=COMPUTE_DTYPES, help="store the routed-expert LoRA in this dtype "
                   "(default: as stored; kt_kernel's trainer wants bfloat16 to resume training)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it is not empty")
    p.set_defaults(func=cmd_convert)

    p = subparsers.add_parser("export", help="write the base checkpoint with every LoRA merged in (no LoRA "
                              "support needed to serve it)")
    p.add_argument("--model", required=True, metavar="BASE", help="base model folder (safetensors)")
    p.add_argument("--adapter", required=True, metavar="ADAPTER", help="adapter folder (any layout)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (must be empty or absent)")
    p.add_argument("--dtype", choices=COMPUTE_DTYPES, help="store floating tensors in this dtype (default: the base's)")
    p.add_argument("--format", choices=EXPORT_FORMATS, default=EXPORT_FORMATS[0],
                   help="for an FP8 / INT4 base: bf16 (default) writes its quantized weights dequantized, LoRA merged, "
                   "in bf16 (or --dtype): about 2 bytes per parameter on disk (DeepSeek-V3: ~1.3 TB); base keeps its "
                   "format, re-quantizing the weights that have LoRA (the base's size). Memory: one weight at a time")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it is not empty")
    p.set_defaults(func=cmd_export)


def cmd_inspect(args) -> int:
    from pathlib import Path

    from ..adapter import GENERIC_EXPERTS
    from ..adapter.report import inspect_adapter

    experts, base = GENERIC_EXPERTS, None
    if args.model:
        from ..model.export import CheckpointShapes, read_base_config

        arch, qc = read_base_config(Path(args.model))
        experts, base = arch.expert_path, CheckpointShapes(Path(args.model), arch, qc)
    report = inspect_adapter(args.adapter, experts=experts, base=base, expand=args.expand,
                             model_dir=Path(args.model) if args.model else None)
    print(_report_json(report) if args.json else format_report(report))
    return 1 if report.problems else 0


def format_report(report) -> str:
    head = ("MODULE", "CHANNEL", "RANK", "SCALE", "DTYPE", "IN -> OUT")
    rows = [(r.module, r.channel, str(r.rank), f"{r.scale:g}", r.dtype, f"{r.in_features} -> {r.out_features}")
            for r in report.rows]
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    lines = [f"{report.adapter}: {report.layout}"] + [f"  {n}" for n in report.notes] + [""]
    lines += ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in (head, *rows)] + [""]
    for channel, (modules, params) in sorted(report.totals().items()):
        lines.append(f"{channel}: {modules} LoRA modules, {params:,} parameters")
    if report.problems:
        lines += ["", f"{len(report.problems)} problem(s):"] + [f"  - {p}" for p in report.problems]
    else:
        lines += ["", "no problems found"]
    return "\n".join(lines)


def _report_json(report) -> str:
    rows = [{**r.__dict__, "params": r.params} for r in report.rows]
    totals = {c: {"modules": m, "params": p} for c, (m, p) in report.totals().items()}
    return json.dumps({"adapter": str(report.adapter), "layout": report.layout, "notes": report.notes, "rows": rows,
                       "totals": totals, "problems": report.problems}, indent=2)


def cmd_convert(args) -> int:
    from ..adapter.writer import convert

    from ..formats.checkpoint import BY_TORCH_NAME

    dtype = BY_TORCH_NAME[args.expert_dtype].torch if args.expert_dtype else None
    summary = convert(args.adapter, args.out, args.to, expert_dtype=dtype, overwrite=args.overwrite)
    logger.info("%s (%s) -> %s (%s): %d PEFT modules, %d routed-expert groups", args.adapter, summary["from"],
                args.out, summary["to"], summary["modules"], summary["expert_groups"])
    return 0


def cmd_export(args) -> int:
    from ..model.export import export_merged

    summary = export_merged(args.model, args.adapter, args.out, dtype=args.dtype, format=args.format,
                            overwrite=args.overwrite)
    logger.info("wrote %s: %d LoRA modules merged, %d shards, %.1f MB", args.out, summary["merged_modules"],
                summary["shards"], summary["bytes"] / 1e6)
    return 0
