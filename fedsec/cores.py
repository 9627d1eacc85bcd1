"""How many threads a hot path should use now: the cores actually free.

A server shares its cores in practice: with a simulation's clients, a second
benchmark job, other services. Sizing a thread pool to the machine's core count
then oversubscribes it, and data-parallel code that waits for all of its
threads at every step (OpenMP's barriers in torch's intra-op pool, a thread
pool's ``map``) waits for the slowest one, which the scheduler has parked for a
time slice behind another process. Measured on a 2-core machine with two other
busy processes (issue 20): counting which clients entered the coordinate-wise
median at n = 50, d = 1M took 0.18 s with one torch thread and 2.9-4.4 s with
two. A thread that finds no free core buys nothing and costs a time slice per
barrier, so :func:`threads` asks for no more threads than there are cores left
free by the other processes, never fewer than one (the single-threaded path).

The estimate, re-evaluated at most once per :data:`CACHE_SECONDS` so that a hot
path may ask on every call:

- the cores this process may run on: its affinity mask
  (``os.sched_getaffinity``), capped by a cgroup v2 CPU quota (``cpu.max``);
- minus the threads of other processes that are runnable now: the kernel's
  count of runnable tasks (``/proc/loadavg``, the median of
  :data:`SAMPLES` snapshots so that a passing blip does not count) less this
  process's own running threads. The 1-minute load average
  (``os.getloadavg``) is the fallback where ``/proc`` is missing; on Linux the
  instantaneous count is preferred because the average lags by a minute and
  still counts a simulation's clients that trained a moment ago but sit idle
  while the server aggregates.

Two environment variables take precedence:

- :data:`ENV_THREADS` (``FEDSEC_THREADS``): the user's override, an exact
  thread count that skips the estimate (useful to pin a benchmark, or to get the
  old fixed-size pool back);
- :data:`ENV_BUDGET` (``FEDSEC_THREAD_BUDGET``): a cap set by a harness that
  runs several jobs side by side: ``fedsec bench --jobs N`` gives each worker
  ``cores // N`` (:func:`budget_for_jobs`); child processes inherit it.

Results never depend on the thread count: the callers split their work into
blocks whose boundaries do not depend on it.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import ParamSpec, TypeVar

#: The user's override: exactly this many threads, whatever the load.
ENV_THREADS = "FEDSEC_THREADS"
#: The harness's cap on threads per process (``fedsec bench --jobs``).
ENV_BUDGET = "FEDSEC_THREAD_BUDGET"
#: Seconds an estimate of the free cores is reused.
CACHE_SECONDS = 1.0
#: Snapshots of the runnable count whose median is taken (about 10 us each).
SAMPLES = 3

_LOADAVG = Path("/proc/loadavg")
_TASKS = Path("/proc/self/task")
_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")

#: (monotonic time, free cores) of the last estimate.
_cached: tuple[float, int] | None = None

P = ParamSpec("P")
R = TypeVar("R")


def _positive_env(name: str) -> int | None:
    """The positive integer in environment variable ``name``, or None when unset."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {raw!r}")
    return value


def usable_cores() -> int:
    """Cores this process may run on: its affinity mask, capped by a cgroup CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    try:  # cgroup v2: "max 100000" (no quota) or "<quota> <period>" in microseconds
        quota, period = _CPU_MAX.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def _runnable_now() -> int | None:
    """Runnable tasks on the whole machine now (``/proc/loadavg``'s 4th field), or None."""
    try:
        return int(_LOADAVG.read_text().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None


def own_running_threads() -> int:
    """This process's threads in the running state (at least 1: the caller)."""
    running = 0
    try:
        for task in _TASKS.iterdir():
            try:
                stat = (task / "stat").read_text()
            except OSError:  # the thread ended meanwhile
                continue
            # "tid (comm) S ...": comm may hold spaces and parentheses
            if stat[stat.rfind(")") + 2 : stat.rfind(")") + 3] == "R":
                running += 1
    except OSError:
        return 1
    return max(1, running)


def busy_elsewhere() -> float:
    """Threads of other processes competing for the cores now.

    The median of :data:`SAMPLES` snapshots of the machine's runnable count less
    this process's running threads; where ``/proc`` is missing, the 1-minute load
    average less this process's running threads.
    """
    samples = [s for s in (_runnable_now() for _ in range(SAMPLES)) if s is not None]
    own = own_running_threads()
    if samples:
        return max(0.0, statistics.median(samples) - own)
    try:
        return max(0.0, os.getloadavg()[0] - own)
    except (AttributeError, OSError):
        return 0.0


def estimate_free(usable: int, online: int, busy: float) -> int:
    """Cores free for this process: ``max(1, min(usable, round(online - busy)))``.

    Parameters
    ----------
    usable : int
        Cores this process may run on (:func:`usable_cores`).
    online : int
        Cores of the machine, shared by everyone (``os.cpu_count``).
    busy : float
        Threads of other processes that want a core (:func:`busy_elsewhere`).
    """
    return max(1, min(usable, round(online - busy)))


def free_cores(refresh: bool = False) -> int:
    """The cores left free by other processes (at least 1), cached for :data:`CACHE_SECONDS`."""
    global _cached
    now = time.monotonic()
    if not refresh and _cached is not None and now - _cached[0] < CACHE_SECONDS:
        return _cached[1]
    usable = usable_cores()
    free = estimate_free(usable, max(usable, os.cpu_count() or 1), busy_elsewhere())
    _cached = (now, free)
    return free


def threads(work: int | None = None, cap: int | None = None) -> int:
    """Threads a parallel hot path should use now.

    Parameters
    ----------
    work : int, optional
        Independent pieces of work (more threads than pieces would idle).
    cap : int, optional
        A further cap from the caller (say torch's thread setting). Like
        :data:`ENV_BUDGET`, ignored under :data:`ENV_THREADS`.

    Returns
    -------
    int
        :data:`ENV_THREADS` when set; otherwise the free cores
        (:func:`free_cores`) capped by :data:`ENV_BUDGET` and ``cap``. Then at
        most ``work``, and at least 1.

    Raises
    ------
    ValueError
        When either variable holds anything but a positive integer.
    """
    count = _positive_env(ENV_THREADS)
    if count is None:
        count = free_cores()
        budget = _positive_env(ENV_BUDGET)
        for limit in (budget, cap):
            if limit is not None:
                count = min(count, limit)
    if work is not None:
        count = min(count, work)
    return max(1, count)


def budget_for_jobs(jobs: int, cores: int | None = None) -> int:
    """Threads per worker when ``jobs`` workers share ``cores`` (default: usable cores)."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs!r}")
    return max(1, (usable_cores() if cores is None else cores) // jobs)


def set_thread_budget(count: int) -> None:
    """Cap threads in this process and the processes it starts afterwards.

    Sets :data:`ENV_BUDGET` (children inherit the environment, ``spawn`` ones
    included), keeping a lower budget already set.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"thread budget must be a positive integer, got {count!r}")
    current = _positive_env(ENV_BUDGET)
    os.environ[ENV_BUDGET] = str(count if current is None else min(current, count))


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` torch intra-op threads in this thread.

    With torch's OpenMP backend the setting is per calling thread (an OpenMP
    ICV), so other threads keep theirs; the previous value comes back on exit.
    """
    import torch  # only callers that use torch get here

    before = torch.get_num_threads()
    if count == before:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def sized_to_free_cores(func: Callable[P, R]) -> Callable[P, R]:
    """Decorate ``func`` to run with torch's intra-op threads sized by :func:`threads`.

    Capped by torch's own setting (a ``torch.set_num_threads`` by the caller or
    a harness is a budget too) unless :data:`ENV_THREADS` overrides.
    """

    @wraps(func)
    def sized(*args: P.args, **kwargs: P.kwargs) -> R:
        import torch

        with torch_threads(threads(cap=torch.get_num_threads())):
            return func(*args, **kwargs)

    return sized
