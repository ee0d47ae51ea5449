"""A run dir in an object store (``s3://``, ``gs://``, ``abfs://``, ``hdfs://``), through pyarrow.fs.

``run.run_dir`` is a local path (one machine, or a mount every node shares) or a URI. With a URI:

- the driver reads and writes a local working copy (``run.local_dir``, by default under
  ``~/.cache/ttpa/runs/``), which :class:`Mirror` fills from the store when the run starts (a
  resumed run starts from what the store holds) and uploads to it after every stage;
- what replicas and training workers read or write goes through the store itself: the reverse
  stage's shards and markers, the training table and Ray Train's checkpoints (``storage_path``), and
  every model folder of the run (a trained policy) handed to a replica or a worker, which
  :func:`local_copy` downloads once per node.

Credentials and endpoints are pyarrow's: ``AWS_*`` variables (``AWS_ENDPOINT_URL`` for an
S3-compatible server), ``GOOGLE_APPLICATION_CREDENTIALS``, ``AZURE_STORAGE_*``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

if TYPE_CHECKING:
    import ray

SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs")
CACHE = Path(os.environ.get("TTPA_CACHE", Path.home() / ".cache" / "ttpa"))
SYNC_RECORD = ".ttpa-sync.json"  # in a working copy: what it holds that the store holds too
RAY_STORAGE = "ray"  # a training stage's Ray Train storage folder (train/run.py)
SMALL = 1 << 20  # bytes: files this small are always pulled again (markers, manifests, reports)
# Uploaded after everything else: a run that finds a stage finished in pipeline.json finds its outputs.
LAST = ("pipeline.json",)


def is_uri(target: str | os.PathLike[str]) -> bool:
    """Whether ``target`` names an object store rather than a local path."""
    return "://" in str(target)


def check_uri(uri: str) -> str | None:
    """What is wrong with a run dir URI, or None."""
    scheme = uri.partition("://")[0]
    if scheme not in SCHEMES:
        return f"unsupported scheme {scheme!r}: use a local path or one of {', '.join(SCHEMES)}"
    if not uri.partition("://")[2].strip("/"):
        return "no bucket or path after the scheme"
    return None


def resolve(target: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    """The filesystem and path of a URI or a local path."""
    if is_uri(target):
        return pafs.FileSystem.from_uri(str(target))
    return pafs.LocalFileSystem(), str(Path(target).absolute())


def join(base: str | os.PathLike[str], *parts: str) -> str:
    """``base/part/...`` for a URI or a local path."""
    return "/".join([str(base).rstrip("/"), *parts]) if is_uri(base) else str(Path(base).joinpath(*parts))


def exists(target: str | os.PathLike[str]) -> bool:
    fs, path = resolve(target)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def files(folder: str | os.PathLike[str]) -> list[str]:
    """The files directly in a folder (a local path or a URI), sorted by name; none if it is absent."""
    return [join(folder, name) for name in sorted(_files(*resolve(folder))) if "/" not in name]


def read_text(target: str | os.PathLike[str]) -> str:
    """A whole file. An object store's reader takes the object's size first and then its bytes: an
    object replaced in between (``pipeline.json``, rewritten after every stage) would come back cut
    at the old size, so a read during which the object changed is read again. This narrows the race
    (a reader polling a file rewritten after every stage); it cannot close it: readers of such a file
    must still tolerate a bad read by reading again."""
    fs, path = resolve(target)
    for _ in range(10):
        before = fs.get_file_info(path)
        with fs.open_input_stream(path) as stream:
            data = bytes(stream.read())
        after = fs.get_file_info(path)
        if len(data) == before.size == after.size and before.mtime == after.mtime:
            break
    return data.decode("utf-8")


def write_text(target: str | os.PathLike[str], text: str) -> None:
    """Write a whole file at once: locally through a temporary name and a rename, on an object store
    as one upload (an object appears whole or not at all), so no reader sees half of it."""
    if is_uri(target):
        fs, path = resolve(target)
        with fs.open_output_stream(path) as stream:
            stream.write(text.encode("utf-8"))
        return
    _replace(Path(target), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_table(table: pa.Table, target: str | os.PathLike[str]) -> None:
    """Write a Parquet file whole, as :func:`write_text` does."""
    if is_uri(target):
        pq.write_table(table, str(target))
        return
    _replace(Path(target), lambda tmp: pq.write_table(table, tmp))


def _replace(out: Path, write: Callable[[Path], object]) -> None:
    """Write ``out`` through a temporary sibling and a rename: a reader sees the old file or the new."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    write(tmp)
    tmp.replace(out)


def _files(fs: pafs.FileSystem, root: str) -> dict[str, pafs.FileInfo]:
    """Every file under ``root``, by its path relative to it."""
    selector = pafs.FileSelector(root, allow_not_found=True, recursive=True)
    return {
        info.path[len(root) :].lstrip("/"): info
        for info in fs.get_file_info(selector)
        if info.type == pafs.FileType.File
    }


class Mirror:
    """A driver's local working copy of a run dir that lives in an object store."""

    def __init__(self, remote: str, local: Path) -> None:
        self.remote = remote.rstrip("/")
        self.local = Path(local).absolute()
        self.fs, self.root = resolve(self.remote)

    def uri(self, path: str | os.PathLike[str]) -> str:
        """The store's address of a path inside the working copy."""
        relative = Path(path).absolute().relative_to(self.local)
        return join(self.remote, *relative.parts)

    def _record(self) -> dict[str, list[int]]:
        path = self.local / SYNC_RECORD
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def _save(self, record: dict[str, list[int]]) -> None:
        write_text(self.local / SYNC_RECORD, json.dumps(record, sort_keys=True))

    @staticmethod
    def _stamp(path: Path) -> list[int]:
        info = path.stat()
        return [info.st_size, info.st_mtime_ns]

    def pull(self, path: str | os.PathLike[str] | None = None) -> int:
        """Download what the store holds (under ``path`` of the working copy, or all) and the working
        copy lacks or may hold in an older version (another size, or a small file such as
        ``pipeline.json``, which another machine may have rewritten); the number of files. Ray
        Train's storage (folders named ``ray``: checkpoints) stays in the store: the workers read it
        from there."""
        record = self._record()
        count = 0
        under = "" if path is None else Path(path).absolute().relative_to(self.local).as_posix()
        listing = _files(self.fs, f"{self.root}/{under}" if under else self.root)
        for name, info in listing.items():
            relative = f"{under}/{name}" if under else name
            if RAY_STORAGE in relative.split("/")[:-1] or relative in (SYNC_RECORD, PROBE):
                continue
            target = self.local / relative
            if target.is_file() and target.stat().st_size == info.size and (info.size or 0) > SMALL:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(info.path, str(target), source_filesystem=self.fs)
            record[relative] = self._stamp(target)
            count += 1
        self._save(record)
        return count

    def push(self, path: str | os.PathLike[str] | None = None) -> int:
        """Upload the files of the working copy (or of ``path`` inside it) that changed since they
        were last pulled or pushed; the number of files."""
        record = self._record()
        base = Path(path).absolute() if path is not None else self.local
        files = [base] if base.is_file() else [p for p in base.rglob("*") if p.is_file()]
        files.sort(key=lambda p: p.name in LAST)  # the record of finished stages goes up last
        count = 0
        for file in files:
            relative = file.relative_to(self.local).as_posix()
            if relative == SYNC_RECORD or file.name.endswith(".tmp"):
                continue
            stamp = self._stamp(file)
            if record.get(relative) == stamp:
                continue
            pafs.copy_files(str(file), f"{self.root}/{relative}", destination_filesystem=self.fs)
            record[relative] = stamp
            count += 1
        self._save(record)
        return count


_active: Mirror | None = None
PROBE = ".ttpa-writable"  # written when a run starts: a bucket it cannot write to is found at once


class StoreError(OSError):
    """The run dir's object store cannot be read or written (one line naming it)."""


@contextlib.contextmanager
def mirrored(remote: str | None, local: Path) -> Iterator[Mirror | None]:
    """While inside, the working copy ``local`` mirrors ``remote`` (pulled first, pushed at the end,
    also when the block fails); with no ``remote``, nothing to do."""
    global _active
    if remote is None:
        yield None
        return
    try:
        mirror = Mirror(remote, local)
        mirror.pull()
        write_text(join(remote, PROBE), "")
    except OSError as err:
        raise StoreError(f"run.run_dir={remote}: cannot read and write there ({err})") from None
    _active = mirror
    try:
        yield mirror
    finally:
        _active = None
        mirror.push()


def active() -> Mirror | None:
    """The mirror of the run this driver is running, if its run dir is in an object store."""
    return _active


def shared(path: str | os.PathLike[str]) -> str:
    """How a replica or a training worker on another node reaches ``path``: its URI (uploaded first)
    when it is inside the working copy of a run dir in an object store, else the path itself."""
    mirror = _active
    if mirror is None or is_uri(path) or not Path(path).absolute().is_relative_to(mirror.local):
        return str(path)
    if Path(path).exists():
        mirror.push(path)
    return mirror.uri(path)


def write_folder(ds: ray.data.Dataset, path: str | os.PathLike[str], empty: pa.Table) -> int:
    """Write a Ray dataset as the Parquet folder ``path`` of the run dir, by the cluster's tasks:
    anew (emptied first, in the store too), into the store when the run dir is in one (so that
    every node reaches it; then copied into the working copy); a dataset with no row leaves one
    file with ``empty``'s schema, so readers see the part. Returns the rows written."""
    import pyarrow.dataset as pads

    local = Path(path)
    if local.is_file():  # an earlier version's single file
        local.unlink()
    shutil.rmtree(local, ignore_errors=True)
    target = shared(local)
    fs, root = resolve(target)
    if fs.get_file_info(root).type == pafs.FileType.File:  # the same, in the store
        fs.delete_file(root)
    fs.delete_dir_contents(root, missing_dir_ok=True)
    ds.write_parquet(root, filesystem=fs)
    if not any(name.endswith(".parquet") for name in _files(fs, root)):
        fs.create_dir(root)
        write_table(empty, join(target, "empty.parquet"))
    rows = int(pads.dataset(root, filesystem=fs, format="parquet").count_rows())
    if _active is not None and is_uri(target):
        _active.pull(local)
    return rows


def count_rows(path: str | os.PathLike[str]) -> int:
    """Rows of a Parquet file or folder of the working copy, from the footers; 0 when absent."""
    import pyarrow.dataset as pads

    return int(pads.dataset(path, format="parquet").count_rows()) if Path(path).exists() else 0


def partitions(*paths: str | os.PathLike[str]) -> int:
    """Hash partitions for a shuffle of these Parquet files or folders of the working copy: one per
    32 MiB on disk (Ray Data's default of 200 makes a small stage all overhead)."""
    size = sum(
        f.stat().st_size for p in map(Path, paths) for f in ([p] if p.is_file() else p.rglob("*.parquet"))
    )
    return max(1, math.ceil(size / (32 << 20)))


def reasons(path: str | os.PathLike[str]) -> dict[str, int]:
    """Rejected rows per reason in a RejectedRow folder of the working copy, counted as the reason
    column streams by (one column, a batch at a time; a Ray aggregation costs seconds of actors)."""
    import pyarrow.dataset as pads

    counts: dict[str, int] = {}
    for batch in pads.dataset(path, format="parquet").to_batches(columns=["reason"]):
        for entry in batch.column(0).value_counts().to_pylist():
            counts[entry["values"]] = counts.get(entry["values"], 0) + entry["counts"]
    return counts


def dataset(paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> ray.data.Dataset:
    """Parquet files or folders (local paths or URIs of one store) as a Ray dataset that every node
    can read (a path in the working copy of a run dir in a store is read from the store)."""
    import ray

    many = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    resolved = [resolve(shared(path)) for path in many]
    return ray.data.read_parquet([root for _, root in resolved], filesystem=resolved[0][0])


def local_copy(target: str) -> str:
    """A local folder with the contents of ``target``: ``target`` itself unless it is a URI, which is
    downloaded once per machine and version (under ``~/.cache/ttpa/store/``, keyed by the URI and
    its files' sizes and times; a lock keeps the replicas of one node to one download)."""
    if not is_uri(target):
        return target
    fs, path = resolve(target)
    files = _files(fs, path)
    if not files:
        raise FileNotFoundError(f"{target}: no model folder there")
    listing = sorted((name, info.size, str(info.mtime)) for name, info in files.items())
    digest = hashlib.sha256(json.dumps([target.rstrip("/"), listing]).encode()).hexdigest()[:16]
    folder = CACHE / "store" / digest
    done = folder / ".complete"
    folder.mkdir(parents=True, exist_ok=True)
    with (CACHE / "store" / f"{digest}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.is_file():
            pafs.copy_files(path, str(folder), source_filesystem=fs)
            done.write_text(target, encoding="utf-8")
    return str(folder)
