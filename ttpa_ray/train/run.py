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
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
from ray.data.expressions import col

from ttpa_ray import store
from ttpa_ray.config import TrainConfig, VLLMConfig, resolve_deepspeed_path
from ttpa_ray.progress import JsonLinesWatcher
from ttpa_ray.records import Dialogue, PreferencePair, RejectedRow, batch_from_rows, unpack
from ttpa_ray.rundir import bounds, id_key_array, id_keys
from ttpa_ray.train.data import (
    REF_COLUMNS,
    CheckedData,
    chat_token_counter,
    check_batch,
    check_dialogues,
    check_pairs,
    input_files,
    trainer_schema,
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
        return run_dir / "pairs"
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


def steps_limit(keys: np.ndarray, train: TrainConfig) -> int | None:
    """The pairs DPO's ``max_steps`` will see: None when the steps cover an epoch (all of them), else
    the bound below which exactly as many pair keys lie as the steps take (the trainer would have
    drawn that many from its shuffle), so the reference log-probs are computed only for pairs that
    are trained on."""
    dpo = train.dpo
    wanted = dpo.max_steps * train.num_workers * dpo.per_device_batch_size * dpo.gradient_accumulation_steps
    if dpo.max_steps <= 0 or wanted >= len(keys):
        return None
    print(
        f"[dpo] {dpo.max_steps} steps take {wanted} of the {len(keys)} pairs: a seeded draw of "
        f"{wanted} is trained on (the others stay in the pairs file)",
        flush=True,
    )
    return bounds(keys, wanted, 0)[0]


def rows_for_steps(table: pa.Table, train: TrainConfig, seed: int) -> pa.Table:
    """:func:`steps_limit` on a table: the rows with the lowest seeded keys of their pair ids, in order."""
    keys = id_keys(table.column("pair_id").to_pylist(), seed)
    limit = steps_limit(keys, train)
    return table if limit is None else table.filter(pa.array(keys < limit))


def dialogue_of(pair_id: str) -> str:
    """The dialogue a pair comes from. The pairs stage names a pair ``<turn_id>/tps/...`` or
    ``<turn_id>/sequence/...`` with ``turn_id`` = ``<dialogue_id>/<turn>`` (a BFCL turn's dialogue id is
    ``bfcl/<entry>``); another id counts up to its first ``/``."""
    for sampler in ("/tps/", "/sequence/"):
        if sampler in pair_id:
            return pair_id.split(sampler, 1)[0].rsplit("/", 1)[0]
    return pair_id.split("/", 1)[0]


def held_limit(dialogue_keys: np.ndarray, fraction: float) -> int:
    """Pairs whose dialogue's key lies below this are held back: a seeded ``fraction`` of the
    dialogues (at least one when there are two or more and the fraction is not 0; never all)."""
    unique = np.unique(dialogue_keys)
    count = min(max(1, round(fraction * len(unique))), len(unique) - 1) if fraction > 0 else 0
    return bounds(unique, count, 0)[0]


def hold_back_pairs(table: pa.Table, fraction: float, seed: int) -> tuple[pa.Table, pa.Table]:
    """(train, held back) of a table by :func:`held_limit`."""
    keys = id_keys([dialogue_of(p) for p in table.column("pair_id").to_pylist()], seed)
    mask = pa.array(keys < held_limit(keys, fraction), pa.bool_())
    return table.filter(pc.invert(mask)), table.filter(mask)


HELD = "_held"  # a column of the training rows while they are prepared: held back from training


def _empty(schema: pa.Schema) -> pa.Table:
    return batch_from_rows([], schema)


def _kind(packed: ray.data.Dataset, kind: str, schema: pa.Schema) -> ray.data.Dataset:
    """The rows of one kind of a dataset of :func:`~ttpa_ray.records.pack` tables."""
    rows = packed.filter(expr=col(kind).is_not_null())
    return rows.map_batches(lambda batch: unpack(batch, kind, schema), batch_format="pyarrow")


def _reasons(folder: Path) -> dict[str, int]:
    return {
        r["reason"]: int(r["count()"]) for r in store.dataset(folder).groupby("reason").count().take_all()
    }


def _hold_back(rows: ray.data.Dataset, train: TrainConfig, seed: int) -> tuple[ray.data.Dataset, int]:
    """The pairs with a ``_held`` column (:func:`held_limit`), the training ones cut to what the steps
    take (:func:`steps_limit`), and how many are held back. The driver gets keys, 8 bytes a pair."""
    pair_keys = id_key_array(rows, "pair_id", seed)
    owners = rows.map_batches(
        lambda b: pa.table({"owner": [dialogue_of(p) for p in b.column("pair_id").to_pylist()]}),
        batch_format="pyarrow",
    )
    dialogue_keys = id_key_array(owners, "owner", seed)
    limit = held_limit(dialogue_keys, train.dpo.validation_fraction)
    held = dialogue_keys < limit
    steps = steps_limit(pair_keys[~held], train)

    def flagged(batch: pa.Table) -> pa.Table:
        mine = id_keys([dialogue_of(p) for p in batch.column("pair_id").to_pylist()], seed) < limit
        keep = ~mine
        if steps is not None:
            keep &= id_keys(batch.column("pair_id").to_pylist(), seed) < steps
        return batch.append_column(HELD, pa.array(mine)).filter(pa.array(keep | mine))

    if held.any():
        print(
            f"[dpo] {int(held.sum())} pairs of {len(np.unique(dialogue_keys[held]))} dialogues held back "
            f"from training (train.dpo.validation_fraction {train.dpo.validation_fraction}): the trained "
            "policy is evaluated on them",
            flush=True,
        )
    return rows.map_batches(flagged, batch_format="pyarrow"), int(held.sum())


def _with_reference(
    rows: ray.data.Dataset, train: TrainConfig, vllm: VLLMConfig | None, model: str, dtype: str, seed: int
) -> ray.data.Dataset:
    """The rows with the reference log-probs of ``model``: on the vLLM replicas, or (``precomputed``)
    by TRL on the driver, which then holds the pairs."""
    max_length = train.dpo.max_length
    if train.dpo.reference == "replicas":
        from ttpa_ray.reference import reference_dataset

        return reference_dataset(
            vllm or VLLMConfig(), model, rows, max_length=max_length, dtype=dtype, seed=seed
        )
    from ttpa_ray.train.dpo import precompute_reference_logps

    table = pa.concat_tables(ray.get(rows.to_arrow_refs()))
    done = precompute_reference_logps(
        model,
        table.drop_columns([HELD]),
        max_length=max_length,
        dtype=dtype,
        shared_prefix=train.dpo.shared_prefix,
    )
    return ray.data.from_arrow(done.append_column(HELD, table.column(HELD)))


@dataclass
class Tables:
    """What :func:`prepare_tables` wrote and counted."""

    kept: int
    rejected: int
    reasons: dict[str, int]
    held_back: int
    data_path: Path
    eval_path: Path


def prepare_tables(
    stage: Stage,
    train: TrainConfig,
    source: Path,
    model_path: str,
    out: Path,
    *,
    seed: int,
    vllm: VLLMConfig | None = None,
    dtype: str = "float32",
) -> Tables:
    """A stage's training tables, in Ray Data: the input rows checked with ``model_path``'s chat
    template (failures to ``rejected.parquet`` with their reasons), DPO's held-back pairs and the
    pairs its steps take chosen by seeded hashes, the reference log-probs added when configured, and
    ``train_table.parquet`` / ``heldback_table.parquet`` written by the cluster (folders under
    ``out``). The driver gets keys and counts; Ray must be running."""
    max_length = (train.dpo if stage == "dpo" else train.sft).max_length
    checked = (
        store.dataset(input_files(source, PreferencePair if stage == "dpo" else Dialogue))
        .map_batches(
            check_batch,  # type: ignore[arg-type]
            fn_kwargs={"stage": stage, "model": store.shared(model_path), "max_length": max_length},
            batch_format="pyarrow",
        )
        .materialize()
    )
    schema = trainer_schema(stage)
    rejected = store.write_folder(
        _kind(checked, "rejected", RejectedRow.SCHEMA), out / "rejected.parquet", _empty(RejectedRow.SCHEMA)
    )
    reasons = _reasons(out / "rejected.parquet") if rejected else {}
    rows = _kind(checked, "row", schema).materialize()  # read by the counts and keys below: unpacked once
    kept = rows.count()
    summary = ", ".join(f"{k}={v}" for k, v in sorted(reasons.items())) or "none"
    print(
        f"[{stage}] input checks on {source}: {kept} rows kept, {rejected} rejected ({summary})", flush=True
    )
    if kept == 0:
        raise TrainInputError(
            f"{stage}: no usable rows in {source} ({rejected} rejected: {summary}); "
            f"see {out / 'rejected.parquet'}"
        )
    held_back = 0
    if stage == "dpo":
        with_ref = rows.filter(
            expr=col(REF_COLUMNS[0]).is_not_null() & col(REF_COLUMNS[1]).is_not_null()
        ).count()
        if with_ref < kept:  # reference log-probs only when every row has them (TRL cannot batch nulls)
            schema = pa.schema([f for f in schema if f.name not in REF_COLUMNS])
            rows = rows.drop_columns(list(REF_COLUMNS))
        rows, held_back = _hold_back(rows, train, seed)
        precomputed = train.dpo.reference != "live"
        if precomputed and with_ref < kept:
            start = time.perf_counter()
            rows = _with_reference(rows, train, vllm, model_path, dtype, seed).materialize()
            schema = trainer_schema(stage)
            print(
                f"[{stage}] reference log-probs of {rows.count()} pairs ({train.dpo.reference}) in "
                f"{time.perf_counter() - start:.1f} s",
                flush=True,
            )
    else:
        rows = rows.map_batches(
            lambda b: b.append_column(HELD, pa.array([False] * b.num_rows)), batch_format="pyarrow"
        )
    rows = rows.materialize()
    data_path, eval_path = out / "train_table.parquet", out / "heldback_table.parquet"
    for path, held in ((data_path, False), (eval_path, True)):
        part = rows.filter(expr=col(HELD) == held).drop_columns([HELD])
        if held and not held_back:  # none, also from an earlier run (a folder, or a file before)
            shutil.rmtree(path, ignore_errors=True)
            path.unlink(missing_ok=True)
            continue
        store.write_folder(part, path, _empty(schema))

    return Tables(kept, rejected, reasons, held_back, data_path, eval_path)


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
    tables = prepare_tables(stage, train, source, model_path, out, seed=seed, vllm=vllm, dtype=dtype)

    # In a run dir in an object store, the checkpoints and the table go there, and the workers fetch
    # the model from there (store.shared); otherwise all three are local paths.
    storage = train.storage_path or store.shared((out / store.RAY_STORAGE).resolve())
    progress_file = out / "progress.jsonl"  # a line per logged step, for the driver's progress bar
    progress_file.unlink(missing_ok=True)
    job = TrainJob(
        stage=stage,
        model_path=store.shared(model_path),
        data_path=store.shared(tables.data_path.resolve()),
        eval_path=store.shared(tables.eval_path.resolve()) if tables.held_back else None,
        work_dir=str(Path(tempfile.gettempdir()) / f"ttpa-train-{os.getpid()}-{run_name}-{out.name}"),
        stage_config=stage_cfg.model_dump(mode="json"),
        deepspeed=load_deepspeed(train.deepspeed, model_path),
        use_gpu=train.use_gpu,
        seed=train.seed if train.seed is not None else seed,
        save_steps=train.save_steps,
        logging_steps=train.logging_steps,
        report_to=tuple(train.report_to),
        tensorboard_dir=str((out / "tensorboard").resolve()) if "tensorboard" in train.report_to else None,
        precomputed_reference=stage == "dpo" and train.dpo.reference != "live",
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
    return StageOutcome(stage, out, tables.kept, tables.rejected, tables.reasons, result)
