"""Worker lives: the broker alone decides when a worker's process starts, is started again, is stopped,
is quarantined, or runs on another way (issue 21's rules). The supervisor carries its Orders out and
reports each exit (wire.WorkerExited); it keeps no state of its own about a worker.

A worker runs while its model is wanted (the model scheduler). A process that ends on its own is started
again after a pause that doubles each time (0.5 s, up to MAX_BACKOFF_SECONDS), unless it died while
loading, or twice in a row within SOON_AFTER_READY of becoming ready (an engine that crashes on what it
runs): starting it again would crash again. Such a worker runs on its spec's next fallback (the next
settings of its runtime, then another runtime) where no other lane of its device serves its model;
else it is quarantined (failed, with why) until `infersnap models load` or serve starts again.
"""

from __future__ import annotations

from dataclasses import dataclass

from infersnap import wire
from infersnap.plan import WorkerSpec

MAX_BACKOFF_SECONDS = 30.0
SOON_AFTER_READY = 60.0  # a worker that dies twice in a row this soon after becoming ready is not restarted
HEALTHY_SECONDS = 60.0  # a process that ran this long counts as healthy: its next restart waits the least


@dataclass
class Life:
    start: wire.WorkerStart = wire.WorkerStart(0)  # the last start ordered
    running: bool = False  # a process of that start runs (or is starting), by what the supervisor reported
    started_at: float = 0.0
    ready_at: float = 0.0  # when it first became ready since it last started; 0: not yet
    failures: int = 0  # deaths in a row, each followed by a longer pause
    early_deaths: int = 0  # in a row, each within SOON_AFTER_READY of becoming ready
    restart_at: float = 0.0  # set: started again at this time
    quarantined: str = ""  # why it is not started again
    hung: bool = False  # it went silent: its process is stopped, then started again


class WorkerLives:
    def __init__(self) -> None:
        self.lives: dict[str, Life] = {}

    def of(self, worker_id: str) -> Life:
        return self.lives.setdefault(worker_id, Life())

    def resume(self, supervise: wire.Supervise, now: float) -> None:
        """A broker started anew goes on from the last starts (its numbers follow them), the processes that
        run, and the quarantines."""
        for worker_id, start in supervise.starts.items():
            life = self.of(worker_id)
            life.start, life.running = start, worker_id in supervise.alive
            # a process that runs is taken as ready until it says otherwise: were it to die before its first
            # heartbeat reaches this broker, that is no death while loading
            life.started_at = life.ready_at = now if life.running else 0.0
        for worker_id, why in supervise.failed.items():
            self.of(worker_id).quarantined = why

    def ready(self, worker_id: str, now: float) -> None:
        life = self.of(worker_id)
        if not life.ready_at:
            life.ready_at = now

    def orders(self, wanted: list[str], startable: set[str], now: float) -> wire.Orders:
        """What should run now, of the workers whose models are `wanted`: each gets a new start when it has
        no process, may be started (`startable`: its spec is in the plan), and is neither quarantined, nor
        hung (stopped first), nor pausing before a restart."""
        run = {}
        for worker_id in wanted:
            life = self.of(worker_id)
            if life.quarantined or life.hung:
                continue
            if not life.running:
                if life.restart_at > now or worker_id not in startable:
                    continue
                restarts = life.start.restarts + (1 if life.restart_at else 0)
                life.start = wire.WorkerStart(life.start.number + 1, life.start.fallback, restarts, life.start.settings)
                life.running, life.started_at, life.ready_at, life.restart_at = True, now, 0.0, 0.0
            run[worker_id] = life.start
        failed = {worker_id: life.quarantined for worker_id, life in self.lives.items() if life.quarantined}
        return wire.Orders(run, failed)

    def silent(self, worker_id: str) -> None:
        """It went silent while its process runs (hung): the Orders leave it out, so that it is stopped."""
        life = self.of(worker_id)
        if life.running:
            life.hung = True

    def expected(self, worker_id: str) -> bool:
        """Whether a process of this worker was ordered and not yet reported ended: an exit means something."""
        return self.of(worker_id).running

    def stopped(self, worker_id: str) -> None:
        """Its process ended after it was stopped (its model unloaded): the next load starts it afresh."""
        life = self.of(worker_id)
        life.running, life.restart_at, life.failures, life.early_deaths = False, 0.0, 0, 0

    def died(self, spec: WorkerSpec, code: int, others_serve: bool, now: float) -> tuple[str, str]:
        """Its process ended on its own: what comes next, and in words. ("restart", ""): after a pause;
        ("fallback", what): at once, the next way of its spec, where no other lane of its device
        (`others_serve`) serves its model; ("quarantine", why): not again until lifted."""
        life = self.of(spec.worker_id)
        life.running = False
        if life.hung:  # stopped because it went silent: started again at once, counted
            life.hung, life.restart_at = False, now
            return "restart", ""
        if now - life.started_at > HEALTHY_SECONDS:
            life.failures = 0
        why = self._quarantine(life, spec, code, now)
        if not why:
            life.failures += 1
            life.restart_at = now + min(MAX_BACKOFF_SECONDS, 0.5 * 2 ** (life.failures - 1))
            return "restart", ""
        if not others_serve and life.start.fallback < len(spec.fallbacks):
            engine, label = spec.way(life.start.fallback)
            crashed = f"{engine} {label}: {why.split(';')[0].removeprefix('its process ')}"
            way = spec.fallbacks[life.start.fallback]
            life.start = wire.WorkerStart(life.start.number, life.start.fallback + 1, life.start.restarts,
                                          f"{way.note} (instead of {crashed})")
            life.early_deaths, life.restart_at = 0, now  # at once, and counted as a restart
            return "fallback", f"{crashed}; it runs on as {way.engine} with the settings {way.options.label}"
        life.quarantined = why
        return "quarantine", why

    @staticmethod
    def _quarantine(life: Life, spec: WorkerSpec, code: int, now: float) -> str:
        """Why starting it again would crash again ("" if it may be restarted)."""
        if not life.ready_at:
            return f"its process {wire.exit_words(code)} while loading the model; it is not restarted"
        life.early_deaths = life.early_deaths + 1 if now - life.ready_at < SOON_AFTER_READY else 0
        if life.early_deaths < 2:
            return ""
        return (f"its process {wire.exit_words(code)} twice within {SOON_AFTER_READY:.0f} s of becoming ready; "
                f"it is not restarted until `infersnap models load {spec.model}` or serve starts again")

    def lift(self, worker_id: str) -> None:
        """`infersnap models load` tries a quarantined worker afresh."""
        life = self.of(worker_id)
        life.quarantined, life.failures, life.early_deaths, life.restart_at = "", 0, 0, 0.0
