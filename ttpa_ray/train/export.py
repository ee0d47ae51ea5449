"""Export of the trained policy as a Hugging Face folder (weights + config + tokenizer).

vLLM and transformers load the folder as they load a hub model; evaluation points ``model.policy``
(or its ``--policy`` option) at it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def save_policy(trainer: Any, tokenizer: Any, out: Path, base_model: str | Path | None = None) -> Path:
    """Save the trainer's model to ``out``; call on every rank (ZeRO-3 gathers the shards to rank 0).

    With ``base_model`` (a LoRA run) the trainer saves its adapters, and rank 0 merges them into a fresh
    copy of the base model: ``out`` is a plain model folder either way, which vLLM loads as it is."""
    out = Path(out)
    # HF's save_model consolidates ZeRO-3 shards (stage3_gather_16bit_weights_on_model_save) on rank 0
    trainer.save_model(str(out / "adapter") if base_model is not None else str(out))
    if trainer.is_world_process_zero():
        if base_model is not None:
            _merge_adapter(Path(base_model), out / "adapter", out)
        tokenizer.save_pretrained(str(out))
        # TRL writes a model card and training args beside the weights: not part of a model folder
        for extra in ("training_args.bin",):
            (out / extra).unlink(missing_ok=True)
    return out


def _merge_adapter(base_model: Path, adapter: Path, out: Path) -> None:
    """Merge the LoRA adapters saved in ``adapter`` into the base model; save the result in ``out``."""
    import shutil

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged.save_pretrained(str(out))
    shutil.rmtree(adapter)


def check_policy_folder(folder: Path) -> dict[str, Any]:
    """Load the folder with transformers (config, tokenizer, weights); raise a clear error if it fails."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    missing = [n for n in ("config.json", "tokenizer_config.json") if not (folder / n).is_file()]
    if missing or not any(folder.glob("*.safetensors")):
        raise FileNotFoundError(
            f"{folder} is not a complete HF model folder (missing {missing or 'weights'})"
        )
    config = AutoConfig.from_pretrained(str(folder))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    return {
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "model_type": json.loads((folder / "config.json").read_text(encoding="utf-8"))["model_type"],
        "config": config.to_dict(),
    }
