"""Turning generated token bytes into the text a client may see.

Tokens arrive as byte pieces that can split a UTF-8 character, and stop
strings must never reach the client, not even their first characters while
streaming. TextStream holds back exactly what could still turn out to be
the start of a stop string. For a chat it also splits the model's thinking
from its answer (workers/thinking.py); stop strings apply to the answer.
"""

from __future__ import annotations

import codecs
from typing import Protocol


class Split(Protocol):
    """Takes text as it streams and gives (thinking, answer) pieces (thinking.ThinkingSplit)."""

    inside: bool  # in the think block now

    def push(self, text: str) -> tuple[str, str]: ...

    def flush(self) -> tuple[str, str]: ...


class TextStream:
    def __init__(self, stops: list[str], split: Split | None = None) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = [s for s in stops if s]
        self._held = ""
        self._split = split
        self.reasoning = ""  # thinking ready to send (take_reasoning), with a split
        self.reasoning_tokens = 0  # tokens that came while the think block was open (its tags included)
        self.stopped_by = ""  # the stop string that ended the answer, once one has

    def push(self, piece: bytes) -> tuple[str, bool]:
        """Add a token's bytes; return (answer text safe to send now, whether a stop string was hit)."""
        if self._split is None:
            return self._answer(self._decoder.decode(piece))
        was_inside = self._split.inside
        answer = self._text(self._decoder.decode(piece))
        self.reasoning_tokens += was_inside or self._split.inside  # the tags' tokens count as thinking
        return self._answer(answer)

    def flush(self) -> str:
        """The text still held back, once generation ended without a stop string."""
        text = self._text(self._decoder.decode(b"", final=True))
        if self._split is not None:
            thinking, answer = self._split.flush()
            self.reasoning += thinking
            text += answer
        text, hit = self._answer(text)
        if not hit:
            text += self._held
        self._held = ""
        return text

    def take_reasoning(self) -> str:
        """The thinking generated since the last call."""
        reasoning, self.reasoning = self.reasoning, ""
        return reasoning

    def _text(self, text: str) -> str:
        """The answer part of newly decoded text; its thinking part is kept in `reasoning`."""
        if self._split is None:
            return text
        thinking, answer = self._split.push(text)
        self.reasoning += thinking
        return answer

    def _answer(self, text: str) -> tuple[str, bool]:
        self._held += text
        if not self._stops:
            text, self._held = self._held, ""
            return text, False
        hit, stop = min(((i, s) for i, s in ((self._held.find(s), s) for s in self._stops) if i >= 0),
                        default=(-1, ""))
        if hit >= 0:
            text, self._held, self.stopped_by = self._held[:hit], "", stop
            return text, True
        keep = max(partial_prefix(self._held, s) for s in self._stops)
        cut = len(self._held) - keep
        text, self._held = self._held[:cut], self._held[cut:]
        return text, False


def partial_prefix(text: str, word: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `word`."""
    for n in range(min(len(word) - 1, len(text)), 0, -1):
        if text.endswith(word[:n]):
            return n
    return 0
