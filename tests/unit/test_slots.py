"""Which slot a prompt runs in and where it resumes (ktchat.engine.slots): pure bookkeeping, plain lists."""

import pytest

from ktchat.engine.slots import Held, Resume, SlotTable, common_prefix, resume_point


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0


@pytest.mark.parametrize("held, saved, prompt, hybrid, want", [
    ([1, 2, 3, 4], [], [1, 2, 3, 4, 5, 6], False, (4, None)),   # the conversation goes on
    ([1, 2, 3, 4], [], [1, 2, 3, 4], False, (3, None)),         # the same prompt: its last token is computed again
    ([1, 2, 9, 9], [], [1, 2, 3, 4], False, (2, None)),         # attention KV is cut back to the common prefix
    ([1, 2, 3, 4], [], [1, 2, 3, 4, 5], True, (4, None)),       # the live state: the whole held prefix is shared
    ([1, 2, 9, 9], [], [1, 2, 3, 4], True, (0, None)),          # a recurrent state cannot be cut back
    ([1, 2, 3, 9], [1, 3], [1, 2, 3, 4, 5], True, (3, 3)),      # the last saved state inside the common prefix
    ([1, 2, 3, 9], [1, 4], [1, 2, 3, 4, 5], True, (1, 1)),      # saved past the divergence: not usable
])
def test_resume_point(held, saved, prompt, hybrid, want):
    assert resume_point(Held(held, saved), prompt, hybrid) == want


def test_a_continuation_keeps_its_slot_others_take_a_free_one_then_the_least_recently_used():
    table = SlotTable(2, hybrid=False)
    first = table.choose([1, 2, 3])
    table.start(first, [1, 2, 3])
    table.finish(first.slot, [1, 2, 3, 7])
    second = table.choose([5, 6])  # shares nothing: the free slot, not the first conversation's
    assert second == Resume(1 - first.slot, 0)
    table.start(second, [5, 6])
    table.finish(second.slot, [5, 6, 8])
    assert table.choose([1, 2, 3, 7, 9]) == Resume(first.slot, 4)
    table.start(table.choose([1, 2, 3, 7, 9]), [1, 2, 3, 7, 9])
    assert table.choose([4]).slot == second.slot  # no free slot: the least recently used one
    assert table.holding() == {first.slot: 4, second.slot: 3}  # most recent first; cut to what the prompt reused


def test_a_small_overlap_does_not_take_over_another_conversation():
    """Sharing less than half of what a slot holds (a system prompt, say) is no continuation."""
    table = SlotTable(2, hybrid=False)
    run = table.choose([1, 2, 3, 4, 5, 6])
    table.start(run, [1, 2, 3, 4, 5, 6])
    table.finish(run.slot, [1, 2, 3, 4, 5, 6, 7])
    assert table.choose([1, 2, 9]).slot != run.slot


def test_hybrid_saves_at_the_prompt_end_and_where_the_template_rewrote_the_last_one():
    table = SlotTable(1, hybrid=True)
    first = [1, 2, 3, 4, 5, 6]  # ends in a 2-token note the next prompt leaves out (5, 6)
    resume = table.choose(first)
    assert table.start(resume, first) == [6]
    table.saved_at(0, 6)
    table.finish(0, first + [7, 8])
    second = [1, 2, 3, 4, 7, 8, 9, 10, 5, 6]  # the reply rendered without the note
    resume = table.choose(second)
    assert resume == Resume(0, 0)  # the saved state (6) lies past the divergence (4)
    assert table.start(resume, second) == [8, 10]  # learnt: save 2 tokens before the end as well
    assert table.held[0].rewritten == 2


def test_without_reuse_every_prompt_starts_at_zero_and_forget_drops_saved_states():
    table = SlotTable(1, hybrid=True, reuse=False)
    table.start(table.choose([1, 2]), [1, 2])
    table.saved_at(0, 2)
    table.finish(0, [1, 2, 3])
    assert table.choose([1, 2, 3, 4]) == Resume(0, 0)
    assert table.forget() == [(0, 2)] and table.held[0].ids == []
