"""vLLM replicas in Ray Data actor pools: a thin shell over :class:`ttpa_ray.engine.Engine`.

``generate_dataset`` maps a dataset of prompt rows through ``map_batches(VLLMReplica, compute=
ActorPoolStrategy(min_size, max_size), ...)`` (:func:`replica_pool`); each actor builds one engine in
``__init__`` and generates per batch in ``__call__``. A replica takes ``vllm.cpus_per_replica`` CPUs,
and with ``vllm.use_gpu`` its GPUs (``tensor_parallel_size`` unless ``gpus_per_replica``), on nodes
of ``vllm.accelerator_type`` when set: the config decides, never the driver's machine.
A replica that dies is restarted by Ray and its batch retried (``max_restarts``/``max_task_retries``),
so every row comes out exactly once.

Prompt rows (columns): ``row_id`` (str), ``messages`` (JSON text of chat messages), ``tools`` (JSON text of
OpenAI tool specs, may be "[]"), ``json_schema`` (JSON text or ""), ``max_tokens`` (int),
``temperature`` (float), ``seed`` (int). Output rows keep these and add ``completion``,
``completion_token_ids``, ``finish_reason`` and ``prompt_tokens``. A prompt that leaves no room under
``vllm.max_model_len`` is not sent: its row's finish_reason is ``prompt_too_long: <why>``.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from ttpa_ray.config import TTPAConfig, VLLMConfig
from ttpa_ray.engine import Completion, Engine

# The finish_reason of a row whose prompt leaves no room under vllm.max_model_len (nothing generated).
PROMPT_TOO_LONG = "prompt_too_long"
PROMPT_COLUMNS = ("row_id", "messages", "tools", "json_schema", "max_tokens", "temperature", "seed")


class VLLMReplica:
    """One vLLM engine per Ray actor; generates one completion per prompt row of a batch."""

    def __init__(self, model: str, vllm_config: dict[str, Any], dtype: str = "auto", seed: int = 0) -> None:
        self.engine = Engine(model, VLLMConfig.model_validate(vllm_config), dtype=dtype, seed=seed)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        prompts = []
        params = []
        for row in rows:
            messages = json.loads(row["messages"])
            tools = json.loads(row["tools"]) if row["tools"] else []
            prompts.append(self.engine.render(messages, tools))
            schema = json.loads(row["json_schema"]) if row["json_schema"] else None
            params.append(
                self.engine.sampling_params(
                    max_tokens=int(row["max_tokens"]),
                    temperature=float(row["temperature"]),
                    seed=int(row["seed"]),
                    json_schema=schema,
                )
            )
        too_long = {i: why for i, p in enumerate(prompts) if (why := self.engine.prompt_too_long(p))}
        fitting = [i for i in range(len(prompts)) if i not in too_long]
        generated = iter(self._generate([prompts[i] for i in fitting], [params[i] for i in fitting]))
        completions = [
            Completion("", [], f"{PROMPT_TOO_LONG}: {too_long[i]}") if i in too_long else next(generated)
            for i in range(len(prompts))
        ]
        return (
            batch.append_column("completion", pa.array([c.text for c in completions], pa.string()))
            .append_column(
                "completion_token_ids", pa.array([c.token_ids for c in completions], pa.list_(pa.int32()))
            )
            .append_column(
                "finish_reason", pa.array([c.finish_reason or "" for c in completions], pa.string())
            )
            .append_column("prompt_tokens", pa.array([len(p) for p in prompts], pa.int32()))
        )

    def _generate(self, prompts: list[list[int]], params: list[Any]) -> list[Completion]:
        """Generate a batch; if the batch fails (e.g. a schema the grammar engine rejects), retry row by
        row so one bad row becomes an empty completion with its error instead of failing the stage."""
        if not prompts:
            return []
        try:
            return self.engine.generate(prompts, params)
        except Exception:
            results = []
            for prompt, param in zip(prompts, params, strict=True):
                try:
                    results.extend(self.engine.generate([prompt], [param]))
                except Exception as exc:
                    results.append(Completion(text="", token_ids=[], finish_reason=f"error: {exc}"[:500]))
            return results


def replica_resources(vllm: VLLMConfig) -> dict[str, Any]:
    """Ray resources of one replica, from the config alone (never from the driver's machine): CPUs,
    and with ``vllm.use_gpu`` its GPUs (default: the tensor-parallel size) and accelerator type."""
    resources: dict[str, Any] = {"num_cpus": vllm.cpus_per_replica}
    if vllm.use_gpu:
        resources["num_gpus"] = vllm.gpus_per_replica or vllm.tensor_parallel_size
        if vllm.accelerator_type is not None:
            resources["accelerator_type"] = vllm.accelerator_type
    if vllm.resources:
        resources["resources"] = dict(vllm.resources)
    return resources


def replica_pool(vllm: VLLMConfig, *, one_batch_each: bool = False) -> dict[str, Any]:
    """``map_batches`` arguments of every replica pool: an actor pool autoscaling between
    replicas_min and replicas_max, each actor with :func:`replica_resources`, restarted (and its
    batch retried) up to ``vllm.max_restarts`` times. ``one_batch_each``: no batch is queued on a
    busy replica (for long batches, which an idle or starting replica should take instead)."""
    import ray.data

    return {
        "compute": ray.data.ActorPoolStrategy(
            min_size=vllm.replicas_min,
            max_size=vllm.replicas_max,
            max_tasks_in_flight_per_actor=1 if one_batch_each else None,
        ),
        # Ray 2.60 takes these through ray_remote_args (its default is to restart forever)
        "max_restarts": vllm.max_restarts,
        "max_task_retries": vllm.max_restarts,
        **replica_resources(vllm),
    }


def replica_map(
    ds: Any, replica_cls: type[VLLMReplica], model: str, vllm: VLLMConfig, *, dtype: str, seed: int
) -> Any:
    """``ds`` mapped through a pool of ``replica_cls`` actors (:func:`replica_pool`), one engine each."""
    from ttpa_ray.store import shared

    return ds.map_batches(
        replica_cls,
        fn_constructor_kwargs={
            "model": shared(model),
            "vllm_config": vllm.model_dump(),
            "dtype": dtype,
            "seed": seed,
        },
        batch_format="pyarrow",
        batch_size=vllm.batch_size,
        **replica_pool(vllm),
    )


def generate_dataset(
    ds: Any, model: str, config: TTPAConfig, replica_cls: type[VLLMReplica] = VLLMReplica
) -> Any:
    """Map prompt rows through vLLM replicas (autoscaling between replicas_min and replicas_max).

    ``replica_cls`` lets a stage host a subclass (its own per-batch work) with the same resources.
    """
    return replica_map(ds, replica_cls, model, config.vllm, dtype=config.model.dtype, seed=config.run.seed)
