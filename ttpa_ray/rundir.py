"""The run directory's dialogue split, in one place: every entry point reads its dialogues through it.

``<run_dir>/dialogues/{train,validation,heldout}.parquet``, written once by the reverse stage from its
shards: ``train`` is what SFT, TPS and DPO see; ``validation`` is for choosing training settings;
``heldout`` is only ever asked by the evaluation. Nothing falls back to the reverse stage's shards
(which hold every dialogue): a missing split is an error naming the file.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ttpa_ray.records import Dialogue, read_parquet, write_parquet

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


def read_split(run_dir: Path, part: str) -> list[Dialogue]:
    """The dialogues of one part; :class:`SplitMissing` naming the file when the split is not there."""
    path = split_path(run_dir, part)
    if not path.is_file():
        if part == "validation" and split_path(run_dir, "train").is_file():
            return []  # a split written without a validation part
        raise SplitMissing(f"{path} does not exist: run the reverse stage first (it writes the split)")
    return read_parquet(Dialogue, path)


def check_not_heldout(run_dir: Path, dialogues: Sequence[Dialogue]) -> None:
    """Refuse training dialogues that the run holds out for validation or evaluation (one line)."""
    kept = set()
    for part in ("validation", "heldout"):
        path = split_path(run_dir, part)
        if path.is_file():
            kept |= {d.dialogue_id for d in read_parquet(Dialogue, path)}
    overlap = sorted(kept.intersection(d.dialogue_id for d in dialogues))
    if overlap:
        raise HeldOutOverlap(
            f"{len(overlap)} of the given dialogues are held out by {Path(run_dir) / SPLIT_DIR} "
            f"(e.g. {', '.join(overlap[:3])}): training on them would leak them into the evaluation"
        )


def split_dialogues(
    dialogues: Sequence[Dialogue], heldout_fraction: float, seed: int, validation_fraction: float = 0.0
) -> dict[str, list[Dialogue]]:
    """{train, validation, heldout}: dialogues ranked by a hash of (seed, id); the first
    ``ceil(heldout_fraction * n)`` are held out, the next ``ceil(validation_fraction * n)`` validate.

    Deterministic and independent of the order the dialogues come in; at least one dialogue stays
    for training.
    """
    n = len(dialogues)

    def count(fraction: float) -> int:
        return math.ceil(round(fraction * n, 9)) if fraction > 0 and n >= 2 else 0

    heldout = min(n - 1, count(heldout_fraction)) if n else 0
    validation = max(0, min(n - 1 - heldout, count(validation_fraction))) if n else 0

    def rank(dialogue: Dialogue) -> bytes:
        return hashlib.sha256(f"{seed}/{dialogue.dialogue_id}".encode()).digest()

    ranked = [d.dialogue_id for d in sorted(dialogues, key=rank)]
    part_of = {i: "heldout" for i in ranked[:heldout]}
    part_of.update({i: "validation" for i in ranked[heldout : heldout + validation]})
    parts: dict[str, list[Dialogue]] = {part: [] for part in PARTS}
    for dialogue in dialogues:
        parts[part_of.get(dialogue.dialogue_id, "train")].append(dialogue)
    return parts


@dataclass
class SplitReport:
    """How many dialogues went to each part, and where."""

    counts: dict[str, int]
    paths: dict[str, Path]


def write_split(
    run_dir: Path,
    dialogues: Sequence[Dialogue],
    heldout_fraction: float,
    seed: int,
    validation_fraction: float = 0.0,
) -> SplitReport:
    """Split ``dialogues`` (:func:`split_dialogues`) and write every part."""
    parts = split_dialogues(dialogues, heldout_fraction, seed, validation_fraction)
    paths = {part: write_parquet(rows, split_path(run_dir, part), Dialogue) for part, rows in parts.items()}
    return SplitReport({part: len(rows) for part, rows in parts.items()}, paths)
