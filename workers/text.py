"""Turning generated token bytes into the text a client may see.

Tokens arrive as byte pieces that can split a UTF-8 character, and stop
strings must never reach the client, not even their first characters while
streaming. TextStream holds back exactly what could still turn out to be
the start of a stop string.
"""

from __future__ import annotations

import codecs


class TextStream:
    def __init__(self, stops: list[str]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = [s for s in stops if s]
        self._held = ""

    def push(self, piece: bytes) -> tuple[str, bool]:
        """Add a token's bytes; return (text safe to send now, whether a stop string was hit)."""
        self._held += self._decoder.decode(piece)
        if not self._stops:
            text, self._held = self._held, ""
            return text, False
        hit = min((i for i in (self._held.find(s) for s in self._stops) if i >= 0), default=-1)
        if hit >= 0:
            text, self._held = self._held[:hit], ""
            return text, True
        keep = max(self._partial_stop_length(s) for s in self._stops)
        cut = len(self._held) - keep
        text, self._held = self._held[:cut], self._held[cut:]
        return text, False

    def flush(self) -> str:
        """The text still held back, once generation ended without a stop string."""
        text = self._held + self._decoder.decode(b"", final=True)
        self._held = ""
        return text

    def _partial_stop_length(self, stop: str) -> int:
        """Length of the longest tail of the held text that is a proper prefix of `stop`."""
        for n in range(min(len(stop) - 1, len(self._held)), 0, -1):
            if self._held.endswith(stop[:n]):
                return n
        return 0
