"""Tools from Python modules: one module per tool family, every public function a tool.

A folder is scanned recursively for ``*.py`` files (files and folders whose name starts with ``_`` or
``.`` are skipped, so helpers can live beside the tools; the ``category/tool/api.py`` layout works).
The public functions of a module are those defined in it (not imported into it) whose name does not
start with ``_``, or exactly the names of its ``__all__``. Each one's schema comes from its signature
and Google-style docstring through ``transformers.utils.get_json_schema`` (so every argument needs a
type hint and an ``Args:`` line), with the signature's JSON-compatible defaults added, and is checked
with :func:`~ttpa_ray.tools.spec.check_parameters_schema`.

Loading never stops on a bad module: a module that fails to import, a function whose schema cannot be
built or does not check, and a duplicate tool name each become a :class:`LoadError` naming the file and
the function; it is logged (one line each) and returned, and the rest loads.

Modules are imported in the loading process to read their schemas (their top-level code runs there:
the folder is trusted code); their functions are CALLED in the sandbox workers, which import the
module again by the same name and path.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from ttpa_ray.records import ToolSpec
from ttpa_ray.tools.sandbox import FunctionTarget
from ttpa_ray.tools.spec import LoadError, check_parameters_schema

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PythonTool:
    """A tool implemented by a Python function: its spec and where the sandbox finds the function."""

    spec: ToolSpec
    target: FunctionTarget


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _module_files(folder: Path) -> Iterator[Path]:
    for path in sorted(folder.rglob("*.py")):
        relative = path.relative_to(folder).parts
        if any(part.startswith(("_", ".")) for part in relative):
            continue
        yield path


def _folder_module_name(folder: Path, path: Path) -> str:
    # Stable across processes (the worker imports the same name) and distinct per folder.
    digest = hashlib.sha1(str(folder.resolve()).encode("utf-8")).hexdigest()[:10]
    dotted = "_".join(path.relative_to(folder).with_suffix("").parts)
    return f"ttpa_tools_{digest}_{dotted}"


def _import_file(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"not a loadable Python file: {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _public_functions(module: ModuleType) -> list[tuple[str, Any]]:
    exported = getattr(module, "__all__", None)
    if exported is not None:
        return [(str(name), getattr(module, str(name), None)) for name in exported]
    return [
        (name, value)
        for name, value in vars(module).items()
        if not name.startswith("_") and inspect.isfunction(value) and value.__module__ == module.__name__
    ]


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def function_schema(function: Callable[..., Any]) -> dict[str, Any]:
    """The OpenAI function schema of a Python function, with its JSON-compatible defaults.

    Raises whatever ``get_json_schema`` raises for a missing docstring, argument description or type hint.
    """
    from transformers.utils import get_json_schema

    schema = get_json_schema(function)["function"]
    parameters = schema.setdefault("parameters", {"type": "object", "properties": {}})
    properties = parameters.setdefault("properties", {})
    for name, parameter in inspect.signature(function).parameters.items():
        has_default = parameter.default is not inspect.Parameter.empty
        if name in properties and has_default and _jsonable(parameter.default):
            properties[name].setdefault("default", parameter.default)
    if not parameters.get("required"):
        parameters.pop("required", None)
    return {"name": schema["name"], "description": schema.get("description", ""), "parameters": parameters}


def _tool_from_function(
    name: str, function: Any, target: FunctionTarget, source: str
) -> tuple[PythonTool | None, str | None]:
    if not callable(function) or not inspect.isfunction(function):
        return None, f"{name!r} is not a function"
    try:
        schema = function_schema(function)
    except Exception as exc:
        return None, f"no usable schema ({_describe(exc)})"
    problems = check_parameters_schema(schema["parameters"])
    if problems:
        return None, "bad schema: " + "; ".join(problems)
    try:
        spec = ToolSpec.from_openai(schema, source=source)
    except ValueError as exc:
        return None, f"bad schema: {exc}"
    return PythonTool(spec=spec, target=target), None


def _load_module_tools(
    module: ModuleType, file_label: str, module_name: str, path: str | None, source: str
) -> tuple[list[PythonTool], list[LoadError]]:
    tools: list[PythonTool] = []
    errors: list[LoadError] = []
    for name, function in _public_functions(module):
        target = FunctionTarget(module=module_name, function=name, path=path)
        tool, problem = _tool_from_function(name, function, target, source)
        if tool is None:
            errors.append(LoadError(file_label, name, problem or "unknown problem"))
        else:
            tools.append(tool)
    return tools, errors


def _deduplicate(found: list[tuple[str, PythonTool]], errors: list[LoadError]) -> list[PythonTool]:
    seen: dict[str, str] = {}
    tools: list[PythonTool] = []
    for file_label, tool in found:
        if tool.spec.name in seen:
            errors.append(
                LoadError(
                    file_label,
                    tool.spec.name,
                    f"duplicate tool name (already defined in {seen[tool.spec.name]})",
                )
            )
            continue
        seen[tool.spec.name] = file_label
        tools.append(tool)
    return tools


def _report(errors: list[LoadError]) -> None:
    for error in errors:
        logger.warning("tool not loaded: %s", error)


def load_module_folder(folder: str | Path) -> tuple[list[PythonTool], list[LoadError]]:
    """Tools of every module file under ``folder``; bad modules and functions come back as errors.

    Raises ``FileNotFoundError`` only when ``folder`` itself is not a directory.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"tool module folder {root} does not exist or is not a directory")
    found: list[tuple[str, PythonTool]] = []
    errors: list[LoadError] = []
    for path in _module_files(root):
        label = str(path)
        name = _folder_module_name(root, path)
        try:
            module = _import_file(name, path.resolve())
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # SyntaxError, ImportError, even SystemExit: report and go on
            errors.append(LoadError(label, None, f"module failed to import ({_describe(exc)})"))
            continue
        tools, module_errors = _load_module_tools(module, label, name, str(path.resolve()), f"module:{path}")
        found += [(label, tool) for tool in tools]
        errors += module_errors
    tools = _deduplicate(found, errors)
    _report(errors)
    return tools, errors


def load_module_package(package: str, source: str) -> tuple[list[PythonTool], list[LoadError]]:
    """Tools of the modules of an installed package (e.g. ``ttpa_ray.tools.builtin``), imported by name."""
    root_module = importlib.import_module(package)
    folder = Path(next(iter(root_module.__path__)))
    found: list[tuple[str, PythonTool]] = []
    errors: list[LoadError] = []
    for path in _module_files(folder):
        if path.parent != folder:
            continue  # a package's tool modules are its direct children
        name = f"{package}.{path.stem}"
        label = str(path)
        try:
            module = importlib.import_module(name)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            errors.append(LoadError(label, None, f"module failed to import ({_describe(exc)})"))
            continue
        tools, module_errors = _load_module_tools(module, label, name, None, source)
        found += [(label, tool) for tool in tools]
        errors += module_errors
    tools = _deduplicate(found, errors)
    _report(errors)
    return tools, errors
