"""GET /metrics in Prometheus' text format, and one log line per request: the frontend's, whatever the runtime."""

from __future__ import annotations

import re

import pytest

from conftest import wait_until

pytestmark = pytest.mark.one_engine

SAY_HI = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, "logit_bias": {"0": -100, "2": -100}}
# The format gives labels no order (prometheus-client writes them sorted by name); sample keys here list them in this one.
LABEL_ORDER = ("endpoint", "model", "worker", "device", "engine", "state", "status", "le")


def scrape(http) -> dict[str, float]:
    """Every sample of /metrics by its name with labels, checking the exposition format on the way."""
    reply = http.get("/metrics")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples, typed = {}, set()
    for line in reply.text.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
        elif line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            assert re.fullmatch(r'[a-z_]+(\{([a-z_]+="[^"]*",?)*\})?', name), line
            base = re.sub(r"_(bucket|sum|count)$", "", name.split("{")[0])
            assert base in typed or name.split("{")[0] in typed, f"no TYPE line for {line}"
            samples[in_label_order(name)] = float(value)
    return samples


def in_label_order(name: str) -> str:
    """A sample's name with its labels in LABEL_ORDER."""
    base, _, labels = name.partition("{")
    if not labels:
        return name
    pairs = re.findall(r'([a-z_]+)="([^"]*)"', labels)
    ordered = sorted(pairs, key=lambda pair: LABEL_ORDER.index(pair[0]))
    return base + "{" + ",".join(f'{k}="{v}"' for k, v in ordered) + "}"


def delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def test_metrics_count_requests_tokens_and_latencies(http, server):
    before = scrape(http)
    reply = http.post("/v1/chat/completions", json=SAY_HI)
    assert reply.status_code == 200, reply.text
    with http.stream("POST", "/v1/chat/completions", json={**SAY_HI, "stream": True}) as streamed:
        assert streamed.status_code == 200 and streamed.read().endswith(b"data: [DONE]\n\n")
    assert http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": -1}).status_code == 400
    after = scrape(http)

    worker = server.status()["workers"][0]["id"]
    assert delta(before, after, f'infersnap_requests_total{{endpoint="chat/completions",worker="{worker}",status="200"}}') == 2
    assert delta(before, after, 'infersnap_requests_total{endpoint="completions",worker="",status="400"}') == 1
    assert delta(before, after, f'infersnap_generation_tokens_total{{worker="{worker}"}}') == 8
    assert delta(before, after, f'infersnap_prompt_tokens_total{{worker="{worker}"}}') > 0
    assert delta(before, after, "infersnap_time_to_first_token_seconds_count") == 2
    assert delta(before, after, "infersnap_request_duration_seconds_count") == 3
    assert delta(before, after, 'infersnap_request_duration_seconds_bucket{le="+Inf"}') == 3
    model = reply.json()["model"]
    for gauge in ("requests_running", "requests_waiting", "slots_used"):
        assert after[f'infersnap_{gauge}{{model="{model}"}}'] == 0, gauge
    assert 0 <= after[f'infersnap_kv_cache_usage_ratio{{model="{model}"}}'] < 0.01  # as of the last heartbeat
    assert after[f'infersnap_slots_total{{model="{model}"}}'] == server.status()["workers"][0]["slots"]
    assert after["infersnap_requests_queued"] == 0
    assert any(k.startswith(f'infersnap_worker_ready{{worker="{worker}"') and v == 1 for k, v in after.items())


def test_a_running_generation_shows_as_the_models_load_slots_and_kv_cache(http, model):
    assert http.get("/get_load").json() == {"load": 0}
    long = {**SAY_HI, "messages": [{"role": "user", "content": "Write a very long story."}],
            "max_tokens": 400, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=long) as streamed:
        lines = streamed.iter_lines()  # held: a line iterator dropped would close the stream, and end the request
        next(line for line in lines if '"content":"' in line)  # it generates
        during = scrape(http)
        load = http.get("/get_load").json()
        kv = f'infersnap_kv_cache_usage_ratio{{model="{model}"}}'
        wait_until(lambda: scrape(http)[kv] > 0, 3, "no KV cache use shown")  # as of the worker's next heartbeat
        assert scrape(http)[kv] < 0.05  # a short prompt and a few tokens, of 4 slots x 8192 tokens
    assert during[f'infersnap_requests_running{{model="{model}"}}'] == 1 == load["load"]
    assert during[f'infersnap_slots_used{{model="{model}"}}'] == 1


def test_each_request_logs_one_line(http, server):
    reply = http.post("/v1/chat/completions", json=SAY_HI)
    request_id = reply.json()["id"]
    worker = server.status()["workers"][0]["id"]
    [line] = [line for line in server.log.read_text().splitlines() if request_id in line]
    assert f"chat/completions model={reply.json()['model']} worker={worker} status=200" in line
    assert "completion=4" in line and "total=" in line
