"""The broker's routing, without processes: the real Broker over inproc sockets, with a frontend and
workers played by DEALER sockets in the test."""

from __future__ import annotations

import itertools
import time

import msgspec
import pytest
import zmq

from infersnap import routing, wire
from infersnap.profiles import Level, PromptRead
from infersnap.broker import broker as broker_module, lanes as lanes_module
from infersnap.broker.broker import Broker
from infersnap.plan import ModelSpec, ServePlan

LLAMA = wire.Capabilities(tasks=["generate", "tokenize"], features=["top_logprobs", "prompt_logprobs", "logit_bias"])
OPENVINO = wire.Capabilities(tasks=["generate", "tokenize"], ban_with=[2])
EMBED = wire.Capabilities(tasks=["embed"])
_addresses = itertools.count()


class Peer:
    """A DEALER socket with an identity: a frontend or a worker."""

    def __init__(self, net: Net, identity: bytes, address: str) -> None:
        self.net, self.identity = net, identity
        self.socket = net.zctx.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.IDENTITY, identity)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(address)

    def send(self, *messages: wire.Message) -> None:
        self.socket.send_multipart([wire.encode(m) for m in messages])
        self.net.pump()

    def received(self) -> list[list[wire.Message]]:
        """Every message waiting for this peer, each decoded frame by frame."""
        self.net.pump()
        got = []
        while self.socket.poll(20):
            got.append([wire.decode(frame) for frame in self.socket.recv_multipart()])
        return got


class Net:
    def __init__(self, broker: Broker, zctx: zmq.Context, prefix: str) -> None:
        self.broker, self.zctx, self.prefix = broker, zctx, prefix

    def pump(self) -> None:
        for _ in range(3):
            self.broker.poll_once(20)

    def client(self, identity: bytes = b"app") -> Peer:
        return Peer(self, identity, f"{self.prefix}-clients")

    def worker(self, worker_id: str, capabilities: wire.Capabilities = LLAMA, slots: int = 1, model: str = "m",
               state: str = "ready", runtime: str = "llamacpp", pid: int = 1, device: str | None = None,
               speed: wire.Speed | None = None, error: str = "") -> Peer:
        """A worker on its own device (named after it), unless `device` puts it beside others as a lane."""
        peer = Peer(self, worker_id.encode(), f"{self.prefix}-workers")
        peer.info = wire.WorkerInfo(worker_id=worker_id, device=device or worker_id, engine=worker_id, runtime=runtime,
                                    model=model, slots=slots, context=512, state=state, pid=pid, error=error,
                                    capabilities=capabilities, speed=speed)
        peer.send(wire.WorkerStatus(info=peer.info))
        return peer


@pytest.fixture()
def net():
    zctx = zmq.Context()
    prefix = f"inproc://broker-test-{next(_addresses)}"
    plan = ServePlan(host="127.0.0.1", port=0, max_body_bytes=1 << 20, models=[ModelSpec("m", "m.gguf", 512)],
                     max_waiting=2, request_timeout=0, verbose=False, workers=[])
    broker = Broker(plan, zctx=zctx, address=lambda name: f"{prefix}-{name}")
    yield Net(broker, zctx, prefix)
    zctx.destroy(linger=0)


def generate(request_id: str, model: str = "m", **params) -> wire.Generate:
    return wire.Generate(id=request_id, model=model, params=wire.SamplingParams(**params), prompt="x")


def submit(client: Peer, request: wire.Request) -> None:
    client.send(wire.Submit(request.id, request.model, routing.needs_of(request), routing.work_of(request)), request)


def dispatched(worker: Peer) -> list[str]:
    """The ids of the requests the broker dispatched to this worker, and that the body came along whole."""
    ids = []
    for frames in worker.received():
        if isinstance(frames[0], wire.Dispatch):
            assert frames[1].id == frames[0].id
            ids.append(frames[0].id)
    return ids


def aborted(worker: Peer) -> list[str]:
    return [i for frames in worker.received() if isinstance(frames[0], wire.Abort) for i in frames[0].ids]


def outputs(client: Peer) -> list[wire.Output]:
    return [o for frames in client.received() for m in frames if isinstance(m, wire.Results) for o in m.outputs]


def text(output: wire.Output) -> str:
    """The text an output carries (a Final's in its last chunk)."""
    return output.last.text if isinstance(output, wire.Final) else output.text


def finish(worker: Peer, client: bytes, *ids: str) -> None:
    results = wire.Results(outputs=[wire.Final(i, "stop", worker=worker.info.worker_id, last=wire.Text(i, "done"))
                                    for i in ids])
    worker.send(wire.Deliver(client=client, ended=list(ids)), results)


def started(worker: Peer, client: bytes, *ids: str) -> None:
    """The worker sends each request's first output, not its last."""
    worker.send(wire.Deliver(client=client, ended=[], first=list(ids)),
                wire.Results(outputs=[wire.Text(i, "so") for i in ids]))


def test_requests_wait_for_a_free_slot_in_arrival_order_and_answers_pass_through(net):
    worker, app = net.worker("cpu", slots=1), net.client()
    for i in range(3):
        submit(app, generate(f"g{i}"))
    assert dispatched(worker) == ["g0"]
    assert net.broker.status("q").queued == 2
    finish(worker, b"app", "g0")
    [answer] = outputs(app)
    assert (answer.id, text(answer), answer.worker) == ("g0", "done", "cpu")  # the worker's own stamp
    assert dispatched(worker) == ["g1"]


def test_the_least_loaded_worker_gets_the_next_request(net):
    a, b, app = net.worker("a", slots=2), net.worker("b", slots=2), net.client()
    for i in range(3):
        submit(app, generate(f"g{i}"))
    assert len(dispatched(a)) + len(dispatched(b)) == 3
    assert {len(w.running) for w in net.broker.workers.values()} == {1, 2}


def test_a_request_needing_what_only_a_busy_worker_can_do_waits_for_it(net):
    llama, openvino, app = net.worker("cpu/llama", slots=1), net.worker("cpu/ov", OPENVINO, slots=4), net.client()
    submit(app, generate("busy", logprobs=2))  # the most likely tokens: llama.cpp only, so it fills that slot
    assert dispatched(llama) == ["busy"]
    submit(app, generate("top", logprobs=2))
    submit(app, generate("plain"))
    assert dispatched(openvino) == ["plain"]  # goes past the waiting one, to the free worker
    assert dispatched(llama) == [] and net.broker.status("q").queued == 1
    finish(llama, b"app", "busy")
    assert dispatched(llama) == ["top"]


def test_what_no_worker_of_the_model_can_do_is_a_400_naming_the_parameter_whatever_the_load(net):
    net.worker("cpu/ov", OPENVINO, runtime="openvino", slots=4)
    app = net.client()
    submit(app, generate("top", logprobs=2))
    [refused] = outputs(app)
    assert refused.status == 400 and refused.param == "logprobs"  # a completion's name for it
    assert "not supported by the OpenVINO engine" in refused.message
    # banning every end-of-text token is the part of logit_bias OpenVINO has, but not with a schema
    submit(app, generate("ban", logit_bias={2: -100.0, 5: -100.0}))
    submit(app, generate("bias", logit_bias={2: 5.0}))
    submit(app, generate("schema-ban", logit_bias={2: -100.0}, json_schema="{}"))
    assert [(o.id, isinstance(o, wire.Failure) and o.param) for o in outputs(app)] == [
        ("bias", "logit_bias"), ("schema-ban", "logit_bias")]
    assert "ban" in net.broker.routes


def test_a_loading_worker_may_still_gain_a_feature_so_its_request_waits(net):
    net.worker("cpu/ov", OPENVINO, slots=4)
    loading = net.worker("cpu/llama", wire.Capabilities(tasks=["generate", "tokenize"]), state="loading")
    app = net.client()
    submit(app, generate("top", logprobs=2))
    assert outputs(app) == [] and net.broker.status("q").queued == 1
    loading.send(wire.WorkerStatus(info=msgspec.structs.replace(loading.info, state="ready", capabilities=LLAMA)))
    assert dispatched(loading) == ["top"]


def test_unknown_model_404_loading_503_and_embeddings_go_to_the_embedding_worker(net):
    worker, embedder, app = net.worker("cpu"), net.worker("embed", EMBED), net.client()
    submit(app, generate("x", model="other"))
    [missing] = outputs(app)
    assert (missing.status, missing.code) == (404, "model_not_found")
    embed = wire.Embed(id="e1", model="M", texts=["hi"])  # model ids match without case
    submit(app, embed)
    assert dispatched(embedder) == ["e1"] and dispatched(worker) == []


def test_a_full_queue_is_refused_with_503(net):
    net.worker("cpu", slots=1)  # room: 1 slot + max_waiting 2
    app = net.client()
    for i in range(4):
        submit(app, generate(f"g{i}"))
    [refused] = outputs(app)
    assert (refused.id, refused.status, refused.code) == ("g3", 503, "server_overloaded")


def test_a_lookup_takes_no_slot_and_skips_the_queue(net):
    worker, app = net.worker("cpu", slots=1), net.client()
    submit(app, generate("g1"))  # takes the one slot
    submit(app, generate("g2"))  # waits
    submit(app, wire.Tokenize(id="t1", model="M", content="x"))
    assert dispatched(worker) == ["g1", "t1"]
    status = net.broker.status("q")
    assert status.queued == 1 and status.workers[0].running == ["g1"] and "t1" in status.routed
    worker.send(wire.Deliver(client=b"app", ended=["t1"]), wire.Results([wire.Tokens("t1", tokens=[7])]))
    assert [o.tokens for o in outputs(app)] == [[7]] and "t1" not in net.broker.status("q").routed


def test_a_lost_worker_ends_what_it_ran_with_503_and_its_queue_goes_to_the_next(net):
    a, b, app = net.worker("a", slots=1), net.worker("b", slots=1), net.client()
    submit(app, generate("g1"))
    submit(app, generate("g2"))
    submit(app, generate("g3"))  # waits
    on_a = dispatched(a)
    dispatched(b)
    started(a, b"app", *on_a)  # it had output: not retried
    outputs(app)
    net.client(b"supervisor").send(wire.WorkerExited(worker_id="a", code=-9))
    [lost] = outputs(app)
    assert lost.id == on_a[0] and lost.status == 503
    assert "worker a stopped while generating this request: its process was killed by SIGKILL" in lost.message
    assert [w.state for w in net.broker.status("q").workers if w.worker_id == "a"] == ["restarting"]
    assert dispatched(a) == [] and net.broker.status("q").queued == 1
    finish(b, b"app", next(iter(net.broker.workers[b"b"].running)))
    assert dispatched(b) == ["g3"]


def test_a_lookup_on_a_lost_worker_is_retried_on_another(net):
    a, b, app = net.worker("a"), net.worker("b"), net.client()
    submit(app, wire.Detokenize(id="d1", model="m", tokens=[1]))
    assert dispatched(a) == ["d1"]
    net.client(b"supervisor").send(wire.WorkerExited(worker_id="a", code=-9))
    assert outputs(app) == [] and dispatched(b) == ["d1"]
    b.send(wire.Deliver(client=b"app", ended=["d1"], first=["d1"]), wire.Results([wire.Tokens("d1", text="x")]))
    assert [(o.id, o.text) for o in outputs(app)] == [("d1", "x")]
    assert net.broker.status("q").routed == []


def test_a_silent_worker_is_lost(net, monkeypatch):
    worker, app = net.worker("cpu"), net.client()
    submit(app, generate("g1"))
    started(worker, b"app", "g1")
    outputs(app)
    monkeypatch.setattr(broker_module, "WORKER_TIMEOUT", 0.0)
    net.pump()
    [lost] = outputs(app)
    assert lost.status == 503 and "went silent" in lost.message
    assert aborted(worker)[-1:] == ["g1"]  # in case it is alive after all


def test_a_worker_restarted_with_a_new_pid_loses_its_requests(net):
    worker, app = net.worker("cpu"), net.client()
    submit(app, generate("g1"))
    started(worker, b"app", "g1")
    outputs(app)
    worker.send(wire.WorkerStatus(info=msgspec.structs.replace(worker.info, pid=2, state="loading")))
    [lost] = outputs(app)
    assert lost.status == 503 and "restarted" in lost.message


def test_a_request_with_no_output_when_its_worker_dies_is_retried_on_another_at_its_place(net):
    a, b, app = net.worker("a", slots=1), net.worker("b", slots=1), net.client()
    for i in range(3):
        submit(app, generate(f"g{i}"))
    assert dispatched(a) == ["g0"] and dispatched(b) == ["g1"]  # g2 waits
    net.client(b"supervisor").send(wire.WorkerExited(worker_id="a", code=-11))
    assert outputs(app) == [] and list(net.broker.queue) == ["g0", "g2"]  # ahead of what came later
    a.send(wire.WorkerStatus(info=msgspec.structs.replace(a.info, pid=2)))  # a is back: g0 still avoids it
    assert dispatched(a) == ["g2"]
    finish(b, b"app", "g1")
    assert dispatched(b) == ["g0"]
    finish(b, b"app", "g0")
    assert [(o.id, text(o), o.worker, isinstance(o, wire.Failure)) for o in outputs(app)] == [
        ("g1", "done", "b", False), ("g0", "done", "b", False)]


def test_a_request_that_had_output_ends_with_an_error_naming_the_crash(net):
    worker, app = net.worker("cpu"), net.client()
    submit(app, generate("g1"))
    started(worker, b"app", "g1")
    assert [text(o) for o in outputs(app)] == ["so"]
    net.client(b"supervisor").send(wire.WorkerExited(worker_id="cpu", code=-11))
    [lost] = outputs(app)
    assert lost.id == "g1" and lost.status == 503
    assert lost.message == "worker cpu stopped while generating this request: its process was killed by SIGSEGV"
    assert "retry" not in lost.message and net.broker.queue == {}
    assert wire.exit_words(1) == "exited with code 1"
    assert wire.exit_words(-9) == "was killed by SIGKILL"


def test_a_request_is_retried_once_only(net):
    a, b, c, app = net.worker("a"), net.worker("b"), net.worker("c"), net.client()
    submit(app, generate("g1"))
    assert dispatched(a) == ["g1"]
    net.client(b"supervisor").send(wire.WorkerExited(worker_id="a", code=-11))
    second = b if dispatched(b) == ["g1"] else c
    assert net.broker.routes["g1"].worker == second.identity
    net.client(b"supervisor").send(wire.WorkerExited(worker_id=second.info.worker_id, code=-11))
    [lost] = outputs(app)
    assert lost.id == "g1" and "SIGSEGV" in lost.message
    assert dispatched(a) + dispatched(b) + dispatched(c) == [] and net.broker.queue == {}


def test_a_late_first_output_from_a_lost_worker_is_not_passed_on(net):
    a, b, app = net.worker("a"), net.worker("b"), net.client()
    submit(app, generate("g1"))
    submit(app, generate("g2"))
    assert dispatched(a) == ["g1"] and dispatched(b) == ["g2"]
    net.client(b"supervisor").send(wire.WorkerExited(worker_id="a", code=-11))
    finish(b, b"app", "g2")
    assert dispatched(b) == ["g1"]
    a.send(wire.Deliver(client=b"app", ended=[], first=["g1"]), wire.Results([wire.Text("g1", "late")]))
    started(b, b"app", "g1")
    assert [(o.id, text(o)) for o in outputs(app)] == [("g2", "done"), ("g1", "so")]


def test_the_body_is_dropped_once_the_first_output_passes(net):
    worker, app = net.worker("cpu"), net.client()
    request = generate("g1")
    submit(app, request)
    assert net.broker.routes["g1"].pending.body == wire.encode(request)
    started(worker, b"app", "g1")
    assert net.broker.routes["g1"].pending is None


def test_the_worker_names_each_request_s_first_output(net):
    from infersnap.workers.worker import Held, _deliver

    pull, push = net.zctx.socket(zmq.PULL), net.zctx.socket(zmq.PUSH)
    pull.bind("inproc://first-outputs")
    push.connect("inproc://first-outputs")
    held, clients = Held(), {"a": b"app", "b": b"app"}

    def deliver(*outputs: wire.Output) -> wire.Deliver:
        held.add(list(outputs))
        first = held.unsent()
        _deliver(held.take(), clients, push, "cpu", first)
        return wire.decode(pull.recv_multipart()[0])

    assert deliver(wire.Text("a", "x")).first == ["a"]
    # a's second output is not its first; b's first is also its last
    header = deliver(wire.Text("a", "y"), wire.Final("b", "stop", last=wire.Text("b", "z")))
    assert (header.first, header.ended) == (["b"], ["b"])


def test_reconciliation_aborts_what_a_worker_runs_that_nobody_waits_for(net):
    """After a broker restart: the worker still runs requests the new broker has no route for."""
    worker, app = net.worker("cpu", slots=4), net.client()
    submit(app, generate("mine"))
    assert dispatched(worker) == ["mine"]
    worker.send(wire.WorkerStatus(info=msgspec.structs.replace(worker.info, running=["mine", "old1", "old2"])))
    assert aborted(worker) == ["old1", "old2"]


def test_an_abort_reaches_the_worker_and_a_late_answer_is_harmless(net):
    worker, app = net.worker("cpu"), net.client()
    submit(app, generate("g1"))
    submit(app, generate("g2"))
    app.send(wire.Abort(ids=["g1", "g2"]))
    got = worker.received()
    assert [f[0].id for f in got if isinstance(f[0], wire.Dispatch)] == ["g1"]
    assert [f[0].ids for f in got if isinstance(f[0], wire.Abort)] == [["g1"]]  # g2 never left the queue
    finish(worker, b"app", "g1")  # it was already on its way
    assert net.broker.status("q").routed == [] and net.broker.workers[b"cpu"].free_slots == 1


def test_drain_refuses_new_requests_and_ends_the_rest_at_the_deadline(net):
    worker, app = net.worker("cpu", slots=1), net.client()
    submit(app, generate("running"))
    submit(app, generate("queued"))
    net.client(b"supervisor").send(wire.Drain(grace=0.0))
    submit(app, generate("late"))
    ended = {o.id: o.code for o in outputs(app)}
    assert ended == {"late": "shutting_down", "running": "shutting_down", "queued": "shutting_down"}
    assert "running" in aborted(worker)


def test_a_client_that_is_gone_loses_its_requests(net):
    worker = net.worker("cpu", slots=1)
    app = net.client(b"gone")
    submit(app, generate("g1"))
    dispatched(worker)
    app.socket.close()
    net.pump()
    finish(worker, b"gone", "g1")  # the broker cannot deliver it: the client's routes are dropped
    assert net.broker.routes == {} and net.broker.queue == {}


# Two lanes of one device, as measured on a 2-core CPU: llama.cpp ends a lone request sooner, OpenVINO
# serves many at once faster and reads prompts four times as fast.
LLAMA_SPEED = wire.Speed(levels=[Level(1, 100.0, 0.1), Level(8, 150.0, 0.5)],
                         prompts=[PromptRead(128, 1.0), PromptRead(1024, 8.0)])
OPENVINO_SPEED = wire.Speed(levels=[Level(1, 80.0, 0.1), Level(8, 400.0, 0.3)],
                            prompts=[PromptRead(128, 0.25), PromptRead(1024, 2.0)])


def lanes(net, slots: int = 8) -> tuple[Peer, Peer]:
    return (net.worker("cpu/cpu", LLAMA, slots=slots, device="cpu", speed=LLAMA_SPEED),
            net.worker("cpu/intel-cpu", OPENVINO, slots=slots, runtime="openvino", device="cpu", speed=OPENVINO_SPEED))


def test_a_lone_request_goes_to_the_lane_that_ends_it_first_and_a_long_prompt_to_the_fastest_reader(net):
    llama, openvino = lanes(net)
    app = net.client()
    submit(app, generate("short", max_tokens=128))
    assert dispatched(llama) == ["short"] and dispatched(openvino) == []
    finish(llama, b"app", "short")
    submit(app, wire.Generate(id="long", model="m", params=wire.SamplingParams(max_tokens=128), prompt="word " * 1000))
    assert dispatched(openvino) == ["long"] and dispatched(llama) == []


def test_a_burst_hands_the_cores_over_to_the_lane_that_serves_many_faster_once_the_other_drains(net):
    llama, openvino = lanes(net)
    app = net.client()
    submit(app, generate("g0", max_tokens=128))
    assert dispatched(llama) == ["g0"]
    for i in range(1, 8):
        submit(app, generate(f"g{i}", max_tokens=128))
    # the llama.cpp lane keeps a request or two, then the load says OpenVINO: llama.cpp takes no more
    # and OpenVINO waits until it has drained (two lanes never compute on the same cores at once)
    taken = dispatched(llama)
    assert len(taken) < 3 and dispatched(openvino) == []
    finish(llama, b"app", "g0", *taken)
    assert sorted(dispatched(openvino)) == sorted(f"g{i}" for i in range(1, 8) if f"g{i}" not in taken)
    submit(app, generate("g8", max_tokens=128))  # OpenVINO computes now: it keeps its turn
    assert dispatched(openvino) == ["g8"] and dispatched(llama) == []


def test_a_request_only_the_idle_lane_can_serve_waits_at_most_the_handover_time(net, monkeypatch):
    monkeypatch.setattr(lanes_module, "HANDOVER_SECONDS", 0.3)
    llama, openvino = lanes(net)
    app = net.client()
    for i in range(8):
        submit(app, generate(f"g{i}", max_tokens=128))
    finish(llama, b"app", *dispatched(llama))
    on_openvino = dispatched(openvino)
    assert on_openvino
    submit(app, generate("logprobs", max_tokens=8, logprobs=2))  # only llama.cpp has top logprobs
    submit(app, generate("later", max_tokens=128))
    assert dispatched(llama) == []  # not while OpenVINO computes ...
    assert dispatched(openvino) == []  # ... which takes no new work meanwhile, so that it drains
    time.sleep(0.35)
    net.pump()
    assert dispatched(llama) == ["logprobs"]  # past the hand-over time it computes alongside: no starving
    finish(llama, b"app", "logprobs")
    finish(openvino, b"app", *on_openvino)
    assert dispatched(openvino) + dispatched(llama) == ["later"]


def test_a_seeded_request_always_goes_to_the_same_lane(net):
    llama, openvino = lanes(net)
    app = net.client()
    for i in range(6):
        submit(app, wire.Generate(id=f"s{i}", model="m", params=wire.SamplingParams(max_tokens=128, seed=7),
                                  prompt="word " * (1 + 400 * (i % 2))))
    assert len(dispatched(llama)) == 6 and dispatched(openvino) == []


def test_a_retried_seeded_request_goes_to_the_next_lane_in_plan_order(net):
    llama, openvino = lanes(net)
    app = net.client()
    submit(app, wire.Generate(id="s", model="m", params=wire.SamplingParams(max_tokens=128, seed=7), prompt="x"))
    assert dispatched(llama) == ["s"]
    net.client(b"supervisor").send(wire.WorkerExited(worker_id="cpu/cpu", code=-11))
    assert dispatched(openvino) == ["s"] and outputs(app) == []


def test_queue_room_is_per_device_not_per_lane(net):
    llama, openvino = lanes(net, slots=1)  # a device of 1 slot: 1 running + max_waiting (2) waiting
    app = net.client()
    for i in range(4):
        submit(app, generate(f"g{i}", max_tokens=128))
    refused = [o for o in outputs(app) if isinstance(o, wire.Failure)]
    assert [o.id for o in refused] == ["g3"] and refused[0].status == 503


def test_a_burst_on_idle_lanes_is_gathered_and_goes_to_the_lane_for_many(net):
    llama, openvino = lanes(net)
    app = net.client()
    for i in range(8):  # arriving within GATHER_SECONDS, as a burst's requests do, one by one
        request = generate(f"g{i}", max_tokens=128)
        app.socket.send_multipart([wire.encode(wire.Submit(request.id, "m", routing.needs_of(request), routing.work_of(request))),
                                   wire.encode(request)])
        net.broker.poll_once(1)
    assert dispatched(openvino) == [f"g{i}" for i in range(8)] and dispatched(llama) == []


def test_a_lane_that_failed_to_load_leaves_its_device_to_the_other(net):
    llama = net.worker("cpu/cpu", LLAMA, slots=8, device="cpu", speed=LLAMA_SPEED)
    net.worker("cpu/intel-cpu", OPENVINO, slots=8, runtime="openvino", device="cpu", speed=OPENVINO_SPEED,
               state="failed")
    app = net.client()
    submit(app, wire.Generate(id="long", model="m", params=wire.SamplingParams(max_tokens=128), prompt="word " * 1000))
    for i in range(4):
        submit(app, generate(f"g{i}", max_tokens=128))
    assert dispatched(llama) == ["long", "g0", "g1", "g2", "g3"]  # what OpenVINO would win, llama.cpp serves
    assert [w.state for w in net.broker.status("q").workers] == ["ready", "failed"]


def test_a_lane_that_read_a_prompt_beginning_before_counts_it_as_cached(net):
    llama, openvino = lanes(net)
    app = net.client()
    long = "word " * 1000  # read 4x faster by OpenVINO: alone it goes there ...
    submit(app, wire.Generate(id="seeded", model="m", params=wire.SamplingParams(max_tokens=8, seed=1), prompt=long))
    assert dispatched(llama) == ["seeded"]  # ... but a seed keeps it on the first lane, whose cache now holds it
    finish(llama, b"app", "seeded")
    submit(app, wire.Generate(id="next", model="m", params=wire.SamplingParams(max_tokens=128), prompt=long + "more"))
    assert dispatched(llama) == ["next"] and dispatched(openvino) == []
    submit(app, wire.Generate(id="other", model="m", params=wire.SamplingParams(max_tokens=128), prompt="other " * 800))
    finish(llama, b"app", "next")
    assert dispatched(openvino) == ["other"]  # a beginning no lane has read goes to the faster reader


def test_a_burst_whose_requests_trickle_in_still_goes_to_the_lane_for_many(net):
    """8 clients' requests reach the broker 35 ms apart (HTTP parsing on 2 cores spreads them), and
    llama.cpp is the better lane for up to 3 streams: the first requests alone would pick it, and the rest
    follow the computing lane. They gather while they arrive, and all go where 8 end soonest."""
    few = wire.Speed(levels=[Level(1, 100.0, 0.1), Level(4, 140.0, 0.2), Level(8, 150.0, 0.5)],
                     prompts=[PromptRead(128, 0.25), PromptRead(1024, 2.0)])
    many = wire.Speed(levels=[Level(1, 60.0, 0.1), Level(4, 100.0, 0.2), Level(8, 400.0, 0.3)],
                      prompts=[PromptRead(128, 0.25), PromptRead(1024, 2.0)])
    llama = net.worker("cpu/cpu", LLAMA, slots=8, device="cpu", speed=few)
    openvino = net.worker("cpu/intel-cpu", OPENVINO, slots=8, runtime="openvino", device="cpu", speed=many)
    app = net.client()
    for i in range(8):
        request = generate(f"g{i}", max_tokens=128)
        app.socket.send_multipart([wire.encode(wire.Submit(request.id, "m", routing.needs_of(request), routing.work_of(request))),
                                   wire.encode(request)])
        deadline = time.monotonic() + 0.035
        while time.monotonic() < deadline:
            net.broker.poll_once(1)
    for _ in range(30):
        net.broker.poll_once(10)
    assert dispatched(openvino) == [f"g{i}" for i in range(8)] and dispatched(llama) == []


def test_the_lane_policy_sends_a_burst_on_an_idle_device_where_the_profiles_say_it_ends_soonest():
    from collections import Counter

    from infersnap.broker.lanes import GATHER_SECONDS, LanePolicy
    from infersnap.broker.workers import Worker

    def worker(name: str, runtime: str, speed: wire.Speed) -> Worker:
        info = wire.WorkerInfo(worker_id=name, device="cpu", engine=name, runtime=runtime, model="m", slots=8,
                               context=512, state="ready", capabilities=LLAMA, speed=speed)
        return Worker(name.encode(), info, 0.0)

    llama, openvino = worker("cpu/cpu", "llamacpp", LLAMA_SPEED), worker("cpu/intel-cpu", "openvino", OPENVINO_SPEED)
    policy = LanePolicy({w.identity: w for w in (llama, openvino)})
    work = routing.work_of(generate("g", max_tokens=128))
    assert policy.soonest([llama, openvino], work, Counter(m=1)) is llama  # alone: the lane best for one
    assert policy.soonest([llama, openvino], work, Counter(m=8)) is openvino  # eight together: the lane for many
    # while a burst still arrives on the idle device, its first request waits for the rest
    assert policy.gather_until([llama, openvino], llama, first=0.0, latest=0.1, now=0.12) == 0.1 + GATHER_SECONDS
    assert policy.gather_until([llama, openvino], llama, first=0.0, latest=0.1, now=0.2) is None  # it paused: choose
    openvino.running.add("g0")
    assert policy.gather_until([llama, openvino], llama, first=0.0, latest=0.1, now=0.12) is None  # not idle
    assert policy.soonest([llama, openvino], work, Counter(m=7)) is openvino  # the computing lane keeps its turn


def test_a_follower_is_pushed_the_status_when_a_state_changes_and_no_status_per_request(net, monkeypatch):
    """A frontend follows with one StatusQuery(follow=True); the broker pushes it a Status (id "") when a
    worker's state changes or it read the plan anew, and no Status for a request that comes and goes."""
    monkeypatch.setattr(broker_module, "KEEPALIVE_SECONDS", 60)  # out of the way: only the pushes for changes are seen
    app = net.client()
    app.send(wire.StatusQuery(id="f", follow=True))

    def pushed() -> list[wire.Status]:
        return [m for frames in app.received() for m in frames if isinstance(m, wire.Status)]

    assert [s.id for s in pushed()] == ["f", ""]  # the answer, then the first push
    worker = net.worker("cpu", state="loading")

    assert [s.workers[0].state for s in pushed()] == ["loading"]
    worker.send(wire.WorkerStatus(info=msgspec.structs.replace(worker.info, state="ready")))
    assert [(s.id, s.workers[0].state) for s in pushed()] == [("", "ready")]
    submit(app, generate("g1"))
    finish(worker, b"app", "g1")
    assert pushed() == []
    net.broker._replan(net.broker.plan)
    assert [s.replans for s in pushed()] == [1]
    assert net.broker.status("q").replans == 1
