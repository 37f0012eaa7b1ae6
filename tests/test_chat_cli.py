"""`infersnap chat` against the real server with API keys (conftest.keyed_server), driven through a pipe as a script would."""

from __future__ import annotations

import re
import subprocess


from conftest import INFERSNAP, KEYED, cli, data_env, wait_until

SCRIPT = "Hi, I am Ann.\nWhat is my name?\n/reset\nHi, I am Ann.\n/exit\nthis line is never sent\n"


def chat(env: dict[str, str], script: str, *options: str) -> subprocess.CompletedProcess:
    command = [INFERSNAP, "chat", *options]
    return subprocess.run(command, env=env, input=script, capture_output=True, text=True, timeout=120)


def chat_log_lines(server) -> list[str]:
    return [line for line in server.log.read_text().splitlines() if " chat/completions " in line]


def test_a_scripted_chat_keeps_the_history_until_reset(keyed_server):
    before = len(chat_log_lines(keyed_server))
    result = chat(keyed_server.env, SCRIPT, "--system", "You are brief.", "--max-tokens", "8", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and not result.stderr.strip(), result.stderr
    assert len([line for line in result.stdout.splitlines() if line.strip()]) >= 3  # one answer a turn at least

    # The frontend logs each request once its answer ended; the chat sent the first key, so all got 200.
    wait_until(lambda: len(chat_log_lines(keyed_server)) >= before + 3, 5, "the server did not log three chat requests")
    lines = chat_log_lines(keyed_server)[before:]
    assert len(lines) == 3 and all("status=200" in line for line in lines), lines
    first, second, third = (int(re.search(r" prompt=(\d+) ", line).group(1)) for line in lines)
    assert second > first + 5  # the first turn and its answer went along
    assert third == first  # /reset forgot them; the system prompt stays


def test_a_server_that_is_not_running_is_a_clear_error(tmp_path):
    result = chat(data_env(tmp_path), "Hello\n")
    assert result.returncode != 0
    assert "infersnap is not running" in result.stderr and "infersnap serve" in result.stderr
    assert "Traceback" not in result.stderr and not result.stdout


def test_a_refused_turn_is_reported_and_a_script_exits_1(keyed_server):
    # Keys are read when the server starts: changed afterwards, the chat's key is refused.
    cli(keyed_server.env, "set", "http.api-keys=a-new-key")
    try:
        result = chat(keyed_server.env, "Hello\nHello again\n", "--max-tokens", "4")
    finally:
        cli(keyed_server.env, "set", f"http.api-keys={KEYED['http.api-keys']}")
    assert result.returncode == 1 and not result.stdout.strip()
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 2 and all("HTTP 401" in e and "http.api-keys" in e for e in errors), errors
    assert "Traceback" not in result.stderr


def test_options_are_checked(keyed_server):
    result = chat(keyed_server.env, "", "--temperature", "3")
    assert result.returncode == 2 and "--temperature" in result.stderr
