"""The model scheduler: which models are loaded, within each device's memory budget and `max_loaded`.

A model is loaded on demand: a request for one that is not loaded waits in the broker's queue while
the scheduler wants it (the supervisor starts the workers of every wanted model, and stops the others),
once it fits: the least recently used idle models on that device are unloaded first. A model that
could not fit even then is refused with 507 at once. A model idle for its keep-alive (the last
request's, or its own) is unloaded; -1 keeps it. A model none of whose workers could load is failed
with why, and not tried again until a ModelControl loads it. It runs when a model's or a worker's state
changes, a request for a model not loaded arrives, or a request ends, and once a second for keep-alives:
never per heartbeat or per dispatch.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass

import msgspec

from infersnap import wire
from infersnap.broker.lives import WorkerLives
from infersnap.broker.workers import UNLOADED, UNLOADING, Worker
from infersnap.plan import ModelSpec, ServePlan, announced

log = logging.getLogger("infersnap.broker")


@dataclass
class Model:
    """A model of the plan as the broker schedules it: loaded on demand, unloaded once idle."""

    spec: ModelSpec
    keep_alive: int  # seconds it stays loaded once idle: its last request's, or its own
    wanted: bool = False  # its workers should run (the supervisor starts them)
    requested: bool = False  # a ModelControl asked to load it: it loads once it fits, as a queued request would
    last_used: float = 0.0  # when a request of it last started or ended, or it was loaded
    failed: str = ""  # why none of its workers could load; it is not loaded again until asked to
    removed: bool = False  # gone from the catalog: no new request; forgotten once unloaded


class ModelScheduler:
    """Owns the models' states, the worker states that follow from them (unloaded, loading, unloading), and
    the workers' lives (broker/lives.py): which processes run."""

    def __init__(self, plan: ServePlan, workers: dict[bytes, Worker], queued: Counter[str]) -> None:
        """`workers`: the broker's, shared; `queued`: its count of queued requests by model (lowercase)."""
        self.plan, self.workers, self.queued = plan, workers, queued
        self.lives = WorkerLives()
        self.models = {m.name.lower(): Model(m, m.keep_alive) for m in plan.models}
        now = time.monotonic()
        for spec in plan.workers:  # an entry for each, running or not, so that status and routing know them all
            identity = spec.worker_id.encode()
            self.workers[identity] = Worker(identity, announced(plan, spec, state=UNLOADED), now)
        if plan.models:
            self._want(self.models[plan.default_model.name.lower()], now)

    def get(self, name: str) -> Model | None:
        return self.models.get(name.lower())

    def workers_of(self, model: Model) -> list[Worker]:
        name = model.spec.name.lower()
        return [w for w in self.workers.values() if w.info.model.lower() == name]

    def wanted(self, worker: Worker) -> bool:
        model = self.models.get(worker.info.model.lower())
        return model is None or model.wanted

    def used(self, name: str) -> None:
        model = self.models.get(name.lower())
        if model is not None:
            model.last_used = time.monotonic()

    def busy(self, model: Model) -> bool:
        return self.queued[model.spec.name.lower()] > 0 or any(w.running or w.lookups for w in self.workers_of(model))

    def _settled(self, model: Model) -> bool:
        """Whether every worker of the model has loaded or failed: one still loading is not idle."""
        return all(w.info.state in ("ready", "failed") for w in self.workers_of(model))

    def _want(self, model: Model, now: float) -> None:
        """Load the model: the supervisor starts its workers, which count as loading until they say more."""
        log.info("loading model %s", model.spec.name)
        model.wanted, model.requested, model.last_used = True, False, now
        for worker in self.workers_of(model):
            if worker.info.state in (UNLOADED, "failed"):
                self.lives.lift(worker.info.worker_id)  # a load tries a quarantined worker afresh
                worker.info = msgspec.structs.replace(worker.info, state="loading", error="")

    def running_anyway(self, model: Model) -> None:
        """A worker of a model not wanted announced itself (a broker restarted beside it): it counts as loaded."""
        if not model.wanted and not model.failed:
            self._want(model, time.monotonic())

    def orders(self, now: float) -> wire.Orders:
        """The worker processes that should run now: those of the wanted models, as their lives allow. A
        removed model's worker runs on until its model is unloaded, but is never started again: the plan
        file it would read has no spec of it."""
        wanted = [w.info.worker_id for w in self.workers.values() if self.wanted(w) and w.info.state != UNLOADING]
        return self.lives.orders(wanted, {spec.worker_id for spec in self.plan.workers}, now)

    def _unload(self, model: Model, why: str) -> None:
        """Stop the model's workers (the supervisor ends their processes); a failed one keeps its reason."""
        log.info("unloading model %s: %s", model.spec.name, why)
        model.wanted = False
        for worker in self.workers_of(model):
            if worker.info.state == "failed":
                continue
            worker.info = msgspec.structs.replace(worker.info, state=UNLOADING if worker.info.pid else UNLOADED)

    def _leaving(self, model: Model) -> bool:
        """Whether processes of the model's are still ending after an unload."""
        return any(w.info.state == UNLOADING for w in self.workers_of(model))

    def _holds(self, model: Model, device: str) -> bool:
        """Whether the model holds memory on the device: loaded or loading, or its processes not ended yet."""
        return device in model.spec.memory and (model.wanted or self._leaving(model))

    def _evictable(self, model: Model) -> bool:
        return model.wanted and model.keep_alive != -1 and self._settled(model) and not self.busy(model)

    def _fits(self, need: int, device: str, beside: list[Model]) -> bool:
        budget = self.plan.budgets.get(device, 0)
        used = sum(m.spec.memory.get(device, 0) for m in beside)
        return (not budget or used + need <= budget) and len(beside) < self.plan.max_loaded

    def never_fits(self, model: Model) -> str | None:
        """Why the model cannot load even with every model that may be unloaded gone; None if it can."""
        for device, need in model.spec.memory.items():
            kept = [m for m in self.models.values() if m is not model and m.wanted and m.keep_alive == -1
                    and device in m.spec.memory]
            if self._fits(need, device, kept):
                continue
            budget = self.plan.budgets.get(device, 0)
            if len(kept) >= self.plan.max_loaded:
                return (f"the model '{model.spec.name}' cannot be loaded on {device}: models.max-loaded is "
                        f"{self.plan.max_loaded} and the models kept loaded there ({', '.join(m.spec.name for m in kept)}) "
                        "have a keep-alive of -1")
            free = budget - sum(m.spec.memory.get(device, 0) for m in kept)
            return (f"the model '{model.spec.name}' needs about {need >> 20} MiB on {device} (weights and KV cache "
                    f"at context {model.spec.context}), more than the {max(free, 0) >> 20} MiB of its memory budget "
                    f"of {budget >> 20} MiB that can be freed for it (models.memory-budget; a smaller context or "
                    "fewer slots make it smaller)")
        return None

    def _make_room(self, model: Model) -> bool:
        """Whether the model may load now beside what is loaded on each of its devices. If not, the least
        recently used idle models that make it fit there are unloaded; it loads once their processes end."""
        now_fits = True
        for device, need in model.spec.memory.items():
            held = [m for m in self.models.values() if m is not model and self._holds(m, device)]
            staying = [m for m in held if m.wanted]
            leaving = len(staying) < len(held)
            victims = sorted((m for m in staying if self._evictable(m)), key=lambda m: m.last_used)
            while not self._fits(need, device, staying) and victims:
                victim = victims.pop(0)
                self._unload(victim, f"to make room for {model.spec.name} on {device}")
                staying.remove(victim)
                leaving = True
            # busy models in the way: it waits for them to go idle (its requests' timeout bounds the wait)
            now_fits = now_fits and self._fits(need, device, staying) and not leaving
        return now_fits

    def load_failure(self, name: str) -> str | None:
        """Why the model cannot serve at all (every worker of it failed to load), or None."""
        failed = [w.info for w in self.workers.values() if w.info.model.lower() == name.lower()]
        if failed and all(w.state == "failed" for w in failed):
            reasons = "; ".join(f"{w.worker_id}: {w.error}" for w in failed)
            return f"no worker could load this model ({reasons})"
        return None

    def schedule(self, now: float) -> None:
        """Load the models requests wait for (as memory allows), fail those none of whose workers loaded,
        and unload those idle past their keep-alive."""
        for name, model in self.models.items():
            # not while its own processes are ending: the supervisor must see it unwanted to end them
            if ((self.queued[name] or model.requested) and not model.wanted and not model.failed
                    and not self._leaving(model) and self._make_room(model)):
                self._want(model, now)
        for model in self.models.values():
            if not model.wanted:
                continue
            failure = self.load_failure(model.spec.name)
            if failure:
                model.failed = failure
                log.error("model %s failed to load: %s", model.spec.name, model.failed)
                self._unload(model, "no worker of it could load")
            elif (model.keep_alive >= 0 and self._settled(model) and not self.busy(model)
                  and now - model.last_used >= model.keep_alive):
                why = "removed from the catalog" if model.removed else f"idle for {model.keep_alive} s (its keep-alive)"
                self._unload(model, why)
        for name, model in list(self.models.items()):
            if model.removed and not model.wanted and not self._leaving(model) and not self.busy(model):
                log.info("model %s is forgotten: removed from the catalog, and unloaded", model.spec.name)
                for worker in self.workers_of(model):
                    del self.workers[worker.identity]
                del self.models[name]

    def replan(self, plan: ServePlan) -> None:
        """The catalog changed while serving: each model added gets its entries, unloaded; a model removed
        takes no new request, and is unloaded and forgotten once those it accepted have ended."""
        self.plan, now = plan, time.monotonic()
        for spec in plan.models:
            model = self.models.get(spec.name.lower())
            if model is None:
                log.info("model %s was added to the catalog", spec.name)
                self.models[spec.name.lower()] = Model(spec, spec.keep_alive)
            else:  # the same spec; or its file moved (a new path); or it is back before it was forgotten
                if model.removed:
                    model.keep_alive = spec.keep_alive
                model.spec, model.removed = spec, False
        for spec in plan.workers:
            identity = spec.worker_id.encode()
            if identity not in self.workers:
                self.workers[identity] = Worker(identity, announced(plan, spec, state=UNLOADED), now)
        names = {spec.name.lower() for spec in plan.models}
        for name, model in self.models.items():
            if name not in names and not model.removed:
                log.info("model %s was removed from the catalog; it is unloaded once its requests end", model.spec.name)
                model.removed, model.requested, model.keep_alive = True, False, 0

    def control(self, control: wire.ModelControl) -> wire.Failure | None:
        """Load a model now, or unload it once idle; a refusal (507), or None once done (the load goes on)."""
        model = self.models[control.model.lower()]
        if not control.load:
            model.keep_alive, model.requested = 0, False  # as a request with keep_alive 0: gone once idle
            return None
        model.keep_alive = model.spec.keep_alive if control.keep_alive is None else control.keep_alive
        if not model.wanted:
            too_big = self.never_fits(model)
            if too_big:
                return wire.failed(control.id, 507, too_big, code="model_too_large", param="model")
            if model.failed:  # asked by name: it is tried again
                model.failed = ""
                for worker in self.workers_of(model):
                    self.lives.lift(worker.info.worker_id)
                    worker.info = msgspec.structs.replace(worker.info, state=UNLOADED, error="", pid=0)
            model.requested = True
        else:  # loaded: a lane failed or quarantined beside the others is tried again
            for worker in self.workers_of(model):
                if worker.info.state == "failed":
                    self.lives.lift(worker.info.worker_id)
                    worker.info = msgspec.structs.replace(worker.info, state="loading", error="", pid=0)
        model.last_used = time.monotonic()
        return None

    def state_of(self, model: Model, now: float) -> wire.ModelState:
        workers = self.workers_of(model)
        if model.failed:
            state = "failed"
        elif any(w.info.state == "ready" for w in workers):
            state = "loaded"
        elif model.wanted:
            state = "loading"
        elif any(w.info.state == UNLOADING for w in workers):
            state = UNLOADING
        else:
            state = UNLOADED
        idle = now - model.last_used if state == "loaded" and not self.busy(model) else None
        spec = model.spec
        return wire.ModelState(spec.name, state, model.failed, model.wanted, model.keep_alive, idle,
                               spec.context, spec.context_note, spec.left_out, self.queued[spec.name.lower()])
