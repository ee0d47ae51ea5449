"""Alignment benchmark: the paper's table in miniature on the real default model. Does TTPA beat SFT?

    .venv/bin/python bench/alignment.py [--quick] [--run-dir DIR] [key=value ...]

Runs the whole job (``ttpa run``: reverse construction, SFT, TPS, ESM pairs, DPO, the sequence-level
baseline, evaluation) on SmolLM2-135M-Instruct from configs/local.yaml, at a larger size than
``make run``: more seeds, so that the held-out split of reversed dialogues (never seen by SFT, TPS or
DPO) has enough turns, and every BFCL category the evaluation knows. The rows are the evaluation's:
base, SFT only, SFT + DPO on TPS pairs (ttpa), SFT + DPO on sequence-level pairs (sequence), the same
number of pairs and steps for the last two. Every figure has its 95% bootstrap interval over the
questions; the lines before the last print the table and the paired comparisons.

The training settings are configs/local.yaml's; nothing here is tuned on the held-out or BFCL
questions. Extra ``key=value`` arguments override the config, e.g. to try other settings on a
validation run (point ``eval.heldout_dialogues`` at a validation split, not at the test one).

Sizes: full, 160 seeds and 12 entries per BFCL category (about 90 minutes here); --quick, 64 seeds and
6 entries per category (about 25 minutes).
Last line: ``ttpa_minus_sft_heldout_esm = <number>``, the ttpa row's mean ESM minus the SFT row's on
the held-out reversed turns (paired, the same turns).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ttpa_ray.config import load_config  # noqa: E402
from ttpa_ray.evaluate import HELDOUT_CATEGORY  # noqa: E402
from ttpa_ray.pipeline import run_pipeline  # noqa: E402
from ttpa_ray.progress import console_and_log  # noqa: E402

ROWS = ("base", "sft", "ttpa", "sequence")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 seeds, 6 entries per category")
    parser.add_argument("--run-dir", type=Path, default=None, help="default: a fresh temporary folder")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args()
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="ttpa-alignment-"))
    sizes = (
        ["reverse.num_seeds=64", "eval.limit_per_category=6"]
        if args.quick
        else ["reverse.num_seeds=160", "eval.limit_per_category=12"]
    )
    config = load_config(
        ROOT / "configs" / "local.yaml",
        [
            f"run.run_dir={run_dir}",
            "run.name=alignment",
            "eval.categories=[simple_python,multiple,parallel,parallel_multiple,live_simple,live_multiple,irrelevance]",
            *sizes,
            *args.overrides,
        ],
    )
    start = time.perf_counter()
    with console_and_log(run_dir / "logs" / "run.log") as console:
        run_pipeline(config, console)
        import ray

        ray.shutdown()
    minutes = (time.perf_counter() - start) / 60
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    out = Console(width=140)
    out.print(
        f"alignment bench ({'quick' if args.quick else 'full'}) in {minutes:.1f} min; run dir {run_dir}"
    )
    out.print((run_dir / "eval" / "report.md").read_text())
    rows = [r for r in ROWS if r in report]
    for category in (HELDOUT_CATEGORY, "all"):
        for row in rows:
            s = report[row].get(category)
            if s:
                low, high = s["mean_esm_ci"]
                out.print(
                    f"{category:>16} {row:>8}: mean ESM {s['mean_esm']:.3f} [{low:.3f}, {high:.3f}]"
                    f" n={s['n']}"
                )
    difference = None
    for comparison in report["comparisons"]:
        if (comparison["row"], comparison["baseline"], comparison["category"], comparison["metric"]) == (
            "ttpa",
            "sft",
            HELDOUT_CATEGORY,
            "mean_esm",
        ):
            difference = comparison["difference"]
    if difference is None:
        out.print("no paired ttpa/sft comparison on held-out turns (no SFT or no held-out dialogue)")
        print("ttpa_minus_sft_heldout_esm = nan")
    else:
        print(f"ttpa_minus_sft_heldout_esm = {difference:.4f}")


if __name__ == "__main__":
    main()
