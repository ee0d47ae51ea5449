"""Tool-call codec: one in-memory call type, its canonical form, and its text renderings.

Formats: OpenAI messages (``tool_calls`` with JSON-string arguments), Qwen/Hermes
``<tool_call>{...}</tool_call>`` text, Llama-3.1 JSON and bare JSON. Parsing never raises on model
text: it returns a :class:`ParseResult` carrying the error. :func:`render_with_spans` renders the same
text as the ``render_*`` functions and records where the tool name, each key and each value sit, so
token-level preference sampling (TPS) can map them onto tokens with :func:`token_spans`.
"""

from __future__ import annotations

import bisect
import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar


@dataclass(frozen=True)
class ToolCall:
    """One call of a tool: its name and its (JSON-compatible) arguments."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """``{"name": ..., "arguments": {...}}`` (the arguments dict is shared, not copied)."""
        return {"name": self.name, "arguments": self.arguments}


@dataclass(frozen=True)
class ParseResult:
    """Calls parsed from text; ``error`` is set (and ``calls`` may be partial) when parsing failed."""

    calls: tuple[ToolCall, ...] = ()
    error: str | None = None
    # Which parser produced the result ("openai", "hermes", "llama31", "json", "object"); None if none did.
    fmt: str | None = None

    @property
    def ok(self) -> bool:
        """True when parsing succeeded; a successful parse always holds at least one call."""
        return self.error is None


def _canonical_value(value: Any) -> Any:
    # 1 and 1.0 are the same JSON number; integral floats collapse to int.
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            return int(value)
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        return {str(k): _canonical_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical_value(v) for v in value]
    return value


def canonical(call: ToolCall) -> str:
    """Canonical text of a call for deduplication: sorted keys, no whitespace, 1 == 1.0."""
    return json.dumps(
        {"name": call.name, "arguments": _canonical_value(call.arguments)},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )


def canonical_calls(calls: Sequence[ToolCall]) -> str:
    """Canonical text of a multi-call turn: a JSON array of the sorted canonical calls.

    Order-insensitive (parallel calls may come in any order) but multiplicity-sensitive: two identical
    calls are not the same turn as one.
    """
    return "[" + ",".join(sorted(canonical(call) for call in calls)) + "]"


_CallsT = TypeVar("_CallsT", bound="ToolCall | Sequence[ToolCall]")


def _calls_key(item: ToolCall | Sequence[ToolCall]) -> str:
    return canonical_calls([item] if isinstance(item, ToolCall) else item)


def dedupe_indices(items: Iterable[ToolCall | Sequence[ToolCall]]) -> list[int]:
    """Indices of the first occurrence of each distinct call (or multi-call turn), by canonical form.

    Use it to deduplicate records that carry a call beside other data (branch position, log-prob...).
    """
    seen: set[str] = set()
    keep: list[int] = []
    for index, item in enumerate(items):
        key = _calls_key(item)
        if key not in seen:
            seen.add(key)
            keep.append(index)
    return keep


def dedupe(calls_lists: Iterable[_CallsT]) -> list[_CallsT]:
    """The items (single calls or multi-call turns) without canonical duplicates, first one kept, in order."""
    items = list(calls_lists)
    return [items[index] for index in dedupe_indices(items)]


# --------------------------------------------------------------------------------------------------
# Rendering

FORMATS: tuple[str, ...] = ("hermes", "llama31", "json")


@dataclass(frozen=True)
class _Layout:
    """The fixed text around each call of a text format."""

    head: str  # before the name
    mid: str  # between the name and the arguments object
    tail: str  # after the arguments object
    sep: str  # between calls


_LAYOUTS: dict[str, _Layout] = {
    # Qwen2.5's chat template: '\n' (before each call) + these pieces; the first '\n' belongs to the turn.
    "hermes": _Layout('<tool_call>\n{"name": "', '", "arguments": ', "}\n</tool_call>", "\n"),
    # Llama-3.1's chat template; it allows one call per message, vLLM's llama3_json parser splits on "; ".
    "llama31": _Layout('{"name": "', '", "parameters": ', "}", "; "),
    # json.dumps of the call dict (one call) or of the list of call dicts (any other count).
    "json": _Layout('{"name": "', '", "arguments": ', "}", ", "),
}


def _dumps(value: Any) -> str:
    # Exactly what transformers' jinja ``tojson`` filter produces (ensure_ascii=False, ", " and ": ").
    return json.dumps(value, ensure_ascii=False)


def _name_text(name: str) -> str:
    # The chat templates insert the name raw; JSON-escaping changes nothing for real tool names and
    # keeps names with quotes or backslashes parseable.
    return _dumps(name)[1:-1]


def _layout(fmt: str) -> _Layout:
    layout = _LAYOUTS.get(fmt)
    if layout is None:
        raise ValueError(f"unknown tool-call format {fmt!r}; expected one of {FORMATS}")
    return layout


def _render(calls: Sequence[ToolCall], fmt: str) -> str:
    layout = _layout(fmt)
    body = layout.sep.join(
        layout.head + _name_text(call.name) + layout.mid + _dumps(call.arguments) + layout.tail
        for call in calls
    )
    if fmt == "json" and len(calls) != 1:
        return "[" + body + "]"
    return body


def render_openai(
    calls: Sequence[ToolCall], content: str | None = None, *, string_arguments: bool = True
) -> dict[str, Any]:
    """An OpenAI assistant message holding ``calls``, with deterministic ids ``call_0``, ``call_1``...

    ``function.arguments`` is the JSON string ``json.dumps(arguments, ensure_ascii=False)`` (the same text
    :func:`render_hermes` embeds); ``string_arguments=False`` keeps the dict instead, which is what a
    stock Hugging Face chat template expects (it applies ``tojson`` itself).
    """
    return {
        "role": "assistant",
        "content": content,
        "tool_calls": [
            {
                "id": f"call_{index}",
                "type": "function",
                "function": {
                    "name": call.name,
                    "arguments": _dumps(call.arguments) if string_arguments else dict(call.arguments),
                },
            }
            for index, call in enumerate(calls)
        ],
    }


def render_hermes(calls: Sequence[ToolCall]) -> str:
    """Qwen2.5/Hermes text, byte-identical to what Qwen2.5's chat template emits for the tool calls.

    Each call is ``<tool_call>\\n{"name": "NAME", "arguments": ARGS}\\n</tool_call>`` with
    ``ARGS = json.dumps(arguments, ensure_ascii=False)``; calls are joined by ``"\\n"``. (The template
    puts a ``"\\n"`` before every call; the first one follows ``<|im_start|>assistant`` or the content
    and is not part of this text.)
    """
    return _render(calls, "hermes")


def render_llama31(calls: Sequence[ToolCall]) -> str:
    """Llama-3.1 JSON tool-call text: ``{"name": "NAME", "parameters": ARGS}`` per call, joined by "; "."""
    return _render(calls, "llama31")


def render_json(calls: Sequence[ToolCall]) -> str:
    """Bare JSON: ``json.dumps`` of the call dict for one call, of the list of call dicts otherwise."""
    return _render(calls, "json")


def render(calls: Sequence[ToolCall], fmt: str = "hermes") -> str:
    """Render ``calls`` in a text format of :data:`FORMATS` (``"hermes"``, ``"llama31"``, ``"json"``)."""
    return _render(calls, fmt)


# --------------------------------------------------------------------------------------------------
# Span map


@dataclass(frozen=True)
class Span:
    """Where one meaningful piece of a rendered call sits in the text.

    - ``"name"``: the tool name, inside its quotes; ``path == ()``.
    - ``"key"``: an object key, inside its quotes (JSON-escaped text: equal to the key unless the key
      holds quotes, backslashes or control characters); ``path`` ends with the key.
    - ``"value"``: the whole JSON text of a value, quotes of strings included, brackets of containers
      included, so ``json.loads(text[start:end]) == value``; ``path`` leads to it, e.g. ``("city",)`` or
      ``("filters", 0, "lo")``. Containers get a span and so do their keys and items.

    The top-level arguments object has no span of its own.
    """

    kind: str  # "name" | "key" | "value"
    start: int  # char offset in the rendered text, inclusive
    end: int  # exclusive
    path: tuple[str | int, ...] = ()


@dataclass(frozen=True)
class RenderedCalls:
    """Rendered text of some calls with the spans of their names, keys and values (in text order)."""

    text: str
    spans: tuple[Span, ...]
    call_index: tuple[int, ...]  # for each span, which call it belongs to

    def text_of(self, span: Span) -> str:
        """The characters of ``span``."""
        return self.text[span.start : span.end]


def _key_text(key: Any) -> str:
    # json.dumps's conversion of non-string keys, in its order (bool before int: True is an int).
    if isinstance(key, str):
        return key
    if isinstance(key, float):
        return _dumps(key)
    if key is True:
        return "true"
    if key is False:
        return "false"
    if key is None:
        return "null"
    if isinstance(key, int):
        return int.__repr__(key)
    raise TypeError(f"keys must be str, int, float, bool or None, not {type(key).__name__}")


class _SpanWriter:
    """Renders JSON like ``json.dumps(ensure_ascii=False)`` while recording spans."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.pos = 0
        self.spans: list[Span] = []
        self.owners: list[int] = []
        self.call = 0

    def write(self, piece: str) -> None:
        self.parts.append(piece)
        self.pos += len(piece)

    def add(self, kind: str, start: int, end: int, path: tuple[str | int, ...]) -> int:
        self.spans.append(Span(kind, start, end, path))
        self.owners.append(self.call)
        return len(self.spans) - 1

    def quoted(self, kind: str, text: str, path: tuple[str | int, ...]) -> None:
        self.write('"')
        start = self.pos
        self.write(_dumps(text)[1:-1])
        self.add(kind, start, self.pos, path)
        self.write('"')

    def value(self, value: Any, path: tuple[str | int, ...]) -> None:
        start = self.pos
        # Reserve the container's slot first so spans stay in text order (container before children).
        slot = self.add("value", start, start, path) if path else -1
        if isinstance(value, str) or value is None or isinstance(value, int | float):
            self.write(_dumps(value))
        elif isinstance(value, dict):
            self.write("{")
            for index, (key, item) in enumerate(value.items()):
                if index:
                    self.write(", ")
                key_text = _key_text(key)
                self.quoted("key", key_text, (*path, key_text))
                self.write(": ")
                self.value(item, (*path, key_text))
            self.write("}")
        elif isinstance(value, list | tuple):
            self.write("[")
            for index, item in enumerate(value):
                if index:
                    self.write(", ")
                self.value(item, (*path, index))
            self.write("]")
        else:
            raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")
        if slot >= 0:
            self.spans[slot] = Span("value", start, self.pos, path)


def render_with_spans(calls: Sequence[ToolCall], fmt: str = "hermes") -> RenderedCalls:
    """Render ``calls`` as :func:`render` does (same text) and record the spans of names, keys and values.

    ``fmt`` is one of ``"hermes"``, ``"llama31"``, ``"json"``. See :class:`Span` for what each span covers.
    """
    layout = _layout(fmt)
    writer = _SpanWriter()
    bracket = fmt == "json" and len(calls) != 1
    if bracket:
        writer.write("[")
    for index, call in enumerate(calls):
        writer.call = index
        if index:
            writer.write(layout.sep)
        writer.write(layout.head[:-1])
        writer.quoted("name", call.name, ())
        writer.write(layout.mid[1:])
        writer.value(call.arguments, ())
        writer.write(layout.tail)
    if bracket:
        writer.write("]")
    text = "".join(writer.parts)
    # Cheap guard: spans are only meaningful if the text is exactly what the renderers emit.
    if text != _render(calls, fmt):
        raise ValueError("span rendering diverged from json.dumps; arguments hold a non-JSON value")
    return RenderedCalls(text=text, spans=tuple(writer.spans), call_index=tuple(writer.owners))


def token_spans(spans: Sequence[Span], offsets: Sequence[Sequence[int]], *, base: int = 0) -> list[list[int]]:
    """For each span, the indices of the tokens whose char range overlaps it.

    ``offsets`` is a tokenizer's ``offset_mapping`` (one ``(start, end)`` per token, end exclusive);
    empty ranges (special tokens) never match. ``base`` is the char offset of the rendered text inside
    the tokenized string (e.g. where the assistant turn starts in a chat-template prompt).
    """
    tokens = sorted(
        (int(pair[0]), int(pair[1]), index)
        for index, pair in enumerate(offsets)
        if int(pair[1]) > int(pair[0])
    )
    starts = [start for start, _, _ in tokens]
    longest = max((end - start for start, end, _ in tokens), default=0)
    result: list[list[int]] = []
    for span in spans:
        lo_char, hi_char = span.start + base, span.end + base
        # A token overlapping the span starts before its end and at most `longest` chars before its start.
        lo = bisect.bisect_left(starts, lo_char - longest + 1)
        hi = bisect.bisect_left(starts, hi_char)
        result.append(sorted(index for _, end, index in tokens[lo:hi] if end > lo_char))
    return result


def span_at(rendered: RenderedCalls, char_pos: int) -> Span | None:
    """The innermost span containing ``char_pos`` (a key or scalar before its container), or None."""
    best: Span | None = None
    for span in rendered.spans:
        if span.start <= char_pos < span.end and (
            best is None or span.end - span.start < best.end - best.start
        ):
            best = span
    return best


# --------------------------------------------------------------------------------------------------
# Parsing


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} overflows a float")
    return value


# strict=False: a raw newline or tab inside a string is unambiguous and models do emit it.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float, strict=False)
_WS = re.compile(r"\s*")
_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_PYTHON_TAG = "<|python_tag|>"
_END_MARKERS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>")


def _skip_ws(text: str, pos: int) -> int:
    match = _WS.match(text, pos)
    return match.end() if match else pos


def json_type_of(value: Any) -> str:
    """The JSON type name of a Python value (a bool is ``boolean``, never ``integer``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _json_error(exc: BaseException, text: str) -> str:
    if isinstance(exc, RecursionError):
        return "JSON nested too deeply"
    if isinstance(exc, json.JSONDecodeError):
        where = f"{exc.msg} char {exc.pos}" if exc.msg.endswith(" at") else f"{exc.msg} at char {exc.pos}"
        if exc.pos >= len(text.rstrip()) or exc.msg.startswith("Unterminated string"):
            return f"truncated JSON ({where})"
        return f"invalid JSON ({where})"
    return f"invalid JSON ({exc})"


def _call_from_obj(obj: Any, where: str) -> ToolCall | str:
    """A call from a decoded call object or OpenAI tool_call dict, or the reason it is not one."""
    if isinstance(obj, ToolCall):
        return obj
    if not isinstance(obj, dict):
        return f"{where}: expected a JSON object, got {json_type_of(obj)}"
    if "name" not in obj and "function" in obj:
        obj = obj["function"]
        if not isinstance(obj, dict):
            return f"{where}: 'function' is {json_type_of(obj)}, not a JSON object"
    if "name" not in obj:
        return f"{where}: missing 'name'"
    name = obj["name"]
    if not isinstance(name, str):
        return f"{where}: 'name' is {json_type_of(name)}, not a string"
    if not name.strip():
        return f"{where}: empty 'name'"
    key = "arguments" if "arguments" in obj else "parameters"
    args = obj.get(key)
    if isinstance(args, str):
        # OpenAI style: the arguments object travels as a JSON string.
        if not args.strip():
            args = {}
        else:
            try:
                args = _DECODER.decode(args)
            except (ValueError, RecursionError) as exc:
                return f"{where}: {key} string holds {_json_error(exc, args)}"
    if args is None:  # missing or null: a call without arguments
        args = {}
    if not isinstance(args, dict):
        return f"{where}: {key} is not a JSON object (got {json_type_of(args)})"
    return ToolCall(name=name, arguments=args)


def _fail(calls: list[ToolCall], error: str, fmt: str) -> ParseResult:
    return ParseResult(calls=tuple(calls), error=error, fmt=fmt)


def _guarded(fmt: str, parse: Callable[[Any], ParseResult], obj: Any) -> ParseResult:
    # The contract is "never raises": a parser bug must surface as an error, not kill a Ray task.
    try:
        return parse(obj)
    except Exception as exc:
        return ParseResult(error=f"internal parser error: {type(exc).__name__}: {exc}"[:300], fmt=fmt)


def _parse_items(items: Sequence[Any], fmt: str) -> ParseResult:
    calls: list[ToolCall] = []
    for index, item in enumerate(items):
        call = _call_from_obj(item, f"tool_call {index}")
        if isinstance(call, str):
            return _fail(calls, call, fmt)
        calls.append(call)
    if not calls:
        return _fail(calls, "no tool calls", fmt)
    return ParseResult(calls=tuple(calls), fmt=fmt)


def _parse_obj(obj: Any, fmt: str) -> ParseResult:
    """A decoded object: OpenAI message, tool_call dict, call object, or a list of the last two."""
    if isinstance(obj, ToolCall):
        return ParseResult(calls=(obj,), fmt=fmt)
    if isinstance(obj, dict):
        is_call = "name" in obj or "function" in obj
        if "tool_calls" in obj or ("role" in obj and not is_call):
            tool_calls = obj.get("tool_calls")
            if not tool_calls:
                return _fail([], "message has no tool_calls", fmt)
            if not isinstance(tool_calls, list | tuple):
                return _fail([], f"tool_calls is {json_type_of(tool_calls)}, not a list", fmt)
            return _parse_items(tool_calls, fmt)
        return _parse_items([obj], fmt)
    if isinstance(obj, list | tuple):
        return _parse_items(obj, fmt)
    return _fail([], f"expected a call object, a message or a list of calls, got {json_type_of(obj)}", fmt)


def _parse_openai(obj: Any) -> ParseResult:
    if obj is None:
        return _fail([], "no input (None)", "openai")
    if isinstance(obj, str):
        # A message serialised as JSON text.
        if not obj.strip():
            return _fail([], "empty input", "openai")
        try:
            obj = _DECODER.decode(obj)
        except (ValueError, RecursionError) as exc:
            return _fail([], _json_error(exc, obj), "openai")
    return _parse_obj(obj, "openai")


def parse_openai(obj: Any) -> ParseResult:
    """Calls of an OpenAI assistant message, or of a list of tool_call dicts (``{"function": {...}}`` or
    bare ``{"name", "arguments"}``); ``function.arguments`` may be a JSON string or a dict."""
    return _guarded("openai", _parse_openai, obj)


def _parse_hermes(text: Any) -> ParseResult:
    if not isinstance(text, str):
        return _fail([], f"expected text, got {type(text).__name__}", "hermes")
    calls: list[ToolCall] = []
    pos = 0
    while (start := text.find(_OPEN, pos)) >= 0:
        where = f"tool_call {len(calls)}"
        body = _skip_ws(text, start + len(_OPEN))
        if body >= len(text) or text.startswith(_CLOSE, body):
            return _fail(calls, f"{where}: empty <tool_call> block", "hermes")
        try:
            obj, end = _DECODER.raw_decode(text, body)
        except (ValueError, RecursionError) as exc:
            return _fail(calls, f"{where}: {_json_error(exc, text)}", "hermes")
        after = _skip_ws(text, end)
        if text.startswith(_CLOSE, after):
            pos = after + len(_CLOSE)
        elif after >= len(text) or text.startswith(_OPEN, after) or text.startswith("<|", after):
            pos = after  # missing closing tag: tolerated at the end or before the next call
        else:
            return _fail(calls, f"{where}: unexpected text after the JSON object at char {after}", "hermes")
        call = _call_from_obj(obj, where)
        if isinstance(call, str):
            return _fail(calls, call, "hermes")
        calls.append(call)
    if not calls:
        return _fail(calls, "no <tool_call> block found", "hermes")
    return ParseResult(calls=tuple(calls), fmt="hermes")


def parse_hermes(text: str) -> ParseResult:
    """Calls in Qwen/Hermes text: every ``<tool_call>{...}</tool_call>`` block, anywhere in the text.

    A missing closing tag is tolerated at the end of the text (or before the next ``<tool_call>`` or a
    special token such as ``<|im_end|>``). Each body must be a JSON object with a string ``name`` and an
    object ``arguments`` (or ``parameters``; a JSON string holding an object, missing or null mean ``{}``).
    Errors name the block, counted from 0: ``"tool_call 1: arguments is not a JSON object (got array)"``.
    """
    return _guarded("hermes", _parse_hermes, text)


def _parse_llama31(text: Any) -> ParseResult:
    if not isinstance(text, str):
        return _fail([], f"expected text, got {type(text).__name__}", "llama31")
    calls: list[ToolCall] = []
    pos = _skip_ws(text, 0)
    if text.startswith(_PYTHON_TAG, pos):
        pos += len(_PYTHON_TAG)
    while True:
        pos = _skip_ws(text, pos)
        if calls:
            # Between calls: ";" and/or whitespace (newlines).
            while pos < len(text) and text[pos] == ";":
                pos = _skip_ws(text, pos + 1)
        if pos >= len(text) or (calls and text.startswith(_END_MARKERS, pos)):
            break
        where = f"tool_call {len(calls)}"
        if text[pos] != "{":
            if not calls:
                return _fail(calls, "no tool call found (text does not start with a JSON object)", "llama31")
            return _fail(calls, f"{where}: expected a JSON object at char {pos}", "llama31")
        try:
            obj, pos = _DECODER.raw_decode(text, pos)
        except (ValueError, RecursionError) as exc:
            return _fail(calls, f"{where}: {_json_error(exc, text)}", "llama31")
        call = _call_from_obj(obj, where)
        if isinstance(call, str):
            return _fail(calls, call, "llama31")
        calls.append(call)
    if not calls:
        return _fail(calls, "empty input", "llama31")
    return ParseResult(calls=tuple(calls), fmt="llama31")


def parse_llama31(text: str) -> ParseResult:
    """Calls in Llama-3.1 JSON text: ``{"name": "NAME", "parameters": {...}}`` objects.

    Several calls may be separated by ``;`` and/or newlines; an optional leading ``<|python_tag|>`` and a
    trailing ``<|eot_id|>``/``<|eom_id|>`` are accepted. ``arguments`` is accepted for ``parameters``.
    """
    return _guarded("llama31", _parse_llama31, text)


def _strip_fence(text: str) -> str:
    # Models like to wrap JSON in a markdown code fence.
    if text.startswith("```") and text.endswith("```") and len(text) >= 6:
        first_newline = text.find("\n")
        if first_newline >= 0:
            return text[first_newline + 1 : -3].strip()
    return text


def _parse_json(text: Any) -> ParseResult:
    if not isinstance(text, str):
        return _fail([], f"expected text, got {type(text).__name__}", "json")
    body = _strip_fence(text.strip())
    if not body:
        return _fail([], "empty input", "json")
    try:
        obj = _DECODER.decode(body)
    except (ValueError, RecursionError) as exc:
        return _fail([], _json_error(exc, body), "json")
    return _parse_obj(obj, "json")


def parse_json(text: str) -> ParseResult:
    """Calls in bare JSON text: one call object, an OpenAI message, or a list of call / tool_call objects.

    The whole text (optionally inside a markdown code fence) must be one JSON value.
    """
    return _guarded("json", _parse_json, text)


def _parse_any(obj: Any) -> ParseResult:
    if obj is None:
        return _fail([], "no input (None)", "any")
    if isinstance(obj, bytes | bytearray):
        obj = bytes(obj).decode("utf-8", errors="replace")
    if isinstance(obj, ToolCall | dict | list | tuple):
        return _parse_obj(obj, "openai" if isinstance(obj, dict) and "tool_calls" in obj else "object")
    if not isinstance(obj, str):
        return _fail([], f"expected text, a dict or a list, got {type(obj).__name__}", "any")
    text = obj.strip()
    if not text:
        return _fail([], "empty input", "any")
    hermes: ParseResult | None = None
    if _OPEN in text:
        hermes = parse_hermes(text)
        if hermes.ok:
            return hermes
    result = _parse_json_or_llama31(text)
    # "<tool_call>" may sit inside a JSON string value; if neither reading works, the tags were meant.
    return result if result.ok or hermes is None else hermes


def _parse_json_or_llama31(text: str) -> ParseResult:
    body = _strip_fence(text.removeprefix(_PYTHON_TAG).strip())
    try:
        decoded = _DECODER.decode(body)
    except (ValueError, RecursionError) as exc:
        if body.startswith("["):
            return _fail([], _json_error(exc, body), "json")
        # Not one JSON value: maybe several Llama-3.1 calls separated by ";" or newlines.
        return parse_llama31(text)
    return _parse_obj(decoded, "json")


def parse_any(text_or_obj: Any) -> ParseResult:
    """Calls from whatever a model or a dataset produced; never raises.

    Objects: a call object ``{"name", "arguments"}``, an OpenAI message or tool_call dict, a
    :class:`ToolCall`, or a list of these. Text: ``<tool_call>`` blocks if any (:func:`parse_hermes`),
    else one JSON value (:func:`parse_json`), else Llama-3.1 calls (:func:`parse_llama31`).
    ``ParseResult.fmt`` tells which reading was used.
    """
    return _guarded("any", _parse_any, text_or_obj)
