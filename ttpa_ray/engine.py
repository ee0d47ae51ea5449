"""A plain vLLM engine (no Ray): prompt rendering with tools, structured tool calls.

Ray Data replicas are thin shells around :class:`Engine`; tests drive it directly. The same code runs
vLLM's CPU build here and the CUDA build on a cluster: only the engine arguments differ.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ttpa_ray.config import VLLMConfig
from ttpa_ray.models import resolve_dtype

log = logging.getLogger(__name__)


def has_cuda() -> bool:
    """True when torch sees a CUDA device (the GPU build on a cluster)."""
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def engine_kwargs(model: str, vllm: VLLMConfig, *, dtype: str = "auto", seed: int = 0) -> dict[str, Any]:
    """Arguments for ``vllm.LLM`` from the config; the CPU/GPU differences live here and only here."""
    kwargs: dict[str, Any] = {
        "model": model,
        "tensor_parallel_size": vllm.tensor_parallel_size,
        "gpu_memory_utilization": vllm.gpu_memory_utilization,
        "enforce_eager": vllm.enforce_eager,
        "max_model_len": vllm.max_model_len,
        "max_num_seqs": vllm.max_num_seqs,
        "enable_prefix_caching": vllm.enable_prefix_caching,
        "seed": seed,
        "dtype": resolve_dtype(dtype),  # auto: bf16 where this device computes it natively
        # Engine-level switch: without it a random model pads JSON with whitespace up to max_tokens.
        "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
    }
    if not has_cuda():
        # Tensor parallelism is a GPU notion; the CPU build runs one process per replica.
        kwargs["tensor_parallel_size"] = 1
        # vLLM 0.32's CPU runner crashes ("CPU Generator does not use offset") when a request with
        # its own seed is prefilled in chunks; whole prefills avoid that path.
        kwargs["enable_chunked_prefill"] = False
        kwargs["max_num_batched_tokens"] = max(vllm.max_model_len, 8192)
    return kwargs


class SegmentEncoder:
    """Token ids of rendered prompts, each stretch of text between special tokens encoded once.

    A fast tokenizer splits its input at added tokens before it normalises and pre-tokenises, so the
    ids of a prompt are the ids of its stretches between special tokens, joined with the special tokens'
    own ids. The stretches repeat: every step of a dialogue re-renders the system turn with its tool
    list and all earlier turns, so each is looked up instead of encoded again (reverse construction
    renders hundreds of ~1,000-token prompts per shard, and the engine waits on the driver meanwhile).
    The first ``verify`` prompts are also encoded whole; one difference (a tokenizer whose special
    tokens strip neighbouring spaces, say) turns the cache off for good and every prompt is encoded whole.
    Worth its lines where the engine outpaces the driver (a fast replica; the tiny model here), not on
    SmolLM2 on this CPU: ``bench/reverse.py --without-engine-caches`` measures both caches (docs/results.md).
    """

    def __init__(self, tokenizer: Any, *, max_entries: int = 4096, verify: int = 16) -> None:
        self.tokenizer = tokenizer
        decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        self.special_ids = {tok.content: int(i) for i, tok in decoder.items() if tok.special and tok.content}
        self.exact = bool(self.special_ids)
        alternatives = sorted(self.special_ids, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")") if alternatives else None
        self._cache: OrderedDict[str, list[int]] = OrderedDict()
        self.max_entries = max_entries
        self.verify_left = verify
        self.hits = self.misses = 0

    def whole(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def encode(self, text: str) -> list[int]:
        if not self.exact or self._split is None:
            return self.whole(text)
        ids: list[int] = []
        for part in self._split.split(text):
            if not part:
                continue
            special = self.special_ids.get(part)
            if special is not None:
                ids.append(special)
                continue
            cached = self._cache.get(part)
            if cached is None:
                self.misses += 1
                cached = self.whole(part)
                self._cache[part] = cached
                if len(self._cache) > self.max_entries:
                    self._cache.popitem(last=False)
            else:
                self.hits += 1
                self._cache.move_to_end(part)
            ids.extend(cached)
        if self.verify_left > 0:
            self.verify_left -= 1
            whole = self.whole(text)
            if whole != ids:
                log.warning("prompt ids differ when encoded between special tokens; encoding whole prompts")
                self.exact = False
                self._cache.clear()
                return whole
        return ids


# vLLM checks each request's JSON schema or regex in the driver by building its grammar (the engine
# then compiles it again); a regex is built in a thread of its own, started for that one check.
# Dialogues send the same schemas and regexes step after step, so one that passed is remembered (keyed
# by its kind and canonical text) and the check runs once per distinct constraint.
_VALIDATED_SCHEMAS: OrderedDict[str, None] = OrderedDict()
_MAX_VALIDATED = 4096


def _constraint_key(so: Any) -> str | None:
    """The memo key of a request's one JSON schema or regex; None for anything else (checked each time)."""
    if so is None:
        return None
    schema, regex = getattr(so, "json", None), getattr(so, "regex", None)
    if getattr(so, "choice", None) or getattr(so, "grammar", None) or getattr(so, "structural_tag", None):
        return None
    if schema and not regex:
        return "json\0" + (schema if isinstance(schema, str) else json.dumps(schema, sort_keys=True))
    if regex and not schema:
        return "regex\0" + regex
    return None


def remember_schema_checks() -> bool:
    """Wrap vLLM's xgrammar request check with a per-schema memory; True if installed (idempotent)."""
    try:
        from vllm.v1.structured_output import backend_xgrammar
    except ImportError:
        return False
    check = getattr(backend_xgrammar, "validate_xgrammar_grammar", None)
    if check is None:
        return False
    if getattr(check, "_ttpa_remembers", False):
        return True
    original: Callable[[Any], None] = check

    def remembering(sampling_params: Any) -> None:
        so = getattr(sampling_params, "structured_outputs", None)
        key = _constraint_key(so)
        if key is None:
            original(sampling_params)
            return
        if key in _VALIDATED_SCHEMAS:
            _VALIDATED_SCHEMAS.move_to_end(key)
            return
        original(sampling_params)  # raises for a constraint xgrammar cannot take: never remembered
        _VALIDATED_SCHEMAS[key] = None
        if len(_VALIDATED_SCHEMAS) > _MAX_VALIDATED:
            _VALIDATED_SCHEMAS.popitem(last=False)

    remembering._ttpa_remembers = True  # type: ignore[attr-defined]
    backend_xgrammar.validate_xgrammar_grammar = remembering
    return True


@dataclass
class Completion:
    """One generated text with its token ids and why it stopped."""

    text: str
    token_ids: list[int]
    finish_reason: str | None


ENGINE_DEAD_EXIT_CODE = 75  # a replica process ending because its engine core died


def is_engine_core(process: Any) -> bool:
    """Whether the psutil process is a vLLM engine core; False for one that has exited (a killed
    core is a zombie until its parent reaps it, and psutil cannot read a zombie's command line)."""
    import psutil

    try:
        return " ".join(process.cmdline()).startswith("VLLM::EngineCore")
    except (psutil.NoSuchProcess, psutil.AccessDenied):  # ZombieProcess is a NoSuchProcess
        return False


def _in_ray_actor() -> bool:
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
    except Exception:
        return False


class PromptRenderer:
    """Prompts as token ids through the teacher's own chat template, for an engine here or a server.

    ``max_num_seqs`` is how many requests the engine runs at once; ``max_model_len`` the prompt and
    completion tokens a request may hold."""

    def __init__(self, tokenizer: Any, *, max_model_len: int, max_num_seqs: int) -> None:
        self.tokenizer = tokenizer
        self.encoder = SegmentEncoder(tokenizer)
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs

    def prompt_too_long(self, prompt: Sequence[int]) -> str | None:
        """Why a prompt cannot be generated from (no room left under ``vllm.max_model_len``), else None."""
        if len(prompt) < self.max_model_len:
            return None
        return f"{len(prompt)} prompt tokens, vllm.max_model_len {self.max_model_len}"

    def render_text(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None = None,
        *,
        add_generation_prompt: bool = True,
    ) -> str:
        """Prompt text through the tokenizer's own chat template, tools included.

        Rendered here rather than by ray.data.llm, whose template stage passes no ``tools``.
        """
        text = self.tokenizer.apply_chat_template(
            list(messages),
            tools=list(tools) if tools else None,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
        )
        return str(text)

    def render(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None = None,
        *,
        add_generation_prompt: bool = True,
    ) -> list[int]:
        """Prompt token ids of :meth:`render_text` (the template carries the special tokens)."""
        text = self.render_text(messages, tools, add_generation_prompt=add_generation_prompt)
        return self.encoder.encode(text)


class Engine(PromptRenderer):
    """A vLLM ``LLM`` with the project's prompt rendering; construct once per process (it starts slowly)."""

    def __init__(self, model: str, vllm: VLLMConfig, *, dtype: str = "auto", seed: int = 0) -> None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from vllm import LLM

        from ttpa_ray.reaper import watch_this_process
        from ttpa_ray.store import local_copy

        watch_this_process()  # the engine core and its worker processes die with their host

        model = local_copy(model)  # a model folder of a run dir in an object store: fetched once
        self.model = model
        self.llm = LLM(**engine_kwargs(model, vllm, dtype=dtype, seed=seed))
        super().__init__(
            self.llm.get_tokenizer(),
            # vllm.max_model_len, as the engine resolved it
            max_model_len=int(getattr(self.llm.llm_engine.model_config, "max_model_len", vllm.max_model_len)),
            max_num_seqs=vllm.max_num_seqs,
        )
        remember_schema_checks()
        self.in_actor = _in_ray_actor()
        self._closing = False
        self._watch_engine_core()

    def _watch_engine_core(self) -> None:
        """Turn the engine core's death into an :class:`EngineDeadError` for the caller.

        vLLM's client notices a dead core on the next request, but a request in flight when the core
        is SIGKILLed waits for its output forever; a thread that sees the core go hands that wait
        the error instead."""
        import threading
        import time

        import psutil
        from vllm.v1.engine.exceptions import EngineDeadError

        cores = [c for c in psutil.Process().children() if is_engine_core(c)]
        client = getattr(self.llm.llm_engine, "engine_core", None)
        outputs = getattr(client, "outputs_queue", None)
        if not cores or outputs is None:
            return  # an in-process core, or a client without the queue: nothing to watch
        core = cores[0]

        def watch() -> None:
            while True:
                try:
                    if core.status() == psutil.STATUS_ZOMBIE:
                        break
                except psutil.NoSuchProcess:
                    break
                time.sleep(0.5)
            if not self._closing:
                log.error("vLLM engine core %s died", core.pid)
                outputs.put_nowait(EngineDeadError())

        threading.Thread(target=watch, name="engine-core-watch", daemon=True).start()

    @contextlib.contextmanager
    def alive(self) -> Iterator[None]:
        """A replica whose engine core died can never answer again: its actor ends, so that Ray
        restarts it and retries its batch (max_restarts / max_task_retries) instead of the batch's
        rows failing one by one. Outside an actor the error is the caller's."""
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            yield
        except EngineDeadError:
            if not self.in_actor:
                raise
            log.error("vLLM engine core died: ending this replica so that Ray restarts it")
            os._exit(ENGINE_DEAD_EXIT_CODE)

    def sampling_params(
        self,
        *,
        max_tokens: int,
        temperature: float = 0.0,
        seed: int | None = None,
        json_schema: dict[str, Any] | None = None,
        regex: str | None = None,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
    ) -> Any:
        """vLLM SamplingParams; ``json_schema`` or ``regex`` turns on structured outputs."""
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        if json_schema is not None and regex is not None:
            raise ValueError("a request takes a json_schema or a regex, not both")
        structured = None
        if json_schema is not None:
            structured = StructuredOutputsParams(json=json_schema)
        elif regex is not None:
            structured = StructuredOutputsParams(regex=regex)
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            seed=seed,
            structured_outputs=structured,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_clone=True,  # fresh per request: vLLM need not deep-copy it (and its schema) again
        )

    def generate(self, prompts: Sequence[list[int]], params: Any | Sequence[Any]) -> list[Completion]:
        """Generate one completion per prompt (token-id prompts), in prompt order."""
        from vllm.inputs import TokensPrompt

        inputs = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        with self.alive():
            outputs = self.llm.generate(inputs, params, use_tqdm=False)
        return [
            Completion(
                text=o.outputs[0].text,
                token_ids=list(o.outputs[0].token_ids),
                finish_reason=o.outputs[0].finish_reason,
            )
            for o in outputs
        ]

    def completion_logprobs(self, sequences: Sequence[list[int]], starts: Sequence[int]) -> list[float]:
        """For each token sequence, the sum of the log-probs of its tokens from ``start`` on, each given
        the tokens before it (teacher forcing: vLLM's prompt log-probs, nothing generated that counts)."""
        from vllm.inputs import TokensPrompt

        inputs = [TokensPrompt(prompt_token_ids=list(s)) for s in sequences]
        params = [self.sampling_params(max_tokens=1, prompt_logprobs=0) for _ in sequences]
        with self.alive():
            outputs = self.llm.generate(inputs, params, use_tqdm=False)
        sums = []
        for sequence, start, output in zip(sequences, starts, outputs, strict=True):
            per_token: list[Any] = list(output.prompt_logprobs or [])  # None at position 0
            sums.append(
                sum(float(per_token[i][sequence[i]].logprob) for i in range(max(start, 1), len(sequence)))
            )
        return sums

    # -- continuous batching: requests join the running batch as soon as they are known ----------
    def submit(self, request_id: str, prompt: list[int], params: Any) -> None:
        """Add one request to the engine's running batch without waiting for anything.

        With :meth:`poll` this is vLLM's continuous batching driven by the caller: a dialogue whose
        step finished submits its next step while the others are still decoding, instead of the
        whole batch waiting for its slowest member (what :meth:`generate` does).
        """
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        params.output_kind = RequestOutputKind.FINAL_ONLY  # only finished requests come back
        # One decode of the finished ids (in poll) instead of vLLM's per-token incremental detokenizer.
        params.detokenize = False
        with self.alive():
            self.llm.llm_engine.add_request(request_id, TokensPrompt(prompt_token_ids=list(prompt)), params)

    def poll(self) -> list[tuple[str, Completion]]:
        """Run one engine step; the requests that finished in it, as (request id, completion)."""
        finished = []
        with self.alive():
            outputs = self.llm.llm_engine.step()
        for output in outputs:
            if output.finished:
                first = output.outputs[0]  # type: ignore[index]  # a generate request's output
                finished.append(
                    (
                        str(output.request_id),
                        Completion(
                            self.tokenizer.decode(first.token_ids, skip_special_tokens=True),
                            list(first.token_ids),
                            first.finish_reason,
                        ),
                    )
                )
        return finished

    def close(self) -> None:
        """Stop the engine's background process now rather than at interpreter exit."""
        self._closing = True
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
