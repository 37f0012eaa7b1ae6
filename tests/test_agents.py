"""The real coding agents against the real server: Codex CLI over /v1/responses, Claude Code over /v1/messages.

Both are installed from npm into the test cache, outside the repo (about 100 MB, once). The default model
rambles, so what is judged is the protocol: each agent runs one turn to its end and prints the model's answer.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from conftest import TEST_CACHE, served_by, start_server, wait_until

AGENTS = TEST_CACHE / "agents"
PACKAGES = ["@openai/codex@0.171.0", "@anthropic-ai/claude-code@2.1.197"]
LIMIT = 300  # the agent server's limits.max-tokens
TRIES = 6


@pytest.fixture(scope="module")
def agents() -> dict[str, str]:
    """The agents' commands, installed once into the test cache."""
    npm = shutil.which("npm")
    assert npm, "node and npm are needed for the agent tests (Debian: apt-get install nodejs npm)"
    bins = {"codex": AGENTS / "node_modules/.bin/codex", "claude": AGENTS / "node_modules/.bin/claude"}
    if not all(b.exists() for b in bins.values()):
        AGENTS.mkdir(parents=True, exist_ok=True)
        subprocess.run([npm, "install", "--no-audit", "--no-fund", "--prefix", str(AGENTS), *PACKAGES],
                       check=True, capture_output=True, timeout=600)
    return {name: str(path) for name, path in bins.items()}


@pytest.fixture(scope="module")
def agent_server(tmp_path_factory):
    # OpenVINO reads the agents' long prompts fastest; a low limits.max-tokens keeps a rambling answer short
    # (the agents ask for far more, and the Responses and Messages routes lower it instead of refusing)
    server = start_server(tmp_path_factory.mktemp("agents"), **{
        "engines": "intel-cpu", "worker.embeddings": "false", "limits.max-tokens": str(LIMIT)})
    yield server
    assert server.stop() == 0, server.log.read_text()


def model_of(server) -> str:
    return server.status()["workers"][0]["model"]


def answered(server, endpoint: str) -> list[tuple[int, int, int]]:
    """(status, prompt tokens, completion tokens) of each request on `endpoint` the server logged, in order."""
    return [(int(m[1]), int(m[2]), int(m[3])) for m in re.finditer(
        rf" {endpoint} model=\S+ worker=\S+ status=(\d+) prompt=(\d+) completion=(\d+) ", server.log.read_text())]


def assert_cut(server, endpoint: str, before: int, output: str) -> None:
    """The try that failed was an answer the server cut as documented (docs/api.md): at limits.max-tokens, to
    which the agent's larger max tokens is lowered, or at the end of the context; nothing else went wrong."""
    context = server.status()["workers"][0]["context"]
    wait_until(lambda: len(answered(server, endpoint)) > before, 5, f"the server logged no {endpoint} request of the try")
    turns = answered(server, endpoint)[before:]
    assert turns and all(status == 200 for status, _, _ in turns), (turns, output)
    assert any(completion == LIMIT or prompt + completion == context for _, prompt, completion in turns), (
        f"the failed try's answers were not cut at {LIMIT} tokens nor at the context's end ({context}): {turns}", output)


def report(agent: str, cut: int, succeeded: bool) -> str:
    line = f"{agent}: {cut} of {cut + succeeded} tries cut at the length limit before {'one' if succeeded else 'none'} ended on its own"
    print(line)  # shown by pytest -rA
    return line


def test_codex_exec_runs_a_turn_over_the_responses_api(agents, agent_server, tmp_path):
    home = tmp_path / "codex"
    home.mkdir()
    (home / "config.toml").write_text(
        f'model = "{model_of(agent_server)}"\nmodel_provider = "infersnap"\n'
        f'[model_providers.infersnap]\nname = "infersnap"\nbase_url = "{agent_server.url}"\nwire_api = "responses"\n'
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "CODEX_HOME": str(home)}
    before = served_by(agent_server, "responses")
    # Codex samples at its own temperature and takes a turn cut at max_output_tokens (status incomplete) for an
    # error, which is the protocol working too: at least one of a few turns must end on its own, and every
    # other must be such a cut.
    cut = 0
    for _ in range(TRIES):
        logged = len(answered(agent_server, "responses"))
        done = subprocess.run([agents["codex"], "exec", "--skip-git-repo-check", "Say hello."], env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)
        if done.returncode == 0:
            break
        assert "Incomplete response returned, reason: max_output_tokens" in done.stdout + done.stderr, done.stderr
        assert_cut(agent_server, "responses", logged, done.stdout + done.stderr)
        cut += 1
    counts = report("codex", cut, done.returncode == 0)
    assert done.returncode == 0, (counts, done.stdout + done.stderr)
    assert done.stdout.strip(), done.stderr  # the model's answer
    assert "ERROR" not in done.stderr, done.stderr
    assert sum(served_by(agent_server, "responses").values()) > sum(before.values())


def test_claude_print_runs_a_turn_over_the_messages_api(agents, agent_server, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "ANTHROPIC_BASE_URL": agent_server.base,
           "ANTHROPIC_API_KEY": "sk-local", "DISABLE_TELEMETRY": "1", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}
    before = served_by(agent_server, "messages")
    # --bare and no tools: Claude Code's default toolset alone is about 19,000 tokens, past this model's context.
    # Claude Code samples at its own temperature (1) and takes an answer cut at max_tokens for an error ("exceeded
    # the output token maximum"), which is the protocol working too; at least one of a few turns must end on its own.
    # This 135M model echoes long prompts: with one tool's schema and "Say hello." it ended 2 turns in 10 (4 cuts in a
    # row failed CI); with no tool, "Be brief." and a short question 9 in 12 (replayed over /v1/messages).
    answers, cut = [], 0
    for _ in range(TRIES):
        logged = len(answered(agent_server, "messages"))
        done = subprocess.run(
            [agents["claude"], "-p", "--bare", "--max-turns", "1", "--tools", "", "--system-prompt", "Be brief.",
             "--model", model_of(agent_server), "What is 2+2?"],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        # Claude Code exits 0 or 1 on a cut answer, by version; a cut answer is the only failure allowed.
        if "API Error" in done.stdout:
            assert "output token maximum" in done.stdout, done.stdout + done.stderr
            assert_cut(agent_server, "messages", logged, done.stdout + done.stderr)
            cut += 1
            continue
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.strip(), done.stderr
        answers.append(done.stdout)
        break
    counts = report("claude", cut, bool(answers))
    assert answers, f"every turn was cut at max_tokens ({counts})"
    assert sum(served_by(agent_server, "messages").values()) > sum(before.values())
