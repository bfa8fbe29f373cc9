"""`ktchat predict`: a reply for every row of a dataset, written to LLaMA-Factory's generated_predictions.jsonl.

The output is what LLaMA-Factory's scripts/hf_infer.py and vllm_infer.py write (one JSON object a line: prompt,
predict, label; scripts/eval_bleu_rouge.py scores it), in dataset order, flushed and fsync'd every `batch_size` rows.
`batch_size` rows generate at once, batched into the engine's steps (run_all). A rerun with the same save_name
resumes: the rows already there must be the first rows of this run (same prompt, same label; else one error naming
the file and the row, before the model loads), a line cut short by a kill is written again, and generation continues
after them. No cache is kept from one row to the next, a sampled row draws from its own generator (seed + row
index), and with fp32 experts a batched reply is the row's reply alone (tests/test_batching.py), so a resumed run
writes the rows an uninterrupted one would; in bf16 a routing near-tie may round either way depending on the batch
around a row.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Optional

from ..config import ChatConfig, check_folders
from ..errors import KTChatError
from .prompts import check_template
from .rows import Row, Rows, open_dataset

if TYPE_CHECKING:
    from ..engine import Generation, SamplingParams

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Request:
    index: int  # the row's index in the dataset
    prompt: list[int]
    params: "SamplingParams"


def run_all(engine, requests: Iterable[Request], on_done: Callable[[Request, "Generation"], None],
            batch_size: int) -> None:
    """Generates every request on `engine`, `batch_size` at a time (the engine batches them into its steps), calling
    on_done(request, Generation) on this thread as each one finishes, in any order; a finished one makes room for the
    next. Whatever ends it early (an error, Ctrl+C) cancels the ones still in flight."""
    finished: queue.Queue = queue.Queue()
    waiting, in_flight = iter(requests), {}
    try:
        while True:
            while len(in_flight) < batch_size and (request := next(waiting, None)) is not None:
                in_flight[engine.submit(request.prompt, request.params, on_end=finished.put)] = request
            if not in_flight:
                return
            sequence = finished.get()
            on_done(in_flight.pop(sequence), sequence.wait())
    finally:
        for sequence in in_flight:
            engine.cancel(sequence)


class Predictions:
    """The output file: rows in dataset order, one JSON object a line, synced every `sync_every` rows. Opening it
    checks what a previous run left there (`done`: how many rows need no generation)."""

    def __init__(self, path: Path, rows: list[Row], sync_every: int):
        self.path, self.rows, self.sync_every = path, rows, sync_every
        self.done, self._keep = self._resume()
        self._pending: dict[int, str] = {}
        self._file, self._unsynced = None, 0

    def _resume(self) -> tuple[int, int]:
        """(rows already written, bytes of them): complete lines that are this run's first rows; a last line a kill
        cut short does not count."""
        if not self.path.exists():
            return 0, 0
        data = self.path.read_bytes()
        complete = data[:data.rfind(b"\n") + 1]
        lines = complete.split(b"\n")[:-1]
        if len(lines) > len(self.rows):
            raise KTChatError(f"{self.path} holds {len(lines)} rows, more than the {len(self.rows)} of this run: it "
                              "comes from another dataset or max_samples; move it away or set save_name")
        for index, line in enumerate(lines):
            self._check(index, line)
        if len(complete) < len(data):
            logger.info("%s: its last line was cut short (a run stopped while writing it): written again", self.path)
        return len(lines), len(complete)

    def _check(self, index: int, line: bytes) -> None:
        try:
            written = json.loads(line.decode("utf-8"))
        except ValueError:
            written = None
        if not isinstance(written, dict) or not {"prompt", "predict", "label"} <= set(written):
            raise KTChatError(f"{self.path}: line {index + 1} is not a row of predictions (a JSON object with prompt, "
                              "predict and label): move the file away or set save_name")
        for key in ("prompt", "label"):
            if written[key] != getattr(self.rows[index], key):
                raise KTChatError(
                    f"{self.path}: row {index + 1}'s {key} is not this run's ({written[key]!r:.60} here, "
                    f"{getattr(self.rows[index], key)!r:.60} now): the file comes from another dataset or settings; "
                    "move it away or set save_name")

    def __enter__(self) -> "Predictions":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            os.truncate(self.path, self._keep)  # drops a line a kill cut short
        self._file = open(self.path, "a", encoding="utf-8")
        return self

    def add(self, index: int, predict: str) -> None:
        """Row `index`'s reply; written once every row before it is."""
        self._pending[index] = predict
        while self.done in self._pending:
            row = self.rows[self.done]
            record = {"prompt": row.prompt, "predict": self._pending.pop(self.done), "label": row.label}
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
            self.done += 1
            self._unsynced += 1
        if self._unsynced >= self.sync_every:
            self._sync()

    def _sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._unsynced = 0

    def __exit__(self, *exc) -> None:
        self._sync()
        self._file.close()


class Progress:
    """A tqdm bar of rows, generated tok/s in its postfix (off where stderr is no terminal), and the last log line."""

    def __init__(self, total: int, done: int, path: Path):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=done, unit="row", desc="predict", disable=None, dynamic_ncols=True)
        self.path, self.resumed, self.rows, self.tokens = path, done, 0, 0
        self.start = time.perf_counter()

    def row_done(self, tokens: int) -> None:
        self.rows, self.tokens = self.rows + 1, self.tokens + tokens
        self.bar.set_postfix_str(f"{self.rate:.1f} tok/s", refresh=False)
        self.bar.update(1)

    @property
    def rate(self) -> float:
        return self.tokens / max(time.perf_counter() - self.start, 1e-9)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
        logger.info("%s: %d rows generated (%d tokens, %.1f tok/s)%s", self.path, self.rows, self.tokens, self.rate,
                    f", after the {self.resumed} a previous run wrote" if self.resumed else "")


def _seed(seed: Optional[int], index: int) -> Optional[int]:
    return None if seed is None else seed + index


def predict(config: ChatConfig) -> Path:
    """Generates the rows of `config.predict.dataset` that save_name does not hold yet; returns save_name's path.
    Everything that can be checked without the weights is checked first: the dataset, the template, the model
    folder, the rows already written."""
    args = config.predict
    dataset = open_dataset(args)
    check_template(config.model.template)
    check_folders(config.model.model_name_or_path, config.model.adapter_name_or_path)
    from ..model import engine_of, load_model, resolve

    plan = resolve(config.model)
    rows = dataset.rows(plan, config)
    out = Predictions(Path(args.save_name).expanduser(), rows.rows, args.batch_size)
    if out.done == len(rows.rows):
        logger.info("%s holds all %d rows already: nothing to generate", out.path, out.done)
        return out.path
    model, _ = load_model(plan)
    engine = engine_of(model)
    engine.keep(0, max_batch=args.batch_size)  # each row computed whole: no cache kept from the rows before it
    _generate(engine, rows, out, config)
    return out.path


def _generate(engine, rows: Rows, out: Predictions, config: ChatConfig) -> None:
    args = config.predict
    requests = (Request(i, list(rows.rows[i].prompt_ids),
                        rows.prompts.sampling(config.generation, seed=_seed(args.seed, i)))
                for i in range(out.done, len(rows.rows)))

    with out, Progress(len(rows.rows), out.done, out.path) as progress:
        def on_done(request: Request, generation: "Generation") -> None:
            out.add(request.index, rows.decode(generation.tokens))
            progress.row_done(len(generation.tokens))

        run_all(engine, requests, on_done, args.batch_size)
