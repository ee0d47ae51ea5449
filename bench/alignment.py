"""Alignment benchmark: the paper's table in miniature on the real default model. Does TTPA beat SFT?

    .venv/bin/python bench/alignment.py [--quick] [--no-tune] [--run-dir DIR] [key=value ...]

Runs the method's stages (reverse construction, SFT, TPS, ESM pairs, DPO, the sequence-level
baseline, evaluation) on SmolLM2-135M-Instruct from configs/local.yaml, at a larger size than
``make run``: more seeds, so that the held-out reversed dialogues (never seen by SFT, TPS or DPO)
have enough turns, and every BFCL category the evaluation knows. The rows are the evaluation's:
base, SFT only, SFT + DPO on TPS pairs (ttpa), SFT + DPO on sequence-level pairs (sequence), with
the same number of pairs and steps for the last two. Every figure has its 95% bootstrap interval
over the questions; the lines before the last print the table and the paired comparisons.

Settings are chosen on a validation split, never on the held-out or BFCL questions: the reverse
stage keeps 15% of the dialogues as validation (``eval.validation_fraction``, not trained on); before
the final DPO runs, DPO is trained once per setting of :data:`GRID` (beta x learning rate) and
evaluated on the validation turns only; the setting with the best validation mean ESM is used for
both DPO rows. Every setting tried and its validation score are printed. ``--no-tune`` (and
``--quick``) keep configs/local.yaml's settings instead.

Training: SFT 16 steps, DPO 8 (longer than ``make run``'s 12 and 6). Since 73c8670 DPO trains on a
seeded draw of the pairs its steps take instead of the trainer's own draw; the figures below were
measured before that.
Sizes: full, 160 seeds and 12 entries per BFCL category (58.8 minutes measured, tuning included);
--quick, 64 seeds, 6 entries per category, no tuning (21.3 minutes measured). Seeds come from the
built-in catalogue: with BFCL's executable environments added (``reverse.catalogue=builtin+bfcl``),
a shard of 16 seeds took 746 s of 1,474 requests and gave no dialogue (restart 7,
no_successful_call 7, too_few_tools 2) on the 135M teacher, so the full size would not fit in 90
minutes and would add nothing.
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

from ttpa_ray.config import TTPAConfig, load_config  # noqa: E402
from ttpa_ray.evaluate import HELDOUT_CATEGORY, run_evaluation  # noqa: E402
from ttpa_ray.pipeline import STAGES, RunContext, train_policy  # noqa: E402
from ttpa_ray.progress import console_and_log  # noqa: E402
from ttpa_ray.rundir import read_split, split_path  # noqa: E402

ROWS = ("base", "sft", "ttpa", "sequence")
GRID = [{"beta": beta, "learning_rate": lr} for beta in (0.1, 0.5) for lr in (5e-6, 2e-5)]
CATEGORIES = "[simple_python,multiple,parallel,parallel_multiple,live_simple,live_multiple,irrelevance]"


def with_dpo(config: TTPAConfig, **settings: float) -> TTPAConfig:
    dpo = config.train.dpo.model_copy(update=settings)
    return config.model_copy(update={"train": config.train.model_copy(update={"dpo": dpo})})


def tune(ctx: RunContext, out: Console) -> TTPAConfig:
    """DPO once per :data:`GRID` setting, each scored on the validation turns only; the best config."""
    validation = split_path(ctx.run_dir, "validation")
    if not read_split(ctx.run_dir, "validation"):
        out.print("no validation dialogue: keeping the config's settings")
        return ctx.config
    eval_only_validation = {"categories": [], "heldout_dialogues": validation}
    tried = []
    for number, settings in enumerate(GRID):
        config = with_dpo(ctx.config, **settings)
        trial = RunContext(config, ctx.run_dir, ctx.console, models=dict(ctx.models))
        train_policy(trial, "dpo", "tune", out_dir=ctx.run_dir / "train" / f"dpo-tune-{number}")
        scoring = config.model_copy(update={"eval": config.eval.model_copy(update=eval_only_validation)})
        run = run_evaluation(scoring, {"tune": trial.models["tune"]}, ctx.run_dir / "tune" / str(number))
        score = run.summaries["tune"]["all"]
        tried.append((score.mean_esm, settings))
        out.print(
            f"tune {settings}: validation mean ESM {score.mean_esm:.3f} "
            f"[{score.mean_esm_ci[0]:.3f}, {score.mean_esm_ci[1]:.3f}] n={score.n}"
        )
    best = max(tried, key=lambda t: t[0])[1]
    out.print(f"chosen on validation: {best}")
    return with_dpo(ctx.config, **best)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 seeds, 6 entries per category, no tuning")
    parser.add_argument("--no-tune", action="store_true", help="keep the config's DPO settings")
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
            f"eval.categories={CATEGORIES}",
            "eval.validation_fraction=0.15",
            # the training lengths its figures were measured with (local.yaml shortened them for make run)
            "train.sft.max_steps=16",
            "train.dpo.max_steps=8",
            *sizes,
            *args.overrides,
        ],
    )
    out = Console(width=140)
    start = time.perf_counter()
    with console_and_log(run_dir / "logs" / "run.log") as console:
        ctx = RunContext(config, run_dir, console)
        stages = dict((name, fn) for name, _, fn in STAGES)
        for name in ("prepare-models", "reverse", "sft", "tps", "pairs"):
            console.print(f"[bold cyan]>> {name}[/bold cyan]")
            stages[name](ctx)
        if not (args.quick or args.no_tune):
            ctx.config = tune(ctx, console)
        for name in ("dpo", "sequence", "evaluate"):
            console.print(f"[bold cyan]>> {name}[/bold cyan]")
            stages[name](ctx)
        import ray

        ray.shutdown()
    minutes = (time.perf_counter() - start) / 60
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    out.print(
        f"alignment bench ({'quick' if args.quick else 'full'}) in {minutes:.1f} min; run dir {run_dir}"
    )
    dpo = ctx.config.train.dpo
    out.print(f"DPO settings used: beta {dpo.beta}, learning rate {dpo.learning_rate}")
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
