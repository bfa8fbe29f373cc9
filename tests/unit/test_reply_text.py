"""A reply's text as tokens arrive (ktchat.generate.text.ReplyText): stop strings and the hold-back."""

from ktchat.generate.text import ReplyText

PIECES = {1: "Hel", 2: "lo", 3: " wor", 4: "ld", 5: "!", 6: "\ufffd", 7: "é"}


def decode(tokens):
    """A stand-in tokenizer whose token 6 is the first half of a UTF-8 character that token 7 completes."""
    text = "".join(PIECES[t] for t in tokens)
    return text.replace("\ufffdé", "é")


def test_pieces_add_up_to_the_decoded_reply():
    reply = ReplyText(decode)
    pieces = [reply.push(t) for t in (1, 2, 3, 4, 5)] + [reply.finish()]
    assert "".join(pieces) == "Hello world!" and all(pieces[:5])


def test_a_stop_string_cuts_the_reply_and_what_could_become_one_is_held_back():
    reply = ReplyText(decode, stop=("world",))  # the last 4 characters wait: they may start "world"
    assert reply.push(1) == ""
    assert reply.push(2) == "H"
    assert reply.push(3) == "ello"  # " wor" waits
    assert reply.push(4) == " " and reply.stopped
    assert reply.push(5) == "" and reply.finish() == "" and reply.text == "Hello "


def test_an_incomplete_character_waits_for_the_rest():
    reply = ReplyText(decode)
    assert reply.push(1) == "Hel"
    assert reply.push(6) == ""
    assert reply.push(7) == "é" and reply.text == "Helé"
