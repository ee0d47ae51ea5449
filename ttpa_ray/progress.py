"""What a user watches: one progress bar per stage on the terminal; everything else in the run's log file.

:func:`console_and_log` points the process's own stdout and stderr (file descriptors 1 and 2, so Ray's
and vLLM's start-up chatter, worker output forwarded by Ray and any traceback at teardown) at
``<run_dir>/logs/run.log`` and returns a rich Console on the terminal. :class:`StageBar` is a rich
progress bar with counts, rate and ETA; on a terminal that is not interactive (CI) it prints its final
state once.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


@contextlib.contextmanager
def console_and_log(log_path: Path) -> Iterator[Console]:
    """A Console on the terminal while fds 1 and 2 write to ``log_path``; both restored on exit."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved[0]), "w", buffering=1, encoding="utf-8")
    with log_path.open("a", encoding="utf-8") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            tty = terminal.isatty()
            # a pipe or CI log has no width to ask: 110 columns keep a stage's line on one line
            yield Console(file=terminal, force_terminal=tty or None, width=None if tty else 110)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            terminal.close()


class StageBar:
    """A stage's progress bar: ``done/total``, a free-text detail (rates, counts), elapsed and ETA."""

    def __init__(self, console: Console, label: str, total: int | None) -> None:
        self.progress = Progress(
            TextColumn("   {task.description}"),
            BarColumn(bar_width=28),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.task = self.progress.add_task(label, total=total, detail="")
        self._lock = threading.Lock()

    def __enter__(self) -> StageBar:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, completed: float, *, total: float | None = None, detail: str = "") -> None:
        with self._lock:  # watcher threads update the same bar
            self.progress.update(self.task, completed=completed, total=total, detail=detail)


class JsonLinesWatcher:
    """Calls ``on_entry`` for each new line of a JSON Lines file that another process appends to."""

    def __init__(self, path: Path, on_entry: Callable[[dict[str, Any]], None], interval: float = 1.0) -> None:
        self.path, self.on_entry, self.interval = path, on_entry, interval
        self._offset = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"watch-{path.name}", daemon=True)

    def __enter__(self) -> JsonLinesWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def poll(self) -> None:
        if not self.path.is_file():
            return
        with self.path.open(encoding="utf-8") as f:
            f.seek(self._offset)
            for line in f:
                if not line.endswith("\n"):  # a line still being written
                    break
                self._offset += len(line.encode("utf-8"))
                with contextlib.suppress(ValueError):
                    self.on_entry(json.loads(line))
