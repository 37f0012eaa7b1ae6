"""python -m infersnap.broker PLAN_FILE"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

from infersnap import plan as serve_plan
from infersnap.broker.broker import Broker


def main() -> None:
    plan_file = serve_plan.PlanFile(Path(sys.argv[1]))
    plan = plan_file.plan
    logging.basicConfig(level=logging.DEBUG if plan.verbose else logging.INFO, format="%(name)s: %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        Broker(plan, plan_file=plan_file).serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
