"""`ktchat predict`'s pure parts: dataset rows read from a file, and the output file's resume rules (no model)."""

import json

import pytest

from ktchat.errors import KTChatError
from ktchat.generate.predict import Predictions
from ktchat.generate.rows import Conversation, Row, conversation, read_conversations

USER = {"role": "user", "content": "Q"}


@pytest.mark.parametrize("obj, want", [
    ({"messages": [USER, {"role": "assistant", "content": "A"}]}, Conversation([USER], "A")),
    ({"messages": [USER]}, Conversation([USER], "")),
    ({"messages": [{"role": "system", "content": "S"}, USER, {"role": "assistant", "content": "A0"}, USER,
                   {"role": "assistant", "content": "A", "weight": 1}]},
     Conversation([{"role": "system", "content": "S"}, USER, {"role": "assistant", "content": "A0"}, USER], "A")),
    ({"instruction": "Q", "output": "A"}, Conversation([USER], "A")),
    ({"instruction": "Q", "input": "more", "output": "A"}, Conversation([{"role": "user", "content": "Q\nmore"}], "A")),
    ({"instruction": "Q", "input": "", "system": "S", "history": [["q0", "a0"]]},
     Conversation([{"role": "system", "content": "S"}, {"role": "user", "content": "q0"},
                   {"role": "assistant", "content": "a0"}, USER], "")),
])
def test_rows_become_conversations(obj, want):
    """Alpaca's instruction and input joined by a newline, history as turns before it: LLaMA-Factory's converter."""
    assert conversation(obj, "f: line 1") == want


@pytest.mark.parametrize("obj, message", [
    (["Q"], "f: line 3: expected a JSON object (got list)"),
    ({"question": "Q"}, "f: line 3: a row needs messages (OpenAI roles) or alpaca's instruction (its keys: question)"),
    ({"messages": []}, "f: line 3: messages must be a non-empty list"),
    ({"messages": [{"role": "human", "content": "Q"}]}, "f: line 3: messages[0] must be {\"role\": system | user"),
    ({"messages": [{"role": "user"}]}, "f: line 3: messages[0] must be"),
    ({"messages": [{"role": "assistant", "content": "A"}]}, "f: line 3: the messages before the reply must end with"),
    ({"messages": [USER, {"role": "assistant", "content": "A"}, {"role": "assistant", "content": "B"}]},
     "f: line 3: the messages before the reply must end with a user message"),
    ({"instruction": ["Q"]}, "f: line 3: instruction must be text (got list)"),
    ({"instruction": "Q", "output": 3}, "f: line 3: output must be text (got int)"),
    ({"instruction": "Q", "history": [["q0"]]}, "f: line 3: history must be a list of [question, answer] pairs"),
])
def test_a_row_without_what_it_needs_is_named(obj, message):
    with pytest.raises(KTChatError) as info:
        conversation(obj, "f: line 3")
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_jsonl_and_json_lists_are_read_to_max_samples(tmp_path):
    rows = [{"instruction": f"Q{i}", "output": f"A{i}"} for i in range(4)]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n", encoding="utf-8")
    assert [c.label for c in read_conversations(jsonl)] == ["A0", "A1", "A2"]
    listed = tmp_path / "d.json"
    listed.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    assert [c.label for c in read_conversations(listed, max_samples=2)] == ["A0", "A1"]


@pytest.mark.parametrize("text, message", [
    ('{"instruction": "Q"}\n{"instruction": \n', "d.jsonl: line 2: not valid JSON"),
    ('{"instruction": "Q"}\n\n{"output": "A"}\n', "d.jsonl: line 3: a row needs messages"),
    ('[{"instruction": "Q"}, 3]', "d.jsonl: row 2: expected a JSON object (got int)"),
    ("\n\n", "d.jsonl: holds no rows"),
])
def test_bad_files_name_the_line_or_row(tmp_path, text, message):
    path = tmp_path / "d.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(KTChatError) as info:
        read_conversations(path)
    assert str(info.value).startswith(f"{tmp_path}/{message}"), str(info.value)


ROWS = [Row((1, i), f"prompt {i}\u2028\u00e9", f"label {i}") for i in range(5)]


def written(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


def test_rows_are_written_in_dataset_order_as_they_complete(tmp_path):
    path = tmp_path / "sub" / "out.jsonl"
    with Predictions(path, ROWS, sync_every=2) as out:
        for index in (1, 0, 3, 2):  # finished out of order, as a batching engine finishes them
            out.add(index, f"reply {index}")
    assert [r["predict"] for r in written(path)] == [f"reply {i}" for i in range(4)]
    assert written(path)[0] == {"prompt": ROWS[0].prompt, "predict": "reply 0", "label": "label 0"}
    assert "\u00e9" in path.read_text(encoding="utf-8")  # ensure_ascii=False, as LLaMA-Factory writes it
    assert Predictions(path, ROWS, sync_every=1).done == 4


def test_a_line_cut_short_is_written_again(tmp_path):
    path = tmp_path / "out.jsonl"
    with Predictions(path, ROWS, sync_every=1) as out:
        for index in range(3):
            out.add(index, f"reply {index}")
    whole = path.read_bytes()
    path.write_bytes(whole[:-9])  # killed while writing row 3
    again = Predictions(path, ROWS, sync_every=1)
    assert again.done == 2 and path.read_bytes() == whole[:-9]  # nothing changes before generation starts
    with again:
        again.add(2, "reply 2")
    assert path.read_bytes() == whole


@pytest.mark.parametrize("edit, message", [
    (lambda r: {**r, "prompt": "another prompt"}, "row 2's prompt is not this run's ('another prompt' here, "),
    (lambda r: {**r, "label": "another label"}, "row 2's label is not this run's"),
    (lambda r: {"prompt": r["prompt"]}, "line 2 is not a row of predictions (a JSON object with prompt, predict and"),
])
def test_rows_of_another_run_are_refused_naming_the_file_and_row(tmp_path, edit, message):
    path = tmp_path / "out.jsonl"
    with Predictions(path, ROWS, sync_every=1) as out:
        for index in range(3):
            out.add(index, f"reply {index}")
    rows = written(path)
    rows[1] = edit(rows[1])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(KTChatError) as info:
        Predictions(path, ROWS, sync_every=1)
    assert str(info.value).startswith(f"{path}: {message}"), str(info.value)
    with pytest.raises(KTChatError, match=f"^{path} holds 3 rows, more than the 2 of this run"):
        Predictions(path, ROWS[:2], sync_every=1)
