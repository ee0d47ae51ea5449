"""The one typed config of a run: YAML file + dotted command-line overrides, validated by pydantic.

``load_config("configs/local.yaml", ["tps.top_k=5"])`` returns a :class:`TTPAConfig`; a bad key or
value raises :class:`ConfigError` whose message names the key and what is allowed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config file or override that does not validate; the message names the key."""


class _Section(BaseModel):
    # Unknown keys are typos far more often than intent: refuse them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(_Section):
    """Where a run writes and how it is seeded."""

    name: str = "local"
    # A local path (one machine or a mount every node shares) or an object-store URI (s3://, gs://,
    # abfs://, hdfs://): ttpa_ray/store.py says what goes where.
    run_dir: str = "runs/local"
    # With a URI run dir: the driver's working copy (None: ~/.cache/ttpa/runs/<scheme>/<path>).
    local_dir: Path | None = None
    seed: int = 0

    @model_validator(mode="after")
    def _check_run_dir(self) -> RunConfig:
        from ttpa_ray.store import check_uri, is_uri

        problem = check_uri(self.run_dir) if is_uri(self.run_dir) else None
        if problem:
            raise ValueError(f"run.run_dir={self.run_dir}: {problem}")
        return self

    @property
    def remote(self) -> str | None:
        """The run dir's URI when it lives in an object store."""
        from ttpa_ray.store import is_uri

        return self.run_dir.rstrip("/") if is_uri(self.run_dir) else None

    @property
    def work_dir(self) -> Path:
        """Where this driver reads and writes the run dir: itself, or its working copy of a URI."""
        if self.remote is None:
            return Path(self.run_dir)
        if self.local_dir is not None:
            return self.local_dir
        from ttpa_ray.store import CACHE

        scheme, _, rest = self.remote.partition("://")
        return CACHE / "runs" / scheme / rest


class RayConfig(_Section):
    """Which Ray cluster to use: None starts a local one (single node), 'auto' joins the current one."""

    address: str | None = None
    num_cpus: int | None = Field(default=None, ge=1)
    # A driver that cannot reach ``address`` within this many seconds stops with one line naming it
    # (Ray's own client retries forever).
    connect_timeout_s: float = Field(default=30.0, gt=0)
    progress_bars: bool = True


class ModelConfig(_Section):
    """The policy being aligned and the teacher that writes dialogues (a hub id or a local folder)."""

    # An embedded model by name (smollm2-135m-instruct, tiny), a folder of weights, or a hub id (org/name).
    policy: str = "smollm2-135m-instruct"
    # None: the policy is its own teacher. openai:<base_url>#<model>: a served model (teacher_endpoint)
    teacher: str | None = None
    # auto: bfloat16 where the device running the model computes it natively (AMX/AVX-512 BF16, GPUs)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    @model_validator(mode="after")
    def _models_exist(self) -> ModelConfig:
        from ttpa_ray.models import check_model

        check_model(self.policy, "model.policy")
        if self.teacher is not None and not self.teacher_is_endpoint:
            check_model(self.teacher, "model.teacher")
        return self

    @property
    def teacher_or_policy(self) -> str:
        return self.teacher or self.policy

    @property
    def teacher_is_endpoint(self) -> bool:
        return (self.teacher or "").startswith(ENDPOINT_PREFIX)


ENDPOINT_PREFIX = "openai:"


class TeacherEndpointConfig(_Section):
    """The teacher behind an OpenAI-compatible server (docs/design.md, "The teacher behind a server").

    ``model.teacher=openai:<base_url>#<model>`` fills base_url and model. The server must take token-id
    prompts on ``/v1/completions`` with structured outputs (vLLM's and SGLang's servers do): the
    stage renders each prompt with the teacher's own chat template and continues it token for token,
    as it does on its own replicas. The API key is read from the environment variable ``api_key_env``
    names, in the driver, and handed to the actors as a constructor argument (Ray's object store); it
    is never written to a file the run makes."""

    base_url: str | None = None  # e.g. http://vllm.internal:8000/v1
    model: str | None = None  # the name the server serves it under
    # a folder, embedded model or hub id with the teacher's tokenizer and chat template (default: model)
    tokenizer: str | None = None
    api_key_env: str | None = None  # the environment variable that holds the API key
    headers: dict[str, str] = Field(default_factory=dict)
    actors: int = Field(default=1, ge=1)  # Ray actors sending requests (CPU only, no engine)
    cpus_per_actor: float = Field(default=1.0, gt=0)
    max_concurrency: int = Field(default=32, ge=1)  # requests in flight per actor
    qps: float | None = Field(default=None, gt=0)  # requests sent per second per actor (None: no cap)
    max_retries: int = Field(default=4, ge=0)  # per request, with exponential backoff (429, 5xx, resets)
    timeout_s: float = Field(default=600.0, gt=0)  # a request's (the OpenAI SDK's default)
    max_model_len: int | None = Field(default=None, ge=256)  # default: what the server reports, else 4096


def _existing(path: Path | None) -> Path | None:
    """An input path named in the config must exist when the config is read (no silent fallback)."""
    if path is not None and not Path(path).exists():
        raise ValueError(f"{path} does not exist")
    return path


def _check_catalogue(ref: str) -> str:
    """Each ``+`` part names a catalogue: builtin, bfcl[:Class,...], bfcl-simulated[:Class,...],
    mcp:<servers file>, or an existing folder or JSON file. A servers file's path is made absolute
    (Ray's workers do not share the driver's working directory); it is not opened here."""
    if Path(ref).exists():
        return ref
    parts = []
    for part in ref.split("+"):
        if part.startswith("mcp:"):
            servers = Path(part.removeprefix("mcp:"))
            if not servers.is_file():
                raise ValueError(f"MCP servers file {str(servers)!r} does not exist")
            part = f"mcp:{servers.resolve()}"
        known = part in ("builtin", "bfcl", "bfcl-simulated") or part.startswith(("bfcl:", "bfcl-simulated:"))
        if not known and not part.startswith("mcp:") and not Path(part).exists():
            raise ValueError(
                f"{part!r} is not builtin, bfcl[:Class,...], bfcl-simulated[:Class,...], mcp:<servers.json> "
                "or an existing folder or JSON file"
            )
        parts.append(part)
    return "+".join(parts)


def simulated_catalogues(ref: str) -> list[str]:
    """The parts of a catalogue reference whose tools are simulated."""
    parts = [ref] if Path(ref).exists() else ref.split("+")
    return [
        p
        for p in parts
        if p.startswith("bfcl-simulated") or (p.lower().endswith(".json") and not p.startswith("mcp:"))
    ]


def check_mcp_tools_not_evaluated(catalogue: Any, config: TTPAConfig) -> None:
    """The held-out rule of simulated tools, for MCP tools (checked where the catalogue is loaded,
    on the driver: listing starts the servers, which config validation must not do)."""
    mcp = sorted(n for n, b in catalogue.bindings.items() if type(b).__name__ == "McpBinding")
    if not mcp or not config.eval.categories:
        return
    overlap = sorted(set(mcp) & _evaluated_tool_names(tuple(config.eval.categories)))
    if overlap:
        raise ValueError(
            f"reverse.catalogue {config.reverse.catalogue!r} has MCP tool(s) that eval.categories "
            f"{list(config.eval.categories)} also evaluate ({', '.join(overlap[:8])}): 'deny' them in the "
            "servers file or drop those categories from eval.categories"
        )


@functools.cache
def _evaluated_tool_names(categories: tuple[str, ...]) -> frozenset[str]:
    from ttpa_ray.bfcl import load_entries

    return frozenset(f["name"] for c in categories for e in load_entries(c) for f in e.functions)


class VLLMConfig(_Section):
    """vLLM replicas hosted by Ray Data actor pools."""

    tensor_parallel_size: int = Field(default=1, ge=1)
    replicas_min: int = Field(default=1, ge=1)
    replicas_max: int = Field(default=1, ge=1)
    # On the CPU build this share of the NUMA node's memory is reserved for KV cache: 0.92 fails there.
    gpu_memory_utilization: float = Field(default=0.15, gt=0, le=1)
    enforce_eager: bool = True
    max_model_len: int = Field(default=4096, ge=256)
    max_num_seqs: int = Field(default=64, ge=1)
    enable_prefix_caching: bool = True
    batch_size: int = Field(default=64, ge=1)
    cpus_per_replica: float = Field(default=1.0, gt=0)
    # GPUs are asked for only when the config says so, never because the driver's machine has one.
    use_gpu: bool = False
    gpus_per_replica: float | None = Field(default=None, gt=0)  # None: tensor_parallel_size
    accelerator_type: str | None = None  # Ray's accelerator type (e.g. L40S): replicas run only there
    # Custom Ray resources per replica, e.g. {replica_slot: 1} to keep replicas on the nodes declaring it.
    resources: dict[str, float] = Field(default_factory=dict)
    max_restarts: int = Field(default=2, ge=0)

    @model_validator(mode="after")
    def _replica_range(self) -> VLLMConfig:
        if self.replicas_max < self.replicas_min:
            raise ValueError(
                f"replicas_max ({self.replicas_max}) must be >= replicas_min ({self.replicas_min})"
            )
        return self


class QualityConfig(_Section):
    """Text gates of reversed construction (ttpa_ray/quality.py); the defaults pass fluent text."""

    # A text (question, answer, string argument) is repetitive when more than this share of its token
    # n-grams occur twice or more, or this share of its lines.
    max_repeated_ngram_share: float = Field(default=0.3, gt=0, le=1)
    max_repeated_line_share: float = Field(default=0.3, gt=0, le=1)
    ngram: int = Field(default=3, ge=2)
    question_chars: tuple[int, int] = (15, 400)
    answer_chars: tuple[int, int] = (8, 1000)
    # The question is rejected as a copy when this similar to the answer or the scenario.
    max_copy_similarity: float = Field(default=0.8, gt=0, le=1)
    # Every number and quoted value of the answer must come from a call, its result or the scenario.
    strict_grounding: bool = True
    # The question must show a value (a string argument or a number) of every call: a question about
    # something else than the calls made is question_misses_call.
    call_values_in_question: bool = False
    # Later copies of a question (same normalised text) across the whole run: duplicate_question.
    dedup_questions: bool = True

    @model_validator(mode="after")
    def _ranges(self) -> QualityConfig:
        for key in ("question_chars", "answer_chars"):
            low, high = getattr(self, key)
            if not 0 <= low <= high:
                raise ValueError(f"reverse.quality.{key} must be [low, high] with 0 <= low <= high")
        return self


class ReverseConfig(_Section):
    """Reversed dataset construction (docs/design.md section 1)."""

    catalogue: Annotated[str, AfterValidator(_check_catalogue)] = (
        "builtin"  # builtin, bfcl, bfcl:Class,..., a folder of tool modules, a JSON file; a+b merges
    )
    num_seeds: int = Field(default=32, ge=1)
    tool_window: int = Field(default=20, ge=1)  # tools shown to the scene simulation
    info_items: tuple[int, int] = (4, 7)
    call_budget: tuple[int, int] = (4, 7)  # calls per dialogue, drawn per seed
    max_chosen_tools: int = Field(default=4, ge=1)
    nudge_when_left: int = Field(default=1, ge=0)  # remind the teacher to answer with this many calls left
    # Rails for the call steps (reverse.ReverseBuilder._allowed_tools): a tool that succeeded is offered
    # again only with repeat_tools; `answer` once this many distinct tools succeeded; `restart` once this
    # many calls failed.
    repeat_tools: bool = False
    answer_after_tools: int = Field(default=2, ge=0)
    restart_after_failures: int = Field(default=2, ge=0)
    max_parse_retries: int = Field(default=2, ge=0)
    # Dialogues in flight on one engine; unset: 4 x the engine's max_num_seqs, so that while the driver
    # handles a finished step (tool call, next prompt) the engine's waiting queue refills the free slot.
    max_concurrent_dialogues: int | None = Field(default=None, ge=1)
    shard_size: int = Field(default=16, ge=1)  # seeds per output shard (the unit of resume)
    temperature: float = Field(default=0.7, ge=0)
    failure_temperature_step: float = Field(default=0.3, ge=0)  # added per failed call (at most 1.5 in all)
    text_temperature: float | None = Field(default=None, ge=0)  # scene, answer, question; None: temperature
    # The scene prompt shows one worked example and each tool's parameter descriptions (a small teacher
    # copies the shape); false: tool names and descriptions only, as before.
    scene_example: bool = True
    max_tokens: int = Field(default=512, ge=16)  # per teacher step
    # Length bounds of the teacher's texts. The scenario is a short statement (its details are the
    # information items, 80 characters each); at most 128 it decodes under a pattern, which xgrammar
    # checks several times faster per token than a longer bound (constraints.bounded_string).
    max_scenario_chars: int = Field(default=128, ge=20)
    max_question_chars: int = Field(default=240, ge=20)
    # Constrain the `answer` text to quote a returned value: keeps a weak teacher grounded.
    grounded_answer: bool = True
    # A tool call in two requests: its name under a small regex, then its arguments (continuing the
    # same tokens) under that tool's own schema, whose grammar the engine compiles once per run. In one
    # request, every step's grammar holds all the dialogue's tools and grounding values: a new grammar
    # to compile at every step (dearer with a big vocab).
    two_step_calls: bool = True
    # A simulated tool's writer may also answer {"error": ...}. Off by default: a 135M teacher allowed to
    # answers nearly every call with an error (README, "Simulated tools"; bench/simulated.py --errors).
    simulated_errors: bool = False
    # The question step: None, the teacher writes "the user's question" as JSON; a stem such as "Can you",
    # the teacher is cast as the user and its one-sentence request begins with the stem (chosen on
    # validation seeds: bench/quality.py).
    question_stem: str | None = None
    # The final answer: None, the text of the teacher's `answer` call (quoting a returned value, with
    # grounded_answer); a stem such as "I found that", a step of its own in which the teacher, shown the
    # results, writes one sentence begun by the stem that quotes a returned value.
    answer_stem: str | None = None
    # After the text gates, the teacher judges each dialogue (can the calls answer the question, does
    # the answer follow from their results); a "no" is the rejected row judge_rejected with the verdict.
    judge: bool = False
    quality: QualityConfig = QualityConfig()

    @model_validator(mode="after")
    def _ranges(self) -> ReverseConfig:
        for key in ("info_items", "call_budget"):
            low, high = getattr(self, key)
            if not 1 <= low <= high:
                raise ValueError(f"{key} must be [low, high] with 1 <= low <= high, got [{low}, {high}]")
        return self


class ESMWeights(_Section):
    """Weights of the five ESM components (docs/design.md section 4: 3/3/1/2/2)."""

    name: float = Field(default=3.0, ge=0)
    required: float = Field(default=3.0, ge=0)
    key: float = Field(default=1.0, ge=0)
    value_type: float = Field(default=2.0, ge=0)
    value: float = Field(default=2.0, ge=0)


class ESMConfig(_Section):
    """Error-oriented scoring: component weights and the chosen threshold of the pair rule."""

    weights: ESMWeights = ESMWeights()
    chosen_threshold: float = Field(default=0.8, ge=0, le=1)
    # (min, max) stateless scorer actors, one CPU each: scoring costs seconds where sampling costs hours
    scorers: tuple[int, int] = (1, 1)

    @model_validator(mode="after")
    def _check_scorers(self) -> ESMConfig:
        low, high = self.scorers
        if not 1 <= low <= high:
            raise ValueError(f"esm.scorers must be [min, max] with 1 <= min <= max, got {list(self.scorers)}")
        return self


class TPSConfig(_Section):
    """Token-level preference sampling (docs/design.md section 3)."""

    sampler: Literal["tps", "sequence"] = "tps"
    top_k: int = Field(default=5, ge=1, le=20)  # alternatives read per position (prompt_logprobs)
    max_branches: int = Field(default=4, ge=1)  # m: branch points per turn
    tau: float = Field(default=0.05, ge=0, le=1)  # min probability mass off the reference token
    continuation: Literal["greedy", "sampled"] = "greedy"
    temperature: float = Field(default=1.0, ge=0)
    num_samples: int = Field(default=5, ge=1)  # n of the sequence-level baseline
    max_tokens: int = Field(default=128, ge=1)
    # Extra turns from BFCL ground truth (entries [bfcl_offset, bfcl_offset + bfcl_limit) of
    # bfcl_category), beside the reversed dialogues; kept apart from the evaluated entries.
    bfcl_category: str = "simple_python"
    bfcl_offset: int = Field(default=200, ge=0)
    bfcl_limit: int = Field(default=0, ge=0)
    # Train on BFCL entries the evaluation also asks (refused unless true; their results are then not
    # held out).
    allow_evaluated_bfcl: bool = False


# Where the shipped DeepSpeed configs live; a bare name like "zero2" means configs/deepspeed/zero2.json.
DEEPSPEED_DIR = Path(__file__).resolve().parents[1] / "configs" / "deepspeed"


class StageConfig(_Section):
    """Optimisation settings of one training stage (SFT or DPO)."""

    enabled: bool = True

    learning_rate: float = Field(default=5e-5, gt=0)
    num_epochs: float = Field(default=1.0, gt=0)
    max_steps: int = Field(default=-1, ge=-1)  # -1: run num_epochs
    per_device_batch_size: int = Field(default=2, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    warmup_steps: int = Field(default=0, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)
    max_length: int = Field(default=1024, ge=16)  # tokens of prompt + completion; longer rows are rejected


class DPOStageConfig(StageConfig):
    """DPO on the TPS pairs: TRL's DPOTrainer with a reference model that is live or precomputed."""

    learning_rate: float = Field(default=1e-5, gt=0)
    beta: float = Field(default=0.1, gt=0)
    loss_type: Literal["sigmoid", "hinge", "ipo", "robust"] = "sigmoid"
    # Reference log-probs of the pairs (taken from their ref_chosen_logps/ref_rejected_logps columns
    # when they have them): "replicas": computed once before training on the vLLM replicas
    # (ttpa_ray/reference.py); "precomputed": computed once by TRL's own pass on the driver; either way
    # training holds no reference model. "live": TRL's reference model runs beside the policy.
    reference: Literal["replicas", "precomputed", "live"] = "replicas"
    # Compute each pair's shared prompt and completion prefix once per forward (policy and live reference)
    # instead of once per completion; loss and gradients equal TRL's standard forward's
    # (ttpa_ray/train/shared_prefix.py).
    shared_prefix: bool = True
    # Share of the pairs' dialogues held back from training (seeded, whole dialogues: no turn of a
    # held-back dialogue is trained on). After training, TRL's evaluation over their pairs gives the loss
    # and the implicit reward accuracy of the trained policy on pairs it never saw: the numbers to choose
    # learning_rate and beta on (bench/alignment.py). 0: every pair is trained on.
    validation_fraction: float = Field(default=0.0, ge=0, lt=1)
    # Start DPO from the exported SFT policy when one exists in the run directory.
    init_from_sft: bool = True


class LoraSettings(_Section):
    """LoRA adapters (PEFT, through TRL) instead of full fine-tuning, for SFT and DPO. The reference of a
    live-reference DPO is the model with its adapters disabled; the exported policy is the base model
    with the adapters merged in, a plain Hugging Face folder that vLLM loads."""

    rank: int = Field(default=16, ge=1)
    alpha: int = Field(default=32, ge=1)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    # "all-linear" (every linear layer but the output head) or module names, e.g. [q_proj, v_proj]
    target_modules: str | list[str] = "all-linear"


class TrainConfig(_Section):
    """Ray Train + DeepSpeed for SFT and DPO; inputs and outputs default to the run directory."""

    num_workers: int = Field(default=2, ge=1)
    use_gpu: bool = False  # one GPU per worker
    cpus_per_worker: float = Field(default=1.0, gt=0)
    accelerator_type: str | None = None  # Ray's accelerator type (e.g. A100): workers run only there
    # A file name in configs/deepspeed ("zero2", "zero3"), a path to a DeepSpeed JSON, or None (plain DDP).
    deepspeed: str | None = "zero2"
    seed: int | None = None  # None: run.seed
    # None: the train part of the run's split (<run_dir>/dialogues/train.parquet)
    dialogues: Annotated[Path | None, AfterValidator(_existing)] = None
    pairs: Annotated[Path | None, AfterValidator(_existing)] = None  # None: <run_dir>/pairs
    output_dir: Path | None = None  # None: <run_dir>/train
    storage_path: str | None = None  # Ray Train storage (local path or cloud URI); None: <output_dir>/ray
    save_steps: int = Field(default=50, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    max_failures: int = Field(default=2, ge=-1)  # -1: retry forever
    logging_steps: int = Field(default=1, ge=1)
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(default_factory=list)
    gradient_checkpointing: bool = False
    lora: LoraSettings | None = None  # None: full fine-tuning
    sft: StageConfig = StageConfig()
    dpo: DPOStageConfig = DPOStageConfig()

    def worker_resources(self) -> dict[str, float]:
        """Ray resources of one training worker (Ray Train's ``resources_per_worker``)."""
        return {"CPU": self.cpus_per_worker, **({"GPU": 1.0} if self.use_gpu else {})}

    @model_validator(mode="after")
    def _known_deepspeed(self) -> TrainConfig:
        if self.deepspeed is not None:
            resolve_deepspeed_path(self.deepspeed)
        return self


def resolve_deepspeed_path(name_or_path: str) -> Path:
    """The DeepSpeed JSON that ``train.deepspeed`` names: a shipped config name or a file path."""
    path = Path(name_or_path)
    if path.suffix == ".json":
        if not path.is_file():
            raise ValueError(f"train.deepspeed: file {path} does not exist")
        return path
    shipped = DEEPSPEED_DIR / f"{name_or_path}.json"
    if not shipped.is_file():
        names = sorted(p.stem for p in DEEPSPEED_DIR.glob("*.json"))
        raise ValueError(
            f"train.deepspeed: {name_or_path!r} is neither a .json file nor a shipped config {names}"
        )
    return shipped


BfclCategory = Literal[
    "simple_python",
    "multiple",
    "parallel",
    "parallel_multiple",
    "live_simple",
    "live_multiple",
    "irrelevance",
]


class EvalConfig(_Section):
    """Evaluation on BFCL v4's AST categories (docs/design.md section 7)."""

    categories: list[BfclCategory] = Field(default_factory=lambda: list(typing.get_args(BfclCategory)))
    limit_per_category: int | None = Field(default=None, ge=1)  # None: every entry
    max_tokens: int = Field(default=256, ge=16)
    bootstrap_samples: int = Field(default=1000, ge=100)  # resamplings of the questions per interval
    # Also train and evaluate the paper's baseline: DPO on sequence-level pairs (tps.num_samples whole
    # samples per turn), as many pairs as TTPA's and the same steps.
    sequence_baseline: bool = True
    # Share of the reversed dialogues held out of TPS and SFT and evaluated (turn by turn) instead.
    heldout_fraction: float = Field(default=0.1, ge=0, lt=1)
    # Share kept for choosing training settings (bench/alignment.py --tune); never trained on either.
    validation_fraction: float = Field(default=0.0, ge=0, lt=1)
    # Held-out dialogues to evaluate (a Parquet file of Dialogue records); None: the run's own split,
    # <run_dir>/dialogues/heldout.parquet, when it exists.
    heldout_dialogues: Annotated[Path | None, AfterValidator(_existing)] = None


class TTPAConfig(_Section):
    """The whole config of a run."""

    run: RunConfig = RunConfig()
    ray: RayConfig = RayConfig()
    model: ModelConfig = ModelConfig()
    teacher_endpoint: TeacherEndpointConfig = TeacherEndpointConfig()
    vllm: VLLMConfig = VLLMConfig()
    reverse: ReverseConfig = ReverseConfig()
    esm: ESMConfig = ESMConfig()
    tps: TPSConfig = TPSConfig()
    eval: EvalConfig = EvalConfig()
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _teacher_endpoint(self) -> TTPAConfig:
        """``model.teacher=openai:<base_url>#<model>`` names the endpoint's base_url and model."""
        if not self.model.teacher_is_endpoint:
            return self
        assert self.model.teacher is not None
        base_url, _, model = self.model.teacher.removeprefix(ENDPOINT_PREFIX).partition("#")
        endpoint = self.teacher_endpoint
        endpoint.base_url = base_url or endpoint.base_url
        endpoint.model = model or endpoint.model
        if not endpoint.base_url or not endpoint.base_url.startswith(("http://", "https://")):
            raise ValueError(
                f"model.teacher {self.model.teacher!r}: write openai:<http(s) base url>#<model>, "
                "e.g. openai:http://127.0.0.1:8000/v1#Qwen/Qwen3-8B"
            )
        if not endpoint.model:
            raise ValueError(f"model.teacher {self.model.teacher!r} names no model: add #<model>")
        return self

    @model_validator(mode="after")
    def _training_turns_not_evaluated(self) -> TTPAConfig:
        tps, ev = self.tps, self.eval
        if not tps.bfcl_limit or tps.bfcl_category not in ev.categories or tps.allow_evaluated_bfcl:
            return self
        start, end = tps.bfcl_offset, tps.bfcl_offset + tps.bfcl_limit
        evaluated = ev.limit_per_category  # the first entries of each category; None: all of them
        overlap_end = end if evaluated is None else min(end, evaluated)
        if overlap_end > start:
            fix = (
                "set eval.limit_per_category"
                if evaluated is None
                else f"raise tps.bfcl_offset to {evaluated}"
            )
            raise ValueError(
                f"{tps.bfcl_category} entries [{start}, {overlap_end}) would be trained on (tps.bfcl_offset "
                f"{start}, tps.bfcl_limit {tps.bfcl_limit}) and evaluated (eval.limit_per_category "
                f"{evaluated}): {fix}, or set tps.allow_evaluated_bfcl=true to train on them anyway"
            )
        return self

    @model_validator(mode="after")
    def _simulated_tools_not_evaluated(self) -> TTPAConfig:
        """Training on simulated calls of a tool the evaluation asks for teaches the simulator's idea
        of that tool to the model graded on it: such a config is refused."""
        parts = simulated_catalogues(self.reverse.catalogue)
        if not parts or not self.eval.categories:
            return self
        from ttpa_ray.tools.registry import load_catalogue

        simulated = {name for part in parts for name in load_catalogue(part).names}
        overlap = sorted(simulated & _evaluated_tool_names(tuple(self.eval.categories)))
        if overlap:
            shown = ", ".join(overlap[:8]) + (" ..." if len(overlap) > 8 else "")
            raise ValueError(
                f"reverse.catalogue {self.reverse.catalogue!r} simulates {len(overlap)} tool(s) that "
                f"eval.categories {list(self.eval.categories)} also evaluate ({shown}): drop them from "
                "the catalogue (for BFCL's, name the classes: bfcl-simulated:Class,...) or those categories "
                "from eval.categories"
            )
        return self

    def digest(self, without: tuple[str, ...] = ()) -> str:
        """A short hash of the resolved config (less the ``without`` sections or ``section.key``s),
        recorded in provenance."""
        exclude: dict[str, Any] = {}
        for name in without:
            section, _, key = name.partition(".")
            if not key:
                exclude[section] = True
            elif exclude.get(section) is not True:
                exclude.setdefault(section, set()).add(key)
        text = json.dumps(self.model_dump(mode="json", exclude=exclude), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _allowed_keys(model: type[BaseModel], path: list[str]) -> list[str]:
    """The keys that exist at ``path`` of the config tree (for error messages)."""
    current: Any = model
    for part in path:
        is_section = isinstance(current, type) and issubclass(current, BaseModel)
        field = current.model_fields.get(part) if is_section else None
        if field is None or not (
            isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        ):
            return []
        current = field.annotation
    return sorted(current.model_fields)


def _describe_field(model: type[BaseModel], path: list[str]) -> str:
    """The allowed values of a leaf field, for error messages (Literal choices or the type)."""
    current: Any = model
    field = None
    for part in path:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return ""
        field = current.model_fields.get(part)
        if field is None:
            return ""
        current = field.annotation
    if field is None:
        return ""
    annotation = field.annotation
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "a section with keys " + ", ".join(sorted(annotation.model_fields))
    if isinstance(annotation, type):
        return f"a value of type {annotation.__name__}"
    return str(annotation).replace("typing.", "")


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for item in err.errors():
        loc = [str(p) for p in item["loc"]]
        key = ".".join(loc) or "<root>"
        if item["type"] == "extra_forbidden":
            keys = _allowed_keys(TTPAConfig, loc[:-1])
            lines.append(f"{key}: unknown key; allowed here: {', '.join(keys)}")
        elif not loc:  # a check across sections: its message names the keys; the input is everything
            lines.append(f"{key}: {item['msg'].removeprefix('Value error, ')}")
        else:
            allowed = _describe_field(TTPAConfig, loc)
            hint = f" (allowed: {allowed})" if allowed else ""
            lines.append(f"{key}: {item['msg']}, got {item.get('input')!r}{hint}")
    return f"invalid config {source}:\n  " + "\n  ".join(lines)


def parse_override(override: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into its key path and a YAML-typed value (``5`` -> int, ``true`` -> bool)."""
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r} is not of the form key.path=value")
    path = [p for p in key.strip().split(".")]
    if any(not p for p in path):
        raise ConfigError(f"override {override!r} has an empty key segment")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return ``data`` with each dotted override set (sections created as needed)."""
    for override in overrides:
        path, value = parse_override(override)
        node = data
        for depth, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(path[: depth + 1])
                raise ConfigError(f"override {override!r}: {where} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def load_config(path: Path | str | None = None, overrides: list[str] | None = None) -> TTPAConfig:
    """Load a YAML config (or the defaults when ``path`` is None), apply overrides, validate."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"config file {path} must hold a mapping of sections, got {type(loaded).__name__}"
            )
        data = loaded
    if overrides:
        data = apply_overrides(data, overrides)
        source += " with overrides " + " ".join(overrides)
    try:
        return TTPAConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None
