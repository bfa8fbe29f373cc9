"""Train, then chat: the real `llamafactory-cli train` with `use_kt: true` fine-tunes a tiny model for a few steps
(.venv-lfkt: llamafactory-kt with its forks and kt_kernel's SFT kernels), and ktchat serves what it wrote (KT's fused
expert LoRA + manifest, the rest in PEFT's file) against the fp32 hand-merged reference (tests/reference.py): in
process (logits, and without the expert LoRA they leave the reference for one merged without it), and through
`ktchat chat`, `ktchat api` and `llamafactory-cli chat` with the hook (greedy replies equal the reference's).

scripts/test.sh runs this file in .venv-lfkt. Training needs kt_kernel's SFT kernels, which its avx512_bf16 and amx
builds have; elsewhere the training tests skip saying why. The first test, the reference's own reading of KT's fused
file, runs everywhere.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from reference import (FUSED_EXPERT_LORA, is_routed_expert, load_reference, logits, merge_by_hand, read_checkpoint,
                       rel_err)
from servers import get_json, start_server
from test_llamafactory import ENV, LF_TIMEOUT, _http, _ktchat_replies, _lf_cli
from tolerances import FP32_BOUND, KT_BF16_BOUND

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = "default"  # LLaMA-Factory's, for training and for every chat below
MAX_NEW = 32
# A few steps on the three trained questions (batch 3), at a rate that makes the expert LoRA matter (its B starts at
# zero): tens of seconds on two cores. The replies need not be the trained answers: they are compared with the
# reference's, whatever they are.
TRAIN = {"max_steps": 16, "learning_rate": 5.0e-3, "lr_scheduler_type": "constant", "per_device_train_batch_size": 3}
# What upstream cannot train yet: the error its training stops with (FIELD-NOTES, "Real `llamafactory-cli train`").
CANNOT_TRAIN = {"deepseek_v2": "DeepSeek gate must return (topk_ids, topk_weights)"}
TRAIN_FAMILIES = ("qwen3_moe", "deepseek_v2")


def training_unavailable() -> str | None:
    """Why `llamafactory-cli train` with use_kt cannot run here, else None."""
    try:
        importlib.metadata.version("llamafactory-kt")
    except importlib.metadata.PackageNotFoundError:
        return ("llamafactory-kt is not installed here (scripts/install_lfkt.sh makes .venv-lfkt; scripts/test.sh "
                "runs this file there)")
    import kt_kernel
    from kt_kernel.sft import amx

    if not amx._HAS_AMX_SFT_SUPPORT:  # the test kt_kernel makes before it raises the error quoted below
        return (f"kt_kernel's '{kt_kernel.__cpu_variant__}' build has no SFT kernels, so `llamafactory-cli train` with "
                "use_kt stops at model load: 'RuntimeError: AMX SFT backend not available. kt_kernel_ext was not "
                "compiled with AMX SFT support.' (they are in its avx512_bf16 and amx builds)")
    return None


# ---------------------------------------------------------------------------------------------------------------
# The reference reads what KT training writes


def test_the_reference_merges_kt_fused_expert_lora_as_the_per_expert_adapter(tiny_family, tmp_path):
    """KT's fused file (written by kt_kernel's own save code) merges by hand to the very checkpoint the per-expert
    adapter it came from does."""
    pytest.importorskip("kt_kernel.sft.artifacts")
    from test_layouts import kt_kernel_written

    paths = tiny_family("qwen3_moe")
    fused = kt_kernel_written(paths, tmp_path / "kt")
    assert (fused / FUSED_EXPERT_LORA).is_file()
    want = read_checkpoint(merge_by_hand(paths.model, paths.adapter, tmp_path / "from-peft"))
    got = read_checkpoint(merge_by_hand(paths.model, fused, tmp_path / "from-kt"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    base = read_checkpoint(paths.model)
    assert not torch.equal(got["model.layers.1.mlp.experts.3.down_proj.weight"].float(),
                           base["model.layers.1.mlp.experts.3.down_proj.weight"].float())


# ---------------------------------------------------------------------------------------------------------------
# Training


@dataclass
class Trained:
    base: Path
    adapter: Path  # llamafactory-cli train's output_dir
    root: Path  # for the references merged from it

    def chat_config(self, path: Path, **changes) -> Path:
        """An inference YAML as a KT user writes it, in fp32 with the torch experts: exactly the reference's math."""
        settings = {"model_name_or_path": str(self.base), "adapter_name_or_path": str(self.adapter),
                    "template": TEMPLATE, "infer_backend": "huggingface", "use_kt": True, "finetuning_type": "lora",
                    "kt_config": {"kt_backend": "AMXBF16", "kt_num_threads": 1}, "experts_backend": "torch",
                    "infer_dtype": "float32", "device": "cpu", "do_sample": False, "max_new_tokens": MAX_NEW,
                    **changes}
        path.write_text(yaml.safe_dump(settings, sort_keys=False))
        return path


def _write_dataset(folder: Path) -> Path:
    from ktchat.tinymodels import TRAINED_QA

    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"instruction": question, "input": "", "output": answer} for question, answer in TRAINED_QA]
    (folder / "tiny_qa.json").write_text(json.dumps(rows))
    (folder / "dataset_info.json").write_text(json.dumps({"tiny_qa": {"file_name": "tiny_qa.json"}}))
    return folder


def _train(base: Path, out: Path, data: Path) -> subprocess.CompletedProcess:
    """`llamafactory-cli train` with use_kt on a CPU: use_cpu and low_cpu_mem_usage: false are the keys a CPU needs
    (FIELD-NOTES, "Real `llamafactory-cli train`")."""
    config = out.with_suffix(".yaml")
    config.write_text(yaml.safe_dump({
        "model_name_or_path": str(base), "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "lora_target": "all", "lora_rank": 8, "lora_alpha": 16, "use_kt": True,
        "kt_config": {"kt_backend": "AMXBF16", "kt_num_threads": 1}, "use_cpu": True, "low_cpu_mem_usage": False,
        "bf16": True, "dataset": "tiny_qa", "dataset_dir": str(data), "template": TEMPLATE, "cutoff_len": 256,
        "output_dir": str(out), "overwrite_output_dir": True, "logging_steps": 1, "report_to": "none", "seed": 0,
        **TRAIN,
    }, sort_keys=False))
    cli = Path(sys.executable).parent / "llamafactory-cli"
    env = {**os.environ, **ENV, "HF_DATASETS_CACHE": str(out.parent / "datasets-cache")}
    try:  # in its own folder: whatever training writes beside output_dir stays out of the checkout
        return subprocess.run([str(cli), "train", str(config)], capture_output=True, text=True, timeout=LF_TIMEOUT,
                              env=env, cwd=out.parent)
    except subprocess.TimeoutExpired as exc:  # a run that hangs after its error still tells which error it was
        text = [x.decode(errors="replace") if isinstance(x, bytes) else x or "" for x in (exc.stdout, exc.stderr)]
        return subprocess.CompletedProcess(exc.cmd, -9, *text)


@pytest.fixture(scope="module")
def trained(tiny_family, tmp_path_factory):
    """family name -> what `llamafactory-cli train` wrote for it (trained once, on first use)."""
    reason = training_unavailable()
    if reason:
        pytest.skip(reason)
    runs: dict[str, Trained | str] = {}
    data = _write_dataset(tmp_path_factory.mktemp("data"))

    def get(name: str) -> Trained:
        if name not in runs:
            root = tmp_path_factory.mktemp(f"trained-{name}")
            out = _train(tiny_family(name).model, root / "adapter", data)
            known = CANNOT_TRAIN.get(name)
            if out.returncode != 0 and known and known in out.stderr:
                error = next(line for line in out.stderr.splitlines() if known in line)
                runs[name] = f"llamafactory-kt cannot train {name} with use_kt yet: {error.strip()}"
            else:
                assert out.returncode == 0, out.stderr[-3000:]
                runs[name] = Trained(tiny_family(name).model, root / "adapter", root)
        if isinstance(runs[name], str):
            pytest.skip(runs[name])
        return runs[name]

    return get


def _prompts(trained: Trained):
    """(tokenizer, template, prompt ids per trained question) as LLaMA-Factory's chat builds them."""
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments
    from transformers import AutoTokenizer

    from ktchat.tinymodels import TRAINED_QA

    tokenizer = AutoTokenizer.from_pretrained(trained.base)
    template = get_template_and_fix_tokenizer(tokenizer, DataArguments(template=TEMPLATE))
    ids = [template.encode_oneturn(tokenizer, [{"role": "user", "content": q}, {"role": "assistant", "content": ""}])[0]
           for q, _ in TRAINED_QA]
    return tokenizer, template, [torch.tensor([i]) for i in ids]


@pytest.mark.parametrize("name", TRAIN_FAMILIES)
def test_training_writes_the_kt_layout(trained, name):
    adapter = trained(name).adapter
    manifest = json.loads((adapter / "kt_adapter_manifest.json").read_text())
    assert manifest["status"] == "ready" and FUSED_EXPERT_LORA in manifest["artifacts"]
    assert (adapter / FUSED_EXPERT_LORA).is_file() and (adapter / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("name", TRAIN_FAMILIES)
def test_ktchat_on_the_trained_adapter_equals_the_reference_and_the_expert_channel_is_live(trained, name):
    """fp32 KT mode equals the hand merge; without the expert LoRA it leaves it for the merge without the expert
    LoRA; kt_kernel's exact kernel (bf16 experts, fp32 elsewhere) stays within its bound."""
    from ktchat import load_model
    from ktchat.experts import kt_backend
    from ktchat.model import offloaded_blocks

    t = trained(name)
    _, _, prompts = _prompts(t)
    reference = load_reference(merge_by_hand(t.base, t.adapter, t.root / "merged-all"))
    control = load_reference(merge_by_hand(t.base, t.adapter, t.root / "merged-no-expert-lora",
                                           keep=lambda m: not is_routed_expert(m)))
    model, _ = load_model(t.base, t.adapter, experts_backend="torch", dtype="float32", device="cpu")
    for ids in prompts:
        assert rel_err(logits(model, ids), logits(reference, ids)) < FP32_BOUND
    for block in offloaded_blocks(model).values():
        block.experts.backend.set_lora({})
    for ids in prompts:
        assert rel_err(logits(model, ids), logits(reference, ids)) > 100 * FP32_BOUND
        assert rel_err(logits(model, ids), logits(control, ids)) < FP32_BOUND
    if kt_backend.unavailable_reason("exact", "bf16") is None:  # where training ran, it is there
        kt, _ = load_model(t.base, t.adapter, experts_backend="kt", moe_lora="exact", dtype="float32", device="cpu",
                           num_threads=1)
        for ids in prompts:
            assert rel_err(logits(kt, ids), logits(reference, ids)) < KT_BF16_BOUND


def _reference_replies(t: Trained) -> list[str]:
    """Greedy replies of the hand-merged fp32 model in plain transformers, to LLaMA-Factory's prompts, stopping at
    LLaMA-Factory's stop tokens."""
    tokenizer, template, prompts = _prompts(t)
    reference = load_reference(merge_by_hand(t.base, t.adapter, t.root / "merged-all"))
    replies = []
    for ids in prompts:
        with torch.no_grad():
            out = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False,
                                     eos_token_id=template.get_stop_token_ids(tokenizer),
                                     pad_token_id=tokenizer.pad_token_id)
        replies.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return replies


@pytest.mark.parametrize("name", TRAIN_FAMILIES)
def test_ktchat_chat_api_and_the_hook_answer_as_the_reference(trained, tmp_path, name):
    from ktchat.tinymodels import TRAINED_QA

    t = trained(name)
    want = _reference_replies(t)
    assert all(want), want
    config = t.chat_config(tmp_path / "chat.yaml")
    stdin = "".join(f"{q}\nclear\n" for q, _ in TRAINED_QA) + "exit\n"
    ktchat = Path(sys.executable).parent / "ktchat"

    chat = subprocess.run([str(ktchat), "chat", str(config)], input=stdin, capture_output=True, text=True,
                          timeout=LF_TIMEOUT, env={**os.environ, **ENV}, cwd=REPO)
    assert chat.returncode == 0, chat.stderr[-3000:]
    assert _ktchat_replies(chat.stdout) == want, chat.stdout[-3000:]

    server, url = start_server(config, tmp_path / "api.log", "--model-name", "tiny", command=[str(ktchat), "api"],
                               env=ENV, timeout=LF_TIMEOUT)
    try:
        assert get_json(url + "/health")["status"] == "ok"
        replies = [_http(f"{url}/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": q}]})
                   ["choices"][0]["message"]["content"] for q, _ in TRAINED_QA]
    finally:
        server.terminate()
        server.wait(60)
    assert replies == want, (tmp_path / "api.log").read_text()[-3000:]

    hooked = _lf_cli("chat", config, stdin=stdin)
    assert hooked.returncode == 0, hooked.stderr[-3000:]
    assert "[ktchat] use_kt: LLaMA-Factory's huggingface engine will load" in hooked.stderr
    assert _ktchat_replies(hooked.stdout) == want, hooked.stdout[-3000:]
