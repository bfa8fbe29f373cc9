"""A reply's text as its tokens arrive: stop strings, and the hold-back that keeps streamed pieces honest.

The whole reply is decoded at every token (as transformers' TextStreamer does), so the streamed pieces add up to
exactly `tokenizer.decode(tokens, skip_special_tokens=True)`. Text that could still turn into a stop string, or that
ends in an incomplete UTF-8 character, is held back until it cannot.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence


class ReplyText:
    """Feed it tokens (`push`); it returns each new piece of text to show, and says when a stop string ended the
    reply (`stopped`: the text is cut before it, and later tokens are ignored)."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        self.decode, self.stop = decode, tuple(s for s in stop if s)
        self.tokens: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False
        self.hold = max((len(s) for s in self.stop), default=1) - 1

    def push(self, token: int) -> str:
        """The text that can be shown now that `token` came (often ""); nothing once stopped."""
        if self.stopped:
            return ""
        self.tokens.append(token)
        self.text = self.decode(self.tokens)
        cut = self._stop_index()
        if cut is not None:
            self.text, self.stopped = self.text[:cut], True
            return self._flush(len(self.text))
        if self.text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for the rest
            return ""
        return self._flush(len(self.text) - self.hold)

    def finish(self) -> str:
        """The rest of the text, held back until now."""
        return self._flush(len(self.text))

    def _stop_index(self) -> Optional[int]:
        start = max(0, self.sent - self.hold)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _flush(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent:upto], upto
        return piece
