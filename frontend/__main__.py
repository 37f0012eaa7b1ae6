"""python -m infersnap.frontend PLAN_FILE"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from infersnap import plan as serve_plan
from infersnap.frontend.app import create_app


def main() -> None:
    plan_file = serve_plan.PlanFile(Path(sys.argv[1]))
    plan = plan_file.plan
    logging.basicConfig(level=logging.DEBUG if plan.verbose else logging.INFO, format="%(name)s: %(message)s")
    logging.getLogger("sanic").propagate = False  # Sanic logs through its own handlers; print each line once
    app = create_app(plan, plan_file)
    # A burst of clients (a load test, a LAN) must not overflow the kernel's accept queue: Sanic's default is 100.
    app.run(host=plan.host, port=plan.port, single_process=True, access_log=plan.verbose, motd=False, backlog=1024)


if __name__ == "__main__":
    main()
