"""Stand-in bench workers for tests of the runner (spawned processes import this module).

They speak the runner's event protocol (see :mod:`fedsec.strategies.bench`)
without running any cell, so a test controls exactly how a worker ends.
"""

from __future__ import annotations

import os
import threading
from typing import Any


def slow_to_exit(job: Any, index: int, todo: Any, events: Any) -> None:
    """Finishes every cell it takes, reports its exit, then never ends on its own.

    Like a worker whose engine (Ray) takes long to shut down on a busy machine.
    """
    while (cell_id := todo.get()) is not None:
        events.put(("start", index, cell_id, 1))
        events.put(("done", index, cell_id, 0.0))
    events.put(("exit", index, "", 0))
    threading.Event().wait()  # the runner has to stop it


def dies_mid_cell(job: Any, index: int, todo: Any, events: Any) -> None:
    """Takes a cell and dies before finishing it or reporting its exit (a crash)."""
    cell_id = todo.get()
    events.put(("start", index, cell_id, 1))
    os._exit(3)
