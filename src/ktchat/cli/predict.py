"""`ktchat predict CONFIG.yaml`: a reply for every row of a dataset into generated_predictions.jsonl, as LLaMA-Factory's
scripts/hf_infer.py writes it; a rerun resumes (docs/predict.md)."""

from __future__ import annotations

from ..config import load_config, parse_overrides

# flag -> the PredictArgs key it sets (tests/unit/test_lists.py: each is one), and its type
FLAGS = {
    "--dataset": ("dataset", str, "NAME|FILE", "a dataset name of DIR/dataset_info.json (LLaMA-Factory's pipeline), "
                  "or a .jsonl / .json file of messages or alpaca rows"),
    "--dataset-dir": ("dataset_dir", str, "DIR", "the folder of dataset_info.json (default: data)"),
    "--save-name": ("save_name", str, "PATH", "the output file (default: generated_predictions.jsonl); a rerun "
                    "resumes it"),
    "--max-samples": ("max_samples", int, "N", "the first N rows only"),
    "--cutoff-len": ("cutoff_len", int, "N", "prompt tokens kept (default 2048)"),
    "--batch-size": ("batch_size", int, "N", "rows generated at once, batched into the engine's steps, and written "
                     "per fsync (hf_infer's name; default 4)"),
}


def add_command(subparsers) -> None:
    predict = subparsers.add_parser("predict", help="generate a reply for every row of a dataset into "
                                    "generated_predictions.jsonl (LLaMA-Factory's format); a rerun resumes")
    predict.add_argument("config", metavar="CONFIG.yaml", help="inference YAML, plus dataset, save_name, ... "
                         "(docs/predict.md)")
    for flag, (_, kind, metavar, text) in FLAGS.items():
        predict.add_argument(flag, type=kind, metavar=metavar, help=text)
    predict.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a YAML key (repeatable)")
    predict.set_defaults(func=cmd_predict)


def cmd_predict(args) -> int:
    from ..generate.predict import predict

    flags = {key: getattr(args, key) for key, *_ in FLAGS.values() if getattr(args, key) is not None}
    predict(load_config(args.config, overrides={**parse_overrides(args.set), **flags}, predict=True))
    return 0
