"""MLA decoded absorbed on the engine's latent cache (ktchat.model.mla): every decode step's logits equal the fp32
hand-merged reference's, with the LoRA on q / kv_a / kv_b / o projections, and kv_b_proj's LoRA is what the absorption
must use."""

from __future__ import annotations

import hashlib

import pytest
import torch

from ktchat import load_model
from ktchat.model import mla

from reference import DEVICE, chat_prompt_ids, greedy, load_reference, logits, merge_by_hand, rel_err
from tolerances import FP32_BOUND

NEW_TOKENS = 12
FAMILIES = ("deepseek_v2", "deepseek_v3", "kimi_k25")  # V2: complex rope, no q LoRA rank; V3: cos/sin, q_a/q_b; a VLM


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request, tiny_family):
    from transformers import AutoTokenizer

    paths = tiny_family(request.param)
    digest = hashlib.sha256((paths.adapter / "adapter_model.safetensors").read_bytes()).hexdigest()[:12]
    reference = load_reference(merge_by_hand(paths.model, paths.adapter, paths.root / f"merged-all-{digest}"))
    prompts = chat_prompt_ids(AutoTokenizer.from_pretrained(paths.model))
    return request.param, paths, reference, [prompts[0], prompts[-1]]  # a trained question; the 172-token chat


def absorbed_model(paths):
    model, _ = load_model(paths.model, paths.adapter, experts_backend="torch", dtype="float32", device=DEVICE)
    absorbed = [m for m in model.modules() if isinstance(m, mla.AbsorbedMLA)]
    if not absorbed:
        pytest.skip("this transformers caches MLA's keys and values decompressed: absorbed decode stays off")
    return model, absorbed


def decode_errors(model, absorbed, reference, ids):
    """Greedy decode on the engine's cache; each step's logits against the reference's on the same tokens."""
    steps = sum(a.absorbed_steps for a in absorbed)
    ids = ids.to(model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                         output_scores=True, return_dict_in_generate=True)
    steps = sum(a.absorbed_steps for a in absorbed) - steps
    assert steps == (len(out.scores) - 1) * len(absorbed) > 0, "decode steps not absorbed"  # an EOS may end it
    tokens = out.sequences[0, ids.shape[1]:].tolist()
    want = logits(reference, out.sequences[:, :-1].cpu())[0, ids.shape[1] - 1:]
    return tokens, rel_err(torch.stack(out.scores)[:, 0].float().cpu(), want)


def test_absorbed_decode_equals_reference(fam):
    name, paths, reference, prompts = fam
    model, absorbed = absorbed_model(paths)
    assert len(absorbed) == model.config.get_text_config().num_hidden_layers
    assert all(type(a.kv_b_proj) is not torch.nn.Linear for a in absorbed), "kv_b_proj has no LoRA"
    for ids in prompts:
        tokens, err = decode_errors(model, absorbed, reference, ids)
        assert err < FP32_BOUND, (name, err)
        assert tokens == greedy(reference, ids, NEW_TOKENS)


def test_absorbing_without_kv_b_lora_breaks_the_match(fam, monkeypatch):
    """The absorption with kv_b_proj's base weight only (its LoRA ignored): far outside the bound."""
    name, paths, reference, prompts = fam

    def base_only(self):
        return self.kv_b_proj.base_layer.weight.detach().view(self.num_heads, -1, self.kv_lora_rank)

    monkeypatch.setattr(mla.AbsorbedMLA, "effective_weight", base_only)
    model, absorbed = absorbed_model(paths)
    _, err = decode_errors(model, absorbed, reference, prompts[1])
    assert err > 100 * FP32_BOUND, (name, err)


def test_adapter_state_change_refreshes_the_absorbed_weight(fam):
    """With the adapter disabled, decode follows the base model (the effective weight is recomputed), and back."""
    name, paths, reference, prompts = fam
    model, absorbed = absorbed_model(paths)
    ids = prompts[0]
    _, err = decode_errors(model, absorbed, reference, ids)
    assert err < FP32_BOUND
    with model.disable_adapter():
        out = model.generate(ids.to(model.device), attention_mask=torch.ones_like(ids).to(model.device),
                             max_new_tokens=NEW_TOKENS, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
        want = logits(model, out.sequences[:, :-1])[0, ids.shape[1] - 1:]  # no cache: transformers' own attention
        assert rel_err(torch.stack(out.scores)[:, 0].float().cpu(), want) < FP32_BOUND
    _, err = decode_errors(model, absorbed, reference, ids)
    assert err < FP32_BOUND
