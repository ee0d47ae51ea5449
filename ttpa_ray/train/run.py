"""One training stage from the driver: check inputs, precompute the reference, train on Ray, export.

``run_stage("dpo", train_config, policy=..., run_dir=...)`` reads the pairs (or, for "sft", the
dialogues), writes the rows that fail the checks to ``<out>/rejected.parquet`` with their reasons,
computes the DPO reference log-probs when configured (on the vLLM replicas by default), runs the
TorchTrainer and copies the exported policy to ``<out>/policy``. Outputs land in
``<train.output_dir or run_dir/train>/<stage>/``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ttpa_ray import store
from ttpa_ray.config import TrainConfig, VLLMConfig, resolve_deepspeed_path
from ttpa_ray.progress import JsonLinesWatcher
from ttpa_ray.records import Dialogue, PreferencePair
from ttpa_ray.train.data import (
    CheckedData,
    chat_token_counter,
    check_dialogues,
    check_pairs,
    read_rows,
    write_rejected,
)
from ttpa_ray.train.ray_trainer import CrashOnce, Stage, TrainJob, TrainResult, run_torch_trainer

POLICY_DIR = "policy"


class TrainInputError(ValueError):
    """No usable training rows, or an input the user must fix before training can start."""


@dataclass
class StageOutcome:
    """The result of :func:`run_stage`: where things are and how many rows were used or rejected."""

    stage: Stage
    out_dir: Path
    rows_used: int
    rows_rejected: int
    reject_counts: dict[str, int]
    result: TrainResult


# ZeRO-3 keys that HF/accelerate do not size from the model; "auto" here means one decoder layer (see below).
ZERO3_LAYER_SIZED = ("stage3_max_live_parameters", "stage3_max_reuse_distance")


def load_deepspeed(name_or_path: str | None, model_path: str | Path | None = None) -> dict[str, Any] | None:
    """The DeepSpeed config dict named by ``train.deepspeed``.

    "auto" values are left to HF/accelerate, except :data:`ZERO3_LAYER_SIZED`, which HF does not fill: they
    become one decoder layer of the model at ``model_path`` (:func:`decoder_layer_numel`). DeepSpeed's own
    default for both is 1e9 parameters: a ZeRO-3 rank keeps a gathered parameter while it is reused within
    that many parameters and never releases it within a step when the whole model is smaller, so for any
    model under 1B parameters ZeRO-3 then holds the full gathered model through forward and backward (a
    72M-parameter probe on 2 ranks held 276 MiB more than with one layer). One layer keeps only the block
    being computed (and the next one prefetched) gathered; for a 7B model that is ~0.5 GB of bf16 weights
    instead of ~2 GB, at the cost of gathering the last layers again at the start of the backward.
    Without ``model_path`` the "auto" keys are dropped, i.e. DeepSpeed's defaults apply.
    """
    if name_or_path is None:
        return None
    config: dict[str, Any] = json.loads(resolve_deepspeed_path(name_or_path).read_text(encoding="utf-8"))
    zero = config.get("zero_optimization", {})
    auto = [key for key in ZERO3_LAYER_SIZED if zero.get(key) == "auto"]
    if auto:
        layer = decoder_layer_numel(model_path) if model_path is not None else None
        for key in auto:
            if layer is None:
                del zero[key]
            else:
                zero[key] = layer
    return config


def decoder_layer_numel(model_path: str | Path) -> int | None:
    """Parameters in the largest block the model declares unsplittable (``_no_split_modules``: its decoder
    layer, e.g. ``Qwen2DecoderLayer``), counted on the meta device without reading weights; None when the
    model declares none."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    sizes = [sum(p.numel() for p in m.parameters()) for m in model.modules() if type(m).__name__ in blocks]
    return max(sizes) if sizes else None


def check_inputs(stage: Stage, rows: list[dict[str, Any]], tokenizer: Any, max_length: int) -> CheckedData:
    """The pre-training checks of one stage (pairs for DPO, dialogues for SFT)."""
    count = chat_token_counter(tokenizer)
    if stage == "dpo":
        return check_pairs(rows, count, max_length)
    return check_dialogues(rows, count, max_length)


def stage_dir(train: TrainConfig, run_dir: Path, stage: Stage) -> Path:
    """Where a stage writes its outputs."""
    return (train.output_dir or Path(run_dir) / "train") / stage


def default_source(stage: Stage, run_dir: Path) -> Path:
    """What a stage trains on when nothing is named: the pairs, or the train part of the reverse
    stage's split (never its validation or held-out part; no split is an error naming the file)."""
    from ttpa_ray.rundir import SplitMissing, split_path

    if stage == "dpo":
        return run_dir / "pairs" / "pairs.parquet"
    path = split_path(run_dir, "train")
    if not path.exists():
        raise SplitMissing(f"{path} does not exist: run the reverse stage first, or name train.dialogues")
    return path


@contextlib.contextmanager
def _shm_cleaned() -> Iterator[None]:
    """DeepSpeed's CPU all-reduce buffers in /dev/shm outlive every run (2 x 69 MB each): remove the
    unused ones once training ends, however it ends."""
    from ttpa_ray.reaper import remove_unused_shm

    try:
        yield
    finally:
        remove_unused_shm()


def rows_for_steps(table: pa.Table, train: TrainConfig, seed: int) -> pa.Table:
    """The pairs DPO's ``max_steps`` will see: all of them when the steps cover an epoch, else a
    seeded draw of exactly as many as the steps take (the trainer would have drawn that many from its
    shuffle), so the reference log-probs are computed only for pairs that are trained on."""
    dpo = train.dpo
    wanted = dpo.max_steps * train.num_workers * dpo.per_device_batch_size * dpo.gradient_accumulation_steps
    if dpo.max_steps <= 0 or wanted >= table.num_rows:
        return table
    chosen = sorted(random.Random(seed).sample(range(table.num_rows), wanted))
    print(
        f"[dpo] {dpo.max_steps} steps take {wanted} of the {table.num_rows} pairs: a seeded draw of "
        f"{wanted} is trained on (the others stay in the pairs file)",
        flush=True,
    )
    return table.take(chosen)


def dialogue_of(pair_id: str) -> str:
    """The dialogue a pair comes from. The pairs stage names a pair ``<turn_id>/tps/...`` or
    ``<turn_id>/sequence/...`` with ``turn_id`` = ``<dialogue_id>/<turn>`` (a BFCL turn's dialogue id is
    ``bfcl/<entry>``); another id counts up to its first ``/``."""
    for sampler in ("/tps/", "/sequence/"):
        if sampler in pair_id:
            return pair_id.split(sampler, 1)[0].rsplit("/", 1)[0]
    return pair_id.split("/", 1)[0]


def hold_back_pairs(table: pa.Table, fraction: float, seed: int) -> tuple[pa.Table, pa.Table]:
    """(train, held back): the pairs of a seeded ``fraction`` of their dialogues are held back (at least
    one dialogue when there are two or more and the fraction is not 0; never all of them)."""
    owners = [dialogue_of(p) for p in table.column("pair_id").to_pylist()]
    dialogues = sorted(set(owners))
    count = min(max(1, round(fraction * len(dialogues))), len(dialogues) - 1) if fraction > 0 else 0
    held = set(random.Random(seed).sample(dialogues, count))
    mask = pa.array([owner in held for owner in owners], pa.bool_())
    return table.filter(pc.invert(mask)), table.filter(mask)


def run_stage(
    stage: Stage,
    train: TrainConfig,
    *,
    policy: str,
    run_dir: Path,
    seed: int = 0,
    run_name: str = "local",
    input_path: Path | None = None,
    sample_log: bool = True,
    crash: CrashOnce | None = None,
    dtype: str = "float32",
    progress: Callable[[dict[str, Any]], None] | None = None,
    out_dir: Path | None = None,
    vllm: VLLMConfig | None = None,
) -> StageOutcome:
    """Check the inputs, precompute the DPO reference if asked, train on Ray Train and export.

    ``out_dir`` (default :func:`stage_dir`) lets a second run of a stage (the sequence-level
    baseline's DPO) keep its own checkpoints and policy. ``vllm``: the replicas that compute the
    reference log-probs when ``train.dpo.reference`` is ``replicas`` (default: VLLMConfig's defaults)."""
    from transformers import AutoTokenizer

    run_dir = Path(run_dir)
    out = out_dir or stage_dir(train, run_dir, stage)
    out.mkdir(parents=True, exist_ok=True)
    stage_cfg = train.dpo if stage == "dpo" else train.sft
    model_path = policy
    if stage == "dpo" and train.dpo.init_from_sft:
        sft_policy = stage_dir(train, run_dir, "sft") / POLICY_DIR
        if (sft_policy / "config.json").is_file():
            model_path = str(sft_policy.resolve())  # absolute: workers do not share the driver's cwd
    default_input = train.pairs if stage == "dpo" else train.dialogues
    source = Path(input_path or default_input or default_source(stage, run_dir))
    if stage == "dpo" and (source / "pairs.parquet").exists():  # a pairs stage's folder
        source = source / "pairs.parquet"
    record = PreferencePair if stage == "dpo" else Dialogue

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    checked = check_inputs(stage, read_rows(source, record), tokenizer, stage_cfg.max_length)
    write_rejected(checked.rejected, out / "rejected.parquet")
    print(f"[{stage}] input checks on {source}: {checked.summary()}", flush=True)
    if checked.num_rows == 0:
        raise TrainInputError(
            f"{stage}: no usable rows in {source} ({checked.summary()}); see {out / 'rejected.parquet'}"
        )
    table = checked.table
    held_back = table.slice(0, 0)
    if stage == "dpo":
        table, held_back = hold_back_pairs(table, train.dpo.validation_fraction, seed)
        if held_back.num_rows:
            dialogues = len(set(map(dialogue_of, held_back["pair_id"].to_pylist())))
            print(
                f"[dpo] {held_back.num_rows} pairs of {dialogues} dialogues held back from training "
                f"(train.dpo.validation_fraction "
                f"{train.dpo.validation_fraction}): the trained policy is evaluated on them",
                flush=True,
            )
        table = rows_for_steps(table, train, seed)
    precomputed = stage == "dpo" and train.dpo.reference != "live"
    if precomputed and "ref_chosen_logps" not in table.column_names:
        trained = table.num_rows
        table = pa.concat_tables([table, held_back])  # one reference pass over both parts
        start = time.perf_counter()
        if train.dpo.reference == "replicas":
            from ttpa_ray.reference import replica_reference_logps

            table = replica_reference_logps(
                vllm or VLLMConfig(),
                model_path,
                table,
                max_length=stage_cfg.max_length,
                dtype=dtype,
                seed=seed,
            )
        else:
            from ttpa_ray.train.dpo import precompute_reference_logps

            table = precompute_reference_logps(
                model_path,
                table,
                max_length=stage_cfg.max_length,
                dtype=dtype,
                shared_prefix=train.dpo.shared_prefix,
            )
        print(
            f"[{stage}] reference log-probs of {table.num_rows} pairs ({train.dpo.reference}) in "
            f"{time.perf_counter() - start:.1f} s",
            flush=True,
        )
        table, held_back = table.slice(0, trained), table.slice(trained)
    data_path = out / "train_table.parquet"
    pq.write_table(table, data_path)
    eval_path = out / "heldback_table.parquet"
    eval_path.unlink(missing_ok=True)
    if held_back.num_rows:
        pq.write_table(held_back, eval_path)

    # In a run dir in an object store, the checkpoints and the table go there, and the workers fetch
    # the model from there (store.shared); otherwise all three are local paths.
    storage = train.storage_path or store.shared((out / store.RAY_STORAGE).resolve())
    progress_file = out / "progress.jsonl"  # a line per logged step, for the driver's progress bar
    progress_file.unlink(missing_ok=True)
    job = TrainJob(
        stage=stage,
        model_path=store.shared(model_path),
        data_path=store.shared(data_path.resolve()),
        eval_path=store.shared(eval_path.resolve()) if held_back.num_rows else None,
        work_dir=str(Path(tempfile.gettempdir()) / f"ttpa-train-{os.getpid()}-{run_name}-{out.name}"),
        stage_config=stage_cfg.model_dump(mode="json"),
        deepspeed=load_deepspeed(train.deepspeed, model_path),
        use_gpu=train.use_gpu,
        seed=train.seed if train.seed is not None else seed,
        save_steps=train.save_steps,
        logging_steps=train.logging_steps,
        report_to=tuple(train.report_to),
        tensorboard_dir=str((out / "tensorboard").resolve()) if "tensorboard" in train.report_to else None,
        precomputed_reference=precomputed,
        gradient_checkpointing=train.gradient_checkpointing,
        lora=train.lora.model_dump(mode="json") if train.lora is not None else None,
        sample_log_dir=str((out / "samples").resolve()) if sample_log else None,
        crash=crash,
        dtype=dtype,
        progress_file=str(progress_file.resolve()),
    )
    watcher = JsonLinesWatcher(progress_file, progress) if progress else contextlib.nullcontext()
    with watcher, _shm_cleaned():
        result = run_torch_trainer(
            job,
            num_workers=train.num_workers,
            resources_per_worker=train.worker_resources(),
            accelerator_type=train.accelerator_type,
            run_name=f"{run_name}-{out.name}",
            storage_path=storage,
            keep_checkpoints=train.keep_checkpoints,
            max_failures=train.max_failures,
            export_dir=out / POLICY_DIR,
        )
    (out / "metrics.json").write_text(
        json.dumps({"final": result.metrics, "history": result.history}, indent=1, default=str),
        encoding="utf-8",
    )
    return StageOutcome(stage, out, checked.num_rows, len(checked.rejected), checked.reject_counts(), result)
