"""A worker as the broker sees it: what it announced, what it runs now, and what its prompt cache may hold."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from infersnap import routing, wire

RESTARTING = "restarting"  # the state of a worker whose process stopped, until it comes back
UNLOADED = "unloaded"  # a worker of a model not loaded: no process
UNLOADING = "unloading"  # a worker whose model was unloaded, until its process has ended
PENDING_STATES = ("loading", RESTARTING, UNLOADED, UNLOADING)  # not ready, and may be: requests wait for them
REMEMBERED_PREFIXES = 4096  # prompt blocks remembered per worker (4 MiB of text): more than its cache holds


def takes_slot(needs: wire.Needs) -> bool:
    """Tokenizer lookups are answered between two engine steps and hold no slot."""
    return needs.task != "tokenize"


@dataclass
class Worker:
    identity: bytes
    info: wire.WorkerInfo
    last_seen: float
    running: set[str] = field(default_factory=set)  # requests dispatched to it that hold a slot
    lookups: set[str] = field(default_factory=set)  # tokenizer lookups dispatched to it
    # the prompt beginnings (wire.Work.prefix) last sent to it, oldest first: what its prompt cache may hold
    prefixes: OrderedDict[int, None] = field(default_factory=OrderedDict)
    last_ran: str = ""  # what it was running when its process last died ("2 generate requests"), for a failure's reason

    def remember(self, prefix: list[int]) -> None:
        for block in prefix:
            self.prefixes[block] = None
            self.prefixes.move_to_end(block)
        while len(self.prefixes) > REMEMBERED_PREFIXES:
            self.prefixes.popitem(last=False)

    def cached_tokens(self, prefix: list[int]) -> int:
        """A guess of the tokens of this prompt its cache holds: the blocks it was sent before."""
        held = next((i for i, block in enumerate(prefix) if block not in self.prefixes), len(prefix))
        return held * routing.PREFIX_BLOCK // routing.CHARS_PER_TOKEN

    def serves(self, model: str, task: str) -> bool:
        return self.info.model.lower() == model.lower() and task in self.info.capabilities.tasks

    def may_serve(self, needs: wire.Needs) -> bool:
        """Whether it can serve these needs now or once (re)loaded: a loading worker may still gain features."""
        if self.info.state == "failed":
            return False
        return self.info.state in PENDING_STATES or routing.unmet(needs, self.info.capabilities) is None

    def able(self, needs: wire.Needs) -> bool:
        """Whether it is ready and can do what these needs ask, free slot or not."""
        return self.info.state == "ready" and routing.unmet(needs, self.info.capabilities) is None

    def can_take(self, needs: wire.Needs) -> bool:
        """Whether it can start a request with these needs now, cores aside."""
        return self.able(needs) and (not takes_slot(needs) or self.free_slots > 0)

    @property
    def free_slots(self) -> int:
        return self.info.slots - len(self.running) if self.info.state == "ready" else 0

    @property
    def load(self) -> float:
        return (len(self.running) + len(self.lookups)) / self.info.slots

    @property
    def embeds(self) -> bool:
        return "embed" in self.info.capabilities.tasks
