"""No process outlives its owner: a watchdog that ends a process's descendants when the process dies.

vLLM's engine core and its worker, and the sandbox's tool workers, are children of the process that
hosts them (a Ray actor, a driver, a test). When that host is killed (SIGKILL gives it no chance to
clean up), they are re-parented to init and keep running: an engine nobody owns holds a core or a
GPU. :func:`watch_this_process` starts, once per process, a small watchdog in its own session that
records the host's descendants every second and, when the host is gone, sends them SIGTERM and,
after a grace period, SIGKILL. It exits when its host does (or at once, if the host is already gone).

Shared memory goes the same way: DeepSpeed's CPU all-reduce buffers and Python's and vLLM's
``multiprocessing.shared_memory`` segments live in ``/dev/shm`` (RAM) and outlive a killed process
(DeepSpeed leaves two 69 MB buffers behind after every run, even a clean one).
:func:`remove_unused_shm` deletes such segments of this user once no process maps or opens them; the
watchdog runs it after reaping, training runs it after each stage, tests after the session.

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


SHM_DIR = "/dev/shm"
# DeepSpeed's all-reduce buffers and shared_memory segments (the big ones). Not multiprocessing's
# named semaphores (sem.mp-*): tiny, and a live process may unlink its own at exit.
SHM_PREFIXES = ("deepspeed_allreduce_buffer_", "psm_")


def _shm_in_use() -> set[str]:
    """Names in /dev/shm that some process of this machine maps or holds open (as far as we can see)."""
    used: set[str] = set()
    prefix = SHM_DIR + "/"
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as handle:
                for line in handle:
                    at = line.find(prefix)
                    if at >= 0:
                        used.add(line[at + len(prefix) :].split()[0])
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith(prefix):
                    used.add(target[len(prefix) :].split()[0])
        except OSError:
            continue
    return used


def remove_unused_shm(min_age_s: float = 30.0) -> list[str]:
    """Delete this user's DeepSpeed / multiprocessing segments in /dev/shm that nothing uses any more
    (and that are older than ``min_age_s``, so a segment being set up is never taken); their names."""
    try:
        names = [n for n in os.listdir(SHM_DIR) if n.startswith(SHM_PREFIXES)]
    except OSError:
        return []
    if not names:
        return []
    used, now, uid, removed = _shm_in_use(), time.time(), os.getuid(), []
    for name in names:
        path = os.path.join(SHM_DIR, name)
        try:
            info = os.stat(path)
            if name in used or info.st_uid != uid or now - info.st_mtime < min_age_s:
                continue
            os.unlink(path)
            removed.append(name)
        except OSError:
            continue
    return removed


if __name__ == "__main__":
    reap(int(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else GRACE_S)
    time.sleep(1.0)  # the reaped processes' mappings are gone once they are
    remove_unused_shm(min_age_s=5.0)
