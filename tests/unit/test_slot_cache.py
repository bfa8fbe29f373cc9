"""ktchat's slot cache (ktchat.engine.cache.SlotCache) with plain tensors: writes land at (slot, position), reads give
the step's slots, resizing keeps what the slots hold, linear-attention state is saved and restored."""

import torch

from ktchat.engine.cache import SlotCache


def step(cache, rows, positions, visible=None, all_slots=False):
    cache.begin(torch.tensor(rows), torch.tensor(positions), visible=visible, all_slots=all_slots)


def test_writes_land_at_each_rows_slot_and_position_and_reads_follow_the_rows():
    cache = SlotCache(slots=3, length=8)
    k = torch.arange(2 * 2 * 3 * 4, dtype=torch.float32).view(2, 2, 3, 4)  # [B=2, heads, T=3, dim]
    step(cache, [2, 0], [[0, 1, 2], [4, 5, 6]], visible=7)
    keys, values = cache.update(k, -k, layer_idx=0)
    assert keys.shape == (2, 2, 7, 4)
    assert torch.equal(keys[0, :, :3], k[0]) and torch.equal(keys[1, :, 4:7], k[1])
    assert torch.equal(values[1, :, 4:7], -k[1]) and not keys[1, :, :4].any()
    step(cache, [1], [[0]])  # a captured step reads every position
    keys, _ = cache.update(torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4), layer_idx=0)
    assert keys.shape == (1, 2, 8, 4) and keys[0, :, 0].eq(1).all() and not keys[0, :, 1:].any()


def test_indexer_keys_and_resizing_keep_what_each_slot_holds():
    cache = SlotCache(slots=2, length=4)
    step(cache, [1], [[0, 1, 2]], visible=3)
    cache.update_indexer(torch.ones(1, 3, 5), layer_idx=3)
    cache.update(torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2), layer_idx=0)
    bigger = cache.resized(slots=3, length=16)  # slot for slot
    step(bigger, [1], [[3]], visible=4)
    keys = bigger.update_indexer(torch.full((1, 1, 5), 2.0), layer_idx=3)
    assert keys.shape == (1, 4, 5) and keys[0, :3].eq(1).all() and keys[0, 3].eq(2).all()
    assert bigger.length == 16 and bigger.slots == 3 and bigger.token_bytes() == (5 + 2 + 2) * 4
    step(bigger, [0, 2], [[0], [0]], visible=1)
    assert not bigger.update_indexer(torch.zeros(2, 1, 5), layer_idx=3).any()  # the other slots held nothing


def test_linear_state_zero_at_first_saved_restored_and_reset():
    cache = SlotCache(slots=2, length=4)
    conv, state = cache.linear_state(7, torch.zeros(1, dtype=torch.bfloat16), (6, 3), (2, 4, 4))
    assert conv.shape == (2, 6, 3) and conv.dtype == torch.bfloat16 and state.dtype == torch.float32
    state[1].fill_(3.0)
    saved = cache.save_linear(1)
    state[1].fill_(5.0)
    cache.restore_linear(1, saved)
    assert state[1].eq(3.0).all()
    cache.reset_linear(1)
    assert not state[1].any() and cache.linear_bytes() == (6 * 3 * 2 + 2 * 4 * 4 * 4)
