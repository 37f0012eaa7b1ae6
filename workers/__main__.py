"""python -m infersnap.workers PLAN_FILE WORKER_ID"""

from __future__ import annotations

import faulthandler
import logging
import signal
import sys
from pathlib import Path

from infersnap import plan as serve_plan
from infersnap.workers.worker import run


def main() -> None:
    faulthandler.enable()  # a crash in a runtime's native code says where, in the serve log
    plan_file, worker_id = sys.argv[1], sys.argv[2]
    plan = serve_plan.read(Path(plan_file))
    logging.basicConfig(level=logging.DEBUG if plan.verbose else logging.INFO, format="%(name)s: %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    spec = next(w for w in plan.workers if w.worker_id == worker_id)
    try:
        run(plan, spec)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
