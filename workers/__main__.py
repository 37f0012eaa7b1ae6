"""python -m infersnap.workers PLAN_FILE WORKER_ID [START], START a wire.WorkerStart as JSON (the broker's order)"""

from __future__ import annotations

import faulthandler
import logging
import signal
import sys
from pathlib import Path

import msgspec

from infersnap import plan as serve_plan
from infersnap import wire
from infersnap.workers.worker import run


def main() -> None:
    faulthandler.enable()  # a crash in a runtime's native code says where, in the serve log
    plan_file, worker_id = sys.argv[1], sys.argv[2]
    start = msgspec.json.decode(sys.argv[3], type=wire.WorkerStart) if len(sys.argv) > 3 else wire.WorkerStart(1)
    plan = serve_plan.read(Path(plan_file))
    logging.basicConfig(level=logging.DEBUG if plan.verbose else logging.INFO, format="%(name)s: %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    spec = next(w for w in plan.workers if w.worker_id == worker_id).started(start)
    try:
        run(plan, spec, start.restarts)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
