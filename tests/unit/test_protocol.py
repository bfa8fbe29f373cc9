"""Request parsing (ktchat.serve.protocol): every field ktchat reads, valid and not, without a server or a model."""

import re

import pytest

from ktchat.serve.protocol import ApiError, parse_messages, parse_request

HI = [{"role": "user", "content": "hi"}]


def parse(**body):
    return parse_request({"model": "tiny", "messages": HI, **body}, "tiny")


def test_defaults_are_plain_values():
    assert parse() == {"messages": HI, "stream": False, "include_usage": False, "max_tokens": None,
                       "temperature": None, "top_p": None, "seed": None, "do_sample": None, "stop": (),
                       "logit_bias": {}}


def test_every_field_read_comes_back_typed():
    got = parse(stream=True, stream_options={"include_usage": True}, max_completion_tokens=7, temperature=0,
                top_p=0.5, seed=-3, do_sample=True, stop="END", logit_bias={"2": -100, "17": 1.5})
    assert got["stream"] is True and got["include_usage"] is True and got["max_tokens"] == 7
    assert (got["temperature"], got["top_p"], got["seed"], got["do_sample"]) == (0, 0.5, -3, True)
    assert got["stop"] == ("END",) and got["logit_bias"] == {2: -100.0, 17: 1.5}


def test_roles_and_text_parts_are_normalised():
    messages = [{"role": "developer", "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]},
                {"role": "user", "content": "hi"}]
    assert parse_messages(messages) == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


@pytest.mark.parametrize("body, status, param, fragment", [
    ([1, 2], 400, None, "must be a JSON object"),
    ({"messages": HI}, 400, "model", "model must be a string"),
    ({"model": "gpt-4", "messages": HI}, 404, "model", "`gpt-4` does not exist"),
    ({"model": "tiny", "messages": []}, 400, "messages", "non-empty list"),
    ({"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", "one of"),
    ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content", "text"),
    ({"model": "tiny", "messages": HI, "max_tokens": 0}, 400, "max_tokens", "integer >= 1 (got 0)"),
    ({"model": "tiny", "messages": HI, "max_tokens": True}, 400, "max_tokens", "integer >= 1"),
    ({"model": "tiny", "messages": HI, "temperature": 2.5}, 400, "temperature", "from 0 to 2"),
    ({"model": "tiny", "messages": HI, "top_p": 1.1}, 400, "top_p", "> 0 and <= 1"),
    ({"model": "tiny", "messages": HI, "seed": 2**64}, 400, "seed", "64-bit"),
    ({"model": "tiny", "messages": HI, "stop": ["a"] * 5}, 400, "stop", "at most 4"),
    ({"model": "tiny", "messages": HI, "stop": ""}, 400, "stop", "non-empty string"),
    ({"model": "tiny", "messages": HI, "logit_bias": {"x": 1}}, 400, "logit_bias", "token id"),
    ({"model": "tiny", "messages": HI, "logit_bias": {"3": 101}}, 400, "logit_bias", "-100 to 100"),
    ({"model": "tiny", "messages": HI, "n": 3}, 400, "n", "must be 1"),
    ({"model": "tiny", "messages": HI, "logprobs": True}, 400, "logprobs", "not supported"),
    ({"model": "tiny", "messages": HI, "stream_options": []}, 400, "stream_options", "an object"),
])
def test_bad_fields_are_named(body, status, param, fragment):
    with pytest.raises(ApiError, match=re.escape(fragment)) as info:
        parse_request(body, "tiny")
    assert info.value.status == status and info.value.param == param
    assert info.value.body()["error"]["message"] == info.value.message


@pytest.mark.parametrize("value", [None, False, 0, [], {}])
def test_unsupported_fields_left_empty_are_accepted(value):
    assert parse(tools=value, presence_penalty=value)["messages"] == HI
