"""One layer's experts kept on the GPU (ktchat.experts.resident.ResidentExperts), with plain tensors: the sum over the
(token, k) pairs routed to the kept experts, their LoRA unmerged or folded, by grouped matmul and by gathering."""

import pytest
import torch
import torch.nn.functional as F

from ktchat.adapter import StackedLoRA
from ktchat.experts.base import HostExperts
from ktchat.experts.resident import ResidentExperts

E, H, I, R, KEPT = 6, 16, 8, 2, [1, 4, 5]


def experts(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"gate": (I, H), "up": (I, H), "down": (H, I)}
    weights = {p: torch.randn(E, *s, generator=g) / 4 for p, s in shapes.items()}
    lora = {p: StackedLoRA(torch.randn(E, R, s[1], generator=g), torch.randn(E, s[0], R, generator=g) / 8, 0.5)
            for p, s in shapes.items()}
    return weights, lora


def want(x, ids, w, weights, lora):
    """fp64, W + s B A merged by hand, only the kept experts' pairs."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    merged = {p: weights[p].double() + lora[p].scale * lora[p].b.double() @ lora[p].a.double() for p in weights}
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e in KEPT:
                h = F.silu(merged["gate"][e] @ x[t].double()) * (merged["up"][e] @ x[t].double())
                out[t] += float(w[t, j]) * (merged["down"][e] @ h)
    return out


@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("grouped", [False, None])  # gathered pair by pair; one grouped matmul a projection
def test_kept_experts_sum_their_pairs_only(merge, grouped):
    weights, lora = experts()
    host = HostExperts(weights, lora, merge).subset(KEPT)
    resident = ResidentExperts(0, E, KEPT, host, "cpu")
    resident.grouped = grouped
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(7)])
    w = torch.rand(7, 2, generator=g)
    got = resident.forward(x, ids, w)
    assert resident.grouped is (grouped is None) or resident.grouped is False
    assert torch.allclose(got.double(), want(x, ids, w, weights, lora), atol=1e-5)
    assert resident.mask.tolist() == [e in KEPT for e in range(E)]
    assert not resident.lora if merge else set(resident.lora) == {"gate", "up", "down"}


def test_no_kept_expert_routed_adds_nothing():
    weights, lora = experts()
    resident = ResidentExperts(0, E, KEPT, HostExperts(weights, lora).subset(KEPT), "cpu")
    for grouped in (False, None):
        resident.grouped = grouped
        out = resident.forward(torch.randn(3, H), torch.tensor([[0, 2], [3, 0], [2, 3]]), torch.rand(3, 2))
        assert not out.any()
