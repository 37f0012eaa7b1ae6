"""Several infersnap nodes behind vllm-router, as docs/cluster.md sets them up: three real nodes and the
real router (started by `infersnap router --run`) on 127.0.0.1, with API keys on the nodes.

Each node is light for 2 cores: one llama.cpp lane of one thread and two slots. Two routers run in
front of the same nodes: one keeps a conversation on a node by its X-Session-ID (consistent_hash), the
other by the beginning of its prompt (cache_aware). The last test stops one node and kills another
under a steady load, so it runs last.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import anthropic
import httpx
import openai
import pytest

from conftest import Server, start_router, start_server, wait_until

KEY = "cluster-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
NODE = {"engines": "cpu", "engines-measure": "false", "worker.slots": "2", "worker.threads": "1",
        "http.api-keys": KEY, "queue.drain-linger": "2"}  # the linger docs/cluster.md gives: twice the health interval
SHORT = {"max_tokens": 6, "temperature": 0}
LONG = {"messages": [{"role": "user", "content": "Write a very long story."}], "max_tokens": 300,
        "logit_bias": {"0": -100, "2": -100}}  # never stops early


@pytest.fixture(scope="module")
def nodes(tmp_path_factory) -> list[Server]:
    folders = [tmp_path_factory.mktemp(f"node{i}") for i in range(3)]
    with ThreadPoolExecutor(3) as pool:  # started side by side: each waits mostly on its model loading
        starts = [pool.submit(start_server, folder, **NODE) for folder in folders]
    if any(s.exception() for s in starts):  # none left running behind a failed start
        for start in starts:
            if not start.exception():
                start.result().stop(signal.SIGKILL)
        raise starts[[bool(s.exception()) for s in starts].index(True)].exception()
    started = [s.result() for s in starts]
    yield started
    running = [node for node in started if node.process.poll() is None]
    for node in running:  # all at once: each lingers its 2 s
        node.process.send_signal(signal.SIGTERM)
    for node in running:
        assert node.process.wait(30) == 0, node.log.read_text()


@pytest.fixture(scope="module")
def sessions(nodes):
    router = start_router([n.base for n in nodes], "consistent_hash", api_key=KEY)
    yield router
    router.stop()


@pytest.fixture(scope="module")
def prefixes(nodes):
    router = start_router([n.base for n in nodes], "cache_aware", api_key=KEY)
    yield router
    router.stop()


def chats_served(node: Server) -> float:
    """Chat completions this node answered with 200, from its /metrics."""
    lines = httpx.get(f"{node.base}/metrics").text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines
               if line.startswith('infersnap_requests_total{endpoint="chat/completions"') and 'status="200"' in line)


def served_where(nodes: list[Server], turns) -> list[int]:
    """Which node's count grew during `turns()` (called), as a list of growths per node."""
    before = [chats_served(n) for n in nodes]
    turns()
    return [int(chats_served(n) - b) for n, b in zip(nodes, before)]


def test_a_busy_node_is_healthy_and_tells_its_load(nodes, sessions):
    node = nodes[0]
    done = threading.Event()

    def generate() -> None:
        with httpx.stream("POST", f"{node.url}/chat/completions", json={**LONG, "stream": True}, headers=AUTH,
                          timeout=60) as streamed:
            for _ in streamed.iter_lines():
                if done.is_set():
                    return

    # two long generations fill both slots and a third waits: busy, not unhealthy
    clients = [threading.Thread(target=generate) for _ in range(3)]
    for client in clients:
        client.start()
    try:
        wait_until(lambda: httpx.get(f"{node.base}/get_load").json() == {"load": 3}, 10, "the load is not 3")
        assert httpx.get(f"{node.base}/health").status_code == 200  # no key: health checks send none
        metrics = httpx.get(f"{node.base}/metrics").text
        model = httpx.get(f"{node.url}/models", headers=AUTH).json()["data"][0]["id"]
        assert f'infersnap_requests_running{{model="{model}"}} 2.0' in metrics
        assert f'infersnap_requests_waiting{{model="{model}"}} 1.0' in metrics
        assert f'infersnap_slots_used{{model="{model}"}} 2.0' in metrics
        # the router reads the same figure from every node (GET /get_load, as power_of_two does)
        loads = httpx.get(f"{sessions.base}/get_loads", timeout=10).json()
        assert sorted(str(loads).count(f"'load': {n}") for n in (0, 3)) == [1, 2], loads
    finally:
        done.set()
        for client in clients:
            client.join(60)
    wait_until(lambda: httpx.get(f"{node.base}/get_load").json() == {"load": 0}, 10, "the closed streams still run")
    started = time.monotonic()
    assert httpx.get(f"{node.url}/models", headers=AUTH).status_code == 200
    assert time.monotonic() - started < 0.5  # /v1/models answers at once, and loads nothing


def test_the_whole_api_through_the_router(nodes, sessions):
    client = openai.OpenAI(base_url=f"{sessions.base}/v1", api_key=KEY, default_headers={"X-Session-ID": "api"})
    model = client.models.list().data[0].id
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], **SHORT)
    assert chat.choices[0].message.content and chat.usage.completion_tokens > 0
    chunks = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                                 stream=True, **SHORT))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert client.completions.create(model=model, prompt="The sky is", **SHORT).choices[0].text
    embedded = client.embeddings.create(model=model, input=["a cat", "a dog"])
    assert len(embedded.data) == 2 and len(embedded.data[0].embedding) > 100
    # a conversation kept on the node that stored it: previous_response_id, with its X-Session-ID
    first = client.responses.create(model=model, input="My name is Ada.", max_output_tokens=6)
    second = client.responses.create(model=model, input="What is my name?", previous_response_id=first.id,
                                     max_output_tokens=6)
    assert second.previous_response_id == first.id and second.output_text
    assert client.responses.retrieve(first.id).id == first.id  # the router asks each node until one has it
    # the Messages API is passed through without the client's headers: the router's --api-key reaches the node
    claude = anthropic.Anthropic(base_url=sessions.base, api_key="not-forwarded")
    message = claude.messages.create(model=model, max_tokens=6, messages=[{"role": "user", "content": "Hi"}])
    assert message.content[0].text and message.stop_reason in ("max_tokens", "end_turn")
    counted = claude.messages.count_tokens(model=model, messages=[{"role": "user", "content": "Hi"}])
    assert counted.input_tokens > 0
    tokens = httpx.post(f"{sessions.base}/tokenize", json={"content": "Hello"}, timeout=30).json()["tokens"]
    assert tokens and all(isinstance(t, int) for t in tokens)
    # who checks a client's key: the node, on the routes whose headers the router forwards
    refused = httpx.post(f"{sessions.base}/v1/chat/completions", timeout=30,
                         json={"model": model, "messages": [{"role": "user", "content": "Hi"}], **SHORT})
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"


def test_a_conversation_with_a_session_id_stays_on_one_node_and_sessions_spread(nodes, sessions):
    used = set()
    for session in range(8):
        messages = [{"role": "user", "content": f"Conversation {session}: say a word."}]

        def turns() -> None:
            for _ in range(2):
                reply = httpx.post(f"{sessions.base}/v1/chat/completions", headers={**AUTH, "X-Session-ID": f"s{session}"},
                                   json={"messages": messages, **SHORT}, timeout=60)
                assert reply.status_code == 200, reply.text
                messages.extend([reply.json()["choices"][0]["message"], {"role": "user", "content": "And another."}])

        growth = served_where(nodes, turns)
        assert sorted(growth) == [0, 0, 2], growth  # both turns on one node
        used.add(growth.index(2))
    assert len(used) >= 2, "eight sessions all went to one node"


def test_an_agent_that_sends_no_header_keeps_its_prefix_with_cache_aware(nodes, prefixes):
    system = "You are a coding agent. Follow the repository's conventions. " * 40  # an agent's long preamble
    hits = 'vllm_router_prefix_routing_decisions_total{policy="cache_aware",stage="regular",outcome="prefix_hit"}'
    for agent in range(2):
        hits_before = prefixes.counted(hits)
        messages = [{"role": "system", "content": f"Agent {agent}. {system}"},
                    {"role": "user", "content": "List the files."}]
        homes = []
        for _ in range(3):
            def turn() -> None:
                reply = httpx.post(f"{prefixes.base}/v1/chat/completions", headers=AUTH,
                                   json={"messages": messages, **SHORT}, timeout=60)
                assert reply.status_code == 200, reply.text
                messages.extend([reply.json()["choices"][0]["message"], {"role": "user", "content": "Go on."}])

            growth = served_where(nodes, turn)
            assert sorted(growth) == [0, 0, 1], growth
            homes.append(growth.index(1))
        assert len(set(homes)) == 1, f"the turns of one agent went to nodes {homes}"
        # placed there by the prefix the node holds (the render routes answer the router without a key)
        assert prefixes.counted(hits) - hits_before == 2


@dataclass
class Load:
    """Clients sending short chats through the router without pause, half of them streamed."""

    base: str
    outcomes: list[tuple[float, bool, str]] = field(default_factory=list)  # (when, streamed, "ok" or what broke)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self, client: int) -> None:
        rng = random.Random(client)
        while not self.stop.is_set():
            streamed = client % 2 == 1
            body = {"messages": [{"role": "user", "content": f"Say a word, {rng.random()}"}], **SHORT, "stream": streamed}
            headers = {**AUTH, "X-Session-ID": f"load-{rng.randrange(6)}"}
            self.outcomes.append((time.monotonic(), streamed, self.send(body, headers)))

    def send(self, body: dict, headers: dict) -> str:
        try:
            if not body["stream"]:
                reply = httpx.post(f"{self.base}/v1/chat/completions", json=body, headers=headers, timeout=30)
                return "ok" if reply.status_code == 200 and reply.json()["choices"] else f"{reply.status_code}"
            with httpx.stream("POST", f"{self.base}/v1/chat/completions", json=body, headers=headers, timeout=30) as r:
                text = r.read().decode()
            return "ok" if r.status_code == 200 and text.rstrip().endswith("data: [DONE]") else f"{r.status_code} broken"
        except httpx.TransportError as exc:
            return type(exc).__name__

    def failures(self, since: float, until: float, streamed: bool) -> list[str]:
        return [o for t, s, o in self.outcomes if since <= t < until and s == streamed and o != "ok"]


def test_a_stopped_node_loses_no_request_and_a_killed_one_no_unstreamed_one(nodes, sessions):
    load = Load(sessions.base)
    clients = [threading.Thread(target=load.run, args=(i,)) for i in range(4)]
    for client in clients:
        client.start()
    try:
        time.sleep(2)
        stopped, killed = nodes[2], nodes[1]
        stopped_at = time.monotonic()
        stopped.process.send_signal(signal.SIGTERM)
        # the drain linger: its port stays open answering 503 (to health checks too) although idle
        wait_until(lambda: httpx.get(f"{stopped.base}/health", timeout=2).status_code == 503, 2, "no 503 while draining")
        assert stopped.process.wait(15) == 0
        assert time.monotonic() - stopped_at >= 2
        time.sleep(1)
        killed_at = time.monotonic()
        killed.process.kill()  # the supervisor, and with it its frontend, broker and workers
        time.sleep(4)
    finally:
        load.stop.set()
        for client in clients:
            client.join(60)
    assert not any(c.is_alive() for c in clients), "a request hangs"
    ends = time.monotonic()
    after_stop = load.failures(stopped_at, killed_at, False) + load.failures(stopped_at, killed_at, True)
    after_kill_plain = load.failures(killed_at, ends, False)
    after_kill_streamed = load.failures(killed_at, ends, True)
    counted = {"before": len([o for t, _, o in load.outcomes if t < stopped_at]),
               "after SIGTERM": len([o for t, _, o in load.outcomes if stopped_at <= t < killed_at]),
               "after SIGKILL": len([o for t, _, o in load.outcomes if t >= killed_at]),
               "broken streams after SIGKILL": len(after_kill_streamed)}
    print("cluster failover:", counted)
    assert counted["after SIGTERM"] > 0 and counted["after SIGKILL"] > 0
    assert after_stop == [], after_stop
    assert after_kill_plain == [], after_kill_plain
    # a stream that was running on the killed node ends broken (no [DONE]), promptly; none other fails
    assert all(o.endswith("broken") or o in ("RemoteProtocolError", "ReadError") for o in after_kill_streamed)
    assert len(after_kill_streamed) <= 2, after_kill_streamed  # at most its two slots' streams
