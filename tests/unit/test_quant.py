"""ktchat.formats.quant: formats against hand-written dequantization (independent of quant.py's vectorized code)."""

import pytest
import torch

from ktchat.formats import quant
from ktchat.errors import KTChatError
from ktchat.formats.quant import QuantizedWeight


def _blockwise(data, scale, block, shape):
    out = torch.empty(shape)
    for i in range(shape[0]):
        for j in range(shape[1]):
            out[i, j] = data[i, j] * scale[i // block[0], j // block[1]].float()
    return out


@pytest.mark.parametrize("shape,block", [((20, 36), (8, 16)), ((16, 32), (16, 32)), ((3, 5), (128, 128))])
def test_fp8_partial_blocks_exact(shape, block):
    torch.manual_seed(0)
    q = quant.quantize("fp8", torch.randn(shape), block)
    assert tuple(q.scale.shape) == quant.blocks(shape, block)
    want = _blockwise(q.data.float(), q.scale, block, shape)
    assert torch.equal(q.dequantize(), want)
    assert q.dequantize(torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("shape,group", [((6, 64), 32), ((5, 44), 32), ((4, 12), 4)])
def test_int4_packing_order_exact(shape, group):
    torch.manual_seed(1)
    w = torch.randn(shape)
    q = quant.quantize("int4", w, (1, group))
    words = q.data.tolist()
    values = torch.tensor([[(((words[r][c // 8] & 0xFFFFFFFF) >> (4 * (c % 8))) & 0xF) - 8
                            for c in range(shape[1])] for r in range(shape[0])], dtype=torch.float32)
    assert values.min() >= -8 and values.max() <= 7
    assert torch.equal(q.dequantize(), _blockwise(values, q.scale, (1, group), shape))
    assert (q.dequantize() - w).abs().max() <= q.scale.float().max() / 2 + 1e-6


def test_inconsistent_tensors_refused():
    q = quant.quantize("fp8", torch.randn(10, 10), (4, 4))
    with pytest.raises(KTChatError, match="scale shape"):
        QuantizedWeight("fp8", q.data, q.scale[:, :2], (4, 4), (10, 10))
    with pytest.raises(KTChatError, match="not float8"):
        QuantizedWeight("fp8", q.data.float(), q.scale, (4, 4), (10, 10))
    with pytest.raises(KTChatError, match="unknown quantized format"):
        QuantizedWeight("fp3", q.data, q.scale, (4, 4), (10, 10))


def test_schemes_from_config():
    s = quant.scheme_of({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                         "weight_block_size": [128, 128]}, "config.json")
    assert (s.format, s.block) == ("fp8", (128, 128))
    ct = {"quant_method": "compressed-tensors", "format": "pack-quantized",
          "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", r"re:.*mlp\.(gate|up|gate_up|down)_proj.*"],
          "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None, "weights": {
              "num_bits": 4, "type": "int", "strategy": "group", "group_size": 32, "symmetric": True,
              "dynamic": False, "actorder": None}}}}
    s = quant.scheme_of(ct, "config.json")
    assert (s.format, s.block) == ("int4", (1, 32))
    assert s.ignores("model.layers.1.self_attn.q_a_proj") and s.ignores("lm_head")
    assert s.ignores("model.layers.0.mlp.down_proj") and not s.ignores("model.layers.1.mlp.experts.3.down_proj")
    with pytest.raises(KTChatError, match="quant_method 'gptq'"):
        quant.scheme_of({"quant_method": "gptq"}, "config.json")
    with pytest.raises(KTChatError, match="weight_block_size"):
        quant.scheme_of({"quant_method": "fp8"}, "config.json")


def test_backend_default_load_quantized_is_exact_dequant():
    from ktchat.experts.base import ExpertsSpec
    from ktchat.experts.torch_backend import TorchExperts

    spec = ExpertsSpec(0, 2, 1, 12, 20, torch.float32)
    b = TorchExperts(spec)
    q = quant.quantize("fp8", torch.randn(20, 12), (8, 8))
    b.load_quantized("gate", 0, q, "x.gate_proj.weight")
    assert torch.equal(b.weights["gate"][0], q.dequantize())
    with pytest.raises(KTChatError, match="does not fit the model config"):
        b.load_quantized("down", 0, q, "x.down_proj.weight")


@pytest.mark.parametrize("fmt,block", [("fp8", (8, 16)), ("int4", (1, 32))])
def test_dequantize_on_the_weights_device(fmt, block):
    """The loader dequantizes non-expert weights where they live (the GPU); every helper tensor follows the data
    (meta stands in for a device here: a CPU helper tensor would not combine with it)."""
    q = quant.quantize(fmt, torch.randn(24, 64), block)
    moved = QuantizedWeight(q.format, q.data.to("meta"), q.scale.to("meta"), q.block, q.shape)
    w = moved.dequantize()
    assert w.device.type == "meta" and tuple(w.shape) == (24, 64)


def test_fp8_power_of_two_scales_stored_as_e8m0():
    """DeepSeek-V3.1's scale_fmt ue8m0: scales that are powers of two, which may be stored as F8_E8M0."""
    q = quant.quantize("fp8", torch.randn(20, 36), (8, 16))
    pow2 = torch.exp2(torch.ceil(torch.log2(q.scale)))
    e8m0 = QuantizedWeight("fp8", q.data, pow2.to(torch.float8_e8m0fnu), (8, 16), (20, 36))
    assert torch.equal(e8m0.dequantize(), _blockwise(q.data.float(), pow2, (8, 16), (20, 36)))
    s = quant.scheme_of({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "scale_fmt": "ue8m0",
                         "weight_block_size": [128, 128]}, "config.json")
    assert s.block == (128, 128)


def test_compressed_tensors_not_compressed_is_refused():
    with pytest.raises(KTChatError, match="quantization_status 'frozen'"):
        quant.scheme_of({"quant_method": "compressed-tensors", "quantization_status": "frozen"}, "config.json")
