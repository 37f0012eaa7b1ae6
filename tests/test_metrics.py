"""GET /metrics in Prometheus' text format, and one log line per request: the frontend's, whatever the runtime."""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.one_engine

SAY_HI = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, "logit_bias": {"0": -100, "2": -100}}
# The format gives labels no order (prometheus-client writes them sorted by name); sample keys here list them in this one.
LABEL_ORDER = ("endpoint", "worker", "device", "engine", "state", "status", "le")


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
    assert after[f'infersnap_requests_running{{worker="{worker}"}}'] == 0
    assert after["infersnap_requests_queued"] == 0
    assert any(k.startswith(f'infersnap_worker_ready{{worker="{worker}"') and v == 1 for k, v in after.items())


def test_each_request_logs_one_line(http, server):
    reply = http.post("/v1/chat/completions", json=SAY_HI)
    request_id = reply.json()["id"]
    worker = server.status()["workers"][0]["id"]
    [line] = [line for line in server.log.read_text().splitlines() if request_id in line]
    assert f"chat/completions model={reply.json()['model']} worker={worker} status=200" in line
    assert "completion=4" in line and "total=" in line
