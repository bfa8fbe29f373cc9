"""A dataset as the rows `ktchat predict` generates for: each row's prompt ids, and its prompt and label as written.

Two readers. A dataset *name* goes through LLaMA-Factory's own pipeline as its scripts/hf_infer.py drives it
(dataset_info.json in dataset_dir, the template, cutoff_len, max_samples, default_system, enable_thinking, the "ppo"
stage's unsupervised processor), so the rows are the ones hf_infer.py and vllm_infer.py predict. A *file* (JSONL, or a
JSON list) of OpenAI-style `messages` or alpaca fields is read by ktchat and formatted by its Prompts, as `ktchat chat`
sends a conversation. A file is checked whole, and a name looked up in dataset_info.json, before anything loads: an
error names the file and the row.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..config import ChatConfig, PredictArgs
from ..errors import KTChatError
from .prompts import Prompts, bound_template

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
FILE_SUFFIXES = (".jsonl", ".json")


@dataclass(frozen=True)
class Row:
    prompt_ids: tuple[int, ...]
    prompt: str  # the prompt ids decoded, as LLaMA-Factory writes them
    label: str  # the reference reply: LLaMA-Factory's label ids decoded, or a file row's last assistant message


@dataclass(frozen=True)
class Rows:
    """The rows, with the tokenizer that decodes them and the Prompts whose stop ids end a reply."""

    rows: list[Row]
    tokenizer: Any
    prompts: Prompts
    skip_special_tokens: bool

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=self.skip_special_tokens)


@dataclass(frozen=True)
class Conversation:
    messages: list[dict]  # ending in the user message the reply answers
    label: str


def open_dataset(args: PredictArgs) -> "FileDataset | NamedDataset":
    """The dataset `args.dataset` names, checked: an existing file is read whole, else it is a name of
    dataset_dir/dataset_info.json (which needs LLaMA-Factory)."""
    path = Path(args.dataset).expanduser()
    if path.is_file():
        return FileDataset(path, read_conversations(path, args.max_samples))
    if path.suffix in FILE_SUFFIXES:
        raise KTChatError(f"dataset: {args.dataset} is not a file")
    check_names(args)
    return NamedDataset()


# --- files: JSONL or a JSON list of messages or alpaca rows --------------------------------------------------------

def read_conversations(path: Path, max_samples: Optional[int] = None) -> list[Conversation]:
    """The file's first `max_samples` rows (all: None) as conversations; a row that is not one is an error naming it."""
    rows = _json_rows(path)
    if not rows:
        raise KTChatError(f"{path}: holds no rows")
    return [conversation(obj, where) for where, obj in rows[:max_samples]]


def _json_rows(path: Path) -> list[tuple[str, Any]]:
    """(where, object) per row: a JSON list's items, else one object per non-empty line."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise KTChatError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if text.lstrip().startswith("["):
        items = _parse(text, str(path))
        if not isinstance(items, list):
            raise KTChatError(f"{path}: expected a JSON list of rows")
        return [(f"{path}: row {n}", item) for n, item in enumerate(items, 1)]
    lines = [(f"{path}: line {n}", line) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
    return [(where, _parse(line, where)) for where, line in lines]


def _parse(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise KTChatError(f"{where}: not valid JSON ({exc})") from None


def conversation(obj: Any, where: str) -> Conversation:
    """One row: {"messages": [...]} (OpenAI roles; a last assistant message is the label) or alpaca's fields
    (instruction, input, output, system, history), joined as LLaMA-Factory's alpaca converter joins them."""
    if not isinstance(obj, dict):
        raise KTChatError(f"{where}: expected a JSON object (got {type(obj).__name__})")
    if "messages" in obj:
        return _from_messages(obj["messages"], where)
    if "instruction" in obj:
        return _from_alpaca(obj, where)
    keys = ", ".join(obj) or "none"
    raise KTChatError(f"{where}: a row needs messages (OpenAI roles) or alpaca's instruction (its keys: {keys})")


def _from_messages(messages: Any, where: str) -> Conversation:
    if not isinstance(messages, list) or not messages:
        raise KTChatError(f"{where}: messages must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise KTChatError(f"{where}: messages[{i}] must be {{\"role\": {' | '.join(ROLES)}, \"content\": text}} "
                              f"(got {json.dumps(m, ensure_ascii=False)[:80]})")
    labelled = messages[-1]["role"] == "assistant"
    prompt = messages[:-1] if labelled else messages
    if not prompt or prompt[-1]["role"] != "user":
        raise KTChatError(f"{where}: the messages before the reply must end with a user message")
    return Conversation([{"role": m["role"], "content": m["content"]} for m in prompt],
                        messages[-1]["content"] if labelled else "")


def _from_alpaca(obj: dict, where: str) -> Conversation:
    for key in ("instruction", "input", "output", "system"):
        if obj.get(key) is not None and not isinstance(obj[key], str):
            raise KTChatError(f"{where}: {key} must be text (got {type(obj[key]).__name__})")
    history = obj.get("history") or []
    if not isinstance(history, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(t, str) for t in p) for p in history):
        raise KTChatError(f"{where}: history must be a list of [question, answer] pairs of text")
    messages = [{"role": "system", "content": obj["system"]}] if obj.get("system") else []
    for question, answer in history:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    query = "\n".join(obj[k] for k in ("instruction", "input") if obj.get(k))
    return Conversation(messages + [{"role": "user", "content": query}], obj.get("output") or "")


@dataclass(frozen=True)
class FileDataset:
    path: Path
    conversations: list[Conversation]

    def rows(self, plan, config: ChatConfig) -> Rows:
        """Prompts as `ktchat chat` builds them (the template by name where LLaMA-Factory is installed, else the
        tokenizer's), cut to their first cutoff_len tokens."""
        from ..model.plan import read_tokenizer

        args = config.predict
        tokenizer = read_tokenizer(plan.model_dir, plan.trust_remote_code)
        prompts = Prompts.named(plan, tokenizer, config.model.template, config.generation.default_system)
        out = Rows([], tokenizer, prompts, args.skip_special_tokens)
        encoded = [prompts.encode(c.messages) for c in self.conversations]
        cut = sum(len(ids) > args.cutoff_len for ids in encoded)
        if cut:
            logger.warning("%s: %d prompts longer than cutoff_len (%d tokens) are cut to their first %d tokens",
                           self.path, cut, args.cutoff_len, args.cutoff_len)
        if not args.enable_thinking:
            logger.info("ignored: enable_thinking: false (LLaMA-Factory's switch, for datasets read by its pipeline)")
        for ids, c in zip(encoded, self.conversations):
            out.rows.append(Row(tuple(ids[:args.cutoff_len]), out.decode(ids[:args.cutoff_len]), c.label))
        return out


# --- names: LLaMA-Factory's dataset_info.json and pipeline ---------------------------------------------------------

def check_names(args: PredictArgs) -> None:
    """Each comma-separated name is in dataset_dir/dataset_info.json (dataset_dir ONLINE: LLaMA-Factory looks them up
    on the hub itself), and LLaMA-Factory is there to read it."""
    if importlib.util.find_spec("llamafactory") is None:
        raise KTChatError(f"dataset: {args.dataset} is not a file, and a dataset by name needs LLaMA-Factory, which is "
                          "not installed here: give a .jsonl file of messages or alpaca rows (docs/predict.md)")
    if args.dataset_dir == "ONLINE":
        return
    info_path = Path(args.dataset_dir).expanduser() / "dataset_info.json"
    if not info_path.is_file():
        raise KTChatError(f"{info_path}: not found (dataset_dir: {args.dataset_dir}), where dataset "
                          f"{args.dataset} is looked up by name")
    info = _parse(info_path.read_text(encoding="utf-8"), str(info_path))
    for name in (n.strip() for n in args.dataset.split(",")):
        if not isinstance(info, dict) or name not in info:
            close = difflib.get_close_matches(name, list(info) if isinstance(info, dict) else [], n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise KTChatError(f"{info_path}: no dataset named {name!r}{hint}")


class NamedDataset:
    def rows(self, plan, config: ChatConfig) -> Rows:
        """LLaMA-Factory's tokenizer, template and dataset pipeline, called as scripts/hf_infer.py calls them (the
        tokenizer is LLaMA-Factory's: its template may add special tokens to it)."""
        from llamafactory.extras.constants import IGNORE_INDEX

        tokenizer, template, dataset = _llamafactory_dataset(plan, config)
        prompts = Prompts(plan, tokenizer, bound_template(tokenizer, template, config.model.template),
                          config.generation.default_system)
        out = Rows([], tokenizer, prompts, config.predict.skip_special_tokens)
        for example in dataset:
            ids, label = example["input_ids"], [t for t in example["labels"] if t != IGNORE_INDEX]
            out.rows.append(Row(tuple(ids), out.decode(ids), out.decode(label)))
        return out


def _llamafactory_dataset(plan, config: ChatConfig):
    """(tokenizer, template, the "ppo" train dataset) as hf_infer.py builds them; its errors as one line."""
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments, ModelArguments
    from llamafactory.model import load_tokenizer
    from transformers import Seq2SeqTrainingArguments

    args = config.predict
    model_args = ModelArguments(model_name_or_path=str(plan.model_dir), trust_remote_code=plan.trust_remote_code)
    data_args = DataArguments(
        dataset=args.dataset, dataset_dir=args.dataset_dir, template=config.model.template, cutoff_len=args.cutoff_len,
        max_samples=args.max_samples, preprocessing_num_workers=args.preprocessing_num_workers,
        default_system=config.generation.default_system, enable_thinking=args.enable_thinking)
    module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(module["tokenizer"], data_args)
    template.mm_plugin.expand_mm_tokens = False
    try:
        dataset = get_dataset(template, model_args, data_args, Seq2SeqTrainingArguments(output_dir="dummy_dir"), "ppo",
                              **module)["train_dataset"]
    except (ValueError, OSError, KeyError) as exc:  # KeyError: a row without a column dataset_info.json names
        raise KTChatError(f"dataset: {args.dataset}: LLaMA-Factory cannot read it "
                          f"({type(exc).__name__}: {' '.join(str(exc).split())})") from None
    return module["tokenizer"], template, dataset
