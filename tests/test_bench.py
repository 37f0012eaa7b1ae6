"""`infersnap bench`: the real CLI as a process against a real server (llama.cpp only, to keep it fast)."""

from __future__ import annotations

import json

import pytest

from conftest import Server, cli, data_env, free_port
from infersnap.cli.bench import LevelResult, RequestResult, Target, build_prompt, parse_levels, percentile, summarize

# One engine is enough here: bench measures the HTTP API, which both engines serve the same way.
pytestmark = pytest.mark.one_engine

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def bench_json(server: Server, *args: str, check: bool = True) -> dict:
    result = cli(server.env, "bench", "--json", *args, check=check, timeout=60)
    return json.loads(result.stdout)


def assert_ordered(level: dict) -> None:
    for key in ("ttft_ms", "itl_ms", "e2e_ms"):
        p = level[key]
        assert 0 < p["p50"] <= p["p90"] <= p["p99"], (key, p)


def test_sweep_on_the_running_server_by_default(server: Server) -> None:
    document = bench_json(server, "--requests", "4", "--concurrency", "1,2", "--max-tokens", "8")
    assert document["url"] == server.status()["endpoints"]["openai"]  # no --url: this infersnap's
    assert document["model"]
    assert [level["concurrency"] for level in document["levels"]] == [1, 2]
    for level in document["levels"]:
        assert (level["requests"], level["done"], level["errors"]) == (4, 4, 0), level["error_samples"]
        assert level["requests_per_s"] > 0 and level["output_tokens_per_s"] > 0
        assert 4 <= level["output_tokens"] <= 4 * 8  # max_tokens is honoured (a stop on EOS may come earlier)
        assert_ordered(level)


def test_compare_and_plot(server: Server, tmp_path) -> None:
    png = tmp_path / "bench.png"
    document = bench_json(
        server, "--url", server.url, "--compare", server.url, "--requests", "2", "--concurrency", "1,2",
        "--max-tokens", "4", "--plot", str(png),
    )  # fmt: skip
    compare = document["compare"]
    assert compare["url"] == server.url and len(compare["levels"]) == 2
    assert all(level["errors"] == 0 for level in document["levels"] + compare["levels"])
    assert [r["concurrency"] for r in compare["ratios"]] == [1, 2]
    for ratio in compare["ratios"]:
        for key in ("output_tokens_per_s", "ttft_p50", "itl_p50", "e2e_p50"):
            assert ratio[key] > 0, (key, ratio)
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_table_without_streaming_and_with_duration(server: Server) -> None:
    out = cli(server.env, "bench", "--no-stream", "--duration", "0.5", "--concurrency", "2", "--max-tokens", "4").stdout
    assert "no stream" in out and "E2E ms p50/p90/p99" in out
    row = out.splitlines()[2].split()
    assert row[0] == "2" and int(row[1]) >= 2 and row[2] == "0"  # concurrency, done (each worker sent one), errors


def test_server_errors_are_reported(server: Server) -> None:
    result = cli(server.env, "bench", "--json", "--model", "no-such-model", "--requests", "2", "--concurrency", "1", check=False)
    assert result.returncode == 1 and "every request failed" in result.stderr
    level = json.loads(result.stdout)["levels"][0]
    assert (level["done"], level["errors"]) == (0, 2)
    assert level["error_samples"][0].startswith("HTTP 404: ")  # the status and the OpenAI error message


def test_closed_port_fails_fast(tmp_path) -> None:
    env = data_env(tmp_path)
    url = f"http://127.0.0.1:{free_port()}/v1"
    result = cli(env, "bench", "--url", url, check=False, timeout=20)  # the model lookup fails: a clear error
    assert result.returncode == 1 and f"cannot reach {url}/models" in result.stderr
    result = cli(env, "bench", "--url", url, "--model", "m", "--requests", "3", "--concurrency", "1,2", "--json", check=False, timeout=20)
    assert result.returncode == 1 and "every request failed" in result.stderr
    levels = json.loads(result.stdout)["levels"]
    assert [(level["done"], level["errors"]) for level in levels] == [(0, 3), (0, 3)]
    assert "ConnectError" in levels[0]["error_samples"][0]


def test_default_url_needs_a_running_server(tmp_path) -> None:
    result = cli(data_env(tmp_path), "bench", check=False)
    assert result.returncode == 1 and "not running" in result.stderr and "--url" in result.stderr


@pytest.mark.parametrize("levels", ["1,x", "0", "", "2,,4", "-1"])
def test_invalid_concurrency_is_a_usage_error(tmp_path, levels: str) -> None:
    result = cli(data_env(tmp_path), "bench", "--url", "http://127.0.0.1:9/v1", "--concurrency", levels, check=False)
    assert result.returncode == 2 and "Invalid value for '--concurrency'" in result.stderr


def test_percentile() -> None:
    assert percentile([], 50) is None
    assert percentile([5.0], 99) == 5.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([4.0, 1.0, 3.0, 2.0], 0) == 1.0 and percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0
    assert percentile(list(map(float, range(101))), 90) == 90.0


def test_summarize() -> None:
    results = [
        RequestResult(ttft=0.1, itl=0.01, e2e=1.0, output_tokens=10),
        RequestResult(ttft=0.3, itl=0.03, e2e=3.0, output_tokens=30),
        RequestResult(error="HTTP 503: busy"),
    ]
    level = summarize(Target("http://x/v1", "m"), 2, results, wall_s=4.0)
    assert isinstance(level, LevelResult)
    assert (level.requests, level.done, level.errors, level.output_tokens) == (3, 2, 1, 40)
    assert level.output_tokens_per_s == 10.0 and level.requests_per_s == 0.5
    assert level.ttft_ms.p50 == pytest.approx(200.0) and level.e2e_ms.p50 == pytest.approx(2000.0)
    assert level.error_samples == ["HTTP 503: busy"]


def test_parse_levels_and_prompt() -> None:
    assert parse_levels("1, 2,8") == [1, 2, 8]
    with pytest.raises(ValueError):
        parse_levels("1,0")
    assert len(build_prompt(32, 0).split()) == 32 and len(build_prompt(200, 3).split()) == 200
    assert build_prompt(32, 0) != build_prompt(32, 1)


def test_a_request_past_its_timeout_is_an_error(server: Server) -> None:
    document = bench_json(server, "--timeout", "0.01", "--requests", "2", "--concurrency", "2", "--max-tokens", "64", check=False)
    level = document["levels"][0]
    assert (level["done"], level["errors"]) == (0, 2)
    assert level["error_samples"] == ["timeout after 0.01 s"]


def test_plot_without_matplotlib_says_how_to_install(monkeypatch, tmp_path) -> None:
    import sys

    from click.testing import CliRunner

    from infersnap.cli.main import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    result = CliRunner().invoke(main, ["bench", "--url", "http://127.0.0.1:9/v1", "--plot", str(tmp_path / "p.png")])
    assert result.exit_code == 1 and "pip install matplotlib" in result.output
