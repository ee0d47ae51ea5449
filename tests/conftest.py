"""Session fixtures: one local Ray cluster and one tiny model for the whole test session."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

# Every process this session starts (Ray's, vLLM's, subprocesses of tests) inherits this mark, which is
# how the check at the end of the session finds any of them still running.
SESSION_MARK = "TTPA_TEST_SESSION"
os.environ[SESSION_MARK] = uuid.uuid4().hex
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


# The S3 server of the storage tests (moto's, on 127.0.0.1, started by the ``s3_server`` fixture):
# its address is set here, before any Ray process starts, so that Ray's workers (the replicas, the
# training workers) inherit it as a real cluster's nodes would their credentials.
S3_PORT = free_port()
os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{S3_PORT}"
os.environ["AWS_ACCESS_KEY_ID"] = "testing"
os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
os.environ["TTPA_CACHE"] = tempfile.mkdtemp(prefix="ttpa-cache-")  # store.local_copy's downloads


@contextlib.contextmanager
def ray_head(args: list[str], env: dict[str, str], log: Path) -> Iterator[Path]:
    """A Ray head of its own (``ray start --head --block`` + ``args``), stopped with everything it
    started: --block keeps the head, its agents and any node its autoscaler starts in one process
    group, so stopping it touches no other Ray on the machine (the session's own included). Yields
    the head's temp dir (its logs are under ``session_latest/logs``)."""
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: unix socket paths are limited to 107 chars
    with log.open("w") as out:
        head = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "ray"),
                "start",
                "--head",
                "--block",
                f"--temp-dir={temp}",
                *args,
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield Path(temp)
        finally:
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=90)
            shutil.rmtree(temp, ignore_errors=True)


def reverse_seed_ids(out_dir: Path) -> list[str]:
    """The seed id of every record (dialogue or rejected seed) a reverse stage's manifest lists."""
    from ttpa_ray.records import Dialogue, RejectedRow, read_parquet

    ids = []
    for shard in json.loads((out_dir / "manifest.json").read_text())["shards"]:
        ids += [r.input_id for r in read_parquet(RejectedRow, shard["rejected"])]
        ids += [d.seed_id for d in read_parquet(Dialogue, shard["dialogues"])]
    return ids


def vllm_processes(prefix: str = "VLLM", since: float = 0.0) -> set[tuple[int, float]]:
    """(pid, start time) of the vLLM processes on this machine (engine cores and their workers),
    those started at ``since`` (a time.time()) or later; only their command lines are read."""
    found = set()
    for process in psutil.process_iter(["create_time"]):
        started = process.info["create_time"] or 0.0
        if started < since:
            continue
        try:
            if " ".join(process.cmdline()).startswith(prefix):
                found.add((process.pid, started))
        except psutil.Error:
            continue
    return found


def engine_cores(since: float = 0.0) -> set[tuple[int, float]]:
    """(pid, start time) of every vLLM engine-core process on this machine (started since ``since``)."""
    return vllm_processes("VLLM::EngineCore", since)


class ServingEngineCoreKiller:
    """SIGKILLs, from a thread, the first engine core not running ``before`` once its replica serves:
    its actor's process title says it is past ``__init__`` (``ray::MapWorker(...)``, ``.submit`` while
    it runs a batch), or the test calls :meth:`output_seen` when the driver gets its first output.

    Watching the replica, not only the driver's stream, is what makes this a kill mid-stage: on a
    loaded machine the driver read its first batch after the replica had done them all and Ray Data
    had already let it go (CI, 2026-12-07). ``pid()`` is the killed core's pid, after the stage; it
    also stops the watch, so that no later test's engine is killed."""

    def __init__(self, before: set[tuple[int, float]], timeout_s: float = 300) -> None:
        import threading

        self.before, self.since = before, time.time() - 1.0
        self.deadline = time.time() + timeout_s
        self.killed: int | None = None
        self.seen: dict[int, str] = {}  # new engine cores -> their parent's title when last looked at
        self.output, self.stop = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def output_seen(self) -> None:
        self.output.set()

    def _watch(self) -> None:
        while time.time() < self.deadline and self.killed is None and not self.stop.is_set():
            for pid, _ in sorted(engine_cores(self.since) - self.before):
                try:
                    replica = psutil.Process(pid).parent()
                    title = " ".join(replica.cmdline()).rstrip() if replica is not None else ""
                except psutil.Error as error:
                    title = f"<{type(error).__name__}>"
                self.seen[pid] = title[:200]
                ready = title.startswith("ray::MapWorker") and not title.endswith("__init__")
                if ready or self.output.is_set():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, 9)
                        self.killed = pid
                    break
            time.sleep(0.02)

    def pid(self) -> int:
        self.stop.set()
        self.thread.join(timeout=10)
        assert self.killed is not None, f"no replica's engine core was killed while it served: {self.seen}"
        return self.killed


def kill_engine_core_of(replica_pid: int, timeout_s: float = 60) -> int:
    """SIGKILL the vLLM engine core started by the replica actor process ``replica_pid``; its pid."""
    from ttpa_ray.engine import is_engine_core

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            children = psutil.Process(replica_pid).children(recursive=True)
        except psutil.NoSuchProcess:
            raise AssertionError(
                f"replica process {replica_pid} is gone; engine cores: {engine_cores()}"
            ) from None
        cores = [c for c in children if is_engine_core(c)]
        if cores:
            os.kill(cores[0].pid, 9)
            return cores[0].pid
        time.sleep(0.2)
    raise AssertionError(
        f"replica process {replica_pid} has no vLLM engine core; engine cores: {engine_cores()}"
    )


def session_processes() -> list[psutil.Process]:
    """Live processes started by this session (by its mark), except this one and its own watchdog."""
    me, mark = os.getpid(), os.environ[SESSION_MARK]
    found = []
    for process in psutil.process_iter():
        try:
            if process.pid == me or process.environ().get(SESSION_MARK) != mark:
                continue
            cmdline = process.cmdline()
            if process.status() == psutil.STATUS_ZOMBIE or cmdline[-3:-1] == ["ttpa_ray.reaper", str(me)]:
                continue  # exited, or the watchdog that ends with this process
            found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if a process the suite started outlives it (issue 21); then end it."""
    import multiprocessing.forkserver
    import multiprocessing.resource_tracker

    # This process's own multiprocessing helpers (sandbox pools start a forkserver) end with it; stop
    # them now so that what is left to find is only what nobody would have stopped.
    multiprocessing.forkserver._forkserver._stop()  # type: ignore[attr-defined]
    multiprocessing.resource_tracker._resource_tracker._stop()  # type: ignore[attr-defined]
    from ttpa_ray.reaper import remove_unused_shm

    deadline = time.time() + 20  # what is ending (Ray's workers, engines, watchdogs) gets to finish
    while (left := session_processes()) and time.time() < deadline:
        time.sleep(0.5)
    removed = remove_unused_shm(min_age_s=0.0)  # /dev/shm is RAM: what the killed processes left there
    shutil.rmtree(os.environ["TTPA_CACHE"], ignore_errors=True)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if removed and reporter is not None:
        reporter.write_line(f"removed {len(removed)} unused shared-memory segments from /dev/shm")
    if not left:
        return
    lines = []
    for process in left:
        try:
            command = " ".join(process.cmdline())[:150]
            lines.append(f"  pid {process.pid} (parent {process.ppid()}): {command}")
            process.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    if lines:
        message = "processes started by the test session still running at its end (now killed):"
        if reporter is not None:
            reporter.write_line(message, red=True)
            for line in lines:
                reporter.write_line(line)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[object]:
    """A real local Ray cluster (2 CPUs), started once per session."""
    import ray

    from ttpa_ray.reaper import watch_this_process

    watch_this_process()  # if this session is killed, what it started goes with it
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3-protocol server (moto's standalone server) on 127.0.0.1:S3_PORT, once per session;
    yields its address. Tests make their own buckets."""
    log = tmp_path_factory.mktemp("s3") / "moto.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(S3_PORT)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", S3_PORT), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"the S3 server did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.2)
        yield os.environ["AWS_ENDPOINT_URL"]
    finally:
        server.terminate()
        server.wait(timeout=30)


def make_bucket(name: str) -> str:
    """A new bucket on the session's S3 server; its URI."""
    import boto3

    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's seeded tiny Qwen2 model, built once per session."""
    from ttpa_ray.tiny_model import make_tiny_model

    out = tmp_path_factory.mktemp("tiny-model")
    make_tiny_model(out, seed=0)
    return out


@pytest.fixture(scope="session")
def vllm_engine(tiny_model_dir: Path) -> Iterator[object]:
    """One real vLLM CPU engine on the tiny model, shared by the whole session (start-up ~20 s)."""
    from ttpa_ray.config import VLLMConfig
    from ttpa_ray.engine import Engine

    engine = Engine(
        str(tiny_model_dir),
        VLLMConfig(gpu_memory_utilization=0.1, max_model_len=4096, max_num_seqs=32),
        dtype="float32",
        seed=0,
    )
    yield engine
    engine.close()


def executed_dialogues() -> list[Any]:
    """Two dialogues in the reverse stage's shape, every result from a real built-in tool."""
    from ttpa_ray.codec import ToolCall
    from ttpa_ray.records import Dialogue, Message
    from ttpa_ray.tools.registry import ToolRegistry, load_catalogue

    calls_per_dialogue = [
        [
            ToolCall("get_weekday", {"date": "2026-03-14"}),
            ToolCall("add_days", {"date": "2026-03-14", "days": 10}),
        ],
        [ToolCall("get_city_info", {"city": "Paris"}), ToolCall("get_weekday", {"date": "2026-05-01"})],
    ]
    catalogue = load_catalogue("builtin")
    dialogues = []
    with ToolRegistry(catalogue) as registry:
        for n, calls in enumerate(calls_per_dialogue):
            session = registry.session(f"d{n}", None)
            messages = [Message("system", "You can call tools."), Message("user", f"question {n}")]
            for i, call in enumerate(calls):
                result = session.call(call.name, call.arguments)
                assert result.ok, result
                messages.append(Message("assistant", None, tool_calls=(call,), tool_call_ids=(f"call_{i}",)))
                messages.append(
                    Message("tool", result.to_message_content(), tool_call_id=f"call_{i}", name=call.name)
                )
            messages.append(Message("assistant", "done"))
            session.close()
            tools = tuple(catalogue.specs[name] for name in dict.fromkeys(c.name for c in calls))
            dialogues.append(Dialogue(f"dlg-{n}", f"seed-{n}", tuple(messages), tools))
    return dialogues


@pytest.fixture
def heldout_dialogues_file(tmp_path: Path) -> Path:
    """Two held-out dialogues (Parquet, Dialogue records) whose calls really ran: turns dlg-{0,1}/{0,1}."""
    from ttpa_ray.records import Dialogue, write_parquet

    return write_parquet(executed_dialogues(), tmp_path / "heldout.parquet", Dialogue)
