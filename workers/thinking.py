"""Thinking apart from the answer.

Models that think write `<think>…</think>` before their answer, or their chat template opens the
block at the end of the prompt, so the output starts inside it. ThinkingSplit takes the generated
text as it streams and says which part is thinking and which is answer, holding back a tail that
may still become a tag (`<th`) until the next text decides it.
"""

from __future__ import annotations

from infersnap.workers.text import partial_prefix

OPEN, CLOSE = "<think>", "</think>"


def opens_thinking(prompt: str) -> bool:
    """Whether a rendered chat prompt ends inside a think block its template opened."""
    return prompt.rstrip().endswith(OPEN)


class ThinkingSplit:
    """Splits one generation's text into (thinking, answer) pieces. One think block: text before it
    opens is answer, inside it thinking, after it closes answer. Whitespace around the block's text
    and at the start of the answer after it is dropped; a block that never closes is all thinking."""

    def __init__(self, inside: bool) -> None:
        self.inside = inside  # in the think block now
        self.closed = False  # the block has closed: the rest is answer, no tag is looked for
        self._trim = inside  # drop the whitespace that starts the current part
        self._answered = False  # some answer was given before any block
        self._held = ""

    def push(self, text: str) -> tuple[str, str]:
        """Add generated text; return the (thinking, answer) that is safe to send now."""
        thinking, answer = [], []
        held, self._held = self._held + text, ""
        while held:
            if self._trim:
                held = held.lstrip()
                if not held:
                    break
                self._trim = False
            if self.closed:
                answer.append(held)
                break
            tag = CLOSE if self.inside else OPEN
            at = held.find(tag)
            if at >= 0:
                before, held = held[:at], held[at + len(tag):]
                if self.inside:
                    thinking.append(before.rstrip())
                    self.inside, self.closed = False, True
                else:
                    if before.strip() or self._answered:  # text before the block is answer
                        answer.append(before)
                    self.inside = True
                self._trim = True
                continue
            keep = partial_prefix(held, tag)
            sure = held[:len(held) - keep]
            if self.inside:  # trailing whitespace waits: it is dropped if the block closes next
                body = sure.rstrip()
                thinking.append(body)
                self._held = held[len(body):]
            elif sure.strip() or self._answered:
                answer.append(sure)
                self._answered = True
                self._held = held[len(sure):]
            else:  # only whitespace so far: dropped if a block opens next
                self._held = held
            break
        return "".join(thinking), "".join(answer)

    def flush(self) -> tuple[str, str]:
        """At the end of generation: what is still held back, as (thinking, answer)."""
        held, self._held = self._held, ""
        if self.inside:
            return held.rstrip(), ""
        return "", held

