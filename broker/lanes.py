"""Lane policy: which lane of a device a request goes to, and when it may start there.

The generating workers of one device (llama.cpp and OpenVINO on the CPU) compute on the same cores,
so they take turns. A request goes to the lane whose measured profile (WorkerInfo.speed) says it would
end the request soonest if it served its device's whole load (what runs there, what waits for it, and
this request), prompt read included; with no profile, to the least loaded. The turn: a lane starts only
while no other lane computes on its device, and a computing lane takes no new work while a request
waits for another lane of its device, so it drains and hands over. A lane other than the computing one
must win by SWITCH_MARGIN, so that near-equal guesses do not hand over on every request. A request that
waits for its lane for HANDOVER_SECONDS (HANDOVER_BESIDE_SPINNING while a lane of another model whose
runtime's threads spin computes) starts anyway, computing alongside, so none starves.

A burst's requests arrive one by one, and the first alone would pick the lane best for one, which the
rest then follow (the computing lane keeps its turn). So on an idle device with lanes to choose from,
requests gather until none has arrived for GATHER_SECONDS (at most GATHER_MOST_SECONDS after the
first), and the lane is chosen for them all. The embedding worker takes no turn: its batches are short,
so computing alongside costs less than waiting would.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

from infersnap import runtimes, wire
from infersnap.broker.workers import Worker

GATHER_SECONDS = 0.05  # a request for idle lanes waits until arrivals pause this long, so that a burst picks the burst's lane
GATHER_MOST_SECONDS = 0.25  # ... but never longer than this after the first arrived
HANDOVER_SECONDS = 2.0  # the longest a request waits for its lane while another lane computes on its cores
# ... while a lane of another model computes there whose runtime's threads spin (llama.cpp: a request of
# another model cannot go to that lane: it has only its own model's to wait for). llama.cpp's threads spin
# at each step's barrier, so sharing the cores with it costs both far more than waiting for it to drain:
# two busy models on one CPU served 0.27x the requests of one alone when they overlapped after 2 s, 0.81x
# after 8 s. OpenVINO's threads yield, and its long turns are slow to drain: overlapping after 2 s served
# 0.5x, after 8 s 0.2x (bench/models.py).
HANDOVER_BESIDE_SPINNING = 8.0
SWITCH_MARGIN = 0.8  # another lane is chosen over the computing one only if it ends the request in this share of the time
EXPECTED_TOKENS = 256  # what a request is guessed to generate, at most (many stop well before max_tokens)


class LanePolicy:
    """Chooses among the lanes of the workers it is given (the broker's, shared, as they change)."""

    def __init__(self, workers: dict[bytes, Worker]) -> None:
        self.workers = workers

    def lanes_of(self, device: str) -> list[Worker]:
        """The generating workers on a device: they take turns on its cores."""
        return [w for w in self.workers.values() if w.info.device == device and not w.embeds]

    def computing_beside(self, lane: Worker) -> list[Worker]:
        """The other lanes computing on this lane's device now."""
        if lane.embeds:
            return []
        return [w for w in self.lanes_of(lane.info.device) if w is not lane and w.running]

    def soonest(self, lanes: list[Worker], work: wire.Work, demand: Counter[str]) -> Worker:
        """The lane that would end this request first, by the lanes' profiles at their device's load
        (what runs there and what waits for its models, `demand` by model, this request among them);
        by load if one has no profile."""
        if len(lanes) == 1 or any(w.info.speed is None for w in lanes):
            return min(lanes, key=lambda w: (w.free_slots <= 0, w.load))
        tokens = min(work.max_tokens or EXPECTED_TOKENS, EXPECTED_TOKENS)

        def guess(lane: Worker) -> float:
            beside = self.lanes_of(lane.info.device)
            others = sum(len(w.running) for w in beside) + sum(demand[m] for m in {w.info.model.lower() for w in beside})
            unread = max(work.prompt_tokens - lane.cached_tokens(work.prefix), 1)
            seconds = lane.info.speed.finish_seconds(others - 1, unread, tokens)
            # the lane computing now keeps its turn unless another one wins by the margin
            return seconds / SWITCH_MARGIN if self.computing_beside(lane) else seconds

        return min(lanes, key=guess)

    def gather_until(self, able: list[Worker], lane: Worker, first: float, latest: float, now: float) -> float | None:
        """Until when a request waits before its lane is chosen (None: it does not): while lanes to choose
        from by their profiles sit on an idle device and the burst (`first` and `latest` arrival of what
        waits for them) is still arriving."""
        if len(able) < 2 or any(w.info.speed is None for w in able):
            return None
        if any(w.running for w in self.lanes_of(lane.info.device)):
            return None
        until = min(latest + GATHER_SECONDS, first + GATHER_MOST_SECONDS)
        return until if now < until else None

    def may_start(self, lane: Worker, since: float, now: float, awaited: Iterable[bytes]) -> bool:
        """Whether the lane may start a request that arrived at `since` now, by the turns the lanes of one
        device take; `awaited`: the lanes of its device that requests looked at before it wait for."""
        computing = self.computing_beside(lane)
        if computing:  # computing alongside beats starving
            spins = any(runtimes.RUNTIMES[w.info.runtime].spins and w.info.model != lane.info.model for w in computing)
            return now - since >= (HANDOVER_BESIDE_SPINNING if spins else HANDOVER_SECONDS)
        return not (lane.running and set(awaited) - {lane.identity})  # it drains, so the other lane gets its turn
