"""The broker's model scheduling, without processes: load on demand, the memory budget, keep-alive and
failed models, with the workers played by DEALER sockets (as in test_broker) and the supervisor's part
(starting and stopping processes) played by the test: it announces a worker when the broker wants its
model, and reports its exit when the broker unloads it."""

from __future__ import annotations

import itertools
import time

import msgspec
import pytest
import zmq

from infersnap import plan as serve_plan
from infersnap import wire
from infersnap.broker.broker import Broker
from infersnap.plan import ModelSpec, ServePlan, WorkerSpec
from test_broker import Net, dispatched, finish, outputs, submit

MIB = 1 << 20
_addresses = itertools.count()


def model(name: str, mib: int, keep_alive: int = 300) -> ModelSpec:
    return ModelSpec(name, f"{name}.gguf", 512, keep_alive=keep_alive, memory={"cpu": mib * MIB})


def broker_net(models: list[ModelSpec], budget_mib: int = 0, max_loaded: int = 3):
    zctx = zmq.Context()
    prefix = f"inproc://models-test-{next(_addresses)}"
    specs = [WorkerSpec(f"cpu@{m.name}", "cpu", "cpu", "llamacpp", [0], 1, 1, model=m.name) for m in models]
    plan = ServePlan(host="127.0.0.1", port=0, max_body_bytes=1 << 20, models=models, max_waiting=4,
                     request_timeout=0, verbose=False, workers=specs,
                     budgets={"cpu": budget_mib * MIB} if budget_mib else {}, max_loaded=max_loaded)
    broker = Broker(plan, zctx=zctx, address=lambda name: f"{prefix}-{name}")
    return Net(broker, zctx, prefix), zctx


@pytest.fixture()
def three():
    """The default model (kept loaded) and two more, with room for two of them in the budget."""
    net, zctx = broker_net([model("main", 100, keep_alive=-1), model("a", 100), model("b", 100)], budget_mib=250)
    yield net
    zctx.destroy(linger=0)


def states(net: Net) -> dict[str, str]:
    return {m.name: m.state for m in net.broker.status("q").models}


def wanted(net: Net) -> set[str]:
    return {m.name for m in net.broker.status("q").models if m.wanted}


def start(net: Net, name: str, state: str = "ready", error: str = ""):
    """What the supervisor does for a wanted model: its worker's process starts and announces itself."""
    peer = net.worker(f"cpu@{name}", model=name, device="cpu", state=state, pid=100 + len(name), error=error)
    return peer


def stop(net: Net, name: str) -> None:
    """What the supervisor does for a model no longer wanted: its worker's process ends."""
    net.client(b"supervisor").send(wire.WorkerExited(f"cpu@{name}", 0))


def test_the_default_model_is_wanted_at_start_and_the_others_are_listed_unloaded(three):
    assert wanted(three) == {"main"}
    assert states(three) == {"main": "loading", "a": "unloaded", "b": "unloaded"}
    start(three, "main")
    assert states(three)["main"] == "loaded"
    assert [w.worker_id for w in three.broker.status("q").workers] == ["cpu@main"]  # no entry for what is not loaded


def test_a_request_for_an_unloaded_model_waits_while_it_loads_then_runs(three):
    app = three.client()
    submit(app, wire.Generate(id="g1", model="A", params=wire.SamplingParams(), prompt="x"))
    assert outputs(app) == [] and wanted(three) == {"main", "a"} and states(three)["a"] == "loading"
    worker = start(three, "a")
    assert dispatched(worker) == ["g1"]


def test_an_idle_model_is_unloaded_after_its_keep_alive_and_loads_again_when_asked(three):
    app = three.client()
    request = wire.Generate(id="g1", model="a", params=wire.SamplingParams(), prompt="x", keep_alive=0)
    submit(app, request)
    worker = start(three, "a")
    assert dispatched(worker) == ["g1"]
    assert states(three)["a"] == "loaded"  # busy: never unloaded under a running request
    finish(worker, b"app", "g1")
    three.pump()
    assert states(three)["a"] == "unloading" and "a" not in wanted(three)
    stop(three, "a")
    assert states(three)["a"] == "unloaded"
    submit(app, msgspec.structs.replace(request, id="g2"))
    assert "a" in wanted(three)
    assert dispatched(start(three, "a")) == ["g2"]


def test_a_model_that_does_not_fit_unloads_the_least_recently_used_idle_one_first(three):
    app = three.client()
    for name in ("a", "b"):
        submit(app, wire.Generate(id=f"to-{name}", model=name, params=wire.SamplingParams(), prompt="x"))
        worker = start(three, name) if name == "a" else None
        if worker is not None:
            assert dispatched(worker) == ["to-a"]
            finish(worker, b"app", "to-a")
    # main (100, kept) + a (100) + b (100) > 250: a, idle, makes room; b waits until a's process has ended
    three.pump()
    assert states(three)["a"] == "unloading" and "b" not in wanted(three)
    stop(three, "a")
    assert "b" in wanted(three)
    assert dispatched(start(three, "b")) == ["to-b"]
    assert states(three) == {"main": "loading", "a": "unloaded", "b": "loaded"}


def test_a_busy_model_is_not_unloaded_the_newcomer_waits_for_it_to_go_idle(three):
    app = three.client()
    submit(app, wire.Generate(id="long", model="a", params=wire.SamplingParams(), prompt="x"))
    worker = start(three, "a")
    assert dispatched(worker) == ["long"]
    submit(app, wire.Generate(id="to-b", model="b", params=wire.SamplingParams(), prompt="x"))
    three.pump()
    assert states(three)["a"] == "loaded" and "b" not in wanted(three) and outputs(app) == []
    finish(worker, b"app", "long")
    three.pump()
    assert states(three)["a"] == "unloading"


def test_a_model_too_big_for_the_budget_is_refused_with_507_and_nothing_else_is_disturbed():
    net, zctx = broker_net([model("main", 100, keep_alive=-1), model("huge", 400)], budget_mib=300)
    try:
        main = start(net, "main")
        app = net.client()
        submit(app, wire.Generate(id="g1", model="huge", params=wire.SamplingParams(), prompt="x"))
        [refused] = outputs(app)
        assert (refused.status, refused.code) == (507, "model_too_large")
        assert "400 MiB" in refused.message and "models.memory-budget" in refused.message
        assert wanted(net) == {"main"}
        submit(app, wire.Generate(id="g2", model="main", params=wire.SamplingParams(), prompt="x"))
        assert dispatched(main) == ["g2"]
    finally:
        zctx.destroy(linger=0)


def test_max_loaded_bounds_the_models_per_device(three):
    net, zctx = broker_net([model("main", 1, keep_alive=-1), model("a", 1)], max_loaded=1)
    try:
        app = net.client()
        submit(app, wire.Generate(id="g1", model="a", params=wire.SamplingParams(), prompt="x"))
        [refused] = outputs(app)
        assert refused.status == 507 and "models.max-loaded" in refused.message
    finally:
        zctx.destroy(linger=0)


def test_a_model_none_of_whose_workers_can_load_is_failed_and_not_tried_again_until_asked(three):
    app = three.client()
    submit(app, wire.Generate(id="g1", model="a", params=wire.SamplingParams(), prompt="x"))
    start(three, "a", state="failed", error="not a GGUF file")
    [failed] = outputs(app)
    assert failed.status == 503 and "not a GGUF file" in failed.message
    status = {m.name: m for m in three.broker.status("q").models}["a"]
    assert status.state == "failed" and "not a GGUF file" in status.error and not status.wanted
    stop(three, "a")  # the supervisor ends its process: it stays failed
    submit(app, wire.Generate(id="g2", model="a", params=wire.SamplingParams(), prompt="x"))
    [again] = outputs(app)
    assert again.status == 503 and "a" not in wanted(three)  # not loaded again by a request
    three.client(b"cli").send(wire.ModelControl("c1", "a", load=True))
    assert "a" in wanted(three) and states(three)["a"] == "loading"  # asked by name: tried again


def test_model_control_loads_now_and_unloads_once_idle(three):
    cli = three.client(b"cli")
    cli.send(wire.ModelControl("c1", "b", load=True, keep_alive=-1))
    [done] = outputs(cli)
    assert done.finish_reason == "stop" and "b" in wanted(three)
    start(three, "b")
    time.sleep(0.05)
    three.pump()
    assert states(three)["b"] == "loaded"  # keep-alive -1: it stays
    cli.send(wire.ModelControl("c2", "b", load=False))
    assert outputs(cli)[0].finish_reason == "stop" and states(three)["b"] == "unloading"
    cli.send(wire.ModelControl("c3", "nope", load=True))
    [unknown] = outputs(cli)
    assert unknown.status == 404 and "main, a, b" in unknown.message


def test_keep_alive_counts_from_when_the_model_is_ready_not_from_when_its_load_was_asked(three):
    cli = three.client(b"cli")
    cli.send(wire.ModelControl("c1", "b", load=True, keep_alive=1))
    assert outputs(cli)[0].finish_reason == "stop"
    time.sleep(1.2)  # a load slower than the keep-alive
    start(three, "b")
    three.pump()
    assert states(three)["b"] == "loaded"  # not unloaded the moment it could serve
    time.sleep(1.1)
    three.pump()
    assert "b" not in wanted(three)  # idle for its keep-alive since then


def test_a_model_asked_for_while_its_processes_end_loads_again_once_they_have(three):
    # its processes must be seen unwanted and end; wanting it back at once would leave them unloading forever
    app = three.client()
    request = wire.Generate(id="g1", model="a", params=wire.SamplingParams(), prompt="x", keep_alive=0)
    submit(app, request)
    worker = start(three, "a")
    assert dispatched(worker) == ["g1"]
    finish(worker, b"app", "g1")
    submit(app, msgspec.structs.replace(request, id="g2"))
    assert states(three)["a"] == "unloading" and "a" not in wanted(three)
    stop(three, "a")
    assert "a" in wanted(three)
    assert dispatched(start(three, "a")) == ["g2"]


def test_a_model_waits_longer_for_a_busy_llamacpp_model_on_its_cores_before_computing_alongside(three, monkeypatch):
    from infersnap.broker import lanes as lanes_module

    monkeypatch.setattr(lanes_module, "HANDOVER_SECONDS", 0.1)
    monkeypatch.setattr(lanes_module, "HANDOVER_BESIDE_SPINNING", 1.5)
    app = three.client()
    main = start(three, "main")  # llama.cpp, on the cpu
    submit(app, wire.Generate(id="busy", model="main", params=wire.SamplingParams(), prompt="x"))
    assert dispatched(main) == ["busy"]
    submit(app, wire.Generate(id="other", model="a", params=wire.SamplingParams(), prompt="x"))
    worker = start(three, "a")
    time.sleep(0.3)
    three.pump()
    assert dispatched(worker) == []  # past the plain hand-over time: still waiting for main to drain
    time.sleep(1.3)
    three.pump()
    assert dispatched(worker) == ["other"]  # no starving


def test_a_model_added_to_the_plan_file_is_served_and_a_removed_one_ends_its_requests_then_is_forgotten(
        three, tmp_path):
    """What the supervisor does when a model file appears and another goes: it writes the plan anew."""
    path = tmp_path / "plan.json"
    serve_plan.write(three.broker.plan, path)
    three.broker.plan_file = serve_plan.PlanFile(path)
    app = three.client()
    submit(app, wire.Generate(id="on-a", model="a", params=wire.SamplingParams(), prompt="x"))
    worker_a = start(three, "a")
    assert dispatched(worker_a) == ["on-a"]
    plan = three.broker.plan
    added = model("c", 50)
    serve_plan.write(msgspec.structs.replace(
        plan, models=[*(m for m in plan.models if m.name != "a"), added],
        workers=[*(w for w in plan.workers if w.model != "a"),
                 WorkerSpec("cpu@c", "cpu", "cpu", "llamacpp", [0], 1, 1, model="c")]), path)
    three.client(b"supervisor").send(wire.PlanChanged())
    assert states(three) == {"main": "loading", "b": "unloaded", "c": "unloaded"}  # "a" is not served now
    submit(app, wire.Generate(id="late", model="a", params=wire.SamplingParams(), prompt="x"))
    [refused] = outputs(app)
    assert refused.status == 404 and "'a' does not exist" in refused.message
    assert "c" in refused.message and ", a," not in refused.message
    finish(worker_a, b"app", "on-a")  # the request it accepted ends with its answer
    assert [o.id for o in outputs(app)] == ["on-a"]
    three.pump()
    [a_worker] = [w for w in three.broker.status("q").workers if w.model == "a"]
    assert a_worker.state == "unloading" and "a" not in wanted(three)  # its process is asked to end
    stop(three, "a")
    three.pump()
    assert set(states(three)) == {"main", "b", "c"}
    assert b"cpu@a" not in three.broker.workers
    worker_a.send(wire.WorkerStatus(info=worker_a.info))  # its last heartbeat does not bring it back
    assert b"cpu@a" not in three.broker.workers
    submit(app, wire.Generate(id="on-c", model="c", params=wire.SamplingParams(), prompt="x"))
    assert "c" in wanted(three)
    assert dispatched(start(three, "c")) == ["on-c"]


def test_the_broker_reads_the_plan_when_told_and_its_followers_learn_it_at_once(three, tmp_path):
    """The supervisor tells the broker when it wrote the plan anew; the broker reads it and moves the
    replans of the Status it pushes, on which the frontend reads the file too: both agree on a model
    added and on one removed, and neither looks at the file between changes."""
    path = tmp_path / "plan.json"
    plan = three.broker.plan
    serve_plan.write(plan, path)
    three.broker.plan_file = serve_plan.PlanFile(path)
    frontend = three.client(b"frontend")
    frontend.send(wire.StatusQuery(id="f", follow=True))
    status = frontend.received()[-1][0]
    version = status.replans
    serve_plan.write(msgspec.structs.replace(
        plan, models=[*plan.models, model("c", 50)],
        workers=[*plan.workers, WorkerSpec("cpu@c", "cpu", "cpu", "llamacpp", [0], 1, 1, model="c")]), path)
    three.client(b"supervisor").send(wire.PlanChanged())
    pushed = [m for [m] in frontend.received() if isinstance(m, wire.Status)]
    assert pushed and pushed[-1].replans > version and "c" in {m.name for m in pushed[-1].models}
    app = three.client()
    submit(app, wire.Generate(id="on-c", model="c", params=wire.SamplingParams(), prompt="x"))
    assert "c" in wanted(three)
    assert dispatched(start(three, "c")) == ["on-c"]
    submit(app, wire.Generate(id="none", model="nowhere", params=wire.SamplingParams(), prompt="x"))
    [refused] = outputs(app)
    assert refused.status == 404 and "'nowhere' does not exist" in refused.message
    serve_plan.write(msgspec.structs.replace(  # "b" removed
        three.broker.plan, models=[m for m in three.broker.plan.models if m.name != "b"],
        workers=[w for w in three.broker.plan.workers if w.model != "b"]), path)
    three.client(b"supervisor").send(wire.PlanChanged())
    submit(app, wire.Generate(id="on-b", model="b", params=wire.SamplingParams(), prompt="x"))
    [refused] = outputs(app)
    assert refused.status == 404 and "'b' does not exist" in refused.message


# --- worker lives: the broker orders, the supervisor carries out ---------------------------------------


def orders(supervisor) -> list[wire.Orders]:
    return [m for [m] in supervisor.received() if isinstance(m, wire.Orders)]


def test_the_broker_orders_the_wanted_models_workers_restarts_a_crash_after_a_pause_and_stops_the_unloaded(three):
    supervisor = three.client(b"supervisor")
    supervisor.send(wire.Supervise())
    [first] = orders(supervisor)
    assert first.run == {"cpu@main": wire.WorkerStart(1)} and first.failed == {}
    worker = start(three, "main")
    supervisor.send(wire.WorkerExited("cpu@main", -9))  # it had been ready: restarted, after a pause
    assert orders(supervisor) in ([], [wire.Orders({})])
    time.sleep(0.6)
    three.pump()
    [again] = orders(supervisor)[-1:]
    assert again.run["cpu@main"].number == 2 and again.run["cpu@main"].restarts == 1
    submit(three.client(), wire.Generate(id="on-a", model="a", params=wire.SamplingParams(), prompt="x"))
    assert set(orders(supervisor)[-1].run) == {"cpu@main", "cpu@a"}  # a request loads its model
    del worker


def test_a_worker_that_dies_while_loading_is_quarantined_and_a_broker_started_anew_keeps_it(three):
    supervisor = three.client(b"supervisor")
    supervisor.send(wire.Supervise())
    orders(supervisor)
    supervisor.send(wire.WorkerExited("cpu@main", -11))  # never announced itself ready
    [quarantined] = orders(supervisor)
    assert "cpu@main" not in quarantined.run and "while loading" in quarantined.failed["cpu@main"]
    [worker] = [w for w in three.broker.status("q").workers if w.worker_id == "cpu@main"]
    assert worker.state == "failed" and "SIGSEGV while loading" in worker.error
    # what a new broker is handed back: the quarantine holds, no start is ordered
    fresh, zctx = broker_net([model("main", 100, keep_alive=-1)])
    try:
        newcomer = fresh.client(b"supervisor")
        newcomer.send(wire.Supervise(failed=quarantined.failed))
        [resumed] = orders(newcomer)
        assert resumed.run == {} and resumed.failed == quarantined.failed
        assert fresh.broker.status("q").workers[0].state == "failed"
    finally:
        zctx.destroy(linger=0)


def test_a_lane_alone_that_crashes_soon_after_ready_twice_runs_on_its_next_fallback():
    from infersnap.plan import Fallback
    from infersnap.profiles import EngineOptions

    net, zctx = broker_net([model("main", 100, keep_alive=-1)])
    try:
        spec = net.broker.plan.workers[0]
        way = Fallback("cpu", "llamacpp", EngineOptions(repack=False), note="no-repack")
        net.broker.scheduler.plan = msgspec.structs.replace(
            net.broker.plan, workers=[msgspec.structs.replace(spec, fallbacks=[way])])
        supervisor = net.client(b"supervisor")
        supervisor.send(wire.Supervise())
        for number in (1, 2):
            assert orders(supervisor)[-1].run["cpu@main"].number == number
            start(net, "main")
            supervisor.send(wire.WorkerExited("cpu@main", -11))
            time.sleep(0.6)  # past the first restart's pause
            net.pump()
        [fell_back] = orders(supervisor)[-1:]
        run = fell_back.run["cpu@main"]
        assert run.number == 3 and run.fallback == 1 and run.restarts == 2
        assert run.settings.startswith("no-repack (instead of cpu default: was killed by SIGSEGV twice within 60 s")
        assert net.broker.plan.workers[0].started(run).options == EngineOptions(repack=False)
    finally:
        zctx.destroy(linger=0)


def test_a_broker_started_anew_numbers_starts_after_the_supervisors_and_keeps_what_runs_loaded(three):
    """The supervisor hands back every worker's last start: one that ran and ended (its model unloaded
    before the broker restarted) gets a new number when loaded again, not one it already ran; one whose
    process runs keeps its model loaded, even before its first heartbeat reaches the new broker."""
    supervisor = three.client(b"supervisor")
    supervisor.send(wire.Supervise(starts={"cpu@main": wire.WorkerStart(3), "cpu@a": wire.WorkerStart(1),
                                           "cpu@b": wire.WorkerStart(2)}, alive=["cpu@main", "cpu@b"]))
    [resumed] = orders(supervisor)[-1:]
    assert resumed.run == {"cpu@main": wire.WorkerStart(3), "cpu@b": wire.WorkerStart(2)}
    assert "b" in wanted(three)
    start(three, "b")  # its heartbeat: ready, idle, so it may make room (the budget holds two)
    submit(three.client(), wire.Generate(id="on-a", model="a", params=wire.SamplingParams(), prompt="x"))
    assert "cpu@b" not in orders(supervisor)[-1].run  # unloaded for "a" ...
    supervisor.send(wire.WorkerExited("cpu@b", 0))
    assert orders(supervisor)[-1].run["cpu@a"] == wire.WorkerStart(2)  # ... which loads on a start not run yet
