"""The teacher behind an OpenAI-compatible server (docs/design.md, "The teacher behind a server").

:class:`EndpointTeacher` is what reverse construction needs of a teacher engine (the
:class:`~ttpa_ray.engine.PromptRenderer` prompts, ``sampling_params``, ``submit`` and ``poll``) with
the generation done by a server: each step's token-id prompt goes to ``/v1/completions`` with its
structured-output constraint (``response_format`` with a JSON schema; a regex as vLLM's
``structured_outputs``), many steps in flight at once from an asyncio loop of its own. The OpenAI
SDK retries 408, 409, 429, 5xx and dropped connections with exponential backoff; a request that
still fails comes back as a completion whose ``finish_reason`` starts with ``error``, which ends its
dialogue as a rejected row (``teacher_unavailable``), never a crash of the stage.

The API key is read from the environment variable the config names, on the driver, and reaches the
actors as a constructor argument (through Ray's object store): it is never in a config, a log
or a record.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from ttpa_ray.config import TeacherEndpointConfig
from ttpa_ray.engine import Completion, PromptRenderer

UNAVAILABLE = "teacher_unavailable"  # the rejection reason of a seed whose teacher request failed


class TeacherEndpointError(RuntimeError):
    """The endpoint cannot serve the run (unreachable, refused the key, does not serve the model)."""


def api_key(endpoint: TeacherEndpointConfig) -> str:
    """The key in the environment variable ``api_key_env`` names; "EMPTY" when none is named (a
    server started without ``--api-key`` takes any)."""
    if endpoint.api_key_env is None:
        return "EMPTY"
    key = os.environ.get(endpoint.api_key_env)
    if not key:
        raise TeacherEndpointError(
            f"teacher_endpoint.api_key_env names {endpoint.api_key_env}, which is not set in this environment"
        )
    return key


@dataclass
class ServedModel:
    """What the endpoint says of the model: its name and, where the server tells, its context length."""

    name: str
    max_model_len: int | None


def check_endpoint(
    endpoint: TeacherEndpointConfig, key: str, timeout_s: float = 10.0, *, probe: bool = True
) -> ServedModel:
    """Ask ``/models``: the endpoint answers, takes the key and serves ``endpoint.model``; with
    ``probe``, one token completed from a token-id prompt shows it takes such prompts and returns
    token ids (a chat-only API does not). Any failure is one line naming the endpoint."""
    import httpx

    url = f"{str(endpoint.base_url).rstrip('/')}/models"
    headers = {**endpoint.headers, "Authorization": f"Bearer {key}"}
    try:
        response = httpx.get(url, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as error:
        raise TeacherEndpointError(f"teacher endpoint {url} does not answer: {error}") from None
    if response.status_code in (401, 403):
        where = f"the key in ${endpoint.api_key_env}" if endpoint.api_key_env else "no key (set api_key_env)"
        raise TeacherEndpointError(f"teacher endpoint {url} refused {where} ({response.status_code})")
    if response.status_code != 200:
        raise TeacherEndpointError(
            f"teacher endpoint {url} answered {response.status_code}: {response.text[:200]}"
        )
    served = {m.get("id"): m for m in response.json().get("data", [])}
    if endpoint.model not in served:
        raise TeacherEndpointError(
            f"teacher endpoint {url} serves {sorted(map(str, served))}, not {endpoint.model!r}"
        )
    length = served[endpoint.model].get("max_model_len")
    if probe:
        body = {"model": endpoint.model, "prompt": [0], "max_tokens": 1, "return_token_ids": True}
        why = ""
        try:
            answer = httpx.post(
                f"{str(endpoint.base_url).rstrip('/')}/completions",
                json=body,
                headers=headers,
                timeout=max(timeout_s, endpoint.timeout_s),
            )
            if answer.status_code != 200 or "token_ids" not in answer.json()["choices"][0]:
                why = f"{answer.status_code}: {answer.text[:160]}"
        except (httpx.HTTPError, ValueError, KeyError, IndexError) as error:
            why = f"{type(error).__name__}: {error}"
        if why:
            raise TeacherEndpointError(
                f"teacher endpoint {endpoint.base_url} does not complete token-id prompts with their token "
                f"ids on /completions ({why}); the teacher needs a vLLM- or SGLang-style server"
            )
    return ServedModel(str(endpoint.model), int(length) if length else None)


class EndpointTeacher(PromptRenderer):
    """Reverse construction's teacher engine, generating on an OpenAI-compatible server."""

    def __init__(self, endpoint: TeacherEndpointConfig, tokenizer_dir: str, key: str) -> None:
        from openai import AsyncOpenAI, DefaultAsyncHttpxClient
        from transformers import AutoTokenizer

        from ttpa_ray.store import local_copy

        served = check_endpoint(endpoint, key, probe=False)  # the driver probed it
        super().__init__(
            AutoTokenizer.from_pretrained(local_copy(tokenizer_dir)),
            max_model_len=endpoint.max_model_len or served.max_model_len or 4096,
            max_num_seqs=endpoint.max_concurrency,
        )
        self.endpoint = endpoint
        self._key = key if key != "EMPTY" else ""  # kept out of the errors a rejected row records
        self.stats: Counter[str] = Counter()  # requests, attempts, failures, tokens
        self.latency_s = 0.0  # summed over the requests that answered
        self._done: queue.Queue[tuple[str, Completion | BaseException]] = queue.Queue()
        self._outstanding = 0
        self._next_send = 0.0  # with teacher_endpoint.qps: when the next request may go out
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="teacher-endpoint", daemon=True).start()

        async def count_attempt(_request: Any) -> None:
            self.stats["attempts"] += 1  # every HTTP attempt, retries included

        async def make_client() -> tuple[Any, asyncio.Semaphore]:
            # the SDK's own HTTP client (its defaults), with a hook that counts every attempt
            http = DefaultAsyncHttpxClient(event_hooks={"request": [count_attempt]})
            client = AsyncOpenAI(
                base_url=endpoint.base_url,
                api_key=key,
                default_headers=endpoint.headers or None,
                max_retries=endpoint.max_retries,
                timeout=endpoint.timeout_s,
                http_client=http,
            )
            return client, asyncio.Semaphore(endpoint.max_concurrency)

        self._client, self._slots = asyncio.run_coroutine_threadsafe(make_client(), self._loop).result()

    def sampling_params(
        self,
        *,
        max_tokens: int,
        temperature: float = 0.0,
        seed: int | None = None,
        json_schema: dict[str, Any] | None = None,
        regex: str | None = None,
    ) -> dict[str, Any]:
        """The request's sampling fields; a JSON schema as ``response_format``, a regex as vLLM's
        ``structured_outputs`` (the OpenAI API has no regex constraint)."""
        if json_schema is not None and regex is not None:
            raise ValueError("a request takes a json_schema or a regex, not both")
        params: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature, "seed": seed}
        extra: dict[str, Any] = {"return_token_ids": True}
        if json_schema is not None:  # the SDK's completions call has no response_format argument
            extra["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "step", "schema": json_schema},
            }
        elif regex is not None:
            extra["structured_outputs"] = {"regex": regex}
        params["extra_body"] = extra
        return params

    def submit(self, request_id: str, prompt: list[int], params: dict[str, Any]) -> None:
        """Send one step; it comes back from :meth:`poll` when the server answered (or gave up)."""
        self._outstanding += 1
        asyncio.run_coroutine_threadsafe(self._complete(request_id, list(prompt), params), self._loop)

    async def _complete(self, request_id: str, prompt: list[int], params: dict[str, Any]) -> None:
        try:
            await self._request(request_id, prompt, params)
        except BaseException as error:  # a bug here, not the endpoint's failure: poll raises it
            self._done.put((request_id, error))

    async def _request(self, request_id: str, prompt: list[int], params: dict[str, Any]) -> None:
        from openai import APIError

        async with self._slots:
            if self.endpoint.qps:  # evenly spaced sends (the loop is one thread: no lock needed)
                now = time.monotonic()
                wait, self._next_send = (
                    self._next_send - now,
                    max(now, self._next_send) + 1 / self.endpoint.qps,
                )
                if wait > 0:
                    await asyncio.sleep(wait)
            self.stats["requests"] += 1  # counted when sent: retries are the attempts beyond these
            start = time.perf_counter()
            try:
                response = await self._client.completions.create(
                    model=str(self.endpoint.model), prompt=prompt, **params
                )
            except APIError as error:  # the SDK's retries are spent: the step fails, not the stage
                self.stats["failures"] += 1
                status = getattr(error, "status_code", None)
                message = str(error).replace(self._key, "***") if self._key else str(error)
                detail = f"{type(error).__name__}{f' {status}' if status else ''}: {message[:200]}"
                self._done.put((request_id, Completion("", [], f"error: {detail}")))
                return
            self.latency_s += time.perf_counter() - start
        choice = response.choices[0]
        ids = (choice.model_extra or {}).get("token_ids")
        if ids is None:  # a server that does not return token ids: the text's, and the stop token
            ids = self.encoder.whole(choice.text)
            if choice.finish_reason == "stop" and self.tokenizer.eos_token_id is not None:
                ids.append(int(self.tokenizer.eos_token_id))
        if response.usage is not None:
            self.stats["prompt_tokens"] += response.usage.prompt_tokens
            self.stats["completion_tokens"] += response.usage.completion_tokens
        self._done.put((request_id, Completion(choice.text, list(ids), choice.finish_reason)))

    def poll(self) -> list[tuple[str, Completion]]:
        """The steps that came back: waits for one if any is out, then takes all that are ready."""
        if self._outstanding == 0:
            return []
        finished = [self._done.get()]
        while True:
            try:
                finished.append(self._done.get_nowait())
            except queue.Empty:
                break
        self._outstanding -= len(finished)
        completions = []
        for request_id, completion in finished:
            if isinstance(completion, BaseException):
                raise completion
            completions.append((request_id, completion))
        return completions

    def summary(self) -> dict[str, Any]:
        """Requests, retries, failures, tokens and mean latency so far (the stage's summary line)."""
        answered = self.stats["requests"] - self.stats["failures"]
        return {
            "requests": self.stats["requests"],
            "retries": max(0, self.stats["attempts"] - self.stats["requests"]),
            "failures": self.stats["failures"],
            "prompt_tokens": self.stats["prompt_tokens"],
            "completion_tokens": self.stats["completion_tokens"],
            "latency_s": self.latency_s,
            "answered": answered,
        }

    def close(self) -> None:
        """Close the HTTP client and stop the loop."""
        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self._client.close(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
