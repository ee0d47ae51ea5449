"""Processes die with their owner (issue 21): the reaper, and a bounded connect to a Ray cluster."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from ttpa_ray.pipeline import ClusterUnreachable, check_reachable

ROOT = Path(__file__).parent.parent

# A host that starts its watchdog, then a child that ignores SIGTERM and a grandchild; prints their pids.
HOST = """
import subprocess, sys, time
from ttpa_ray.reaper import watch_this_process
watch_this_process(grace_s=1.0)
stubborn = "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); " \\
    "g = subprocess.Popen(['sleep', '600']); print(g.pid, flush=True); time.sleep(600)"
child = subprocess.Popen([sys.executable, "-c", stubborn], stdout=subprocess.PIPE, text=True)
grandchild = int(child.stdout.readline())
print(child.pid, grandchild, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_descendants_of_a_killed_host_are_ended_even_if_they_ignore_sigterm() -> None:
    host = subprocess.Popen(
        [sys.executable, "-c", HOST], cwd=ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert host.stdout is not None
    child, grandchild = (int(p) for p in host.stdout.readline().split())
    time.sleep(2.5)  # the watchdog has seen both (it looks every second)
    assert _alive(child) and _alive(grandchild)
    host.send_signal(signal.SIGKILL)  # no chance to clean up: the orphans' case
    host.wait()
    deadline = time.time() + 15
    while (_alive(child) or _alive(grandchild)) and time.time() < deadline:
        time.sleep(0.2)
    left = [pid for pid in (child, grandchild) if _alive(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"still running after their host was killed: {left}"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # nobody listens on it once the socket is closed


def test_unreachable_cluster_is_one_error_naming_the_address_within_the_timeout() -> None:
    port = _closed_port()
    start = time.monotonic()
    with pytest.raises(ClusterUnreachable, match=f"ray.address=127.0.0.1:{port}: no Ray cluster answers"):
        check_reachable(f"127.0.0.1:{port}", 2.0)
    assert time.monotonic() - start < 10


def test_reachable_address_passes() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        check_reachable(f"127.0.0.1:{server.getsockname()[1]}", 5.0)


def test_job_against_a_stopped_cluster_exits_with_one_line() -> None:
    port = _closed_port()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.reverse",
            "--config",
            "configs/local.yaml",
            "model.policy=tiny",
            f"ray.address=127.0.0.1:{port}",
            "ray.connect_timeout_s=2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if f"127.0.0.1:{port}" in line]
    assert len(lines) == 1 and "no Ray cluster answers" in lines[0], result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_session_end_check_fails_a_run_that_leaves_a_process_behind(tmp_path: Path) -> None:
    """The check in conftest.py, run on a session whose one test leaks a process out of its group."""
    (tmp_path / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    (tmp_path / "test_leak.py").write_text(
        "import subprocess\n"
        "def test_leaks():\n"
        "    subprocess.Popen(['sleep', '613'], start_new_session=True)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TTPA_TEST_SESSION"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1, result.stdout[-2000:]
    assert "1 passed" in result.stdout
    assert "still running at its end (now killed)" in result.stdout
    assert "sleep 613" in result.stdout
    leaked = [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", "613"]]
    assert not [p for p in leaked if _alive(p.pid)]


def test_unused_shared_memory_is_removed_and_memory_in_use_is_kept() -> None:
    """A segment whose creator was SIGKILLed stays in /dev/shm (RAM) until removed; one in use stays."""
    from multiprocessing import shared_memory

    from ttpa_ray.reaper import remove_unused_shm

    held = shared_memory.SharedMemory(create=True, size=1 << 20)
    creator = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from multiprocessing import resource_tracker, shared_memory\n"
            "m = shared_memory.SharedMemory(create=True, size=1 << 20)\n"
            # untracked, as DeepSpeed's segments are: a tracker outlives the SIGKILL and unlinks what it
            # tracks once its owner is gone, racing the sweep under test
            "resource_tracker.unregister(m._name, 'shared_memory')\n"
            "print(m.name, flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert creator.stdout is not None
    orphan = creator.stdout.readline().strip()
    creator.kill()  # SIGKILL: no chance to unlink it
    creator.wait()
    try:
        assert Path("/dev/shm", orphan).exists()
        removed = remove_unused_shm(min_age_s=0.0)
        assert orphan in removed and not Path("/dev/shm", orphan).exists()
        assert held.name not in removed and Path("/dev/shm", held.name).exists()
    finally:
        held.close()
        held.unlink()
