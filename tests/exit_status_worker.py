"""A stand-in protocol entry for the launcher's exit-status tests: rank R ends with the status in the environment
variable EXIT_STATUS_RANK<R> ("0", "2", ... or "signal:N" to be killed by signal N); a rank given none waits to be
stopped (as a healthy rank does when another one fails)."""

from __future__ import annotations

import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    status = os.environ.get(f"EXIT_STATUS_RANK{os.environ.get('RANK', '0')}")
    if status is None:
        time.sleep(120)
        return 0
    if status.startswith("signal:"):
        os.kill(os.getpid(), int(status.split(":")[1]))
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
