"""What a run will ask Ray for, stage by stage, without starting anything (``ttpa run --dry-run``).

:func:`plan_run` resolves a config into one :class:`StagePlan` per stage: the actors and workers it
asks for (vLLM replicas min..max, training workers, ESM scorers, each with its Ray resources, all
from the config) and where it reads and writes. :func:`check_against_cluster` holds the plans
against the node types of a Ray cluster launcher YAML: a unit that no node type can host is an error
naming the stage and the missing resource; fewer places than a stage needs at its minimum is an
error too, fewer than its maximum a note.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from ttpa_ray.config import TTPAConfig, simulated_catalogues
from ttpa_ray.replica import replica_resources
from ttpa_ray.rundir import SPLIT_DIR
from ttpa_ray.store import RAY_STORAGE, join


@dataclass(frozen=True)
class Ask:
    """``count`` (min, max) units of ``what``, each needing ``resources`` (Ray resource names)."""

    what: str
    count: tuple[int, int]
    resources: dict[str, float]

    def describe(self) -> str:
        low, high = self.count
        count = str(low) if low == high else f"{low}..{high}"
        res = ", ".join(
            f"on {k.partition(':')[2]}" if k.startswith("accelerator_type:") else f"{k} {v:g}"
            for k, v in self.resources.items()
        )
        return f"{count} x {self.what} ({res})"


@dataclass(frozen=True)
class StagePlan:
    stage: str
    asks: tuple[Ask, ...]
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    skipped: str = ""  # why the stage will not run, "" when it will


def replica_ask(config: TTPAConfig) -> Ask:
    """The vLLM replicas of a stage, in Ray's resource names."""
    vllm = config.vllm
    args = replica_resources(vllm)
    resources = {"CPU": float(args["num_cpus"])}
    if "num_gpus" in args:
        resources["GPU"] = float(args["num_gpus"])
    resources.update(args.get("resources", {}))
    if "accelerator_type" in args:
        resources[f"accelerator_type:{args['accelerator_type']}"] = 0.001  # what Ray asks for it
    return Ask("vLLM replica", (vllm.replicas_min, vllm.replicas_max), resources)


def worker_ask(config: TTPAConfig) -> Ask:
    """The Ray Train workers of a training stage."""
    train = config.train
    resources = train.worker_resources()
    if train.accelerator_type is not None:
        resources[f"accelerator_type:{train.accelerator_type}"] = 0.001
    return Ask("training worker", (train.num_workers, train.num_workers), resources)


def plan_run(config: TTPAConfig) -> list[StagePlan]:
    """One plan per pipeline stage, in order."""

    def at(*parts: str) -> str:  # in the run dir, as the replicas and workers see it (maybe a URI)
        return join(config.run.run_dir, *parts)

    def train_dir(stage: str) -> str:
        return str(config.train.output_dir / stage) if config.train.output_dir else at("train", stage)

    def storage(stage: str) -> str:  # Ray Train's checkpoints
        return str(config.train.storage_path or join(train_dir(stage), RAY_STORAGE))

    models = [config.model.policy] + ([config.model.teacher] if config.model.teacher else [])
    dialogues = str(config.train.dialogues or at(SPLIT_DIR, "train.parquet"))
    heldout = str(config.eval.heldout_dialogues or at(SPLIT_DIR, "heldout.parquet"))
    replicas, workers = replica_ask(config), worker_ask(config)
    scorer = Ask("ESM scorer", config.esm.scorers, {"CPU": 1.0})
    endpoint = config.teacher_endpoint
    teacher = (  # a served teacher: CPU actors that send it requests, no engine on the cluster
        Ask("teacher endpoint actor", (endpoint.actors, endpoint.actors), {"CPU": endpoint.cpus_per_actor})
        if config.model.teacher_is_endpoint
        else replicas
    )
    served = (f"teacher {endpoint.model} at {endpoint.base_url}",) if config.model.teacher_is_endpoint else ()
    evaluated = ["base"] + (["sft"] if config.train.sft.enabled else []) + ["ttpa"]
    evaluated += ["sequence"] if config.eval.sequence_baseline else []
    return [
        StagePlan("prepare-models", (), tuple(models), ("models/ (embedded models only)",)),
        StagePlan(
            "reverse",
            (teacher,),
            (f"catalogue {config.reverse.catalogue}", *served),
            (at("reverse", "shards"), at(SPLIT_DIR))
            + ((at("reverse", "simulated"),) if simulated_catalogues(config.reverse.catalogue) else ()),
        ),
        StagePlan(
            "sft",
            (workers,),
            (dialogues,),
            (train_dir("sft"), storage("sft")),
            "" if config.train.sft.enabled else "train.sft.enabled is false",
        ),
        StagePlan("tps", (replicas,), (dialogues,), (at("tps"),)),
        StagePlan("pairs", (scorer,), (at("tps"),), (at("pairs"),)),
        StagePlan(
            "dpo",  # the replicas first score the pairs' reference log-probs (train.dpo.reference)
            (replicas, workers) if config.train.dpo.reference == "replicas" else (workers,),
            (str(config.train.pairs or at("pairs")),),
            (train_dir("dpo"), storage("dpo")),
            "" if config.train.dpo.enabled else "train.dpo.enabled is false",
        ),
        StagePlan(
            "sequence",
            (replicas, scorer, workers),
            (dialogues,),
            (at("tps-sequence"), at("pairs-sequence"), train_dir("dpo-sequence")),
            "" if config.eval.sequence_baseline else "eval.sequence_baseline is false",
        ),
        StagePlan(
            "evaluate",
            (replicas,),
            ("BFCL " + ",".join(config.eval.categories), heldout, "models " + ",".join(evaluated)),
            (at("eval"),),
        ),
    ]


@dataclass(frozen=True)
class NodeType:
    name: str
    resources: dict[str, float]
    max_nodes: int  # the head counts once


def node_types(cluster_yaml: Path) -> list[NodeType]:
    """The node types of a Ray cluster launcher config, with what each declares."""
    try:
        spec = yaml.safe_load(Path(cluster_yaml).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"{cluster_yaml}: cannot read the cluster config: {err}") from None
    types = spec.get("available_node_types") if isinstance(spec, dict) else None
    if not isinstance(types, dict) or not types:
        raise ValueError(f"{cluster_yaml}: no available_node_types")
    head = spec.get("head_node_type")
    found = []
    for name, node in types.items():
        resources = {str(k): float(v) for k, v in (node.get("resources") or {}).items()}
        count = 1 if name == head else int(node.get("max_workers", spec.get("max_workers", 0)))
        found.append(NodeType(name, resources, count))
    return found


def _missing(ask: Ask, node: NodeType) -> list[str]:
    have = node.resources
    return [f"{k} {have.get(k, 0):g} < {v:g}" for k, v in ask.resources.items() if have.get(k, 0) < v]


def _per_node(ask: Ask, node: NodeType) -> int:
    return min(math.floor(node.resources[k] / v + 1e-9) for k, v in ask.resources.items() if v > 0)


def check_against_cluster(plans: list[StagePlan], nodes: list[NodeType]) -> tuple[list[str], list[str]]:
    """(errors, notes) of the plans against the node types; each names the stage and the resource."""
    errors, notes = [], []
    for plan in plans:
        if plan.skipped:
            continue
        for ask in plan.asks:
            fitting = [n for n in nodes if not _missing(ask, n)]
            if not fitting:
                why = "; ".join(f"{n.name}: {', '.join(_missing(ask, n))}" for n in nodes)
                errors.append(f"{plan.stage}: no node type can host a {ask.what} ({why})")
                continue
            places = sum(_per_node(ask, n) * n.max_nodes for n in fitting)
            low, high = ask.count
            where = ", ".join(n.name for n in fitting)
            if places < low:
                errors.append(
                    f"{plan.stage}: needs at least {low} x {ask.what} but the {where} nodes hold at most "
                    f"{places}"
                )
            elif places < high:
                notes.append(f"{plan.stage}: at most {places} of {high} x {ask.what} fit ({where})")
    return errors, notes


def describe(plans: list[StagePlan]) -> list[str]:
    """The plan as console lines."""
    lines = []
    for number, plan in enumerate(plans, start=1):
        head = f"[{number}/{len(plans)}] {plan.stage}"
        if plan.skipped:
            lines.append(f"{head}: skipped ({plan.skipped})")
            continue
        asks = "; ".join(a.describe() for a in plan.asks) or "the driver only"
        lines.append(f"{head}: {asks}")
        lines.append(f"      reads {', '.join(plan.reads)}")
        lines.append(f"      writes {', '.join(plan.writes)}")
    return lines
