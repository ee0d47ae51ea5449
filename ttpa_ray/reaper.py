"""No process outlives its owner: a watchdog that ends a process's descendants when the process dies.

vLLM's engine core and its worker, and the sandbox's tool workers, are children of the process that
hosts them (a Ray actor, a driver, a test). When that host is killed (SIGKILL gives it no chance to
clean up), they are re-parented to init and keep running: an engine nobody owns holds a core or a
GPU. :func:`watch_this_process` starts, once per process, a small watchdog in its own session that
records the host's descendants every second and, when the host is gone, sends them SIGTERM and,
after a grace period, SIGKILL. It exits when its host does (or at once, if the host is already gone).

Run as ``python -m ttpa_ray.reaper <pid> [grace_s]``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time

import psutil

POLL_S = 1.0
GRACE_S = 3.0

_lock = threading.Lock()
_watched: dict[int, subprocess.Popen[bytes]] = {}  # pid of this process -> its watchdog


def watch_this_process(grace_s: float = GRACE_S) -> None:
    """Make this process's descendants die with it (idempotent; a forked child gets its own watchdog)."""
    pid = os.getpid()
    with _lock:
        watchdog = _watched.get(pid)
        if watchdog is not None and watchdog.poll() is None:
            return
        _watched[pid] = subprocess.Popen(
            [sys.executable, "-m", "ttpa_ray.reaper", str(pid), str(grace_s)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a signal to the host's process group leaves it to do its job
            close_fds=True,
        )


def reap(pid: int, grace_s: float = GRACE_S, poll_s: float = POLL_S) -> list[int]:
    """Wait for process ``pid`` to end, then end the descendants it had; the pids that had to be ended."""
    me = os.getpid()
    try:
        host = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return []
    known: dict[int, psutil.Process] = {}
    while True:
        try:
            if host.status() == psutil.STATUS_ZOMBIE:
                break
            for child in host.children(recursive=True):
                if child.pid != me:
                    known[child.pid] = child
        except psutil.NoSuchProcess:
            break
        time.sleep(poll_s)
    # psutil.Process remembers each process's start time: a pid reused since is not signalled.
    alive = [p for p in known.values() if p.is_running()]
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _gone, stubborn = psutil.wait_procs(alive, timeout=grace_s)
    for process in stubborn:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    return [p.pid for p in alive]


if __name__ == "__main__":
    reap(int(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else GRACE_S)
