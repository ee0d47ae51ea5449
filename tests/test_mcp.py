"""MCP servers as a catalogue, against real servers nobody here wrote (time, calculator, git, sqlite,
filesystem, memory: `make mcp-servers` installs them) and the SDK's own server (tests/mcp/probe_server.py)
for the slow, networked, HTTP and media cases. No mocks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import free_port
from typer.testing import CliRunner

from ttpa_ray.cli import tools_app
from ttpa_ray.codec import ToolCall
from ttpa_ray.config import check_mcp_tools_not_evaluated, load_config, simulated_catalogues
from ttpa_ray.constraints import arguments_schema
from ttpa_ray.doctor import check_mcp_servers
from ttpa_ray.engine import Completion
from ttpa_ray.records import Dialogue
from ttpa_ray.reverse import DialogueState, ReverseBuilder, Seed, make_seeds, returned_values
from ttpa_ray.tools.mcp import McpBinding, McpConfigError, normalise_schema, read_servers
from ttpa_ray.tools.registry import Catalogue, ToolRegistry, load_catalogue

REPO = Path(__file__).resolve().parents[1]
SERVERS = REPO / "configs" / "mcp" / "servers.json"
PROBE = REPO / "tests" / "mcp" / "probe_server.py"
runner = CliRunner()


def servers_file(tmp_path: Path, servers: dict[str, Any], name: str = "servers.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps({"mcpServers": servers}))
    return f"mcp:{path}"


def probe(**options: Any) -> dict[str, Any]:
    return {"command": sys.executable, "args": [str(PROBE), "stdio"], **options}


@pytest.fixture(scope="module")
def catalogue() -> Catalogue:
    return load_catalogue(f"mcp:{SERVERS}")


@pytest.fixture(scope="module")
def registry(catalogue: Catalogue) -> Iterator[ToolRegistry]:
    with ToolRegistry(catalogue) as tools:
        yield tools


def server_processes(base: Path) -> list[psutil.Process]:
    """This test process's MCP server processes whose scratch folder is under ``base`` (a hub's)."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "TTPA_MCP_CONNECTION" in child.environ() and child.cwd().startswith(str(base)):
                found.append(child)
        except psutil.Error:
            continue
    return found


def test_every_server_lists_its_tools_and_answers(catalogue: Catalogue, registry: ToolRegistry) -> None:
    assert not catalogue.errors, catalogue.errors
    sources = {spec.source for spec in catalogue.tools()}
    assert sources == {f"mcp:{s}" for s in ("time", "calculator", "git", "sqlite", "filesystem", "memory")}
    assert len(catalogue) == 39  # 2 + 1 + 12 + 6 + 14 + 9, less the five the file denies
    assert "get_current_time" not in catalogue and "read_media_file" not in catalogue  # deny
    # The client fills in the repository path: the model never sees (or guesses) a scratch folder.
    assert "repo_path" not in catalogue.specs["git_log"].parameters["properties"]
    # pydantic's optional argument: anyOf [string, null] became a type list the checks understand
    since = catalogue.specs["git_log"].parameters["properties"]["start_timestamp"]
    assert since["type"] == ["string", "null"]
    assert catalogue.bindings["git_add"].stateful and not catalogue.bindings["calculate"].stateful
    assert catalogue.bindings["git_add"].annotations["readOnlyHint"] is False  # kept from the server

    answers = {
        ("calculate", json.dumps({"expression": "1240 * 70"})): "86800",
        (
            "convert_time",
            json.dumps({"source_timezone": "Europe/Paris", "time": "09:30", "target_timezone": "Asia/Tokyo"}),
        ): "17:30",
        ("git_log", json.dumps({"max_count": 5})): "Raise the low-stock threshold to 8 units",
        ("git_status", json.dumps({})): "CHANGELOG.md",
        ("read_query", json.dumps({"query": "SELECT name FROM customers WHERE city = 'Porto'"})): "Ines",
        ("read_text_file", json.dumps({"path": "notes/todo.txt"})): "TLS certificate",
        ("search_nodes", json.dumps({"query": "Porto"})): "manages the Porto warehouse",
    }
    for (tool, arguments), expected in answers.items():
        result = registry.call(tool, json.loads(arguments))
        assert result.ok, (tool, result.error)
        assert expected in result.to_message_content(), (tool, result.content)
    # a structured result stays structured; text that is not JSON stays text
    assert registry.call("calculate", {"expression": "2 + 2"}).content == {"result": "4"}
    assert isinstance(registry.call("git_branch", {"branch_type": "local"}).content, str)


def test_every_tools_arguments_decode_under_xgrammar(catalogue: Catalogue) -> None:
    """What reverse construction asks vLLM for: each tool's bounded arguments schema, which xgrammar
    must take (convert_time's described HH:MM pattern beside the non-empty bound did not: the replica
    failed on its first request)."""
    from vllm.v1.structured_output.backend_xgrammar import has_xgrammar_unsupported_json_features

    schemas = {n: arguments_schema(catalogue.specs[n].to_openai()) for n in catalogue.names}
    assert [n for n, schema in schemas.items() if has_xgrammar_unsupported_json_features(schema)] == []
    assert schemas["convert_time"]["properties"]["time"]["pattern"] == "^[0-9]{2}:[0-9]{2}$"


def test_errors_of_the_server_are_tool_errors(catalogue: Catalogue, registry: ToolRegistry) -> None:
    # What the server itself refuses comes back as isError: a tool error the model can read.
    bad_zone = registry.call("convert_time", {"source_timezone": "Mars/Olympus", "time": "09:30",
                                              "target_timezone": "Europe/Paris"})  # fmt: skip
    assert not bad_zone.ok and "Mars/Olympus" in str(bad_zone.error)
    hub = registry.mcp
    calculator = catalogue.bindings["calculate"]
    assert isinstance(calculator, McpBinding)
    wrong_type = hub.call(calculator, {"expression": 5})  # past our schema check: the server's own
    assert not wrong_type.ok and "expression" in str(wrong_type.error)
    # An unknown tool: an MCP error from some servers (time), an isError result from others (memory).
    time_server = catalogue.bindings["convert_time"]
    assert isinstance(time_server, McpBinding)
    for binding, key in ((time_server, None), (catalogue.bindings["read_graph"], "unknown-tool-dialogue")):
        assert isinstance(binding, McpBinding)
        ghost = McpBinding(binding.server, "no_such_tool", binding.stateful)
        result = hub.call(ghost, {}, key)
        assert not result.ok and "no_such_tool" in str(result.error), result
    hub.close_session("unknown-tool-dialogue")
    # mcp-server-sqlite says its errors in plain text: the servers file's error_pattern makes them errors
    not_select = registry.call("read_query", {"query": "DELETE FROM customers"})
    assert not not_select.ok and str(not_select.error).startswith("Error: Only SELECT queries")
    # Arguments that do not fit the schema never reach a server; nor do empty required values, which
    # the servers would take as successful calls (a required string or array may not be empty).
    before = len(registry.call_log)
    refused = registry.call("git_log", {"max_count": "ten"})
    assert not refused.ok and "max_count" in str(refused.error) and len(registry.call_log) == before
    assert catalogue.specs["git_commit"].parameters["properties"]["message"]["minLength"] == 1
    empties = {
        "create_directory": {"path": ""},
        "create_entities": {"entities": []},
        "read_multiple_files": {"paths": [""]},
    }
    for tool, empty in empties.items():
        result = registry.call(tool, empty)
        assert not result.ok and len(registry.call_log) == before, (tool, result)


def test_concurrent_dialogues_see_only_their_own_writes(registry: ToolRegistry) -> None:
    """Two dialogues write to memory, sqlite and git at once; each sees its own writes only, and a
    dialogue started afterwards sees the fixtures as they were."""

    def dialogue(name: str) -> dict[str, str]:
        with registry.session(f"writer-{name}") as tools:
            entity = {"name": name, "entityType": "team", "observations": ["new"]}
            writes = [
                ("create_entities", {"entities": [entity]}),
                ("write_query", {"query": f"INSERT INTO customers (name, city) VALUES ('{name}', 'Oslo')"}),
                ("git_create_branch", {"branch_name": f"team-{name.lower()}"}),
                ("git_commit", {"message": f"Changelog by {name}"}),
            ]
            for tool, arguments in writes:
                result = tools.call(tool, arguments)
                assert result.ok, (tool, result.error)
            return {
                "graph": tools.call("read_graph", {}).to_message_content(),
                "customers": tools.call(
                    "read_query", {"query": "SELECT name FROM customers"}
                ).to_message_content(),
                "branches": tools.call("git_branch", {"branch_type": "local"}).to_message_content(),
                "log": tools.call("git_log", {"max_count": 5}).to_message_content(),
            }

    with ThreadPoolExecutor(2) as pool:
        alpha, beta = pool.map(dialogue, ["Alpha", "Beta"])
    for mine, theirs, seen in (("Alpha", "Beta", alpha), ("Beta", "Alpha", beta)):
        assert mine in seen["graph"] and theirs not in seen["graph"] and "Ines Carvalho" in seen["graph"]
        assert mine in seen["customers"] and theirs not in seen["customers"]
        assert f"team-{mine.lower()}" in seen["branches"] and f"team-{theirs.lower()}" not in seen["branches"]
        assert f"Changelog by {mine}" in seen["log"] and f"Changelog by {theirs}" not in seen["log"]
    with registry.session("later") as tools:
        assert "Alpha" not in tools.call("read_graph", {}).to_message_content()
        customers = tools.call("read_query", {"query": "SELECT count(*) AS n FROM customers"})
        assert "4" in customers.to_message_content()  # the fixture's four, nobody's inserts
        assert "Changelog by" not in tools.call("git_log", {"max_count": 5}).to_message_content()


def test_a_server_killed_mid_call_is_a_tool_error_and_comes_back(tmp_path: Path) -> None:
    catalogue = load_catalogue(servers_file(tmp_path, {"probe": probe()}))
    with ToolRegistry(catalogue) as registry, registry.session("victim") as tools:
        first = tools.call("pid", {})
        assert first.ok
        pid = int(first.content["result"])
        outcome: dict[str, Any] = {}
        slow = threading.Thread(target=lambda: outcome.update(result=tools.call("sleep", {"seconds": 20})))
        slow.start()
        time.sleep(1.5)
        os.kill(pid, signal.SIGKILL)
        slow.join(30)
        killed = outcome["result"]
        assert not killed.ok and "died during the call to sleep" in str(killed.error), killed
        assert killed.elapsed < 15
        again = tools.call("pid", {})  # started again for the next call, in the same session
        assert again.ok and int(again.content["result"]) != pid


def test_a_hanging_call_times_out_and_the_server_is_replaced(tmp_path: Path) -> None:
    catalogue = load_catalogue(servers_file(tmp_path, {"probe": probe(call_timeout_s=2, state="shared")}))
    with ToolRegistry(catalogue) as registry:
        pid = registry.call("pid", {}).content["result"]
        assert registry.mcp.shared_pid("probe") == pid  # the server's own pid: the launcher exec'd it
        start = time.perf_counter()
        hung = registry.call("sleep", {"seconds": 60})
        assert not hung.ok and "timed out after 2 s" in str(hung.error)
        assert time.perf_counter() - start < 10
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        answer = registry.call("echo", {"text": "still here"})
        assert answer.ok and answer.content == {"result": "still here"}
        replacement = registry.mcp.shared_pid("probe")
        assert replacement is not None and replacement != pid
    assert not psutil.pid_exists(replacement)  # closing the registry ends every server


def test_sandboxed_server_has_no_network_unless_the_file_says_so(tmp_path: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        servers = {"closed": probe(state="shared"), "open": probe(state="shared", network=True)}
        ref = servers_file(tmp_path, servers)
        catalogue = load_catalogue(ref)
        # the same tool names on two servers: each gets its server's name as a prefix
        assert {"closed_connect", "open_connect"} <= set(catalogue.names) and "connect" not in catalogue
        with ToolRegistry(catalogue) as registry:
            closed = registry.call("closed_connect", {"port": port}).content["result"]
            opened = registry.call("open_connect", {"port": port}).content["result"]
        assert closed.startswith("refused") and opened == "connected", (closed, opened)
    finally:
        listener.close()


def test_servers_die_with_their_owner(tmp_path: Path) -> None:
    """A process holding a registry is killed (SIGKILL: no clean-up of its own) while its server is in
    a long call (so the closed pipe alone does not end it): the reaper ends the server, as it ends a
    killed replica's vLLM engine."""
    ref = servers_file(tmp_path, {"probe": probe(state="shared", call_timeout_s=600)})
    owner = subprocess.Popen(
        [sys.executable, "-c", f"""
import time
from ttpa_ray.tools.registry import ToolRegistry, load_catalogue
registry = ToolRegistry(load_catalogue({ref!r}))
print(registry.call("pid", {{}}).content["result"], flush=True)
registry.call("sleep", {{"seconds": 600}})
"""],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert owner.stdout is not None
    server_pid = int(owner.stdout.readline())
    assert psutil.Process(server_pid).is_running()
    time.sleep(2)  # the sleep call is under way
    owner.kill()
    owner.wait(10)
    deadline = time.time() + 20
    while psutil.pid_exists(server_pid) and psutil.Process(server_pid).status() != psutil.STATUS_ZOMBIE:
        assert time.time() < deadline, "the MCP server outlived its owner"
        time.sleep(0.5)


def test_a_servers_memory_is_capped(tmp_path: Path) -> None:
    catalogue = load_catalogue(servers_file(tmp_path, {"probe": probe(state="shared", memory_mb=400)}))
    with ToolRegistry(catalogue) as registry:
        assert registry.call("allocate", {"megabytes": 50}).ok
        too_much = registry.call("allocate", {"megabytes": 1000})
        assert not too_much.ok and "allocate" in str(too_much.error)
        assert registry.call("echo", {"text": "alive"}).ok


def test_cli_lists_and_calls_mcp_tools() -> None:
    listed = runner.invoke(tools_app, ["list", f"mcp:{SERVERS}"])
    assert listed.exit_code == 0, listed.output
    names = [line.split()[0] for line in listed.stdout.splitlines() if line.strip()]
    assert len(names) == 39 and "git_log" in names and "read_query" in names
    called = runner.invoke(tools_app, ["call", f"mcp:{SERVERS}", "git_log", "--args", '{"max_count": 1}'])
    assert called.exit_code == 0, called.output
    assert "Raise the low-stock threshold to 8 units" in json.loads(called.stdout)["content"]
    drop = '{"query": "DROP TABLE x"}'
    failed = runner.invoke(tools_app, ["call", f"mcp:{SERVERS}", "read_query", "--args", drop])
    assert failed.exit_code == 1 and "Only SELECT queries" in json.loads(failed.stdout)["error"]
    missing = runner.invoke(tools_app, ["list", "mcp:nowhere.json"])
    assert missing.exit_code == 2 and "MCP servers file 'nowhere.json' does not exist" in missing.stderr


def test_media_blocks_become_notes_never_base64(tmp_path: Path) -> None:
    catalogue = load_catalogue(servers_file(tmp_path, {"probe": probe(state="shared")}))
    with ToolRegistry(catalogue) as registry:
        result = registry.call("picture", {})
    assert result.ok
    assert result.content.splitlines() == [
        "[image: image/png, 309 bytes, not shown]",
        "[resource: file:///notes/a.txt (text/plain), not shown]",
        "a chart",
    ]


def test_a_server_that_cannot_start_is_one_line_naming_it(tmp_path: Path) -> None:
    ref = servers_file(
        tmp_path,
        {
            "ghost": {"command": "/opt/nowhere/mcp-server-ghost", "args": ["--db", "x"]},
            "crasher": {"command": sys.executable, "args": ["-c", "raise SystemExit('no database set')"]},
            "probe": probe(state="shared"),
        },
    )
    catalogue = load_catalogue(ref)
    assert "echo" in catalogue  # the others still load
    errors = {e.function: str(e) for e in catalogue.errors}
    assert set(errors) == {"ghost", "crasher"}
    assert "/opt/nowhere/mcp-server-ghost --db x" in errors["ghost"] and "did not start" in errors["ghost"]
    assert "no database set" in errors["crasher"]
    assert all("\n" not in line for line in errors.values())
    checks = {c.name: c for c in check_mcp_servers(ref)}  # what `ttpa doctor -c` prints per server
    assert not checks["MCP server ghost"].ok and checks["MCP server probe"].ok
    assert "6 tools (shared)" in checks["MCP server probe"].detail
    # a bad file is one line naming file and server
    with pytest.raises(McpConfigError, match=r"server 'x': give exactly one of 'command'"):
        read_servers(Path(servers_file(tmp_path, {"x": {"args": []}}, "bad.json").removeprefix("mcp:")))
    with pytest.raises(McpConfigError, match=r"server 'x': unknown key\(s\) \['comand'\]"):
        read_servers(Path(servers_file(tmp_path, {"x": {"comand": "y"}}, "typo.json").removeprefix("mcp:")))


def test_streamable_http_server_through_url(tmp_path: Path) -> None:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, str(PROBE), "http", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            with socket.socket() as probe_socket:
                if probe_socket.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        ref = servers_file(tmp_path, {"web": {"url": f"http://127.0.0.1:{port}/mcp", "state": "shared"}})
        catalogue = load_catalogue(ref)
        assert not catalogue.errors and "echo" in catalogue
        with ToolRegistry(catalogue) as registry:
            answer = registry.call("echo", {"text": "over http"})
            remote_pid = registry.call("pid", {}).content["result"]
        assert answer.ok and answer.content == {"result": "over http"}
        assert remote_pid == server.pid  # the server we started answered, not a process of ours
    finally:
        server.terminate()
        server.wait(10)


def test_seeds_take_one_servers_tools_and_config_checks(catalogue: Catalogue, tmp_path: Path) -> None:
    config = load_config(None, ["reverse.num_seeds=60", "reverse.tool_window=4"])
    seeds = make_seeds(catalogue, config.reverse, 0)
    servers = [{catalogue.specs[n].source for n in seed.tool_names} for seed in seeds]
    # a seed's tools come from one writing server, or from the read-only ones together (time and the
    # one-tool calculator: alone, neither makes a dialogue of two tools)
    assert all(len(s) == 1 or s == {"mcp:time", "mcp:calculator"} for s in servers), servers
    assert len(set().union(*servers)) == 6
    assert simulated_catalogues(f"mcp:{SERVERS}") == []  # a servers file is not a simulated catalogue
    assert ToolRegistry(catalogue).session_limit() == 32  # the default max_sessions of the writers
    limited = load_catalogue(
        servers_file(tmp_path, {"probe": probe(max_sessions=3), "ro": probe(state="shared")})
    )
    assert (
        ToolRegistry(limited).session_limit() == 3
        and ToolRegistry(load_catalogue("builtin")).session_limit() is None
    )
    merged = load_catalogue(f"builtin+mcp:{SERVERS}")
    assert len(merged) == 13 + 39 - 1 and {"get_weather", "git_log"} <= set(merged.names)
    # as in any merge, a name taken already is a load error: builtin has a convert_time of its own
    assert [(e.function, e.message) for e in merged.errors] == [
        ("convert_time", "duplicate tool name (already from builtin)")
    ]
    with pytest.raises(ValueError, match=r"MCP servers file 'nowhere\.json' does not exist"):
        load_config(None, ["reverse.catalogue=mcp:nowhere.json"])
    # held-out hygiene: a tool of an evaluated BFCL category's name is refused, as simulated ones are
    undenied = servers_file(tmp_path, {"time": {"command": str(REPO / ".mcp/time/bin/mcp-server-time")}})
    with pytest.raises(ValueError, match=r"get_current_time.*'deny' them"):
        check_mcp_tools_not_evaluated(load_catalogue(undenied), load_config(None))


def test_text_results_give_their_lines_and_cells_as_values() -> None:
    """git's log and a directory listing are one text block each: an answer quoting a commit message
    or a file name is grounded in them."""
    log = "Commit history:\nCommit: cb52ad8\nAuthor: Dana Ruiz\nMessage: Raise the low-stock threshold"
    listing = {"content": "[FILE] todo.txt                  84 B\n[DIR] notes\n\nTotal: 1 files, 1 dirs"}
    assert {"cb52ad8", "Dana Ruiz", "Raise the low-stock threshold"} <= set(returned_values(log))
    assert {"[FILE] todo.txt", "84 B", "1 files, 1 dirs"} <= set(returned_values(listing))
    assert list(returned_values("one line: no split")) == ["one line: no split"]


def test_normalise_schema_flattens_optional_arguments() -> None:
    schema = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "args",
        "type": "object",
        "properties": {
            "title": {"type": "string", "title": "Title"},  # a property named like a keyword stays
            "since": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
            "tags": {"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "null"}]},
            "either": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
        },
    }
    assert normalise_schema(schema) == {
        "type": "object",
        "properties": {
            "title": {"type": "string"},
            "since": {"type": ["string", "null"], "default": None},
            "tags": {"type": ["array", "null"], "items": {"type": "string"}},
            "either": {"type": ["integer", "string"]},
        },
    }


LAST_COMMIT = "The last commit says: Raise the low-stock threshold to 8 units"


def _completion(obj: object) -> Completion:
    text = json.dumps(obj)
    return Completion(text=text, token_ids=list(range(len(text) // 4)), finish_reason="stop")


def test_reverse_builds_a_dialogue_on_a_real_git_repository(catalogue: Catalogue) -> None:
    """Teacher outputs written by hand drive reversed construction against the git server: the
    dialogue's tool messages are what git said, and its tools name their source server."""
    config = load_config(None).reverse
    with ToolRegistry(catalogue) as registry:
        builder = ReverseBuilder(engine=None, registry=registry, config=config, teacher="scripted")  # type: ignore[arg-type]
        seed = Seed("seed-git", ("git_diff_unstaged", "git_log", "git_status"), 3, 1)
        state = DialogueState(seed=seed, tools=[builder.specs[n] for n in seed.tool_names])
        session = registry.session(seed.seed_id)
        for step in [
            {"scenario": "Dana reviews the inventory service before a release",
             "information": ["the last commit", "unstaged changes"],
             "tools": ["git_log", "git_diff_unstaged"]},
            {"name": "git_log", "arguments": {"max_count": 1}},
            {"name": "git_diff_unstaged", "arguments": {}},
        ]:  # fmt: skip
            builder.advance(state, _completion(step), session)
        assert state.calls_made == 2 and state.failed_calls == 0
        log_text = str(state.trajectory[0][1])
        assert "Raise the low-stock threshold to 8 units" in log_text
        builder.advance(
            state,
            _completion({"name": "answer", "arguments": {"answer": LAST_COMMIT}}),
            session,
        )
        question = {"question": "What was the last change to the inventory service, and what is not staged?"}
        builder.advance(state, _completion(question), session)
        session.close()
    dialogue = state.result
    assert isinstance(dialogue, Dialogue), dialogue
    tool_messages = [m.content or "" for m in dialogue.messages if m.role == "tool"]
    assert "Raise the low-stock threshold" in tool_messages[0] and "See CHANGELOG.md" in tool_messages[1]
    assert {t.source for t in dialogue.tools} == {"mcp:git"}
    assert next(c for m in dialogue.messages for c in m.tool_calls) == ToolCall("git_log", {"max_count": 1})


@pytest.mark.slow
def test_builder_on_tiny_model_with_mcp_servers(vllm_engine) -> None:
    """A real (random) teacher against the six servers' schemas (every request's grammar is one vLLM
    takes): every seed ends as a dialogue or a rejected row, every executed call is counted, and no
    server process outlives the registry. (The random model's calls may all be refused before any
    server: whether servers start is the other tests' business.)"""
    config = load_config(
        None, ["reverse.num_seeds=8", "reverse.max_tokens=128", f"reverse.catalogue=mcp:{SERVERS}"]
    )
    catalogue = load_catalogue(config.reverse.catalogue)
    seeds = make_seeds(catalogue, config.reverse, 0)
    with ToolRegistry(catalogue) as registry:
        builder = ReverseBuilder(vllm_engine, registry, config.reverse)
        # no more dialogues in flight than a writing server may have processes (max_sessions, 32)
        assert builder.in_flight == min(4 * vllm_engine.max_num_seqs, 32)
        dialogues, rejected = builder.run(seeds)
        log = list(registry.call_log)
        figures = registry.mcp_figures()
        base = registry.mcp.base
    assert sorted([d.seed_id for d in dialogues] + [r.input_id for r in rejected]) == sorted(
        s.seed_id for s in seeds
    )
    assert {e.tool for e in log} <= set(catalogue.names) and figures["calls"] == len(log)
    assert not server_processes(base)
