"""Start an MCP server process inside the sandbox's isolation, then become it.

``python -m ttpa_ray.tools.mcp_launch --scratch DIR [--network] [--memory-mb N] [--max-processes N]
-- COMMAND ARGS...`` puts this process in its own namespaces (:func:`ttpa_ray.tools.isolation.isolate`:
no network unless ``--network``, a read-only filesystem but ``DIR``), caps its memory (``RLIMIT_DATA``:
a V8 server reserves more address space than ``RLIMIT_AS`` could allow, but what it writes is
counted) and its processes, and ``exec``s the server: same pid, same stdin and stdout, so the MCP
client talks to the server itself. What could not be enforced is said on stderr (the server's log).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys

from ttpa_ray.tools.isolation import cap_processes, isolate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ttpa_ray.tools.mcp_launch")
    parser.add_argument("--scratch", required=True)
    parser.add_argument("--network", action="store_true")
    parser.add_argument("--memory-mb", type=int, default=0)
    parser.add_argument("--max-processes", type=int, default=0)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no server command after --")
    missing = isolate(os.path.abspath(args.scratch), network=args.network)
    if args.max_processes:
        _cgroup, problem = cap_processes(args.max_processes)
        missing += [problem] if problem else []
    if args.memory_mb:
        cap = args.memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    for problem in missing:
        print(f"ttpa mcp_launch: not enforced: {problem}", file=sys.stderr, flush=True)
    try:
        os.execvp(command[0], command)
    except OSError as err:
        print(f"ttpa mcp_launch: cannot run {command[0]!r}: {err.strerror}", file=sys.stderr, flush=True)
        sys.exit(127)


if __name__ == "__main__":
    main()
