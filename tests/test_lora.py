"""LoRA (``train.lora``): adapters trained through TRL's PEFT support, exported merged into a plain model.

What a user relies on: only the adapted layers move (the embeddings do not), the exported folder is a
whole model that transformers and vLLM load with no adapter file beside it, and in DPO with a live
reference the reference is the adapter-disabled model, i.e. the policy before training (LoRA's B
matrices start at zero, so the first step's rewards are zero).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from ttpa_ray.config import LoraSettings, StageConfig, TrainConfig
from ttpa_ray.records import Dialogue, Message, write_parquet
from ttpa_ray.train.data import bfcl_preference_pairs, chat_token_counter, check_dialogues
from ttpa_ray.train.export import check_policy_folder


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    return {name: p.detach().clone() for name, p in model.state_dict().items()}


def _moved(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    assert before.keys() == after.keys()
    return {name for name in before if not torch.equal(before[name], after[name])}


def test_lora_sft_trains_adapters_and_exports_them_merged(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ttpa_ray.train.arguments import RunSettings, lora_config
    from ttpa_ray.train.export import save_policy
    from ttpa_ray.train.sft import build_sft_trainer, sft_args

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    dialogues = []
    for pair in bfcl_preference_pairs("simple_python")[:8]:
        call = pair.chosen[0]
        messages = (
            *pair.prompt,
            call,
            Message("tool", json.dumps({"result": 42}), name=call.tool_calls[0].name),
            Message("assistant", "The result is 42."),
        )
        dialogues.append(Dialogue(f"d-{pair.pair_id}", "seed", messages, pair.tools).to_row())
    table = check_dialogues(dialogues, chat_token_counter(tokenizer), 1024).table
    stage = StageConfig(max_steps=3, learning_rate=1e-2, per_device_batch_size=2)
    settings = RunSettings(seed=0, deepspeed=None, use_cpu=True, save_steps=100)
    args = sft_args(stage, tmp_path / "work", settings)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    trainer = build_sft_trainer(model, tokenizer, table, args, peft_config=lora_config(LoraSettings(rank=4)))
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    assert 0 < trainable < 0.2 * total  # adapters only
    trainer.train()
    out = save_policy(trainer, tokenizer, tmp_path / "policy", base_model=tiny_model_dir)

    assert not (out / "adapter").exists() and not list(out.glob("adapter_*"))
    check_policy_folder(out)
    moved = _moved(_weights(tiny_model_dir), _weights(out))
    assert moved and all(name.endswith("proj.weight") for name in moved), sorted(moved)
    assert "model.embed_tokens.weight" not in moved


@pytest.mark.slow
def test_lora_dpo_on_ray_with_live_reference(ray_cluster: Any, tiny_model_dir: Path, tmp_path: Path) -> None:
    from ttpa_ray.train.run import run_stage

    # 25 pairs: 23 fit max_length, 6 are held back, 17 trained on, so the epoch's last batch of 2 x 2 is
    # one pair and a padding copy (the metrics gathered across ranks must survive that step)
    write_parquet(bfcl_preference_pairs("simple_python")[:25], tmp_path / "pairs" / "part-0.parquet")
    train = TrainConfig(
        num_workers=2,
        deepspeed="zero2",
        save_steps=1000,
        lora={"rank": 8, "target_modules": ["q_proj", "v_proj"]},
        dpo={
            "reference": "live",  # the adapter-disabled policy: no second model is loaded
            "learning_rate": 5e-3,
            "num_epochs": 1,
            "per_device_batch_size": 2,
            "max_length": 384,
            "init_from_sft": False,
            "validation_fraction": 0.25,
        },
    )
    outcome = run_stage("dpo", train, policy=str(tiny_model_dir), run_dir=tmp_path, run_name="lora")

    history = outcome.result.history
    assert outcome.rows_used == 23 and [int(h["step"]) for h in history] == [1, 2, 3, 4, 5]
    # step 1's batch is scored before any update: policy == adapter-disabled reference
    assert abs(history[0]["rewards/chosen"]) < 1e-4 and abs(history[0]["rewards/rejected"]) < 1e-4
    assert any(abs(h["rewards/margins"]) > 1e-3 for h in history[1:])  # and then the adapters moved it
    final = outcome.result.metrics
    assert final["heldback_pairs"] > 0 and 0.0 <= final["heldback_reward_accuracy"] <= 1.0

    policy = outcome.result.policy_dir
    assert policy is not None and not list(policy.glob("adapter_*"))
    check_policy_folder(policy)
    moved = _moved(_weights(tiny_model_dir), _weights(policy))
    assert moved and {name.rsplit(".", 2)[-2] for name in moved} == {"q_proj", "v_proj"}, sorted(moved)
