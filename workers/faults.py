"""A test hook: a worker or a probe kills itself with SIGSEGV at a chosen point, as a runtime's native code
does on some machines (ggml's AMX kernels on Sapphire Rapids), so that the crash handling is tested for
real on any machine. Only workers and probes read it; unset, it costs one dict lookup per process.

    INFERSNAP_FAULT="at=load engine=cpu variant=default; at=request after=2 model=gemma"

Rules are separated by ';', each made of KEY=VALUE words:
- at: `load` (while the engine loads), `step` (at its first step with work), or `request` (when the
  `after`-th request, 1 by default, reaches the engine: before any output of it);
- engine, variant (EngineOptions.label: default, no-repack, ...), model (a part of the model file's path),
  task (generate, embed) and in (worker, probe) limit a rule; left out, any matches.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

VARIABLE = "INFERSNAP_FAULT"
POINTS = ("load", "step", "request")
LIMITS = ("engine", "variant", "model", "task", "in")


class FaultRuleError(ValueError):
    pass


@dataclass(frozen=True)
class Rule:
    at: str
    after: int = 1
    limits: tuple[tuple[str, str], ...] = ()

    def matches(self, facts: dict[str, str]) -> bool:
        for name, wanted in self.limits:
            have = facts.get(name, "")
            if (wanted not in have) if name == "model" else (wanted != have):
                return False
        return True


def parse(text: str) -> list[Rule]:
    rules = []
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        words = dict(word.partition("=")[::2] for word in part.split())
        at = words.pop("at", "")
        after = words.pop("after", "1")
        if at not in POINTS or not after.isdigit() or any(name not in LIMITS for name in words):
            raise FaultRuleError(f"{VARIABLE}: cannot read {part!r} (see infersnap/workers/faults.py)")
        rules.append(Rule(at, int(after), tuple(sorted(words.items()))))
    return rules


class Fault:
    """The rules that apply to one engine in this process, and the points they crash it at."""

    def __init__(self, where: str, engine: str, variant: str, model: str, task: str) -> None:
        text = os.environ.get(VARIABLE, "")
        facts = {"in": where, "engine": engine, "variant": variant, "model": model, "task": task}
        self.rules = [r for r in parse(text) if r.matches(facts)] if text else []
        self.requests = 0
        self.stepped = False

    def loading(self) -> None:
        self._crash_if("load", 0)

    def request(self) -> None:
        if self.rules:
            self.requests += 1
            self._crash_if("request", self.requests)

    def step(self) -> None:
        if self.rules and not self.stepped:
            self.stepped = True
            self._crash_if("step", 0)

    def _crash_if(self, point: str, count: int) -> None:
        if any(r.at == point and count >= (r.after if point == "request" else 0) for r in self.rules):
            os.kill(os.getpid(), signal.SIGSEGV)  # as native code dies: faulthandler writes where, then the signal kills
