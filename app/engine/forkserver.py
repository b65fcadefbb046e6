"""What multiprocessing's fork server imports once, before it forks any CPU worker (pool.py).

torch, torchvision, dynamo and this engine: a worker forked from the server has them already,
instead of importing them at every start (~4 s of a core on a 2-core machine: a worker killed,
crashed or restarted by the watchdog serves again that much sooner, and a service with several
workers starts without each one importing torch while the others warm up).

In the fork server only, SIGTERM is ignored, as the workers ignore it: a SIGTERM to the process
group (systemd's stop, ``kill -- -PGID``) would end the server, and multiprocessing then reports
every worker forked from it as dead (their exit status comes through it), while they are still
running the batches the API process is draining. The server ends after the API process and the
workers forked from it (they end with the API process: worker._heartbeat).
"""

from __future__ import annotations

import signal
import sys

import app.engine.worker  # noqa: F401  (the point of this module: imported once, in the server)


def _in_fork_server() -> bool:
    """Imported by ``multiprocessing.forkserver.main``'s preload (and not by a test or by the
    API process, whose SIGTERM must stay theirs)."""
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if (
            code.co_name == "main"
            and frame.f_globals.get("__name__") == "multiprocessing.forkserver"
        ):
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


if _in_fork_server():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
