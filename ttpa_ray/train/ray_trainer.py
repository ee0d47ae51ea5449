"""The Ray Train shell: a TorchTrainer whose workers run TRL's SFTTrainer or DPOTrainer under DeepSpeed.

The same code runs on CPUs (gloo, ``DS_ACCELERATOR=cpu``) and GPUs (NCCL). Checkpoints are TRL/HF
trainer checkpoints (model, DeepSpeed ZeRO shards of every rank, optimizer, scheduler, RNG states,
trainer state) reported to Ray Train, which keeps the last N in the run's storage; once every rank's
upload is done, rank 0 marks the checkpoint complete there. Every start of the workers (a restarted
worker group, or a killed job run again) resumes from the newest complete one in storage through HF's
``resume_from_checkpoint``: the sampler is re-seeded and the consumed batches are skipped, so no sample
is skipped or repeated. The last report carries the exported policy (``policy/``), which the driver
copies next to the run's outputs.

Why not Ray's own pieces. ``RayTrainReportCallback`` has every rank copy the whole HF folder into the
one Ray checkpoint without waiting for the other ranks' files; here the ranks meet at a barrier and
one rank per node uploads. Ray Train's ``get_checkpoint`` (also its run restoration, a job run again
under the same name) only knows the checkpoints its controller had registered, and the controller
takes one report per worker poll (every 2 s): a checkpoint uploaded just before a kill is complete
in storage but unknown to it, and the workers restart from an older one or from scratch (the
killed-job test did so with step 2's checkpoint in storage). :func:`latest_checkpoint` reads the
storage itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from ttpa_ray import store
from ttpa_ray.models import resolve_dtype

Stage = Literal["sft", "dpo"]
HF_CHECKPOINT = "checkpoint"  # inside a Ray checkpoint: the HF trainer checkpoint folder
COMPLETE = "complete"  # inside a Ray checkpoint in storage: written once every rank has uploaded
POLICY = "policy"  # inside the final Ray checkpoint: the exported HF model folder
FINAL = "final_policy"  # the final Ray checkpoint


@dataclass(frozen=True)
class CrashOnce:
    """Fault injection for resume tests: ``os._exit`` on ``rank`` right after ``step``, once per marker."""

    step: int
    rank: int
    marker: str  # file created before exiting; its existence disarms the crash


@dataclass(frozen=True)
class TrainJob:
    """Everything a worker needs, picklable (plain values only): built by the driver, read by workers."""

    stage: Stage
    model_path: str
    data_path: str  # Parquet of the checked training table (train/data.py)
    work_dir: str  # node-local scratch for HF checkpoints before they are reported
    stage_config: dict[str, Any]
    deepspeed: dict[str, Any] | None
    use_gpu: bool
    seed: int
    save_steps: int
    logging_steps: int = 1
    report_to: tuple[str, ...] = ()
    tensorboard_dir: str | None = None
    precomputed_reference: bool = True
    gradient_checkpointing: bool = False
    sample_log_dir: str | None = None
    crash: CrashOnce | None = None
    storage_path: str = ""  # Ray Train's storage and run name: where the checkpoints are (set by
    run_name: str = ""  # run_torch_trainer)
    progress_file: str | None = None  # rank 0 appends a JSON line per logging step (the driver's bar)
    dtype: str = "float32"  # model.dtype; "auto" resolves on the worker (bf16 where it computes it natively)
    eval_path: str | None = None  # DPO: Parquet of the held-back pairs, evaluated after training
    lora: dict[str, Any] | None = None  # train.lora (LoraSettings as a dict); None: full fine-tuning


def _init_distributed(use_gpu: bool) -> None:
    """DeepSpeed on top of the process group Ray Train created (gloo on CPU, NCCL on GPU)."""
    if not use_gpu:
        # must precede the first deepspeed import of this process
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # DeepSpeed's CPU accelerator takes its device count from LOCAL_SIZE (its own launcher sets it) and
        # otherwise runs `numactl --hardware` in a subprocess, which ZeRO-3 does for every gradient bucket it
        # reduces: a fork of the multi-GB worker per bucket.
        # Ray Train sets LOCAL_WORLD_SIZE, the same number.
        local = os.environ.get("LOCAL_WORLD_SIZE")
        if local:
            os.environ.setdefault("LOCAL_SIZE", local)
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")


def _peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux (the high-water mark, reset by reset_peak_rss)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak_rss() -> bool:
    """Restart this process's RSS high-water mark from its current RSS (Linux ``clear_refs`` 5), so that
    a later :func:`_peak_rss_mib` covers only what came after; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5", encoding="utf-8")
    except OSError:
        return False
    return True


def _rss_anon_mib() -> float:
    # resident anonymous memory now (tensors, optimizer states), without file-backed pages such as
    # the memory-mapped safetensors, which the kernel can drop
    for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _peak_rss_callback() -> Any:
    from transformers import TrainerCallback

    class PeakRss(TrainerCallback):
        """Split the peak RSS at the first step: set-up (model loading, DeepSpeed engine) and steps."""

        def __init__(self) -> None:
            self.setup_peak_mib = float("nan")
            self.reset = False

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            # HF calls this once the DeepSpeed engine is built, before the first step
            self.setup_peak_mib = _peak_rss_mib()
            self.reset = reset_peak_rss()

    return PeakRss()


def _callbacks(job: TrainJob, rank: int, local_rank: int) -> list[Any]:
    """Ray reporting, console metrics and (when asked) fault injection; built inside the worker."""
    import ray.train
    import torch.distributed as dist
    from transformers import TrainerCallback

    from ttpa_ray.train.metrics import ConsoleMetrics

    class ReportToRay(TrainerCallback):
        """Report each HF checkpoint to Ray Train; one uploader per node (its local rank 0)."""

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            # every rank has finished writing its ZeRO shards before any node uploads
            if dist.is_initialized():
                dist.barrier()
            source = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            metrics = {"step": state.global_step, "peak_rss_mib": _peak_rss_mib()}
            for log in state.log_history:
                metrics.update({k: v for k, v in log.items() if isinstance(v, int | float)})
            with tempfile.TemporaryDirectory() as tmp:
                checkpoint = None
                if local_rank == 0 and source.is_dir():
                    shutil.copytree(source, Path(tmp) / HF_CHECKPOINT)
                    checkpoint = ray.train.Checkpoint.from_directory(tmp)
                name = f"checkpoint_{state.global_step:06d}"
                ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
            _mark_complete(job, rank, name)

    class Crash(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            crash = job.crash
            if crash and rank == crash.rank and state.global_step == crash.step:
                marker = Path(crash.marker)
                if not marker.exists():
                    marker.write_text(f"crashed at step {state.global_step}\n", encoding="utf-8")
                    print(f"[fault injection] rank {rank} exits at step {state.global_step}", flush=True)
                    os._exit(1)

    out: list[Any] = [
        ReportToRay(),
        ConsoleMetrics(prefix=f"[{job.stage}] ", progress_file=job.progress_file),
    ]
    if job.crash is not None:
        out.append(Crash())
    return out


def _mark_complete(job: TrainJob, rank: int, name: str) -> None:
    """After every rank's upload of checkpoint ``name``: rank 0 writes the mark latest_checkpoint needs."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
    if rank == 0 and job.run_name:
        store.write_text(store.join(job.storage_path, job.run_name, name, COMPLETE), "")


def train_loop(job_fields: dict[str, Any]) -> None:
    """The per-worker function of the TorchTrainer (also callable directly on one process)."""
    crash = job_fields.get("crash")
    job = TrainJob(**{**job_fields, "crash": CrashOnce(**crash) if crash else None})
    _init_distributed(job.use_gpu)

    import pyarrow.parquet as pq
    import ray.train
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ttpa_ray.config import DPOStageConfig, StageConfig
    from ttpa_ray.store import local_copy
    from ttpa_ray.train.arguments import RunSettings, lora_config
    from ttpa_ray.train.metrics import ModelStateMeter, SampleLog, model_state_mib

    context = ray.train.get_context()
    rank, local_rank = context.get_world_rank(), context.get_local_rank()
    # the newest complete checkpoint in storage; Ray's own may be older (see the module docstring)
    newest = latest_checkpoint(job.storage_path, job.run_name) if job.run_name else None
    checkpoint = ray.train.Checkpoint(newest) if newest else ray.train.get_checkpoint()
    resume_from: str | None = None
    attempt = "fresh"
    if checkpoint is not None:
        root = Path(checkpoint.to_directory() if not Path(checkpoint.path).is_dir() else checkpoint.path)
        if (root / POLICY).is_dir():
            print(
                f"[{job.stage}] this run already finished ({root}); to train again, use another "
                "run.name or remove the run folder",
                flush=True,
            )
            ray.train.report({"done": 1.0})
            return
        resume_from = str(root / HF_CHECKPOINT)
        attempt = f"resume-{root.name}"
    # a fresh scratch folder per attempt: a crashed attempt may have left half-written checkpoints
    work_dir = Path(job.work_dir) / attempt

    model_path = local_copy(job.model_path)  # a policy in a run dir's object store: fetched once per node
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    # Parquet folders written by the cluster; one order on every worker and every attempt, whatever
    # the blocks were: by sample_index (a hash of the row's id)
    table = pq.read_table(job.data_path).sort_by("sample_index")
    use_cpu = not job.use_gpu
    settings = RunSettings(
        seed=job.seed,
        deepspeed=job.deepspeed,
        use_cpu=use_cpu,
        save_steps=job.save_steps,
        logging_steps=job.logging_steps,
        report_to=job.report_to,
        gradient_checkpointing=job.gradient_checkpointing,
        # bf16 as mixed precision: fp32 master weights, bf16 compute (pure bf16 weights would round
        # away the small updates of a 1e-5 learning rate)
        bf16=resolve_dtype(job.dtype) == "bfloat16",
    )
    if job.tensorboard_dir:
        # transformers 5 reads the TensorBoard folder from the environment only
        os.environ["TENSORBOARD_LOGGING_DIR"] = job.tensorboard_dir
    # The args come first: with ZeRO-3 they register the DeepSpeed config so that from_pretrained
    # partitions the weights while loading instead of materialising the whole model on every rank.
    args: Any
    if job.stage == "dpo":
        from ttpa_ray.train.dpo import build_dpo_trainer, dpo_args

        args = dpo_args(
            DPOStageConfig(**job.stage_config),
            work_dir,
            settings,
            precomputed_reference=job.precomputed_reference,
        )
    else:
        from ttpa_ray.train.sft import build_sft_trainer, sft_args

        args = sft_args(StageConfig(**job.stage_config), work_dir, settings)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    callbacks = _callbacks(job, rank, local_rank)
    held_back = pq.read_table(job.eval_path).sort_by("sample_index") if job.eval_path else None
    peft_config = lora_config(job.lora)
    if job.stage == "dpo":
        trainer: Any = build_dpo_trainer(model, tokenizer, table, args, callbacks, held_back, peft_config)
    else:
        trainer = build_sft_trainer(model, tokenizer, table, args, callbacks, peft_config)
    if job.sample_log_dir:
        trainer.add_callback(SampleLog(Path(job.sample_log_dir), rank, trainer))

    meter = ModelStateMeter(trainer)
    trainer.add_callback(meter)
    rss = _peak_rss_callback()
    trainer.add_callback(rss)

    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_from)
    elapsed = time.perf_counter() - started
    held = _evaluate_held_back(trainer, held_back)
    # before the export: under ZeRO-3 saving gathers the whole model on rank 0 once, after training
    peak_steps = _peak_rss_mib()
    states = max(meter.peak_mib, model_state_mib(trainer))

    from ttpa_ray.train.export import save_policy

    console = next(c for c in trainer.callback_handler.callbacks if type(c).__name__ == "ConsoleMetrics")
    final = {
        "step": trainer.state.global_step,
        "train_loss": float(result.training_loss),
        "train_seconds": elapsed,
        # the process's peak RSS over setup and training; the two phases apart (the setup peak covers model
        # loading and the DeepSpeed engine's construction, the steps peak the training steps only)
        "peak_rss_mib": max(rss.setup_peak_mib, peak_steps),
        "setup_peak_rss_mib": rss.setup_peak_mib,
        "steps_peak_rss_mib": peak_steps if rss.reset else float("nan"),
        "rss_anon_mib": _rss_anon_mib(),
        "model_state_mib": states,
        "num_tokens": float(trainer._total_train_tokens),
        **held,
    }
    with tempfile.TemporaryDirectory() as tmp:
        # every rank joins: under ZeRO-3 the weights are gathered from all shards
        save_policy(trainer, tokenizer, Path(tmp) / POLICY, base_model=model_path if job.lora else None)
        if rank == 0:
            (Path(tmp) / "metrics.json").write_text(
                json.dumps({"final": final, "history": console.history}, indent=1), encoding="utf-8"
            )
        # each rank adds its own numbers; Ray merges the ranks' files into one checkpoint folder
        (Path(tmp) / f"worker-{rank}.json").write_text(json.dumps(final), encoding="utf-8")
        ray.train.report(
            {**final, "done": 1.0},
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=FINAL,
        )
    _mark_complete(job, rank, FINAL)
    shutil.rmtree(work_dir, ignore_errors=True)
    with contextlib.suppress(OSError):  # the run's scratch root, once no rank's attempt is left in it
        work_dir.parent.rmdir()


HELD_BACK_KEYS = {  # TRL's evaluation metrics -> metrics.json keys
    "eval_loss": "heldback_loss",
    "eval_rewards/accuracies": "heldback_reward_accuracy",
    "eval_rewards/margins": "heldback_reward_margin",
}


def _evaluate_held_back(trainer: Any, held_back: Any) -> dict[str, float]:
    """TRL's evaluation of the trained policy on the held-back pairs (every rank joins): their loss,
    implicit reward accuracy and margin (the driver prints them from the final metrics)."""
    if held_back is None:
        return {}
    metrics = trainer.evaluate()
    held = {ours: float(metrics[theirs]) for theirs, ours in HELD_BACK_KEYS.items() if theirs in metrics}
    held["heldback_pairs"] = float(held_back.num_rows)
    return held


@dataclass
class TrainResult:
    """What a finished run left: the exported policy, per-step metrics and the Ray run folder."""

    policy_dir: Path | None
    metrics: dict[str, Any]
    history: list[dict[str, float]]
    run_path: str
    worker_peak_rss_mib: list[float] = field(default_factory=list)  # per rank, set-up and training
    worker_setup_peak_rss_mib: list[float] = field(default_factory=list)  # per rank, before the first step
    worker_steps_peak_rss_mib: list[float] = field(default_factory=list)  # per rank, during the steps
    worker_rss_anon_mib: list[float] = field(default_factory=list)  # per rank, right after training
    worker_model_state_mib: list[float] = field(default_factory=list)  # per rank: params, grads, optimizer


def run_torch_trainer(
    job: TrainJob,
    *,
    num_workers: int,
    resources_per_worker: dict[str, float],
    accelerator_type: str | None,
    run_name: str,
    storage_path: str,
    keep_checkpoints: int,
    max_failures: int,
    export_dir: Path | None,
) -> TrainResult:
    """Run ``job`` on a Ray TorchTrainer and copy the exported policy to ``export_dir``."""
    from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    previous = latest_checkpoint(storage_path, run_name)
    if previous is not None:
        print(f"[{job.stage}] resuming run {run_name!r} from {previous}", flush=True)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=asdict(job) | {"storage_path": storage_path, "run_name": run_name},
        scaling_config=ScalingConfig(
            num_workers=num_workers,
            use_gpu=job.use_gpu,
            resources_per_worker=resources_per_worker,
            accelerator_type=accelerator_type,
        ),
        torch_config=TorchConfig(backend="nccl" if job.use_gpu else "gloo"),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            # final_policy is reported last and is always among the kept ones
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints + 1),
            failure_config=FailureConfig(max_failures=max_failures),
            # Ray Train V2's RunConfig (the default in Ray 2.60); mypy sees the V1 class
            worker_runtime_env={"env_vars": _worker_env(job.use_gpu)},  # type: ignore[call-arg]
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    # a checkpoint uploaded but never registered by Ray (see the module docstring) is not among those
    # Ray keeps and deletes: the last N, as configured, are all that stays
    kept = {PurePosixPath(c.path).name for c, _ in result.best_checkpoints or []}
    fs, run_path = store.resolve(store.join(storage_path, run_name))
    for name in set(_step_folders(fs, run_path)) - kept:
        fs.delete_dir(f"{run_path}/{name}")
    metrics = dict(result.metrics or {})
    history: list[dict[str, float]] = []
    finals: list[dict[str, Any]] = []
    policy_dir = None
    checkpoint = result.checkpoint
    if previous is not None and previous.rstrip("/").endswith(FINAL):
        # the run had already finished: its final checkpoint is the result
        checkpoint = Checkpoint(previous)
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            summary = Path(folder) / "metrics.json"
            if summary.is_file():
                history = json.loads(summary.read_text(encoding="utf-8"))["history"]
            workers = sorted(Path(folder).glob("worker-*.json"), key=lambda p: int(p.stem.split("-")[1]))
            finals = [json.loads(p.read_text(encoding="utf-8")) for p in workers]
            if export_dir is not None and (Path(folder) / POLICY).is_dir():
                shutil.rmtree(export_dir, ignore_errors=True)
                export_dir.parent.mkdir(parents=True, exist_ok=True)
                shutil.copytree(Path(folder) / POLICY, export_dir)
                policy_dir = export_dir

    def per_rank(key: str) -> list[float]:
        return [float(f.get(key, float("nan"))) for f in finals]

    return TrainResult(
        policy_dir,
        metrics,
        history,
        str(result.path),
        worker_peak_rss_mib=per_rank("peak_rss_mib"),
        worker_setup_peak_rss_mib=per_rank("setup_peak_rss_mib"),
        worker_steps_peak_rss_mib=per_rank("steps_peak_rss_mib"),
        worker_rss_anon_mib=per_rank("rss_anon_mib"),
        worker_model_state_mib=per_rank("model_state_mib"),
    )


def latest_checkpoint(storage_path: str, run_name: str) -> str | None:
    """The newest complete checkpoint (marked by every rank's upload) of ``run_name`` in its storage (a
    local path or an object-store URI); None for a new run. A finished run's final one wins."""
    run_dir = store.join(storage_path, run_name)
    final = store.join(run_dir, FINAL)
    if store.exists(store.join(final, COMPLETE)):
        return final
    fs, path = store.resolve(run_dir)
    steps = [name for name in _step_folders(fs, path) if store.exists(store.join(run_dir, name, COMPLETE))]
    return store.join(run_dir, steps[-1]) if steps else None


def _step_folders(fs: Any, run_path: str) -> list[str]:
    """Names of the step checkpoints in a Ray run folder, oldest first."""
    import pyarrow.fs as pafs

    folders = fs.get_file_info(pafs.FileSelector(run_path, allow_not_found=True))
    return sorted(
        info.base_name
        for info in folders
        if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_")
    )


def _worker_env(use_gpu: bool) -> dict[str, str]:
    env = {"TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    # workers import the project from the driver's tree when it is not installed
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return env
