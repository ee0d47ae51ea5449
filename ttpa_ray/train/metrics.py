"""Per-step metrics on the console, and the record of which samples each step trained on.

- :class:`ConsoleMetrics` prints one line per logging step on rank 0: progress, loss, DPO rewards
  (chosen, rejected, accuracy, margin) and tokens/s (from TRL's cumulative, all-rank ``num_tokens``).
  TensorBoard, W&B and MLflow are TRL's own ``report_to`` integrations; this adds only the console.
- :class:`SampleTracingMixin` keeps the ``sample_index`` column through TRL's collator and records the
  indices each optimizer step consumed; :class:`SampleLog` appends them to a JSON Lines file per rank,
  which is how a resumed run is checked for skipped or repeated samples.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

from transformers import TrainerCallback

SAMPLE_INDEX = "sample_index"

# TRL metric names -> console labels, in print order.
CONSOLE_KEYS = (
    ("loss", "loss"),
    ("rewards/chosen", "r_chosen"),
    ("rewards/rejected", "r_rejected"),
    ("rewards/accuracies", "r_acc"),
    ("rewards/margins", "margin"),
    ("mean_token_accuracy", "tok_acc"),
    ("learning_rate", "lr"),
)


def format_step(step: int, max_steps: int, logs: Mapping[str, float], tokens_per_s: float | None) -> str:
    """One console line for a logging step."""
    parts = [f"step {step}/{max_steps}"]
    for key, label in CONSOLE_KEYS:
        if key in logs:
            parts.append(f"{label}={logs[key]:.4g}")
    if tokens_per_s is not None:
        parts.append(f"tok/s={tokens_per_s:.0f}")
    return " ".join(parts)


class ConsoleMetrics(TrainerCallback):
    """Print per-step metrics with progress on the main process; keep them for the run summary."""

    def __init__(
        self, stream: TextIO | None = None, prefix: str = "", progress_file: str | None = None
    ) -> None:
        self.stream = stream or sys.stdout
        self.prefix = prefix
        self.progress_file = progress_file  # JSON Lines the driver's progress bar follows
        self.history: list[dict[str, float]] = []
        self._last: tuple[float, float] | None = None  # (time, cumulative num_tokens)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        """Called by the Trainer at every logging step."""
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        now = time.perf_counter()
        tokens = float(logs.get("num_tokens", 0.0))
        rate = None
        if self._last is not None and tokens > self._last[1] and now > self._last[0]:
            rate = (tokens - self._last[1]) / (now - self._last[0])
        self._last = (now, tokens)
        entry = {k: float(v) for k, v in logs.items() if isinstance(v, int | float)}
        entry["step"] = float(state.global_step)
        entry["time_s"] = now  # perf_counter: only differences between steps mean anything
        if rate is not None:
            entry["tokens_per_s"] = rate
        self.history.append(entry)
        if self.progress_file:
            with open(self.progress_file, "a", encoding="utf-8") as f:
                f.write(json.dumps({**entry, "max_steps": float(state.max_steps)}) + "\n")
        print(self.prefix + format_step(state.global_step, state.max_steps, logs, rate), file=self.stream)
        self.stream.flush()


class SampleTracingMixin:
    """Mixin for TRL trainers: carry ``sample_index`` through the collator and record it per step.

    Put it before the TRL class in the bases; call :meth:`enable_sample_tracing` after ``__init__`` (TRL's
    reference precompute runs inside ``__init__`` and must see the plain collator).
    """

    data_collator: Callable[[list[dict[str, Any]]], dict[str, Any]]
    step_samples: list[int]

    def enable_sample_tracing(self) -> None:
        """Wrap the collator so that batches carry the sample indices."""
        import torch

        inner = self.data_collator
        self.step_samples = []

        def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
            batch = inner([{k: v for k, v in e.items() if k != SAMPLE_INDEX} for e in examples])
            batch[SAMPLE_INDEX] = torch.tensor([int(e[SAMPLE_INDEX]) for e in examples])
            return batch

        self.data_collator = collate

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()  # type: ignore[misc]
        columns = getattr(self, "_signature_columns", None)
        if columns is not None and SAMPLE_INDEX not in columns:
            setattr(self, "_signature_columns", [*columns, SAMPLE_INDEX])  # noqa: B010

    def compute_loss(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        """Drop the sample indices from the model inputs (recording them) and compute TRL's loss."""
        indices = inputs.pop(SAMPLE_INDEX, None)
        if indices is not None and getattr(model, "training", True):
            self.step_samples.extend(int(i) for i in indices.tolist())
        return super().compute_loss(model, inputs, *args, **kwargs)  # type: ignore[misc]


class SampleLog(TrainerCallback):
    """Append ``{"step", "rank", "samples"}`` per optimizer step to ``<dir>/samples-rank<r>.jsonl``."""

    def __init__(self, directory: Path, rank: int, trainer: SampleTracingMixin) -> None:
        self.path = Path(directory) / f"samples-rank{rank}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.trainer = trainer

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Write the indices the step just trained on."""
        samples = list(self.trainer.step_samples)
        self.trainer.step_samples.clear()
        line = {"step": state.global_step, "rank": self.rank, "samples": samples, "time": time.time()}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")


def read_sample_log(directory: Path) -> dict[int, dict[int, list[int]]]:
    """``{rank: {step: samples}}`` from a run's sample logs; a step logged twice (a resumed run redoing
    the steps after its last checkpoint) keeps its last record, i.e. the one the final model saw."""
    out: dict[int, dict[int, list[int]]] = {}
    for path in sorted(Path(directory).glob("samples-rank*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rec = json.loads(line)
                out.setdefault(int(rec["rank"]), {})[int(rec["step"])] = [int(i) for i in rec["samples"]]
    return out


def model_state_mib(trainer: Any) -> float:
    """MiB of tensor storage this rank holds for model states: parameters (ZeRO-3: its partitions),
    gradients and the optimizer's buffers and states, each storage counted once (ZeRO flat buffers
    back the parameter views)."""
    import torch

    storages: dict[int, int] = {}

    def add(value: Any, depth: int = 0) -> None:
        if isinstance(value, torch.Tensor):
            if value.device.type != "meta":
                storage = value.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        elif depth < 3 and isinstance(value, list | tuple):
            for item in value:
                add(item, depth + 1)
        elif depth < 3 and isinstance(value, dict):
            for item in value.values():
                add(item, depth + 1)

    for param in trainer.model.parameters():
        add(param.data)
        add(getattr(param, "ds_tensor", None))
        add(param.grad)
    engine = trainer.model_wrapped
    optimizer = getattr(engine, "optimizer", None) or trainer.optimizer
    for holder in (optimizer, getattr(optimizer, "optimizer", None)):
        if holder is not None:
            for value in vars(holder).values():
                add(value)
            add(getattr(holder, "state", {}))
    storages.pop(0, None)  # empty tensors
    return sum(storages.values()) / 2**20


class ModelStateMeter(TrainerCallback):
    """The most model-state memory (:func:`model_state_mib`) a rank held at an optimizer step.

    Measured inside DeepSpeed's ``engine.step`` (wrapped at train begin), where ZeRO-1/2 still hold their
    gradient partitions and Adam its states; without DeepSpeed, at HF's pre-optimizer-step event.
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.peak_mib = 0.0

    def _measure(self) -> None:
        self.peak_mib = max(self.peak_mib, model_state_mib(self.trainer))

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Wrap the DeepSpeed engine's step, if any."""
        engine = self.trainer.model_wrapped
        step = getattr(engine, "step", None)
        if step is None or not hasattr(engine, "zero_optimization_stage"):
            return

        def measured_step(*a: Any, **k: Any) -> Any:
            self._measure()
            return step(*a, **k)

        engine.step = measured_step

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Measure on the plain (non-DeepSpeed) path."""
        if not hasattr(self.trainer.model_wrapped, "zero_optimization_stage"):
            self._measure()
