"""The run directory's dialogue split, in one place: every entry point reads its dialogues through it.

``<run_dir>/dialogues/{train,validation,heldout}.parquet``, Parquet folders written once by the
reverse stage from its shards, in Ray Data: ``train`` is what SFT, TPS and DPO see; ``validation``
is for choosing training settings; ``heldout`` is only ever asked by the evaluation. Nothing falls
back to the reverse stage's shards (which hold every dialogue): a missing split is an error naming
the file.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ttpa_ray import store
from ttpa_ray.records import Dialogue, read_parquet, to_table

if TYPE_CHECKING:
    import ray

SPLIT_DIR = "dialogues"
PARTS = ("train", "validation", "heldout")


class SplitMissing(FileNotFoundError):
    """The run has no split yet (the reverse stage writes it)."""


class HeldOutOverlap(ValueError):
    """Dialogues given for training include held-out ones."""


def split_path(run_dir: Path, part: str) -> Path:
    """Where one part of a run's split lives."""
    if part not in PARTS:
        raise ValueError(f"unknown split part {part!r}; known: {', '.join(PARTS)}")
    return Path(run_dir) / SPLIT_DIR / f"{part}.parquet"


def _part(run_dir: Path, part: str) -> Path | None:
    """A part's path; None for a split written without a validation part; :class:`SplitMissing`
    naming the file when the split is not there."""
    path = split_path(run_dir, part)
    if not path.exists():
        if part == "validation" and split_path(run_dir, "train").exists():
            return None
        raise SplitMissing(f"{path} does not exist: run the reverse stage first (it writes the split)")
    return path


def read_split(run_dir: Path, part: str) -> list[Dialogue]:
    """The dialogues of one part (for small runs and tests: stages read the folder in Ray Data)."""
    path = _part(run_dir, part)
    return read_parquet(Dialogue, path) if path is not None else []


def part_size(run_dir: Path, part: str) -> int:
    """How many dialogues a part holds, from the Parquet footers."""
    path = _part(run_dir, part)
    return store.count_rows(path) if path is not None else 0


def check_not_heldout(run_dir: Path, dialogues: Sequence[Dialogue]) -> None:
    """Refuse training dialogues that the run holds out for validation or evaluation (one line)."""
    kept = set()
    for part in ("validation", "heldout"):
        path = split_path(run_dir, part)
        if path.exists():
            kept |= set(pq.read_table(path, columns=["dialogue_id"]).column("dialogue_id").to_pylist())
    overlap = sorted(kept.intersection(d.dialogue_id for d in dialogues))
    if overlap:
        raise HeldOutOverlap(
            f"{len(overlap)} of the given dialogues are held out by {Path(run_dir) / SPLIT_DIR} "
            f"(e.g. {', '.join(overlap[:3])}): training on them would leak them into the evaluation"
        )


def split_key(seed: int, dialogue_id: str) -> int:
    """Where a dialogue ranks in the split: a stable hash of (run seed, id), as an unsigned 64-bit int."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{dialogue_id}".encode()).digest()[:8], "big")


def part_sizes(n: int, heldout_fraction: float, validation_fraction: float = 0.0) -> tuple[int, int]:
    """(held out, validation) of ``n`` dialogues: ``ceil(fraction * n)`` each, at least one left to train."""

    def count(fraction: float) -> int:
        return math.ceil(round(fraction * n, 9)) if fraction > 0 and n >= 2 else 0

    heldout = min(n - 1, count(heldout_fraction)) if n else 0
    return heldout, max(0, min(n - 1 - heldout, count(validation_fraction))) if n else 0


def bounds(keys: np.ndarray, heldout: int, validation: int) -> tuple[int, int]:
    """Keys below the first bound are held out, those below the second validate: the ``heldout``
    lowest keys, then the next ``validation`` (keys are distinct, as dialogue ids are)."""

    def kth(k: int) -> int:
        return int(np.partition(keys, k)[k]) if k else 0

    return kth(heldout), kth(heldout + validation)


def parts_of(keys: np.ndarray, limits: tuple[int, int]) -> np.ndarray:
    """The part of each key (:func:`bounds`)."""
    return np.where(keys < limits[0], "heldout", np.where(keys < limits[1], "validation", "train"))


def id_keys(ids: Sequence[str], seed: int) -> np.ndarray:
    """:func:`split_key` of each id, as uint64."""
    return np.fromiter((split_key(seed, i) for i in ids), dtype=np.uint64, count=len(ids))


def split_dialogues(
    dialogues: Sequence[Dialogue], heldout_fraction: float, seed: int, validation_fraction: float = 0.0
) -> dict[str, list[Dialogue]]:
    """{train, validation, heldout} of a list: the rule :func:`write_split` applies to a dataset.

    The first ``ceil(heldout_fraction * n)`` dialogues by :func:`split_key` are held out, the next
    ``ceil(validation_fraction * n)`` validate: deterministic, independent of the order the dialogues
    come in; at least one dialogue stays for training."""
    keys = id_keys([d.dialogue_id for d in dialogues], seed)
    limits = bounds(keys, *part_sizes(len(keys), heldout_fraction, validation_fraction))
    parts: dict[str, list[Dialogue]] = {part: [] for part in PARTS}
    for dialogue, part in zip(dialogues, parts_of(keys, limits), strict=True):
        parts[str(part)].append(dialogue)
    return parts


@dataclass
class SplitReport:
    """How many dialogues went to each part, and where."""

    counts: dict[str, int]
    paths: dict[str, Path]


def write_split(
    run_dir: Path,
    dialogues: ray.data.Dataset | Sequence[Dialogue],
    heldout_fraction: float,
    seed: int,
    validation_fraction: float = 0.0,
) -> SplitReport:
    """Split a dataset of dialogues (:func:`split_dialogues`'s rule) and write every part as a Parquet
    folder, in Ray Data: the driver gets the split keys (8 bytes a dialogue) to find the bounds, never
    the dialogues; the cluster writes each part (:func:`~ttpa_ray.store.write_folder`: anew, into
    the store when the run dir is in one)."""
    import ray

    if not isinstance(dialogues, ray.data.Dataset):
        dialogues = ray.data.from_arrow(to_table(list(dialogues), Dialogue))

    keys = id_key_array(dialogues, "dialogue_id", seed)
    heldout, validation = part_sizes(len(keys), heldout_fraction, validation_fraction)
    limits = bounds(keys, heldout, validation)

    paths = {part: split_path(run_dir, part) for part in PARTS}
    for part, path in paths.items():

        def only(batch: pa.Table, part: str = part) -> pa.Table:
            mine = id_keys(batch.column("dialogue_id").to_pylist(), seed)
            return batch.filter(pa.array(parts_of(mine, limits) == part))

        store.write_folder(dialogues.map_batches(only, batch_format="pyarrow"), path, to_table([], Dialogue))
    counts = {"train": len(keys) - heldout - validation, "validation": validation, "heldout": heldout}
    return SplitReport(counts, paths)


def id_key_array(ds: ray.data.Dataset, column: str, seed: int) -> np.ndarray:
    """:func:`split_key` of every row's ``column``, computed by the cluster (8 bytes a row reach the
    driver)."""

    def with_keys(batch: pa.Table) -> pa.Table:
        return pa.table({"key": id_keys(batch.column(column).to_pylist(), seed)})

    batches = ds.select_columns([column]).map_batches(with_keys, batch_format="pyarrow")
    found = (b["key"] for b in batches.iter_batches(batch_format="numpy", batch_size=None))
    return np.concatenate([np.empty(0, dtype=np.uint64), *found]).astype(np.uint64)


def keep_lowest(ds: ray.data.Dataset, column: str, n: int, seed: int, path: Path, empty: pa.Table) -> int:
    """Write the ``n`` rows of ``ds`` with the lowest :func:`split_key` of ``column`` (a sample that
    the seed fixes, whatever the order; all rows when there are no more) as the Parquet folder
    ``path`` (``empty``: its schema when no row is kept); returns the rows written."""
    keys = id_key_array(ds, column, seed)
    if n < len(keys):
        limit = bounds(keys, n, 0)[0]

        def below(batch: pa.Table) -> pa.Table:
            return batch.filter(pa.array(id_keys(batch.column(column).to_pylist(), seed) < limit))

        ds = ds.map_batches(below, batch_format="pyarrow")
    return store.write_folder(ds, path, empty)


def first_dialogue(run_dir: Path, part: str = "train") -> Dialogue | None:
    """One dialogue of a part (the console shows it), read without reading the part."""
    import pyarrow.dataset as pads

    head = pads.dataset(split_path(run_dir, part), format="parquet").head(1)
    return Dialogue.from_row(head.to_pylist()[0]) if head.num_rows else None
