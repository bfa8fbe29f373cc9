"""experts_backend auto / kt on a weight format this CPU's kt_kernel build has no kernel for: one honest line."""

import logging

import pytest

from ktchat.errors import KTChatError
from ktchat.experts import kt_backend
from ktchat.experts.choice import _TORCH_METHODS, choose_experts


@pytest.mark.parametrize("method", [m for m in kt_backend.METHODS if m != "bf16"])
def test_format_without_kernel_falls_back_saying_what_torch_runs(method, caplog):
    pytest.importorskip("kt_kernel")
    reason = kt_backend.unavailable_reason("merged", method)
    if reason is None:
        pytest.skip(f"this kt_kernel build has a {method} kernel")
    said = f"the same {method} math" if method in _TORCH_METHODS else f"the bf16 weights: it has no {method} math"
    with caplog.at_level(logging.INFO, logger="ktchat"):
        choice = choose_experts("auto", kt_method=method)
    assert choice.backend == "torch"
    assert f"routed experts: torch backend on {said} ({reason})" in caplog.text
    assert "ignored: kt_method" not in caplog.text  # said once
    with pytest.raises(KTChatError) as info:
        choose_experts("kt", kt_method=method)
    assert "\n" not in str(info.value) and reason in str(info.value)
    assert ("same math" in str(info.value)) == (method in _TORCH_METHODS)
