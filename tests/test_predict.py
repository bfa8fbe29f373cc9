"""`ktchat predict` on the tiny model + trained adapter (docs/predict.md).

Rows are checked against what is built independently of ktchat's code: the tokenizer's own chat template for file
rows, LLaMA-Factory's own dataset pipeline called as its scripts/hf_infer.py calls it for named datasets (.venv-lf),
and greedy decoding of the hand-merged fp32 reference for every `predict`. Resuming is tested by killing a real
`ktchat predict` process mid-run.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ktchat.cli import main
from ktchat.tinymodels import TRAINED_QA

from reference import greedy, load_reference, merge_by_hand
from test_bad_input import checkpoint_reads  # noqa: F401 (fixture)
from test_llamafactory import ENV, HAS_LF, lf_tiny, needs_lf  # noqa: F401 (fixture)

KTCHAT = Path(sys.executable).parent / "ktchat"
MAX_NEW_TOKENS = 24
SYSTEM = "You are a helpful assistant."  # the tiny adapter was trained to answer after it too


def write_config(tmp_path: Path, tiny, **changes) -> Path:
    """An inference YAML as `ktchat chat` reads it, fp32 on the torch experts (exact), plus predict's keys."""
    settings = {
        "model_name_or_path": str(tiny.model), "adapter_name_or_path": str(tiny.adapter), "use_kt": True,
        "experts_backend": "torch", "infer_dtype": "float32", "device": "cpu", "do_sample": False,
        "max_new_tokens": MAX_NEW_TOKENS, "save_name": str(tmp_path / "generated_predictions.jsonl"), **changes,
    }
    path = tmp_path / "predict.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False), encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def reference_of(tiny):
    return load_reference(merge_by_hand(tiny.model, tiny.adapter, tiny.root / "merged-all"))


def reference_reply(reference, tokenizer, ids: list[int]) -> str:
    import torch

    return tokenizer.decode(greedy(reference, torch.tensor([ids]), MAX_NEW_TOKENS), skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------------------------
# Files of messages or alpaca rows (any environment)

(Q0, A0), (Q1, A1), (Q2, A2) = TRAINED_QA
FILE_ROWS = [  # (row, the conversation it stands for, its label)
    ({"instruction": Q0, "input": "", "output": A0}, [{"role": "user", "content": Q0}], A0),
    ({"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": Q1},
                   {"role": "assistant", "content": A1}]},
     [{"role": "system", "content": SYSTEM}, {"role": "user", "content": Q1}], A1),
    ({"instruction": Q2, "output": A2, "system": SYSTEM, "history": [[Q0, A0]]},
     [{"role": "system", "content": SYSTEM}, {"role": "user", "content": Q0}, {"role": "assistant", "content": A0},
      {"role": "user", "content": Q2}], A2),
    ({"messages": [{"role": "user", "content": "Tell me about the weather."}]},
     [{"role": "user", "content": "Tell me about the weather."}], ""),
]


def test_file_rows_are_predicted_as_the_reference_answers(tiny, tmp_path):
    """Each row's prompt is the tokenizer's chat template applied to its conversation, its label the row's answer,
    its predict the reference's greedy reply: the trained answers where it has one."""
    from transformers import AutoTokenizer

    dataset = write_jsonl(tmp_path / "rows.jsonl", [row for row, _, _ in FILE_ROWS])
    assert main(["predict", str(write_config(tmp_path, tiny)), "--dataset", str(dataset)]) == 0
    written = read_rows(tmp_path / "generated_predictions.jsonl")
    tokenizer, reference = AutoTokenizer.from_pretrained(tiny.model), reference_of(tiny)
    assert len(written) == len(FILE_ROWS)
    for got, (_, messages, label) in zip(written, FILE_ROWS):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
        assert got == {"prompt": tokenizer.decode(ids, skip_special_tokens=True),
                       "predict": reference_reply(reference, tokenizer, ids), "label": label}
    assert [row["predict"] for row in written[:3]] == [A0, A1, A2]


def _dataset_dir(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "dataset_info.json").write_text(json.dumps({"tiny_qa": {"file_name": "tiny_qa.json"}}), encoding="utf-8")
    rows = [{"instruction": q, "input": "", "output": a} for q, a in TRAINED_QA]
    rows.append({"instruction": Q0, "input": "Say it twice.", "output": f"{A0} {A0}"})
    (data / "tiny_qa.json").write_text(json.dumps(rows), encoding="utf-8")
    return data


BAD_INPUT = {  # case -> (--dataset, what the one line says after "ktchat: error: ")
    "missing file": ("nope.jsonl", "dataset: nope.jsonl is not a file"),
    "row without its fields": ("bad.jsonl", "bad.jsonl: line 2: a row needs messages (OpenAI roles) or alpaca's "
                               "instruction (its keys: question)"),
    "not JSON": ("broken.jsonl", "broken.jsonl: line 1: not valid JSON"),
    "unknown name": ("tiny_qb", "data/dataset_info.json: no dataset named 'tiny_qb' (did you mean tiny_qa?)" if HAS_LF
                     else "dataset: tiny_qb is not a file, and a dataset by name needs LLaMA-Factory"),
    "another run's file": ("rows.jsonl", "generated_predictions.jsonl: row 1's prompt is not this run's"),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_one_line_before_the_model_loads(tiny, tmp_path, monkeypatch, capsys, checkpoint_reads, case):
    monkeypatch.chdir(tmp_path)
    _dataset_dir(tmp_path)
    write_jsonl(tmp_path / "bad.jsonl", [{"instruction": Q0}, {"question": Q1}])
    (tmp_path / "broken.jsonl").write_text('{"instruction": \n', encoding="utf-8")
    write_jsonl(tmp_path / "rows.jsonl", [row for row, _, _ in FILE_ROWS])
    write_jsonl(tmp_path / "generated_predictions.jsonl", [{"prompt": "another", "predict": "x", "label": A0}])
    dataset, message = BAD_INPUT[case]
    assert main(["predict", str(write_config(tmp_path, tiny)), "--dataset", dataset]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ktchat: error: ") and message in err[0], err
    assert checkpoint_reads == []


def test_a_complete_file_is_left_as_it_is_and_nothing_loads(tiny, tmp_path, checkpoint_reads, caplog):
    config = write_config(tmp_path, tiny, dataset=str(write_jsonl(tmp_path / "rows.jsonl", [FILE_ROWS[0][0]])))
    assert main(["predict", str(config)]) == 0
    before = (tmp_path / "generated_predictions.jsonl").read_bytes()
    assert checkpoint_reads == [tiny.model]  # the spy sees a load
    checkpoint_reads.clear()
    with caplog.at_level(logging.INFO, logger="ktchat"):
        assert main(["predict", str(config)]) == 0
    assert checkpoint_reads == [] and (tmp_path / "generated_predictions.jsonl").read_bytes() == before
    assert "holds all 1 rows already: nothing to generate" in caplog.text


def test_run_all_keeps_batch_size_rows_in_flight_and_cancels_them_when_stopped(tiny, monkeypatch):
    """The seam to the engine: batch_size sequences at once, a finished one making room for the next, and those still
    in flight cancelled when the caller stops (an error in on_done here, Ctrl+C for a user)."""
    from ktchat.engine import SamplingParams
    from ktchat.generate.predict import Request, run_all
    from ktchat.model import engine_of, load_model

    model, _ = load_model(tiny.model, tiny.adapter, experts_backend="torch", dtype="float32", device="cpu")
    engine = engine_of(model)
    engine.keep(0, max_batch=3)
    submitted, submit = [], engine.submit
    monkeypatch.setattr(engine, "submit", lambda *a, **k: submitted.append(submit(*a, **k)) or submitted[-1])
    budgets = [4, 6, 8, 400, 400, 400, 400]  # no stop ids: each reply runs to its budget
    requests = [Request(i, [1, 4, 100 + i, 2, 5], SamplingParams(max_new_tokens=n)) for i, n in enumerate(budgets)]
    busy = []

    def on_done(request, generation):
        busy.append(engine.stats()["running"] + engine.stats()["waiting"])
        if len(busy) == 3:
            raise RuntimeError("stopped")

    with pytest.raises(RuntimeError, match="stopped"):
        run_all(engine, requests, on_done, batch_size=3)
    assert len(submitted) == 5 and 2 <= max(busy) <= 3, (len(submitted), busy)  # rows 5 and 6 never went in
    ended = [s.wait(timeout=60) for s in submitted]
    assert [g.finish_reason for g in ended] == ["length"] * 3 + ["cancelled"] * 2
    assert all(len(g.tokens) < 400 for g in ended[3:])


# Untrained questions: replies run to max_new_tokens (a run lasts long enough to be killed) and sampling varies them.
OPEN_ROWS = [{"instruction": f"Tell me a story about the number {i}.", "output": f"story {i}"} for i in range(14)]


def test_a_sampled_run_resumes_with_the_rows_it_would_have_given(tiny, tmp_path):
    """With a seed, row i samples from seed + i: a run stopped after two rows and run again writes what one run does;
    another seed writes other replies (the sampling is live)."""
    dataset = write_jsonl(tmp_path / "rows.jsonl", OPEN_ROWS[:4])
    config = write_config(tmp_path, tiny, dataset=str(dataset), do_sample=True, temperature=1.0, seed=11)
    whole, resumed, other = (tmp_path / name for name in ("whole.jsonl", "resumed.jsonl", "other.jsonl"))
    assert main(["predict", str(config), "--save-name", str(whole)]) == 0
    resumed.write_text("".join(whole.read_text(encoding="utf-8").splitlines(keepends=True)[:2]), encoding="utf-8")
    assert main(["predict", str(config), "--save-name", str(resumed)]) == 0
    assert resumed.read_bytes() == whole.read_bytes()
    assert main(["predict", str(config), "--save-name", str(other), "--set", "seed=12"]) == 0
    assert [r["predict"] for r in read_rows(other)] != [r["predict"] for r in read_rows(whole)]


def _run_until_lines(command: list[str], path: Path, lines: int, log: Path, timeout: float = 300) -> None:
    """Starts `command` and kills it (SIGKILL) once `path` has at least `lines` lines."""
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **ENV})
    deadline = time.monotonic() + timeout
    try:
        while not (path.exists() and path.read_bytes().count(b"\n") >= lines):
            assert process.poll() is None, f"exited {process.returncode} before {lines} rows: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.02)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


def test_a_killed_run_resumes_without_duplicated_or_lost_rows(tiny, tmp_path):
    """The real `ktchat predict` (4 rows at once), killed once rows are written and run again, writes the file an
    uninterrupted run writes, one row at a time: every row once, in order."""
    dataset = write_jsonl(tmp_path / "rows.jsonl", OPEN_ROWS)
    config = write_config(tmp_path, tiny, dataset=str(dataset), max_new_tokens=32)
    killed, whole = tmp_path / "killed.jsonl", tmp_path / "whole.jsonl"
    command = [str(KTCHAT), "predict", str(config), "--save-name"]
    _run_until_lines(command + [str(killed)], killed, 2, tmp_path / "killed.log")
    assert 2 <= killed.read_bytes().count(b"\n") < len(OPEN_ROWS), "the run ended before it was killed"
    runs = [subprocess.run(command + [str(save), *flags], capture_output=True, text=True, env={**os.environ, **ENV},
                           timeout=600) for save, flags in ((killed, ()), (whole, ("--batch-size", "1")))]
    assert all(run.returncode == 0 for run in runs), [run.stderr[-3000:] for run in runs]
    assert re.search(r"rows generated \(.*\), after the \d+ a previous run wrote", runs[0].stderr), runs[0].stderr
    assert killed.read_bytes() == whole.read_bytes()
    assert [r["label"] for r in read_rows(whole)] == [r["output"] for r in OPEN_ROWS]


# ---------------------------------------------------------------------------------------------------------------
# A LLaMA-Factory dataset by name (.venv-lf)


def hf_infer_rows(model: Path, adapter: Path, data: Path, template) -> tuple:
    """LLaMA-Factory's tokenizer, and (input_ids, label ids) per row, built as LLaMA-Factory's scripts/hf_infer.py
    builds them (its worker count aside: preprocessing_num_workers decides how many processes tokenize, not what
    they produce)."""
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.extras.constants import IGNORE_INDEX
    from llamafactory.hparams import get_infer_args
    from llamafactory.model import load_tokenizer
    from transformers import Seq2SeqTrainingArguments

    model_args, data_args, _, _ = get_infer_args(dict(
        model_name_or_path=str(model), adapter_name_or_path=str(adapter), dataset="tiny_qa", dataset_dir=str(data),
        template=template, cutoff_len=2048, max_samples=None, preprocessing_num_workers=None,
        default_system=None, enable_thinking=True, temperature=0.95, top_p=0.7, top_k=50,
        max_new_tokens=MAX_NEW_TOKENS, repetition_penalty=1.0))
    tokenizer_module = load_tokenizer(model_args)
    template_obj = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    template_obj.mm_plugin.expand_mm_tokens = False
    dataset = get_dataset(template_obj, model_args, data_args, Seq2SeqTrainingArguments(output_dir="dummy_dir"),
                          "ppo", **tokenizer_module)["train_dataset"]
    return tokenizer_module["tokenizer"], [(r["input_ids"], [t for t in r["labels"] if t != IGNORE_INDEX])
                                           for r in dataset]


@needs_lf
@pytest.mark.parametrize("template", [None, "default"])
def test_a_llamafactory_dataset_is_predicted_as_hf_infer_builds_it(lf_tiny, tmp_path, template):
    """No template: LLaMA-Factory parses the tokenizer's (the format the adapter was trained on: the trained answers
    come out); `default`: one of its own by name."""
    from datasets import load_dataset

    data = _dataset_dir(tmp_path)
    config = write_config(tmp_path, lf_tiny, template=template, dataset="tiny_qa", dataset_dir=str(data))
    assert main(["predict", str(config)]) == 0
    written = read_rows(tmp_path / "generated_predictions.jsonl")
    tokenizer, rows = hf_infer_rows(lf_tiny.model, lf_tiny.adapter, data, template)
    reference = reference_of(lf_tiny)
    assert len(written) == len(rows) == len(TRAINED_QA) + 1
    for got, (ids, label) in zip(written, rows):
        assert got == {"prompt": tokenizer.decode(ids, skip_special_tokens=True),
                       "predict": reference_reply(reference, tokenizer, ids),
                       "label": tokenizer.decode(label, skip_special_tokens=True)}
    assert [r["label"].strip() for r in written] == [a for _, a in TRAINED_QA] + [f"{A0} {A0}"]  # default: a "\n"
    assert f"{Q0}\nSay it twice." in written[3]["prompt"]  # alpaca's instruction and input, one message
    if template is None:
        assert [r["predict"] for r in written[:3]] == [a for _, a in TRAINED_QA]
    scored = load_dataset("json", data_files=str(tmp_path / "generated_predictions.jsonl"), split="train")
    assert scored.to_list() == written  # as LLaMA-Factory's scripts/eval_bleu_rouge.py reads it
