"""Chat settings read from a LLaMA-Factory style inference YAML, validated once at the edge.

Users already have YAML files written for `llamafactory-cli chat`; ktchat reads them as they are. Every key is
either used, accepted and logged as ignored (with the reason), or rejected with an error naming it, so a typo
never silently changes what runs. The dataclasses are frozen and check themselves in `__post_init__`, so a
value that reached the library has been validated whether it came from YAML, the CLI or Python.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from . import formats
from .errors import KTChatError
from .formats.checkpoint import COMPUTE_DTYPES

logger = logging.getLogger(__name__)

INFER_BACKENDS = ("huggingface", "vllm", "sglang", "ktransformers")
# Served by ktchat with use_kt: LLaMA-Factory-KT's own inference YAMLs say ktransformers.
KT_SERVED_BACKENDS = ("huggingface", "ktransformers")
EXPERTS_BACKENDS = ("auto", "torch", "kt")
INFER_DTYPES = ("auto", *COMPUTE_DTYPES)
MOE_LORA_MODES = formats.MOE_LORA_MODES
# kt experts' weight formats: int4 is kt's own online INT4; rawint4 Kimi-K2's group-32 INT4 checkpoint
KT_METHODS = tuple(formats.KT_METHODS)
ALIASES = {"cpu_infer": "kt_num_threads"}  # LLaMA-Factory's older name -> ours
DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?")  # load_model checks at load time that the GPU exists

# LLaMA-Factory keys that mean nothing at ktchat inference: accepted so existing YAML files load, logged once.
_IGNORED_GROUPS = {
    "taken from the adapter's own config": "lora_rank lora_alpha use_rslora use_dora",
    "only used in training": (
        "stage do_train do_eval do_predict finetuning_type lora_dropout lora_target additional_target "
        "loraplus_lr_ratio pissa_init pissa_iter pissa_convert create_new_adapter freeze_trainable_layers "
        "freeze_trainable_modules freeze_extra_modules eval_dataset "
        "overwrite_cache dataloader_num_workers packing neat_packing train_on_prompt "
        "mask_history val_size tokenized_path output_dir overwrite_output_dir logging_steps save_steps "
        "save_strategy save_total_limit save_only_model plot_loss report_to run_name "
        "per_device_train_batch_size per_device_eval_batch_size gradient_accumulation_steps learning_rate "
        "num_train_epochs max_steps lr_scheduler_type warmup_ratio warmup_steps weight_decay max_grad_norm optim "
        "bf16 fp16 pure_bf16 ddp_timeout deepspeed resume_from_checkpoint eval_strategy eval_steps "
        "gradient_checkpointing disable_gradient_checkpointing moe_aux_loss_coef upcast_layernorm "
        "upcast_lmhead_output use_unsloth use_unsloth_gc enable_liger_kernel train_from_scratch"
    ),
    "ktchat places and runs the routed experts itself (see experts_backend)": (
        "kt_optimize_rule chunk_size kt_config kt_backend kt_mode kt_use_cuda_graph kt_maxlen kt_force_think"
    ),
    "ktchat's prompts (the chat template, or LLaMA-Factory's by template:) take no thinking switch or tools": (
        "enable_thinking tool_format"
    ),
    "only used by `llamafactory-cli export`": (
        "export_dir export_size export_device export_quantization_bit export_quantization_dataset "
        "export_quantization_nsamples export_quantization_maxlen export_legacy_format export_hub_model_id"
    ),
    "ktchat loads through transformers with its default settings": (
        "flash_attn rope_scaling low_cpu_mem_usage use_fast_tokenizer use_cache cache_dir model_revision "
        "split_special_tokens offload_folder print_param_status hf_hub_token ms_hub_token om_hub_token"
    ),
    "only used by the vllm/sglang engines": (
        "vllm_maxlen vllm_gpu_util vllm_enforce_eager vllm_max_lora_rank vllm_config "
        "sglang_maxlen sglang_mem_fraction sglang_tp_size sglang_config sglang_lora_backend"
    ),
    "ktchat decodes one beam, bounded by max_new_tokens": "num_beams max_length length_penalty",
    "special tokens are always removed from replies": "skip_special_tokens",
}


def _fail(key: str, value: Any, allowed: str) -> None:
    raise KTChatError(f"{key} must be {allowed} (got {value!r})")


def _check_choice(key: str, value: Any, choices: tuple, optional: bool = False) -> None:
    if (value is None and optional) or value in choices:
        return
    _fail(key, value, "one of " + ", ".join(choices))


def _check_int(key: str, value: Any, minimum: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(key, value, f"an integer >= {minimum}")


def _check_number(key: str, value: Any, low: float, high: float = float("inf"), low_open: bool = False) -> None:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if is_number and (low < value if low_open else low <= value) and value <= high:
        return
    bounds = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high != float("inf") else "")
    _fail(key, value, f"a finite number {bounds}" if high == float("inf") else f"a number {bounds}")


def check_gpu_prefill_settings(tokens: Any, gib: Any) -> tuple:
    """The GPU-prefill settings' one rule, for the YAML and for load_model's callers alike: (tokens, gib) with a
    YAML `off` read as false turned back into "off"; gib stays None where left out."""
    tokens = "off" if tokens is False else tokens
    if tokens not in (None, "auto", "off") and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
        _fail("gpu_prefill_tokens", tokens, "auto, off or an integer >= 1")
    if gib is not None:
        _check_number("gpu_prefill_gib", gib, 0, low_open=True)
    return tokens, gib


def check_gpu_experts_settings(gib: Any, placement: Any, calibration: Any):
    """The GPU experts settings' one rule, for the YAML and for load_model's callers: returns gib with a YAML `off`
    (false) read as None."""
    gib = None if gib in (False, "off") else gib
    if gib not in (None, "auto"):
        _check_number("gpu_experts_gib", gib, 0, low_open=True)
    strategies = formats.GPU_EXPERT_PLACEMENTS
    if not (placement in strategies or (isinstance(placement, str) and placement.endswith(".json"))):
        _fail("gpu_experts_placement", placement, f"one of {', '.join(strategies)} or a path ending in .json")
    if calibration is not None and not (isinstance(calibration, str) and Path(calibration).is_file()):
        _fail("gpu_experts_calibration", calibration, "a file of prompts that exists (a text file, or .jsonl)")
    return gib


def _check_bool(key: str, value: Any, optional: bool = False) -> None:
    if not isinstance(value, bool) and not (value is None and optional):
        _fail(key, value, "true or false" + (" (or left out)" if optional else ""))


def _check_str(key: str, value: Any, optional: bool = True) -> None:
    if (value is None and optional) or (isinstance(value, str) and value.strip()):
        return
    _fail(key, value, "a non-empty string")


# ModelArgs fields load_model takes under another name, and those it takes by position or not at all (template is
# for the prompts, infer_backend only checked, use_kt folded into experts_backend); tests/unit/test_lists.py fails
# when a field fits neither load_model nor these
LOAD_NAMES = {"kt_num_threads": "num_threads", "infer_dtype": "dtype"}
NOT_LOAD_KWARGS = ("model_name_or_path", "adapter_name_or_path", "template", "infer_backend", "use_kt")


@dataclass(frozen=True)
class ModelArgs:
    """Which model and adapter to load and where the routed experts run."""

    model_name_or_path: str
    adapter_name_or_path: Optional[str] = None
    template: Optional[str] = None  # LLaMA-Factory's template by this name where it is installed, else the tokenizer's
    infer_backend: str = "huggingface"
    use_kt: bool = False
    trust_remote_code: bool = False
    experts_backend: str = "auto"
    device: Optional[str] = None  # None: cuda if available, else cpu
    infer_dtype: str = "auto"  # auto: the checkpoint's own dtype
    kt_num_threads: Optional[int] = None
    moe_lora: Optional[str] = None  # None: the experts backend's default
    kt_method: Optional[str] = None  # experts' weight format; None: the adapter's training format, else bf16
    kt_weight_path: Optional[str] = None  # KT's pre-converted routed INT8 (default: the adapter's int8_experts)
    merge_peft_lora: bool = False  # fold the compute-device LoRA into its weights after loading
    cuda_graphs: Optional[bool] = None  # None: on wherever everything but the experts sits on one GPU
    # GPU prefill (model.moe.enable_gpu_prefill): prompts from this many tokens run the routed experts on the GPU;
    # auto: from the link and CPU rates measured at load; off (YAML's bare off is false); None: auto where the
    # experts backend shares its host copy (torch), off for kt (auto or N keeps kt's bf16 weights: more host memory)
    gpu_prefill_tokens: Any = None
    gpu_prefill_gib: Optional[float] = None  # GPU memory for the two streamed weight slots; None: 4 GiB
    # Routed experts kept on the GPU with their LoRA (model.gpu_experts): GiB they may take, "auto" (what the GPU has
    # free after the load, less a margin) or off; which ones (frequency, uniform, front, or a placement .json, read if
    # it exists, else written); the prompts that count the routing for `frequency` (default: a built-in text)
    gpu_experts_gib: Any = None
    gpu_experts_placement: str = "frequency"
    gpu_experts_calibration: Optional[str] = None

    def __post_init__(self):
        _check_str("model_name_or_path", self.model_name_or_path, optional=False)
        self._check_adapter()
        _check_str("template", self.template)
        _check_choice("infer_backend", self.infer_backend, INFER_BACKENDS)
        _check_bool("use_kt", self.use_kt)
        _check_bool("trust_remote_code", self.trust_remote_code)
        _check_choice("experts_backend", self.experts_backend, EXPERTS_BACKENDS)
        _check_choice("infer_dtype", self.infer_dtype, INFER_DTYPES)
        _check_int("kt_num_threads", self.kt_num_threads, minimum=1, optional=True)
        _check_choice("moe_lora", self.moe_lora, MOE_LORA_MODES, optional=True)
        _check_choice("kt_method", self.kt_method, KT_METHODS, optional=True)
        _check_str("kt_weight_path", self.kt_weight_path)
        _check_bool("merge_peft_lora", self.merge_peft_lora)
        _check_bool("cuda_graphs", self.cuda_graphs, optional=True)
        self._check_gpu_prefill()
        object.__setattr__(self, "gpu_experts_gib", check_gpu_experts_settings(
            self.gpu_experts_gib, self.gpu_experts_placement, self.gpu_experts_calibration))
        self._check_device()
        self._check_kt()

    def _check_adapter(self) -> None:
        """LLaMA-Factory allows a comma-separated list of adapters; ktchat folds in exactly one for now."""
        _check_str("adapter_name_or_path", self.adapter_name_or_path)
        paths = [p.strip() for p in (self.adapter_name_or_path or "").split(",") if p.strip()]
        if len(paths) > 1:
            raise KTChatError(f"adapter_name_or_path lists {len(paths)} adapters ({', '.join(paths)}): "
                              "ktchat loads exactly one; merge the others first")
        object.__setattr__(self, "adapter_name_or_path", paths[0] if paths else None)

    def _check_device(self) -> None:
        """The spelling here; whether that GPU exists is load_model's check (it needs torch), still before loading."""
        if self.device is not None and not (isinstance(self.device, str) and DEVICE_RE.fullmatch(self.device)):
            _fail("device", self.device, "auto, cpu, cuda or cuda:N (or left out)")
        if self.cuda_graphs and self.device == "cpu":
            raise KTChatError("cuda_graphs: true needs a CUDA device, but device is cpu: set cuda_graphs: false or "
                              "leave it out")

    def _check_gpu_prefill(self) -> None:
        tokens, _ = check_gpu_prefill_settings(self.gpu_prefill_tokens, self.gpu_prefill_gib)
        object.__setattr__(self, "gpu_prefill_tokens", tokens)

    def _check_kt(self) -> None:
        """use_kt means our CPU experts inside transformers, so it cannot combine with another engine."""
        if self.use_kt and self.infer_backend not in KT_SERVED_BACKENDS:
            raise KTChatError(f"use_kt: true needs infer_backend: huggingface (got {self.infer_backend!r}): "
                              "ktchat runs the routed experts on the CPU through transformers")
        if self.infer_backend not in KT_SERVED_BACKENDS:
            logger.warning("ignored: infer_backend: %s (ktchat always generates through transformers)",
                           self.infer_backend)
        if not self.use_kt and self.experts_backend == "kt":
            raise KTChatError("experts_backend: kt needs use_kt: true (the kt_kernel CPU experts are KT mode)")

    @property
    def resolved_experts_backend(self) -> str:
        """Without use_kt the experts stay plain torch, as LLaMA-Factory's non-KT inference would run them."""
        return self.experts_backend if self.use_kt else "torch"

    def load_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `ktchat.load_model` these settings stand for (chat, api and the hook alike),
        derived from the fields: load_model's names where the YAML keeps LLaMA-Factory's (LOAD_NAMES), use_kt
        deciding experts_backend, infer_dtype's "auto" as None. `load_model(model_args)` takes them as they are."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in NOT_LOAD_KWARGS}
        values.update(experts_backend=self.resolved_experts_backend, infer_dtype=self.dtype)
        return {LOAD_NAMES.get(key, key): value for key, value in values.items()}

    @property
    def dtype(self) -> Optional[str]:
        """The dtype name load_model takes; None keeps the checkpoint's own dtype."""
        return None if self.infer_dtype == "auto" else self.infer_dtype


@dataclass(frozen=True)
class GenerationArgs:
    """Decoding settings; defaults mirror LLaMA-Factory's GeneratingArguments so replies match theirs."""

    max_new_tokens: int = 1024
    temperature: float = 0.95
    top_p: float = 0.7
    top_k: int = 50
    do_sample: bool = True
    repetition_penalty: float = 1.0
    default_system: Optional[str] = None

    def __post_init__(self):
        _check_int("max_new_tokens", self.max_new_tokens, minimum=1)
        _check_number("temperature", self.temperature, low=0.0)
        _check_number("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        _check_int("top_k", self.top_k, minimum=0)
        _check_bool("do_sample", self.do_sample)
        _check_number("repetition_penalty", self.repetition_penalty, low=0.0, low_open=True)
        _check_str("default_system", self.default_system)

    @property
    def greedy(self) -> bool:
        """LLaMA-Factory treats temperature 0 as greedy too; transformers would reject it when sampling."""
        return not self.do_sample or self.temperature == 0


@dataclass(frozen=True)
class PredictArgs:
    """`ktchat predict`'s dataset and output settings: names and defaults as LLaMA-Factory's scripts/hf_infer.py takes
    them (dataset has no default there worth keeping: alpaca_en_demo exists only in LLaMA-Factory's own checkout)."""

    dataset: str  # a name in dataset_dir/dataset_info.json (LLaMA-Factory's pipeline), or a .jsonl / .json file
    dataset_dir: str = "data"
    cutoff_len: int = 2048  # prompt tokens kept (LLaMA-Factory shares it with the label on its pipeline)
    max_samples: Optional[int] = None  # the first N rows; None: all
    save_name: str = "generated_predictions.jsonl"
    skip_special_tokens: bool = True  # when decoding prompt, predict and label
    seed: Optional[int] = None  # sampling: row i draws from a generator seeded seed + i
    batch_size: int = 4  # rows generated at once (the engine batches them) and rows per fsync
    enable_thinking: bool = True  # LLaMA-Factory's template switch, for datasets read by its pipeline
    preprocessing_num_workers: Optional[int] = None  # LLaMA-Factory's pipeline: processes for tokenizing

    def __post_init__(self):
        _check_str("dataset", self.dataset, optional=False)
        _check_str("dataset_dir", self.dataset_dir, optional=False)
        _check_int("cutoff_len", self.cutoff_len, minimum=1)
        _check_int("max_samples", self.max_samples, minimum=1, optional=True)
        _check_str("save_name", self.save_name, optional=False)
        _check_bool("skip_special_tokens", self.skip_special_tokens)
        _check_int("seed", self.seed, minimum=0, optional=True)
        _check_int("batch_size", self.batch_size, minimum=1)
        _check_bool("enable_thinking", self.enable_thinking)
        _check_int("preprocessing_num_workers", self.preprocessing_num_workers, minimum=1, optional=True)


# Every key PredictArgs reads is accepted by the other commands too (one YAML for chat and predict), and ignored there:
# with the reason of its group above where it has one (what chat does instead), else this one.
IGNORED_KEYS = {
    **{f.name: "only used by `ktchat predict` and in training" for f in fields(PredictArgs)},
    **{key: reason for reason, keys in _IGNORED_GROUPS.items() for key in keys.split()},
}


@dataclass(frozen=True)
class ChatConfig:
    model: ModelArgs
    generation: GenerationArgs = field(default_factory=GenerationArgs)
    predict: Optional[PredictArgs] = None  # read only for `ktchat predict` (config_from_mapping's predict=True)


_MODEL_KEYS = {f.name for f in fields(ModelArgs)}
_GENERATION_KEYS = {f.name for f in fields(GenerationArgs)}
_PREDICT_KEYS = {f.name for f in fields(PredictArgs)}


def _resolve_aliases(raw: dict) -> dict:
    """Rename LLaMA-Factory's older keys; both spellings with different values is a mistake."""
    out = dict(raw)
    for old, new in ALIASES.items():
        if old not in out:
            continue
        value = out.pop(old)
        if new in out and out[new] != value:
            raise KTChatError(f"{old}: {value!r} and {new}: {out[new]!r} disagree ({old} is the older name of {new})")
        out[new] = value
        logger.info("%s is read as %s: %r", old, new, value)
    return out


def _check_unknown(keys) -> None:
    """Unknown keys are errors naming them, except LLaMA-Factory-KT's ever-growing kt_* family: those are logged
    as ignored, unless one is a near-miss of a key ktchat reads (a typo must not be ignored)."""
    known = _MODEL_KEYS | _GENERATION_KEYS | set(ALIASES) | set(IGNORED_KEYS)
    unknown = sorted(set(keys) - known)
    foreign_kt = [k for k in unknown if k.startswith("kt_") and not difflib.get_close_matches(k, known, n=1, cutoff=0.85)]
    if foreign_kt:
        logger.info("ignored: %s (LLaMA-Factory KT settings: ktchat reads the adapter and places the routed experts "
                    "itself)", ", ".join(foreign_kt))
    unknown = [k for k in unknown if k not in foreign_kt]
    if not unknown:
        return
    hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, known, n=1)) else k for k in unknown]
    raise KTChatError(f"unknown key{'s' if len(unknown) > 1 else ''}: {', '.join(hints)}")


def _log_ignored(keys, read=frozenset()) -> None:
    """One line per reason, so a training YAML reused for chat explains itself without flooding the log; `read`: keys
    of IGNORED_KEYS this command reads after all (predict's)."""
    by_reason: dict[str, list[str]] = {}
    for key in sorted(k for k in keys if k in IGNORED_KEYS and k not in read):
        by_reason.setdefault(IGNORED_KEYS[key], []).append(key)
    for reason, names in by_reason.items():
        logger.info("ignored: %s (%s)", ", ".join(names), reason)


def _as_float(raw: dict) -> dict:
    """YAML reads `temperature: 1` as an int; store floats so equal configs compare equal."""
    return {k: float(v) if k in ("temperature", "top_p", "repetition_penalty") and type(v) is int else v
            for k, v in raw.items()}


def _pick(flat: dict, keys: set) -> dict:
    return {k: v for k, v in flat.items() if k in keys}


def config_from_mapping(raw: Mapping[str, Any], *, predict: bool = False) -> ChatConfig:
    """Build a ChatConfig from LLaMA-Factory style flat keys; errors name the key and value (no file). With predict,
    PredictArgs' keys are read (dataset required) instead of ignored."""
    if not isinstance(raw, Mapping):
        raise KTChatError(f"settings must be a mapping of key: value (got {type(raw).__name__})")
    bad = [k for k in raw if not isinstance(k, str)]
    if bad:
        raise KTChatError(f"keys must be strings (got {bad[0]!r})")
    _check_unknown(raw)
    flat = _as_float(_resolve_aliases(raw))
    if flat.get("model_name_or_path") is None:
        raise KTChatError("model_name_or_path is missing: set it to a local model directory or hub id")
    if predict and flat.get("dataset") is None:
        raise KTChatError("dataset is missing: set it to a dataset name of dataset_info.json or a .jsonl file")
    _log_ignored(flat, read=_PREDICT_KEYS if predict else frozenset())
    return ChatConfig(model=ModelArgs(**_pick(flat, _MODEL_KEYS)),
                      generation=GenerationArgs(**_pick(flat, _GENERATION_KEYS)),
                      predict=PredictArgs(**_pick(flat, _PREDICT_KEYS)) if predict else None)


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KTChatError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KTChatError(f"cannot read config file {path}: {exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise KTChatError(f"{path}: invalid YAML{where}: {problem}") from None


# The JSON files transformers reads from a model folder.
_JSON_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.json",
               "special_tokens_map.json", "added_tokens.json")


def check_folders(model_name_or_path, adapter_name_or_path=None) -> tuple[Path, Optional[Path]]:
    """The model and adapter folders, local (ktchat never downloads), the model folder's JSON files valid: checked
    without torch, so the commands say so before their slow imports (and load_model's plan again, the same way)."""
    model_dir = _local_folder(model_name_or_path, "model_name_or_path")
    adapter_dir = _local_folder(adapter_name_or_path, "adapter_name_or_path") if adapter_name_or_path else None
    for name in _JSON_FILES:  # tokenizers raises a bare Exception on a corrupt file: one line naming it instead
        path = model_dir / name
        if path.is_file():
            try:
                json.loads(path.read_bytes())
            except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                raise KTChatError(f"{path}: not valid JSON ({exc})") from None
    return model_dir, adapter_dir


def _local_folder(path, key: str) -> Path:
    folder = Path(str(path)).expanduser()
    if not folder.is_dir():
        raise KTChatError(f"{key}: {path} is not a local folder (ktchat never downloads from a model hub)")
    return folder


def load_config(path, overrides: Optional[Mapping[str, Any]] = None, *, predict: bool = False) -> ChatConfig:
    """Read an inference YAML; `overrides` (e.g. from `--set`) win over the file; predict: as config_from_mapping's.
    Errors name the file."""
    path = Path(path)
    raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise KTChatError(f"{path}: expected a mapping of key: value at the top level "
                          f"(got {type(raw).__name__})")
    try:
        return config_from_mapping({**raw, **(overrides or {})}, predict=predict)
    except KTChatError as exc:
        raise KTChatError(f"{path}: {exc}") from None


def parse_overrides(items) -> dict[str, Any]:
    """`key=value` strings from the command line; values are read as YAML scalars (40, false, 0.7, text)."""
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise KTChatError(f"--set expects key=value (got {item!r})")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            out[key.strip()] = value
    return out
