"""`infersnap chat`: a conversation with the running server, in the terminal.

The API URL comes from the broker's status, so it follows http.host and
http.port. The whole conversation is sent each turn (the server's prefix
cache reads the shared part once) and the answer is printed as it streams
in. `/reset` forgets the conversation, `/exit`, Ctrl-D or Ctrl-C at the
prompt leave, Ctrl-C during an answer stops it. When stdin is not a
terminal each line is a user turn and nothing is prompted, so a chat can be
scripted; it then exits 1 if a turn got no answer.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import click
import httpx

from infersnap import access_keys
from infersnap.cli.bench import error_text
from infersnap.cli.status import NotRunning, query_status
from infersnap.config import Config

PROMPT = ">>> "
COMMANDS = "/reset forgets the conversation, /exit (or Ctrl-D) leaves"
# No read timeout: a long prompt on a small CPU takes a while, and the server ends every request
# by its own queue.request-timeout.
TIMEOUT = httpx.Timeout(10.0, read=None)


class ChatError(Exception):
    """A turn that got no answer: the server refused it, failed it, or could not be reached."""


@dataclass
class Chat:
    url: str  # the OpenAI base URL, ending in /v1
    api_key: str | None = None
    system: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    history: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def ask(self, text: str, show: Callable[[str], None]) -> str:
        """Send the conversation with `text` as the next user turn, hand each piece of the answer to
        `show` as it arrives, and keep both turns. A turn that fails (ChatError) is not kept; one
        stopped by Ctrl-C keeps what was shown of its answer."""
        self.history.append({"role": "user", "content": text})
        pieces: list[str] = []
        try:
            for piece in self._stream():
                pieces.append(piece)
                show(piece)
        except ChatError:
            self.history.pop()
            raise
        except KeyboardInterrupt:
            self._keep("".join(pieces))
            raise
        answer = "".join(pieces)
        self._keep(answer)
        return answer

    def _keep(self, answer: str) -> None:
        if answer:
            self.history.append({"role": "assistant", "content": answer})
        else:  # nothing came back: the question is not part of the conversation either
            self.history.pop()

    def _stream(self) -> Iterator[str]:
        """The answer's text pieces, from the SSE stream of a chat completion."""
        body: dict[str, Any] = {"messages": self.history, "stream": True}
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        if self.temperature is not None:
            body["temperature"] = self.temperature
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            with httpx.stream(
                "POST", f"{self.url}/chat/completions", json=body, headers=headers, timeout=TIMEOUT
            ) as response:
                if response.status_code != 200:
                    message = error_text(response.status_code, response.read())
                    if response.status_code == 401:
                        message += " (infersnap chat sends the first of http.api-keys and http.api-keys-file; "
                        message += "the server reads them when it starts)"
                    raise ChatError(message)
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":  # the body ends next: reading to its end lets the server log a 200
                        continue
                    try:
                        chunk = json.loads(data)
                    except ValueError:
                        raise ChatError(f"the server sent an event that is not JSON: {data[:100]!r}") from None
                    if chunk.get("error"):  # an error after the stream started
                        raise ChatError(str(chunk["error"].get("message", chunk["error"])))
                    for choice in chunk.get("choices") or []:
                        content = (choice.get("delta") or {}).get("content")
                        if content:
                            yield content
        except httpx.HTTPError as exc:
            raise ChatError(f"lost the server at {self.url}: {exc}") from None


def first_api_key(config: Config) -> str | None:
    """The key the server asks for, if it asks for one: the first configured."""
    try:
        keys = access_keys.api_keys(config.get("http.api-keys"), config.get("http.api-keys-file"))
    except access_keys.KeysFileError as exc:
        raise click.ClickException(str(exc)) from None
    return keys[0] if keys else None


def run(config: Config, system: str | None, max_tokens: int | None, temperature: float | None) -> None:
    """The `infersnap chat` command."""
    try:
        status = query_status()
    except NotRunning as exc:
        raise click.ClickException(f"{exc}; start it with `infersnap serve`") from None
    chat = Chat(status.endpoints["openai"].rstrip("/"), first_api_key(config), system, max_tokens, temperature)
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
        models = status.models[0].name if status.models else "the model"  # the default, which chat asks
        click.echo(f"Chatting with {models} at {chat.url}; {COMMANDS}.")
    if not converse(chat, interactive):
        sys.exit(1)


def converse(chat: Chat, interactive: bool) -> bool:
    """Read turns until /exit or the end of input; False if a scripted turn got no answer."""
    answered_all = True
    while True:
        try:
            line = input(PROMPT) if interactive else sys.stdin.readline()
        except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt: leave
            click.echo()
            return answered_all
        if not interactive and not line:  # the end of the script
            return answered_all
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            return answered_all
        if text == "/reset":
            chat.reset()
            if interactive:
                click.echo("(the conversation is forgotten)")
            continue
        shown: list[str] = []
        try:
            chat.ask(text, lambda piece: (shown.append(piece), click.echo(piece, nl=False)))
            click.echo()
        except ChatError as exc:
            if shown:  # the error goes on a line of its own
                click.echo()
            click.echo(f"infersnap: {exc}", err=True)
            if not interactive:
                answered_all = False
        except KeyboardInterrupt:  # stops this answer; a script stops altogether
            click.echo()
            if not interactive:
                raise
