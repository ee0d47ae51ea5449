"""Tools that really run: the catalogues dialogues are grounded in, and the sandbox they run in.

- ``spec``: :class:`ToolResult`, argument validation before a call, schema checks at load.
- ``registry``: ``load_catalogue(...)`` and :class:`ToolRegistry` / :class:`ToolSession`, the one
  ``call(name, arguments) -> ToolResult`` interface over every source.
- Sources: ``python_modules`` (a folder of modules, public functions are tools), ``builtin`` (the
  deterministic local catalogue), ``bfcl_envs`` (BFCL's stateful executable environments),
  ``simulated`` (schema-only catalogues answered by a response writer, cached).
- ``sandbox``: the warm worker-process pool (timeout, memory cap, network guard, bounded output).
- ``cli``: ``ttpa tools list|show|call``.

Nothing is imported here: a sandbox worker imports only ``sandbox`` and ``spec``, and stays small.
"""
